"""Starting ``fedstream`` as a user's shell would, and leaving no process behind.

A process started in the background by a non-interactive shell (a CI job, ``cmd &``) inherits
SIGINT *ignored*, and Python then installs no Ctrl-C handler. A foreground command in a terminal
has the default. :data:`AS_IN_A_TERMINAL` gives the command the default before it starts, so the
Ctrl-C tests test what a terminal does whatever ran pytest.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

# python -c '<reset SIGINT, then exec fedstream>' ARGS...: exec keeps the default disposition
AS_IN_A_TERMINAL = [
    sys.executable,
    "-c",
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.executable, [sys.executable, '-m', 'fedstream.cli', *sys.argv[1:]])",
]


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid``, from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if fields[0] != "Z":
                parents[int(entry.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"


def kill_everything(process: subprocess.Popen, known: set[int] = frozenset()) -> None:  # type: ignore[type-arg]
    """SIGKILL ``process``, whatever it started (in its own groups too) and ``known`` pids."""
    for pid in descendants(process.pid) | set(known) | {process.pid}:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        process.wait(timeout=30)
