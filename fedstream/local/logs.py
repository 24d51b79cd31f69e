"""Reading the JSON log stream back: EMF metric lines and structured log records."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
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
