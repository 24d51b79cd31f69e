"""The data-access layer: S3, DynamoDB, Step Functions and SNS behind one small class.

The server code (``fedstream.server``) reaches AWS only through this class. The sync round
protocol's writes and the async step's commit are domain verbs here (``add_report``,
``claim_round``, ``close_round``, ``commit_async_step``, ...), so no DynamoDB expression is
written elsewhere. The local runtime hooks the class's boto3 clients to inject faults. Clients are
created once per process (a warm Lambda reuses them) and the global models are cached by (run,
version): versions are write-once.

``Repository`` is the seam: exactly what the server code calls on a store. ``Store`` is the AWS
implementation; ``fedstream.server.memory.MemoryStore`` an in-memory one with the same semantics,
for tests and local reasoning. Both share the per-process caches of ``StoreCaches``.
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol, runtime_checkable

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from fedstream import keys
from fedstream.aggregation import STATE_SIZE_FACTOR, AggregatorState, state_from_bytes, state_to_bytes
from fedstream.settings import HandlerSettings
from fedstream.weights import ModelSpec, Weights, WireFormatError, decode, sha256_hex

_BOTO_CONFIG = Config(retries={"mode": "standard", "max_attempts": 5}, max_pool_connections=32)


class ConditionFailed(Exception):
    """A DynamoDB condition or an S3 precondition did not hold."""


class MissingObject(Exception):
    pass


class UnreadableObject(Exception):
    """The object exists but this function may never read it (archived, or under a foreign KMS key)."""


class CorruptObject(Exception):
    """An object the server wrote itself (a global model) fails the wire format's checks.

    A fault, not a refusal: it fails the invocation, which is retried. A ``WireFormatError`` (a
    ``Refused``) would be logged and counted against the update being judged, as if it were bad.
    """


@contextmanager
def own_object(key: str) -> Iterator[None]:
    """Around a read of an object the server wrote: a ``WireFormatError`` raised inside becomes a
    ``CorruptObject`` (chained to it), so a ``Refused`` from the server always concerns an input."""
    try:
        yield
    except WireFormatError as exc:
        raise CorruptObject(f"server object {key} is invalid ({exc.reason}): {exc}") from exc


# S3 answers that no retry changes, for an object its writer controls (storage class, encryption).
_UNREADABLE = ("InvalidObjectState", "AccessDenied", "KMS.DisabledException", "KMS.KMSInvalidStateException")


def is_code(exc: BaseException, *codes: str) -> bool:
    return isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in codes


def plain(value: Any) -> Any:
    """DynamoDB's Decimals and sets as plain Python values."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, set):
        return sorted(plain(v) for v in value)
    return value


@dataclass(frozen=True)
class GlobalModel:
    version: int
    key: str
    sha256: str
    weights: Weights
    metadata: dict[str, str]

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec.of(self.weights)


@runtime_checkable
class Repository(Protocol):
    """The seam between the server code and its storage: exactly what ``fedstream.server`` (and the
    handlers, through it) calls on a store. ``Store`` implements it on AWS; ``MemoryStore``
    (``fedstream.server.memory``) in memory, with the same conditions and the same exceptions.

    Every DynamoDB write is a domain verb, one conditional write (or one transaction):
    ``ConditionFailed`` means the item was not as the verb requires, and nothing was written.
    """

    settings: HandlerSettings

    # ---- S3: objects by key; a versioned bucket names the version read --------------------------
    def get_bytes(self, key: str, limit: int | None = None) -> bytes: ...

    def get_object(
        self, key: str, version_id: str | None = None, *, limit: int | None = None
    ) -> tuple[bytes, str | None]: ...

    def put_once(self, key: str, data: bytes) -> bool: ...

    def put(self, key: str, data: bytes) -> None: ...

    # ---- this process's caches (a warm Lambda keeps them between invocations) ------------------
    def remember_blob(self, key: str, data: bytes) -> None: ...

    def cached_blob(self, key: str) -> bytes | None: ...

    def remember_run_state(self, run_id: str, state: Mapping[str, Any]) -> None: ...

    def cached_run_state(self, run_id: str) -> dict[str, Any] | None: ...

    def forget_run_state(self, run_id: str) -> None: ...

    # ---- the aggregator's state between steps (server-written objects under runs/*/state/) ------
    def aggregator_state(self, key: str | None) -> AggregatorState | None: ...

    def put_aggregator_state(self, key: str, state: AggregatorState, metadata: Mapping[str, str]) -> None: ...

    def cached_global_model(self, run_id: str, version: int) -> GlobalModel | None: ...

    def global_model(self, run_id: str, version: int, key: str | None = None) -> GlobalModel: ...

    def remember_global_model(
        self, run_id: str, version: int, key: str, data: bytes, sha256: str | None = None
    ) -> GlobalModel: ...

    # ---- the run table: consistent reads, items as plain Python values (``plain``) --------------
    def run_state(self, run_id: str) -> dict[str, Any] | None: ...

    def round_item(self, run_id: str, round_number: int) -> dict[str, Any] | None: ...

    def run_items(self, run_id: str, sort_keys: list[str]) -> dict[str, dict[str, Any]]: ...

    # ---- sync rounds -----------------------------------------------------------------------------
    def bind_object(
        self, run_id: str, client_id: str, sha256: str, object_key: str, used_in: str
    ) -> None: ...

    def add_report(
        self,
        run_id: str,
        round_number: int,
        client_id: str,
        base_version: int,
        report: str,
        task_token: str | None,
        now: str,
    ) -> dict[str, Any]: ...

    def claim_round(
        self, run_id: str, round_number: int, claim_id: str, min_reports: int, now: float, stale_before: float
    ) -> dict[str, Any]: ...

    def release_claim(self, run_id: str, round_number: int, claim_id: str) -> None: ...

    def set_round_flag(self, run_id: str, round_number: int, flag: str, now: str) -> None: ...

    def clear_round_flag(self, run_id: str, round_number: int, flag: str) -> None: ...

    def record_round_token(self, run_id: str, round_number: int, token: str) -> None: ...

    def fail_round(
        self, run_id: str, round_number: int, why: str, *, below_quorum: int | None = None
    ) -> None: ...

    def close_round(self, run_id: str, round_number: int, result: str, now: str) -> dict[str, Any]: ...

    def pin_finalize_token(
        self, run_id: str, round_number: int, finalize_id: str, token: str
    ) -> dict[str, Any]: ...

    def publish_version(self, run_id: str, expected: int, fields: Mapping[str, Any]) -> None: ...

    def finish_run(self, run_id: str, reason: str, now: str, status: str = "SUCCEEDED") -> None: ...

    def create_items(self, items: list[dict[str, Any]]) -> None: ...

    # ---- async steps -----------------------------------------------------------------------------
    def commit_async_step(
        self,
        run_id: str,
        sets: Mapping[str, Any],
        *,
        expected: tuple[int, int, Any],
        counters: Mapping[str, int],
        new_items: list[dict[str, Any]],
    ) -> None: ...

    # ---- Step Functions callbacks and the model topic --------------------------------------------
    def send_task_success(self, token: str, output: Mapping[str, Any]) -> bool: ...

    def send_task_failure(self, token: str, error: str, cause: str) -> bool: ...

    def publish(self, message: Mapping[str, Any]) -> None: ...


class StoreCaches:
    """What one process keeps between invocations, whatever the storage behind it: the last global
    models (by run and version: versions are write-once), the last blobs it wrote and the run states
    it committed. A subclass provides ``settings`` and ``get_object``."""

    settings: HandlerSettings

    def __init__(self) -> None:
        self._models: OrderedDict[tuple[str, int], GlobalModel] = OrderedDict()
        self._blobs: OrderedDict[str, bytes] = OrderedDict()
        self._run_states: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def get_object(
        self, key: str, version_id: str | None = None, *, limit: int | None = None
    ) -> tuple[bytes, str | None]:
        raise NotImplementedError

    def get_bytes(self, key: str, limit: int | None = None) -> bytes:
        return self.get_object(key, limit=limit)[0]

    def remember_blob(self, key: str, data: bytes) -> None:
        """Keep the bytes of a write-once object this process just wrote (the last two)."""
        with self._lock:
            self._blobs[key] = data
            while len(self._blobs) > 2:
                self._blobs.popitem(last=False)

    def cached_blob(self, key: str) -> bytes | None:
        with self._lock:
            return self._blobs.get(key)

    def remember_run_state(self, run_id: str, state: Mapping[str, Any]) -> None:
        """The run state this process just committed: a guess for its next batch, checked by its commit."""
        with self._lock:
            self._run_states[run_id] = dict(state)

    def cached_run_state(self, run_id: str) -> dict[str, Any] | None:
        with self._lock:
            state = self._run_states.get(run_id)
            return None if state is None else dict(state)

    def forget_run_state(self, run_id: str) -> None:
        with self._lock:
            self._run_states.pop(run_id, None)

    def aggregator_state(self, key: str | None) -> AggregatorState | None:
        """The aggregator state written under ``key`` (None for no key). The server wrote it (clients
        cannot write ``runs/*/state/``), so one that fails its checks is a ``CorruptObject``."""
        if not key:
            return None
        limit = STATE_SIZE_FACTOR * self.settings.max_model_bytes
        data = self.cached_blob(key)
        if data is None:
            data = self.get_object(key, limit=limit)[0]
        with own_object(key):
            state, _ = state_from_bytes(data, limit)
        return state

    def put_aggregator_state(self, key: str, state: AggregatorState, metadata: Mapping[str, str]) -> None:
        """Write a state under a fresh key (never rewritten), and keep its bytes for this process."""
        data = state_to_bytes(state, metadata)
        self.put(key, data)
        self.remember_blob(key, data)

    def cached_global_model(self, run_id: str, version: int) -> GlobalModel | None:
        with self._lock:
            return self._models.get((run_id, version))

    def global_model(self, run_id: str, version: int, key: str | None = None) -> GlobalModel:
        cache_key = (run_id, version)
        with self._lock:
            if cache_key in self._models:
                self._models.move_to_end(cache_key)
                return self._models[cache_key]
        key = key or keys.global_key(run_id, version)
        with own_object(key):
            data = self.get_bytes(key)
        return self.remember_global_model(run_id, version, key, data)

    def remember_global_model(
        self, run_id: str, version: int, key: str, data: bytes, sha256: str | None = None
    ) -> GlobalModel:
        """Cache a version from its bytes: one just published need not be downloaded again.

        A caller that just encoded ``data`` (so its values were checked) passes its ``sha256``,
        and neither the hash nor the NaN/Inf scan is repeated.
        """
        with own_object(key):
            weights, metadata = decode(
                data, max_bytes=self.settings.max_model_bytes, check_finite=sha256 is None
            )
        model = GlobalModel(version, key, sha256 or sha256_hex(data), weights, metadata)
        with self._lock:
            self._models[(run_id, version)] = model
            while len(self._models) > 8:
                self._models.popitem(last=False)
        return model


class Store(StoreCaches):
    """``Repository`` on AWS: S3, DynamoDB, Step Functions and SNS through boto3."""

    def __init__(self, settings: HandlerSettings, session: boto3.Session | None = None) -> None:
        super().__init__()
        self.settings = settings
        session = session or _shared_session()
        endpoint = os.environ.get("FEDSTREAM_ENDPOINT_URL") or None
        self.s3 = session.client("s3", config=_BOTO_CONFIG, endpoint_url=endpoint)
        self.dynamodb = session.resource("dynamodb", config=_BOTO_CONFIG, endpoint_url=endpoint)
        self.sfn = session.client("stepfunctions", config=_BOTO_CONFIG, endpoint_url=endpoint)
        self.sns = session.client("sns", config=_BOTO_CONFIG, endpoint_url=endpoint)
        self.runs = self.dynamodb.Table(settings.run_table)
        self.updates = self.dynamodb.Table(settings.updates_table)

    # ---- S3 -------------------------------------------------------------------------------
    def get_object(
        self, key: str, version_id: str | None = None, *, limit: int | None = None
    ) -> tuple[bytes, str | None]:
        """An object's bytes and S3 version id (None on an unversioned bucket).

        With ``version_id``, exactly that version: immutable, so bytes checked once need no
        second check. Objects over ``limit`` bytes (default: ``max_model_bytes``) are refused.
        """
        limit = limit or self.settings.max_model_bytes
        kwargs = {"VersionId": version_id} if version_id else {}
        try:
            response = self.s3.get_object(Bucket=self.settings.bucket, Key=key, **kwargs)
        except ClientError as exc:
            if is_code(exc, "NoSuchKey", "NoSuchVersion", "404", "NotFound"):
                what = f"version {version_id} of " if version_id else ""
                raise MissingObject(f"{what}s3://{self.settings.bucket}/{key} does not exist") from exc
            if is_code(exc, *_UNREADABLE):
                code = exc.response["Error"]["Code"]  # type: ignore[attr-defined]
                raise UnreadableObject(f"s3://{self.settings.bucket}/{key} cannot be read ({code})") from exc
            raise
        if response.get("ContentLength", 0) > limit:
            response["Body"].close()
            raise WireFormatError(
                "too_large", f"object {key} has {response['ContentLength']} bytes > {limit}"
            )
        version = response.get("VersionId")
        return response["Body"].read(), (None if version in (None, "null") else str(version))

    def put_once(self, key: str, data: bytes) -> bool:
        """Write-once put; False when the key already exists (nothing is overwritten)."""
        try:
            self.s3.put_object(Bucket=self.settings.bucket, Key=key, Body=data, IfNoneMatch="*")
        except ClientError as exc:
            if is_code(exc, "PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise
        return True

    def put(self, key: str, data: bytes) -> None:
        self.s3.put_object(Bucket=self.settings.bucket, Key=key, Body=data)

    # ---- DynamoDB ---------------------------------------------------------------------------
    def run_state(self, run_id: str) -> dict[str, Any] | None:
        item = self.runs.get_item(Key={"run_id": run_id, "sk": "state"}, ConsistentRead=True).get("Item")
        return plain(item) if item else None

    def round_item(self, run_id: str, round_number: int) -> dict[str, Any] | None:
        item = self.runs.get_item(
            Key={"run_id": run_id, "sk": f"round#{round_number}"}, ConsistentRead=True
        ).get("Item")
        return plain(item) if item else None

    def conditional_update(
        self,
        key: Mapping[str, str],
        update: str,
        condition: str,
        values: Mapping[str, Any],
        names: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "Key": dict(key),
            "UpdateExpression": update,
            "ConditionExpression": condition,
            "ReturnValues": "ALL_NEW",
        }
        if values:
            kwargs["ExpressionAttributeValues"] = to_dynamo(values)
        if names:
            kwargs["ExpressionAttributeNames"] = dict(names)
        try:
            return plain(self.runs.update_item(**kwargs)["Attributes"])
        except ClientError as exc:
            if is_code(exc, "ConditionalCheckFailedException"):
                raise ConditionFailed(condition) from exc
            raise

    def run_items(self, run_id: str, sort_keys: list[str]) -> dict[str, dict[str, Any]]:
        """The run-table items of ``run_id`` with these sort keys that exist, by sort key (consistent)."""
        found: dict[str, dict[str, Any]] = {}
        unique = list(dict.fromkeys(sort_keys))
        for start in range(0, len(unique), 100):  # BatchGetItem reads at most 100 keys
            pending: dict[str, Any] = {
                self.settings.run_table: {
                    "Keys": [{"run_id": run_id, "sk": sk} for sk in unique[start : start + 100]],
                    "ConsistentRead": True,
                }
            }
            while pending:
                response = self.dynamodb.batch_get_item(RequestItems=pending)
                for item in response.get("Responses", {}).get(self.settings.run_table, []):
                    found[str(item["sk"])] = plain(item)
                pending = response.get("UnprocessedKeys") or {}
        return found

    def run_items_with_prefix(self, run_id: str, prefix: str) -> list[dict[str, Any]]:
        """Every run-table item of ``run_id`` whose sort key starts with ``prefix`` (a paged Query)."""
        from boto3.dynamodb.conditions import Key

        items: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {
            "KeyConditionExpression": Key("run_id").eq(run_id) & Key("sk").begins_with(prefix),
            "ConsistentRead": True,
        }
        while True:
            response = self.runs.query(**kwargs)
            items += [plain(item) for item in response.get("Items", [])]
            if "LastEvaluatedKey" not in response:
                return items
            kwargs["ExclusiveStartKey"] = response["LastEvaluatedKey"]

    def transact(self, items: list[dict[str, Any]]) -> None:
        """One DynamoDB transaction on the run table (at most 100 items, 4 MB); ConditionFailed if any
        condition did not hold. Each item is ``{"Put": {...}}`` or ``{"Update": {...}}`` with plain
        Python values (floats become Decimals here).
        """
        request = []
        for item in items:
            [(verb, body)] = item.items()
            body = {"TableName": self.settings.run_table, **body}
            for field in ("Item", "Key", "ExpressionAttributeValues"):
                if field in body:
                    body[field] = to_dynamo(body[field])
            request.append({verb: body})
        try:
            self.dynamodb.meta.client.transact_write_items(TransactItems=request)
        except ClientError as exc:
            reasons = {r.get("Code") for r in exc.response.get("CancellationReasons", [])} - {"None", None}
            # Only a condition that did not hold, or a concurrent transaction, is worth recomputing.
            if is_code(exc, "TransactionCanceledException") and reasons <= {
                "ConditionalCheckFailed",
                "TransactionConflict",
            }:
                raise ConditionFailed(f"transaction cancelled ({', '.join(sorted(reasons))})") from exc
            raise

    # ---- sync rounds: every DynamoDB expression of the round protocol (fedstream.server.sync) ---
    # Each verb is one conditional write; ConditionFailed means the round is not as it requires.

    def bind_object(self, run_id: str, client_id: str, sha256: str, object_key: str, used_in: str) -> None:
        """Bind a client's object (by sha256) to ``used_in`` (a round's sort key); again is fine."""
        self.conditional_update(
            {"run_id": run_id, "sk": f"object#{client_id}#{sha256}"},
            "SET used_in = :at, object_key = :key",
            "attribute_not_exists(run_id) OR used_in = :at",
            {":at": used_in, ":key": object_key},
        )

    def add_report(
        self,
        run_id: str,
        round_number: int,
        client_id: str,
        base_version: int,
        report: str,
        task_token: str | None,
        now: str,
    ) -> dict[str, Any]:
        """Add a client's first report to an open round of this version (and token); the round after."""
        condition = "#status = :open AND NOT contains(reported, :c) AND version = :base"
        values: dict[str, Any] = {
            ":cid": {client_id},
            ":one": 1,
            ":open": "open",
            ":c": client_id,
            ":base": base_version,
            ":report": report,
            ":at": now,
        }
        if task_token:
            condition += " AND (attribute_not_exists(task_token) OR task_token = :tok)"
            values[":tok"] = task_token
        return self.conditional_update(
            _round(run_id, round_number),
            "ADD reported :cid, reported_count :one SET last_report_at = :at, #report = :report",
            condition,
            values,
            {"#status": "status", "#report": f"report#{client_id}"},
        )

    def claim_round(
        self, run_id: str, round_number: int, claim_id: str, min_reports: int, now: float, stale_before: float
    ) -> dict[str, Any]:
        """open (with ``min_reports``) or a claim older than ``stale_before`` -> aggregating."""
        return self.conditional_update(
            _round(run_id, round_number),
            "SET #status = :agg, claim_id = :claim, claimed_at = :now",
            "(#status = :open AND reported_count >= :min) OR (#status = :agg AND claimed_at < :stale)",
            {
                ":agg": "aggregating",
                ":open": "open",
                ":claim": claim_id,
                ":now": now,
                ":min": min_reports,
                ":stale": stale_before,
            },
            {"#status": "status"},
        )

    def release_claim(self, run_id: str, round_number: int, claim_id: str) -> None:
        self.conditional_update(
            _round(run_id, round_number),
            "SET #status = :open REMOVE claim_id, claimed_at",
            "#status = :agg AND claim_id = :claim",
            {":open": "open", ":agg": "aggregating", ":claim": claim_id},
            {"#status": "status"},
        )

    def set_round_flag(self, run_id: str, round_number: int, flag: str, now: str) -> None:
        """Set ``flag`` (e.g. ``callback_at``) once; ConditionFailed if it is already set."""
        self.conditional_update(
            _round(run_id, round_number), f"SET {flag} = :at", f"attribute_not_exists({flag})", {":at": now}
        )

    def clear_round_flag(self, run_id: str, round_number: int, flag: str) -> None:
        self.conditional_update(
            _round(run_id, round_number), f"REMOVE {flag}", "attribute_exists(run_id)", {}
        )

    def record_round_token(self, run_id: str, round_number: int, token: str) -> None:
        """Keep the first task token recorded for an existing round."""
        self.conditional_update(
            _round(run_id, round_number),
            "SET task_token = :tok",
            "attribute_exists(run_id) AND attribute_not_exists(task_token)",
            {":tok": token},
        )

    def fail_round(
        self, run_id: str, round_number: int, why: str, *, below_quorum: int | None = None
    ) -> None:
        """Mark the round failed; with ``below_quorum``, only an open round with fewer reports."""
        condition, values = "attribute_exists(run_id)", {":failed": "failed", ":why": why}
        if below_quorum is not None:
            condition = "#status = :open AND reported_count < :min"
            values |= {":open": "open", ":min": below_quorum}
        self.conditional_update(
            _round(run_id, round_number),
            "SET #status = :failed, failure = :why",
            condition,
            values,
            {"#status": "status"},
        )

    def close_round(self, run_id: str, round_number: int, result: str, now: str) -> dict[str, Any]:
        """aggregating -> closed, with the result the callbacks send; the round after."""
        return self.conditional_update(
            _round(run_id, round_number),
            "SET #status = :closed, #result = :result, closed_at = :at",
            "#status = :agg",
            {":closed": "closed", ":result": result, ":at": now, ":agg": "aggregating"},
            {"#status": "status", "#result": "result"},
        )

    def pin_finalize_token(
        self, run_id: str, round_number: int, finalize_id: str, token: str
    ) -> dict[str, Any]:
        """Keep the first task token presented with the round's finalize id; the round after."""
        return self.conditional_update(
            _round(run_id, round_number),
            "SET finalize_token = :tok",
            "finalize_id = :id AND (attribute_not_exists(finalize_token) OR finalize_token = :tok)",
            {":id": finalize_id, ":tok": token},
        )

    def publish_version(self, run_id: str, expected: int, fields: Mapping[str, Any]) -> None:
        """Move the run state from version ``expected`` to ``fields["version"]`` with ``fields``."""
        names = {f"#{name}": name for name in fields}
        values = {f":{name}": value for name, value in fields.items()} | {":expected": expected}
        self.conditional_update(
            {"run_id": run_id, "sk": "state"},
            "SET " + ", ".join(f"#{name} = :{name}" for name in fields),
            "version = :expected",
            values,
            names,
        )

    def finish_run(self, run_id: str, reason: str, now: str, status: str = "SUCCEEDED") -> None:
        """RUNNING -> ``status`` with ``reason``; ConditionFailed if the run is not running."""
        self.conditional_update(
            {"run_id": run_id, "sk": "state"},
            "SET #status = :done, finish_reason = :why, finished_at = :at",
            "#status = :running",
            {":done": status, ":why": reason, ":at": now, ":running": "RUNNING"},
            {"#status": "status"},
        )

    def list_runs(self) -> list[dict[str, Any]]:
        """Every run's state item (a paged Scan: for operators, not for the functions)."""
        from boto3.dynamodb.conditions import Attr

        items: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {"FilterExpression": Attr("sk").eq("state")}
        while True:
            response = self.runs.scan(**kwargs)
            items += [plain(item) for item in response.get("Items", [])]
            if "LastEvaluatedKey" not in response:
                return items
            kwargs["ExclusiveStartKey"] = response["LastEvaluatedKey"]

    def create_items(self, items: list[dict[str, Any]]) -> None:
        """Create run-table items in one transaction, all or none; ConditionFailed if one exists."""
        self.transact(_creates(items))

    # ---- async steps ------------------------------------------------------------------------------
    def commit_async_step(
        self,
        run_id: str,
        sets: Mapping[str, Any],
        *,
        expected: tuple[int, int, Any],
        counters: Mapping[str, int],
        new_items: list[dict[str, Any]],
    ) -> None:
        """One transaction: the run state moves from ``expected`` (version, buffer_seq, status) to
        ``sets`` and adds ``counters``; each of ``new_items`` (markers, the version item) is created,
        and must not exist. ConditionFailed if any condition does not hold: nothing is written."""
        names = {f"#{name}": name for name in sets} | {
            "#v0": "version",
            "#seq0": "buffer_seq",
            "#st0": "status",
        }
        version, sequence, status = expected
        values = (
            {f":{name}": value for name, value in sets.items()}
            | {":v0": version, ":seq0": sequence, ":st0": status}
            | {f":add_{name}": n for name, n in counters.items()}
        )
        update = "SET " + ", ".join(f"#{name} = :{name}" for name in sets)
        if counters:
            update += " ADD " + ", ".join(f"{name} :add_{name}" for name in counters)
        state_update = {
            "Update": {
                "Key": {"run_id": run_id, "sk": "state"},
                "UpdateExpression": update,
                "ConditionExpression": "#v0 = :v0 AND #seq0 = :seq0 AND #st0 = :st0",
                "ExpressionAttributeNames": names,
                "ExpressionAttributeValues": values,
            }
        }
        self.transact([state_update, *_creates(new_items)])

    # ---- callbacks and notifications --------------------------------------------------------
    def send_task_success(self, token: str, output: Mapping[str, Any]) -> bool:
        """False when the token is no longer waiting (timed out, or already answered)."""
        try:
            self.sfn.send_task_success(taskToken=token, output=json.dumps(output, allow_nan=False))
        except ClientError as exc:
            if is_code(exc, "TaskTimedOut", "InvalidToken", "TaskDoesNotExist"):
                return False
            raise
        return True

    def send_task_failure(self, token: str, error: str, cause: str) -> bool:
        try:
            self.sfn.send_task_failure(taskToken=token, error=error, cause=cause[:32000])
        except ClientError as exc:
            if is_code(exc, "TaskTimedOut", "InvalidToken", "TaskDoesNotExist"):
                return False
            raise
        return True

    def publish(self, message: Mapping[str, Any]) -> None:
        self.sns.publish(TopicArn=self.settings.topic_arn, Message=json.dumps(message))


def _creates(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"Put": {"Item": item, "ConditionExpression": "attribute_not_exists(run_id)"}} for item in items]


def _round(run_id: str, round_number: int) -> dict[str, str]:
    return {"run_id": run_id, "sk": f"round#{round_number}"}


def to_dynamo(values: Mapping[str, Any]) -> dict[str, Any]:
    def convert(value: Any) -> Any:
        if isinstance(value, float):
            return Decimal(repr(float(value)))  # numpy 2's repr of np.float64 is "np.float64(...)"
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, list):
            return [convert(v) for v in value]
        return value

    return {k: convert(v) for k, v in values.items()}


_session: boto3.Session | None = None


def _shared_session() -> boto3.Session:
    global _session
    if _session is None:
        _session = boto3.Session()
    return _session


_stores: dict[str, Store] = {}


def store_for(settings: HandlerSettings) -> Store:
    """One Store per settings per process, so a warm Lambda reuses clients and caches."""
    key = settings.model_dump_json() + os.environ.get("FEDSTREAM_ENDPOINT_URL", "")
    if key not in _stores:
        _stores[key] = Store(settings)
    return _stores[key]
