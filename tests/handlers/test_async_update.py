"""The async update handler: every stream record moves the global model, once."""

from __future__ import annotations

import json
import random
import threading
from collections import Counter
from typing import Any

import numpy as np
import pytest

from fedstream.local.logs import metric_counts
from fedstream.registry import default_registry
from fedstream.server import asynchronous
from fedstream.server.asynchronous import Arrival
from fedstream.weights import decode
from handlers import async_update
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
