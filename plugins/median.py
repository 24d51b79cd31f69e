"""Coordinate-wise median — Yin et al. 2018, "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates" (ICML).

    w_new[j] = median(w_1[j], ..., w_n[j])      for every coordinate j of every tensor

unweighted (every client counts 1), the mean of the two middle values when n is even. One value
per coordinate comes from the honest clients as long as fewer than half the updates are corrupted.

Memory is O(n * model): every update of a round (sync) or every delta of the buffer (async) is kept
until the median is taken (plugins/_robust.py). Async takes FedBuff's step with the median of the K
staleness-weighted deltas: x <- x + eta_g * median(s(tau_i) * (w_i - x_base(i))).
"""

from __future__ import annotations

from collections.abc import Sequence

from fedstream.plugins._robust import RobustAggregator, RobustParams, coordinatewise, middle_mean

from fedstream import hookimpl
from fedstream.weights import Weights


class MedianParams(RobustParams):
    pass


class Median(RobustAggregator):
    name = "median"

    def combine(
        self, rows: Sequence[Weights], like: Weights, sources: Sequence[str]
    ) -> tuple[Weights, dict[str, float]]:
        # The median is the trimmed mean that keeps only the middle one (n odd) or two (n even).
        cut = (len(rows) - 1) // 2
        return coordinatewise(rows, like, lambda block: middle_mean(block, cut)), {}


@hookimpl
def register_aggregators(register):
    register(
        "median",
        lambda params, ctx: Median(params, ctx.num_clients),
        params=MedianParams,
        modes=Median.modes,
        description="Coordinate-wise median, unweighted (Yin et al. 2018); keeps all K updates of a round "
        "or buffer: memory O(K x model)",
    )
