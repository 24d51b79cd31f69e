"""dp-noise: DP-FedAvg (McMahan et al. 2018) with adaptive clipping (Andrew et al. 2021)."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp
from fedstream.plugins.dp_noise import epsilon_for, rounds_within_budget, update_noise_multiplier
from fedstream.plugins.fedavg import FedAvg, FedAvgParams

from fedstream import hookimpl
from fedstream.aggregation import ClientUpdate, PrivacyBudgetExhausted, RoundContext
from fedstream.registry import PluginError, build_registry, get_plugin_manager


@pytest.fixture(scope="module")
def registry():
    return build_registry(get_plugin_manager(plugin_dirs=[]))


def reference_epsilon(z: float, q: float, rounds: int, delta: float) -> float:
    """Written out independently of the plugin: the per-round event composed ``rounds`` times."""
    accountant = rdp.RdpAccountant()
    event = dp_accounting.GaussianDpEvent(z)
    if q < 1:
        event = dp_accounting.PoissonSampledDpEvent(q, event)
    accountant.compose(event, rounds)
    return accountant.get_epsilon(delta)


def run_round(aggregator, global_weights, client_weights, *, round=1, carry=None, examples=None):
    aggregator.begin(global_weights, RoundContext(round=round, carry=carry or {}))
    for i, weights in enumerate(client_weights):
        n = examples[i] if examples else 1
        aggregator.accept(ClientUpdate(f"c{i}", weights, n, metrics={"train_loss": float(i)}))
    return aggregator.finish()


def test_updates_are_clipped_to_c_and_averaged_unweighted_when_there_is_no_noise(registry):
    # GIVEN C = 1, no noise, a global model g and two clients:
    # A moves by (3, 4 | 0) (norm 5, clipped to (0.6, 0.8 | 0)), B by (0, 0 | 0.5) (norm 0.5, kept)
    g = {"w": np.array([1.0, 1.0], np.float32), "b": np.array([2.0], np.float32)}
    a = {"w": np.array([4.0, 5.0], np.float32), "b": np.array([2.0], np.float32)}
    b = {"w": np.array([1.0, 1.0], np.float32), "b": np.array([2.5], np.float32)}
    aggregator = registry.create("dp-noise", {"clip_norm": 1.0, "noise_multiplier": 0.0}, seed=0)

    # WHEN A reports 1000 examples and B 1
    result = run_round(aggregator, g, [a, b], examples=[1000, 1])

    # THEN each counts 1: g + ((0.6, 0.8 | 0) + (0, 0 | 0.5)) / 2
    np.testing.assert_allclose(result.weights["w"], [1.3, 1.4], rtol=1e-6)
    np.testing.assert_allclose(result.weights["b"], [2.25], rtol=1e-6)
    assert result.weights["w"].dtype == np.float32
    assert result.metrics["clipped_fraction"] == 0.5
    assert result.metrics["clip_norm"] == 1.0
    assert result.metrics["epsilon"] == math.inf  # z = 0 is not private
    # the training metrics are still weighted by the real example counts
    assert result.metrics["num_examples"] == 1001
    assert result.metrics["train_loss"] == pytest.approx(1 / 1001)
    assert result.carry == {"clip_norm": 1.0}


def test_noise_has_standard_deviation_z_c_over_m(registry):
    # GIVEN m = 4 clients that did not move the model, z = 1.5, C = 2: all that remains is noise
    g = {"w": np.zeros(100_000, np.float32), "v": np.zeros((100, 500), np.float64)}
    aggregator = registry.create("dp-noise", {"clip_norm": 2.0, "noise_multiplier": 1.5}, seed=7)

    result = run_round(aggregator, g, [g] * 4)

    expected = 1.5 * 2.0 / 4
    noise = np.concatenate([result.weights["w"].ravel(), result.weights["v"].ravel()]).astype(np.float64)
    assert noise.std() == pytest.approx(expected, rel=0.02)
    assert abs(noise.mean()) < 0.01
    assert result.weights["w"].dtype == np.float32


def test_noise_comes_only_from_the_injected_generator(registry):
    g = {"w": np.zeros(50, np.float64)}
    params = {"clip_norm": 1.0, "noise_multiplier": 1.0}
    first = run_round(registry.create("dp-noise", params, seed=11), g, [g])
    again = run_round(registry.create("dp-noise", params, seed=11), g, [g])
    other = run_round(registry.create("dp-noise", params, seed=12), g, [g])

    np.testing.assert_array_equal(first.weights["w"], again.weights["w"])
    assert not np.allclose(first.weights["w"], other.weights["w"])


@pytest.mark.parametrize(("z", "q", "rounds"), [(1.1, 0.1, 5), (0.8, 1.0, 3), (2.0, 0.01, 1000)])
def test_epsilon_matches_dp_accounting(registry, z, q, rounds):
    expected = reference_epsilon(z, q, rounds, 1e-5)
    assert epsilon_for(z, q, rounds, 1e-5) == pytest.approx(expected, rel=1e-9)

    if rounds <= 5:
        g = {"w": np.zeros(3, np.float32)}
        aggregator = registry.create("dp-noise", {"clip_norm": 1.0, "noise_multiplier": z, "sample_rate": q})
        result = run_round(aggregator, g, [g, g], round=rounds)
        assert result.metrics["epsilon"] == pytest.approx(expected, rel=1e-9)


def test_full_participation_uses_the_plain_gaussian_mechanism():
    # q = 1: the Gaussian mechanism composed T times has RDP T * alpha / (2 z^2)
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(1.0), 10)
    assert epsilon_for(1.0, 1.0, 10, 1e-6) == pytest.approx(accountant.get_epsilon(1e-6))
    assert epsilon_for(1.0, 1.0, 10, 1e-6) > epsilon_for(1.0, 0.5, 10, 1e-6)


def test_rounds_within_budget_is_the_last_round_that_fits():
    for z, q, budget in [(2.0, 0.2, 2.0), (3.0, 1.0, 8.0)]:
        rounds = rounds_within_budget(z, q, budget, 1e-5)
        assert rounds > 1
        assert reference_epsilon(z, q, rounds, 1e-5) <= budget < reference_epsilon(z, q, rounds + 1, 1e-5)
    assert rounds_within_budget(0.0, 1.0, 3.0, 1e-5) == 0
    assert rounds_within_budget(0.3, 1.0, 0.01, 1e-5) == 0


def test_budget_stops_the_run_and_refuses_the_round_past_it(registry):
    # GIVEN a budget between the epsilon of 2 rounds and of 3 rounds
    z = 1.0
    budget = (reference_epsilon(z, 1.0, 2, 1e-5) + reference_epsilon(z, 1.0, 3, 1e-5)) / 2
    params = {"clip_norm": 1.0, "noise_multiplier": z, "epsilon_budget": budget}
    aggregator = registry.create("dp-noise", params, seed=0)
    g = {"w": np.zeros(3, np.float32)}

    # THEN round 1 continues, round 2 says it is the last, round 3 is refused before any update
    assert run_round(aggregator, g, [g], round=1).stop is False
    assert run_round(aggregator, g, [g], round=2).stop is True
    with pytest.raises(PrivacyBudgetExhausted) as info:
        aggregator.begin(g, RoundContext(round=3))
    assert info.value.reason == "privacy_budget_exhausted"
    assert "round 3" in str(info.value)


def test_adaptive_clipping_raises_c_when_every_update_is_clipped(registry):
    g = {"w": np.zeros(2, np.float64)}
    far = {"w": np.array([30.0, 40.0])}  # norm 50 > C
    params = {"clip_norm": 1.0, "noise_multiplier": 0.0, "adaptive": True}

    result = run_round(registry.create("dp-noise", params), g, [far] * 5)

    # b = 0 unclipped: C <- C * exp(-0.2 * (0 - 0.5))
    assert result.carry["clip_norm"] == pytest.approx(math.exp(0.1))
    assert result.metrics["clipped_fraction"] == 1.0


def test_adaptive_clipping_lowers_c_when_no_update_is_clipped(registry):
    g = {"w": np.zeros(2, np.float64)}
    near = {"w": np.array([0.03, 0.04])}  # norm 0.05 <= C
    params = {"clip_norm": 2.0, "noise_multiplier": 0.0, "adaptive": True, "target_unclipped_quantile": 0.8}

    result = run_round(registry.create("dp-noise", params), g, [near] * 5)

    assert result.carry["clip_norm"] == pytest.approx(2.0 * math.exp(-0.2 * (1.0 - 0.8)))
    assert result.metrics["clipped_fraction"] == 0.0


def test_adaptive_clipping_with_count_noise_moves_c_the_right_way(registry):
    # GIVEN 200 clients and the default count noise (sigma_b = 5 z): b is noised by N(0, (5/200)^2)
    g = {"w": np.zeros(2, np.float64)}
    params = {"clip_norm": 1.0, "noise_multiplier": 1.0, "adaptive": True}
    far, near = {"w": np.array([3.0, 4.0])}, {"w": np.array([0.0, 0.1])}

    up = run_round(registry.create("dp-noise", params, seed=1), g, [far] * 200)
    down = run_round(registry.create("dp-noise", params, seed=1), g, [near] * 200)

    assert up.carry["clip_norm"] > 1.0 > down.carry["clip_norm"]
    assert up.metrics["clipped_fraction"] == pytest.approx(1.0, abs=0.1)


def test_the_next_round_clips_at_the_carried_norm(registry):
    aggregator = registry.create("dp-noise", {"clip_norm": 1.0, "noise_multiplier": 0.0})
    g = {"w": np.zeros(2, np.float64)}

    result = run_round(aggregator, g, [{"w": np.array([3.0, 4.0])}], carry={"clip_norm": 2.5})

    np.testing.assert_allclose(result.weights["w"], [1.5, 2.0])  # (3, 4) scaled to norm 2.5
    assert aggregator.client_settings({"clip_norm": 2.5}) == {"dp_clip_norm": 2.5}
    assert aggregator.client_settings() == {"dp_clip_norm": 1.0}


def test_adaptive_update_noise_is_raised_so_the_total_cost_stays_z(registry):
    # z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2 ; z = 1, sigma_b = 1  ->  (1 - 1/4)^-1/2
    z_delta = update_noise_multiplier(1.0, 1.0)
    assert z_delta == pytest.approx(1 / math.sqrt(0.75))

    g = {"w": np.zeros(200_000, np.float32)}
    params = {"clip_norm": 1.0, "noise_multiplier": 1.0, "adaptive": True, "count_noise_multiplier": 1.0}
    result = run_round(registry.create("dp-noise", params, seed=3), g, [g, g])

    assert result.weights["w"].astype(np.float64).std() == pytest.approx(z_delta * 1.0 / 2, rel=0.02)
    assert result.metrics["epsilon"] == pytest.approx(reference_epsilon(1.0, 1.0, 1, 1e-5))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"clip_norm": 0.0, "noise_multiplier": 1.0}, "clip_norm"),
        ({"clip_norm": 1.0, "noise_multiplier": 0.0, "epsilon_budget": 5.0}, "epsilon_budget"),
        (
            {"clip_norm": 1.0, "noise_multiplier": 2.0, "adaptive": True, "count_noise_multiplier": 1.0},
            "count_noise_multiplier",
        ),
        ({"clip_norm": 1.0, "noise_multiplier": 1.0, "inner": "fedasync"}, "async"),
        ({"clip_norm": 1.0, "noise_multiplier": 1.0, "inner": "nope"}, "unknown aggregator 'nope'"),
        ({"clip_norm": 1.0, "noise_multiplier": 1.0, "sample_rate": 1.5}, "sample_rate"),
    ],
)
def test_inconsistent_settings_are_refused_when_the_aggregator_is_built(registry, params, message):
    with pytest.raises(PluginError, match=message):
        registry.create("dp-noise", params)


def test_fedprox_can_be_the_inner_aggregator_and_still_counts_each_client_once(registry):
    aggregator = registry.create("dp-noise", {"clip_norm": 10.0, "noise_multiplier": 0.0, "inner": "fedprox"})
    g = {"w": np.zeros(1, np.float64)}

    result = run_round(aggregator, g, [{"w": np.array([1.0])}, {"w": np.array([3.0])}], examples=[1, 99])

    np.testing.assert_allclose(result.weights["w"], [2.0])


class ExamplesWeightedPlugin:
    """An inner aggregator with no ``weighted`` switch: it always weights by ``num_examples``."""

    @hookimpl
    def register_aggregators(self, register):
        register("always-weighted", lambda params, ctx: FedAvg(FedAvgParams(weighted=True)))


def test_an_inner_without_a_weighted_switch_still_sees_one_example_per_client():
    pm = get_plugin_manager(plugin_dirs=[])
    pm.register(ExamplesWeightedPlugin(), "examples-weighted")
    registry = build_registry(pm)
    aggregator = registry.create(
        "dp-noise", {"clip_norm": 10.0, "noise_multiplier": 0.0, "inner": "always-weighted"}
    )
    g = {"w": np.zeros(1, np.float64)}

    result = run_round(aggregator, g, [{"w": np.array([1.0])}, {"w": np.array([3.0])}], examples=[1, 99])

    np.testing.assert_allclose(result.weights["w"], [2.0])
