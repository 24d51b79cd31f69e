"""The streaming helpers every aggregator builds on, against the batch formulas."""

from __future__ import annotations

import numpy as np
import pytest

from fedstream.aggregation import AggregationError, MetricsMean, WeightedSum, cast_like, delta, global_norm


def test_streaming_weighted_sum_equals_the_batch_weighted_mean_for_mixed_dtypes():
    # GIVEN 7 client models whose tensors are float16, float32 and float64
    rng = np.random.default_rng(42)
    shapes = {"half": ((5, 3), np.float16), "single": ((4, 4), np.float32), "double": ((6,), np.float64)}
    clients = [
        {name: rng.normal(size=shape).astype(dtype) for name, (shape, dtype) in shapes.items()}
        for _ in range(7)
    ]
    examples = rng.integers(1, 1000, size=len(clients))

    # WHEN they stream through WeightedSum one at a time
    running = WeightedSum(clients[0])
    for weights, n in zip(clients, examples, strict=True):
        running.add(weights, float(n))
    mean = running.mean()

    # THEN each tensor equals sum(n_k w_k) / sum(n_k) in its own dtype
    assert running.count == 7
    assert running.total_weight == pytest.approx(examples.sum())
    for name, (_, dtype) in shapes.items():
        stacked = np.stack([c[name].astype(np.float64) for c in clients])
        expected = np.tensordot(examples, stacked, axes=1) / examples.sum()
        assert mean[name].dtype == dtype
        tolerance = {np.float16: 1e-3, np.float32: 1e-6, np.float64: 1e-12}[dtype]
        np.testing.assert_allclose(mean[name], expected.astype(dtype), rtol=tolerance, atol=tolerance)


def test_weighted_sum_does_not_modify_its_inputs():
    weights = {"w": np.array([1.0, 2.0], np.float32)}
    running = WeightedSum(weights)
    running.add(weights, 3.0)
    np.testing.assert_array_equal(weights["w"], [1.0, 2.0])


def test_weighted_sum_with_no_positive_weight_refuses_to_average():
    running = WeightedSum({"w": np.zeros(2, np.float32)})
    with pytest.raises(AggregationError) as info:
        running.mean()
    assert info.value.reason == "no_updates"


def test_metrics_mean_weights_each_metric_by_examples_and_skips_missing_or_nan():
    metrics = MetricsMean()
    metrics.add({"train_loss": 1.0, "eval_accuracy": 0.5}, 100)
    metrics.add({"train_loss": 4.0}, 300)
    metrics.add({"train_loss": float("nan"), "eval_accuracy": 0.9, "not_a_metric": 7.0}, 100)

    result = metrics.result()

    assert result["train_loss"] == pytest.approx((1.0 * 100 + 4.0 * 300) / 400)
    assert result["eval_accuracy"] == pytest.approx((0.5 * 100 + 0.9 * 100) / 200)
    assert "not_a_metric" not in result
    assert result["num_clients"] == 3
    assert result["num_examples"] == 500


def test_delta_norm_and_cast_helpers():
    base = {"a": np.array([1.0, 1.0], np.float32), "b": np.array([[0.0]], np.float16)}
    weights = {"a": np.array([4.0, 1.0], np.float32), "b": np.array([[4.0]], np.float16)}

    moved = delta(weights, base)

    np.testing.assert_array_equal(moved["a"], [3.0, 0.0])
    assert moved["a"].dtype == np.float64
    assert global_norm(moved) == pytest.approx(5.0)  # sqrt(3^2 + 4^2) across both tensors
    assert {k: v.dtype for k, v in cast_like(moved, base).items()} == {"a": np.float32, "b": np.float16}


def test_float32_sums_of_200_updates_stay_within_float32_roundings_of_a_float64_reference():
    # GIVEN 200 float32 updates of different scales and example counts from 1 to 5000
    rng = np.random.default_rng(7)
    clients = [rng.normal(size=20_000).astype(np.float32) * (1 + i % 5) for i in range(200)]
    examples = rng.integers(1, 5000, size=len(clients))

    # WHEN WeightedSum streams them (it sums float32 tensors in float32)
    running = WeightedSum({"w": clients[0]})
    for weights, n in zip(clients, examples, strict=True):
        running.add({"w": weights}, float(n))
    mean = running.mean()["w"]

    # THEN the mean is within 1e-6 of the inputs' largest magnitude (about 8 float32 epsilons) of
    # the float64 batch formula; cancellation makes relative error near zero meaningless.
    reference = np.tensordot(examples.astype(np.float64), np.stack(clients).astype(np.float64), axes=1)
    reference /= examples.sum()
    scale = max(float(np.abs(c).max()) for c in clients)
    assert mean.dtype == np.float32
    np.testing.assert_allclose(mean, reference, rtol=0, atol=1e-6 * scale)


def test_blocks_cover_every_value_of_tensors_larger_than_a_block(monkeypatch):
    # GIVEN blocks of 7 values and tensors of 50 values (7 full blocks and a remainder), 3 and a scalar
    monkeypatch.setattr(WeightedSum, "BLOCK", 7)
    rng = np.random.default_rng(3)
    clients = [
        {
            "big": rng.normal(size=(5, 10)).astype(np.float32),
            "small": rng.normal(size=3),
            "one": np.asarray(np.float32(i)),
        }
        for i in range(4)
    ]
    examples = [1.0, 2.0, 3.0, 4.0]

    running = WeightedSum(clients[0])
    for weights, n in zip(clients, examples, strict=True):
        running.add(weights, n)
    mean = running.mean()

    for name in clients[0]:
        expected = sum(n * c[name].astype(np.float64) for c, n in zip(clients, examples, strict=True)) / 10
        assert mean[name].shape == clients[0][name].shape
        np.testing.assert_allclose(mean[name], expected, rtol=1e-6, atol=1e-6)


def test_weighted_sum_can_be_asked_to_sum_float32_in_float64():
    big, small = np.array([1e8], np.float32), np.array([1.0], np.float32)
    running = WeightedSum({"w": big}, dtype=np.float64)
    for weights in (big, small, -big):
        running.add({"w": weights}, 1.0)
    # float32 sums would lose the 1.0 next to 1e8; float64 ones keep it (1/3 of it, as a mean).
    np.testing.assert_allclose(running.mean()["w"], [1 / 3], rtol=1e-6)
