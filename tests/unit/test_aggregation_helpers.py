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
