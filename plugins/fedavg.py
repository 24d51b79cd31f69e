"""FedAvg — McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data" (AISTATS).

    w_{t+1} = sum_k n_k w_k / sum_k n_k

where w_k are the weights client k returned after local training and n_k its number of examples.
Updates stream into a running float64 sum, so memory is O(model) whatever the number of clients.
"""

from __future__ import annotations

import pydantic

from fedstream import hookimpl
from fedstream.aggregation import (
    Aggregator,
    ClientUpdate,
    MetricsMean,
    RoundContext,
    RoundResult,
    WeightedSum,
)
from fedstream.weights import Weights


class FedAvgParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    weighted: bool = pydantic.Field(True, description="weight clients by num_examples (False: plain mean)")


class FedAvg(Aggregator):
    def __init__(self, params: FedAvgParams) -> None:
        self.params = params
        self._sum: WeightedSum | None = None
        self._metrics = MetricsMean()
        self._context: RoundContext | None = None

    def begin(self, global_weights: Weights, context: RoundContext) -> None:
        self._sum = WeightedSum(global_weights)
        self._metrics = MetricsMean()
        self._context = context

    def accept(self, update: ClientUpdate) -> None:
        assert self._sum is not None, "begin() must be called before accept()"
        self._sum.add(update.weights, update.num_examples if self.params.weighted else 1.0)
        self._metrics.add(update.metrics, update.num_examples)

    def finish(self) -> RoundResult:
        assert self._sum is not None, "begin() must be called before finish()"
        weights = self._sum.mean()
        self._sum = None
        return RoundResult(weights=weights, metrics=self._metrics.result())


@hookimpl
def register_aggregators(register):
    register(
        "fedavg",
        lambda params, ctx: FedAvg(params),
        params=FedAvgParams,
        modes=FedAvg.modes,
        description="Federated averaging weighted by examples (McMahan et al. 2017)",
    )
