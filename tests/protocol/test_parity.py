"""The fake mirrors the real thing: the same scripts on a MemoryStore and on the real Store over a
moto server (``e2e``: it starts the embedded AWS), with the same expected outcomes.

``test_every_verb_answers_as_the_real_store`` takes each verb of the ``Repository`` through its
condition both ways (and S3's write-once, versions and limits); the scenario tests run a short sync
round to its deadline and an async run through a redelivered batch, and compare what a user sees.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from botocore.exceptions import ClientError

from fedstream import keys
from fedstream.server import finalize
from fedstream.server.memory import MemoryStore
from fedstream.server.store import ConditionFailed, MissingObject, Repository, Store
from fedstream.settings import HandlerSettings
from fedstream.weights import WireFormatError
from tests.handlers.conftest import _deployment, aws  # noqa: F401  (aws: the moto server fixture)
from tests.protocol.conftest import ROUND_TOKEN, Run, assert_model, make_settings, shifted

BACKENDS = ["memory", pytest.param("moto", marks=pytest.mark.e2e)]


@dataclass
class Backend:
    name: str
    store: Repository
    settings: HandlerSettings
    upload: Callable[[str, bytes], None]
    outbox: list[tuple[str, Any]]

    def run(self, run_id: str) -> Run:
        return Run(self.store, self.settings, run_id=run_id, upload=self.upload)


@pytest.fixture(params=BACKENDS)
def backend(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., Backend]]:
    """A factory: ``backend(mode, **settings)`` on a MemoryStore, or on a Store over moto."""

    def make(mode: str, **fields: Any) -> Backend:
        if request.param == "memory":
            settings = make_settings(mode, **fields)
            store: Repository = MemoryStore(settings)

            def upload(key: str, data: bytes) -> None:
                store.put_object(key, data)  # type: ignore[attr-defined]

        else:
            embedded = request.getfixturevalue("aws")
            resources, settings = _deployment(embedded, monkeypatch, mode=mode, min_clients=2, **fields)
            store = Store(settings, embedded.session())
            s3 = embedded.client("s3")

            def upload(key: str, data: bytes) -> None:
                s3.put_object(Bucket=resources.bucket, Key=key, Body=data)

        return Backend(str(request.param), store, settings, upload, _spy_outbox(store))

    yield make


def _spy_outbox(store: Repository) -> list[tuple[str, Any]]:
    """Every callback and notification the server sends, in order, as (call, arguments)."""
    sent: list[tuple[str, Any]] = []
    for name in ("send_task_success", "send_task_failure", "publish"):
        original = getattr(store, name)

        def spy(*args: Any, _name: str = name, _original: Any = original) -> Any:
            sent.append((_name, json.loads(json.dumps(args))))
            return _original(*args)

        setattr(store, name, spy)
    return sent


def outcome(call: Callable[[], Any]) -> Any:
    """What a verb did: its (plain) result, or the name of what it raised (an AWS error's code)."""
    try:
        return call()
    except (ConditionFailed, MissingObject, WireFormatError, TypeError, ValueError) as exc:
        return type(exc).__name__
    except ClientError as exc:
        return exc.response["Error"]["Code"]


def without(item: dict[str, Any] | None, *names: str) -> dict[str, Any] | None:
    return None if item is None else {k: v for k, v in item.items() if k not in names}


# ---- every verb, both ways ------------------------------------------------------------------------


def test_every_verb_answers_as_the_real_store(backend: Callable[..., Backend]) -> None:
    # GIVEN an empty deployment
    store = backend("sync").store
    run, other = "run-c", "run-d"

    # ---- S3: write-once, versions, limits
    assert outcome(lambda: store.put_once("k", b"first")) is True
    assert outcome(lambda: store.put_once("k", b"second")) is False
    data, first_version = store.get_object("k")
    assert data == b"first" and first_version
    store.put("k", b"third")
    assert store.get_bytes("k") == b"third"
    assert store.get_object("k", first_version)[0] == b"first"  # an older version, by its id
    assert outcome(lambda: store.get_object("nowhere")) == "MissingObject"
    assert outcome(lambda: store.get_object("k", limit=2)) == "WireFormatError"

    # ---- creating items: all or none
    state = {"run_id": run, "sk": "state", "status": "RUNNING", "version": 0, "buffer_seq": 0, "received": 0}
    opened = {"run_id": run, "round": 1, "version": 0, "status": "open", "reported_count": 0}
    store.create_items([state, {**opened, "sk": "round#1"}, {**opened, "sk": "round#2", "round": 2}])
    assert outcome(
        lambda: store.create_items([{"run_id": run, "sk": "new"}, {**opened, "sk": "round#1"}])
    ) == ("ConditionFailed")
    assert store.run_items(run, ["new", "round#1", "round#1", "absent"]).keys() == {"round#1"}

    # ---- reports: open round, its version, its token, one per client
    def add(client: str, base: int = 0, token: str | None = "tok") -> Any:
        return outcome(lambda: store.add_report(run, 1, client, base, f"report of {client}", token, "t-1"))

    item = add("site-1")
    assert (item["reported"], item["reported_count"], item["report#site-1"]) == (
        ["site-1"],
        1,
        "report of site-1",
    )
    assert add("site-1") == "ConditionFailed"  # a second report
    assert add("site-2", base=1) == "ConditionFailed"  # another version
    assert outcome(lambda: store.record_round_token(run, 1, "tok")) is None
    assert outcome(lambda: store.record_round_token(run, 1, "other")) == "ConditionFailed"
    assert outcome(lambda: store.record_round_token(run, 7, "tok")) == "ConditionFailed"  # no round 7
    assert add("site-2", token="other") == "ConditionFailed"  # another token
    assert add("site-2")["reported_count"] == 2
    assert add("site-3", token=None)["reported"] == ["site-1", "site-2", "site-3"]

    # ---- objects bound to one round
    def bind(used_in: str) -> Any:
        return outcome(lambda: store.bind_object(run, "site-1", "ab" * 32, "key", used_in))

    assert (bind("round#1"), bind("round#1"), bind("round#2")) == (None, None, "ConditionFailed")

    # ---- the claim: a complete round, or a stale claim
    def claim(claim_id: str, least: int, now: float, stale: float) -> Any:
        return outcome(lambda: store.claim_round(run, 1, claim_id, least, now, stale))

    assert claim("c1", 4, 1000.5, 0.0) == "ConditionFailed"  # 3 reports < 4
    assert claim("c1", 3, 1000.5, 0.0)["status"] == "aggregating"
    assert claim("c2", 3, 1001.0, 1000.25) == "ConditionFailed"  # claimed at 1000.5: not stale yet
    taken = claim("c2", 3, 1001.0, 1000.75)
    assert (taken["claim_id"], taken["claimed_at"]) == ("c2", 1001.0)
    assert outcome(lambda: store.release_claim(run, 1, "c1")) == "ConditionFailed"
    assert outcome(lambda: store.release_claim(run, 1, "c2")) is None
    released = store.round_item(run, 1) or {}
    assert released["status"] == "open" and "claim_id" not in released and "claimed_at" not in released

    # ---- failing, closing
    assert outcome(lambda: store.fail_round(run, 1, "why", below_quorum=3)) == "ConditionFailed"  # 3 < 3
    assert outcome(lambda: store.fail_round(run, 2, "too few", below_quorum=1)) is None
    assert (store.round_item(run, 2) or {})["status"] == "failed"
    assert outcome(lambda: store.fail_round(run, 8, "no such round")) == "ConditionFailed"
    assert outcome(lambda: store.close_round(run, 1, "result", "t-2")) == "ConditionFailed"  # not claimed
    claim("c3", 3, 2000.0, 0.0)
    closed = store.close_round(run, 1, "result", "t-2")
    assert (closed["status"], closed["result"], closed["closed_at"]) == ("closed", "result", "t-2")
    assert outcome(lambda: store.close_round(run, 1, "again", "t-3")) == "ConditionFailed"
    assert add("site-4") == "ConditionFailed"  # a closed round

    # ---- flags, set once
    def flag() -> Any:
        return outcome(lambda: store.set_round_flag(run, 1, "callback_at", "t-4"))

    assert (flag(), flag()) == (None, "ConditionFailed")
    assert outcome(lambda: store.clear_round_flag(run, 1, "callback_at")) is None
    assert flag() is None
    assert outcome(lambda: store.clear_round_flag(run, 8, "callback_at")) == "ConditionFailed"
    # on a round that does not exist, the update creates an item holding only the flag
    assert outcome(lambda: store.set_round_flag(run, 9, "callback_at", "t-5")) is None
    assert store.round_item(run, 9) == {"run_id": run, "sk": "round#9", "callback_at": "t-5"}

    # ---- the finalize token: the round's id, and the first token seen with it
    store.create_items([{"run_id": run, "sk": "round#3", "finalize_id": "f"}])

    def pin(ident: str, token: str) -> Any:
        return outcome(lambda: store.pin_finalize_token(run, 3, ident, token))

    assert pin("f", "t1")["finalize_token"] == "t1"
    assert pin("f", "t1")["finalize_token"] == "t1"
    assert (pin("f", "t2"), pin("g", "t1"), pin("f", "t2")) == ("ConditionFailed",) * 3
    assert outcome(lambda: store.pin_finalize_token(run, 1, "f", "t1")) == "ConditionFailed"  # no id on it

    # ---- the version pointer, and numbers as DynamoDB keeps them
    fields = {"version": 1, "global_key": "g1", "ratio": 0.1, "whole": 2.0, "names": ["a"], "map": {"x": 1.5}}
    assert outcome(lambda: store.publish_version(run, 1, fields)) == "ConditionFailed"
    assert outcome(lambda: store.publish_version(run, 0, fields)) is None
    assert without(store.run_state(run), "run_id", "sk") == {
        "status": "RUNNING",
        "version": 1,
        "buffer_seq": 0,
        "received": 0,
        "global_key": "g1",
        "ratio": 0.1,
        "whole": 2,
        "names": ["a"],
        "map": {"x": 1.5},
    }
    numbers = store.run_state(run) or {}
    assert [type(numbers[n]).__name__ for n in ("version", "ratio", "whole")] == ["int", "float", "int"]
    assert outcome(lambda: store.finish_run(run, "done", "t-6")) is None
    assert outcome(lambda: store.finish_run(run, "done", "t-7")) == "ConditionFailed"
    assert (store.run_state(run) or {})["finished_at"] == "t-6"

    # ---- the async commit: the state at (version, buffer_seq, status), new items, counters
    store.create_items([{"run_id": other, "sk": "state", "status": "RUNNING", "version": 0, "buffer_seq": 0}])

    def commit(expected: tuple[int, int, Any], marker: str, **counters: int) -> Any:
        return outcome(
            lambda: store.commit_async_step(
                other,
                {"version": expected[0] + 1, "buffer_seq": expected[1] + 1, "released": {"site-1": 1}},
                expected=expected,
                counters=counters,
                new_items=[{"run_id": other, "sk": marker, "outcome": "applied"}],
            )
        )

    assert commit((0, 0, "RUNNING"), "update#site-1#0", received=2, applied=1) is None
    assert commit((0, 0, "RUNNING"), "update#site-2#0", received=1) == "ConditionFailed"  # moved on
    assert commit((1, 1, "RUNNING"), "update#site-1#0", received=1) == "ConditionFailed"  # marker exists
    assert commit((1, 1, None), "update#site-3#0", received=1) == "ConditionFailed"  # another status
    assert commit((1, 1, "RUNNING"), "update#site-3#0", received=3, rejected=1) is None
    assert without(store.run_state(other), "run_id", "sk") == {
        "status": "RUNNING",
        "version": 2,
        "buffer_seq": 2,
        "released": {"site-1": 1},
        "received": 5,
        "applied": 1,
        "rejected": 1,
    }
    markers = store.run_items(other, ["update#site-1#0", "update#site-2#0", "update#site-3#0"])
    assert sorted(markers) == ["update#site-1#0", "update#site-3#0"]

    # ---- what boto3 or DynamoDB refuse, whatever the condition
    def set_field(value: Any) -> Any:
        return outcome(lambda: store.publish_version(other, 2, {"x": value}))

    assert [set_field(v) for v in (float("nan"), np.int64(3), set(), "a" * 410_000)] == [
        "TypeError",
        "TypeError",
        "ValidationException",
        "ValidationException",
    ]
    assert outcome(lambda: store.publish_version(other, 2, {"sk": "moved"})) == "ValidationException"
    assert outcome(lambda: store.create_items([{"run_id": other, "sk": f"i{n}"} for n in range(101)])) == (
        "ValidationException"
    )
    twice = [{"run_id": other, "sk": "same"}, {"run_id": other, "sk": "same"}]
    assert outcome(lambda: store.create_items(twice)) == "ValidationException"
    assert outcome(lambda: store.commit_async_step(  # a counter that is also set
        other, {"received": 1}, expected=(2, 2, "RUNNING"), counters={"received": 1}, new_items=[]
    )) == "ValidationException"  # fmt: skip
    store.create_items(
        [{"run_id": other, "sk": "round#1", "status": "open", "version": 0, "reported": ["a"]}]
    )
    assert outcome(lambda: store.add_report(other, 1, "b", 0, "r", None, "t")) == "ValidationException"
    assert (store.run_state(other) or {})["received"] == 5  # none of it was written
    assert outcome(lambda: store.publish({"blob": "a" * 300_000})) == "InvalidParameter"
    assert outcome(lambda: store.send_task_success("some-token", {"loss": float("nan")})) == "ValueError"


# ---- scenarios ------------------------------------------------------------------------------------


def test_a_sync_round_to_its_deadline_ends_alike(backend: Callable[..., Backend]) -> None:
    # GIVEN a sync run with round 1 open on version 0 (FedAvg, three clients, a quorum of two)
    deployment = backend("sync", aggregator="fedavg")
    run = deployment.run("run-s")
    run.start_sync()
    first = run.record("site-1", shifted(run.base, 1.0), examples=10)

    # WHEN two clients report, one twice, one on the wrong version, one not registered at all
    reports = run.deliver(
        first,
        run.record("site-2", shifted(run.base, 2.0), examples=30),
        first,
        run.record("site-3", shifted(run.base, 3.0), version=1),
        run.record("site-9", shifted(run.base, 3.0)),
    )
    # AND the deadline passes; the finalize request is delivered twice, and a late report arrives
    finalize_id = run.mark_deadline()
    answers = [
        finalize.finalize_round(
            run.store, run.settings, run.registry, run.run_id, 1, "fin", finalize_id=finalize_id
        ).outcome
        for _ in range(2)
    ]
    late = run.deliver(run.record("site-3", shifted(run.base, 3.0)))

    # THEN every backend saw the same: refusals by reason, one close at the deadline with the two
    # reports, the same model, one callback, the same items
    assert reports == ["registered", "registered", "duplicate", "wrong_base_version", "unknown_client"]
    assert answers == ["closed", "already_closed"] and late == ["round_closed"]
    assert_model(run.model(), run.mean((1.0, 10), (2.0, 30)))
    item = run.round()
    assert sorted(item) == [
        "callback_at", "claim_id", "claimed_at", "closed_at", "deadline_at", "finalize_callback_at",
        "finalize_id", "finalize_token", "last_report_at", "min_clients", "opened_at", "report#site-1",
        "report#site-2", "reported", "reported_count", "result", "round", "round_timeout", "run_id", "sk",
        "status", "task_token", "version",
    ]  # fmt: skip
    assert (item["status"], item["reported"], item["reported_count"]) == ("closed", ["site-1", "site-2"], 2)
    result = json.loads(item["result"])
    assert (result["version"], result["clients"], result["at_deadline"]) == (1, ["site-1", "site-2"], True)
    assert without(
        run.state(), "global_sha256", "carry", "client_settings_next", "last_metrics", "aggregator_state_key"
    ) == {
        "run_id": "run-s",
        "sk": "state",
        "mode": "sync",
        "status": "RUNNING",
        "version": 1,
        "global_key": keys.global_key("run-s", 1),
        "round": 1,
        "min_clients": 2,
    }
    # (the late report sent the stored result to the round's own token too, whose wait had timed out)
    assert [(call, args[0]) for call, args in deployment.outbox] == [
        ("send_task_success", "fin"),
        ("send_task_success", ROUND_TOKEN),
    ]
    assert item["task_token"] == ROUND_TOKEN


def test_an_async_run_through_a_redelivered_batch_ends_alike(backend: Callable[..., Backend]) -> None:
    # GIVEN an async run at version 0 (FedAsync, alpha 0.6)
    deployment = backend("async", aggregator="fedasync", aggregator_params={"max_staleness": 1000})
    run = deployment.run("run-a")
    run.start_async()

    # WHEN a batch of three arrives (one from a future version), is redelivered, and site-1 trains again
    batch = [run.update("site-1", 0, by=1.0), run.update("site-2", 0, by=2.0), run.update("site-3", 5)]
    verdicts = [
        [v.outcome if v.reason is None else v.reason for v in result.verdicts]
        for result in (run.batch(*batch), run.batch(*batch), run.batch(run.update("site-1", 2, by=3.0)))
    ]

    # THEN every backend saw the same verdicts, counters, lineage, messages and model
    assert verdicts == [
        ["applied", "applied", "future_base_version"],
        ["duplicate", "duplicate", "duplicate"],
        ["applied"],
    ]
    state = run.state()
    assert (state["version"], state["received"], state["applied"], state["rejected"], state["buffered"]) == (
        3,
        4,
        3,
        1,
        0,
    )
    assert state["released"] == {"site-1": 3, "site-2": 2, "site-3": 2}
    versions = run.store.run_items(run.run_id, ["version#0", "version#2", "version#3"])
    assert {sk: (v["parent"], v["applied"]) for sk, v in versions.items()} == {
        "version#0": (-1, []),
        "version#2": (0, ["site-1#0", "site-2#0"]),
        "version#3": (2, ["site-1#2"]),
    }
    messages = [
        (m["type"], m["version"], m["consumed"]) for call, (m,) in deployment.outbox if call == "publish"
    ]
    assert messages == [
        ("model_ready", 0, []),
        ("model_ready", 2, ["site-1#0", "site-2#0", "site-3#5"]),
        ("model_ready", 2, ["site-1#0", "site-2#0", "site-3#5"]),
        ("model_ready", 3, ["site-1#2"]),
    ]
    expected = {name: array.astype(np.float64) for name, array in run.base.items()}
    for staleness, (by, base) in enumerate([(1.0, 0), (2.0, 0), (3.0, 2)]):
        mixing = 0.6 * (1 + (staleness - base)) ** -0.5
        expected = {name: (1 - mixing) * expected[name] + mixing * (run.base[name] + by) for name in expected}
    assert_model(run.model(), expected)
