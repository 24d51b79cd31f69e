"""``fedstream local``: run federated training end to end on the embedded AWS."""

from __future__ import annotations

import argparse
import math
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


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show ``(default: ...)`` where a default says something (not for flags or unset options)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


TRAINER_HELP = (
    "keras | numpy | instant[:N] | module:function — the built-in Keras model for the dataset, "
    "logistic regression without TensorFlow, a no-op trainer of N parameters (default 1000) for "
    "load tests, or your own (module:function or path/to/file.py:function, importable from here)"
)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "local",
        help="run federated training on an embedded AWS (moto server) on this machine",
        description="Start a moto server, create the stack's resources, run the real handlers and "
        "state machine, start N client processes, and train.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "--mode", choices=["sync", "async"], default="sync", help="round-based or asynchronous"
    )
    parser.add_argument(
        "--aggregator", default="fedavg", help="aggregator name (see `fedstream plugins list`)"
    )
    parser.add_argument("--param", action="append", metavar="K=V", help="aggregator parameter (repeatable)")
    parser.add_argument("--clients", type=int, default=3, help="number of clients (>= 1)")
    parser.add_argument("--rounds", type=int, default=3, help="sync: at most this many rounds (>= 1)")
    parser.add_argument(
        "--updates", type=int, default=20, help="async: stop after this many applied updates (>= 1)"
    )
    parser.add_argument("--max-seconds", type=float, default=0.0, help="async: wall-clock limit (0: none)")
    parser.add_argument(
        "--dataset",
        default="mnist-5k",
        choices=["mnist-5k", "digits", "fashion-mnist"],
        help="the dataset the clients train on",
    )
    parser.add_argument(
        "--partition", default="iid", help="iid | dirichlet:ALPHA (ALPHA > 0) | shards:S (S >= 1)"
    )
    parser.add_argument(
        "--min-clients", type=int, help="quorum to close a round at its deadline (default: all clients)"
    )
    parser.add_argument("--round-timeout", type=int, default=300, help="round deadline in seconds")
    parser.add_argument("--stragglers", type=_stragglers, metavar="K:FACTOR", help="slow K clients by FACTOR")
    parser.add_argument("--target-accuracy", type=float, help="stop once clients report this eval accuracy")
    parser.add_argument("--seed", type=int, default=0, help="seed for partitions, models and training (>= 0)")
    parser.add_argument("--trainer", default="keras", help=TRAINER_HELP)
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per update")
    parser.add_argument("--batch-size", type=int, default=32, help="local batch size")
    parser.add_argument(
        "--learning-rate", type=float, help="local learning rate (default: the trainer's own)"
    )
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
        "error:s3|dynamodb:Op[:N], kill:CLIENT[:ROUND], hang:CLIENT, redeliver:N, "
        "sfn:dynamodb|sns:Op[:N[:SKIP[:lost]]] (the state machine's own calls throttled, or applied "
        "with their answer lost)",
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
    parser.add_argument(
        "--out",
        type=Path,
        help="directory for the run's logs, metrics and model (default: a new runs/RUN-ID/, with "
        "runs/latest pointing at it); one that is not empty is refused unless --overwrite",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="let --out name a folder that is not empty (a previous run's outputs there are replaced)",
    )
    parser.add_argument("--no-progress", action="store_true", help="plain lines instead of a live table")
    parser.add_argument(
        "--serve",
        action="store_true",
        help="start no clients and no run: serve the embedded AWS, handlers and state machine until Ctrl-C, "
        "writing outputs.json and clients/SITE.json for `fedstream run ... --outputs` and "
        "`fedstream client --config`",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="let the libraries speak: TensorFlow's start-up lines, moto's messages, botocore's logs",
    )
    parser.set_defaults(func=run)


FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse a ``fedstream local`` argument that would fail the run later, as a one-line
    :class:`~fedstream.cli.CliError` naming the option; nothing is started or created, and
    TensorFlow is not imported (a ``module:function`` trainer's module is).
    """
    from fedstream.cli import CliError

    for option, value, least in (
        ("--clients", args.clients, 1),
        ("--rounds", args.rounds, 1),
        ("--updates", args.updates, 1),
        ("--epochs", args.epochs, 1),
        ("--batch-size", args.batch_size, 1),
        ("--round-timeout", args.round_timeout, 1),
        ("--visibility-timeout", args.visibility_timeout, 0),
        ("--seed", args.seed, 0),
    ):
        if value < least:
            raise CliError(f"{option} must be at least {least}, got {value}")
    if args.min_clients is not None and not 1 <= args.min_clients <= args.clients:
        raise CliError(
            f"--min-clients must be between 1 and --clients ({args.clients}), got {args.min_clients}"
        )
    if not math.isfinite(args.max_seconds) or args.max_seconds < 0:
        raise CliError(f"--max-seconds must be 0 (no limit) or more, got {args.max_seconds}")
    if args.learning_rate is not None and not (math.isfinite(args.learning_rate) and args.learning_rate > 0):
        raise CliError(f"--learning-rate must be a number > 0, got {args.learning_rate}")
    if args.target_accuracy is not None and not 0 < args.target_accuracy <= 1:
        raise CliError(f"--target-accuracy must be in (0, 1], got {args.target_accuracy}")
    if args.stragglers is not None:
        count, factor = args.stragglers
        if not 0 <= count <= args.clients:
            raise CliError(f"--stragglers: K must be between 0 and --clients ({args.clients}), got {count}")
        if not (math.isfinite(factor) and factor > 0):
            raise CliError(f"--stragglers: FACTOR must be a number > 0, got {factor}")
    _check_partition(args.partition)
    _check_dataset(args.dataset)
    _check_trainer(args.trainer)
    _check_aggregator(args)
    _check_faults_and_attacks(args)
    if args.out is not None:
        _check_out(args.out, overwrite=args.overwrite)


def _check_aggregator(args: argparse.Namespace) -> None:
    """The aggregator exists, runs in ``--mode``, takes the ``--param`` values, and has enough clients."""
    from fedstream.cli import CliError, parse_params
    from fedstream.registry import PluginError, default_registry

    registry = default_registry()
    if args.aggregator not in registry:
        names = ", ".join(registry.names())
        raise CliError(
            f"--aggregator: unknown aggregator {args.aggregator!r}; choose one of {names} "
            "(`fedstream plugins list`)"
        )
    modes = registry.info(args.aggregator).modes
    if args.mode not in modes:
        raise CliError(
            f"--aggregator {args.aggregator} runs in {'/'.join(sorted(modes))} mode, not --mode {args.mode}"
        )
    params = parse_params(args.param)
    try:
        aggregator = registry.create(
            args.aggregator, params, seed=args.seed, mode=args.mode, num_clients=args.clients
        )
    except PluginError as exc:
        raise CliError(f"--param: {_one_line(exc)}") from None
    if args.mode == "async" and aggregator.min_clients > args.clients:
        raise CliError(
            f"--clients {args.clients}: {args.aggregator} needs at least {aggregator.min_clients} in async "
            "mode (each client has one update in flight, and one refused update must not stall the run)"
        )


def _check_faults_and_attacks(args: argparse.Namespace) -> None:
    from fedstream.cli import CliError
    from fedstream.local.attack import AttackSpecError, parse_attackers
    from fedstream.local.faults import FaultPlan

    client_ids = [f"site-{i + 1}" for i in range(args.clients)]
    FaultPlan.parse(args.fault, client_ids)  # its errors name the --fault already
    try:
        attackers = parse_attackers(args.attack)
    except AttackSpecError as exc:
        message = str(exc)
        raise CliError(message if message.startswith("--attack") else f"--attack: {message}") from None
    for client_id in attackers:
        if client_id not in client_ids:
            raise CliError(
                f"--attack {client_id}: not a client of this run ({client_ids[0]}..{client_ids[-1]})"
            )


def _check_partition(scheme: str) -> None:
    from fedstream.cli import CliError
    from fedstream.client.data import parse_scheme

    try:
        parse_scheme(scheme)
    except ValueError as exc:
        raise CliError(f"--partition: {exc}") from None


def _check_dataset(name: str) -> None:
    from fedstream.cli import CliError
    from fedstream.client import data

    if name not in data.DATASETS:
        raise CliError(f"--dataset: unknown dataset {name!r}; choose one of {', '.join(data.DATASETS)}")
    if name == "fashion-mnist":
        directory = data.FASHION_MNIST_DIR
        for stem in FASHION_MNIST_FILES:
            if not any(directory.glob(f"{stem}*")):
                raise CliError(
                    f"--dataset fashion-mnist: no {stem}[.gz] in {directory}; install the data with "
                    "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), "
                    "or choose 'mnist-5k' or 'digits'"
                )


def _check_trainer(spec: str) -> None:
    from fedstream.cli import CliError
    from fedstream.client.trainers import check_trainer_spec

    try:
        check_trainer_spec(spec)
    except ValueError as exc:
        raise CliError(f"--trainer: {_one_line(exc)}") from None
    except Exception as exc:  # the user's module failed to import: say so in one line, no traceback
        raise CliError(
            f"--trainer {spec}: importing it failed: {type(exc).__name__}: {_one_line(exc)}"
        ) from None


def _check_out(out: Path, overwrite: bool = False) -> None:
    from fedstream.cli import CliError

    if out.exists():
        if not out.is_dir():
            raise CliError(f"--out {out}: exists and is not a directory")
        if not os.access(out, os.W_OK | os.X_OK):
            raise CliError(f"--out {out}: directory is not writable")
        if not overwrite and any(out.iterdir()):
            raise CliError(
                f"--out {out}: not empty; name a new folder, leave --out out (a new runs/RUN-ID/), "
                "or add --overwrite to replace a previous run's outputs there"
            )
        return
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise CliError(f"--out {out}: cannot create it, {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CliError(f"--out {out}: cannot create it, {parent} is not writable")


def fresh_run_folder(runs: Path, run_id: str) -> Path:
    """``runs/RUN-ID/``, created, with ``runs/latest`` pointing at it (replaced in one step)."""
    from fedstream.cli import CliError

    out = runs / run_id
    try:
        out.mkdir(parents=True)
        link = runs / f".latest-{run_id}"
        link.symlink_to(run_id, target_is_directory=True)
        os.replace(link, runs / "latest")
    except OSError as exc:
        raise CliError(f"cannot create {out} and {runs / 'latest'}: {exc.strerror or exc}") from None
    return out


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def run(args: argparse.Namespace) -> int:
    from fedstream.client.quiet import VERBOSE_ENV

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"  # the clients inherit it
    from fedstream.cli import CliError, parse_params
    from fedstream.local.attack import AttackSpecError, parse_attackers
    from fedstream.local.run import LocalRunConfig, new_run_id, run_local

    check_arguments(args)
    run_id = new_run_id()
    stragglers, factor = args.stragglers or (0, 1.0)
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
        out=args.out
        or fresh_run_folder(Path("runs"), run_id.replace("run-", "serve-" if args.serve else "run-", 1)),
        run_id=run_id,
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
        verbose=args.verbose,
    )
    if args.serve:
        from fedstream.local.serve import serve_local

        return serve_local(config)
    summary = run_local(config)
    return {"SUCCEEDED": 0, "INTERRUPTED": 130}.get(summary.status, 1)
