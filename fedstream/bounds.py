"""Influence bounds: how much one client's update may move the global model, in every mode.

A finite, well-formed update can still steer a run: a delta a million times larger than anyone
else's, an example count of 1e9, a copy of the global model, an object the client already sent.
These checks run on every aggregation path (sync rounds, async stream batches, the offline CLI),
before the aggregator sees an update, and refuse with a reason:

- ``no_change``: the update equals the model it was trained from (free-riding);
- ``replay``: the client already sent this object (same sha256) for another round or version;
- ``norm_bound``: the update's delta norm ``||w - base||`` is more than ``norm_factor`` times the
  median of the reference norms (sync: every report of the round; async: the last ``window``
  updates the run took; offline: the updates given), once there are ``min_reference`` of them;
  or more than ``max_update_norm`` (always, when set);
- example counts are capped, not refused: at ``example_factor`` times the round's median count
  (sync, offline), and at ``max_examples`` (every mode, when set).

The defaults are on; ``InfluenceBounds.off()`` turns every relative bound off (an absolute one
still applies when set). They cost an honest run nothing measurable (``benchmarks/learning_quality.py``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fedstream.errors import Refused
from fedstream.weights import Weights


class InfluenceBounds(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    norm_factor: float = Field(
        10.0, ge=0, description="refuse a delta norm above this many times the reference median (0: off)"
    )
    max_update_norm: float | None = Field(
        None, gt=0, description="refuse a delta norm above this (None: off)"
    )
    min_reference: int = Field(3, ge=1, description="reference norms needed before norm_factor applies")
    window: int = Field(
        20, ge=1, le=200, description="async: recent applied updates the median is taken over"
    )
    example_factor: float = Field(
        4.0, ge=0, description="cap num_examples at this many times the round's median (0: off)"
    )
    max_examples: int | None = Field(None, ge=1, description="cap num_examples at this (None: off)")

    @classmethod
    def off(cls) -> InfluenceBounds:
        return cls(norm_factor=0.0, example_factor=0.0)


class OutOfBounds(Refused):
    """An update outside the run's influence bounds; ``reason`` names which. Constructed as
    ``OutOfBounds(reason, message)``."""


def delta_norm(weights: Mapping[str, np.ndarray], base: Weights) -> float:
    """``||weights - base||`` over all tensors together, in float64 (no overflow for float32 inputs)."""
    total = 0.0
    for name, reference in base.items():
        diff = np.subtract(weights[name], reference, dtype=np.float64)
        total += float(np.vdot(diff, diff))
    return math.sqrt(total)


def max_abs(weights: Weights) -> float:
    return max((float(np.max(np.abs(t))) for t in weights.values() if t.size), default=0.0)


def sum_limit(weights: Weights) -> float:
    """The largest magnitude an aggregation sum over these tensors may reach (their sum dtype's max)."""
    return min(
        (float(np.finfo(np.result_type(t.dtype, np.float32)).max) for t in weights.values()),
        default=float(np.finfo(np.float32).max),
    )


def check_change(norm: float, client_id: str) -> None:
    if norm == 0.0:
        raise OutOfBounds(
            "no_change", f"the update of {client_id!r} is identical to the model it was trained from"
        )


def check_norm(bounds: InfluenceBounds, norm: float, reference: Sequence[float], client_id: str) -> None:
    """Refuse ``norm`` beyond the absolute limit, or beyond ``norm_factor`` x median(reference)."""
    if bounds.max_update_norm is not None and norm > bounds.max_update_norm:
        raise OutOfBounds(
            "norm_bound",
            f"the update of {client_id!r} has delta norm {norm:.4g} > max_update_norm "
            f"{bounds.max_update_norm:.4g}",
        )
    if bounds.norm_factor and len(reference) >= bounds.min_reference:
        median = statistics.median(reference)
        if norm > bounds.norm_factor * median:
            raise OutOfBounds(
                "norm_bound",
                f"the update of {client_id!r} has delta norm {norm:.4g}, more than {bounds.norm_factor:g}x "
                f"the median {median:.4g} of {len(reference)} updates",
            )


def example_cap(bounds: InfluenceBounds, counts: Sequence[int]) -> int | None:
    """The most examples one update may carry among ``counts`` (None: no cap)."""
    caps = []
    if bounds.max_examples is not None:
        caps.append(bounds.max_examples)
    if bounds.example_factor and counts:
        caps.append(max(1, int(bounds.example_factor * statistics.median(counts))))
    return min(caps) if caps else None


def remember_norm(bounds: InfluenceBounds, window: Sequence[float], norm: float) -> list[float]:
    """The async reference window after an update with ``norm`` was taken."""
    return [*window, norm][-bounds.window :]


def admit_round(
    bounds: InfluenceBounds, candidates: Mapping[str, tuple[float, int]], base: Weights
) -> tuple[dict[str, int], dict[str, OutOfBounds]]:
    """Which of a round's updates to aggregate, and with how many examples each.

    ``candidates`` maps each client to its update's (delta norm, num_examples). Returns the admitted
    clients with their capped example counts, and the refused ones with why. The norm bound takes
    the median over every candidate. Then the sum is kept finite: an update's weights are at most
    ``max|base| + norm`` in magnitude, so an example-weighted sum stays below the sum dtype's limit
    while the admitted ``n * (max|base| + norm)`` add up to less than half of it; past that the
    largest contributions are refused as ``non_finite`` and the round closes with the rest.
    """
    norms = [norm for norm, _ in candidates.values()]
    refused: dict[str, OutOfBounds] = {}
    for client_id, (norm, _) in candidates.items():
        try:
            check_norm(bounds, norm, norms, client_id)
        except OutOfBounds as exc:
            refused[client_id] = exc
    cap = example_cap(bounds, [count for _, count in candidates.values()])
    counts = {
        client_id: count if cap is None else min(count, cap)
        for client_id, (_, count) in candidates.items()
        if client_id not in refused
    }
    largest, limit = max_abs(base), sum_limit(base) / 2
    total = 0.0
    admitted: dict[str, int] = {}
    for client_id in sorted(counts, key=lambda c: counts[c] * (largest + candidates[c][0])):
        contribution = counts[client_id] * (largest + candidates[client_id][0])
        if total + contribution > limit:
            refused[client_id] = OutOfBounds(
                "non_finite",
                f"with the update of {client_id!r} (delta norm {candidates[client_id][0]:.4g}, "
                f"{counts[client_id]} examples) the round's sum could overflow",
            )
            continue
        total += contribution
        admitted[client_id] = counts[client_id]
    return admitted, refused


def for_run(deployed: InfluenceBounds, stored: str | None) -> InfluenceBounds:
    """The bounds a run uses: the deployment's, with the run's own (JSON on its state item) over them."""
    if not stored:
        return deployed
    return InfluenceBounds.model_validate(
        {
            **deployed.model_dump(),
            **InfluenceBounds.model_validate_json(stored).model_dump(exclude_unset=True),
        }
    )
