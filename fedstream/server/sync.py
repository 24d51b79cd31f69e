"""Synchronous rounds: validate and register client reports, close a round exactly once.

A round item (``run_id``, ``sk='round#N'``) is created by the state machine with status ``open``.
Reports are added with a conditional set-add (idempotent per client). Closing is a conditional
transition ``open -> aggregating`` (or a stale claim taken over after a lease), so two concurrent
invocations cannot both aggregate; the result is stored on the round item before the callback,
so whoever answers a task token (aggregate handler or finalize handler) sends the same result.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from fedstream import faults, keys
from fedstream.aggregation import AggregationError, ClientUpdate, PrivacyBudgetExhausted, RoundContext
from fedstream.bounds import admit_round, check_change, delta_norm, for_run
from fedstream.errors import Refused
from fedstream.host import sync_round
from fedstream.registry import AggregatorRegistry
from fedstream.schemas import UpdateRecord
from fedstream.server.records import (
    Rejected,
    check_identity,
    digest_sk,
    load_update,
    parse_record,
    prefetch,
)
from fedstream.server.store import ConditionFailed, MissingObject, Repository, own_object
from fedstream.settings import HandlerSettings
from fedstream.weights import WireFormatError, decode, encode, sha256_hex

# A claim older than this is taken over: the aggregate function's timeout (15 min), so its holder
# is certainly gone. A holder that raises releases its claim at once (``close_round``).
CLAIM_LEASE_SECONDS = 900


@dataclass
class Registered:
    record: UpdateRecord
    reported_count: int
    required: int


@dataclass
class RoundClosed:
    run_id: str
    round: int
    version: int
    object_key: str
    sha256: str
    metrics: dict[str, float]
    clients: list[str]
    model_bytes: int
    aggregation_seconds: float
    duration_seconds: float | None
    at_deadline: bool
    callback_delivered: bool
    client_settings: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # client -> reason its update was left out
    skipped_why: dict[str, str] = field(default_factory=dict)  # client -> the reason's detail


def _now() -> datetime:
    return datetime.now(UTC)


def _round_key(run_id: str, round_number: int) -> dict[str, str]:
    return {"run_id": run_id, "sk": f"round#{round_number}"}


@dataclass(frozen=True)
class ValidatedReport:
    """What registration checked, kept on the round item; the close aggregates exactly this.

    ``version_id`` pins the S3 object version that passed the checks (None on an unversioned
    bucket): the close reads that version, which nobody can change, so it skips the sha256 and
    NaN/Inf passes registration already made over the same bytes.
    """

    object_key: str
    sha256: str
    num_examples: int
    metrics: dict[str, float]
    version_id: str | None = None
    norm: float = 0.0  # ||update - base||, measured at registration

    @classmethod
    def of(cls, record: UpdateRecord, version_id: str | None, norm: float) -> ValidatedReport:
        return cls(
            record.object_key, record.sha256, record.num_examples, record.metrics.as_dict(), version_id, norm
        )


def report_attribute(client_id: str) -> str:
    return f"report#{client_id}"


def register_report(store: Repository, settings: HandlerSettings, record: UpdateRecord) -> Registered:
    """Validate one sync update record and add its client to the round's reports (idempotent).

    Cheap checks first: one read of the round and of the client's earlier use of this object
    refuses a closed round, a wrong base version, a second report or a replayed object before
    anything is downloaded. Then the download is verified and decoded against the cached global
    model, its delta norm measured (the close bounds it against the round's median) and an
    unchanged model refused. Two conditional writes follow: the object is bound to this round
    (a later round cannot take it again), and the report is added to the round, conditioned on
    the round's status, version and token and the client's first report.

    A refused record raises a ``Refused`` with its reason: ``Rejected`` from these checks,
    ``WireFormatError`` from the download, ``OutOfBounds`` for an unchanged model.
    """
    check_identity(record, settings)
    if record.round is None:
        raise Rejected("malformed_record", "a sync update record must name its round")
    round_sk, object_sk = (
        _round_key(record.run_id, record.round)["sk"],
        digest_sk(record.client_id, record.sha256),
    )
    found = store.run_items(record.run_id, [round_sk, object_sk])
    if (refusal := _refusal(store, record, found.get(round_sk), found.get(object_sk))) is not None:
        raise refusal
    try:
        base = store.global_model(record.run_id, record.base_version)
    except MissingObject:
        raise _why_not_registered(store, record) from None
    weights, _, version_id = load_update(store, record, base.spec)
    norm = delta_norm(weights, base.weights)
    del weights
    check_change(norm, record.client_id)
    try:
        store.bind_object(record.run_id, record.client_id, record.sha256, record.object_key, round_sk)
    except ConditionFailed:
        raise _replay(record, store.run_items(record.run_id, [object_sk]).get(object_sk)) from None

    try:
        item = store.add_report(
            record.run_id,
            record.round,
            record.client_id,
            record.base_version,
            json.dumps(asdict(ValidatedReport.of(record, version_id, norm))),
            record.task_token,
            _now().isoformat(),
        )
    except ConditionFailed:
        raise _why_not_registered(store, record) from None
    required = len(settings.client_ids) or int(item.get("min_clients", settings.min_clients))
    return Registered(record, int(item["reported_count"]), required)


def _replay(record: UpdateRecord, used: Mapping[str, Any] | None) -> Rejected:
    where = str((used or {}).get("used_in", "another round")).replace("#", " ")
    return Rejected(
        "replay", f"client {record.client_id!r} already sent object {record.sha256[:12]}... for {where}"
    )


def _why_not_registered(store: Repository, record: UpdateRecord) -> Rejected:
    """Why a record cannot be registered, read from the round as it is now."""
    assert record.round is not None
    refusal = _refusal(store, record, store.round_item(record.run_id, record.round), None)
    return refusal or Rejected(
        "missing_object", f"version {record.base_version} of run {record.run_id!r} has no global model"
    )


def _refusal(
    store: Repository, record: UpdateRecord, item: Mapping[str, Any] | None, used: Mapping[str, Any] | None
) -> Rejected | None:
    """Why the round ``item`` (as read) refuses ``record``, or None if it would take it.

    ``used`` is the client's earlier use of the record's object (``digest_sk``), if read.
    """
    assert record.round is not None
    if item is None:
        if store.run_state(record.run_id) is None:
            return Rejected("unknown_run", f"run {record.run_id!r} does not exist")
        return Rejected("unknown_round", f"round {record.round} of run {record.run_id!r} was never opened")
    stored = item.get(report_attribute(record.client_id))
    if stored and json.loads(stored)["object_key"] == record.object_key:
        return Rejected(
            "duplicate", f"client {record.client_id!r} already reported for round {record.round}, redelivered"
        )
    if item["status"] != "open":
        return Rejected("round_closed", f"round {record.round} is already {item['status']}")
    if record.client_id in item.get("reported", []):
        return Rejected("duplicate", f"client {record.client_id!r} already reported for round {record.round}")
    if record.base_version != item["version"]:
        return Rejected(
            "wrong_base_version",
            f"round {record.round} trains version {item['version']}, the update is from "
            f"version {record.base_version}",
        )
    server_token = item.get("task_token")
    if record.task_token and server_token and record.task_token != server_token:
        return Rejected("task_token_mismatch", "the record's task token is not the round's token")
    if used is not None and used.get("used_in") != item["sk"]:
        return _replay(record, used)
    return None


def handle_sync_record(
    store: Repository,
    settings: HandlerSettings,
    registry: AggregatorRegistry,
    image: Mapping[str, Any],
    on_registered: Callable[[Registered], None] | None = None,
) -> tuple[Registered, RoundClosed | None]:
    """One stream record: register the report, and close the round if it is now complete.

    ``on_registered`` hears of the registration before the close is tried, so a close that fails
    cannot hide a report that was taken.

    A redelivered record is rejected as a duplicate, but still re-tries the close and the
    callback, so a crash between registering and aggregating never leaves a complete round open,
    and a crash between closing and calling back never leaves the state machine waiting.
    """
    record = parse_record(image)
    try:
        registered = register_report(store, settings, record)
    except Rejected as rejected:
        if rejected.reason in ("duplicate", "round_closed") and record.round is not None:
            closed = _close_if_complete(store, settings, registry, record.run_id, record.round)
            if closed is None:
                deliver_round_result(store, record.run_id, record.round)
        raise
    if on_registered is not None:
        on_registered(registered)
    closed = None
    if registered.reported_count >= registered.required:
        closed = close_round(
            store, settings, registry, record.run_id, record.round or 0, min_reports=registered.required
        )
    return registered, closed


def _close_if_complete(
    store: Repository, settings: HandlerSettings, registry: AggregatorRegistry, run_id: str, round_number: int
) -> RoundClosed | None:
    item = store.round_item(run_id, round_number)
    if item is None:
        return None
    required = len(settings.client_ids) or int(item.get("min_clients", settings.min_clients))
    return close_round(store, settings, registry, run_id, round_number, min_reports=required)


def claim_round(
    store: Repository, run_id: str, round_number: int, min_reports: int
) -> tuple[str, dict[str, Any]] | None:
    """Take the right to aggregate a round: (claim id, the round item as claimed), or None if it
    is not ready or someone else holds it."""
    now = time.time()
    claim_id = uuid.uuid4().hex
    try:
        item = store.claim_round(run_id, round_number, claim_id, min_reports, now, now - CLAIM_LEASE_SECONDS)
    except ConditionFailed:
        return None
    return claim_id, item


def release_claim(store: Repository, run_id: str, round_number: int, claim_id: str) -> bool:
    """Give a claim back (its holder failed before closing), so a retry can aggregate at once."""
    try:
        store.release_claim(run_id, round_number, claim_id)
    except ConditionFailed:
        return False
    return True


def close_round(
    store: Repository,
    settings: HandlerSettings,
    registry: AggregatorRegistry,
    run_id: str,
    round_number: int,
    *,
    min_reports: int,
    callback_token: str | None = None,
    at_deadline: bool = False,
) -> RoundClosed | None:
    """Aggregate a complete round exactly once, publish the new version and call back.

    Returns None when the round is not ready or another invocation is closing it. Every step
    can be repeated: the new object is write-once and adopted by a retry, the pointer flip is
    conditional and recognised when it already happened, and the callback is sent once per token.

    An ``AggregationError`` (no update could be used, the aggregator refused the round, the result
    is not finite) fails the round, answering its task token with the error name
    ``PrivacyBudgetExhausted`` or ``AggregationFailed``, and is raised on with its reason. Any
    other error gives the claim back, so a retry can close the round.
    """
    claimed = claim_round(store, run_id, round_number, min_reports)
    if claimed is None:
        return None
    claim_id, round_item = claimed
    state = store.run_state(run_id)
    assert round_item is not None and state is not None
    base_version = int(round_item["version"])
    token = callback_token or round_item.get("task_token")
    try:
        closed, closed_item = _aggregate_and_publish(
            store, settings, registry, state, round_item, at_deadline
        )
    except PrivacyBudgetExhausted as exc:
        _fail_round(store, run_id, round_number, token, "PrivacyBudgetExhausted", str(exc))
        raise
    except AggregationError as exc:
        _fail_round(store, run_id, round_number, token, "AggregationFailed", str(exc))
        raise
    except BaseException:
        release_claim(store, run_id, round_number, claim_id)
        raise
    assert closed.version == base_version + 1
    faults.point("aggregate.before_callback")
    closed.callback_delivered = deliver_round_result(
        store, run_id, round_number, finalize_token=callback_token, item=closed_item
    )
    return closed


def deliver_round_result(
    store: Repository,
    run_id: str,
    round_number: int,
    *,
    finalize_token: str | None = None,
    item: Mapping[str, Any] | None = None,
) -> bool:
    """Send a closed round's stored result to the waiting task token, at most once per token.

    The round's own token comes from the server-side subscriber (``record_round_token``), never
    from a client; whichever of "round closed" and "token known" happens second sends the result.
    At the deadline the finalize request's token is the one waiting instead. ``item`` is the
    round as the caller's own write returned it (saves a read).
    """
    if item is None:
        item = store.round_item(run_id, round_number)
    if not item or item.get("status") != "closed":
        return False
    token = finalize_token or item.get("task_token")
    if not token:
        return False
    flag = "finalize_callback_at" if finalize_token else "callback_at"
    try:
        store.set_round_flag(run_id, round_number, flag, _now().isoformat())
    except ConditionFailed:
        return False
    try:
        return store.send_task_success(str(token), json.loads(item["result"]))
    except Exception:
        # Not sent (throttled, network): take the flag back so the retry of this record sends it.
        store.clear_round_flag(run_id, round_number, flag)
        raise


def record_round_token(store: Repository, run_id: str, round_number: int, token: str) -> bool:
    """Keep the round's task token, as published by the state machine; deliver if already closed.

    Only the state machine can publish to the topic, and only the topic can send to the finalize
    queue's subscription, so this token is authentic; the first one recorded stays.
    """
    try:
        store.record_round_token(run_id, round_number, token)
    except ConditionFailed:
        return False
    deliver_round_result(store, run_id, round_number)
    return True


def round_output(closed: RoundClosed) -> dict[str, Any]:
    """What the state machine receives on callback (see ``NextRound`` in the definition)."""
    return {
        "version": closed.version,
        "object_key": closed.object_key,
        "sha256": closed.sha256,
        "round": closed.round,
        "metrics": closed.metrics,
        "clients": closed.clients,
        "stop": bool(closed.metrics.get("stop", 0.0)),
        "client_settings": closed.client_settings,
        "at_deadline": closed.at_deadline,
    }


def _fail_round(
    store: Repository, run_id: str, round_number: int, token: str | None, error: str, cause: str
) -> None:
    store.fail_round(run_id, round_number, f"{error}: {cause}")
    if token:
        store.send_task_failure(str(token), error, cause)


def _aggregate_and_publish(
    store: Repository,
    settings: HandlerSettings,
    registry: AggregatorRegistry,
    state: Mapping[str, Any],
    round_item: Mapping[str, Any],
    at_deadline: bool,
) -> tuple[RoundClosed, dict[str, Any]]:
    """Aggregate, write the new version, flip the pointer and mark the round closed; returns the
    round and the round item as the closing write left it."""
    run_id = str(round_item["run_id"])
    round_number = int(round_item["round"])
    base_version = int(round_item["version"])
    new_version = base_version + 1
    started = time.perf_counter()
    base = store.global_model(run_id, base_version)
    seed = None if settings.seed is None else settings.seed * 1_000_003 + round_number
    aggregator = registry.create(settings.aggregator, settings.aggregator_params, seed=seed, mode="sync")
    carry = json.loads(state.get("carry") or "{}")
    previous = store.aggregator_state(state.get("aggregator_state_key"))

    # The reports as validated at registration: a record rewritten since then changes nothing.
    reports: dict[str, ValidatedReport] = {}
    skipped: dict[str, str] = {}
    skipped_why: dict[str, str] = {}
    for client_id in sorted(round_item.get("reported", [])):
        stored = round_item.get(report_attribute(client_id))
        if stored is None:
            skipped[client_id], skipped_why[client_id] = "missing_record", f"no report of {client_id}"
            continue
        reports[client_id] = ValidatedReport(**json.loads(stored))
    # Influence bounds, from what registration measured: refused updates are not even downloaded.
    admitted, refused = admit_round(
        for_run(settings.bounds, state.get("bounds")),
        {c: (r.norm, r.num_examples) for c, r in reports.items()},
        base.weights,
    )
    for client_id, why in refused.items():
        skipped[client_id], skipped_why[client_id] = why.reason, str(why)

    def fetch(client_id: str) -> tuple[Any, int]:
        weights, size, _ = load_update(store, reports[client_id], base.spec)
        return weights, size

    accepted: list[str] = []
    sizes: list[int] = []

    def downloaded() -> Iterator[ClientUpdate]:
        for client_id, fetched in prefetch(sorted(admitted), fetch, settings.download_threads):
            if isinstance(fetched, Refused):  # the update's refusal (``load_update``): skip it
                skipped[client_id], skipped_why[client_id] = fetched.reason, str(fetched)
                continue
            if isinstance(fetched, BaseException):
                raise fetched
            weights, size = fetched
            accepted.append(client_id)
            sizes.append(size)
            yield ClientUpdate(
                client_id, weights, admitted[client_id], reports[client_id].metrics, base_version
            )

    result = sync_round(
        aggregator,
        base.weights,
        RoundContext(round=round_number, carry=carry, state=previous),
        downloaded(),
        nothing=lambda: AggregationError(
            "no_updates", f"round {round_number}: no update could be read ({skipped})"
        ),
    )
    model_bytes = sizes[-1]
    # JSON (the callback, the logs) has no Infinity/NaN: a non-finite figure (epsilon with no noise)
    # is left out, and the round says so.
    metrics = {k: float(v) for k, v in result.metrics.items() if math.isfinite(float(v))}
    if infinite := sorted(k for k, v in result.metrics.items() if not math.isfinite(float(v))):
        metrics["non_finite_metrics"] = float(len(infinite))
    if result.stop:
        metrics["stop"] = 1.0

    # The state goes first, under a fresh key the model names: a retry whose model write finds the
    # version already written takes that version's state, so model and state always belong together.
    state_key = ""
    if result.state is not None:
        state_key = keys.state_key(run_id, f"aggregator-{new_version:06d}-{uuid.uuid4().hex[:10]}")
        store.put_aggregator_state(state_key, result.state, {"run_id": run_id, "version": str(new_version)})
    key = keys.global_key(run_id, new_version)
    metadata = {
        "run_id": run_id,
        "version": str(new_version),
        "parent_version": str(base_version),
        "round": str(round_number),
        "aggregator": settings.aggregator,
        "creator": "fedstream.aggregate",
        "created_at": _now().isoformat(),
        "clients": json.dumps(accepted),
        "metrics": json.dumps(metrics),
        "aggregator_state": state_key,
    }
    try:
        data = encode(result.weights, metadata)
    except WireFormatError as exc:
        # The inputs were finite (registration checked each one); a sum that overflowed, or a
        # plugin that produced NaN, fails the round instead of publishing it.
        raise AggregationError(
            exc.reason, f"round {round_number}: the aggregated model is invalid: {exc}"
        ) from None
    faults.point("aggregate.before_object_write")
    if not store.put_once(key, data):
        # A previous attempt wrote this version and died before the flip: its object stands.
        with own_object(key):
            existing = store.get_bytes(key)
            _, meta = decode(existing, max_bytes=settings.max_model_bytes)
        data, metrics, accepted = existing, json.loads(meta["metrics"]), json.loads(meta["clients"])
        state_key = meta.get("aggregator_state", "")
    faults.point("aggregate.after_object_write")
    digest = sha256_hex(data)
    aggregation_seconds = time.perf_counter() - started

    next_settings = aggregator.client_settings(result.carry)
    try:
        store.publish_version(
            run_id,
            base_version,
            {
                "version": new_version,
                "global_key": key,
                "global_sha256": digest,
                "round": round_number,
                "carry": json.dumps(result.carry),
                "aggregator_state_key": state_key,
                "client_settings_next": json.dumps(next_settings),
                "last_metrics": json.dumps(metrics),
            },
        )
    except ConditionFailed:
        current = store.run_state(run_id) or {}
        if current.get("version") != new_version or current.get("global_key") != key:
            raise
    store.remember_global_model(run_id, new_version, key, data, digest)  # the next round starts from it
    faults.point("aggregate.after_flip")
    opened = round_item.get("opened_at")
    duration = None
    if opened:
        duration = (_now() - datetime.fromisoformat(str(opened).replace("Z", "+00:00"))).total_seconds()
    closed = RoundClosed(
        run_id=run_id,
        round=round_number,
        version=new_version,
        object_key=key,
        sha256=digest,
        metrics=metrics,
        clients=accepted,
        model_bytes=model_bytes or len(data),
        aggregation_seconds=aggregation_seconds,
        duration_seconds=duration,
        at_deadline=at_deadline,
        callback_delivered=False,
        client_settings=next_settings,
        skipped=skipped,
        skipped_why=skipped_why,
    )
    item = store.close_round(run_id, round_number, json.dumps(round_output(closed)), _now().isoformat())
    return closed, item
