"""Krum and Multi-Krum — Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine
Tolerant Gradient Descent" (NeurIPS).

With n updates, f of them assumed malicious, and squared L2 distances over all tensors together::

    score(i) = sum of ||u_i - u_j||^2 over the k updates j != i closest to u_i,  k = n - f - 2
    w_new    = mean of the m updates with the lowest scores     (m = 1: Krum; m > 1: Multi-Krum)

unweighted (every client counts 1). The paper's guarantee needs n > 2f + 2; with fewer updates
k = n - f - 2 would be below 1, and k = max(1, n - f - 2) is used instead (k = n - 1 at most), so
a score is still the distance to the nearest other update. m is capped at n; ties in score go to
the earlier update. Metrics: ``krum_selected`` (how many were averaged) and
``krum_excluded.<client id>`` = 1.0 for every update left out.

Memory is O(n * model): every update of a round (sync) or every delta of the buffer (async) is kept
until the scores are known (plugins/_robust.py); the n x n distances take O(n^2 * model) work.
Async takes FedBuff's step with Krum over the K staleness-weighted deltas:
x <- x + eta_g * krum(s(tau_i) * (w_i - x_base(i))).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pydantic
from fedstream.plugins._robust import RobustAggregator, RobustParams, blocks, coordinatewise, mean_of_rows

from fedstream import hookimpl
from fedstream.weights import Weights


class KrumParams(RobustParams):
    f: int = pydantic.Field(1, ge=0, description="updates assumed malicious")
    m: int = pydantic.Field(
        1, ge=1, description="how many lowest-score updates to average (1: Krum, more: Multi-Krum)"
    )


def squared_distances(rows: Sequence[Weights], like: Weights) -> np.ndarray:
    """The n x n matrix of squared L2 distances between the rows, over all tensors together."""
    count = len(rows)
    distances = np.zeros((count, count))
    for _, _, block in blocks(rows, like):
        for i in range(count - 1):
            difference = block[i + 1 :] - block[i]
            distances[i, i + 1 :] += np.einsum("ij,ij->i", difference, difference)
    return distances + distances.T


def krum_scores(distances: np.ndarray, f: int) -> np.ndarray:
    """Each row's sum of squared distances to its max(1, n - f - 2) closest other rows."""
    count = len(distances)
    closest = min(count - 1, max(1, count - f - 2))
    return np.array([np.sort(np.delete(distances[i], i))[:closest].sum() for i in range(count)])


class Krum(RobustAggregator):
    name = "krum"
    params: KrumParams

    def combine(
        self, rows: Sequence[Weights], like: Weights, sources: Sequence[str]
    ) -> tuple[Weights, dict[str, float]]:
        scores = krum_scores(squared_distances(rows, like), self.params.f)
        chosen = sorted(int(i) for i in np.argsort(scores, kind="stable")[: self.params.m])
        mean = coordinatewise([rows[i] for i in chosen], like, mean_of_rows)
        metrics = {"krum_selected": float(len(chosen))}
        metrics.update({f"krum_excluded.{sources[i]}": 1.0 for i in range(len(rows)) if i not in chosen})
        return mean, metrics


@hookimpl
def register_aggregators(register):
    register(
        "krum",
        lambda params, ctx: Krum(params, ctx.num_clients),
        params=KrumParams,
        modes=Krum.modes,
        description="Mean of the m updates nearest their n-f-2 closest others: Krum, Multi-Krum "
        "(Blanchard et al. 2017); keeps all K updates of a round or buffer: memory O(K x model)",
    )
