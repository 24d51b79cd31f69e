"""dp-noise in async mode: FedBuff's buffer of clipped deltas, noised at each server step, with the
accountant counting server steps and the budget ending the run."""

from __future__ import annotations

import numpy as np
import pytest
from fedstream.plugins.dp_noise import epsilon_for
from fedstream.plugins.fedbuff import staleness_weight

from fedstream.aggregation import AggregationError, AggregatorState, ClientUpdate, PrivacyBudgetExhausted
from fedstream.registry import PluginError, build_registry

SHAPE = (3, 2)


@pytest.fixture(scope="module")
def registry():
    return build_registry()


def dp(registry, seed=0, **params):
    merged = {"clip_norm": 1.0, "noise_multiplier": 0.0, "inner.buffer_size": 2, **params}
    return registry.create("dp-noise", merged, seed=seed, mode="async")


def update(client, base, moved_by, version=0):
    return ClientUpdate(client, {"w": (base["w"] + moved_by).astype(np.float32)}, 10, {}, version, base)


def clipped(d, c):
    n = np.linalg.norm(d)
    return d * min(1.0, c / n)


def test_a_server_step_is_fedbuffs_step_on_clipped_deltas_plus_noise_of_z_c_on_the_sum(registry):
    rng = np.random.default_rng(5)
    base = {"w": rng.normal(size=SHAPE).astype(np.float32)}
    d1, d2 = rng.normal(scale=3.0, size=SHAPE), rng.normal(scale=0.1, size=SHAPE)  # one clipped, one not
    agg = dp(registry, seed=11, noise_multiplier=0.7, clip_norm=0.5, **{"inner.server_lr": 0.8})

    # WHEN two updates fill the buffer (K = 2), the second one 1 version stale
    first = agg.apply_async(base, update("a", base, d1), staleness=0, state=None)
    second = agg.apply_async(base, update("b", base, d2), staleness=1, state=first.state)

    # THEN the first is only buffered; the step is x + lr/K * (sum of s(tau) * clipped deltas + N(0, (zC)^2))
    assert first.weights is None and first.metrics["clipped"] == 1.0
    total = clipped(d1, 0.5) * staleness_weight(0) + clipped(d2, 0.5) * staleness_weight(1)
    noise = np.random.default_rng(11).normal(0.0, 0.7 * 0.5 * 0.8 / 2, size=SHAPE)
    expected = base["w"].astype(np.float64) + 0.8 / 2 * total + noise
    np.testing.assert_allclose(second.weights["w"], expected.astype(np.float32), rtol=1e-5, atol=1e-6)
    assert second.metrics["server_steps"] == 1.0
    assert second.metrics["epsilon"] == pytest.approx(epsilon_for(0.7, 1.0, 1, 1e-5))


def test_the_accountant_counts_server_steps_and_the_budget_stops_the_run(registry):
    base = {"w": np.zeros(SHAPE, np.float32)}
    budget = (epsilon_for(1.0, 1.0, 3, 1e-5) + epsilon_for(1.0, 1.0, 4, 1e-5)) / 2  # 3 steps fit, not 4
    agg = dp(registry, noise_multiplier=1.0, epsilon_budget=budget, **{"inner.buffer_size": 1})
    state, stops, epsilons = None, [], []
    for step in range(3):
        result = agg.apply_async(base, update(f"c{step}", base, 0.1), staleness=0, state=state)
        state, base = result.state, result.weights
        stops.append(result.stop)
        epsilons.append(result.metrics["epsilon"])
    # THEN epsilon grows with the steps, and the third (the last that fits) says stop
    assert epsilons == [pytest.approx(epsilon_for(1.0, 1.0, k, 1e-5)) for k in (1, 2, 3)]
    assert stops == [False, False, True]
    # and an update that arrives anyway is refused, not applied
    with pytest.raises(PrivacyBudgetExhausted):
        agg.apply_async(base, update("late", base, 0.1), staleness=0, state=state)


def test_a_client_has_at_most_one_update_in_a_buffer(registry):
    base = {"w": np.zeros(SHAPE, np.float32)}
    agg = dp(registry, **{"inner.buffer_size": 3})
    first = agg.apply_async(base, update("a", base, 0.1), staleness=0, state=None)
    with pytest.raises(AggregationError) as refused:
        agg.apply_async(base, update("a", base, 0.2), staleness=0, state=first.state)
    assert refused.value.reason == "dp_one_per_buffer"
    # after a step the client may contribute again
    second = agg.apply_async(base, update("b", base, 0.1), staleness=0, state=first.state)
    third = agg.apply_async(base, update("c", base, 0.1), staleness=0, state=second.state)
    assert third.weights is not None
    again = agg.apply_async(third.weights, update("a", third.weights, 0.1, 1), staleness=0, state=third.state)
    assert again.weights is None and isinstance(again.state, AggregatorState)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"inner": "fedasync"}, "inner must be fedbuff"),
        ({"inner": "fedavg"}, "inner must be fedbuff"),
        ({"adaptive": True}, "adaptive clipping runs in sync mode only"),
    ],
)
def test_async_dp_noise_refuses_what_it_cannot_account_for(registry, params, message):
    with pytest.raises(PluginError, match=message):
        registry.create("dp-noise", {"clip_norm": 1.0, "noise_multiplier": 1.0, **params}, mode="async")


def test_without_noise_and_with_a_large_clip_norm_it_is_fedbuff(registry):
    rng = np.random.default_rng(2)
    base = {"w": rng.normal(size=SHAPE).astype(np.float32)}
    deltas = [rng.normal(scale=0.1, size=SHAPE) for _ in range(4)]
    fedbuff = registry.create("fedbuff", {"buffer_size": 2}, mode="async")
    ours = dp(registry, clip_norm=1e6)
    states = {"fedbuff": None, "dp": None}
    for n, d in enumerate(deltas):
        a = fedbuff.apply_async(base, update(f"c{n}", base, d), staleness=n % 2, state=states["fedbuff"])
        b = ours.apply_async(base, update(f"c{n}", base, d), staleness=n % 2, state=states["dp"])
        states = {"fedbuff": a.state, "dp": b.state}
        assert (a.weights is None) == (b.weights is None)
        if a.weights is not None:
            np.testing.assert_allclose(b.weights["w"], a.weights["w"], rtol=1e-6)
