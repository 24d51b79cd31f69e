"""Every ``fedstream`` command in the README's shell blocks runs as written.

Each block's commands run in order in a fresh folder (the offline block makes the files its later
commands read). ``fedstream local`` runs get small settings on top of what the README says: the
NumPy trainer unless one is named, at most 2 rounds or 6 updates, and an output folder of the
test's; everything else is as written.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

README = Path(__file__).resolve().parents[2] / "README.md"
PROGRAMS = ("fedstream", ".venv/bin/fedstream")


def readme_blocks() -> list[list[list[str]]]:
    """The ``fedstream`` commands of each ```sh block (continuation lines joined, comments dropped).

    A block marked ``<!-- several terminals ... -->`` (a server, clients and commands at once) is
    left to the end-to-end test it names.
    """
    blocks = []
    text = re.sub(r"<!-- several terminals[^>]*-->\n```sh\n.*?```", "", README.read_text(), flags=re.S)
    for body in re.findall(r"```(?:sh|bash)\n(.*?)```", text, re.S):
        commands = [
            tokens[1:]
            for line in body.replace("\\\n", " ").splitlines()
            if (tokens := shlex.split(line, comments=True)) and tokens[0] in PROGRAMS
        ]
        if commands:
            blocks.append(commands)
    return blocks


def small(arguments: list[str], out: Path) -> list[str]:
    """A ``local`` command with the test's small settings after the README's (argparse: last wins)."""
    if arguments[0] != "local":
        return arguments
    extra = ["--no-progress", "--out", str(out)]
    if "--trainer" not in arguments:
        extra += ["--trainer", "numpy"]
    if "--rounds" in arguments or "--mode" not in arguments or "sync" in arguments:
        extra += ["--rounds", str(min(2, _value(arguments, "--rounds", 3)))]
    if "async" in arguments:
        extra += ["--updates", str(min(6, _value(arguments, "--updates", 20)))]
    return arguments + extra


def _value(arguments: list[str], option: str, default: int) -> int:
    return int(arguments[arguments.index(option) + 1]) if option in arguments else default


BLOCKS = readme_blocks()


def test_the_readme_has_the_commands_this_test_runs() -> None:
    commands = [" ".join(command) for block in BLOCKS for command in block]
    assert sum(command.startswith("local ") for command in commands) >= 3
    for expected in ("model init", "model train", "aggregate --aggregator", "privacy --noise-multiplier"):
        assert any(command.startswith(expected) for command in commands), expected


@pytest.mark.parametrize("block", BLOCKS, ids=[" / ".join(c[0] for c in block) for block in BLOCKS])
def test_each_readme_command_runs_as_written(tmp_path: Path, block: list[list[str]]) -> None:
    for number, arguments in enumerate(block):
        out = tmp_path / f"run-{number}"
        command = [sys.executable, "-m", "fedstream.cli", *small(arguments, out)]

        done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)

        assert done.returncode == 0, f"{shlex.join(arguments)}\n{done.stdout}\n{done.stderr}"
        assert "Traceback" not in done.stderr, done.stderr
        if arguments[0] == "local":
            assert json.loads((out / "metrics.json").read_text())["status"] == "SUCCEEDED"
        else:
            assert done.stdout.strip(), shlex.join(arguments)
