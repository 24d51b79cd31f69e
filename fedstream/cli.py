"""The ``fedstream`` command. Each command group lives in its own module with ``add_commands``."""

from __future__ import annotations

import argparse
import importlib
import os
import select
import sys
from collections.abc import Sequence

COMMAND_MODULES = (
    "fedstream.offline",
    "fedstream.local.cli",
    "fedstream.client.cli",
    "fedstream.client.export",
    "fedstream.runs",
)


class CliError(Exception):
    """A user-facing error: printed as one line on stderr, exit status 2."""


def parse_params(pairs: Sequence[str] | None) -> dict[str, str]:
    """``["mu=0.1", "inner=fedavg"]`` -> ``{"mu": "0.1", "inner": "fedavg"}`` (pydantic coerces types)."""
    params: dict[str, str] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"--param expects key=value, got {pair!r}")
        params[key.strip()] = value.strip()
    return params


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedstream",
        description="Serverless, event-driven federated learning on AWS managed services.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from fedstream.errors import Refused
    from fedstream.registry import PluginError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a reader that went away (`| head`) shows here, not at interpreter exit
        return code
    except BrokenPipeError as exc:
        if _stdout_reader_gone():
            return _stdout_closed()
        print(f"fedstream {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (CliError, PluginError, Refused, FileNotFoundError, OSError) as exc:
        print(f"fedstream {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fedstream {args.command}: interrupted", file=sys.stderr)
        return 130


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (a broken pipe elsewhere is a real error)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll() here, or no file descriptor behind stdout
        return False


def _stdout_closed() -> int:
    """The reader of stdout went away (``fedstream plugins list --json | head``): stop quietly.

    Python's recipe: point stdout at devnull so the flush at exit cannot raise again, and exit as a
    process killed by SIGPIPE would (128 + 13), without a traceback or an error line.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no file descriptor behind stdout (e.g. captured): nothing to flush
        pass
    return 141


def entry() -> None:
    """The ``fedstream`` script: :func:`main`, then exit at once.

    A normal interpreter exit tears down what the command imported: 1.5 to 2 s for TensorFlow
    (measured here), most of the time a Ctrl-C'd ``fedstream local`` took to stop. Once the command
    has returned nothing of ours is left to clean up (files are closed by their ``with`` blocks,
    child processes are stopped): flush the logs and the standard streams, and leave.
    """
    import contextlib
    import logging

    code = main()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more can be written
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    # `python -m fedstream.cli`: run the imported module, so CliError here is the one commands raise
    from fedstream.cli import entry as imported_entry

    imported_entry()
