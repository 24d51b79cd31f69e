"""Update records at the server's edge, in both modes: strict parsing, who may send what, and
verified downloads.

A stream image becomes an ``UpdateRecord`` only through ``parse_record`` (strict JSON: nothing is
coerced), and an update's bytes become weights only through ``load_update`` (size, sha256,
format and the global model's architecture). Anything refused raises ``Rejected`` with its reason.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from decimal import Decimal
from typing import Any, Protocol, TypeVar

import pydantic

from fedstream import keys
from fedstream.errors import Refused
from fedstream.schemas import UpdateRecord
from fedstream.server.store import MissingObject, Repository, UnreadableObject
from fedstream.settings import HandlerSettings
from fedstream.weights import ModelSpec, decode

T = TypeVar("T")
R = TypeVar("R")


class Rejected(Refused):
    """A record the server's own checks refuse (malformed, unknown client, duplicate, closed round,
    missing object...): logged with ``reason`` and counted, never retried. The checks of the core
    modules raise their own ``Refused`` subclasses, which the handlers treat the same way."""


def parse_record(image: Mapping[str, Any]) -> UpdateRecord:
    """The record as strict JSON: no string, bool or binary value passes for a number or a string.

    DynamoDB has one number type, so its numbers become JSON numbers (integral ones integers).
    """
    try:
        text = json.dumps(dict(image), default=_json_number)
    except (TypeError, ValueError):
        bad = sorted(k for k, v in image.items() if isinstance(v, bytes | bytearray | memoryview | set))
        raise Rejected(
            "malformed_record", f"update record is invalid ({', '.join(bad) or 'record'})"
        ) from None
    try:
        return UpdateRecord.model_validate_json(text, strict=True)
    except pydantic.ValidationError as exc:
        fields = ", ".join(".".join(str(p) for p in e["loc"]) or "record" for e in exc.errors())
        raise Rejected("malformed_record", f"update record is invalid ({fields})") from None


def _json_number(value: Any) -> int | float:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    raise TypeError(f"{type(value).__name__} is not a record value")


def check_identity(record: UpdateRecord, settings: HandlerSettings) -> None:
    if problem := record.consistent():
        raise Rejected("malformed_record", problem)
    if settings.client_ids and record.client_id not in settings.client_ids:
        raise Rejected(
            "unknown_client", f"client {record.client_id!r} is not registered with this deployment"
        )
    owner = keys.update_key_owner(record.object_key)
    if owner != (record.run_id, record.client_id):
        raise Rejected(
            "foreign_object_key",
            f"object key {record.object_key!r} is not under runs/{record.run_id}/updates/{record.client_id}/",
        )


class ObjectRef(Protocol):
    object_key: str
    sha256: str


def load_update(store: Repository, ref: ObjectRef, spec: ModelSpec) -> tuple[Any, int, str | None]:
    """Download, verify and decode an update against the global model's spec.

    Returns (weights, payload bytes, S3 version id). A ``ValidatedReport`` with a version id is
    read at that version and only its structure is checked again (see ``ValidatedReport``).
    Raises ``Rejected`` for a missing or unreadable object and ``WireFormatError`` for a payload
    that fails its checks: both refuse the update.
    """
    pinned = getattr(ref, "version_id", None)
    try:
        data, version_id = store.get_object(ref.object_key, pinned)
        weights, _ = decode(
            data,
            spec,
            max_bytes=store.settings.max_model_bytes,
            expected_sha256=None if pinned else ref.sha256,
            check_finite=not pinned,
        )
    except MissingObject as exc:
        raise Rejected("missing_object", str(exc)) from None
    except UnreadableObject as exc:
        raise Rejected("unreadable_object", str(exc)) from None
    return weights, len(data), version_id


def digest_sk(client_id: str, sha256: str) -> str:
    """The run item that records which round a client's object (by sha256) was sent for."""
    return f"object#{client_id}#{sha256}"


def prefetch(
    items: Iterable[T], fetch: Callable[[T], R], window: int
) -> Iterator[tuple[T, R | BaseException]]:
    """Yield ``(item, fetch(item))`` in order while up to ``window`` fetches run ahead in threads.

    Memory stays bounded by the window, not by the number of items.
    """
    pending: list[tuple[T, Future[R]]] = []
    with ThreadPoolExecutor(max_workers=window) as pool:
        iterator = iter(items)
        for item in iterator:
            pending.append((item, pool.submit(fetch, item)))
            if len(pending) >= window:
                break
        while pending:
            item, future = pending.pop(0)
            try:
                result: R | BaseException = future.result()
            except Exception as exc:
                result = exc
            next_item = next(iterator, None)
            if next_item is not None:
                pending.append((next_item, pool.submit(fetch, next_item)))
            yield item, result
