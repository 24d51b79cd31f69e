"""Offline commands: list aggregator plugins, aggregate model files on one machine, account privacy.

    fedstream plugins list [--json]
    fedstream aggregate --aggregator fedavg --global g.safetensors -o new.safetensors \\
        u1.safetensors:600 u2.safetensors:400
    fedstream aggregate --aggregator fedbuff --global g.safetensors --version 7 \\
        u1.safetensors:600:7 u2.safetensors:400:5 --base 5=v5.safetensors -o new.safetensors
    fedstream aggregate ... --bound norm_factor=20 --bound max_update_norm=5    # or --no-bounds
    fedstream privacy --noise-multiplier 1.1 --sample-rate 0.1 --rounds 100 --delta 1e-5

``aggregate`` applies the server's influence bounds (``fedstream.bounds``) and refuses what the
server refuses; each refused update is one line on stderr, ``refused PATH: REASON (DETAIL)``, and
the command succeeds when at least one update was aggregated.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pluggy
import pydantic

from fedstream import hookspecs
from fedstream.aggregation import (
    STATE_SIZE_FACTOR,
    AggregationError,
    AggregatorState,
    ClientUpdate,
    RoundContext,
    Scalar,
    state_from_bytes,
    state_to_bytes,
)
from fedstream.bounds import (
    InfluenceBounds,
    admit_round,
    check_change,
    delta_norm,
)
from fedstream.cli import CliError, parse_params
from fedstream.errors import Refused
from fedstream.host import async_step, check_stale, staleness_of, sync_round
from fedstream.registry import AggregatorInfo, AggregatorRegistry, build_registry
from fedstream.weights import (
    DEFAULT_MAX_BYTES,
    ModelSpec,
    Weights,
    WireFormatError,
    decode,
    load_file,
    save_file,
    sha256_hex,
)

CREATOR = "fedstream aggregate"
BOUND_NAMES = ", ".join(InfluenceBounds.model_fields)
SPEC_MARK = f"{hookspecs.PROJECT}_spec"
Command = Callable[[argparse.Namespace], int]


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    plugins = subparsers.add_parser("plugins", help="inspect the aggregator plugins")
    plugins_sub = plugins.add_subparsers(dest="plugins_command", required=True, metavar="SUBCOMMAND")
    listing = plugins_sub.add_parser("list", help="every aggregator with its source, modes and parameters")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(func=_user_errors(list_plugins))

    aggregate = subparsers.add_parser(
        "aggregate",
        help="aggregate client updates into a new global model, offline",
        description="Sync aggregators take updates as PATH:NUM_EXAMPLES and run one round. Async aggregators "
        "take PATH:NUM_EXAMPLES:BASE_VERSION and apply them in order; an update's base weights come from "
        "--base VERSION=PATH, or are the --global weights when its base version is the global's version. "
        "The server's influence bounds apply, on by default: an update identical to its base is refused "
        "(no_change), one whose delta norm is over norm_factor x the median of the others (sync: every "
        "update given; async: the last `window` taken, once there are min_reference) or over "
        "max_update_norm is refused (norm_bound), and example counts are capped. Each refused update is "
        "one line on stderr, 'refused PATH: REASON (DETAIL)'; the command fails only when none is "
        "aggregated. An async update whose base version's weights are not given is measured against "
        "the model it is applied to.",
    )
    aggregate.add_argument("--aggregator", required=True, help="name, see `fedstream plugins list`")
    aggregate.add_argument("--param", action="append", metavar="KEY=VALUE", help="aggregator parameter")
    aggregate.add_argument("--global", dest="global_path", required=True, type=Path, help="the global model")
    aggregate.add_argument("updates", nargs="+", metavar="UPDATE", help="PATH:N (sync), PATH:N:BASE_VERSION")
    aggregate.add_argument("-o", "--output", required=True, type=Path, help="where to write the new model")
    aggregate.add_argument("--seed", type=int, help="seed for aggregators that draw noise (default: random)")
    aggregate.add_argument("--round", type=int, default=1, help="sync: the round number, from 1 (default 1)")
    aggregate.add_argument(
        "--carry",
        action="append",
        metavar="KEY=VALUE",
        help="sync: value carried from the previous round, e.g. clip_norm=1.2",
    )
    aggregate.add_argument(
        "--state",
        type=Path,
        metavar="PATH",
        help="the aggregator's state between calls (a server optimizer's moments, FedBuff's buffer): "
        "read if the file exists, written after (removed when the aggregator keeps nothing)",
    )
    aggregate.add_argument("--version", type=int, help="version of --global (default: its metadata, else 0)")
    aggregate.add_argument(
        "--base",
        action="append",
        metavar="VERSION=PATH",
        help="async: weights of an older global version that updates were trained from",
    )
    aggregate.add_argument("--mode", choices=("sync", "async"), help="for aggregators that run in both modes")
    aggregate.add_argument(
        "--bound",
        action="append",
        metavar="NAME=VALUE",
        help=f"an influence bound, e.g. norm_factor=20, max_update_norm=5 (none: off); names: {BOUND_NAMES}",
    )
    aggregate.add_argument(
        "--no-bounds",
        action="store_true",
        help="turn the relative bounds off (norm_factor=0, example_factor=0); a --bound still applies",
    )
    aggregate.set_defaults(func=_user_errors(aggregate_files))

    privacy = subparsers.add_parser(
        "privacy", help="epsilon after T rounds of DP-FedAvg, or how many rounds fit an epsilon budget"
    )
    privacy.add_argument("--noise-multiplier", type=float, required=True, help="noise multiplier z")
    privacy.add_argument("--sample-rate", type=float, default=1.0, help="fraction q of clients a round (1.0)")
    budget = privacy.add_mutually_exclusive_group(required=True)
    budget.add_argument("--rounds", type=int, help="number of rounds T: print epsilon")
    budget.add_argument("--epsilon", type=float, help="budget E: print how many rounds fit")
    privacy.add_argument("--delta", type=float, default=1e-5, help="delta (default 1e-5)")
    privacy.add_argument("--json", action="store_true", help="print JSON")
    privacy.set_defaults(func=_user_errors(privacy_command))


def _user_errors(command: Command) -> Command:
    """Turn validation errors from bad input into one-line ``CliError`` messages (exit 2, no traceback)."""

    @functools.wraps(command)
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except pydantic.ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in exc.errors()
            )
            raise CliError(f"invalid input: {problems}") from None
        except pluggy.PluginValidationError as exc:
            hooks = ", ".join(name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), SPEC_MARK))
            raise CliError(f"invalid plugin: {_one_line(exc)} (fedstream hooks: {hooks})") from None
        except (CliError, AggregationError):
            raise
        except ValueError as exc:
            raise CliError(_one_line(exc)) from None

    return wrapper


def _one_line(exc: BaseException) -> str:
    return _one_line_text(str(exc))


def _one_line_text(text: str) -> str:
    return " ".join(text.split())


# --- plugins list -------------------------------------------------------------------------------


def list_plugins(args: argparse.Namespace) -> int:
    infos = build_registry().infos()
    if args.json:
        print(json.dumps([_describe(info) for info in infos], indent=2, default=str))
        return 0
    headers = ("NAME", "MODES", "SOURCE", "DESCRIPTION")
    rows = [(info.name, "/".join(sorted(info.modes)), info.source, info.description) for info in infos]
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(3)]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, [*widths, 0], strict=True)).rstrip()

    print(line(headers))
    for info, row in zip(infos, rows, strict=True):
        print(line(row))
        for text in _pack(["parameters:", *map(_describe_parameter, info.parameters())], width=100):
            print(f"    {text}")
    return 0


def _describe(info: AggregatorInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "source": info.source,
        "modes": sorted(info.modes),
        "parameters": info.parameters(),
        "description": info.description,
    }


def _pack(items: list[str], width: int) -> list[str]:
    """Join items with "; " into lines of at most ``width`` characters, never splitting an item."""
    lines: list[str] = []
    for item in items:
        if lines and len(lines[-1]) + len(item) + 2 <= width:
            lines[-1] += (" " if lines[-1].endswith(":") else "; ") + item
        else:
            lines.append(item)
    return lines


def _describe_parameter(parameter: dict[str, Any]) -> str:
    text = f"{parameter['name']}: {parameter['type']}"
    return f"{text} (required)" if parameter["required"] else f"{text} = {parameter['default']!r}"


# --- aggregate ----------------------------------------------------------------------------------


def aggregate_files(args: argparse.Namespace) -> int:
    registry = build_registry()
    info = registry.info(args.aggregator)
    mode = args.mode or ("sync" if "sync" in info.modes else "async")
    bounds = _parse_bounds(args.bound, off=args.no_bounds)
    global_weights, global_metadata = load_file(args.global_path)
    version = args.version if args.version is not None else _metadata_version(global_metadata)
    params = parse_params(args.param)
    refusals = Refusals()
    if mode == "sync":
        report = _aggregate_round(registry, args, params, global_weights, version, bounds, refusals)
    else:
        report = _apply_in_order(registry, args, params, global_weights, version, bounds, refusals)
    report["bounds"] = bounds.model_dump()
    report["refused"] = refusals.listed()
    print(json.dumps(_jsonable(report), indent=2))
    return 0


def _read_state(path: Path | None, aggregator: str, version: int) -> AggregatorState | None:
    """``--state``: None without the option or before the first call (no file yet). A state belongs
    to the version it was written with and to its aggregator: one written for another version (a
    round run twice, the wrong ``--global``) or another aggregator is refused, not applied."""
    if path is None or not path.exists():
        return None
    limit = STATE_SIZE_FACTOR * DEFAULT_MAX_BYTES
    try:
        if path.stat().st_size > limit:
            raise WireFormatError("too_large", f"{path.stat().st_size} bytes, over the limit of {limit}")
        state, meta = state_from_bytes(path.read_bytes(), limit)
    except (OSError, ValueError, Refused) as exc:
        raise CliError(f"--state {path} is not a fedstream aggregator state: {exc}") from None
    if meta.get("aggregator") != aggregator:
        raise CliError(f"--state {path} holds the state of {meta.get('aggregator')!r}, not of {aggregator!r}")
    if meta.get("version") != str(version):
        raise CliError(
            f"--state {path} belongs to version {meta.get('version')}, but --global is version {version}"
        )
    return state


def _write_state(
    path: Path | None, state: AggregatorState | None, aggregator: str, version: int
) -> str | None:
    """Write (or, when the aggregator keeps nothing, remove) ``--state``; returns the path written."""
    if path is None:
        return None
    if state is None:
        path.unlink(missing_ok=True)
        return None
    data = state_to_bytes(state, {"aggregator": aggregator, "version": str(version), "creator": CREATOR})
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    partial.replace(path)  # a crash leaves the previous state, never half of one
    return str(path)


class Refusals:
    """Updates left out, each reported on stderr as ``refused PATH: REASON (DETAIL)`` when refused."""

    def __init__(self) -> None:
        self.refused: list[dict[str, str]] = []

    def add(self, update: str, reason: str, detail: str) -> None:
        self.refused.append({"update": update, "reason": reason, "detail": detail})
        print(f"refused {update}: {reason} ({_one_line_text(detail)})", file=sys.stderr, flush=True)

    def listed(self) -> list[dict[str, str]]:
        return self.refused

    def none_aggregated(self, count: int) -> CliError:
        return CliError(f"no update was aggregated: all {count} were refused (see the lines above)")


def _parse_bounds(pairs: list[str] | None, *, off: bool) -> InfluenceBounds:
    """``--bound NAME=VALUE`` options (``none``: an absolute bound off) over the defaults, or ``off()``."""
    values = InfluenceBounds.off().model_dump(exclude_defaults=True) if off else {}
    for pair in pairs or ():
        name, sep, text = (part.strip() for part in pair.partition("="))
        if not sep or not name or not text:
            raise CliError(f"--bound expects NAME=VALUE, got {pair!r}")
        if name not in InfluenceBounds.model_fields:
            raise CliError(f"--bound {name}: unknown bound; known: {BOUND_NAMES}")
        values[name] = None if text.lower() == "none" else text
    try:
        return InfluenceBounds.model_validate(values)
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"--bound {'.'.join(map(str, e['loc']))}={e['input']!r}: {e['msg']}" for e in exc.errors()
        )
        raise CliError(problems) from None


def _read_update(path: Path, spec: ModelSpec) -> tuple[Weights, str]:
    """An update's weights, checked against the global model's spec, and its sha256."""
    size = path.stat().st_size
    if size > DEFAULT_MAX_BYTES:
        raise WireFormatError("too_large", f"{path} has {size} bytes, over the limit of {DEFAULT_MAX_BYTES}")
    data = path.read_bytes()
    weights, _ = decode(data, spec)
    return weights, sha256_hex(data)


def _aggregate_round(
    registry: AggregatorRegistry,
    args: argparse.Namespace,
    params: dict[str, str],
    global_weights: Weights,
    version: int,
    bounds: InfluenceBounds,
    refusals: Refusals,
) -> dict[str, Any]:
    """One sync round, bounded as the server bounds it, in two passes over the files.

    The first pass reads each update only for its delta norm (one update in memory at a time), so
    that ``admit_round`` can judge every update against the round's median, as the server's close
    does; the second reads the admitted ones again (the same bytes: the sha256 must match) and
    hands them to the aggregator.
    """
    if args.base:
        raise CliError("--base applies to async aggregators only")
    if args.round < 1:
        raise CliError(f"--round counts from 1, got {args.round}")
    aggregator = registry.create(args.aggregator, params, seed=args.seed, mode="sync")
    spec = ModelSpec.of(global_weights)
    updates = [_parse_update(text, with_base_version=False)[:2] for text in args.updates]
    paths: dict[str, Path] = {}
    candidates: dict[str, tuple[float, int]] = {}  # in the order given
    digests: dict[str, str] = {}
    seen: dict[str, str] = {}  # sha256 -> the first update with those bytes
    for path, num_examples in updates:
        name = str(path)
        try:
            if name in candidates:
                raise Refused("duplicate", f"{name} is given more than once")
            weights, digest = _read_update(path, spec)
            if digest in seen:
                raise Refused("duplicate", f"the same bytes as {seen[digest]} (sha256 {digest})")
            seen[digest] = name
            norm = delta_norm(weights, global_weights)
            del weights
            check_change(norm, name)
        except Refused as exc:
            refusals.add(name, exc.reason, str(exc))
            continue
        paths[name], candidates[name], digests[name] = path, (norm, num_examples), digest
    admitted, refused = admit_round(bounds, candidates, global_weights)
    for name, why in refused.items():
        refusals.add(name, why.reason, str(why))

    previous = _read_state(args.state, args.aggregator, version)
    accepted: list[dict[str, Any]] = []

    def read_admitted() -> Iterator[ClientUpdate]:
        for name in [name for name in candidates if name in admitted]:
            path = paths[name]
            try:
                weights, digest = _read_update(path, spec)  # one update in memory at a time
                if digest != digests[name]:
                    raise WireFormatError(
                        "changed", f"the file changed between the two reads (sha256 {digest})"
                    )
            except WireFormatError as exc:
                refusals.add(name, exc.reason, str(exc))
                continue
            norm, given = candidates[name]
            capped = {"given_examples": given} if given != admitted[name] else {}
            accepted.append({"update": name, "num_examples": admitted[name], **capped, "delta_norm": norm})
            yield ClientUpdate(path.stem, weights, admitted[name], base_version=version)

    result = sync_round(
        aggregator,
        global_weights,
        RoundContext(round=args.round, carry=_parse_carry(args.carry), state=previous),
        read_admitted(),
        nothing=lambda: refusals.none_aggregated(len(updates)),
    )
    sha256 = _write(args, result.weights, version + 1, version, round=str(args.round))
    state_path = _write_state(args.state, result.state, args.aggregator, version + 1)
    return {
        "aggregator": args.aggregator,
        "mode": "sync",
        "round": args.round,
        "version": version + 1,
        "parent_version": version,
        "output": str(args.output),
        "sha256": sha256,
        "metrics": result.metrics,
        "carry": result.carry,
        "state": state_path,
        "stop": result.stop,
        "updates": accepted,
    }


def _apply_in_order(
    registry: AggregatorRegistry,
    args: argparse.Namespace,
    params: dict[str, str],
    global_weights: Weights,
    version: int,
    bounds: InfluenceBounds,
    refusals: Refusals,
) -> dict[str, Any]:
    """Updates applied one by one, each judged as the server's async batch judges it (``_judge``)."""
    if args.carry:
        raise CliError("--carry applies to sync aggregators only")
    aggregator = registry.create(args.aggregator, params, seed=args.seed, mode="async")
    spec = ModelSpec.of(global_weights)
    base_paths = _parse_bases(args.base)
    bases: dict[int, Weights] = {version: global_weights}
    current, current_version = global_weights, version
    state = _read_state(args.state, args.aggregator, version)
    norms: list[float] = []  # the reference window: delta norms of the updates taken
    seen: dict[str, str] = {}  # sha256 -> the first update with those bytes
    applied: list[dict[str, Any]] = []
    for text in args.updates:
        path, num_examples, base_version = _parse_update(text, with_base_version=True)
        name = str(path)
        try:
            staleness = staleness_of(current_version, base_version)
            check_stale(aggregator, staleness)  # before reading the file (async_step judges it too)
        except Refused as exc:
            refusals.add(name, exc.reason, str(exc))
            continue
        if base_version not in bases and base_version in base_paths:  # a bad --base file is an error
            bases[base_version], _ = load_file(base_paths[base_version], spec)
        try:
            weights, digest = _read_update(path, spec)
            if digest in seen:
                raise Refused("duplicate", f"the same bytes as {seen[digest]} (sha256 {digest})")
            seen[digest] = name
            update = ClientUpdate(
                path.stem,
                weights,
                num_examples,
                base_version=base_version,
                base_weights=bases.get(base_version),
            )
            step = async_step(
                aggregator,
                current,
                update,
                staleness=staleness,
                state=state,
                bounds=bounds,
                norms=norms,
                trained_from=bases.get(base_version, current),
            )
            result, norm = step.result, step.norm
        except AggregationError as exc:  # the aggregator's; missing_base_weights is the user's to fix
            if exc.reason == "missing_base_weights":
                raise CliError(
                    f"{path} was trained from version {base_version}: pass --base "
                    f"{base_version}=PATH with that version's weights"
                ) from None
            refusals.add(name, exc.reason, str(exc))
            continue
        except Refused as exc:
            refusals.add(name, exc.reason, str(exc))
            continue
        norms = step.norms
        state = result.state
        if result.weights is not None:
            current, current_version = result.weights, current_version + 1
            bases[current_version] = current  # later updates may have been trained from it
        applied.append(
            {
                "update": name,
                "staleness": staleness,
                "new_version": current_version if result.weights is not None else None,
                "num_examples": min(num_examples, bounds.max_examples or num_examples),
                "delta_norm": norm,
                "metrics": result.metrics,
            }
        )
    if not applied:
        raise refusals.none_aggregated(len(args.updates))
    pending = int(state.values.get("count", 0)) if state is not None else 0
    if current_version == version and args.state is None:
        raise CliError(
            f"no new version: {args.aggregator} only buffered the updates ({pending} pending; "
            "--state PATH keeps them for the next call)"
        )
    state_path = _write_state(args.state, state, args.aggregator, current_version)
    sha256 = _write(args, current, current_version, version) if current_version != version else None
    return {
        "aggregator": args.aggregator,
        "mode": "async",
        "version": current_version,
        "parent_version": version,
        "output": str(args.output) if sha256 else None,
        "sha256": sha256,
        "state": state_path,
        "updates": applied,
        "pending_updates": pending,
    }


def _write(args: argparse.Namespace, weights: Weights, version: int, parent: int, **extra: str) -> str:
    metadata = {
        "aggregator": args.aggregator,
        "version": str(version),
        "parent_version": str(parent),
        "created_at": datetime.now(UTC).isoformat(),
        "creator": CREATOR,
        **extra,
    }
    return save_file(args.output, weights, metadata)


def _metadata_version(metadata: dict[str, str]) -> int:
    try:
        return int(metadata.get("version", "0"))
    except ValueError:
        return 0


def _parse_update(text: str, *, with_base_version: bool) -> tuple[Path, int, int]:
    parts = text.rsplit(":", 2 if with_base_version else 1)
    expected = "PATH:NUM_EXAMPLES:BASE_VERSION" if with_base_version else "PATH:NUM_EXAMPLES"
    if len(parts) != (3 if with_base_version else 2) or not parts[0]:
        raise CliError(f"update {text!r} should be {expected}")
    try:
        numbers = [int(p) for p in parts[1:]]
    except ValueError:
        raise CliError(f"update {text!r} should be {expected} with whole numbers") from None
    if any(n < 0 for n in numbers):
        raise CliError(f"update {text!r}: numbers must not be negative")
    return Path(parts[0]), numbers[0], numbers[1] if with_base_version else 0


def _parse_bases(pairs: list[str] | None) -> dict[int, Path]:
    bases: dict[int, Path] = {}
    for pair in pairs or ():
        version, sep, path = pair.partition("=")
        if not sep or not path or not version.strip().isdigit():
            raise CliError(f"--base expects VERSION=PATH, got {pair!r}")
        bases[int(version)] = Path(path)
    return bases


def _parse_carry(pairs: list[str] | None) -> dict[str, Scalar]:
    carry: dict[str, Scalar] = {}
    for key, text in parse_params(pairs).items():
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        carry[key] = value if isinstance(value, float | int | str | bool) else text
    return carry


def _jsonable(value: Any) -> Any:
    """JSON has no Infinity/NaN: such floats are printed as the strings "inf" / "nan"."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


# --- privacy ------------------------------------------------------------------------------------


def privacy_command(args: argparse.Namespace) -> int:
    from fedstream.plugins.dp_noise import epsilon_for, rounds_within_budget

    z, q, delta = args.noise_multiplier, args.sample_rate, args.delta
    if not (math.isfinite(z) and z >= 0):
        raise CliError(f"--noise-multiplier must be >= 0, got {z}")
    if not 0 < q <= 1:
        raise CliError(f"--sample-rate must be in (0, 1], got {q}")
    if not 0 < delta < 1:
        raise CliError(f"--delta must be in (0, 1), got {delta}")
    setting = f"noise multiplier {z:g}, sample rate {q:g}, delta {delta:g}"
    if args.rounds is not None:
        if args.rounds < 0:
            raise CliError(f"--rounds must be >= 0, got {args.rounds}")
        epsilon = epsilon_for(z, q, args.rounds, delta)
        report: dict[str, Any] = {"epsilon": epsilon, "rounds": args.rounds}
        text = f"epsilon = {epsilon:.4f} after {args.rounds} rounds ({setting})"
    else:
        if not (math.isfinite(args.epsilon) and args.epsilon > 0):
            raise CliError(f"--epsilon must be a positive number, got {args.epsilon}")
        rounds = rounds_within_budget(z, q, args.epsilon, delta)
        spent = epsilon_for(z, q, rounds, delta)
        report = {"rounds": rounds, "epsilon_budget": args.epsilon, "epsilon": spent}
        text = f"{rounds} rounds fit within epsilon {args.epsilon:g} ({setting})"
    if args.json:
        print(json.dumps(_jsonable({**report, "noise_multiplier": z, "sample_rate": q, "delta": delta})))
    else:
        print(text)
    return 0
