"""Async mode: every update record moves the global model (or fills FedBuff's buffer) at once.

The run-state item (``sk='state'``) is the single source of truth: the current version and its
key, the buffer (key, sequence, ids of the updates in it) and the counters. Every change to it is
one DynamoDB transaction that also writes a per-update marker (``sk='update#{client}#{base}'``):

- the state update is conditioned on ``version`` and ``buffer_seq`` being what this invocation
  read, so a concurrent invocation that moved first makes this one recompute on the fresh version
  (bounded retries with jitter) — nothing is overwritten and no update is lost;
- the marker is conditioned on not existing, so a redelivered record is applied at most once.

Each published version also gets a version item (``sk='version#{v}'``) naming its parent and the
updates it applied: the lineage. Global objects are write-once under a per-attempt key.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fedstream import keys
from fedstream.aggregation import AggregationError, AsyncState, ClientUpdate
from fedstream.registry import AggregatorRegistry
from fedstream.schemas import ModelReady, TrainingComplete, UpdateRecord
from fedstream.server.store import ConditionFailed, Store, is_code, to_dynamo
from fedstream.server.sync import Rejected, check_identity, load_update, parse_record
from fedstream.settings import HandlerSettings
from fedstream.weights import decode, encode, sha256_hex

MAX_CONFLICT_RETRIES = 8
STATE_KEY = "state"


def _now() -> str:
    return datetime.now(UTC).isoformat()


def update_ref(record: UpdateRecord) -> str:
    return f"{record.client_id}#{record.base_version}"


def marker_key(run_id: str, record: UpdateRecord) -> dict[str, str]:
    return {"run_id": run_id, "sk": f"update#{update_ref(record)}"}


@dataclass
class AsyncOutcome:
    """What one record did: ``applied`` (a new version), ``buffered``, or a rejection reason."""

    outcome: str
    record: UpdateRecord
    staleness: int = 0
    version: int = 0
    conflict_retries: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    finished: str | None = None
    lag_seconds: float | None = None


def start_run(
    store: Store,
    run_id: str,
    weights_data: bytes,
    *,
    client_settings: Mapping[str, Any] | None = None,
    max_updates: int = 0,
    target_accuracy: float | None = None,
    max_seconds: float = 0.0,
) -> ModelReady:
    """Publish version 0 of an async run and notify every client."""
    weights, _ = decode(weights_data, max_bytes=store.settings.max_model_bytes)
    key = keys.global_key(run_id, 0)
    store.put_once(key, weights_data)
    digest = sha256_hex(weights_data)
    store.runs.put_item(
        Item={
            "run_id": run_id,
            "sk": STATE_KEY,
            "mode": "async",
            "status": "RUNNING",
            "version": 0,
            "global_key": key,
            "global_sha256": digest,
            "buffer_seq": 0,
            "buffer_ids": [],
            "received": 0,
            "applied": 0,
            "rejected": 0,
            "buffered": 0,
            "max_updates": max_updates,
            "max_seconds": str(max_seconds),
            "target_accuracy": "" if target_accuracy is None else str(target_accuracy),
            "client_settings": json.dumps(dict(client_settings or {})),
            "started_at": _now(),
            "version_at": str(time.time()),
        },
        ConditionExpression="attribute_not_exists(run_id)",
    )
    store.runs.put_item(
        Item={"run_id": run_id, "sk": "version#0", "key": key, "sha256": digest, "parent": -1}
    )
    message = ModelReady(
        run_id=run_id, version=0, object_key=key, sha256=digest, client_settings=dict(client_settings or {})
    )
    store.publish(message.model_dump(exclude_none=True))
    del weights
    return message


def handle_async_record(
    store: Store, settings: HandlerSettings, registry: AggregatorRegistry, image: Mapping[str, Any]
) -> AsyncOutcome:
    """Validate one update record and apply it; raises Rejected (recorded once) for a bad one."""
    record = parse_record(image)
    # Rejected before any run counter moves: the record names no run or no caller we know.
    check_identity(record, settings)
    state = store.run_state(record.run_id)
    if state is None or state.get("mode") != "async":
        raise Rejected("unknown_run", f"run {record.run_id!r} is not an async run of this deployment")
    if _marker_exists(store, record):
        raise Rejected("duplicate", f"update {update_ref(record)} was already processed")
    try:
        return _apply(store, settings, registry, record, state)
    except Rejected as rejected:
        _record_rejection(store, record, rejected.reason)
        raise


def _marker_exists(store: Store, record: UpdateRecord) -> bool:
    item = store.runs.get_item(Key=marker_key(record.run_id, record), ConsistentRead=True).get("Item")
    return item is not None


def _record_rejection(store: Store, record: UpdateRecord, reason: str) -> None:
    """Count a rejection once: marker and counter in one transaction."""
    try:
        store.dynamodb.meta.client.transact_write_items(
            TransactItems=[
                {
                    "Put": {
                        "TableName": store.settings.run_table,
                        "Item": to_dynamo(
                            {**marker_key(record.run_id, record), "outcome": f"rejected:{reason}"}
                        ),
                        "ConditionExpression": "attribute_not_exists(run_id)",
                    }
                },
                {
                    "Update": {
                        "TableName": store.settings.run_table,
                        "Key": to_dynamo({"run_id": record.run_id, "sk": STATE_KEY}),
                        "UpdateExpression": "ADD received :one, rejected :one",
                        "ExpressionAttributeValues": {":one": 1},
                    }
                },
            ]
        )
    except Exception as exc:
        if not is_code(exc, "TransactionCanceledException"):
            raise


def _apply(
    store: Store,
    settings: HandlerSettings,
    registry: AggregatorRegistry,
    record: UpdateRecord,
    state: dict[str, Any],
) -> AsyncOutcome:
    if state.get("status") != "RUNNING":
        raise Rejected("run_finished", f"run {record.run_id!r} is {state.get('status')}")
    aggregator = registry.create(
        settings.aggregator, settings.aggregator_params, seed=settings.seed, mode="async"
    )
    retries = 0
    weights = None
    while True:
        version = int(state["version"])
        staleness = version - record.base_version
        if staleness < 0:
            raise Rejected("future_base_version", f"base version {record.base_version} > current {version}")
        if aggregator.max_staleness is not None and staleness > aggregator.max_staleness:
            raise Rejected("stale", f"update is {staleness} versions stale (max {aggregator.max_staleness})")
        current = store.global_model(record.run_id, version, state["global_key"])
        base = _version_model(store, record.run_id, record.base_version)
        if weights is None:  # every version has the same spec: a conflict retry reuses the update
            weights, _, _ = load_update(store, record, current.spec)
        buffer = _load_buffer(store, state)
        update = ClientUpdate(
            record.client_id,
            weights,
            record.num_examples,
            record.metrics.as_dict(),
            record.base_version,
            base.weights,
        )
        try:
            result = aggregator.apply_async(current.weights, update, staleness=staleness, state=buffer)
        except AggregationError as exc:
            raise Rejected(exc.reason, str(exc)) from None
        try:
            outcome = _commit(store, settings, record, state, result, staleness)
        except ConditionFailed:
            if _marker_exists(store, record):
                raise Rejected("duplicate", f"update {update_ref(record)} was applied concurrently") from None
            retries += 1
            if retries > MAX_CONFLICT_RETRIES:
                raise
            time.sleep(random.uniform(0, 0.05 * 2 ** min(retries, 5)))
            state = store.run_state(record.run_id) or state
            if state.get("status") != "RUNNING":
                raise Rejected("run_finished", f"run {record.run_id!r} finished meanwhile") from None
            continue
        outcome.conflict_retries = retries
        return outcome


def _version_model(store: Store, run_id: str, version: int) -> Any:
    if (cached := store.cached_global_model(run_id, version)) is not None:
        return cached  # versions are write-once: a cached one is still the one
    item = store.runs.get_item(Key={"run_id": run_id, "sk": f"version#{version}"}, ConsistentRead=True).get(
        "Item"
    )
    if item is None:
        raise Rejected("unknown_base_version", f"version {version} of run {run_id} was never published")
    return store.global_model(run_id, version, str(item["key"]))


def _load_buffer(store: Store, state: Mapping[str, Any]) -> AsyncState | None:
    key = state.get("buffer_key")
    if not key or not int(state.get("buffered", 0)):
        return None
    data = store.cached_blob(str(key))
    if data is None:
        data = store.get_bytes(str(key))
    arrays, meta = decode(data, max_bytes=store.settings.max_model_bytes)
    return AsyncState(arrays=arrays, values=json.loads(meta.get("values", "{}")))


def _commit(
    store: Store,
    settings: HandlerSettings,
    record: UpdateRecord,
    state: Mapping[str, Any],
    result: Any,
    staleness: int,
) -> AsyncOutcome:
    run_id = record.run_id
    version = int(state["version"])
    seq = int(state.get("buffer_seq", 0))
    ref = update_ref(record)
    nonce = uuid.uuid4().hex[:10]
    metrics = {k: float(v) for k, v in result.metrics.items()}
    marker = {**marker_key(run_id, record), "at_version": version}
    condition = "version = :v AND buffer_seq = :seq"
    values: dict[str, Any] = {":v": version, ":seq": seq, ":one": 1}
    items: list[dict[str, Any]] = []
    if result.weights is None:
        assert result.state is not None
        key = keys.state_key(run_id, f"buffer-{seq + 1:08d}-{nonce}")
        blob = encode(result.state.arrays, {"values": json.dumps(result.state.values)})
        store.put(key, blob)
        # Buffer keys are never rewritten (each has a nonce): the next update here reads it from memory.
        store.remember_blob(key, blob)
        buffered_ids = [*state.get("buffer_ids", []), ref]
        update = (
            "SET buffer_key = :key, buffer_seq = :next, buffer_ids = :ids, buffered = :n ADD received :one"
        )
        values.update({":key": key, ":next": seq + 1, ":ids": buffered_ids, ":n": len(buffered_ids)})
        marker["outcome"] = "buffered"
        outcome = AsyncOutcome("buffered", record, staleness, version, metrics=metrics)
    else:
        new_version = version + 1
        applied_ids = [*state.get("buffer_ids", []), ref]
        key = f"runs/{run_id}/global/{new_version:06d}-{nonce}.safetensors"
        data = encode(
            result.weights,
            {
                "run_id": run_id,
                "version": str(new_version),
                "parent_version": str(version),
                "aggregator": settings.aggregator,
                "creator": "fedstream.async_update",
                "created_at": _now(),
                "applied": json.dumps(applied_ids),
                "metrics": json.dumps(metrics),
            },
        )
        store.put_once(key, data)
        digest = sha256_hex(data)
        update = (
            "SET version = :new, global_key = :key, global_sha256 = :sha, buffer_seq = :next, "
            "buffer_ids = :empty, buffered = :zero, version_at = :at, last_metrics = :metrics "
            "ADD received :one, applied :applied"
        )
        values.update(
            {
                ":new": new_version,
                ":key": key,
                ":sha": digest,
                ":next": seq + 1,
                ":empty": [],
                ":zero": 0,
                ":at": str(time.time()),
                ":metrics": json.dumps({**metrics, **record.metrics.as_dict()}),
                ":applied": len(applied_ids),
            }
        )
        marker["outcome"] = "applied"
        items.append(
            {
                "Put": {
                    "TableName": settings.run_table,
                    "Item": to_dynamo(
                        {
                            "run_id": run_id,
                            "sk": f"version#{new_version}",
                            "key": key,
                            "sha256": digest,
                            "parent": version,
                            "applied": applied_ids,
                        }
                    ),
                    "ConditionExpression": "attribute_not_exists(run_id)",
                }
            }
        )
        outcome = AsyncOutcome("applied", record, staleness, new_version, metrics=metrics)
        outcome.lag_seconds = time.time() - float(state.get("version_at") or time.time())
    items += [
        {
            "Update": {
                "TableName": settings.run_table,
                "Key": to_dynamo({"run_id": run_id, "sk": STATE_KEY}),
                "UpdateExpression": update,
                "ConditionExpression": condition,
                "ExpressionAttributeValues": to_dynamo(values),
            }
        },
        {
            "Put": {
                "TableName": settings.run_table,
                "Item": to_dynamo(marker),
                "ConditionExpression": "attribute_not_exists(run_id)",
            }
        },
    ]
    try:
        store.dynamodb.meta.client.transact_write_items(TransactItems=items)
    except Exception as exc:
        if is_code(exc, "TransactionCanceledException"):
            raise ConditionFailed(condition) from exc
        raise
    if outcome.outcome == "applied":
        # The next update mixes into it; it was just encoded (and so checked) here.
        store.remember_global_model(run_id, outcome.version, key, data, values[":sha"])
        # The conditional flip made this exactly the stored state (the rejected counter aside).
        fresh = {
            **state,
            "version": outcome.version,
            "applied": int(state.get("applied", 0)) + values[":applied"],
        }
        settings_for_clients = json.loads(fresh.get("client_settings") or "{}")
        store.publish(
            ModelReady(
                run_id=run_id,
                version=outcome.version,
                object_key=key,
                sha256=values[":sha"],
                client_settings=settings_for_clients,
            ).model_dump(exclude_none=True)
        )
        outcome.finished = finish_if_done(store, fresh, metrics, record, stop=result.stop)
    return outcome


def finish_if_done(
    store: Store,
    state: Mapping[str, Any],
    metrics: Mapping[str, float],
    record: UpdateRecord,
    *,
    stop: bool = False,
) -> str | None:
    """End the run (once) when a stop condition holds; returns the reason, or None."""
    reason = None
    max_updates = int(state.get("max_updates") or 0)
    target = state.get("target_accuracy") or ""
    max_seconds = float(state.get("max_seconds") or 0)
    accuracy = record.metrics.eval_accuracy
    if stop:
        reason = "privacy_budget"
    elif max_updates and int(state.get("applied", 0)) >= max_updates:
        reason = "max_updates"
    elif target and accuracy is not None and accuracy >= float(target):
        reason = "target_accuracy"
    elif max_seconds and state.get("started_at"):
        elapsed = (datetime.now(UTC) - datetime.fromisoformat(str(state["started_at"]))).total_seconds()
        reason = "wall_clock" if elapsed >= max_seconds else None
    if reason is None:
        return None
    return reason if end_run(store, str(state["run_id"]), reason, int(state["version"])) else None


def end_run(store: Store, run_id: str, reason: str, version: int) -> bool:
    """Mark the run finished and tell every client; False if it had already ended."""
    try:
        store.conditional_update(
            {"run_id": run_id, "sk": STATE_KEY},
            "SET #status = :done, finish_reason = :why, finished_at = :at",
            "#status = :running",
            {":done": "SUCCEEDED", ":why": reason, ":at": _now(), ":running": "RUNNING"},
            {"#status": "status"},
        )
    except ConditionFailed:
        return False
    store.publish(TrainingComplete(run_id=run_id, reason="done", final_version=version).model_dump())
    return True
