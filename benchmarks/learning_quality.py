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

    .venv/bin/python benchmarks/learning_quality.py                       # mnist-5k, about 10 min
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

from fedstream.local.plot import pyplot
from fedstream.local.run import LocalRunConfig, run_local

DEFAULT_PLOT = Path(__file__).resolve().parent / "plots" / "learning_quality.png"


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


def noise_for_epsilon(epsilon: float, rounds: int, delta: float, sample_rate: float = 1.0) -> float:
    """The smallest noise multiplier z (to 1e-4 relative) whose epsilon after ``rounds`` is <= ``epsilon``."""
    from plugins.dp_noise import epsilon_for

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
    from client.data import ClientData, client_shard, load_dataset
    from client.trainer import DEFAULT_KERAS_LEARNING_RATES, KerasTrainer, default_model_for

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
    name: str, args: argparse.Namespace, partition: str, aggregator: str, params: dict[str, Any]
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="mnist-5k", choices=("mnist-5k", "digits"))
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--non-iid", default="dirichlet:0.5", help="the non-IID partition")
    parser.add_argument("--epsilons", default="1,4,8", help="comma-separated target epsilons")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--clip-norm", type=float, default=1.0, help="dp-noise: clip norm C")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-learning-quality"))
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT)
    args = parser.parse_args()
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
    from client.trainer import default_model_for

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
