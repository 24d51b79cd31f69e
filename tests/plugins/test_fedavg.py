"""FedAvg (McMahan et al. 2017): the example-weighted mean of client weights."""

from __future__ import annotations

import numpy as np
import pytest

from fedstream.aggregation import AggregationError, ClientUpdate, RoundContext
from fedstream.registry import build_registry, get_plugin_manager


@pytest.fixture(scope="module")
def registry():
    return build_registry(get_plugin_manager(plugin_dirs=[]))


GLOBAL = {"w": np.zeros((2, 2), np.float32), "b": np.zeros(2, np.float32)}


def update(client: str, w: list, b: list, n: int, **metrics: float) -> ClientUpdate:
    return ClientUpdate(
        client, {"w": np.array(w, np.float32), "b": np.array(b, np.float32)}, num_examples=n, metrics=metrics
    )


def run_round(aggregator, updates):
    aggregator.begin(GLOBAL, RoundContext(round=1))
    for u in updates:
        aggregator.accept(u)
    return aggregator.finish()


def test_fedavg_weights_clients_by_their_examples(registry):
    # GIVEN client A (1 example) and client B (3 examples)
    updates = [
        update("a", [[1, 2], [3, 4]], [1, 0], 1, train_loss=2.0),
        update("b", [[5, 6], [7, 8]], [0, 1], 3, train_loss=1.0),
    ]

    result = run_round(registry.create("fedavg"), updates)

    # THEN w = (1*A + 3*B) / 4, in the model's dtype
    np.testing.assert_allclose(result.weights["w"], [[4.0, 5.0], [6.0, 7.0]])
    np.testing.assert_allclose(result.weights["b"], [0.25, 0.75])
    assert result.weights["w"].dtype == np.float32
    assert result.metrics == {"train_loss": pytest.approx(1.25), "num_clients": 2.0, "num_examples": 4.0}
    assert result.stop is False


def test_unweighted_fedavg_is_the_plain_mean(registry):
    updates = [update("a", [[1, 2], [3, 4]], [1, 0], 1), update("b", [[5, 6], [7, 8]], [0, 1], 3)]

    result = run_round(registry.create("fedavg", {"weighted": False}), updates)

    np.testing.assert_allclose(result.weights["w"], [[3.0, 4.0], [5.0, 6.0]])
    np.testing.assert_allclose(result.weights["b"], [0.5, 0.5])


def test_each_round_starts_from_an_empty_sum(registry):
    aggregator = registry.create("fedavg")
    run_round(aggregator, [update("a", [[9, 9], [9, 9]], [9, 9], 10)])

    result = run_round(aggregator, [update("b", [[1, 1], [1, 1]], [1, 1], 1)])

    np.testing.assert_allclose(result.weights["w"], np.ones((2, 2)))


def test_a_round_without_updates_is_an_error(registry):
    aggregator = registry.create("fedavg")
    aggregator.begin(GLOBAL, RoundContext(round=1))
    with pytest.raises(AggregationError) as info:
        aggregator.finish()
    assert info.value.reason == "no_updates"


def test_fedavg_has_no_client_settings_and_runs_sync_only(registry):
    assert registry.create("fedavg").client_settings() == {}
    assert registry.info("fedavg").modes == frozenset({"sync"})
