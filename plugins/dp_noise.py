"""Central differential privacy — DP-FedAvg, McMahan et al. 2018, "Learning Differentially Private
Recurrent Language Models" (ICLR), with optional adaptive clipping from Andrew et al. 2021,
"Differentially Private Learning with Adaptive Clipping" (NeurIPS).

Each round, with global weights g, clip norm C and m accepted updates w_i::

    d_i   = w_i - g                                  (all tensors together, in float64)
    d_i'  = d_i * min(1, C / ||d_i||_2)              (clip: one client moves the mean by <= C/m)
    w'    = inner(g + d_1', ..., g + d_m')           (unweighted: every client counts 1)
    g_new = w' + N(0, (z_delta * C / m)^2 I)

The inner aggregator (``fedavg`` by default; ``inner=fedprox inner.mu=0.05`` picks another with its
own parameters; built with ``weighted=False`` when it has that parameter) sees every update with
``num_examples=1``: weighting by examples would let one client move the model by more than C/m.
Clients get the inner's settings (FedProx's ``proximal_mu``) and ``dp_clip_norm``. The noise scale
assumes a mean-type inner aggregator. The real example counts still weight the reported training
metrics.

Privacy is accounted with the RDP accountant of ``dp_accounting``: one round is
``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` (just ``GaussianDpEvent(z)`` when q = 1),
self-composed over the rounds so far; epsilon is reported for the configured delta. Only the
weights are covered: client-reported training metrics are released as they are.

Adaptive clipping (Andrew et al. 2021, Algorithm 1) tracks the gamma-quantile of update norms::

    b     = (sum_i 1[||d_i|| <= C] + N(0, sigma_b^2)) / m
    C_new = C * exp(-eta_C * (b - gamma))

so C grows when most updates are clipped (b < gamma) and shrinks when few are. The count query
costs privacy too; by the paper's Theorem 1 the pair (update noise z_delta, count noise sigma_b) is
as private as one Gaussian mechanism with multiplier z when
``z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)``, so the accountant keeps using z and the update noise
is raised to z_delta. With adaptive off, z_delta = z. The reported ``clipped_fraction`` is 1 - b,
noised when adaptive is on (so covered by the guarantee) and exact otherwise.

Rounds are numbered from 1: after round r, r rounds of privacy have been spent.

**Async mode** (around ``fedbuff``, the default inner there): each update's delta from the version
its client trained on is clipped to C before it enters FedBuff's buffer, and every server step adds
Gaussian noise to the buffered sum::

    d_i'  = (w_i - x_base(i)) * min(1, C / ||w_i - x_base(i)||)
    x    <- x + eta_g * (sum_i s(tau_i) d_i' + N(0, (z C)^2 I)) / K      (FedBuff's step, noised)

FedBuff's step is linear in the sum, so the noise is added to the stepped weights scaled by
eta_g / K. A client may have one update in each buffer (a second one is refused as
``dp_one_per_buffer``), so one client moves the sum by at most C (s(tau) <= 1). The accountant
counts server steps as rounds: after k steps, epsilon is that of k Gaussian mechanisms with
multiplier z, Poisson-subsampled at ``sample_rate`` when it is below 1. What this assumes, and
does not give: the guarantee is per client and per step with the buffer's membership treated as
the sampling; which clients land in a buffer depends on timing, not on a random draw, so
``sample_rate`` below 1 (amplification by subsampling) is not justified in async mode and should be
left at 1. The budget stop ends the run after the last step that fits (``stop``). Adaptive clipping
runs in sync mode only; client-reported metrics are not covered (as in sync).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any, Self

import numpy as np
import pydantic

from fedstream import hookimpl
from fedstream.aggregation import (
    AggregationError,
    Aggregator,
    AggregatorState,
    AsyncResult,
    ClientUpdate,
    MetricsMean,
    PrivacyBudgetExhausted,
    RoundContext,
    RoundResult,
    Scalar,
    Wrapper,
    delta,
    global_norm,
)
from fedstream.registry import FactoryContext, PluginError
from fedstream.weights import Weights

MAX_ROUNDS = 10**9
# Inner aggregators whose step is not a mean of the clipped updates (noise must go on their input).
SERVER_OPTIMIZERS = frozenset({"fedavgm", "fedadam", "fedyogi", "fedadagrad"})
# The wrapper's own values in the async state (FedBuff's are beside them).
STEPS, IN_BUFFER = "dp_steps", "dp_in_buffer"
# Default count noise sigma_b = 5 z: the count query then takes 1% of the privacy
# (z_delta = z / sqrt(0.99), about 1.005 z); at z = 1 it is the paper's sigma_b = m/20 for m = 100.
DEFAULT_COUNT_NOISE_PER_Z = 5.0


@functools.lru_cache(maxsize=1024)  # a round asks for the same values again; subsampled RDP takes ~0.1 s
def epsilon_for(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """Epsilon after ``rounds`` rounds of the (Poisson-subsampled) Gaussian mechanism, by RDP accounting."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    try:  # imported here: only DP runs need it, and it is slow to import
        import dp_accounting
        from dp_accounting import rdp
    except ImportError as exc:
        raise AggregationError(
            "missing_dependency", f"privacy accounting needs dp-accounting ('fedstream[server]'): {exc}"
        ) from exc

    event: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sample_rate < 1.0:
        event = dp_accounting.PoissonSampledDpEvent(sample_rate, event)
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return float(accountant.get_epsilon(delta))


def rounds_within_budget(noise_multiplier: float, sample_rate: float, epsilon: float, delta: float) -> int:
    """The largest number of rounds whose epsilon stays within ``epsilon`` (at most ``MAX_ROUNDS``)."""
    if epsilon_for(noise_multiplier, sample_rate, 1, delta) > epsilon:
        return 0
    low, high = 1, 2
    while high < MAX_ROUNDS and epsilon_for(noise_multiplier, sample_rate, high, delta) <= epsilon:
        low, high = high, min(high * 2, MAX_ROUNDS)
    if high == MAX_ROUNDS and epsilon_for(noise_multiplier, sample_rate, high, delta) <= epsilon:
        return MAX_ROUNDS
    while high - low > 1:  # invariant: low fits the budget, high does not
        middle = (low + high) // 2
        if epsilon_for(noise_multiplier, sample_rate, middle, delta) <= epsilon:
            low = middle
        else:
            high = middle
    return low


def update_noise_multiplier(noise_multiplier: float, count_noise: float) -> float:
    """z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2): update noise keeping the total cost at z (Andrew et al.)."""
    if noise_multiplier == 0:
        return 0.0
    if count_noise == 0:
        return math.inf
    return (noise_multiplier**-2 - (2.0 * count_noise) ** -2) ** -0.5


class DpNoiseParams(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    clip_norm: float = pydantic.Field(gt=0, description="L2 clip norm C of each client's update (initial C)")
    noise_multiplier: float = pydantic.Field(ge=0, description="noise multiplier z: noise std z*C/m")
    inner: str | None = pydantic.Field(
        None, description="aggregator that averages the clipped updates (default fedavg; async: fedbuff)"
    )
    inner_params: dict[str, Any] = pydantic.Field(
        default_factory=dict, description="the inner aggregator's parameters (or inner.NAME=VALUE)"
    )
    delta: float = pydantic.Field(1e-5, gt=0, lt=1, description="delta of the (epsilon, delta) guarantee")
    epsilon_budget: float | None = pydantic.Field(None, gt=0, description="refuse rounds beyond this epsilon")
    sample_rate: float = pydantic.Field(1.0, gt=0, le=1, description="fraction q of clients sampled a round")
    adaptive: bool = pydantic.Field(False, description="adapt C to a quantile of update norms (Andrew 2021)")
    target_unclipped_quantile: float = pydantic.Field(
        0.5, ge=0, le=1, description="adaptive: target fraction gamma of unclipped updates"
    )
    clip_learning_rate: float = pydantic.Field(0.2, gt=0, description="adaptive: geometric step eta_C")
    count_noise_multiplier: float | None = pydantic.Field(
        None, ge=0, description="adaptive: std sigma_b of the noise on the unclipped count (default 5*z)"
    )

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.epsilon_budget is not None and self.noise_multiplier == 0:
            raise ValueError("an epsilon_budget needs noise_multiplier > 0 (z = 0 gives no privacy)")
        if self.adaptive and self.noise_multiplier > 0 and 2 * self.count_noise <= self.noise_multiplier:
            raise ValueError(
                f"count_noise_multiplier must exceed noise_multiplier/2 = {self.noise_multiplier / 2:g}"
                " (Andrew et al. 2021, Theorem 1)"
            )
        return self

    @property
    def count_noise(self) -> float:
        if self.count_noise_multiplier is not None:
            return self.count_noise_multiplier
        return DEFAULT_COUNT_NOISE_PER_Z * self.noise_multiplier


class DpNoise(Wrapper):
    def __init__(self, params: DpNoiseParams, inner: Aggregator, rng: np.random.Generator) -> None:
        super().__init__(inner)
        self.params = params
        self.rng = rng
        if params.adaptive:
            self.update_noise = update_noise_multiplier(params.noise_multiplier, params.count_noise)
        else:
            self.update_noise = params.noise_multiplier
        self._global: Weights | None = None
        self._dtypes: dict[str, np.dtype] = {}
        self._context: RoundContext | None = None
        self._clip_norm = params.clip_norm
        self._metrics = MetricsMean()
        self._unclipped = 0

    def own_client_settings(self, carry: Mapping[str, Scalar] | None = None) -> dict[str, Scalar]:
        return {"dp_clip_norm": self._current_clip_norm(carry or {})}

    def epsilon(self, rounds: int) -> float:
        return epsilon_for(self.params.noise_multiplier, self.params.sample_rate, rounds, self.params.delta)

    def begin(self, global_weights: Weights, context: RoundContext) -> None:
        if context.round < 1:
            raise AggregationError("bad_round", f"rounds are numbered from 1, got {context.round}")
        budget = self.params.epsilon_budget
        if budget is not None:
            spent = self.epsilon(context.round)
            if spent > budget:
                raise PrivacyBudgetExhausted(
                    f"round {context.round} would bring epsilon to {spent:.4g}, over the budget of {budget:g}"
                )
        self._clip_norm = self._current_clip_norm(context.carry)
        self._dtypes = {name: array.dtype for name, array in global_weights.items()}
        self._global = {name: array.astype(np.float64) for name, array in global_weights.items()}
        self._context = context
        self._metrics = MetricsMean()
        self._unclipped = 0
        self.inner.begin(self._global, context)

    def accept(self, update: ClientUpdate) -> None:
        assert self._global is not None, "begin() must be called before accept()"
        moved = delta(update.weights, self._global)
        norm = global_norm(moved)
        if norm <= self._clip_norm:
            self._unclipped += 1
        scale = min(1.0, self._clip_norm / norm) if norm > 0 else 1.0
        for name, tensor in moved.items():
            tensor *= scale
            tensor += self._global[name]
        self.inner.accept(
            ClientUpdate(
                client_id=update.client_id,
                weights=moved,
                num_examples=1,
                metrics=update.metrics,
                base_version=update.base_version,
            )
        )
        self._metrics.add(update.metrics, update.num_examples)

    def finish(self) -> RoundResult:
        assert self._global is not None and self._context is not None, "begin() must come before finish()"
        count = self._metrics.num_clients
        if count == 0:
            raise AggregationError("no_updates", "nothing to aggregate: no update was accepted this round")
        inner = self.inner.finish()
        stddev = self.update_noise * self._clip_norm / count
        weights: Weights = {}
        for name, like in self._global.items():
            noisy = np.asarray(inner.weights[name], dtype=np.float64)
            if stddev > 0:
                noisy = noisy + self.rng.normal(0.0, stddev, size=like.shape)
            weights[name] = noisy.astype(self._dtypes[name])
        unclipped_fraction = self._unclipped / count
        next_clip_norm = self._clip_norm
        if self.params.adaptive:
            count_noise = self.params.count_noise
            noise = self.rng.normal(0.0, count_noise) if count_noise > 0 else 0.0
            unclipped_fraction = (self._unclipped + noise) / count
            next_clip_norm = self._clip_norm * math.exp(
                -self.params.clip_learning_rate * (unclipped_fraction - self.params.target_unclipped_quantile)
            )
        rounds = self._context.round
        budget = self.params.epsilon_budget
        metrics = {
            **inner.metrics,
            **self._metrics.result(),
            "epsilon": self.epsilon(rounds),
            "clip_norm": self._clip_norm,
            "clipped_fraction": min(1.0, max(0.0, 1.0 - unclipped_fraction)),
        }
        stop = inner.stop or (budget is not None and self.epsilon(rounds + 1) > budget)
        self._global = None
        return RoundResult(
            weights=weights,
            metrics=metrics,
            carry={**inner.carry, "clip_norm": next_clip_norm},
            stop=stop,
            state=inner.state,
        )

    # ---- async: FedBuff's buffer, clipped and noised ---------------------------------------------
    def apply_async(
        self,
        global_weights: Weights,
        update: ClientUpdate,
        *,
        staleness: int,
        state: AggregatorState | None = None,
    ) -> AsyncResult:
        own = dict(state.values) if state is not None else {}
        steps = int(own.pop(STEPS, 0))
        in_buffer = [c for c in str(own.pop(IN_BUFFER, "")).split(",") if c]
        budget = self.params.epsilon_budget
        if budget is not None and self.epsilon(steps + 1) > budget:
            raise PrivacyBudgetExhausted(
                f"server step {steps + 1} would bring epsilon to {self.epsilon(steps + 1):.4g}, "
                f"over the budget of {budget:g}"
            )
        if update.client_id in in_buffer:
            raise AggregationError(
                "dp_one_per_buffer",
                f"{update.client_id!r} already has an update in this buffer "
                "(one client may move a server step by at most C)",
            )
        if update.base_weights is None:
            raise AggregationError(
                "missing_base_weights", f"dp-noise needs the base weights of {update.client_id!r}"
            )
        moved = delta(update.weights, update.base_weights)
        norm = global_norm(moved)
        scale = min(1.0, self._clip_norm / norm) if norm > 0 else 1.0
        clipped = {
            name: (update.base_weights[name] + tensor * scale).astype(update.weights[name].dtype)
            for name, tensor in moved.items()
        }
        inner_state = None if state is None else AggregatorState(arrays=state.arrays, values=own)
        result = self.inner.apply_async(
            global_weights,
            ClientUpdate(update.client_id, clipped, update.num_examples, update.metrics, update.base_version,
                         update.base_weights),
            staleness=staleness,
            state=inner_state,
        )  # fmt: skip
        metrics = {**result.metrics, "clipped": float(norm > self._clip_norm), "clip_norm": self._clip_norm}
        if result.weights is None:
            held = result.state or AggregatorState()
            values = {**held.values, STEPS: steps, IN_BUFFER: ",".join([*in_buffer, update.client_id])}
            return AsyncResult(None, AggregatorState(held.arrays, values), metrics)
        steps += 1
        step_scale = float(self.inner.params.server_lr) / int(self.inner.buffer_size)
        stddev = self.update_noise * self._clip_norm * step_scale
        weights = {}
        for name, tensor in result.weights.items():
            noisy = tensor.astype(np.float64)
            if stddev > 0:
                noisy = noisy + self.rng.normal(0.0, stddev, size=tensor.shape)
            weights[name] = noisy.astype(tensor.dtype)
        held = result.state or AggregatorState()
        stop = result.stop or (budget is not None and self.epsilon(steps + 1) > budget)
        return AsyncResult(
            weights,
            AggregatorState(held.arrays, {**held.values, STEPS: steps, IN_BUFFER: ""}),
            {**metrics, "epsilon": self.epsilon(steps), "server_steps": float(steps)},
            stop=stop,
        )

    def _current_clip_norm(self, carry: Mapping[str, Scalar]) -> float:
        clip_norm = float(carry.get("clip_norm", self.params.clip_norm))
        if not (math.isfinite(clip_norm) and clip_norm > 0):
            raise AggregationError("bad_carry", f"carried clip_norm must be positive and finite: {clip_norm}")
        return clip_norm


def _create(params: DpNoiseParams, ctx: FactoryContext) -> DpNoise:
    if ctx.mode == "async":
        inner_name = params.inner or "fedbuff"
        if inner_name != "fedbuff":
            raise PluginError(
                f"in async mode dp-noise noises FedBuff's buffer: inner must be fedbuff, not {inner_name!r}"
            )
        if params.adaptive:
            raise PluginError("adaptive clipping runs in sync mode only")
        return DpNoise(params, ctx.create(inner_name, params.inner_params), ctx.rng)
    inner_name = params.inner or "fedavg"
    if inner_name == "dp-noise":
        raise PluginError("dp-noise cannot wrap itself")
    if inner_name in SERVER_OPTIMIZERS:
        raise PluginError(
            f"dp-noise adds its noise to the inner's result, so around {inner_name!r} the noise would "
            "come after the optimizer's step instead of on the mean delta: not supported"
        )
    info = ctx.registry.info(inner_name)
    if "sync" not in info.modes:
        raise PluginError(f"dp-noise needs a sync inner aggregator; {inner_name!r} runs in async mode only")
    inner_params = dict(params.inner_params)
    if "weighted" in info.params.model_fields:
        if str(inner_params.get("weighted", False)).lower() not in ("false", "0"):
            raise PluginError("dp-noise weighs every client alike: inner.weighted must stay false")
        inner_params["weighted"] = False
    return DpNoise(params, ctx.create(inner_name, inner_params), ctx.rng)


@hookimpl
def register_aggregators(register):
    register(
        "dp-noise",
        _create,
        params=DpNoiseParams,
        modes=DpNoise.modes,
        description="Central DP: clip updates, average, add Gaussian noise (DP-FedAvg, McMahan et al. 2018)",
    )
