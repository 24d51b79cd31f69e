"""Reading the JSON log stream back: EMF metric lines and structured log records."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def json_lines(text: str) -> Iterator[dict[str, Any]]:
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                yield json.loads(line)


def metric_total(value: Any) -> float:
    return float(sum(value)) if isinstance(value, list) else float(value)


def metric_counts(text: str, metric: str, dimension: str) -> dict[str, int]:
    """Sum an EMF metric by one dimension, e.g. ``UpdatesRejected`` by ``reason``."""
    counts: dict[str, int] = {}
    for entry in json_lines(text):
        if "_aws" in entry and metric in entry and dimension in entry:
            key = str(entry[dimension])
            counts[key] = counts.get(key, 0) + int(metric_total(entry[metric]))
    return counts


def rejections_by_client(text: str) -> dict[str, dict[str, int]]:
    """Rejected updates per client and reason, from the handlers' ``"update rejected"`` warnings.

    ``count_rejection`` (handlers/observability.py) writes one warning per rejection next to its
    ``UpdatesRejected`` metric line; the warning carries the correlation keys, the metric does not.
    """
    counts: dict[str, dict[str, int]] = {}
    for entry in json_lines(text):
        if entry.get("message") == "update rejected" and "reason" in entry:
            per_client = counts.setdefault(str(entry.get("client_id")), {})
            reason = str(entry["reason"])
            per_client[reason] = per_client.get(reason, 0) + 1
    return counts


def rejection_events(
    entries: Iterable[dict[str, Any]],
) -> list[tuple[float, str, int]]:
    """``(epoch seconds, reason, count)`` of each ``UpdatesRejected`` EMF line, in log order."""
    events = []
    for entry in entries:
        if "_aws" in entry and "UpdatesRejected" in entry and "reason" in entry:
            at = float(entry["_aws"].get("Timestamp", 0)) / 1000.0
            events.append((at, str(entry["reason"]), int(metric_total(entry["UpdatesRejected"]))))
    return events


def staleness_values(entries: Iterable[dict[str, Any]]) -> list[float]:
    """The ``Staleness`` of every update the async handler took (applied or buffered), in log order."""
    values: list[float] = []
    for entry in entries:
        if "_aws" in entry and "Staleness" in entry:
            value = entry["Staleness"]
            values += [float(v) for v in value] if isinstance(value, list) else [float(value)]
    return values


class LogTail:
    """The complete lines a growing JSON-lines file gained since the last read (the live view's feed)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0

    def entries(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as stream:
                stream.seek(self._offset)
                chunk = stream.read()
        except FileNotFoundError:
            return []
        complete = chunk.rfind(b"\n") + 1  # a line still being written waits for the next read
        self._offset += complete
        return list(json_lines(chunk[:complete].decode(errors="replace")))
