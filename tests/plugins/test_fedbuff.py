"""FedBuff (Nguyen et al. 2022): buffer K staleness-weighted deltas, then one server step."""

from __future__ import annotations

import numpy as np
import pytest

from fedstream.aggregation import AggregationError, AsyncState, ClientUpdate
from fedstream.registry import build_registry, get_plugin_manager
from fedstream.weights import decode, encode


@pytest.fixture(scope="module")
def registry():
    return build_registry(get_plugin_manager(plugin_dirs=[]))


def model(*values: float) -> dict[str, np.ndarray]:
    return {"w": np.array(values, np.float32)}


# Three clients trained from different versions; their deltas from their bases are
# (1, 0), (0, 2) and (3, 3), with staleness 0, 3 and 8.
BASE_OLD, BASE_NEW = model(1.0, 1.0), model(2.0, 2.0)
UPDATES = [
    (ClientUpdate("a", model(3.0, 2.0), 10, base_weights=BASE_NEW), 0),
    (ClientUpdate("b", model(1.0, 3.0), 10, base_weights=BASE_OLD), 3),
    (ClientUpdate("c", model(4.0, 4.0), 10, base_weights=BASE_OLD), 8),
]


def test_updates_are_buffered_until_k_arrive_then_one_step_is_taken(registry):
    aggregator = registry.create("fedbuff", {"buffer_size": 3, "server_lr": 0.5})
    current = model(10.0, 20.0)  # the newest global, not any client's base
    state = None
    results = []
    for update, staleness in UPDATES:
        result = aggregator.apply_async(current, update, staleness=staleness, state=state)
        results.append(result)
        state = result.state

    # THEN nothing is published for the first two; the buffer fills 1, 2
    assert [r.weights for r in results[:2]] == [None, None]
    assert [r.metrics["buffer_fill"] for r in results[:2]] == [1.0, 2.0]
    assert [r.state.values["count"] for r in results[:2]] == [1, 2]
    # AND the third applies x + eta * sum(s_i d_i) / K with s = (1 + tau)^-1/2, and empties the buffer
    s = [1.0, 1 / 2, 1 / 3]
    step = s[0] * np.array([1.0, 0.0]) + s[1] * np.array([0.0, 2.0]) + s[2] * np.array([3.0, 3.0])
    np.testing.assert_allclose(results[2].weights["w"], [10.0, 20.0] + 0.5 * step / 3, rtol=1e-6)
    assert results[2].weights["w"].dtype == np.float32
    assert results[2].state is None
    assert results[2].metrics["applied_updates"] == 3.0


def test_buffer_holds_the_staleness_weighted_sum_in_float64(registry):
    aggregator = registry.create("fedbuff", {"buffer_size": 5})
    current = model(0.0, 0.0)

    first = aggregator.apply_async(current, UPDATES[0][0], staleness=0)
    second = aggregator.apply_async(current, UPDATES[1][0], staleness=3, state=first.state)

    assert second.state.arrays["w"].dtype == np.float64
    np.testing.assert_allclose(second.state.arrays["w"], [1.0, 0.0 + 2.0 / 2])
    assert second.metrics["staleness_weight"] == pytest.approx(0.5)
    # the earlier state was not modified in place
    np.testing.assert_allclose(first.state.arrays["w"], [1.0, 0.0])


def test_state_survives_a_round_trip_through_the_wire_format(registry):
    # GIVEN the host persists the buffer as safetensors bytes + an item between two invocations
    aggregator = registry.create("fedbuff", {"buffer_size": 2, "server_lr": 1.0})
    current = model(5.0, 5.0)
    first = aggregator.apply_async(current, UPDATES[1][0], staleness=3)
    arrays, _ = decode(encode(first.state.arrays))
    restored = AsyncState(arrays=arrays, values=dict(first.state.values))

    # WHEN a fresh aggregator (a new Lambda) continues from the restored state
    fresh = registry.create("fedbuff", {"buffer_size": 2, "server_lr": 1.0})
    after_trip = fresh.apply_async(current, UPDATES[0][0], staleness=0, state=restored)
    direct = aggregator.apply_async(current, UPDATES[0][0], staleness=0, state=first.state)

    # THEN the result is the same as without the trip: 5 + (0.5 * (0, 2) + (1, 0)) / 2
    np.testing.assert_array_equal(after_trip.weights["w"], direct.weights["w"])
    np.testing.assert_allclose(after_trip.weights["w"], [5.5, 5.5])


def test_update_without_base_weights_is_refused(registry):
    aggregator = registry.create("fedbuff")
    with pytest.raises(AggregationError) as info:
        aggregator.apply_async(model(0.0, 0.0), ClientUpdate("x", model(1.0, 1.0), 1), staleness=0)
    assert info.value.reason == "missing_base_weights"


def test_a_mismatched_state_is_refused(registry):
    # (staleness is the host's to judge: tests/unit/test_host.py)
    aggregator = registry.create("fedbuff", {"max_staleness": 2})
    assert aggregator.max_staleness == 2
    wrong = AsyncState(arrays={"other": np.zeros(2)}, values={"count": 1})
    with pytest.raises(AggregationError) as info:
        aggregator.apply_async(model(0.0, 0.0), UPDATES[0][0], staleness=0, state=wrong)
    assert info.value.reason == "bad_state"


def test_defaults(registry):
    info = {p["name"]: p["default"] for p in registry.info("fedbuff").parameters()}
    assert info == {"buffer_size": None, "server_lr": 1.0, "max_staleness": 50}
    assert registry.info("fedbuff").modes == frozenset({"async"})


@pytest.mark.parametrize(("clients", "buffer_size"), [(None, 3), (2, 1), (4, 2), (10, 5), (200, 10)])
def test_the_default_buffer_is_half_the_clients_between_1_and_10(registry, clients, buffer_size):
    aggregator = registry.create("fedbuff", num_clients=clients)
    # and it needs one client more than its buffer: one refused update must not stall the run
    assert (aggregator.buffer_size, aggregator.min_clients) == (buffer_size, buffer_size + 1)
    assert registry.create("fedbuff", {"buffer_size": 7}, num_clients=clients).buffer_size == 7


def test_an_update_that_would_make_the_step_overflow_is_refused_before_it_is_buffered(registry):
    # GIVEN a global model near float32's limit and one client's finite but huge update
    aggregator = registry.create("fedbuff", {"buffer_size": 2, "server_lr": 1.0})
    current, base = model(3e38, 0.0), model(0.0, 0.0)
    huge = ClientUpdate("bad", model(3.4e38, 0.0), 10, base_weights=base)

    # WHEN it arrives, THEN it is refused: x + delta / 2 = 4.7e38 would overflow float32
    with pytest.raises(AggregationError) as info:
        aggregator.apply_async(current, huge, staleness=0)
    assert info.value.reason == "non_finite" and "'bad'" in str(info.value)

    # AND the buffer it would have poisoned still takes honest updates and steps
    first = aggregator.apply_async(
        current, ClientUpdate("a", model(1.0, 2.0), 10, base_weights=base), staleness=0
    )
    second = aggregator.apply_async(
        current, ClientUpdate("b", model(3.0, 4.0), 10, base_weights=base), staleness=0, state=first.state
    )
    assert second.weights is not None
    np.testing.assert_allclose(second.weights["w"], [3e38 + 2.0, 3.0], rtol=1e-6)
