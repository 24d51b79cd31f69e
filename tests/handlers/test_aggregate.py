"""The sync aggregate handler with sample stream events against a moto server."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
from fedstream.handlers import aggregate

from fedstream import keys
from fedstream.aggregation import AggregationError
from fedstream.bounds import InfluenceBounds
from fedstream.local.logs import metric_counts
from fedstream.registry import default_registry
from fedstream.server import sync
from fedstream.server.store import Store
from fedstream.weights import decode
from tests.handlers.conftest import FakeContext, SyncWorld, stream_event


def emf_rejections(text: str) -> dict[str, int]:
    return metric_counts(text, "UpdatesRejected", "reason")


def scaled(world: SyncWorld, factor: float) -> dict[str, np.ndarray]:
    return {name: (array + factor).astype(array.dtype) for name, array in world.base.items()}


def global_version(world: SyncWorld, version: int) -> dict[str, np.ndarray]:
    body = world.aws.client("s3").get_object(
        Bucket=world.resources.bucket, Key=keys.global_key(world.run_id, version)
    )
    weights, _ = decode(body["Body"].read())
    return weights


def good_items(world: SyncWorld) -> list[dict[str, Any]]:
    return [
        world.record("site-1", scaled(world, 1.0), num_examples=10),
        world.record("site-2", scaled(world, 2.0), num_examples=30),
        world.record("site-3", scaled(world, 4.0), num_examples=60),
    ]


def expected_mean(world: SyncWorld) -> dict[str, np.ndarray]:
    shift = (1.0 * 10 + 2.0 * 30 + 4.0 * 60) / 100
    return {name: array + shift for name, array in world.base.items()}


def test_a_complete_round_is_aggregated_into_version_1(
    world: SyncWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN three clients' updates for round 1  WHEN their records arrive in one batch
    response = aggregate.lambda_handler(stream_event(*good_items(world)), FakeContext())

    # THEN no record fails, the round is closed, and version 1 is the example-weighted mean
    assert response == {"batchItemFailures": []}
    assert world.round_item()["status"] == "closed"
    state = world.run_state()
    assert state["version"] == 1 and state["global_key"] == keys.global_key(world.run_id, 1)
    for name, array in expected_mean(world).items():
        np.testing.assert_allclose(global_version(world, 1)[name], array, rtol=1e-6)
    logs = capsys.readouterr().out
    assert '"RoundCompleted"' in logs and '"message":"round closed"' in logs
    assert '"run_id":"run-1"' in logs


def test_a_redelivered_batch_changes_nothing(world: SyncWorld, capsys: pytest.CaptureFixture[str]) -> None:
    items = good_items(world)
    aggregate.lambda_handler(stream_event(*items), FakeContext())
    first = global_version(world, 1)
    capsys.readouterr()

    response = aggregate.lambda_handler(stream_event(*items), FakeContext())

    assert response == {"batchItemFailures": []}
    assert world.run_state()["version"] == 1
    assert world.round_item()["reported_count"] == 3
    for name in first:
        np.testing.assert_array_equal(global_version(world, 1)[name], first[name])
    # each record is recognised as the report already registered, though the round has closed
    assert emf_rejections(capsys.readouterr().out) == {"duplicate": 3}


def test_a_duplicate_within_the_round_is_counted_once(
    world: SyncWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    first = world.record("site-1", scaled(world, 1.0))
    aggregate.lambda_handler(stream_event(first, first), FakeContext())
    assert world.round_item()["reported_count"] == 1
    assert emf_rejections(capsys.readouterr().out) == {"duplicate": 1}


def _bad_cases(world: SyncWorld) -> dict[str, dict[str, Any]]:
    wrong_shape = {"dense/kernel": np.zeros((3, 4), np.float32), "dense/bias": np.zeros(3, np.float32)}
    nan = scaled(world, 1.0)
    nan["dense/bias"][0] = np.nan
    other_key, other_sha = world.upload("site-2", scaled(world, 9.0))
    missing = world.record("site-1", scaled(world, 1.0))
    missing["object_key"] = keys.update_key(world.run_id, "site-1", 0, "gone")
    malformed = world.record("site-1", scaled(world, 1.0))
    del malformed["num_examples"]
    return {
        "tensor_shape": world.record("site-1", wrong_shape),
        "non_finite": world.record("site-1", _nan_bytes(nan)),
        "foreign_object_key": world.record(
            "site-1", scaled(world, 1.0), object_key=other_key, sha256=other_sha
        ),
        "missing_object": missing,
        "malformed_record": malformed,
        "unknown_client": world.record("site-9", scaled(world, 1.0)),
        "sha256_mismatch": world.record("site-1", scaled(world, 1.0), sha256="0" * 64),
        "not_safetensors": world.record("site-1", b"\x80\x04\x95pickle payload, never loaded"),
    }


def _nan_bytes(weights: dict[str, np.ndarray]) -> bytes:
    """safetensors bytes holding a NaN (encode() itself refuses to write one)."""
    from safetensors.numpy import save

    return save(weights)


@pytest.mark.parametrize(
    "reason",
    [
        "tensor_shape",
        "non_finite",
        "foreign_object_key",
        "missing_object",
        "malformed_record",
        "unknown_client",
        "sha256_mismatch",
        "not_safetensors",
    ],
)
def test_a_bad_update_is_rejected_with_its_reason_and_the_round_completes(
    world: SyncWorld, capsys: pytest.CaptureFixture[str], reason: str
) -> None:
    # GIVEN a bad record ahead of three good ones in one batch
    bad = _bad_cases(world)[reason]
    capsys.readouterr()

    response = aggregate.lambda_handler(stream_event(bad, *good_items(world)), FakeContext())

    # THEN the bad one is rejected with its reason (log + metric), not retried, and the round
    # closes with the good updates only
    assert response == {"batchItemFailures": []}
    out = capsys.readouterr().out
    assert emf_rejections(out) == {reason: 1}
    assert f'"reason":"{reason}"' in out
    assert world.round_item()["status"] == "closed"
    for name, array in expected_mean(world).items():
        np.testing.assert_allclose(global_version(world, 1)[name], array, rtol=1e-6)


def test_an_update_for_a_closed_round_is_rejected(
    world: SyncWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    aggregate.lambda_handler(stream_event(*good_items(world)), FakeContext())
    capsys.readouterr()
    late = world.record("site-1", scaled(world, 5.0), num_examples=1)
    late["update_id"] = late["update_id"]  # same round, after it closed
    aggregate.lambda_handler(stream_event(late), FakeContext())
    assert emf_rejections(capsys.readouterr().out) == {"round_closed": 1}
    assert world.run_state()["version"] == 1


def test_two_concurrent_invocations_aggregate_a_complete_round_once(world: SyncWorld) -> None:
    # GIVEN a round whose three reports are all registered
    store = world.store
    for item in good_items(world):
        sync.register_report(store, world.settings, sync.parse_record(item))
    results: list[Any] = []

    def close() -> None:
        own_store = Store(world.settings, world.aws.session())
        results.append(
            sync.close_round(own_store, world.settings, default_registry(), world.run_id, 1, min_reports=3)
        )

    # WHEN two invocations try to close it at the same time
    threads = [threading.Thread(target=close) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # THEN exactly one aggregated, and the global pointer moved exactly once
    closed = [r for r in results if r is not None]
    assert len(closed) == 1 and closed[0].version == 1
    assert world.run_state()["version"] == 1
    listed = world.aws.client("s3").list_objects_v2(
        Bucket=world.resources.bucket, Prefix=f"runs/{world.run_id}/global/"
    )
    assert sorted(o["Key"] for o in listed["Contents"]) == [keys.global_key(world.run_id, v) for v in (0, 1)]


def test_the_close_aggregates_the_object_version_registration_checked(world: SyncWorld) -> None:
    # GIVEN three registered reports
    items = good_items(world)
    for item in items:
        sync.register_report(world.store, world.settings, sync.parse_record(item))
    # WHEN a client overwrites its update with NaNs after it was registered
    world.put_object(items[1]["object_key"], _nan_bytes(world.base))
    closed = sync.close_round(world.store, world.settings, default_registry(), world.run_id, 1, min_reports=3)

    # THEN the close reads the version that was checked: all three count, and the mean is theirs
    assert closed is not None and closed.clients == ["site-1", "site-2", "site-3"]
    for name, array in expected_mean(world).items():
        np.testing.assert_allclose(global_version(world, 1)[name], array, rtol=1e-6)


def test_an_update_far_beyond_the_rounds_median_norm_is_left_out_and_the_round_closes(
    world: SyncWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN two honest reports and one of finite weights of 3e38 with 2 examples, whose float32
    # example-weighted sum would overflow
    honest = good_items(world)[:2]
    huge = {name: np.full_like(array, 3e38) for name, array in world.base.items()}
    items = [*honest, world.record("site-3", huge, num_examples=2)]

    # WHEN their records arrive
    response = aggregate.lambda_handler(stream_event(*items), FakeContext())

    # THEN the round closes with the honest two; the third is refused with its reason, logged and counted
    assert response == {"batchItemFailures": []}
    assert world.round_item()["status"] == "closed"
    shift = (1.0 * 10 + 2.0 * 30) / 40
    for name, array in world.base.items():
        np.testing.assert_allclose(global_version(world, 1)[name], array + shift, rtol=1e-6)
    logs = capsys.readouterr().out
    assert emf_rejections(logs) == {"norm_bound": 1}
    assert '"client_id":"site-3"' in logs and "the median" in logs


def test_without_bounds_an_update_that_would_overflow_the_sum_is_left_out(world: SyncWorld) -> None:
    # GIVEN influence bounds off, and two honest reports besides one of weights 3e38 with 2 examples
    settings = world.settings.model_copy(update={"bounds": InfluenceBounds.off()})
    huge = {name: np.full_like(array, 3e38) for name, array in world.base.items()}
    for item in [*good_items(world)[:2], world.record("site-3", huge, num_examples=2)]:
        sync.register_report(world.store, settings, sync.parse_record(item))

    # WHEN the round closes
    closed = sync.close_round(world.store, settings, default_registry(), world.run_id, 1, min_reports=3)

    # THEN the update that would overflow the float32 sum is refused, and the round closes with the rest
    assert closed is not None and closed.clients == ["site-1", "site-2"]
    assert closed.skipped == {"site-3": "non_finite"} and "overflow" in closed.skipped_why["site-3"]
    shift = (1.0 * 10 + 2.0 * 30) / 40
    for name, array in world.base.items():
        np.testing.assert_allclose(global_version(world, 1)[name], array + shift, rtol=1e-6)


def test_a_round_with_no_update_in_bounds_fails_with_its_reason(world: SyncWorld) -> None:
    # GIVEN three updates of 3e38, each of which alone would overflow the sum
    huge = {name: np.full_like(array, 3e38) for name, array in world.base.items()}
    for client in ("site-1", "site-2", "site-3"):
        item = world.record(client, huge, num_examples=10)
        sync.register_report(world.store, world.settings, sync.parse_record(item))

    # WHEN the round closes  THEN it fails, naming the reason, and no version is published
    with pytest.raises(AggregationError) as rejected:
        sync.close_round(world.store, world.settings, default_registry(), world.run_id, 1, min_reports=3)
    assert rejected.value.reason == "no_updates"
    assert world.round_item()["status"] == "failed"
    assert "non_finite" in world.round_item()["failure"]
    assert world.run_state()["version"] == 0
