"""Aggregators that wrap aggregators: the inner one is chosen by name with its own typed parameters
(``inner=fedprox``, ``inner.mu=0.05``), and what it asks of clients still reaches them."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest

from fedstream import hookimpl
from fedstream.aggregation import ClientUpdate, RoundContext, RoundResult, Wrapper
from fedstream.registry import (
    AggregatorRegistry,
    PluginError,
    build_registry,
    get_plugin_manager,
    nest_params,
)

DP = {"clip_norm": 1.0, "noise_multiplier": 0.0}


@pytest.fixture(scope="module")
def registry() -> AggregatorRegistry:
    return build_registry()


def test_dp_noise_around_fedprox_sends_clients_the_proximal_term_and_the_clip_norm(registry):
    # GIVEN dp-noise wrapped around fedprox with its own mu, in the dotted form the CLI passes
    dp = registry.create("dp-noise", {**DP, "inner": "fedprox", "inner.mu": "0.05"}, seed=0)
    # THEN clients are told both: FedProx's proximal term and the DP clip norm
    assert dp.client_settings() == {"proximal_mu": 0.05, "dp_clip_norm": 1.0}
    # and the nested form (deploy-time JSON) means the same
    nested = registry.create("dp-noise", {**DP, "inner": "fedprox", "inner_params": {"mu": 0.05}}, seed=0)
    assert nested.client_settings() == dp.client_settings()


def test_dp_noise_still_averages_the_clipped_updates_through_the_inner_aggregator(registry):
    dp = registry.create("dp-noise", {**DP, "inner": "fedprox", "inner.mu": 0.05}, seed=0)
    base = {"w": np.zeros(2, np.float32)}
    dp.begin(base, RoundContext(round=1))
    dp.accept(ClientUpdate("a", {"w": np.array([3.0, 4.0], np.float32)}, 100))  # norm 5, clipped to 1
    dp.accept(ClientUpdate("b", {"w": np.array([0.0, 0.5], np.float32)}, 1))
    result = dp.finish()
    # unweighted mean of (0.6, 0.8) and (0, 0.5), no noise at z = 0
    np.testing.assert_allclose(result.weights["w"], [0.3, 0.65], rtol=1e-6)


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        (
            "dp-noise",
            {**DP, "inner": "fedprox", "inner.bogus": 1},
            "invalid parameters for aggregator 'fedprox'",
        ),
        (
            "dp-noise",
            {**DP, "inner": "fedprox", "inner.mu": -1},
            "invalid parameters for aggregator 'fedprox'",
        ),
        ("dp-noise", {**DP, "inner": "nosuch"}, "unknown aggregator 'nosuch'"),
        ("dp-noise", {**DP, "inner": "dp-noise"}, "cannot wrap itself"),
        ("dp-noise", {**DP, "inner.weighted": "true"}, "inner.weighted must stay false"),
        ("fedavg", {"inner.mu": 0.05}, "wraps no inner aggregator: inner.mu"),
        ("dp-noise", {**DP, "inner_params": {"mu": 1}, "inner.mu": 2}, "not both"),
        ("dp-noise", {**DP, "outer.mu": 2}, "only a wrapper's inner parameters are dotted"),
    ],
)
def test_a_wrong_inner_choice_is_refused_with_the_inner_aggregators_own_message(
    registry, name, params, message
):
    with pytest.raises(PluginError, match=message):
        registry.create(name, params, seed=0)


def test_deploy_time_validation_checks_the_inner_parameters_without_building_anything(registry):
    # validate_params is what the stack's configuration calls: it must catch the inner's errors too
    with pytest.raises(PluginError, match="invalid parameters for aggregator 'fedprox': mu"):
        registry.validate_params("dp-noise", {**DP, "inner": "fedprox", "inner.mu": "lots"})
    assert registry.validate_params("dp-noise", {**DP, "inner": "fedprox", "inner.mu": 0.1}).inner_params == {
        "mu": 0.1
    }


def test_only_the_first_dot_nests_so_wrappers_of_wrappers_get_their_own_inner_parameters():
    assert nest_params({"inner": "a", "inner.inner": "b", "inner.inner.mu": 1, "x": 2}) == {
        "inner": "a",
        "inner_params": {"inner": "b", "inner.mu": 1},
        "x": 2,
    }


class ShrinkParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    inner: str = "fedavg"
    inner_params: dict = {}
    factor: float = 0.5


class Shrink(Wrapper):
    """A third-party wrapper: the inner aggregator's step, scaled by ``factor``."""

    def __init__(self, inner, factor):
        super().__init__(inner)
        self.factor = factor

    def begin(self, global_weights, context):
        self.base = global_weights
        super().begin(global_weights, context)

    def finish(self):
        inner = super().finish()
        moved = {k: self.base[k] + self.factor * (inner.weights[k] - self.base[k]) for k in inner.weights}
        return RoundResult(moved, inner.metrics, inner.carry, inner.stop, inner.state)

    def own_client_settings(self, carry=None):
        return {"shrink": self.factor}


class ShrinkPlugin:
    @hookimpl
    def register_aggregators(self, register):
        register(
            "shrink",
            lambda p, ctx: Shrink(ctx.create(p.inner, p.inner_params), p.factor),
            params=ShrinkParams,
        )


def test_a_third_party_wrapper_passes_everything_it_does_not_change_through(monkeypatch):
    monkeypatch.setenv("FEDSTREAM_DISABLE_PLUGIN_AUTOLOAD", "1")
    pm = get_plugin_manager(plugin_dirs=[])
    pm.register(ShrinkPlugin(), "shrink")
    registry = build_registry(pm)
    shrink = registry.create("shrink", {"inner": "fedprox", "inner.mu": 0.2, "factor": 0.25})
    assert shrink.client_settings() == {"proximal_mu": 0.2, "shrink": 0.25}
    base = {"w": np.zeros(2, np.float32)}
    shrink.begin(base, RoundContext(round=1))
    shrink.accept(ClientUpdate("a", {"w": np.array([4.0, 8.0], np.float32)}, 1))
    np.testing.assert_allclose(shrink.finish().weights["w"], [1.0, 2.0])


def test_dp_noise_refuses_a_server_optimizer_inside_it(registry):
    with pytest.raises(PluginError, match="noise would come after the optimizer's step"):
        registry.create("dp-noise", {**DP, "inner": "fedadam"}, seed=0)
