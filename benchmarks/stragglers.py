"""Time to a target accuracy, sync FedAvg against async FedAsync, with straggling sites.

Runs both modes through `fedstream local` (the embedded AWS, real Keras clients) with the same
clients, data split and stragglers, and prints when each first reached the target test accuracy.

    .venv/bin/python benchmarks/stragglers.py --clients 6 --stragglers 2 --factor 4 --target 0.85
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedstream.local.run import LocalRunConfig, run_local


def time_to(rows: list, target: float) -> tuple[float | None, int | None]:
    for row in rows:
        if row.test_accuracy is not None and row.test_accuracy >= target:
            return row.elapsed_seconds, row.version
    return None, None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--stragglers", type=int, default=2)
    parser.add_argument("--factor", type=float, default=4.0)
    parser.add_argument("--target", type=float, default=0.85)
    parser.add_argument("--dataset", default="mnist-5k")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--updates", type=int, default=90)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-stragglers"))
    args = parser.parse_args()

    common = dict(
        clients=args.clients,
        dataset=args.dataset,
        trainer="keras",
        epochs=args.epochs,
        stragglers=args.stragglers,
        straggler_factor=args.factor,
        progress=False,
        seed=0,
        target_accuracy=None,
    )
    results = {}
    for mode, aggregator in (("sync", "fedavg"), ("async", "fedasync"), ("async", "fedbuff")):
        config = LocalRunConfig(
            mode=mode,
            aggregator=aggregator,
            rounds=args.rounds,
            updates=args.updates,
            out=args.out / aggregator,
            **common,
        )
        summary = run_local(config)
        seconds, version = time_to(summary.rounds, args.target)
        results[aggregator] = {
            "mode": mode,
            "status": summary.status,
            "seconds_to_target": seconds,
            "versions_to_target": version,
            "final_accuracy": summary.accuracies[-1] if summary.accuracies else None,
            "wall_seconds": summary.wall_seconds,
            "counts": summary.counts,
        }
    print(json.dumps(results, indent=2))
    sync_s = results["fedavg"]["seconds_to_target"]
    print(f"{args.clients} clients, {args.stragglers} stragglers x{args.factor}, target {args.target}:")
    for name, result in results.items():
        seconds = result["seconds_to_target"]
        ratio = f"  ({seconds / sync_s:.2f} x sync)" if seconds and sync_s and name != "fedavg" else ""
        shown = "not reached" if seconds is None else f"{seconds:.1f} s"
        print(f"  {name:9s} {shown}{ratio}")


if __name__ == "__main__":
    main()
