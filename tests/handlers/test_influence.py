"""Influence bounds through the real stream handlers: well-formed, finite updates that would steer
the model are refused (or capped) with their reason, and the run goes on without them."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from fedstream.handlers import aggregate, async_update

from fedstream.bounds import InfluenceBounds
from fedstream.local.logs import metric_counts
from fedstream.schemas import update_sort_key
from fedstream.weights import Weights, decode
from tests.handlers.conftest import FakeContext, SyncWorld, stream_event


def shifted(world: SyncWorld, by: float) -> Weights:
    return {name: (array + by).astype(array.dtype) for name, array in world.base.items()}


def rejections(capsys: pytest.CaptureFixture[str]) -> dict[str, int]:
    return metric_counts(capsys.readouterr().out, "UpdatesRejected", "reason")


def model(world: SyncWorld) -> tuple[int, Weights]:
    state = world.run_state()
    weights, _ = decode(world.store.get_bytes(state["global_key"]))
    return int(state["version"]), weights


def assert_shifted(weights: Weights, world: SyncWorld, shift: float) -> None:
    for name, array in world.base.items():
        np.testing.assert_allclose(weights[name], array + shift, rtol=1e-5, atol=1e-6)


# ---- sync ---------------------------------------------------------------------------------------


def test_an_inflated_example_count_is_capped_at_four_times_the_rounds_median(
    world: SyncWorld,
) -> None:
    # GIVEN a round where site-1 claims 10**9 examples for a plausible update (site-2: 30, site-3: 60)
    items = [
        world.record("site-1", shifted(world, -10.0), num_examples=10**9),
        world.record("site-2", shifted(world, 2.0), num_examples=30),
        world.record("site-3", shifted(world, 4.0), num_examples=60),
    ]

    # WHEN the round closes
    assert aggregate.lambda_handler(stream_event(*items), FakeContext()) == {"batchItemFailures": []}

    # THEN site-1 weighs as 4 x the median count (60): 240 examples, not 10**9
    version, weights = model(world)
    assert version == 1
    assert_shifted(weights, world, (-10.0 * 240 + 2.0 * 30 + 4.0 * 60) / (240 + 30 + 60))


def test_a_replayed_object_is_refused_in_a_later_round(
    world: SyncWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN round 1 closed with site-1's object X, and round 2 open on version 1
    first = [
        world.record(c, shifted(world, by), num_examples=10) for c, by in (("site-1", 1.0), ("site-2", 2.0))
    ]
    first.append(world.record("site-3", shifted(world, 3.0), num_examples=10))
    aggregate.lambda_handler(stream_event(*first), FakeContext())
    assert world.round_item(1)["status"] == "closed"
    open_round(world, 2, version=1)
    capsys.readouterr()

    # WHEN site-1 reports object X again for round 2 (a new record naming the old object)
    replayed = {
        **first[0],
        "round": 2,
        "base_version": 1,
        "update_id": update_sort_key(world.run_id, 1),
        "task_token": "token-round-2",
    }
    world.store_record(replayed)
    goods = [
        world.record(c, shifted(world, 5.0), version=1, round=2, task_token="token-round-2")
        for c in ("site-2", "site-3")
    ]
    assert aggregate.lambda_handler(stream_event(replayed, *goods), FakeContext()) == {
        "batchItemFailures": []
    }

    # THEN it is refused as a replay, and round 2 holds the other two (its deadline closes it)
    out = capsys.readouterr().out
    assert metric_counts(out, "UpdatesRejected", "reason") == {"replay": 1}
    assert "already sent object" in out and "round 1" in out
    assert sorted(world.round_item(2)["reported"]) == ["site-2", "site-3"]


def test_a_record_for_a_closed_round_is_refused_before_its_object_is_read(
    world: SyncWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a closed round
    items = [world.record(c, shifted(world, 1.0)) for c in ("site-1", "site-2", "site-3")]
    aggregate.lambda_handler(stream_event(*items), FakeContext())
    capsys.readouterr()

    # WHEN a late record names an object that is not even a model (it would fail the download's checks)
    late = world.record("site-1", b"\x80\x04not a model at all", round=1)
    aggregate.lambda_handler(stream_event(late), FakeContext())

    # THEN it is refused from the round's state alone: the object was never downloaded or parsed
    assert rejections(capsys) == {"round_closed": 1}


@pytest.mark.parametrize("aggregator", ["fedavg", "median", "krum"])
def test_a_sign_flipped_update_with_a_huge_example_count(
    world: SyncWorld, monkeypatch: pytest.MonkeyPatch, aggregator: str
) -> None:
    # GIVEN site-1 trains, then flips its delta x10 (-10 where honest clients move +2 and +4) and
    # claims 10**9 examples: in bounds (10 < 10 x the median norm 4), so neither refused nor ignored
    monkeypatch.setenv("FEDSTREAM_AGGREGATOR", aggregator)
    items = [
        world.record("site-1", shifted(world, -10.0), num_examples=10**9),
        world.record("site-2", shifted(world, 2.0), num_examples=30),
        world.record("site-3", shifted(world, 4.0), num_examples=60),
    ]

    # WHEN the round closes
    assert aggregate.lambda_handler(stream_event(*items), FakeContext()) == {"batchItemFailures": []}

    # THEN FedAvg follows the attacker as far as its capped count lets it (240 of 330 examples),
    # while median and Krum stay at an honest update's value (the run without the attacker: +3)
    version, weights = model(world)
    assert version == 1
    shift = float(np.mean(weights["dense/bias"] - world.base["dense/bias"]))
    if aggregator == "fedavg":
        assert shift == pytest.approx((-10.0 * 240 + 2.0 * 30 + 4.0 * 60) / 330, rel=1e-5)
    else:
        assert_shifted(weights, world, 2.0)
        assert abs(shift - 3.0) <= 1.0 + 1e-5


def open_round(world: SyncWorld, number: int, *, version: int) -> None:
    """What the state machine's OpenRound and the finalize function's token recording write."""
    world.store.runs.put_item(
        Item={
            "run_id": world.run_id,
            "sk": f"round#{number}",
            "round": number,
            "version": version,
            "status": "open",
            "reported_count": 0,
            "min_clients": 2,
            "opened_at": "2026-01-01T00:00:00+00:00",
            "task_token": f"token-round-{number}",
        }
    )


# ---- async --------------------------------------------------------------------------------------


def async_update_item(world: SyncWorld, client: str, base: int, by: float, **kw: Any) -> dict[str, Any]:
    return world.record(client, shifted(world, by), round=None, version=base, task_token=None, **kw)


def test_async_a_huge_delta_is_refused_once_the_run_has_a_reference(
    async_world: SyncWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN an async run that took three ordinary updates (delta norms of shift 1 from their base)
    world = async_world
    for version, client in enumerate(("site-1", "site-2", "site-3")):
        async_update.lambda_handler(
            stream_event(async_update_item(world, client, version, 1.0)), FakeContext()
        )
    before_version, before = model(world)
    assert before_version == 3
    capsys.readouterr()

    # WHEN site-1 sends a delta a million times larger, trained on the current version
    huge = world.record(
        "site-1",
        {name: (array + 1e6).astype(array.dtype) for name, array in before.items()},
        round=None,
        version=3,
        task_token=None,
    )
    assert async_update.lambda_handler(stream_event(huge), FakeContext()) == {"batchItemFailures": []}

    # THEN it is refused as norm_bound and the model is as it was
    out = capsys.readouterr().out
    assert metric_counts(out, "UpdatesRejected", "reason") == {"norm_bound": 1}
    assert "the median" in out
    version, weights = model(world)
    assert version == 3
    for name, array in before.items():
        np.testing.assert_array_equal(weights[name], array)
    assert len(world.run_state()["norms"]) == 3


def test_async_a_replayed_object_is_refused(
    async_world: SyncWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN site-1's update X applied at version 0 (which released site-1 at version 1)
    world = async_world
    first = async_update_item(world, "site-1", 0, 1.0)
    async_update.lambda_handler(stream_event(first), FakeContext())
    assert world.run_state()["released"]["site-1"] == 1
    capsys.readouterr()

    # WHEN site-1 sends X again as its update on version 1
    replayed = {**first, "base_version": 1, "update_id": update_sort_key(world.run_id, 1)}
    world.store_record(replayed)
    assert async_update.lambda_handler(stream_event(replayed), FakeContext()) == {"batchItemFailures": []}

    # THEN it is refused as a replay and nothing moved
    assert rejections(capsys) == {"replay": 1}
    assert model(world)[0] == 1


def test_a_runs_own_bounds_apply_over_the_deployments(
    async_world: SyncWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a run started with its own absolute bound (start_run(..., bounds=...) stores it)
    world = async_world
    own = InfluenceBounds(max_update_norm=0.5).model_dump_json(exclude_unset=True)
    world.store.conditional_update(
        {"run_id": world.run_id, "sk": "state"}, "SET bounds = :b", "attribute_exists(run_id)", {":b": own}
    )
    world.store.forget_run_state(world.run_id)

    # WHEN an update moves every weight by 1 (a delta norm far above 0.5), and one by 1e-3
    big, small = async_update_item(world, "site-1", 0, 1.0), async_update_item(world, "site-2", 0, 1e-3)
    async_update.lambda_handler(stream_event(big, small), FakeContext())

    # THEN the first is refused by the run's bound and the second applied
    out = capsys.readouterr().out
    assert metric_counts(out, "UpdatesRejected", "reason") == {"norm_bound": 1}
    assert "max_update_norm 0.5" in out
    assert world.run_state()["applied"] == 1


def test_a_sync_runs_own_bounds_apply_over_the_deployments(
    world: SyncWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a sync run whose input set its own absolute bound (InitRun stores it on the run state)
    own = InfluenceBounds(max_update_norm=1.0).model_dump_json(exclude_unset=True)
    world.store.conditional_update(
        {"run_id": world.run_id, "sk": "state"}, "SET bounds = :b", "attribute_exists(run_id)", {":b": own}
    )
    # WHEN a round brings one update moving every weight by 1 and two moving them by 1e-3
    items = [
        world.record("site-1", shifted(world, 1.0)),
        world.record("site-2", shifted(world, 1e-3)),
        world.record("site-3", shifted(world, 1e-3)),
    ]
    aggregate.lambda_handler(stream_event(*items), FakeContext())

    # THEN the first is left out by the run's bound and the round closes with the other two
    out = capsys.readouterr().out
    assert metric_counts(out, "UpdatesRejected", "reason") == {"norm_bound": 1}
    assert model(world)[0] == 1 and "max_update_norm 1" in out
