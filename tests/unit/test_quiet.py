"""TensorFlow's start-up lines stay off the terminal (they go to the debug log), anything else it
prints gets through, and ``FEDSTREAM_VERBOSE=1`` (``fedstream local -v``) lets them all through."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from fedstream.client.quiet import is_noise

IMPORT = (
    "import logging, sys\n"
    "logging.basicConfig(level=logging.DEBUG, stream=sys.stdout, format='%(name)s %(message)s')\n"
    "from fedstream.client.quiet import import_tensorflow\n"
    "import_tensorflow()\n"
)


def run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    environment = {
        k: v for k, v in os.environ.items() if k not in ("TF_ENABLE_ONEDNN_OPTS", "FEDSTREAM_VERBOSE")
    }
    return subprocess.run(
        [sys.executable, "-c", IMPORT],
        env={**environment, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize(
    ("line", "noise"),
    [
        ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR", True),
        ("I0000 00:00:1796219987.906006   19368 port.cc:153] oneDNN custom operations are on.", True),
        ("W0000 00:00:1796219987.906006   19368 cpu_feature_guard.cc:210] This TensorFlow binary", True),
        ("E0000 00:00:1796219987.906006   19368 cuda_dnn.cc:8310] Unable to register cuDNN", False),
        ("Traceback (most recent call last):", False),
        ("ImportError: libcudart.so.12: cannot open shared object file", False),
    ],
)
def test_only_absl_notices_and_info_or_warning_lines_count_as_noise(line: str, noise: bool) -> None:
    assert is_noise(line) is noise


def test_importing_tensorflow_leaves_stderr_clean_and_logs_its_lines_at_debug_level() -> None:
    done = run({})

    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert "fedstream.tensorflow tensorflow: " in done.stdout and "oneDNN" in done.stdout


def test_verbose_lets_tensorflow_speak() -> None:
    done = run({"FEDSTREAM_VERBOSE": "1"})

    assert done.returncode == 0, done.stderr
    assert "oneDNN" in done.stderr
    assert "fedstream.tensorflow" not in done.stdout
