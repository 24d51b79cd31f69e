"""A server optimizer (fedadam) through the real stream handlers on the moto server: its moments are
written to S3 with each version and read back by the next step, on a cold start (each invocation
gets a fresh Store, as another Lambda process would), across a crash and a redelivery. Each
version equals the papers' update (tests/plugins/test_server_optimizers.py's float64 reference)
with the moments carried from step to step."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fedstream.handlers import aggregate, async_update

from fedstream import faults, keys
from fedstream.aggregation import state_from_bytes
from fedstream.server import store as store_module
from fedstream.weights import decode
from tests.handlers.conftest import FakeContext, SyncWorld, stream_event
from tests.handlers.test_influence import open_round
from tests.plugins.test_server_optimizers import PARAMS, Reference, trained

NAME = "fedadam"
CLIENTS = (("site-1", 12), ("site-2", 20), ("site-3", 35))  # within 4x the median count: none capped
SCALES = (0.1, 0.003, 0.05)  # how far the clients move each round: Adam's v grows, then decays


@pytest.fixture(autouse=True)
def _cold_starts(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The handlers' Stores (their cached models, states and blobs) in a dict of this test's own,
    which ``cold_start`` empties; no fault point armed before or after."""
    monkeypatch.setattr(store_module, "_stores", {})
    faults.disarm()
    yield
    faults.disarm()


def cold_start() -> None:
    """The next invocation runs in a new process: nothing this test's handlers wrote is cached."""
    store_module._stores.clear()


def global_model(world: SyncWorld, key: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    body = world.aws.client("s3").get_object(Bucket=world.resources.bucket, Key=key)["Body"].read()
    return decode(body)


def stored_state(world: SyncWorld, key: str):
    """The aggregator state object ``key`` (it must exist in S3)."""
    body = world.aws.client("s3").get_object(Bucket=world.resources.bucket, Key=key)["Body"].read()
    state, _ = state_from_bytes(body, max_bytes=1 << 20)
    return state


def state_objects(world: SyncWorld) -> list[str]:
    listed = world.aws.client("s3").list_objects_v2(
        Bucket=world.resources.bucket, Prefix=f"runs/{world.run_id}/state/"
    )
    return sorted(o["Key"] for o in listed.get("Contents", []))


def assert_model_close(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert set(actual) == set(expected)
    for name, want in expected.items():
        assert actual[name].dtype == want.dtype, name
        np.testing.assert_allclose(actual[name], want, rtol=1e-5, atol=1e-7, err_msg=name)


def failed(response: dict[str, Any]) -> list[str]:
    return [f["itemIdentifier"] for f in response["batchItemFailures"]]


# -- sync ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "crash", [None, "aggregate.before_object_write", "aggregate.after_object_write"], ids=str
)
def test_sync_rounds_step_with_the_moments_of_the_version_before(
    world: SyncWorld, monkeypatch: pytest.MonkeyPatch, crash: str | None
) -> None:
    # GIVEN a deployment aggregating with fedadam (non-default parameters)
    monkeypatch.setenv("FEDSTREAM_AGGREGATOR", NAME)
    monkeypatch.setenv("FEDSTREAM_AGGREGATOR_PARAMS", json.dumps(PARAMS[NAME]))
    rng = np.random.default_rng(17)
    x = world.base
    reference = Reference(NAME, PARAMS[NAME], x)

    for number, scale in enumerate(SCALES, start=1):
        if number > 1:
            open_round(world, number, version=number - 1)
        # GIVEN the three clients' reports, trained from the round's version
        reports = [(trained(rng, x, scale), n) for _, n in CLIENTS]
        token = f"token-round-{number}"
        items = [
            world.record(client, weights, num_examples=n, round=number, version=number - 1, task_token=token)
            for (client, _), (weights, n) in zip(CLIENTS, reports, strict=True)
        ]
        event = stream_event(*items)
        before = world.run_state()

        if crash and number == 2:
            # WHEN the close crashes once the new state is written: before the model write, or
            # after it (the model is there, the version not published)
            faults.arm(crash)
            cold_start()
            response = aggregate.lambda_handler(event, FakeContext())
            assert faults.fired() == {crash: 1}
            assert failed(response) == [event["Records"][-1]["dynamodb"]["SequenceNumber"]]
            assert world.run_state()["version"] == 1
            assert world.run_state()["aggregator_state_key"] == before["aggregator_state_key"]
            assert len(state_objects(world)) == 2  # round 1's, and the crashed close's
            # AND the stream delivers the failed record again, to another process
            cold_start()
            response = aggregate.lambda_handler({"Records": event["Records"][-1:]}, FakeContext())
        else:
            # WHEN the batch arrives
            cold_start()
            response = aggregate.lambda_handler(event, FakeContext())

        # THEN the round closes into one Adam step from the round's version, with the moments
        # of every round before: each version is the reference's
        assert failed(response) == []
        assert world.round_item(number)["status"] == "closed"
        state = world.run_state()
        assert state["version"] == number
        weights, metadata = global_model(world, keys.global_key(world.run_id, number))
        total = sum(n for _, n in reports)
        change = {t: sum(n * (w[t].astype(np.float64) - x[t]) for w, n in reports) / total for t in x}
        assert_model_close(weights, reference.step(x, change))
        # AND the run state and the model both name the state object of this version, in S3
        key = state["aggregator_state_key"]
        assert key.startswith(f"runs/{world.run_id}/state/") and key != before.get("aggregator_state_key")
        assert metadata["aggregator_state"] == key
        assert stored_state(world, key).values == {"step": number}
        objects = state_objects(world)
        assert key in objects

        # WHEN the whole batch is delivered again after the close
        cold_start()
        assert failed(aggregate.lambda_handler(event, FakeContext())) == []

        # THEN nothing changes: the version, its model, its state, the state objects
        again = world.run_state()
        assert (again["version"], again["global_sha256"], again["aggregator_state_key"]) == (
            number,
            state["global_sha256"],
            key,
        )
        assert state_objects(world) == objects
        x = weights


# -- async ---------------------------------------------------------------------------------------


@pytest.mark.aggregator(NAME, buffer_size=2, **PARAMS[NAME])
def test_async_steps_read_the_buffer_and_the_moments_back_from_s3(async_world: SyncWorld) -> None:
    # GIVEN an async run at version 0 whose fedadam steps every K = 2 updates
    world = async_world
    rng = np.random.default_rng(23)
    published = [world.base]
    reference = Reference(NAME, PARAMS[NAME], world.base)
    buffer = {t: np.zeros(w.shape) for t, w in world.base.items()}
    # Four updates, one batch each; site-3 trained on version 0 while version 1 is out
    plan = [("site-1", 0, 0.1), ("site-2", 0, 0.05), ("site-3", 0, 0.08), ("site-1", 1, 0.06)]
    events = []

    for arrived, (client, base_version, scale) in enumerate(plan, start=1):
        weights = trained(rng, published[base_version], scale)
        item = world.record(client, weights, round=None, version=base_version, task_token=None)
        events.append(stream_event(item))

        # WHEN it arrives, in a process that has nothing cached (the state comes from S3)
        cold_start()
        assert async_update.lambda_handler(events[-1], FakeContext()) == {"batchItemFailures": []}

        newest = len(published) - 1
        s = (1 + newest - base_version) ** -0.5
        for t in buffer:
            buffer[t] += s * (weights[t].astype(np.float64) - published[base_version][t])
        state = world.run_state()
        assert state["applied"] + state["buffered"] == arrived and state["rejected"] == 0
        # THEN the run state names the state object in S3: the buffer after an odd update ...
        stored = stored_state(world, state["buffer_key"])
        if arrived % 2:
            assert (state["version"], state["buffered"]) == (newest, 1)
            assert stored.values == {"count": 1, "step": newest}
            continue
        # ... and after every second one, a step from the newest version with Delta = buffer / K,
        # with the moments of the step before
        assert (state["version"], state["buffered"]) == (newest + 1, 0)
        assert stored.values == {"count": 0, "step": newest + 1}
        weights_now, _ = global_model(world, state["global_key"])
        assert_model_close(weights_now, reference.step(published[-1], {t: b / 2 for t, b in buffer.items()}))
        published.append(weights_now)
        buffer = {t: np.zeros(b.shape) for t, b in buffer.items()}

    # WHEN the last two batches are delivered again
    before = world.run_state()
    for event in events[-2:]:
        cold_start()
        assert async_update.lambda_handler(event, FakeContext()) == {"batchItemFailures": []}

    # THEN nothing changes: the version, its model, the state it names, the counters
    after = world.run_state()
    fields = ("version", "global_key", "global_sha256", "buffer_key", "applied", "received", "rejected")
    assert {f: after[f] for f in fields} == {f: before[f] for f in fields}
    assert after["version"] == 2
