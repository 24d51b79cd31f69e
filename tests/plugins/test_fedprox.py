"""FedProx (Li et al. 2020): FedAvg on the server, the proximal term mu handed to clients."""

from __future__ import annotations

import numpy as np
import pytest

from fedstream.aggregation import ClientUpdate, RoundContext
from fedstream.registry import PluginError, build_registry, get_plugin_manager


@pytest.fixture(scope="module")
def registry():
    return build_registry(get_plugin_manager(plugin_dirs=[]))


def test_fedprox_hands_mu_to_clients(registry):
    assert registry.create("fedprox", {"mu": 0.1}).client_settings() == {"proximal_mu": 0.1}
    assert registry.create("fedprox").client_settings() == {"proximal_mu": 0.01}


def test_fedprox_aggregates_exactly_like_fedavg(registry):
    rng = np.random.default_rng(3)
    global_weights = {"w": rng.normal(size=(3, 2)).astype(np.float32)}
    updates = [
        ClientUpdate(f"c{i}", {"w": rng.normal(size=(3, 2)).astype(np.float32)}, int(rng.integers(1, 50)))
        for i in range(5)
    ]
    results = []
    for name in ("fedprox", "fedavg"):
        aggregator = registry.create(name)
        aggregator.begin(global_weights, RoundContext(round=1))
        for u in updates:
            aggregator.accept(u)
        results.append(aggregator.finish())

    np.testing.assert_array_equal(results[0].weights["w"], results[1].weights["w"])
    n = np.array([u.num_examples for u in updates], np.float64)
    expected = (
        np.tensordot(n, np.stack([u.weights["w"] for u in updates]).astype(np.float64), axes=1) / n.sum()
    )
    np.testing.assert_allclose(results[0].weights["w"], expected, rtol=1e-6)


def test_negative_mu_is_refused_with_the_parameter_named(registry):
    with pytest.raises(PluginError, match="mu"):
        registry.create("fedprox", {"mu": -1})
