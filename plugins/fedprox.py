"""FedProx — Li et al. 2020, "Federated Optimization in Heterogeneous Networks" (MLSys).

Clients minimise  F_k(w) + mu/2 * ||w - w_t||^2  (the proximal term keeps local models near the
global one); the server step is FedAvg. This plugin is FedAvg plus ``proximal_mu`` handed to
every client through ``client_settings``.
"""

from __future__ import annotations

from collections.abc import Mapping

import pydantic
from fedstream.plugins.fedavg import FedAvg, FedAvgParams

from fedstream import hookimpl
from fedstream.aggregation import Scalar


class FedProxParams(FedAvgParams):
    mu: float = pydantic.Field(0.01, ge=0.0, description="proximal term weight mu sent to clients")


class FedProx(FedAvg):
    def __init__(self, params: FedProxParams) -> None:
        super().__init__(params)
        self.mu = params.mu

    def client_settings(self, carry: Mapping[str, Scalar] | None = None) -> dict[str, Scalar]:
        return {"proximal_mu": self.mu}


@hookimpl
def register_aggregators(register):
    register(
        "fedprox",
        lambda params, ctx: FedProx(params),
        params=FedProxParams,
        modes=FedProx.modes,
        description="FedAvg on the server with a proximal term mu on clients (Li et al. 2020)",
    )
