"""FedAsync (Xie et al. 2019): x_t = (1 - a_t) x_{t-1} + a_t x_new with a_t = alpha * s(staleness)."""

from __future__ import annotations

import numpy as np
import pytest

from fedstream.aggregation import ClientUpdate
from fedstream.registry import PluginError, build_registry, get_plugin_manager


@pytest.fixture(scope="module")
def registry():
    return build_registry(get_plugin_manager(plugin_dirs=[]))


CURRENT = {"w": np.array([0.0, 10.0], np.float32), "b": np.array([1.0], np.float16)}
NEW = {"w": np.array([10.0, 0.0], np.float32), "b": np.array([3.0], np.float16)}


def apply(aggregator, staleness: int):
    return aggregator.apply_async(CURRENT, ClientUpdate("c", NEW, 10), staleness=staleness)


@pytest.mark.parametrize(
    ("params", "staleness", "mixing"),
    [
        ({"staleness_function": "constant", "alpha": 0.6}, 7, 0.6),
        ({"staleness_function": "polynomial", "alpha": 0.6, "a": 0.5}, 0, 0.6),
        ({"staleness_function": "polynomial", "alpha": 0.6, "a": 0.5}, 3, 0.6 * 4**-0.5),  # 0.3
        ({"staleness_function": "polynomial", "alpha": 0.8, "a": 1.0}, 4, 0.8 / 5),
        ({"staleness_function": "hinge", "alpha": 0.5, "a": 0.5, "b": 4}, 4, 0.5),  # tau <= b: s = 1
        ({"staleness_function": "hinge", "alpha": 0.5, "a": 0.5, "b": 4}, 6, 0.5 / (0.5 * 2 + 1)),  # 0.25
        ({"staleness_function": "hinge", "alpha": 1.0, "a": 2.0, "b": 1}, 3, 1 / 5),
    ],
)
def test_mixing_weight_follows_the_staleness_function(registry, params, staleness, mixing):
    result = apply(registry.create("fedasync", params), staleness)

    assert result.metrics == {"mixing_weight": pytest.approx(mixing), "staleness": staleness}
    np.testing.assert_allclose(result.weights["w"], [10 * mixing, 10 * (1 - mixing)], rtol=1e-6)
    np.testing.assert_allclose(result.weights["b"], [1 + 2 * mixing], rtol=1e-3)
    assert result.state is None


def test_default_is_polynomial_with_alpha_0_6_and_a_0_5(registry):
    result = apply(registry.create("fedasync"), 8)
    assert result.metrics["mixing_weight"] == pytest.approx(0.6 / 3)  # 0.6 * (1 + 8)^-0.5


def test_result_keeps_dtypes_and_inputs_are_untouched(registry):
    result = apply(registry.create("fedasync"), 0)

    assert {k: v.dtype for k, v in result.weights.items()} == {"w": np.float32, "b": np.float16}
    np.testing.assert_array_equal(CURRENT["w"], [0.0, 10.0])


def test_max_staleness_is_a_parameter_the_host_judges(registry):
    # (the host refuses staler updates before apply_async: tests/unit/test_host.py)
    aggregator = registry.create("fedasync", {"max_staleness": 3})
    assert aggregator.max_staleness == 3
    assert apply(aggregator, 3).weights is not None


def test_default_max_staleness_is_50(registry):
    assert registry.create("fedasync").max_staleness == 50


def test_fedasync_is_async_only_and_validates_its_parameters(registry):
    with pytest.raises(PluginError, match="async"):
        registry.create("fedasync", mode="sync")
    with pytest.raises(PluginError, match="alpha"):
        registry.create("fedasync", {"alpha": 1.5})
    with pytest.raises(PluginError, match="staleness_function"):
        registry.create("fedasync", {"staleness_function": "exponential"})
