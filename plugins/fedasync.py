"""FedAsync — Xie et al. 2019, "Asynchronous Federated Optimization" (arXiv:1903.03934).

Every update is mixed into the global model as soon as it arrives, weighted down by its staleness
tau = t - base_version (how many versions were published since the client's starting point)::

    a_t = alpha * s(tau)
    x_t = (1 - a_t) * x_{t-1} + a_t * x_new

with one of the paper's staleness functions s (Section 5.2):

    constant     s(tau) = 1
    polynomial   s(tau) = (1 + tau)^(-a)
    hinge        s(tau) = 1 if tau <= b else 1 / (a * (tau - b) + 1)

Mixing happens in float64; the result is cast back to each tensor's dtype.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pydantic

from fedstream import hookimpl
from fedstream.aggregation import Aggregator, AsyncResult, AsyncState, ClientUpdate
from fedstream.weights import Weights

StalenessFunction = Literal["constant", "polynomial", "hinge"]


def staleness_weight(function: StalenessFunction, staleness: int, a: float, b: float) -> float:
    """s(tau) for one of FedAsync's staleness functions."""
    if function == "constant":
        return 1.0
    if function == "polynomial":
        return float((1.0 + staleness) ** -a)
    if staleness <= b:
        return 1.0
    return 1.0 / (a * (staleness - b) + 1.0)


class FedAsyncParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    alpha: float = pydantic.Field(0.6, gt=0, le=1, description="mixing hyperparameter alpha")
    staleness_function: StalenessFunction = pydantic.Field("polynomial", description="staleness function s")
    a: float = pydantic.Field(0.5, ge=0, description="exponent (polynomial) or slope (hinge) of s")
    b: float = pydantic.Field(4.0, ge=0, description="hinge: staleness up to which s = 1")
    # A site k times slower than the others, among n clients, arrives about k*n versions stale;
    # s(staleness) already shrinks its weight, so the bound only cuts off the truly lost.
    max_staleness: int = pydantic.Field(50, ge=0, description="reject updates staler than this")


class FedAsync(Aggregator):
    def __init__(self, params: FedAsyncParams) -> None:
        self.params = params
        self.max_staleness = params.max_staleness
        self.min_clients = 2  # one client whose update is refused waits for another's version

    def mixing_weight(self, staleness: int) -> float:
        p = self.params
        return p.alpha * staleness_weight(p.staleness_function, staleness, p.a, p.b)

    def apply_async(
        self,
        global_weights: Weights,
        update: ClientUpdate,
        *,
        staleness: int,
        state: AsyncState | None = None,
    ) -> AsyncResult:
        mixing = self.mixing_weight(staleness)
        weights: Weights = {}
        for name, current in global_weights.items():
            mixed = current.astype(np.float64) * (1.0 - mixing)
            mixed += mixing * update.weights[name].astype(np.float64)
            weights[name] = mixed.astype(current.dtype)
        return AsyncResult(weights=weights, metrics={"mixing_weight": mixing, "staleness": float(staleness)})


@hookimpl
def register_aggregators(register):
    register(
        "fedasync",
        lambda params, ctx: FedAsync(params),
        params=FedAsyncParams,
        modes=FedAsync.modes,
        description="Mix each update into the model, weighted by staleness (Xie et al. 2019)",
    )
