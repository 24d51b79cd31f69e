"""FedBuff — Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous Aggregation"
(AISTATS).

Updates are buffered as staleness-weighted deltas from the version each client trained on; when
K of them have arrived the server takes one step from the *current* global model::

    d_i = w_i - x_{base(i)}                  s(tau_i) = (1 + tau_i)^(-1/2)
    buffer = sum_i s(tau_i) * d_i            (float64, persisted by the host between updates)
    after K updates:  x <- x + eta_g * buffer / K,  and the buffer empties

The paper writes client deltas as x_base - w_i and steps x - eta_g * mean; the sign is folded in.

An update with which the next step would overflow the model's dtype (x + eta_g * buffer / K, as
if the buffer were full now) is refused as ``non_finite`` before it enters the buffer: one client
cannot leave a buffer behind that makes every later step fail. The check costs one pass over the
model per update.
"""

from __future__ import annotations

import numpy as np
import pydantic

from fedstream import hookimpl
from fedstream.aggregation import AggregationError, Aggregator, AsyncResult, AsyncState, ClientUpdate, delta
from fedstream.weights import Weights


def staleness_weight(staleness: int) -> float:
    """s(tau) = 1 / sqrt(1 + tau)."""
    return float((1.0 + staleness) ** -0.5)


def weighted_delta(name: str, update: ClientUpdate, staleness: int) -> tuple[Weights, float]:
    """``s(tau) * (w - x_base)`` as fresh float64 arrays (the caller may change them), and s(tau)."""
    if update.base_weights is None:
        raise AggregationError(
            "missing_base_weights", f"{name} needs the base weights of {update.client_id!r}'s update"
        )
    weight = staleness_weight(staleness)
    fresh = delta(update.weights, update.base_weights)
    for tensor in fresh.values():
        tensor *= weight
    return fresh, weight


class FedBuffParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    buffer_size: int | None = pydantic.Field(
        None,
        ge=1,
        description="K: updates buffered before one server step (default: half the clients, 1 to 10; "
        "3 when the number of clients is not known)",
    )
    server_lr: float = pydantic.Field(1.0, gt=0, description="server learning rate eta_g")
    max_staleness: int = pydantic.Field(50, ge=0, description="reject updates staler than this")


def default_buffer_size(num_clients: int | None) -> int:
    """Half the clients, between 1 and 10 (the paper's K = 10 for 100-1,000 concurrent clients).

    Staleness is then about N / K: 2 with 10 clients, 20 with 200, within the default max_staleness.
    """
    if num_clients is None:
        return 3
    return max(1, min(10, num_clients // 2))


class FedBuff(Aggregator):
    def __init__(self, params: FedBuffParams, num_clients: int | None = None) -> None:
        self.params = params
        self.buffer_size = params.buffer_size or default_buffer_size(num_clients)
        self.max_staleness = params.max_staleness
        # K clients fill the buffer; one more keeps it going when one update is refused (a refused
        # client waits for a new version, and only a full buffer makes one).
        self.min_clients = self.buffer_size + 1

    def apply_async(
        self,
        global_weights: Weights,
        update: ClientUpdate,
        *,
        staleness: int,
        state: AsyncState | None = None,
    ) -> AsyncResult:
        buffered, weight = weighted_delta("fedbuff", update, staleness)
        count = self._check_state(state, global_weights)
        # Fresh arrays: accumulate in place, leaving `state` untouched.
        if state is not None and count:
            for name, tensor in buffered.items():
                tensor += state.arrays[name]
        count += 1
        step = self.params.server_lr / self.buffer_size
        moved = {
            name: current.astype(np.float64) + step * buffered[name]
            for name, current in global_weights.items()
        }
        for name, tensor in moved.items():
            if not np.all(np.abs(tensor) <= np.finfo(global_weights[name].dtype).max):  # NaN fails too
                raise AggregationError(
                    "non_finite",
                    f"with {update.client_id!r}'s update the next server step would overflow tensor {name!r}",
                )
        metrics = {"staleness": float(staleness), "staleness_weight": weight}
        if count < self.buffer_size:
            return AsyncResult(
                weights=None,
                state=AsyncState(arrays=buffered, values={"count": count}),
                metrics={**metrics, "buffer_fill": float(count)},
            )
        weights = {name: moved[name].astype(current.dtype) for name, current in global_weights.items()}
        return AsyncResult(weights=weights, state=None, metrics={**metrics, "applied_updates": float(count)})

    @staticmethod
    def _check_state(state: AsyncState | None, global_weights: Weights) -> int:
        if state is None:
            return 0
        count = int(state.values.get("count", 0))
        if count == 0:
            return 0
        for name, current in global_weights.items():
            held = state.arrays.get(name)
            if held is None or held.shape != current.shape:
                raise AggregationError("bad_state", f"the buffered state does not match tensor {name!r}")
        return count


@hookimpl
def register_aggregators(register):
    register(
        "fedbuff",
        lambda params, ctx: FedBuff(params, ctx.num_clients),
        params=FedBuffParams,
        modes=FedBuff.modes,
        description="Buffer K staleness-weighted deltas, then take one server step (Nguyen et al. 2022)",
    )
