"""The async update handler: every stream record moves the global model, once."""

from __future__ import annotations

import dataclasses
import json
import random
import threading
from collections import Counter
from typing import Any

import numpy as np
import pytest
from fedstream.handlers import async_update

from fedstream import faults
from fedstream.local.logs import metric_counts
from fedstream.registry import default_registry
from fedstream.server import asynchronous
from fedstream.server.asynchronous import Arrival
from fedstream.weights import decode, encode
from tests.handlers.conftest import FakeContext, SyncWorld, stream_event


def shifted(world: SyncWorld, by: float) -> dict[str, np.ndarray]:
    return {k: (v + by).astype(v.dtype) for k, v in world.base.items()}


def update(world: SyncWorld, client: str, base_version: int, by: float = 1.0, **kw: Any) -> dict[str, Any]:
    return world.record(client, shifted(world, by), round=None, version=base_version, task_token=None, **kw)


def current(world: SyncWorld) -> tuple[int, dict[str, np.ndarray]]:
    state = world.run_state()
    weights, _ = decode(world.store.get_bytes(state["global_key"]))
    return state["version"], weights


def rejections(capsys: pytest.CaptureFixture[str]) -> dict[str, int]:
    return metric_counts(capsys.readouterr().out, "UpdatesRejected", "reason")


def test_an_update_moves_the_model_and_notifies_every_client(async_world: SyncWorld) -> None:
    world = async_world
    response = async_update.lambda_handler(stream_event(update(world, "site-1", 0, by=1.0)), FakeContext())

    assert response == {"batchItemFailures": []}
    version, weights = current(world)
    assert version == 1
    # FedAsync, staleness 0, alpha 0.6, polynomial s(0) = 1: x1 = 0.4 x0 + 0.6 (x0 + 1) = x0 + 0.6
    for name, base in world.base.items():
        np.testing.assert_allclose(weights[name], base + 0.6, rtol=1e-5, atol=1e-6)
    sqs = world.aws.client("sqs")
    for url in world.resources.queue_urls.values():
        bodies = [
            json.loads(m["Body"])
            for m in sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10)["Messages"]
        ]
        assert [b["version"] for b in bodies if b["type"] == "model_ready"] == [0, 1]
    lineage = world.store.runs.get_item(Key={"run_id": world.run_id, "sk": "version#1"})["Item"]
    assert lineage["parent"] == 0 and lineage["applied"] == ["site-1#0"]


def test_replaying_a_batch_changes_nothing(
    async_world: SyncWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    world = async_world
    batch = stream_event(update(world, "site-1", 0), update(world, "site-2", 0, by=2.0))
    async_update.lambda_handler(batch, FakeContext())
    before = current(world)
    capsys.readouterr()

    async_update.lambda_handler(batch, FakeContext())

    after = current(world)
    assert after[0] == before[0] == 2
    for name in before[1]:
        np.testing.assert_array_equal(after[1][name], before[1][name])
    assert rejections(capsys) == {"duplicate": 2}
    state = world.run_state()
    assert (state["received"], state["applied"], state["rejected"]) == (2, 2, 0)


@pytest.mark.aggregator("fedasync", max_staleness=1)
def test_an_update_staler_than_the_bound_is_rejected_with_its_reason(
    async_world: SyncWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    world = async_world
    items = [update(world, "site-1", 0), update(world, "site-2", 0), update(world, "site-3", 0)]
    async_update.lambda_handler(stream_event(*items), FakeContext())

    assert current(world)[0] == 2  # staleness 0 and 1 applied; the third is 2 versions behind
    assert rejections(capsys) == {"stale": 1}
    state = world.run_state()
    assert (state["received"], state["applied"], state["rejected"]) == (3, 2, 1)


def test_unknown_clients_other_runs_and_future_versions_are_rejected(
    async_world: SyncWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    world = async_world
    other_run = update(world, "site-1", 0)
    other_run.update(run_id="run-zz", update_id="run-zz#0000000000")
    other_run["object_key"] = other_run["object_key"].replace("runs/run-a/", "runs/run-zz/")
    world.put_object(other_run["object_key"], world.store.get_bytes(update(world, "site-2", 0)["object_key"]))
    items = [update(world, "site-9", 0), other_run, update(world, "site-3", 5)]

    async_update.lambda_handler(stream_event(*items), FakeContext())

    assert rejections(capsys) == {"unknown_client": 1, "unknown_run": 1, "future_base_version": 1}
    assert current(world)[0] == 0


@pytest.mark.aggregator("fedbuff", buffer_size=2)
def test_fedbuff_buffers_until_k_updates_then_steps(async_world: SyncWorld) -> None:
    world = async_world
    async_update.lambda_handler(stream_event(update(world, "site-1", 0, by=1.0)), FakeContext())
    state = world.run_state()
    assert (state["version"], state["buffered"], state["buffer_ids"]) == (0, 1, ["site-1#0"])

    async_update.lambda_handler(stream_event(update(world, "site-2", 0, by=3.0)), FakeContext())

    version, weights = current(world)
    assert version == 1
    for name, base in world.base.items():  # mean of deltas 1 and 3, both fresh: +2
        np.testing.assert_allclose(weights[name], base + 2.0, rtol=1e-5, atol=1e-6)
    state = world.run_state()
    assert (state["received"], state["applied"], state["buffered"]) == (2, 2, 0)


def test_concurrent_handlers_lose_and_double_no_update(async_world: SyncWorld) -> None:
    # GIVEN 200 clients' updates, all trained from version 0 (the staleness bound is 1000)
    world = async_world
    clients = [f"site-{n}" for n in range(200)]
    settings = world.settings.model_copy(update={"client_ids": tuple(clients)})
    items = [update(world, client, 0, by=random.Random(n).uniform(-1, 1)) for n, client in enumerate(clients)]
    work = list(enumerate(items))
    random.Random(7).shuffle(work)
    outcomes: dict[int, str] = {}
    lock = threading.Lock()

    def worker(chunk: list[tuple[int, dict[str, Any]]]) -> None:
        for start in range(0, len(chunk), 10):  # batches of ten, as the stream delivers them
            batch = chunk[start : start + 10]
            for _attempt in range(5):  # as Lambda's event source mapping retries a failed batch
                try:
                    result = asynchronous.handle_async_batch(
                        world.store, settings, default_registry(), [Arrival(item) for _, item in batch]
                    )
                except Exception as exc:
                    verdicts = [f"error: {exc!r}"] * len(batch)
                    continue
                verdicts = [v.outcome if v.reason is None else v.reason for v in result.verdicts]
                break
            with lock:
                outcomes.update({index: verdict for (index, _), verdict in zip(batch, verdicts, strict=True)})

    # WHEN four invocations race through them
    threads = [threading.Thread(target=worker, args=(work[i::4],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # THEN the version equals the number applied, and the lineage holds each applied update once
    state = world.run_state()
    applied = [i for i, o in outcomes.items() if o == "applied"]
    assert sorted(set(outcomes.values())) == ["applied"], Counter(outcomes.values())
    assert state["version"] == state["applied"] == len(applied)
    assert state["received"] == len(items) == state["applied"] + state["rejected"]
    lineage: list[str] = []
    version = state["version"]
    while version > 0:
        item = world.store.runs.get_item(Key={"run_id": world.run_id, "sk": f"version#{version}"})["Item"]
        lineage += item["applied"]
        version = int(item["parent"])
    assert len(lineage) == len(set(lineage)) == len(applied)
    assert set(lineage) == {f"{items[i]['client_id']}#{items[i]['base_version']}" for i in applied}


def queue_bodies(world: SyncWorld, client: str = "site-1") -> list[dict[str, Any]]:
    """Every message waiting on a client's queue, oldest first (each is read once)."""
    sqs, url = world.aws.client("sqs"), world.resources.queue_urls[client]
    bodies: list[dict[str, Any]] = []
    while batch := sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", []):
        bodies += [json.loads(m["Body"]) for m in batch]
    return bodies


def fedasync_by_hand(world: SyncWorld, shifts: list[float]) -> dict[str, np.ndarray]:
    """FedAsync (alpha 0.6, s(t) = (1 + t)^-0.5) over updates all trained from version 0, in order."""
    model = {name: array.astype(np.float64) for name, array in world.base.items()}
    for staleness, by in enumerate(shifts):
        mixing = 0.6 * (1 + staleness) ** -0.5
        model = {name: (1 - mixing) * model[name] + mixing * (world.base[name] + by) for name in model}
    return model


def test_a_batch_takes_its_steps_in_memory_and_publishes_its_last_version(async_world: SyncWorld) -> None:
    # GIVEN three updates trained from version 0, delivered in one batch
    world = async_world
    items = [
        update(world, client, 0, by=by) for client, by in (("site-1", 1.0), ("site-2", 2.0), ("site-3", 3.0))
    ]

    # WHEN the handler takes the batch
    assert async_update.lambda_handler(stream_event(*items), FakeContext()) == {"batchItemFailures": []}

    # THEN it took three steps, staleness counting the steps before each (0, 1, 2)
    version, weights = current(world)
    assert version == 3 and world.run_state()["applied"] == 3
    for name, array in fedasync_by_hand(world, [1.0, 2.0, 3.0]).items():
        np.testing.assert_allclose(weights[name], array, rtol=1e-5, atol=1e-6)
    # AND published version 3 alone, whose lineage holds all three, and named them to every client
    versions = {item["sk"]: item for item in world.store.run_items_with_prefix(world.run_id, "version#")}
    assert sorted(versions) == ["version#0", "version#3"]
    assert versions["version#3"]["parent"] == 0 and versions["version#3"]["steps"] == 3
    assert versions["version#3"]["applied"] == ["site-1#0", "site-2#0", "site-3#0"]
    for client in ("site-1", "site-2", "site-3"):
        ready = [
            (b["version"], b["consumed"]) for b in queue_bodies(world, client) if b["type"] == "model_ready"
        ]
        assert ready == [(0, []), (3, ["site-1#0", "site-2#0", "site-3#0"])]


@pytest.mark.aggregator("fedbuff", buffer_size=2)
def test_a_batch_names_what_it_consumed_even_without_a_new_version(async_world: SyncWorld) -> None:
    # GIVEN one update that FedBuff (K = 2) buffers and one it refuses
    world = async_world
    items = [update(world, "site-1", 0), update(world, "site-3", 5)]

    # WHEN the batch is handled
    async_update.lambda_handler(stream_event(*items), FakeContext())

    # THEN the version stays, and the current version is announced again naming both updates
    state = world.run_state()
    assert (state["version"], state["buffered"], state["rejected"]) == (0, 1, 1)
    last = queue_bodies(world, "site-2")[-1]
    assert (last["type"], last["version"], last["consumed"]) == ("model_ready", 0, ["site-1#0", "site-3#5"])


def test_a_client_cannot_have_two_updates_in_flight(
    async_world: SyncWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN version 3, site-1's update released at version 3 and site-2's at version 2
    world = async_world
    async_update.lambda_handler(
        stream_event(update(world, "site-2", 0), update(world, "site-3", 0)), FakeContext()
    )
    async_update.lambda_handler(stream_event(update(world, "site-1", 2)), FakeContext())
    assert world.run_state()["released"] == {"site-1": 3, "site-2": 2, "site-3": 2}
    capsys.readouterr()

    # WHEN site-1 sends an update back-dated to version 1, and site-2 two updates in one batch
    batch = [update(world, "site-1", 1), update(world, "site-2", 2), update(world, "site-2", 3)]
    async_update.lambda_handler(stream_event(*batch), FakeContext())

    # THEN the back-dated one and site-2's second are refused; site-2's first is applied
    assert rejections(capsys) == {"in_flight": 2}
    state = world.run_state()
    assert (state["version"], state["applied"], state["rejected"], state["received"]) == (4, 4, 2, 6)


@pytest.mark.parametrize("point", sorted(p for p in faults.POINTS if p.startswith("async.")))
def test_a_crash_in_an_async_batch_is_recovered_by_the_retry(async_world: SyncWorld, point: str) -> None:
    # GIVEN a batch of two updates whose invocation crashes at `point`
    world = async_world
    event = stream_event(update(world, "site-1", 0, by=1.0), update(world, "site-2", 0, by=2.0))
    faults.arm(point)
    try:
        with pytest.raises(faults.InjectedFault):
            async_update.lambda_handler(event, FakeContext())
    finally:
        faults.disarm()

    # WHEN the stream delivers the batch again
    assert async_update.lambda_handler(event, FakeContext()) == {"batchItemFailures": []}

    # THEN both updates are in the model exactly once, as without the crash
    version, weights = current(world)
    for name, array in fedasync_by_hand(world, [1.0, 2.0]).items():
        np.testing.assert_allclose(weights[name], array, rtol=1e-5, atol=1e-6)
    state = world.run_state()
    assert (version, state["received"], state["applied"], state["rejected"]) == (2, 2, 2, 0)
    assert world.store.run_items(world.run_id, ["version#2"])["version#2"]["applied"] == [
        "site-1#0",
        "site-2#0",
    ]
    # AND the clients heard that both were consumed (from the retry, if the crash came before)
    last = queue_bodies(world, "site-3")[-1]
    assert (last["version"], last["consumed"]) == (2, ["site-1#0", "site-2#0"])


def test_the_batch_that_reaches_max_updates_ends_the_run_and_refuses_the_rest(
    async_world: SyncWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a run that stops after two applied updates
    world = dataclasses.replace(async_world, run_id="run-m")
    asynchronous.start_run(world.store, world.run_id, encode(world.base), max_updates=2)
    queue_bodies(world, "site-1")
    capsys.readouterr()

    # WHEN a batch of three updates arrives
    items = [update(world, client, 0) for client in ("site-1", "site-2", "site-3")]
    async_update.lambda_handler(stream_event(*items), FakeContext())

    # THEN two are applied, the third refused, the run ends, and clients are told to stop (only that)
    state = world.run_state()
    assert (state["status"], state["finish_reason"], state["applied"], state["rejected"]) == (
        "SUCCEEDED",
        "max_updates",
        2,
        1,
    )
    assert rejections(capsys) == {"run_finished": 1}
    assert [b["type"] for b in queue_bodies(world, "site-1")] == ["training_complete"]


def test_a_batch_larger_than_one_transaction_is_committed_in_several(async_world: SyncWorld) -> None:
    # GIVEN 110 updates from 110 clients in one batch: more records than one transaction holds
    world = async_world
    clients = [f"site-{n}" for n in range(110)]
    settings = world.settings.model_copy(update={"client_ids": tuple(clients)})
    items = [update(world, client, 0, by=0.01) for client in clients]

    # WHEN the handler takes them
    result = asynchronous.handle_async_batch(
        world.store, settings, default_registry(), [Arrival(item) for item in items]
    )

    # THEN they go in three transactions (49 + 49 + 12) and every one is applied once
    most = asynchronous.MAX_RECORDS_PER_COMMIT
    assert [len(commit.verdicts) for commit in result.commits] == [most, most, 110 - 2 * most]
    assert [v.outcome for v in result.verdicts] == ["applied"] * 110
    state = world.run_state()
    assert (state["version"], state["received"], state["applied"]) == (110, 110, 110)
    versions = world.store.run_items_with_prefix(world.run_id, "version#")
    lineage = [ref for item in versions for ref in item.get("applied", [])]
    assert sorted(lineage) == sorted(f"{client}#0" for client in clients)


@pytest.mark.aggregator("fedbuff", buffer_size=2, server_lr=4.0)
def test_one_huge_update_cannot_poison_fedbuffs_buffer(
    async_world: SyncWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a finite update so large that the next step (x + 4 * buffer / 2) would overflow float32
    world = async_world
    huge = world.record("site-1", shifted(world, 2e38), round=None, version=0, task_token=None)
    capsys.readouterr()

    # WHEN it arrives with two honest updates
    async_update.lambda_handler(
        stream_event(huge, update(world, "site-2", 0, by=1.0), update(world, "site-3", 0, by=2.0)),
        FakeContext(),
    )

    # THEN it alone is refused, and the honest two make a step: no dead letter, no wedged buffer
    assert rejections(capsys) == {"non_finite": 1}
    version, weights = current(world)
    assert version == 1
    for name, base in world.base.items():  # 4 * mean of deltas 1 and 2 = +6
        np.testing.assert_allclose(weights[name], base + 6.0, rtol=1e-5, atol=1e-5)
