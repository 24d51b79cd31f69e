"""TensorFlow's start-up lines, kept off the terminal.

Importing TensorFlow writes a few lines straight to file descriptor 2 from its C++ runtime (an absl
notice and "oneDNN custom operations are on"), whatever ``TF_CPP_MIN_LOG_LEVEL`` says, so Python's
warnings filters cannot catch them. :func:`import_tensorflow` imports it with descriptor 2 pointed at
a temporary file, then logs each of those known lines at debug level on ``fedstream.tensorflow`` and
writes anything else it printed (an error, a traceback) back to stderr unchanged.

``FEDSTREAM_VERBOSE=1`` (``fedstream local -v``) imports it as it is, lines and all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import threading

VERBOSE_ENV = "FEDSTREAM_VERBOSE"
log = logging.getLogger("fedstream.tensorflow")

# absl's notice, and its INFO / WARNING lines ("I0000 00:00:1796219987.906006   19368 port.cc:153] ...").
# An error line (E...) is not noise: it goes back to stderr.
_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|[IW]\d{4} \d\d:\d\d:[\d.]+\s+\d+ \S+:\d+\] .*)$"
)
_lock = threading.Lock()


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def is_noise(line: str) -> bool:
    return bool(_NOISE.match(line))


def import_tensorflow() -> None:
    """Import TensorFlow (and with it Keras) once, its start-up lines logged at debug level."""
    with _lock:
        if "tensorflow" in sys.modules:
            return
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        if verbose():
            import tensorflow

            return
        with captured_stderr() as captured:
            import tensorflow  # noqa: F401
    for line in captured.text.splitlines():
        if is_noise(line):
            log.debug("tensorflow: %s", line)
        elif line.strip():
            sys.stderr.write(line + "\n")


class _Captured:
    text = ""


@contextlib.contextmanager
def captured_stderr():  # type: ignore[no-untyped-def]
    """Point file descriptor 2 at a temporary file for the block; its text is in ``.text`` after."""
    captured = _Captured()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.text = sink.read().decode(errors="replace")
