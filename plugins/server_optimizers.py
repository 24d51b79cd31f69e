"""Server optimizers — FedAvgM, FedAdagrad, FedAdam and FedYogi.

Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR), Algorithm 2 (FedOpt); FedAvgM from
Hsu et al. 2019, "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
Classification" (arXiv:1909.06335).

The server treats the clients' mean change Delta as a pseudo-gradient and takes one optimizer step
per round (the papers write client deltas as x - w; the sign is folded in, Delta points where the
clients moved). Coordinate-wise, in float64, with eta = ``server_lr``::

    fedavgm      m_t = momentum * m_{t-1} + Delta_t
                 x_{t+1} = x_t + eta * m_t

    the adaptive three:
                 m_t = beta1 * m_{t-1} + (1 - beta1) * Delta_t
                 x_{t+1} = x_t + eta * m_t / (sqrt(v_t) + tau)
    fedadagrad   v_t = v_{t-1} + Delta_t^2
    fedadam      v_t = beta2 * v_{t-1} + (1 - beta2) * Delta_t^2
    fedyogi      v_t = v_{t-1} - (1 - beta2) * Delta_t^2 * sign(v_{t-1} - Delta_t^2)

m starts at 0 and, for the adaptive three, v at tau^2: Algorithm 2 asks for v_{-1} >= tau^2, and
tau^2 is the smallest such start. As in Algorithm 2 there is no bias correction. ``fedavgm`` with
momentum 0 and server_lr 1 is FedAvg.

Sync: Delta_t = sum_k n_k (w_k - x_t) / sum_k n_k, the example-weighted mean of the clients'
deltas from the global model of the round (Algorithm 2 averages the sampled clients unweighted;
weighting by examples is FedAvg's mean, which ``fedavgm`` must reproduce). It streams into a
float64 running sum (memory O(model)). The round's metrics are the clients' example-weighted
training metrics, as FedAvg's, plus ``server_step`` (t).

Async: FedBuff's buffer (Nguyen et al. 2022, plugins/fedbuff.py) feeds the optimizer::

    d_i = w_i - x_{base(i)}        s(tau_i) = (1 + tau_i)^(-1/2)     buffer = sum_i s(tau_i) d_i
    after K = buffer_size updates:  one optimizer step from the current x with Delta = buffer / K

(FedBuff's x + eta_g * buffer / K becomes the optimizer's input; ``server_lr`` is the optimizer's.)
K defaults as FedBuff's (half the clients, 1 to 10) and the run needs K + 1 clients.

State (``AggregatorState``, persisted by the host after every step and every async update):
arrays ``m/<tensor>`` and ``v/<tensor>`` (float64, once a step has been taken; fedavgm keeps only
``m``) and, async, ``buffer/<tensor>`` while the buffer holds updates; values ``step`` (optimizer
steps taken) and, async, ``count`` (updates in the buffer). A state that does not hold exactly
these, shaped like the model, is refused as ``bad_state``.

A step whose weights would overflow the model's dtype, or whose moments would overflow float64,
is refused as ``non_finite``. Async refuses it before the update enters the buffer, taking the
step as if the buffer were full now (as FedBuff does), so one client cannot leave a buffer behind
that makes every later step fail; that check is one optimizer step per update, tensor by tensor.

Defaults, from the FedAvgM and FedOpt runs of Reddi et al. (the hyperparameters the authors
released with their code, google-research/federated, optimization/docs/hyperparameters.md).
fedavgm: momentum 0.9 (theirs) and server_lr 1 (their best server rate on 4 of 6 tasks); the
step is then about server_lr / (1 - momentum) = 10 times FedAvg's once m has built up.
Adaptive: beta1 0.9; beta2 0.99 (the paper's experiments and Flower's FedAdam/FedYogi; the
released code kept Keras's 0.999); tau 1e-3, the authors' recommended starting value, "worked well
across tasks and optimizers"; server_lr 0.01 for fedadam and fedyogi (their best rate was 10^-2
or 10^-2.5 on 3 of 6 tasks, median 10^-1.75) and 0.1 for fedadagrad (median best 10^-1). Their
code ran Keras's Adagrad (no momentum: beta1 = 0 here reproduces it) and started Adagrad's and
Yogi's accumulators at 0 rather than tau^2. With these defaults FedAdam's first step is about
server_lr * sign(Delta) wherever |Delta| >> tau.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import numpy as np
import pydantic
from fedstream.plugins.fedbuff import FedBuffParams, default_buffer_size, weighted_delta

from fedstream import hookimpl
from fedstream.aggregation import (
    AggregationError,
    Aggregator,
    AggregatorState,
    AsyncResult,
    ClientUpdate,
    MetricsMean,
    RoundContext,
    RoundResult,
    WeightedSum,
    delta,
)
from fedstream.weights import Weights

# A moment before the first step: m_{-1} = 0, v_{-1} = tau^2 (scalars, broadcast by numpy).
Moments = dict[str, "np.ndarray | float"]


class ServerOptimizerParams(FedBuffParams):
    """FedBuff's buffer_size and max_staleness (async only; sync ignores them) and a server_lr."""


class FedAvgMParams(ServerOptimizerParams):
    server_lr: float = pydantic.Field(1.0, gt=0, description="server learning rate eta")
    momentum: float = pydantic.Field(0.9, ge=0, lt=1, description="server momentum: m = momentum * m + Delta")


class FedAdagradParams(ServerOptimizerParams):
    server_lr: float = pydantic.Field(0.1, gt=0, description="server learning rate eta")
    beta1: float = pydantic.Field(0.9, ge=0, lt=1, description="first-moment decay beta1")
    tau: float = pydantic.Field(
        1e-3, gt=0, description="adaptivity tau: eta * m / (sqrt(v) + tau); v starts at tau^2"
    )


class FedAdamParams(FedAdagradParams):
    server_lr: float = pydantic.Field(0.01, gt=0, description="server learning rate eta")
    beta2: float = pydantic.Field(0.99, ge=0, lt=1, description="second-moment decay")


class FedYogiParams(FedAdamParams):
    pass


def _counter(values: Mapping[str, object], key: str) -> int:
    value = values.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise AggregationError("bad_state", f"the state's {key!r} is {value!r}, not a count")
    return value


class ServerOptimizer(Aggregator):
    """One optimizer step per sync round or per full async buffer; subclasses give the moments."""

    name: ClassVar[str]
    description: ClassVar[str]
    moments: ClassVar[tuple[str, ...]] = ("m", "v")

    def __init__(self, params: ServerOptimizerParams, num_clients: int | None = None) -> None:
        self.params = params
        self.buffer_size = params.buffer_size or default_buffer_size(num_clients)
        self.max_staleness = params.max_staleness
        # As FedBuff: K clients fill the buffer, one more keeps it going when one update is refused.
        self.min_clients = self.buffer_size + 1
        self._global: Weights | None = None
        self._sum: WeightedSum | None = None
        self._metrics = MetricsMean()
        self._held: Weights = {}
        self._step = 0

    # -- the optimizer, one tensor at a time ---------------------------------------------------

    def fresh(self) -> Moments:
        """m_{-1} and v_{-1}."""
        raise NotImplementedError

    def update(self, old: Moments, change: np.ndarray) -> dict[str, np.ndarray]:
        """The new moments (fresh float64 arrays) from the old ones and Delta (left unchanged)."""
        raise NotImplementedError

    def direction(self, moments: Mapping[str, np.ndarray]) -> np.ndarray:
        """What server_lr multiplies."""
        raise NotImplementedError

    def _optimize(
        self,
        global_weights: Weights,
        changes: Weights,
        scale: float,
        held: Weights,
        cause: str,
        *,
        keep: bool = True,
    ) -> tuple[Weights, Weights]:
        """One step from x = ``global_weights`` with Delta = ``scale * changes`` and the moments
        ``held`` (empty: fresh): the new weights in the model's dtypes and the new moments, or
        ``non_finite``. With ``keep`` False it only checks, keeping one tensor's arrays at a time."""
        weights: Weights = {}
        moments: Weights = {}
        for name, current in global_weights.items():
            change = changes[name] if scale == 1.0 else changes[name] * scale
            if held:
                old: Moments = {key: np.asarray(held[f"{key}/{name}"], np.float64) for key in self.moments}
            else:
                old = self.fresh()
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                new = self.update(old, change)
                moved = current.astype(np.float64)
                moved += self.params.server_lr * self.direction(new)
            if not np.all(np.abs(moved) <= np.finfo(current.dtype).max):  # NaN fails too
                raise AggregationError(
                    "non_finite", f"{cause} the server step would overflow tensor {name!r}"
                )
            for key, moment in new.items():
                if not np.all(np.isfinite(moment)):
                    raise AggregationError(
                        "non_finite",
                        f"{cause} the server optimizer's {key} would overflow for tensor {name!r}",
                    )
            if keep:
                weights[name] = moved.astype(current.dtype)
                moments.update({f"{key}/{name}": moment for key, moment in new.items()})
        return weights, moments

    def _read_state(self, state: AggregatorState | None, like: Weights) -> tuple[int, int, Weights, Weights]:
        """(buffered updates, steps taken, the buffer, the moments) after checking that ``state``
        holds exactly those arrays, shaped like the model, finite (and v >= 0)."""
        if state is None:
            return 0, 0, {}, {}
        count, step = _counter(state.values, "count"), _counter(state.values, "step")
        prefixes = (["buffer"] if count else []) + (list(self.moments) if step else [])
        expected = {f"{prefix}/{name}": array.shape for prefix in prefixes for name, array in like.items()}
        if set(state.arrays) != set(expected):
            missing, extra = (
                sorted(set(expected) - set(state.arrays)),
                sorted(set(state.arrays) - set(expected)),
            )
            raise AggregationError(
                "bad_state",
                f"a {self.name} state with count {count} and step {step} does not match this model"
                + (f": missing {missing[0]!r}" if missing else f": unexpected {extra[0]!r}"),
            )
        for key, shape in expected.items():
            array = np.asarray(state.arrays[key])
            if array.shape != shape or not np.issubdtype(array.dtype, np.floating):
                raise AggregationError(
                    "bad_state", f"state array {key!r} is not a float array shaped {shape}"
                )
            if not np.all(np.isfinite(array)) or (key.startswith("v/") and np.any(array < 0)):
                raise AggregationError("bad_state", f"state array {key!r} holds values no step can produce")
        buffer = {name: state.arrays[f"buffer/{name}"] for name in like} if count else {}
        held = {key: state.arrays[key] for key in expected if not key.startswith("buffer/")}
        return count, step, buffer, held

    # -- sync ----------------------------------------------------------------------------------

    def begin(self, global_weights: Weights, context: RoundContext) -> None:
        count, step, _, held = self._read_state(context.state, global_weights)
        if count:
            raise AggregationError("bad_state", f"the state holds an async buffer of {count} updates")
        self._global, self._held, self._step = global_weights, held, step
        # Shaped like the model but float64 (zero-stride views: no memory), so that the sum and its
        # mean stay float64 rather than being cast back to the model's dtype.
        like = {name: np.broadcast_to(np.float64(0.0), array.shape) for name, array in global_weights.items()}
        self._sum = WeightedSum(like, dtype=np.float64)
        self._metrics = MetricsMean()

    def accept(self, update: ClientUpdate) -> None:
        assert self._sum is not None and self._global is not None, "begin() must be called before accept()"
        self._sum.add(delta(update.weights, self._global), update.num_examples)
        self._metrics.add(update.metrics, update.num_examples)

    def finish(self) -> RoundResult:
        assert self._sum is not None and self._global is not None, "begin() must be called before finish()"
        mean = self._sum.mean()
        weights, moments = self._optimize(self._global, mean, 1.0, self._held, "in this round")
        step = self._step + 1
        self._global, self._sum, self._held = None, None, {}
        return RoundResult(
            weights=weights,
            metrics={**self._metrics.result(), "server_step": float(step)},
            state=AggregatorState(arrays=moments, values={"step": step}),
        )

    # -- async ---------------------------------------------------------------------------------

    def apply_async(
        self,
        global_weights: Weights,
        update: ClientUpdate,
        *,
        staleness: int,
        state: AggregatorState | None = None,
    ) -> AsyncResult:
        buffered, weight = weighted_delta(self.name, update, staleness)
        count, step, buffer, held = self._read_state(state, global_weights)
        if count >= self.buffer_size:
            raise AggregationError(
                "bad_state", f"the state's buffer holds {count} updates, buffer_size is {self.buffer_size}"
            )
        # Fresh arrays: accumulate in place, leaving `state` untouched.
        if count:
            for name, tensor in buffered.items():
                tensor += buffer[name]
        count += 1
        full = count == self.buffer_size
        # The step as if the buffer were full now: refuse the update before it enters the buffer.
        weights, moments = self._optimize(
            global_weights,
            buffered,
            1.0 / self.buffer_size,
            held,
            f"with {update.client_id!r}'s update",
            keep=full,
        )
        metrics = {"staleness": float(staleness), "staleness_weight": weight}
        if not full:
            arrays = {**held, **{f"buffer/{name}": tensor for name, tensor in buffered.items()}}
            return AsyncResult(
                weights=None,
                state=AggregatorState(arrays=arrays, values={"count": count, "step": step}),
                metrics={**metrics, "buffer_fill": float(count)},
            )
        return AsyncResult(
            weights=weights,
            state=AggregatorState(arrays=moments, values={"count": 0, "step": step + 1}),
            metrics={**metrics, "applied_updates": float(count), "server_step": float(step + 1)},
        )


class FedAvgM(ServerOptimizer):
    name = "fedavgm"
    description = "FedAvg with server momentum, on the round's or FedBuff's mean delta (Hsu et al. 2019)"
    moments = ("m",)
    params: FedAvgMParams

    def fresh(self) -> Moments:
        return {"m": 0.0}

    def update(self, old: Moments, change: np.ndarray) -> dict[str, np.ndarray]:
        return {"m": self.params.momentum * old["m"] + change}

    def direction(self, moments: Mapping[str, np.ndarray]) -> np.ndarray:
        return moments["m"]


class _Adaptive(ServerOptimizer):
    params: FedAdagradParams

    def fresh(self) -> Moments:
        return {"m": 0.0, "v": self.params.tau**2}

    def second_moment(self, v: np.ndarray | float, square: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def update(self, old: Moments, change: np.ndarray) -> dict[str, np.ndarray]:
        beta1 = self.params.beta1
        m = beta1 * old["m"] + (1.0 - beta1) * change
        return {"m": m, "v": self.second_moment(old["v"], change * change)}

    def direction(self, moments: Mapping[str, np.ndarray]) -> np.ndarray:
        denominator = np.sqrt(moments["v"])
        denominator += self.params.tau
        return moments["m"] / denominator


class FedAdagrad(_Adaptive):
    name = "fedadagrad"
    description = "Adagrad on the server, on the round's or FedBuff's mean delta (Reddi et al. 2021)"

    def second_moment(self, v: np.ndarray | float, square: np.ndarray) -> np.ndarray:
        return v + square


class FedAdam(_Adaptive):
    name = "fedadam"
    description = "Adam on the server, on the round's or FedBuff's mean delta (Reddi et al. 2021)"
    params: FedAdamParams

    def second_moment(self, v: np.ndarray | float, square: np.ndarray) -> np.ndarray:
        beta2 = self.params.beta2
        return beta2 * v + (1.0 - beta2) * square


class FedYogi(_Adaptive):
    name = "fedyogi"
    description = "Yogi on the server, on the round's or FedBuff's mean delta (Reddi et al. 2021)"
    params: FedYogiParams

    def second_moment(self, v: np.ndarray | float, square: np.ndarray) -> np.ndarray:
        return v - (1.0 - self.params.beta2) * square * np.sign(v - square)


OPTIMIZERS: tuple[tuple[type[ServerOptimizer], type[ServerOptimizerParams]], ...] = (
    (FedAvgM, FedAvgMParams),
    (FedAdagrad, FedAdagradParams),
    (FedAdam, FedAdamParams),
    (FedYogi, FedYogiParams),
)


@hookimpl
def register_aggregators(register):
    for optimizer, params in OPTIMIZERS:
        register(
            optimizer.name,
            lambda validated, ctx, optimizer=optimizer: optimizer(validated, ctx.num_clients),
            params=params,
            modes=optimizer.modes,
            description=optimizer.description,
        )
