"""What an async run's update markers say: staleness, stream wait and updates in flight.

Every update the async handler consumed has a marker on the run table with its outcome, the
staleness it was applied or buffered at, when the stream took its record (``written_at``) and
when the batch that consumed it was committed (``consumed_at``), both on the server's clock. From
these the local runtime reports, per version and for the whole run:

- staleness p50 / p95 / max of the updates applied or buffered;
- stream wait: record written -> batch committed, p50 / p95 / max;
- in flight: records written and not yet consumed at once (the stream backlog), and whether any
  client ever had two (its next record written before its previous one was consumed).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

TAKEN = ("applied", "buffered")


@dataclass(frozen=True)
class Consumed:
    client_id: str
    base_version: int
    outcome: str
    staleness: int | None
    written_at: float | None
    consumed_at: float

    @property
    def taken(self) -> bool:
        return self.outcome in TAKEN

    @property
    def stream_wait(self) -> float | None:
        return None if self.written_at is None else self.consumed_at - self.written_at


def from_markers(markers: Iterable[Mapping[str, Any]]) -> list[Consumed]:
    out = [
        Consumed(
            client_id=str(m["client_id"]),
            base_version=int(m["base_version"]),
            outcome=str(m["outcome"]),
            staleness=None if m.get("staleness") is None else int(m["staleness"]),
            written_at=None if m.get("written_at") is None else float(m["written_at"]),
            consumed_at=float(m["consumed_at"]),
        )
        for m in markers
        if "consumed_at" in m and "client_id" in m
    ]
    return sorted(out, key=lambda c: (c.consumed_at, c.written_at or 0.0))


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "max": None, "mean": None}
    array = np.asarray(values, dtype=float)
    return {
        "p50": float(np.percentile(array, 50)),
        "p95": float(np.percentile(array, 95)),
        "max": float(array.max()),
        "mean": float(array.mean()),
    }


def max_backlog(updates: Sequence[Consumed], start: float = float("-inf"), end: float = float("inf")) -> int:
    """The most records written and not yet consumed at one moment within [start, end]."""
    events = []
    for u in updates:
        if u.written_at is None or u.consumed_at < start or u.written_at > end:
            continue
        events += [(max(u.written_at, start), 1), (u.consumed_at, -1)]
    level = peak = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):  # consume before write at a tie
        level += step
        peak = max(peak, level)
    return peak


def double_flights(updates: Sequence[Consumed]) -> dict[str, int]:
    """Clients whose next record was written before their previous one was consumed, and how often."""
    by_client: dict[str, list[Consumed]] = {}
    for u in updates:
        if u.written_at is not None:
            by_client.setdefault(u.client_id, []).append(u)
    found: dict[str, int] = {}
    for client_id, own in by_client.items():
        own.sort(key=lambda u: u.written_at or 0.0)
        overlaps = sum((nxt.written_at or 0.0) < prev.consumed_at for prev, nxt in itertools.pairwise(own))
        if overlaps:
            found[client_id] = overlaps
    return found


def run_summary(updates: Sequence[Consumed]) -> dict[str, Any]:
    taken = [u for u in updates if u.taken]
    staleness = [float(u.staleness) for u in taken if u.staleness is not None]
    quarters = [chunk for chunk in np.array_split(np.asarray(staleness), 4) if chunk.size]
    outcomes: dict[str, int] = {}
    for u in updates:
        outcomes[u.outcome] = outcomes.get(u.outcome, 0) + 1
    return {
        "updates": len(updates),
        "outcomes": outcomes,
        "staleness": {
            **percentiles(staleness),
            "mean_by_quarter": [float(q.mean()) for q in quarters],
            "max_by_quarter": [float(q.max()) for q in quarters],
        },
        "stream_wait_seconds": percentiles([w for u in updates if (w := u.stream_wait) is not None]),
        "max_backlog": max_backlog(updates),
        "clients_with_two_in_flight": double_flights(updates),
    }


def row_stats(updates: Sequence[Consumed], start: float, end: float) -> dict[str, Any]:
    """The figures of one version row: the updates consumed in (start, end]."""
    window = [u for u in updates if start < u.consumed_at <= end]
    staleness = percentiles([float(u.staleness) for u in window if u.taken and u.staleness is not None])
    wait = percentiles([w for u in window if (w := u.stream_wait) is not None])
    return {
        "staleness_p50": staleness["p50"],
        "staleness_p95": staleness["p95"],
        "staleness_max": staleness["max"],
        "stream_wait_p50": wait["p50"],
        "stream_wait_max": wait["max"],
        "in_flight_max": max_backlog(updates, start, end),
    }
