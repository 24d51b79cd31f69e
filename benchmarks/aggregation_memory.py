"""Peak memory and wall time of streaming FedAvg against the naive decode-all-then-stack average.

    .venv/bin/python benchmarks/aggregation_memory.py --clients 50 --params 5000000

Each variant runs in a fresh subprocess, so one variant's allocations cannot lower or raise
another's peak. Peak memory is the process's peak resident set size, ``getrusage(RUSAGE_SELF)
.ru_maxrss`` (KiB on Linux), which counts every allocation: numpy's, safetensors' (Rust) and
Python's. Every subprocess makes the client updates the same way: update ``i`` is serialised to
safetensors bytes from ``default_rng([seed, i])`` at the moment it is needed (as a handler would
download it), with example counts from ``default_rng(seed)``. A third subprocess, ``generate-only``,
makes and drops the same bytes without aggregating; its peak (interpreter, imports, one update in
flight) is the baseline subtracted from the other two to give what aggregation itself costs.

* streaming: decode one update, add it into ``WeightedSum`` (a float32 sum for float32 tensors), drop it.
* naive: decode all updates, ``np.stack`` each tensor and ``np.average`` with the example weights.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np

from fedstream.aggregation import WeightedSum
from fedstream.weights import ModelSpec, TensorSpec, Weights, decode, encode

VARIANTS = ("generate-only", "streaming", "naive")
MIB = 1024 * 1024


def model_spec(num_params: int) -> ModelSpec:
    """Four float32 tensors (two kernels, two biases) holding ``num_params`` values in total."""
    bias = min(1000, num_params // 100)
    kernels = num_params - 2 * bias
    sizes = {
        "dense_1/kernel": kernels // 2,
        "dense_1/bias": bias,
        "dense_2/kernel": kernels - kernels // 2,
        "dense_2/bias": bias,
    }
    return ModelSpec(tuple(TensorSpec(name, (size,), "float32") for name, size in sizes.items()))


def update_bytes(spec: ModelSpec, seed: int, client: int) -> bytes:
    rng = np.random.default_rng([seed, client])
    return encode({t.name: rng.standard_normal(t.shape, dtype=np.float32) for t in spec.tensors})


def examples(seed: int, clients: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(100, 1000, size=clients)


def incoming(spec: ModelSpec, seed: int, clients: int) -> Iterator[bytes]:
    for client in range(clients):
        yield update_bytes(spec, seed, client)


def streaming(spec: ModelSpec, seed: int, clients: int) -> Weights:
    counts = examples(seed, clients)
    running: WeightedSum | None = None
    for data, count in zip(incoming(spec, seed, clients), counts, strict=True):
        weights, _ = decode(data, spec)
        del data
        if running is None:
            running = WeightedSum(weights)
        running.add(weights, float(count))
        del weights
    assert running is not None
    return running.mean()


def naive(spec: ModelSpec, seed: int, clients: int) -> Weights:
    counts = examples(seed, clients)
    decoded = [decode(data, spec)[0] for data in incoming(spec, seed, clients)]
    result = {}
    for tensor in spec.tensors:
        stacked = np.stack([weights[tensor.name] for weights in decoded])
        result[tensor.name] = np.average(stacked, axis=0, weights=counts).astype(np.float32)
        del stacked
    return result


def generate_only(spec: ModelSpec, seed: int, clients: int) -> Weights:
    size = 0
    for data in incoming(spec, seed, clients):
        size += len(data)
    return {}


def worker(variant: str, clients: int, num_params: int, seed: int) -> dict[str, float]:
    spec = model_spec(num_params)
    run = {"generate-only": generate_only, "streaming": streaming, "naive": naive}[variant]
    start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    result = run(spec, seed, clients)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    checksum = float(sum(np.sum(a, dtype=np.float64) for a in result.values()))
    return {"seconds": seconds, "peak_kib": peak, "start_kib": start_rss, "checksum": checksum}


def measure(variant: str, args: argparse.Namespace) -> dict[str, float]:
    command = [
        sys.executable,
        __file__,
        "--worker",
        variant,
        "--clients",
        str(args.clients),
        "--params",
        str(args.params),
        "--seed",
        str(args.seed),
    ]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--params", type=int, default=5_000_000, help="float32 parameters per model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.clients, args.params, args.seed)))
        return 0

    model_mib = args.params * 4 / MIB
    print(
        f"{args.clients} clients x {args.params:,} float32 parameters ({model_mib:.1f} MiB a model, "
        f"{args.clients * model_mib:,.0f} MiB of updates); peak = ru_maxrss of a fresh process"
    )
    results = {variant: measure(variant, args) for variant in VARIANTS}
    baseline, baseline_seconds = results["generate-only"]["peak_kib"], results["generate-only"]["seconds"]
    print(
        f"{'variant':<14}{'wall s':>8}{'- baseline s':>14}{'peak RSS MiB':>14}{'- baseline MiB':>16}"
        f"{'/ model size':>14}"
    )
    for variant, r in results.items():
        net = (r["peak_kib"] - baseline) / 1024
        ratio = f"{net / model_mib:.1f}x" if variant != "generate-only" else "-"
        print(
            f"{variant:<14}{r['seconds']:>8.2f}{r['seconds'] - baseline_seconds:>14.2f}"
            f"{r['peak_kib'] / 1024:>14.0f}{net:>16.0f}{ratio:>14}"
        )
    stream, full = results["streaming"], results["naive"]
    relative = abs(stream["checksum"] - full["checksum"]) / max(1.0, abs(full["checksum"]))
    print(
        f"baseline (generate-only: interpreter, imports, one update in flight) = {baseline / 1024:.0f} MiB; "
        f"results agree: sum differs by {relative:.1e} (relative)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
