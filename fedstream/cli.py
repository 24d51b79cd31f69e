"""The ``fedstream`` command. Each command group lives in its own module with ``add_commands``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMAND_MODULES = (
    "fedstream.offline",
    "fedstream.local.cli",
    "fedstream.client.cli",
    "fedstream.client.export",
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
        return int(args.func(args) or 0)
    except (CliError, PluginError, Refused, FileNotFoundError, OSError) as exc:
        print(f"fedstream {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fedstream {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
