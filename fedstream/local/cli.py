"""``fedstream local``: run federated training end to end on the embedded AWS."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _stragglers(text: str) -> tuple[int, float]:
    count, _, factor = text.partition(":")
    try:
        return int(count), float(factor or 4.0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--stragglers expects K:FACTOR, e.g. 2:4, got {text!r}") from None


def parse_bounds(pairs: Sequence[str] | None, *, off: bool = False) -> Any:
    """``--no-bounds`` and ``--bound NAME=VALUE`` -> an :class:`~fedstream.bounds.InfluenceBounds`.

    The defaults (or ``InfluenceBounds.off()`` with ``off``), then each NAME=VALUE over them;
    ``none`` clears an optional bound (``max_update_norm``, ``max_examples``).
    """
    import pydantic

    from fedstream.bounds import InfluenceBounds
    from fedstream.cli import CliError

    base = InfluenceBounds.off() if off else InfluenceBounds()
    names = list(InfluenceBounds.model_fields)
    fields: dict[str, Any] = base.model_dump()
    for pair in pairs or ():
        name, sep, value = pair.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or not value:
            raise CliError(f"--bound expects NAME=VALUE, e.g. norm_factor=5, got {pair!r}")
        if name not in names:
            raise CliError(f"--bound: unknown bound {name!r}; choose one of {', '.join(names)}")
        fields[name] = None if value.lower() == "none" else value
    try:
        return InfluenceBounds.model_validate(fields)
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc'])}={error.get('input')!r}: {error['msg']}"
            for error in exc.errors()
        )
        raise CliError(f"--bound: {problems}") from None


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "local",
        help="run federated training on an embedded AWS (moto server) on this machine",
        description="Start a moto server, create the stack's resources, run the real handlers and "
        "state machine, start N client processes, and train.",
    )
    parser.add_argument("--mode", choices=["sync", "async"], default="sync")
    parser.add_argument("--aggregator", default="fedavg")
    parser.add_argument("--param", action="append", metavar="K=V", help="aggregator parameter (repeatable)")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="sync: at most this many rounds")
    parser.add_argument("--updates", type=int, default=20, help="async: stop after this many applied updates")
    parser.add_argument("--max-seconds", type=float, default=0.0, help="async: wall-clock limit (0: none)")
    parser.add_argument("--dataset", default="mnist-5k", choices=["mnist-5k", "digits", "fashion-mnist"])
    parser.add_argument("--partition", default="iid", help="iid | dirichlet:ALPHA | shards:S")
    parser.add_argument("--min-clients", type=int, help="quorum to close a round at its deadline")
    parser.add_argument("--round-timeout", type=int, default=300, help="round deadline in seconds")
    parser.add_argument("--stragglers", type=_stragglers, metavar="K:FACTOR", help="slow K clients by FACTOR")
    parser.add_argument("--target-accuracy", type=float, help="stop once clients report this eval accuracy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trainer", default="keras", help="keras | numpy (logistic regression, no TF)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument(
        "--client-threads",
        action="store_true",
        help="run the clients as threads of this process (many light clients, e.g. --trainer instant)",
    )
    parser.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="SPEC",
        help="inject a fault (repeatable): aggregate.<point>[:N], throttle:s3|dynamodb:Op[:N], "
        "error:s3|dynamodb:Op[:N], kill:CLIENT[:ROUND], hang:CLIENT, redeliver:N",
    )
    parser.add_argument(
        "--no-bounds",
        action="store_true",
        help="turn the relative influence bounds off (norm_factor=0, example_factor=0)",
    )
    parser.add_argument(
        "--bound",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set an influence bound (repeatable): norm_factor, max_update_norm, min_reference, "
        "window, example_factor, max_examples; 'none' clears an optional one",
    )
    parser.add_argument(
        "--attack",
        action="append",
        default=[],
        metavar="CLIENT=SPEC",
        help="make a client malicious, to evaluate defences (repeatable): sign-flip:F | scale:F | copy, "
        "optionally :examples=N, e.g. site-4=sign-flip:10:examples=1000000000",
    )
    parser.add_argument("--visibility-timeout", type=int, default=300, help="client message visibility (s)")
    parser.add_argument("--out", type=Path, default=Path("runs/local"))
    parser.add_argument("--no-progress", action="store_true", help="plain lines instead of a live table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from fedstream.cli import CliError, parse_params
    from fedstream.local.attack import AttackSpecError, parse_attackers
    from fedstream.local.run import LocalRunConfig, run_local

    if args.clients < 1:
        raise CliError("--clients must be at least 1")
    if args.min_clients is not None and not 1 <= args.min_clients <= args.clients:
        raise CliError(f"--min-clients must be between 1 and --clients ({args.clients})")
    stragglers, factor = args.stragglers or (0, 1.0)
    if stragglers > args.clients:
        raise CliError("--stragglers cannot slow more clients than there are")
    bounds = parse_bounds(args.bound, off=args.no_bounds)
    try:
        attackers = parse_attackers(args.attack)
    except AttackSpecError as exc:
        raise CliError(str(exc)) from None
    config = LocalRunConfig(
        mode=args.mode,
        aggregator=args.aggregator,
        params=parse_params(args.param),
        clients=args.clients,
        rounds=args.rounds,
        dataset=args.dataset,
        partition=args.partition,
        min_clients=args.min_clients,
        round_timeout=args.round_timeout,
        stragglers=stragglers,
        straggler_factor=factor,
        target_accuracy=args.target_accuracy,
        seed=args.seed,
        out=args.out,
        trainer=args.trainer,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        progress=not args.no_progress,
        updates=args.updates,
        max_seconds=args.max_seconds,
        client_runtime="thread" if args.client_threads else "process",
        visibility_timeout=args.visibility_timeout,
        faults=tuple(args.fault),
        bounds=bounds,
        attackers=attackers,
    )
    summary = run_local(config)
    return 0 if summary.status == "SUCCEEDED" else 1
