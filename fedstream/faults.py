"""Fault points: named places in the server code that a test can make fail on purpose.

A fault point costs one dictionary lookup and does nothing unless armed::

    from fedstream import faults

    faults.arm("aggregate.after_object_write")        # the next pass raises InjectedFault
    faults.arm("aggregate.after_flip", times=2)      # the next two passes raise
    faults.disarm()                                  # all of them off again

Armed points are process-wide, so they reach handlers that the local runtime runs in process. The
points the server code passes through are listed in ``POINTS``; arming another name is an error,
so a test cannot arm a point that no code reaches.
"""

from __future__ import annotations

import threading
from collections import Counter

POINTS = {
    "aggregate.before_object_write": "a round is aggregated; the new global object is not written yet",
    "aggregate.after_object_write": "the new global object is written; the version pointer is not flipped",
    "aggregate.after_flip": "the version pointer is flipped; the round is not marked closed yet",
    "aggregate.before_callback": "the round is closed; SendTaskSuccess is not sent yet",
    "async.before_commit": "an async batch is applied and its objects written; its transaction is not sent",
    "async.before_notify": "an async batch is committed; the clients are not told yet",
}


class InjectedFault(RuntimeError):
    """Raised by an armed fault point; the handler fails as if its process had crashed there."""

    def __init__(self, name: str) -> None:
        super().__init__(f"injected fault at {name}")
        self.name = name


_armed: Counter[str] = Counter()
_fired: Counter[str] = Counter()
_lock = threading.Lock()


def arm(name: str, times: int = 1) -> None:
    """Make the next ``times`` passes through point ``name`` raise :class:`InjectedFault`."""
    if name not in POINTS:
        raise ValueError(f"unknown fault point {name!r}; known: {', '.join(sorted(POINTS))}")
    if times < 1:
        raise ValueError(f"times must be >= 1, got {times}")
    with _lock:
        _armed[name] += times


def disarm() -> None:
    """Switch every fault point off and forget what fired."""
    with _lock:
        _armed.clear()
        _fired.clear()


def fired() -> dict[str, int]:
    """How often each point raised since the last :func:`disarm`."""
    with _lock:
        return dict(_fired)


def point(name: str) -> None:
    """Pass through fault point ``name``: raise if it is armed."""
    if not _armed:
        return
    with _lock:
        if _armed[name] <= 0:
            return
        _armed[name] -= 1
        if not _armed[name]:
            del _armed[name]
        _fired[name] += 1
    raise InjectedFault(name)
