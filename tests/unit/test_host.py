"""The async step every host takes (``fedstream.host.async_step``): staleness and the influence
bounds are judged there, once, for every aggregator, before its ``apply_async``."""

from __future__ import annotations

import numpy as np
import pytest

from fedstream.aggregation import ClientUpdate
from fedstream.bounds import InfluenceBounds
from fedstream.errors import Refused
from fedstream.host import async_step, staleness_of, sync_round
from fedstream.registry import default_registry

ASYNC = [
    info.name for info in default_registry().infos() if "async" in info.modes and info.name != "dp-noise"
]
BASE = {"w": np.zeros(4, np.float32)}


def step(name, update, staleness, bounds=None, norms=()):
    aggregator = default_registry().create(name, {"max_staleness": 2}, seed=0, mode="async")
    return async_step(
        aggregator, BASE, update, staleness=staleness, state=None,
        bounds=bounds or InfluenceBounds(), norms=list(norms), trained_from=BASE,
    )  # fmt: skip


def moved(by: float, examples: int = 1) -> ClientUpdate:
    return ClientUpdate("site-1", {"w": BASE["w"] + np.float32(by)}, examples, base_weights=BASE)


@pytest.mark.parametrize("name", ASYNC)
def test_every_async_aggregator_has_staler_updates_refused_by_the_host(name):
    assert step(name, moved(0.1), staleness=2).norm > 0  # at the limit: taken
    with pytest.raises(Refused) as refused:
        step(name, moved(0.1), staleness=3)
    assert refused.value.reason == "stale" and "3 versions stale (max 2)" in str(refused.value)


@pytest.mark.parametrize("name", ASYNC)
def test_every_async_aggregator_has_the_bounds_applied_by_the_host(name):
    with pytest.raises(Refused) as unchanged:
        step(name, moved(0.0), staleness=0)
    assert unchanged.value.reason == "no_change"
    with pytest.raises(Refused) as outsized:
        step(name, moved(100.0), staleness=0, norms=[0.2, 0.2, 0.2])
    assert outsized.value.reason == "norm_bound"
    taken = step(name, moved(0.1), staleness=0, norms=[0.2, 0.2, 0.2])
    assert taken.norms == pytest.approx([0.2, 0.2, 0.2, 0.2])


def test_the_example_cap_is_applied_before_the_aggregator_sees_the_update():
    bounds = InfluenceBounds(max_examples=5)
    # FedAsync ignores counts; FedAvgM in async weighs by staleness only: check what the step was given
    seen = {}

    class Spy:
        max_staleness = None

        def apply_async(self, current, update, *, staleness, state=None):
            seen["examples"] = update.num_examples
            from fedstream.aggregation import AsyncResult

            return AsyncResult(None)

    async_step(Spy(), BASE, moved(0.1, examples=10**9), staleness=0, state=None, bounds=bounds, norms=[],
               trained_from=BASE)  # fmt: skip
    assert seen["examples"] == 5


def test_a_base_from_the_future_is_refused():
    assert staleness_of(5, 3) == 2
    with pytest.raises(Refused) as refused:
        staleness_of(3, 5)
    assert refused.value.reason == "future_base_version"


def test_a_round_takes_each_admitted_update_once_and_says_when_none_came():
    from fedstream.aggregation import AggregationError, RoundContext

    fedavg = default_registry().create("fedavg", mode="sync")
    updates = [moved(1.0, 1), moved(3.0, 3)]
    pulled = []

    def lazily():  # one update in memory at a time, as the hosts download them
        for update in updates:
            pulled.append(update.client_id)
            yield update

    result = sync_round(fedavg, BASE, RoundContext(round=1), lazily(), nothing=lambda: AssertionError())
    np.testing.assert_allclose(result.weights["w"], 2.5)
    assert len(pulled) == 2
    with pytest.raises(AggregationError, match="nothing came"):
        sync_round(
            fedavg,
            BASE,
            RoundContext(round=2),
            iter(()),
            nothing=lambda: AggregationError("no_updates", "nothing came"),
        )


def test_a_rounds_metrics_hold_the_clients_reported_means_even_if_the_plugin_returns_none():
    from fedstream.aggregation import Aggregator, ClientUpdate, RoundContext, RoundResult

    class Bare(Aggregator):  # like the README's plugin: metrics={}
        def begin(self, global_weights, context):
            self.base = global_weights

        def accept(self, update):
            pass

        def finish(self):
            return RoundResult(self.base, metrics={"own": 1.0, "eval_accuracy": 0.99})

    updates = [
        ClientUpdate("a", BASE, 10, {"eval_accuracy": 0.5, "train_loss": 2.0}),
        ClientUpdate("b", BASE, 30, {"eval_accuracy": 0.9, "train_loss": 1.0}),
    ]
    plain = sync_round(Bare(), BASE, RoundContext(round=1), iter(updates), nothing=AssertionError)
    assert plain.metrics["train_loss"] == pytest.approx(1.25)  # (2*10 + 1*30) / 40
    assert plain.metrics["num_clients"] == 2 and plain.metrics["num_examples"] == 40
    # what the plugin says itself wins
    assert plain.metrics["own"] == 1.0 and plain.metrics["eval_accuracy"] == 0.99
