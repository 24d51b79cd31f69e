"""``MemoryStore``: the ``Repository`` in memory, for tests and local reasoning.

The run table, the bucket, the Step Functions task tokens and the model topic are Python objects
in a ``MemoryBackend``; a ``MemoryStore`` is one process's view of it (with its own caches, as a
Lambda's ``Store`` has), so two stores on one backend are two invocations racing, and
``another_process()`` is a cold start after a crash. Nothing here touches the network, and boto3 is
not imported beyond what ``store.py`` (whose exceptions and caches this shares) imports.

What it mirrors of ``Store`` (read next to ``store.py``: each verb spells out its expression):

- every verb's condition expression, evaluated as DynamoDB evaluates it: a missing attribute
  compares false (and ``contains`` on it too), values of different types are never equal nor
  ordered, an update that passes its condition on a missing item creates it; a failed condition
  raises ``ConditionFailed`` with the same expression text and writes nothing;
- the update expressions: ``SET``, ``REMOVE``, ``ADD`` of a number (from 0) or to a set, each
  verb's return value (``ALL_NEW``); a key attribute or two overlapping paths in one update are a
  ``ValidationException``, as is ``ADD`` onto a value of another type;
- ``create_items`` and ``commit_async_step`` as one transaction: at most 100 items, none twice,
  every condition checked before anything is written, all or nothing;
- items as ``plain()`` returns them: numbers are ints or floats (a float goes through
  ``Decimal(repr(x))``, so an integral float reads back as an int), sets read back as sorted lists
  (kept as sets inside, so ``ADD`` and ``contains`` behave), NaN/Infinity and unsupported types are
  a ``TypeError`` and an empty set a ``ValidationException``, as boto3 and DynamoDB refuse them;
  an item over 400 KB is refused;
- S3 on a versioned bucket (``versioned=False``: unversioned): ``put_once`` is write-once
  (``IfNoneMatch='*'``), ``put`` adds a version, a read names its version id, can read an older
  version, refuses an object over its limit (``WireFormatError('too_large')``), and raises
  ``MissingObject`` / ``UnreadableObject`` (``archive``) with the same messages;
- Step Functions: a task token is waiting until it is answered once; answering it again (or a token
  that ``expire_token`` timed out) returns False, as ``Store`` does for Step Functions'
  ``TaskTimedOut``. Every call is kept in ``callbacks`` (accepted or not), the output as Step
  Functions would parse it (NaN refused);
- SNS: every message in ``published``, as the subscribers parse it; a missing topic or a message
  over 256 KB is an ``InvalidParameter`` error.

Errors that the real services raise as a botocore ``ClientError`` are raised as one here (with the
same error code), so the server code sees the same exception type.

What it does not mirror: eventual consistency (every read here is consistent, as ``Store``'s are),
throttling and other transient AWS errors (use ``crash`` to make an operation fail, and ``before``
to interleave another process's move), DynamoDB's reserved words, transaction conflicts between
concurrent transactions (a lock serialises every operation, so a race is always a clean
``ConditionFailed``), a task token nobody issued (Step Functions answers ``InvalidToken``, False;
here it is waiting like any other), and the state machine itself (tests play its writes:
``create_items`` for ``InitRun``/``OpenRound``, ``update_item`` for ``MarkDeadline``).
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TypeVar, cast

from fedstream.server.store import (
    ConditionFailed,
    MissingObject,
    StoreCaches,
    UnreadableObject,
    plain,
)
from fedstream.settings import HandlerSettings
from fedstream.weights import WireFormatError

KEY_ATTRIBUTES = ("run_id", "sk")
MAX_TRANSACTION_ITEMS = 100
MAX_ITEM_BYTES = 400 * 1024
MAX_MESSAGE_BYTES = 256 * 1024
MAX_CAUSE_CHARS = 32000
MAX_ERROR_CHARS = 256

F = TypeVar("F", bound=Callable[..., Any])
Item = dict[str, Any]
Key = tuple[str, str]


class Crash(RuntimeError):
    """Raised by an operation armed with ``MemoryStore.crash``: the process died there."""


def _client_error(code: str, message: str, operation: str) -> Exception:
    """The botocore ``ClientError`` AWS would answer with (imported only when one is raised)."""
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": message}}, operation)


# ---- values as DynamoDB keeps them ----------------------------------------------------------------


def _kind(value: Any) -> str:
    """The DynamoDB type of a stored value."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "BOOL"
    if isinstance(value, int | float):
        return "N"
    if isinstance(value, str):
        return "S"
    if isinstance(value, bytes):
        return "B"
    if isinstance(value, list):
        return "L"
    if isinstance(value, dict):
        return "M"
    if isinstance(value, set):
        members = {_kind(v) for v in value}
        return (members.pop() if members else "?") + "S"
    raise TypeError(f"not a stored value: {type(value).__name__}")


def _number(value: Decimal) -> int | float:
    if not value.is_finite():
        raise TypeError("Infinity and NaN not supported")
    return cast("int | float", plain(value))


def _decimal(value: int | float) -> Decimal:
    return Decimal(value) if isinstance(value, int) else Decimal(repr(float(value)))


def stored(value: Any) -> Any:
    """``value`` as it reads back from DynamoDB through ``Store`` (``to_dynamo``, boto3, ``plain``),
    except that a set stays a set; raises what boto3 or DynamoDB would for a value they refuse."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return _number(Decimal(repr(float(value))))  # to_dynamo
    if isinstance(value, Decimal):
        return _number(value)
    if isinstance(value, Mapping):
        return {str(k): stored(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [stored(v) for v in value]
    if isinstance(value, set | frozenset):
        if not value:
            raise _client_error(
                "ValidationException",
                "One or more parameter values were invalid: a set may not be empty",
                "Write",
            )
        members = {stored(v) for v in value}
        if {_kind(v) for v in members} not in ({"S"}, {"N"}, {"B"}):
            raise TypeError(f"a set holds strings, numbers or binary values only: {value!r}")
        return members
    raise TypeError(f'Unsupported type "{type(value)}" for value "{value!r}"')


def _same(a: Any, b: Any) -> bool:
    """DynamoDB's ``=``: the same type and the same value (deeply, for lists and maps)."""
    if _kind(a) != _kind(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


def _value_size(value: Any) -> int:
    """DynamoDB's item size accounting, closely enough to find an item over 400 KB."""
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, bool) or value is None:
        return 1
    if isinstance(value, int | float):
        digits = len(_decimal(value).normalize().as_tuple().digits)
        return (digits + 1) // 2 + 1
    if isinstance(value, list):
        return 3 + sum(1 + _value_size(v) for v in value)
    if isinstance(value, dict):
        return 3 + sum(1 + len(k.encode()) + _value_size(v) for k, v in value.items())
    if isinstance(value, set):
        return sum(_value_size(v) for v in value)
    raise TypeError(f"not a stored value: {type(value).__name__}")


def item_size(item: Mapping[str, Any]) -> int:
    return sum(len(name.encode()) + _value_size(value) for name, value in item.items())


# ---- conditions, as DynamoDB evaluates them on an item ({} when it does not exist) -------------------


def _exists(item: Item, name: str) -> bool:
    return name in item


def _eq(item: Item, name: str, value: Any) -> bool:
    return name in item and _same(item[name], value)


def _compare(item: Item, name: str, value: Any, op: Callable[[Any, Any], bool]) -> bool:
    if name not in item:
        return False
    current = item[name]
    kind = _kind(current)
    return kind in ("N", "S", "B") and kind == _kind(value) and op(current, value)


def _lt(item: Item, name: str, value: Any) -> bool:
    return _compare(item, name, value, lambda a, b: a < b)


def _ge(item: Item, name: str, value: Any) -> bool:
    return _compare(item, name, value, lambda a, b: a >= b)


def _contains(item: Item, name: str, value: Any) -> bool:
    if name not in item:
        return False
    current = item[name]
    if isinstance(current, set):
        return _kind(current) == _kind(value) + "S" and value in current
    if isinstance(current, str):
        return isinstance(value, str) and value in current
    if isinstance(current, list):
        return any(_same(member, value) for member in current)
    return False


@dataclass(frozen=True)
class _Update:
    """One update expression: ``SET`` names to values, ``REMOVE`` names, ``ADD`` names to values."""

    sets: Mapping[str, Any] = field(default_factory=dict)
    removes: tuple[str, ...] = ()
    adds: Mapping[str, Any] = field(default_factory=dict)

    def check(self, operation: str) -> None:
        paths = [*self.sets, *self.removes, *self.adds]
        if not paths:
            raise _client_error("ValidationException", "Invalid UpdateExpression: syntax error", operation)
        if len(set(paths)) != len(paths):
            raise _client_error(
                "ValidationException", "Invalid UpdateExpression: Two document paths overlap", operation
            )
        if key := next((p for p in paths if p in KEY_ATTRIBUTES), None):
            raise _client_error(
                "ValidationException",
                f"Cannot update attribute {key}. This attribute is part of the key",
                operation,
            )

    def apply(self, key: Key, current: Item | None, operation: str) -> Item:
        new = copy.deepcopy(current) if current is not None else {"run_id": key[0], "sk": key[1]}
        for name, value in self.sets.items():
            new[name] = copy.deepcopy(value)
        for name in self.removes:
            new.pop(name, None)
        for name, value in self.adds.items():
            old = new.get(name)
            if isinstance(value, set) and (
                old is None or (isinstance(old, set) and _kind(old) == _kind(value))
            ):
                new[name] = set(value) | (old or set())
            elif _kind(value) == "N" and (old is None or _kind(old) == "N"):
                new[name] = _number(_decimal(value) + _decimal(old or 0))
            else:
                raise _client_error(
                    "ValidationException",
                    "An operand in the update expression has an incorrect data type",
                    operation,
                )
        return new


@dataclass(frozen=True)
class _Write:
    """One write of a transaction (or a single UpdateItem): its condition and what it does."""

    key: Key
    condition: Callable[[Item], bool]
    expression: str
    update: _Update | None = None  # None: a Put of ``item``
    item: Item | None = None

    def result(self, current: Item | None, operation: str) -> Item:
        if self.update is None:
            assert self.item is not None
            return copy.deepcopy(self.item)
        return self.update.apply(self.key, current, operation)


# ---- the services ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskCallback:
    """One SendTaskSuccess / SendTaskFailure; ``accepted`` is what ``send_task_*`` returned."""

    kind: str  # "success" or "failure"
    token: str
    output: Any = None  # success: the output as Step Functions parses it
    error: str = ""
    cause: str = ""
    accepted: bool = True


@dataclass
class _ObjectVersion:
    version_id: str | None
    data: bytes
    unreadable: str | None = None  # the S3 error code a read gets (an archived object)


class MemoryBackend:
    """What every process shares: the run table, the bucket, the task tokens and the topic.

    One re-entrant lock serialises every operation, so concurrent stores see each other's writes
    as DynamoDB's and S3's strongly consistent reads do.
    """

    def __init__(self, *, versioned: bool = True) -> None:
        self.lock = threading.RLock()
        self.versioned = versioned
        self.items: dict[Key, Item] = {}
        self.objects: dict[str, list[_ObjectVersion]] = {}
        self.callbacks: list[TaskCallback] = []
        self.published: list[dict[str, Any]] = []
        self.finished_tokens: set[str] = set()
        self._version_ids = itertools.count(1)

    def new_version_id(self) -> str | None:
        return f"v{next(self._version_ids):08d}" if self.versioned else None


@dataclass
class _Armed:
    countdown: int
    after: bool = False
    error: BaseException | None = None  # raise this (a crash)...
    action: Callable[[], object] | None = None  # ...or run this first (another process's move)


def _operation(method: F) -> F:
    """Count the calls of a storage operation, and fire what ``crash`` or ``before`` armed on it."""
    name = method.__name__

    @functools.wraps(method)
    def wrapper(self: MemoryStore, *args: Any, **kwargs: Any) -> Any:
        armed = self._arrive(name)
        if armed is not None and armed.action is not None:
            armed.action()
        if armed is not None and armed.error is not None and not armed.after:
            raise armed.error
        result = method(self, *args, **kwargs)
        if armed is not None and armed.error is not None:
            raise armed.error
        return result

    return cast(F, wrapper)


class MemoryStore(StoreCaches):
    """The ``Repository`` on a ``MemoryBackend``: one process's store (see the module docstring).

    Beyond the protocol, for tests: ``put_object`` and ``archive`` (what a client, or S3's storage
    classes, do to the bucket), ``update_item`` (the state machine's ``MarkDeadline``),
    ``run_items_with_prefix``, ``crash`` (make an operation fail on its Nth call), ``before`` (run
    another process's move just before it), ``calls`` (how often each operation ran), ``callbacks``
    and ``published`` (what left the server).
    """

    def __init__(self, settings: HandlerSettings, backend: MemoryBackend | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.backend = backend if backend is not None else MemoryBackend()
        self.calls: Counter[str] = Counter()
        self._armed: dict[str, list[_Armed]] = {}
        self._calls_lock = threading.Lock()

    def another_process(self) -> MemoryStore:
        """A store on the same backend with nothing cached: another invocation, or a cold start."""
        return MemoryStore(self.settings, self.backend)

    # ---- fault injection and interleaving ------------------------------------------------------------
    def crash(
        self, operation: str, *, nth: int = 1, after: bool = False, error: BaseException | None = None
    ) -> None:
        """Make the ``nth`` next call of ``operation`` raise ``error`` (default ``Crash``): before it
        does anything, or with ``after=True`` once it is done (the write happened; its caller never
        hears of it). A call that raises on its own still counts."""
        error = error or Crash(f"crashed {'after' if after else 'at'} {operation} (call {nth})")
        self._arm(operation, _Armed(nth, after=after, error=error))

    def before(self, operation: str, action: Callable[[], object], *, nth: int = 1) -> None:
        """Run ``action`` just before the ``nth`` next call of ``operation``: another process's move
        between this one's read and its conditional write (a race, made deterministic)."""
        self._arm(operation, _Armed(nth, action=action))

    def _arm(self, operation: str, armed: _Armed) -> None:
        if not hasattr(getattr(type(self), operation, None), "__wrapped__"):
            raise ValueError(f"{operation!r} is not a storage operation of MemoryStore")
        if armed.countdown < 1:
            raise ValueError(f"nth must be >= 1, got {armed.countdown}")
        with self._calls_lock:
            self._armed.setdefault(operation, []).append(armed)

    def _arrive(self, operation: str) -> _Armed | None:
        with self._calls_lock:
            self.calls[operation] += 1
            pending = self._armed.get(operation, [])
            for armed in pending:
                armed.countdown -= 1
            due = [a for a in pending if a.countdown == 0]
            self._armed[operation] = [a for a in pending if a.countdown > 0]
            return due[0] if due else None

    # ---- what left the server -----------------------------------------------------------------------
    @property
    def callbacks(self) -> list[TaskCallback]:
        with self.backend.lock:
            return list(self.backend.callbacks)

    @property
    def published(self) -> list[dict[str, Any]]:
        with self.backend.lock:
            return copy.deepcopy(self.backend.published)

    def expire_token(self, token: str) -> None:
        """The task waiting on ``token`` timed out: answering it now returns False."""
        with self.backend.lock:
            self.backend.finished_tokens.add(token)

    # ---- S3 -------------------------------------------------------------------------------------------
    def _where(self, key: str) -> str:
        return f"s3://{self.settings.bucket}/{key}"

    @_operation
    def get_object(
        self, key: str, version_id: str | None = None, *, limit: int | None = None
    ) -> tuple[bytes, str | None]:
        """As ``Store.get_object``: bytes and version id; ``MissingObject``, ``UnreadableObject``, or
        ``WireFormatError('too_large')`` over ``limit`` (default ``max_model_bytes``)."""
        limit = limit or self.settings.max_model_bytes
        with self.backend.lock:
            versions = self.backend.objects.get(key, [])
            if version_id:
                found = [v for v in versions if (v.version_id or "null") == version_id]
            else:
                found = versions[-1:]
            if not found:
                what = f"version {version_id} of " if version_id else ""
                raise MissingObject(f"{what}{self._where(key)} does not exist")
            version = found[0]
        if version.unreadable:
            raise UnreadableObject(f"{self._where(key)} cannot be read ({version.unreadable})")
        if len(version.data) > limit:
            raise WireFormatError("too_large", f"object {key} has {len(version.data)} bytes > {limit}")
        return version.data, version.version_id

    def _put(self, key: str, data: bytes, *, once: bool) -> str | bool | None:
        data = bytes(data)
        with self.backend.lock:
            versions = self.backend.objects.setdefault(key, [])
            if once and versions:
                return False
            version = _ObjectVersion(self.backend.new_version_id(), data)
            if self.backend.versioned:
                versions.append(version)
            else:
                versions[:] = [version]
            return version.version_id

    @_operation
    def put_once(self, key: str, data: bytes) -> bool:
        """Write-once put; False when the key already exists (nothing is overwritten)."""
        return self._put(key, data, once=True) is not False

    @_operation
    def put(self, key: str, data: bytes) -> None:
        self._put(key, data, once=False)

    def put_object(self, key: str, data: bytes) -> str | None:
        """Upload as a client does (a plain PutObject, a new version); returns its version id."""
        version = self._put(key, data, once=False)
        assert version is not False
        return version

    def archive(self, key: str, code: str = "InvalidObjectState") -> None:
        """The object's current version can no longer be read (a storage class, a foreign KMS key)."""
        with self.backend.lock:
            self.backend.objects[key][-1].unreadable = code

    def object_keys(self, prefix: str = "") -> list[str]:
        with self.backend.lock:
            return sorted(
                k for k, versions in self.backend.objects.items() if versions and k.startswith(prefix)
            )

    # ---- the run table: reads -------------------------------------------------------------------------
    def _read(self, key: Key) -> Item | None:
        with self.backend.lock:
            item = self.backend.items.get(key)
            return None if item is None else cast(Item, plain(copy.deepcopy(item)))

    @_operation
    def run_state(self, run_id: str) -> dict[str, Any] | None:
        return self._read((run_id, "state"))

    @_operation
    def round_item(self, run_id: str, round_number: int) -> dict[str, Any] | None:
        return self._read(_round(run_id, round_number))

    @_operation
    def run_items(self, run_id: str, sort_keys: list[str]) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        with self.backend.lock:
            for sk in dict.fromkeys(sort_keys):
                if (item := self._read((run_id, sk))) is not None:
                    found[sk] = item
        return found

    @_operation
    def run_items_with_prefix(self, run_id: str, prefix: str) -> list[dict[str, Any]]:
        """As ``Store.run_items_with_prefix``: in sort-key order (DynamoDB's: by UTF-8 bytes)."""
        with self.backend.lock:
            keys = sorted(
                (k for k in self.backend.items if k[0] == run_id and k[1].startswith(prefix)),
                key=lambda k: k[1].encode(),
            )
            return [item for k in keys if (item := self._read(k)) is not None]

    # ---- the run table: writes ------------------------------------------------------------------------
    def _update(
        self, key: Key, update: _Update, condition: Callable[[Item], bool], expression: str
    ) -> dict[str, Any]:
        """One UpdateItem with a condition and ``ReturnValues='ALL_NEW'`` (``Store.conditional_update``)."""
        update.check("UpdateItem")
        with self.backend.lock:
            current = self.backend.items.get(key)
            if not condition(current or {}):
                raise ConditionFailed(expression)
            new = update.apply(key, current, "UpdateItem")
            _check_size(new, "UpdateItem")
            self.backend.items[key] = new
            return cast(Item, plain(copy.deepcopy(new)))

    def _transact(self, writes: list[_Write]) -> None:
        """One TransactWriteItems (``Store.transact``): all conditions hold and everything is written,
        or ``ConditionFailed`` and nothing is."""
        operation = "TransactWriteItems"
        if len(writes) > MAX_TRANSACTION_ITEMS:
            raise _client_error(
                "ValidationException",
                f"Member must have length less than or equal to {MAX_TRANSACTION_ITEMS}",
                operation,
            )
        if len({w.key for w in writes}) != len(writes):
            raise _client_error(
                "ValidationException",
                "Transaction request cannot include multiple operations on one item",
                operation,
            )
        for write in writes:
            if write.update is not None:
                write.update.check(operation)
        with self.backend.lock:
            currents = [self.backend.items.get(w.key) for w in writes]
            if not all(w.condition(c or {}) for w, c in zip(writes, currents, strict=True)):
                raise ConditionFailed("transaction cancelled (ConditionalCheckFailed)")
            news = [w.result(c, operation) for w, c in zip(writes, currents, strict=True)]
            for new in news:
                _check_size(new, operation)
            for write, new in zip(writes, news, strict=True):
                self.backend.items[write.key] = new

    def update_item(
        self, run_id: str, sk: str, *, sets: Mapping[str, Any] | None = None, removes: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        """``SET``/``REMOVE`` on an existing item, as the state machine's ``MarkDeadline`` does."""
        update = _Update({k: stored(v) for k, v in (sets or {}).items()}, tuple(removes))
        return self._update(
            (run_id, sk), update, lambda it: _exists(it, "run_id"), "attribute_exists(run_id)"
        )

    # ---- sync rounds (store.py's expressions, condition by condition) ---------------------------------
    @_operation
    def bind_object(self, run_id: str, client_id: str, sha256: str, object_key: str, used_in: str) -> None:
        # SET used_in = :at, object_key = :key  IF attribute_not_exists(run_id) OR used_in = :at
        at, key = stored(used_in), stored(object_key)
        self._update(
            (run_id, f"object#{client_id}#{sha256}"),
            _Update({"used_in": at, "object_key": key}),
            lambda it: not _exists(it, "run_id") or _eq(it, "used_in", at),
            "attribute_not_exists(run_id) OR used_in = :at",
        )

    @_operation
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
        # ADD reported :cid, reported_count :one SET last_report_at = :at, #report = :report
        # IF #status = :open AND NOT contains(reported, :c) AND version = :base
        #    [AND (attribute_not_exists(task_token) OR task_token = :tok)]
        v = {
            ":cid": stored({client_id}),
            ":c": stored(client_id),
            ":base": stored(base_version),
            ":report": stored(report),
            ":at": stored(now),
        }
        expression = "#status = :open AND NOT contains(reported, :c) AND version = :base"

        def condition(it: Item) -> bool:
            return (
                _eq(it, "status", "open")
                and not _contains(it, "reported", v[":c"])
                and _eq(it, "version", v[":base"])
            )

        check = condition
        if task_token:
            expression += " AND (attribute_not_exists(task_token) OR task_token = :tok)"
            token = stored(task_token)

            def check(it: Item) -> bool:
                return condition(it) and (not _exists(it, "task_token") or _eq(it, "task_token", token))

        return self._update(
            _round(run_id, round_number),
            _Update(
                sets={"last_report_at": v[":at"], f"report#{client_id}": v[":report"]},
                adds={"reported": v[":cid"], "reported_count": 1},
            ),
            check,
            expression,
        )

    @_operation
    def claim_round(
        self, run_id: str, round_number: int, claim_id: str, min_reports: int, now: float, stale_before: float
    ) -> dict[str, Any]:
        # SET #status = :agg, claim_id = :claim, claimed_at = :now
        # IF (#status = :open AND reported_count >= :min) OR (#status = :agg AND claimed_at < :stale)
        claim, at, least, stale = stored(claim_id), stored(now), stored(min_reports), stored(stale_before)
        return self._update(
            _round(run_id, round_number),
            _Update({"status": "aggregating", "claim_id": claim, "claimed_at": at}),
            lambda it: (
                (_eq(it, "status", "open") and _ge(it, "reported_count", least))
                or (_eq(it, "status", "aggregating") and _lt(it, "claimed_at", stale))
            ),
            "(#status = :open AND reported_count >= :min) OR (#status = :agg AND claimed_at < :stale)",
        )

    @_operation
    def release_claim(self, run_id: str, round_number: int, claim_id: str) -> None:
        # SET #status = :open REMOVE claim_id, claimed_at  IF #status = :agg AND claim_id = :claim
        claim = stored(claim_id)
        self._update(
            _round(run_id, round_number),
            _Update({"status": "open"}, ("claim_id", "claimed_at")),
            lambda it: _eq(it, "status", "aggregating") and _eq(it, "claim_id", claim),
            "#status = :agg AND claim_id = :claim",
        )

    @_operation
    def set_round_flag(self, run_id: str, round_number: int, flag: str, now: str) -> None:
        # SET {flag} = :at  IF attribute_not_exists({flag})  (on a missing round, this creates it)
        self._update(
            _round(run_id, round_number),
            _Update({flag: stored(now)}),
            lambda it: not _exists(it, flag),
            f"attribute_not_exists({flag})",
        )

    @_operation
    def clear_round_flag(self, run_id: str, round_number: int, flag: str) -> None:
        # REMOVE {flag}  IF attribute_exists(run_id)
        self._update(
            _round(run_id, round_number),
            _Update(removes=(flag,)),
            lambda it: _exists(it, "run_id"),
            "attribute_exists(run_id)",
        )

    @_operation
    def record_round_token(self, run_id: str, round_number: int, token: str) -> None:
        # SET task_token = :tok  IF attribute_exists(run_id) AND attribute_not_exists(task_token)
        self._update(
            _round(run_id, round_number),
            _Update({"task_token": stored(token)}),
            lambda it: _exists(it, "run_id") and not _exists(it, "task_token"),
            "attribute_exists(run_id) AND attribute_not_exists(task_token)",
        )

    @_operation
    def fail_round(
        self, run_id: str, round_number: int, why: str, *, below_quorum: int | None = None
    ) -> None:
        # SET #status = :failed, failure = :why
        # IF attribute_exists(run_id), or with below_quorum: #status = :open AND reported_count < :min
        expression = "attribute_exists(run_id)"

        def condition(it: Item) -> bool:
            return _exists(it, "run_id")

        if below_quorum is not None:
            expression, least = "#status = :open AND reported_count < :min", stored(below_quorum)

            def condition(it: Item) -> bool:
                return _eq(it, "status", "open") and _lt(it, "reported_count", least)

        self._update(
            _round(run_id, round_number),
            _Update({"status": "failed", "failure": stored(why)}),
            condition,
            expression,
        )

    @_operation
    def close_round(self, run_id: str, round_number: int, result: str, now: str) -> dict[str, Any]:
        # SET #status = :closed, #result = :result, closed_at = :at  IF #status = :agg
        return self._update(
            _round(run_id, round_number),
            _Update({"status": "closed", "result": stored(result), "closed_at": stored(now)}),
            lambda it: _eq(it, "status", "aggregating"),
            "#status = :agg",
        )

    @_operation
    def pin_finalize_token(
        self, run_id: str, round_number: int, finalize_id: str, token: str
    ) -> dict[str, Any]:
        # SET finalize_token = :tok
        # IF finalize_id = :id AND (attribute_not_exists(finalize_token) OR finalize_token = :tok)
        ident, tok = stored(finalize_id), stored(token)
        return self._update(
            _round(run_id, round_number),
            _Update({"finalize_token": tok}),
            lambda it: (
                _eq(it, "finalize_id", ident)
                and (not _exists(it, "finalize_token") or _eq(it, "finalize_token", tok))
            ),
            "finalize_id = :id AND (attribute_not_exists(finalize_token) OR finalize_token = :tok)",
        )

    @_operation
    def publish_version(self, run_id: str, expected: int, fields: Mapping[str, Any]) -> None:
        # SET #name = :name, ...  IF version = :expected
        sets, version = {name: stored(value) for name, value in fields.items()}, stored(expected)
        self._update(
            (run_id, "state"), _Update(sets), lambda it: _eq(it, "version", version), "version = :expected"
        )

    @_operation
    def finish_run(self, run_id: str, reason: str, now: str, status: str = "SUCCEEDED") -> None:
        # SET #status = :done, finish_reason = :why, finished_at = :at  IF #status = :running
        self._update(
            (run_id, "state"),
            _Update({"status": stored(status), "finish_reason": stored(reason), "finished_at": stored(now)}),
            lambda it: _eq(it, "status", "RUNNING"),
            "#status = :running",
        )

    @_operation
    def create_items(self, items: list[dict[str, Any]]) -> None:
        """Create run-table items in one transaction, all or none; ConditionFailed if one exists."""
        self._transact(_creates(items))

    # ---- async steps ----------------------------------------------------------------------------------
    @_operation
    def commit_async_step(
        self,
        run_id: str,
        sets: Mapping[str, Any],
        *,
        expected: tuple[int, int, Any],
        counters: Mapping[str, int],
        new_items: list[dict[str, Any]],
    ) -> None:
        # the state: SET #name = :name, ... ADD counter :add_counter, ...
        #            IF #v0 = :v0 AND #seq0 = :seq0 AND #st0 = :st0
        # each new item: Put IF attribute_not_exists(run_id)
        version, sequence, status = (stored(v) for v in expected)
        state = _Write(
            (run_id, "state"),
            lambda it: (
                _eq(it, "version", version) and _eq(it, "buffer_seq", sequence) and _eq(it, "status", status)
            ),
            "#v0 = :v0 AND #seq0 = :seq0 AND #st0 = :st0",
            _Update(
                {name: stored(value) for name, value in sets.items()},
                adds={name: stored(n) for name, n in counters.items()},
            ),
        )
        self._transact([state, *_creates(new_items)])

    # ---- callbacks and notifications ------------------------------------------------------------------
    def _answer(self, callback: TaskCallback) -> bool:
        with self.backend.lock:
            accepted = callback.token not in self.backend.finished_tokens
            self.backend.finished_tokens.add(callback.token)
            self.backend.callbacks.append(
                TaskCallback(
                    callback.kind, callback.token, callback.output, callback.error, callback.cause, accepted
                )
            )
        return accepted

    @_operation
    def send_task_success(self, token: str, output: Mapping[str, Any]) -> bool:
        """False when the token is no longer waiting (timed out, or already answered)."""
        text = json.dumps(output, allow_nan=False)
        return self._answer(TaskCallback("success", token, output=json.loads(text)))

    @_operation
    def send_task_failure(self, token: str, error: str, cause: str) -> bool:
        if len(error) > MAX_ERROR_CHARS:
            raise _client_error(
                "ValidationException", "error: Member must have length <= 256", "SendTaskFailure"
            )
        return self._answer(TaskCallback("failure", token, error=error, cause=cause[:MAX_CAUSE_CHARS]))

    @_operation
    def publish(self, message: Mapping[str, Any]) -> None:
        if not self.settings.topic_arn:
            raise _client_error("InvalidParameter", "Invalid parameter: TopicArn", "Publish")
        text = json.dumps(message)
        if len(text.encode()) > MAX_MESSAGE_BYTES:
            raise _client_error("InvalidParameter", "Invalid parameter: Message too long", "Publish")
        with self.backend.lock:
            self.backend.published.append(json.loads(text))


def _round(run_id: str, round_number: int) -> Key:
    return (run_id, f"round#{round_number}")


def _new_item(item: Mapping[str, Any], operation: str) -> Item:
    new = {str(name): stored(value) for name, value in item.items()}
    for name in KEY_ATTRIBUTES:
        if not isinstance(new.get(name), str) or not new[name]:
            raise _client_error(
                "ValidationException",
                f"One or more parameter values were invalid: Missing the key {name} in the item",
                operation,
            )
    return new


def _creates(items: list[dict[str, Any]]) -> list[_Write]:
    writes = []
    for item in items:
        new = _new_item(item, "TransactWriteItems")
        writes.append(
            _Write(
                (new["run_id"], new["sk"]),
                lambda it: not _exists(it, "run_id"),
                "attribute_not_exists(run_id)",
                item=new,
            )
        )
    return writes


def _check_size(item: Item, operation: str) -> None:
    if item_size(item) > MAX_ITEM_BYTES:
        raise _client_error(
            "ValidationException", "Item size has exceeded the maximum allowed size", operation
        )
