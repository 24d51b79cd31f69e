"""Learning quality: FedAvg against central training, and what dp-noise costs in accuracy.

Central training fits the dataset's built-in Keras model (same architecture, initial weights,
optimizer, learning rate and batch size as the clients) on the union of all clients' training
shards for ``rounds x local epochs`` epochs, in this process. Federated runs go through
`fedstream local` (the embedded AWS, real Keras client processes). Everything is evaluated on the
same held-out test set.

- FedAvg with an IID and with a non-IID (``--non-iid``, Dirichlet 0.5 by default) split: the
  accuracy gap to central training.
- dp-noise (IID split, every client every round, so sample rate 1.0): for each target epsilon the
  noise multiplier z that the project's RDP accountant says reaches it after the planned rounds
  (delta ``--delta``), then a real run with that z; the run's final accuracy and the epsilon it
  reported. One more run with z = 0 shows what clipping alone costs.

``--robustness`` reports instead what one malicious client does (``fedstream.local.attack``):
FedAvg, median, trimmed-mean and krum (default parameters) on the IID and the non-IID split, each
without and with one attacker among ``--clients`` (4 here by default; the attacker is the last
one, ``--attack-spec`` ``sign-flip:10:examples=1000000000``: it trains honestly, then reports
``base - 10 * delta`` and claims 10**9 examples), all with the default influence bounds; plus
FedAvg without an attacker and with the bounds off, to show what the defaults cost an honest run
(target: at most 0.01 test accuracy, printed as PASS or MISS). It prints the final test accuracy
and the rejections by reason of every run, writes ``robustness.json`` under ``--out`` and a plot
(one panel per split, a line per aggregator, dashed with the attacker).

    .venv/bin/python benchmarks/learning_quality.py                       # mnist-5k, about 10 min
    .venv/bin/python benchmarks/learning_quality.py --robustness          # 18 runs, about 20 min
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedstream.bounds import InfluenceBounds
from fedstream.local.plot import pyplot
from fedstream.local.run import LocalRunConfig, run_local

PLOTS = Path(__file__).resolve().parent / "plots"
DEFAULT_PLOT = PLOTS / "learning_quality.png"
ROBUSTNESS_PLOT = PLOTS / "robustness.png"
ROBUST_AGGREGATORS = ("fedavg", "median", "trimmed-mean", "krum")
DEFAULT_ATTACK = "sign-flip:10:examples=1000000000"
HONEST_COST_TARGET = 0.01  # what the default bounds may cost an honest FedAvg run, in test accuracy
COLOURS = {"fedavg": "tab:blue", "median": "tab:green", "trimmed-mean": "tab:orange", "krum": "tab:red"}


@dataclass
class Result:
    name: str
    split: str
    final_accuracy: float | None
    curve: list[float] = field(default_factory=list)  # test accuracy after each round / epoch
    epsilon: float | None = None
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    status: str = "SUCCEEDED"
    seconds: float = 0.0
    # --robustness
    aggregator: str | None = None
    bounds: str = "default"  # "default" | "off"
    attack: str | None = None  # "site-4=sign-flip:10:..." when one client attacks
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> updates refused
    rejected_by_client: dict[str, dict[str, int]] = field(default_factory=dict)
    error: str | None = None


def noise_for_epsilon(epsilon: float, rounds: int, delta: float, sample_rate: float = 1.0) -> float:
    """The smallest noise multiplier z (to 1e-4 relative) whose epsilon after ``rounds`` is <= ``epsilon``."""
    from fedstream.plugins.dp_noise import epsilon_for

    low, high = 0.0, 1.0
    while epsilon_for(high, sample_rate, rounds, delta) > epsilon:
        low, high = high, high * 2
    while high - low > 1e-4 * high:  # invariant: high reaches the target, low does not
        middle = (low + high) / 2
        if epsilon_for(middle, sample_rate, rounds, delta) <= epsilon:
            high = middle
        else:
            low = middle
    return high


def train_centrally(args: argparse.Namespace) -> Result:
    """The built-in model on the union of the clients' shards, one test evaluation per epoch."""
    from fedstream.client.data import ClientData, client_shard, load_dataset
    from fedstream.client.trainers import DEFAULT_KERAS_LEARNING_RATES, KerasTrainer, default_model_for

    started = time.monotonic()
    test = load_dataset(args.dataset)
    shards = [client_shard(args.dataset, "iid", args.clients, i, args.seed) for i in range(args.clients)]
    union = ClientData(
        np.concatenate([s.x_train for s in shards]),
        np.concatenate([s.y_train for s in shards]),
        test.x_test,
        test.y_test,
        num_classes=test.num_classes,
    )
    assert len(union.y_train) == len(test.y_train), "the clients' shards should cover the training set"
    rate = {}
    if args.dataset in DEFAULT_KERAS_LEARNING_RATES:
        rate = {"learning_rate": DEFAULT_KERAS_LEARNING_RATES[args.dataset]}
    trainer = KerasTrainer(
        default_model_for(args.dataset), union, epochs=1, batch_size=args.batch_size, seed=args.seed, **rate
    )
    weights, curve = trainer.initial_weights(), []
    for _ in range(args.rounds * args.epochs):
        weights = trainer.fit(weights, {}).weights
        curve.append(trainer.evaluate(weights)["eval_accuracy"])
    return Result(
        name=f"central, {len(curve)} epochs",
        split=f"union of all {len(union.y_train)} examples",
        final_accuracy=curve[-1],
        curve=curve,
        seconds=time.monotonic() - started,
    )


def run_folder(name: str, partition: str) -> str:
    """``"dp-noise, target epsilon 4"`` and ``"iid"`` -> ``"dp-noise-target-epsilon-4-iid"``."""
    words = f"{name} {partition}".replace(",", " ").replace(":", "-").split()
    return "-".join(words).lower()


def federated(
    name: str,
    args: argparse.Namespace,
    partition: str,
    aggregator: str,
    params: dict[str, Any],
    *,
    bounds: InfluenceBounds | None = None,
    attackers: dict[str, str] | None = None,
) -> Result:
    started = time.monotonic()
    summary = run_local(
        LocalRunConfig(
            mode="sync",
            aggregator=aggregator,
            params=params,
            clients=args.clients,
            rounds=args.rounds,
            dataset=args.dataset,
            partition=partition,
            trainer="keras",
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=args.seed,
            progress=False,
            out=args.out / run_folder(name, partition),
            bounds=bounds or InfluenceBounds(),
            attackers=attackers or {},
        )
    )
    epsilons = [r.epsilon for r in summary.rounds if r.epsilon is not None]
    accuracies = summary.accuracies
    return Result(
        name=name,
        split=partition,
        final_accuracy=accuracies[-1] if accuracies else None,
        curve=accuracies,
        epsilon=epsilons[-1] if epsilons else None,
        noise_multiplier=params.get("noise_multiplier"),
        status=summary.status,
        seconds=time.monotonic() - started,
        aggregator=aggregator,
        bounds="off" if bounds == InfluenceBounds.off() else "default",
        attack=", ".join(f"{c}={a}" for c, a in (attackers or {}).items()) or None,
        rejected=summary.rejected,
        rejected_by_client=summary.rejected_by_client,
        error=summary.error,
    )


def table(results: list[Result], central: Result, fedavg_iid: Result, clip_norm: float, clients: int) -> str:
    def number(value: float | None) -> str:
        if value is None:
            return "-"
        return "inf" if math.isinf(value) else f"{value:.3f}"

    def difference(result: Result, reference: Result) -> str:
        if result is reference or result.final_accuracy is None or reference.final_accuracy is None:
            return "-"
        return f"{result.final_accuracy - reference.final_accuracy:+.3f}"

    lines = [
        "| run | split | noise multiplier z | noise std per weight (zC/m) | final test accuracy "
        "| vs central | vs FedAvg IID | epsilon reported |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        z = "-" if r.noise_multiplier is None else f"{r.noise_multiplier:.3f}"
        std = "-" if r.noise_multiplier is None else f"{r.noise_multiplier * clip_norm / clients:.3f}"
        epsilon = number(r.epsilon)
        if r.noise_multiplier == 0 and r.epsilon is None:
            epsilon = "inf (not reported)"
        lines.append(
            f"| {r.name} | {r.split} | {z} | {std} | {number(r.final_accuracy)} | {difference(r, central)} "
            f"| {difference(r, fedavg_iid) if r is not central else '-'} | {epsilon} |"
        )
    return "\n".join(lines)


def plot(results: list[Result], args: argparse.Namespace, path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for r in results:
        if r.curve:
            steps = range(1, len(r.curve) + 1)
            ax.plot(
                steps,
                r.curve,
                marker="o",
                markersize=3,
                ls="--" if r.name.startswith("central") else "-",
                label=f"{r.name} ({r.split})",
            )
    ax.set(
        xlabel="round (federated) / epoch (central)",
        ylabel="test accuracy",
        title=f"{args.dataset}, {args.clients} clients, {args.epochs} local epoch per round",
        ylim=(0, 1),
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- robustness ------------------------------------------------------------------------------


def aggregator_note(aggregator: str, clients: int) -> str:
    """What the rule does with ``clients`` updates (and one fewer, when the bounds refuse one)."""
    if aggregator == "krum":
        f = 1
        guarantee = "holds" if clients > 2 * f + 2 else "does not hold"
        return f"f=1, m=1: n > 2f+2 = {2 * f + 2} {guarantee} with n={clients}"
    if aggregator == "trimmed-mean":
        trims = [f"{int(0.25 * n)} per end of {n}" for n in (clients, clients - 1)]
        return "beta=0.25: trims " + ", ".join(trims)
    if aggregator == "median":
        return "coordinate-wise, unweighted"
    return "weighted by (capped) example counts"


def run_robustness(args: argparse.Namespace) -> list[Result]:
    attacker = f"site-{args.clients}"
    results = []
    for partition in ("iid", args.non_iid):
        results.append(
            federated("fedavg, bounds off", args, partition, "fedavg", {}, bounds=InfluenceBounds.off())
        )
        for aggregator in args.aggregators:
            for attackers in ({}, {attacker: args.attack_spec}):
                name = f"{aggregator}, {'attacker' if attackers else 'honest'}"
                try:
                    result = federated(name, args, partition, aggregator, {}, attackers=attackers)
                except Exception as exc:  # a rule that refuses this setting is a row, not a crash
                    result = Result(
                        name, partition, None, status="ERROR", aggregator=aggregator, error=str(exc)
                    )
                    result.attack = ", ".join(f"{c}={a}" for c, a in attackers.items()) or None
                results.append(result)
                print(
                    f"  {name} ({partition}): {result.status}, {result.final_accuracy}, "
                    f"rejected {result.rejected} ({result.seconds:.0f} s)",
                    file=sys.stderr,
                )
    return results


def rejections(result: Result) -> str:
    if not result.rejected_by_client:
        return ", ".join(f"{reason}: {n}" for reason, n in sorted(result.rejected.items())) or "-"
    return "; ".join(
        f"{client} " + ", ".join(f"{reason} {n}" for reason, n in sorted(reasons.items()))
        for client, reasons in sorted(result.rejected_by_client.items())
    )


def robustness_table(results: list[Result], args: argparse.Namespace) -> str:
    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    honest = {(r.aggregator, r.split): r for r in results if r.attack is None and r.bounds == "default"}
    lines = [
        "| aggregator | split | bounds | attacker | final test accuracy | vs honest run "
        "| updates rejected (client reason count) | status | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        reference = honest.get((r.aggregator, r.split))
        versus = "-"
        if (
            reference is not None
            and reference is not r
            and None not in (r.final_accuracy, reference.final_accuracy)
        ):
            label = "bounds on" if r.bounds == "off" else "honest"
            versus = f"{r.final_accuracy - reference.final_accuracy:+.3f} vs {label}"
        status = r.status
        if r.status != "SUCCEEDED":
            status += ": " + " ".join(str(r.error).split()).replace("|", "/")[:160]
        lines.append(
            f"| {r.aggregator} | {r.split} | {r.bounds} | {r.attack.split('=')[0] if r.attack else '-'} "
            f"| {number(r.final_accuracy)} | {versus} | {rejections(r)} | {status} "
            f"| {aggregator_note(r.aggregator or '', args.clients)} |"
        )
    return "\n".join(lines)


def honest_cost(results: list[Result]) -> list[str]:
    """FedAvg with the default bounds against the bounds off, honest runs: PASS within the target."""
    lines = []
    for off in (r for r in results if r.bounds == "off"):
        on = next(
            (
                r
                for r in results
                if r.aggregator == off.aggregator
                and r.split == off.split
                and r.bounds == "default"
                and r.attack is None
            ),
            None,
        )
        if on is None or on.final_accuracy is None or off.final_accuracy is None:
            lines.append(f"{off.split}: no figure (no finished honest FedAvg run with the default bounds)")
            continue
        cost = off.final_accuracy - on.final_accuracy
        verdict = "PASS" if cost <= HONEST_COST_TARGET else "MISS"
        lines.append(
            f"{verdict} {off.split}: the default bounds cost an honest FedAvg run {cost:+.3f} test accuracy "
            f"({on.final_accuracy:.3f} on, {off.final_accuracy:.3f} off; target <= {HONEST_COST_TARGET})"
        )
    return lines


def plot_robustness(results: list[Result], args: argparse.Namespace, path: Path) -> None:
    plt = pyplot()
    splits = list(dict.fromkeys(r.split for r in results))
    fig, axes = plt.subplots(1, len(splits), figsize=(5.2 * len(splits), 4.4), sharey=True, squeeze=False)
    for ax, split in zip(axes[0], splits, strict=True):
        for r in (r for r in results if r.split == split and r.curve):
            steps = range(1, len(r.curve) + 1)
            # Wide translucent lines stay visible under a run with the same curve (bounds off vs on;
            # median and trimmed-mean coincide when beta trims as much as the median does).
            if r.bounds == "off":
                style: dict[str, Any] = {
                    "color": "grey",
                    "lw": 6,
                    "alpha": 0.35,
                    "label": "fedavg, bounds off",
                }
            else:
                style = {
                    "color": COLOURS.get(r.aggregator or ""),
                    "ls": "--" if r.attack else "-",
                    "lw": 3.5 if r.aggregator == "median" else 1.5,
                    "alpha": 0.6 if r.aggregator == "median" else 1.0,
                    "label": f"{r.aggregator}{', attacker' if r.attack else ''}",
                }
            ax.plot(steps, r.curve, marker="o", markersize=3, **style)
        ax.set(xlabel="round", title=split, ylim=(0, 1), xticks=range(1, args.rounds + 1))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(
        f"{args.dataset}, {args.clients} clients, dashed: site-{args.clients} attacks ({args.attack_spec})",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def robustness_main(args: argparse.Namespace) -> None:
    from fedstream.local.attack import parse_attack

    parse_attack(args.attack_spec)  # fail before any run
    started = time.monotonic()
    results = run_robustness(args)
    total = time.monotonic() - started
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "results": [vars(r) for r in results]}
    (args.out / "robustness.json").write_text(json.dumps(report, indent=2))
    plot = args.plot or ROBUSTNESS_PLOT
    plot_robustness(results, args, plot)
    from fedstream.client.trainers import default_model_for

    print(
        f"{args.dataset}, model {default_model_for(args.dataset).__name__}, {args.clients} clients, "
        f"{args.rounds} rounds x {args.epochs} local epoch(s), batch {args.batch_size}; attacker "
        f"site-{args.clients}: {args.attack_spec}; default bounds {InfluenceBounds().model_dump()}\n"
    )
    print(robustness_table(results, args))
    print()
    print("\n".join(honest_cost(results)))
    print(f"\n{len(results)} runs in {total / 60:.1f} min (with process start-up); plot: {plot}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="mnist-5k", choices=("mnist-5k", "digits"))
    parser.add_argument("--clients", type=int, help="clients per run (default 5; --robustness: 4)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--non-iid", default="dirichlet:0.5", help="the non-IID partition")
    parser.add_argument("--epsilons", default="1,4,8", help="comma-separated target epsilons")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--clip-norm", type=float, default=1.0, help="dp-noise: clip norm C")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-learning-quality"))
    parser.add_argument(
        "--plot",
        type=Path,
        help="default benchmarks/plots/learning_quality.png (--robustness: benchmarks/plots/robustness.png)",
    )
    parser.add_argument(
        "--robustness",
        action="store_true",
        help="report robust aggregators with and without one attacking client instead",
    )
    parser.add_argument(
        "--attack-spec", default=DEFAULT_ATTACK, help="--robustness: the last client's attack"
    )
    parser.add_argument(
        "--aggregators", default=",".join(ROBUST_AGGREGATORS), help="--robustness: comma-separated"
    )
    args = parser.parse_args()
    args.aggregators = [a.strip() for a in args.aggregators.split(",") if a.strip()]
    if args.robustness:
        args.clients = args.clients or 4
        robustness_main(args)
        return
    args.clients = args.clients or 5
    args.plot = args.plot or DEFAULT_PLOT
    epsilons = [float(e) for e in args.epsilons.split(",") if e.strip()]

    started = time.monotonic()
    central = train_centrally(args)
    print(f"  {central.name}: {central.final_accuracy:.3f} ({central.seconds:.0f} s)", file=sys.stderr)
    results = [central]
    fedavg_iid = federated("FedAvg", args, "iid", "fedavg", {})
    results += [fedavg_iid, federated("FedAvg", args, args.non_iid, "fedavg", {})]
    dp_common = {"clip_norm": args.clip_norm, "delta": args.delta, "sample_rate": 1.0}
    no_noise = {**dp_common, "noise_multiplier": 0.0}
    results.append(federated("dp-noise, clipping only", args, "iid", "dp-noise", no_noise))
    for epsilon in epsilons:
        z = noise_for_epsilon(epsilon, args.rounds, args.delta)
        result = federated(
            f"dp-noise, target epsilon {epsilon:g}",
            args,
            "iid",
            "dp-noise",
            {**dp_common, "noise_multiplier": z},
        )
        result.target_epsilon = epsilon
        results.append(result)
    for r in results[1:]:
        print(f"  {r.name} ({r.split}): {r.status}, {r.final_accuracy} ({r.seconds:.0f} s)", file=sys.stderr)
    total = time.monotonic() - started

    args.out.mkdir(parents=True, exist_ok=True)
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "results": [vars(r) for r in results]}
    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    plot(results, args, args.plot)
    from fedstream.client.trainers import default_model_for

    print(
        f"{args.dataset}, model {default_model_for(args.dataset).__name__}, {args.clients} clients, "
        f"{args.rounds} rounds x {args.epochs} local epoch(s), batch {args.batch_size}; dp-noise: clip norm "
        f"{args.clip_norm:g}, delta {args.delta:g}, sample rate 1.0\n"
    )
    print(table(results, central, fedavg_iid, args.clip_norm, args.clients))
    failed = [f"{r.name} ({r.split}): {r.status}" for r in results if r.status != "SUCCEEDED"]
    if failed:
        print("runs that did not succeed: " + "; ".join(failed))
    print(f"\n{len(results)} runs in {total / 60:.1f} min (with process start-up); plot: {args.plot}")


if __name__ == "__main__":
    main()
