"""Coordinate-wise trimmed mean — Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards
Optimal Statistical Rates" (ICML).

For every coordinate j of every tensor, with the n values sorted v_(1) <= ... <= v_(n) and
c = floor(beta * n) values cut at each end (0 <= beta < 0.5)::

    w_new[j] = (1 / (n - 2c)) * sum_{k = c+1}^{n-c} v_(k)

unweighted (every client counts 1). The default beta = 0.25 cuts 1 value at each end for n = 4..7,
2 for n = 8..11, and none for n <= 3 (a plain mean). Up to c corrupted values per coordinate are
cut whatever their size; it is scipy.stats.trim_mean(stack, beta, axis=0).

Memory is O(n * model): every update of a round (sync) or every delta of the buffer (async) is kept
until the mean is taken (plugins/_robust.py). Async takes FedBuff's step with the trimmed mean of
the K staleness-weighted deltas: x <- x + eta_g * trimmed_mean(s(tau_i) * (w_i - x_base(i))).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pydantic
from fedstream.plugins._robust import RobustAggregator, RobustParams, coordinatewise, middle_mean

from fedstream import hookimpl
from fedstream.weights import Weights


class TrimmedMeanParams(RobustParams):
    beta: float = pydantic.Field(
        0.25,
        ge=0.0,
        lt=0.5,
        description="Coordinate-wise mean without floor(beta * n) values at each end, unweighted "
        "(Yin et al. 2018); keeps all K updates of a round or buffer: memory O(K x model)",
    )


class TrimmedMean(RobustAggregator):
    name = "trimmed-mean"
    params: TrimmedMeanParams

    def combine(
        self, rows: Sequence[Weights], like: Weights, sources: Sequence[str]
    ) -> tuple[Weights, dict[str, float]]:
        cut = math.floor(self.params.beta * len(rows))
        trimmed = coordinatewise(rows, like, lambda block: middle_mean(block, cut))
        return trimmed, {"trimmed_per_end": float(cut)}


@hookimpl
def register_aggregators(register):
    register(
        "trimmed-mean",
        lambda params, ctx: TrimmedMean(params, ctx.num_clients),
        params=TrimmedMeanParams,
        modes=TrimmedMean.modes,
        description="Coordinate-wise mean without floor(beta * n) values at each end, unweighted "
        "(Yin et al. 2018); keeps all K updates of a round or buffer: memory O(K x model)",
    )
