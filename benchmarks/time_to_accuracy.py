"""Time and updates to a target accuracy: sync FedAvg and FedProx against async FedAsync and FedBuff.

Runs through `fedstream local` (the embedded AWS, real Keras client processes): each algorithm in
each straggler scenario (``--scenarios``: none; the last 2 clients 4x slower; the last 4 clients
10x slower). All runs share the dataset, the non-IID split, the model (the dataset's built-in
Keras model: ``small_cnn`` for the 28x28 datasets), the seed and one local epoch per update; the
async aggregators run with their default parameters unless ``--alpha`` or ``--buffer-size`` is
given. For each run it prints the wall-clock seconds and the client updates applied until the
global model first reaches ``--target`` test accuracy (sync: rounds x clients aggregated), that
time as a multiple of sync FedAvg's in the same scenario, the final and the best accuracy, and for
async runs the staleness of the updates taken (p50 / p95 / max) and the median stream wait; it
draws accuracy against wall-clock time for all runs in one figure.

    .venv/bin/python benchmarks/time_to_accuracy.py                       # mnist-5k, about 25 min
    .venv/bin/python benchmarks/time_to_accuracy.py --dataset fashion-mnist --target 0.75

Time starts once every client process has loaded its data and model (TensorFlow start-up is not
counted) and ends when the server committed the version (a sync round's close, an async batch's
commit), the same clock in both modes; each run's outputs are left under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedstream.local.plot import pyplot
from fedstream.local.run import LocalRunConfig, RoundRow, RunSummary, run_local

ALGORITHMS = ("fedavg", "fedprox", "fedasync", "fedbuff")
MODES = {"fedavg": "sync", "fedprox": "sync", "fedasync": "async", "fedbuff": "async"}
COLOURS = {"fedavg": "tab:blue", "fedprox": "tab:green", "fedasync": "tab:orange", "fedbuff": "tab:red"}
LINES = ("-", "--", ":", "-.")
DEFAULT_PLOT = Path(__file__).resolve().parent / "plots" / "time_to_accuracy.png"


@dataclass(frozen=True)
class Scenario:
    stragglers: int
    factor: float

    @classmethod
    def parse(cls, text: str) -> Scenario:
        """``0`` (none) or ``KxF``: the last K clients F times slower."""
        if text.strip() == "0":
            return cls(0, 1.0)
        count, _, factor = text.strip().partition("x")
        return cls(int(count), float(factor))

    @property
    def label(self) -> str:
        return "none" if not self.stragglers else f"{self.stragglers} x{self.factor:g}"

    @property
    def key(self) -> str:
        return "0" if not self.stragglers else f"{self.stragglers}x{self.factor:g}"


@dataclass
class Result:
    algorithm: str
    scenario: Scenario
    status: str
    error: str | None
    seconds_to_target: float | None
    updates_to_target: int | None
    final_accuracy: float | None
    best_accuracy: float | None
    updates_applied: int
    trained_seconds: float
    run_seconds: float
    curve: list[tuple[float, float]]
    staleness: dict[str, Any]
    stream_wait_p50: float | None
    run_finished: int

    @property
    def label(self) -> str:
        return f"{MODES[self.algorithm]} {self.algorithm}"


def applied_updates(summary: RunSummary, mode: str) -> list[int]:
    """Client updates in the global model at each row: summed per round (sync), the run's count (async)."""
    if mode == "async":
        return [row.clients for row in summary.rounds]
    total, counts = 0, []
    for row in summary.rounds:
        total += row.clients
        counts.append(total)
    return counts


def first_reaching(
    rows: list[RoundRow], updates: list[int], target: float
) -> tuple[float | None, int | None]:
    for row, applied in zip(rows, updates, strict=True):
        if row.test_accuracy is not None and row.test_accuracy >= target:
            return row.elapsed_seconds, applied
    return None, None


def aggregator_params(algorithm: str, args: argparse.Namespace) -> dict[str, Any]:
    if algorithm == "fedprox":
        return {"mu": args.mu}
    if algorithm == "fedasync" and args.alpha is not None:
        return {"alpha": args.alpha}
    if algorithm == "fedbuff" and args.buffer_size is not None:
        return {"buffer_size": args.buffer_size}
    return {}


def run_one(algorithm: str, scenario: Scenario, args: argparse.Namespace) -> Result:
    mode = MODES[algorithm]
    config = LocalRunConfig(
        mode=mode,
        aggregator=algorithm,
        params=aggregator_params(algorithm, args),
        clients=args.clients,
        rounds=args.rounds,
        updates=args.updates,
        max_seconds=args.max_seconds,
        dataset=args.dataset,
        partition=args.partition,
        stragglers=scenario.stragglers,
        straggler_factor=scenario.factor,
        trainer="keras",
        epochs=args.epochs,
        seed=args.seed,
        progress=False,
        out=args.out / f"{algorithm}-stragglers-{scenario.key}",
    )
    started = time.monotonic()
    summary = run_local(config)
    run_seconds = time.monotonic() - started
    updates = applied_updates(summary, mode)
    seconds, count = first_reaching(summary.rounds, updates, args.target)
    accuracies = summary.accuracies
    curve = [(0.0, summary.initial_accuracy)] if summary.initial_accuracy is not None else []
    curve += [(r.elapsed_seconds, r.test_accuracy) for r in summary.rounds if r.test_accuracy is not None]
    taken = summary.async_stats.get("staleness", {})
    return Result(
        algorithm=algorithm,
        scenario=scenario,
        status=summary.status,
        error=summary.error,
        seconds_to_target=seconds,
        updates_to_target=count,
        final_accuracy=accuracies[-1] if accuracies else None,
        best_accuracy=max(accuracies) if accuracies else None,
        updates_applied=updates[-1] if updates else 0,
        trained_seconds=summary.rounds[-1].elapsed_seconds if summary.rounds else 0.0,
        run_seconds=run_seconds,
        curve=curve,
        staleness=taken,
        stream_wait_p50=summary.async_stats.get("stream_wait_seconds", {}).get("p50"),
        run_finished=summary.rejected.get("run_finished", 0),
    )


def table(results: list[Result], args: argparse.Namespace) -> str:
    def accuracy(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    def staleness(r: Result) -> str:
        if not r.staleness or r.staleness.get("max") is None:
            return "-"
        return f"{r.staleness['p50']:g} / {r.staleness['p95']:.1f} / {r.staleness['max']:g}"

    sync_times = {r.scenario: r.seconds_to_target for r in results if r.algorithm == "fedavg"}
    lines = [
        f"| run | stragglers | time to {args.target:g} | x sync fedavg | updates to {args.target:g} "
        "| final accuracy | best accuracy | updates applied | trained for | staleness p50 / p95 / max "
        "| stream wait p50 | run_finished |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        reached = r.seconds_to_target is not None
        baseline = sync_times.get(r.scenario)
        ratio = f"{r.seconds_to_target / baseline:.2f}x" if reached and baseline else "-"
        wait = "-" if r.stream_wait_p50 is None else f"{r.stream_wait_p50:.2f} s"
        to_target = f"{r.seconds_to_target:.1f} s" if reached else "not reached"
        lines.append(
            f"| {r.label} | {r.scenario.label} | {to_target} "
            f"| {ratio} | {r.updates_to_target if reached else '-'} | {accuracy(r.final_accuracy)} "
            f"| {accuracy(r.best_accuracy)} | {r.updates_applied} | {r.trained_seconds:.1f} s "
            f"| {staleness(r)} | {wait} | {r.run_finished if MODES[r.algorithm] == 'async' else '-'} |"
        )
    return "\n".join(lines)


def plot(results: list[Result], args: argparse.Namespace, path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(9, 5.2))
    scenarios = list(dict.fromkeys(r.scenario for r in results))
    for r in results:
        if not r.curve:
            continue
        times, accuracies = zip(*r.curve, strict=True)
        slow = "no stragglers" if not r.scenario.stragglers else f"{r.scenario.label} slower"
        ax.plot(
            times,
            accuracies,
            color=COLOURS[r.algorithm],
            ls=LINES[scenarios.index(r.scenario) % len(LINES)],
            marker="o" if MODES[r.algorithm] == "sync" else None,
            markersize=3,
            lw=1.4,
            label=f"{r.label}, {slow}",
        )
    ax.axhline(args.target, color="grey", ls=":", lw=1, label=f"target {args.target:g}")
    ax.set(
        xlabel="wall-clock seconds since the clients were ready",
        ylabel="test accuracy of the global model",
        title=f"{args.dataset}, {args.clients} clients, {args.partition}, {args.epochs} local epoch",
        ylim=(0, 1),
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def dataset_available(name: str) -> bool:
    from fedstream.client.data import DatasetUnavailableError, load_dataset

    try:
        load_dataset(name)
    except DatasetUnavailableError as exc:
        print(f"{exc}\nto run this benchmark on {name}: sudo apt-get install dataset-fashion-mnist")
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="mnist-5k", choices=("mnist-5k", "fashion-mnist"))
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--partition", default="dirichlet:0.5")
    parser.add_argument("--target", type=float, default=0.85, help="target test accuracy")
    parser.add_argument("--rounds", type=int, default=20, help="sync: rounds per run")
    parser.add_argument("--updates", type=int, default=200, help="async: applied updates per run at most")
    parser.add_argument("--max-seconds", type=float, default=90.0, help="async: seconds per run at most")
    parser.add_argument(
        "--scenarios",
        default="0,2x4,4x10",
        help="comma-separated straggler scenarios: 0 (none) or KxF (the last K clients F times slower)",
    )
    parser.add_argument(
        "--skip", default="fedprox@4x10", help="comma-separated ALGORITHM@SCENARIO runs to leave out"
    )
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per update")
    parser.add_argument("--mu", type=float, default=0.01, help="fedprox: proximal mu")
    parser.add_argument("--alpha", type=float, help="fedasync: mixing alpha (default: the plugin's)")
    parser.add_argument("--buffer-size", type=int, help="fedbuff: K (default: the plugin's)")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS), help="comma-separated subset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-time-to-accuracy"))
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT)
    args = parser.parse_args()
    algorithms = [name.strip() for name in args.algorithms.split(",") if name.strip()]
    unknown = sorted(set(algorithms) - set(ALGORITHMS))
    if unknown:
        parser.error(f"unknown algorithms {unknown}; choose from {', '.join(ALGORITHMS)}")
    if not dataset_available(args.dataset):
        return

    from fedstream.client.trainers import default_model_for

    scenarios = [Scenario.parse(text) for text in args.scenarios.split(",") if text.strip()]
    skipped = {text.strip() for text in args.skip.split(",") if text.strip()}
    print(
        f"{args.dataset}, model {default_model_for(args.dataset).__name__}, {args.clients} clients, "
        f"{args.partition}, {args.epochs} local epoch(s); sync {args.rounds} rounds, async at most "
        f"{args.updates} updates or {args.max_seconds:g} s; "
        f"stragglers: {', '.join(s.label for s in scenarios)}",
        file=sys.stderr,
    )
    started = time.monotonic()
    results = []
    for scenario in scenarios:
        for algorithm in algorithms:
            if f"{algorithm}@{scenario.key}" in skipped:
                continue
            result = run_one(algorithm, scenario, args)
            results.append(result)
            print(
                f"  {result.label}, stragglers {scenario.label}: {result.status}, "
                f"to target {result.seconds_to_target}, final {result.final_accuracy}, "
                f"{result.run_seconds:.0f} s with start-up",
                file=sys.stderr,
            )
    total = time.monotonic() - started
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "results": [{**vars(r), "scenario": r.scenario.label} for r in results],
    }
    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    plot(results, args, args.plot)
    print(table(results, args))
    failed = [f"{r.label} ({r.scenario.label}): {r.error}" for r in results if r.status != "SUCCEEDED"]
    if failed:
        print("runs that did not succeed: " + "; ".join(failed))
    print(f"\n{len(results)} runs in {total / 60:.1f} min (with process start-up); plot: {args.plot}")


if __name__ == "__main__":
    main()
