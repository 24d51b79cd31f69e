"""Throughput and peak memory of the streaming aggregation engine, against naive and memory bandwidth.

    .venv/bin/python benchmarks/aggregation_engine.py                      # K in 10,50,200; 1M,10M,50M
    .venv/bin/python benchmarks/aggregation_engine.py --clients 10,50 --params 1e6,1e7 --json out.json
    .venv/bin/python benchmarks/aggregation_engine.py --quick              # a smoke run, a few seconds

For every (K clients, model size) cell, four variants run, each in a fresh subprocess:

* generate-only: makes the K updates' safetensors bytes and drops them. Its peak RSS (interpreter,
  imports, the generator's base model, one update in flight) is subtracted from the others' peaks.
* streaming: what the sync round close does per update: ``decode`` (size, structure, spec;
  ``check_finite=False``, because the close reads the S3 object version that registration
  already scanned for NaN/Inf) then ``WeightedSum.add``; ``mean`` at the end.
* checked: the same with the NaN/Inf scan too, as a payload nobody has checked yet needs (the
  cost registration pays once per update, as records arrive).
* naive: ``decode`` every update, keep them all, ``np.stack`` each tensor, ``np.average``. Skipped
  when its estimated peak (see ``naive_bytes``) would exceed ``--naive-limit-gib``.
* np.add: the memory-bandwidth floor: one ``np.add(acc, x, out=acc)`` per update over the same
  bytes (a float32 view of the payload, no decode, no checks).

Update ``i`` is made when it is needed, as a handler downloads it: the generator's one random base
model (``default_rng(seed)``) scaled by a per-client factor, then ``encode``. So no variant holds K
models unless it keeps them itself, and generating 40 GB of updates stays cheaper than
aggregating them. "agg s" is the time spent aggregating (decode + add + mean), generation excluded;
throughput is K x payload bytes / agg s, in GB/s (1e9 bytes). Workers run with
OPENBLAS_NUM_THREADS=1, so every variant computes on one core. ``decode`` is called without the
record's sha256, so hashing (which the handler also does) is not part of these figures.

Targets, reported as PASS/MISS (never asserted): at K = 50 streaming takes at least 5x less time
and 10x less net peak memory than naive; streaming's net peak is flat in K (largest K within 10%
+ 16 MiB of the smallest); streaming throughput is at least half of np.add's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from aggregation_memory import examples, model_spec  # the same models and example counts

from fedstream.aggregation import WeightedSum
from fedstream.weights import ModelSpec, Weights, decode, encode

VARIANTS = ("generate-only", "streaming", "checked", "naive", "np.add")
MIB = 1024 * 1024
GIB = 1024 * MIB
K_FOR_SPEEDUP = 50


def incoming(spec: ModelSpec, seed: int, clients: int) -> Iterator[bytes]:
    """Each client's update as safetensors bytes, made when asked for; one in flight at a time."""
    base = np.random.default_rng(seed).standard_normal(spec.num_parameters, dtype=np.float32)
    scaled = np.empty_like(base)
    for client in range(clients):
        np.multiply(base, np.float32(0.5 + client / clients), out=scaled)
        yield encode(split(spec, scaled))


def split(spec: ModelSpec, flat: np.ndarray) -> Weights:
    tensors, start = {}, 0
    for tensor in spec.tensors:
        size = int(np.prod(tensor.shape))
        tensors[tensor.name] = flat[start : start + size].reshape(tensor.shape)
        start += size
    return tensors


@dataclass
class Clock:
    seconds: float = 0.0

    def timed(self, work: Callable[[], object]) -> object:
        started = time.perf_counter()
        result = work()
        self.seconds += time.perf_counter() - started
        return result


def generate_only(spec: ModelSpec, seed: int, clients: int, clock: Clock) -> tuple[Weights, int]:
    total = 0
    for data in incoming(spec, seed, clients):
        total += len(data)
    return {}, total


def streaming(
    spec: ModelSpec, seed: int, clients: int, clock: Clock, *, check_finite: bool = False
) -> tuple[Weights, int]:
    counts = examples(seed, clients)
    running: WeightedSum | None = None
    total = 0
    for data, count in zip(incoming(spec, seed, clients), counts, strict=True):
        total += len(data)
        weights, _ = clock.timed(lambda data=data: decode(data, spec, check_finite=check_finite))
        del data
        if running is None:
            running = WeightedSum(weights)
        clock.timed(lambda weights=weights, count=count, running=running: running.add(weights, float(count)))
        del weights
    assert running is not None
    return clock.timed(running.mean), total


def checked(spec: ModelSpec, seed: int, clients: int, clock: Clock) -> tuple[Weights, int]:
    return streaming(spec, seed, clients, clock, check_finite=True)


def naive(spec: ModelSpec, seed: int, clients: int, clock: Clock) -> tuple[Weights, int]:
    counts = examples(seed, clients)
    decoded, total = [], 0
    for data in incoming(spec, seed, clients):
        total += len(data)
        decoded.append(clock.timed(lambda data=data: decode(data, spec)[0]))
        del data

    def average() -> Weights:
        result = {}
        for tensor in spec.tensors:
            stacked = np.stack([weights[tensor.name] for weights in decoded])
            result[tensor.name] = np.average(stacked, axis=0, weights=counts).astype(np.float32)
            del stacked
        return result

    return clock.timed(average), total


def bandwidth(spec: ModelSpec, seed: int, clients: int, clock: Clock) -> tuple[Weights, int]:
    acc = np.zeros(spec.num_parameters, dtype=np.float32)
    total = 0
    for data in incoming(spec, seed, clients):
        total += len(data)
        # The tensors are the last num_parameters * 4 bytes of the payload, after the header.
        values = np.frombuffer(data, dtype=np.float32, offset=len(data) - acc.nbytes)
        clock.timed(lambda values=values: np.add(acc, values, out=acc))
        del values, data
    return {"sum": acc}, total


RUNNERS = {
    "generate-only": generate_only,
    "streaming": streaming,
    "checked": checked,
    "naive": naive,
    "np.add": bandwidth,
}


def naive_bytes(clients: int, num_params: int) -> int:
    """Estimated naive peak: K decoded updates, one tensor stacked (half the model x K), and
    ``np.average``'s float64 product of it (twice that)."""
    model = num_params * 4
    return int(clients * model * (1 + 0.5 + 1.0))


def worker(variant: str, clients: int, num_params: int, seed: int) -> dict[str, float]:
    spec = model_spec(num_params)
    clock = Clock()
    started = time.perf_counter()
    result, total = RUNNERS[variant](spec, seed, clients, clock)
    wall = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    checksum = float(sum(np.sum(a, dtype=np.float64) for a in result.values()))
    return {
        "agg_seconds": clock.seconds,
        "total_seconds": wall,
        "peak_kib": peak,
        "payload_bytes": total,
        "checksum": checksum,
    }


def measure(variant: str, clients: int, num_params: int, seed: int) -> dict[str, float]:
    command = [
        sys.executable,
        __file__,
        "--worker",
        variant,
        "--clients",
        str(clients),
        "--params",
        str(num_params),
        "--seed",
        str(seed),
    ]
    # One thread for BLAS too (the finiteness check is a dot product): every variant gets one core.
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(output)


def parse_counts(text: str) -> list[int]:
    return [int(float(part)) for part in text.split(",") if part.strip()]


def fmt_mib(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 10 else f"{value:.1f}"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def run_cell(clients: int, num_params: int, args: argparse.Namespace) -> dict:
    model_bytes = num_params * 4
    cell: dict = {"clients": clients, "params": num_params, "model_mib": model_bytes / MIB, "variants": {}}
    print(
        f"\nK={clients} clients x {num_params:,} float32 parameters ({model_bytes / MIB:,.1f} MiB a model, "
        f"{clients * model_bytes / GIB:,.2f} GiB of updates)",
        flush=True,
    )
    print(
        f"  {'variant':<14}{'agg s':>9}{'total s':>9}{'GB/s':>8}{'peak MiB':>10}{'net MiB':>10}{'/ model':>9}"
    )
    baseline_kib = None
    for variant in VARIANTS:
        if variant == "naive" and naive_bytes(clients, num_params) > args.naive_limit_gib * GIB:
            need = naive_bytes(clients, num_params) / GIB
            cell["variants"][variant] = {"skipped": f"needs ~{need:.1f} GiB"}
            print(f"  {variant:<14}skipped: needs ~{need:.1f} GiB (limit {args.naive_limit_gib:g} GiB)")
            continue
        r = measure(variant, clients, num_params, args.seed)
        if variant == "generate-only":
            baseline_kib = r["peak_kib"]
        assert baseline_kib is not None
        r["net_mib"] = (r["peak_kib"] - baseline_kib) / 1024
        r["gb_per_s"] = r["payload_bytes"] / r["agg_seconds"] / 1e9 if r["agg_seconds"] > 0 else None
        cell["variants"][variant] = r
        if variant == "generate-only":
            print(
                f"  {variant:<14}{'-':>9}{r['total_seconds']:>9.2f}{'-':>8}{r['peak_kib'] / 1024:>10,.0f}"
                f"{'-':>10}{'-':>9}"
            )
        else:
            print(
                f"  {variant:<14}{r['agg_seconds']:>9.3f}{r['total_seconds']:>9.2f}{r['gb_per_s']:>8.2f}"
                f"{r['peak_kib'] / 1024:>10,.0f}{fmt_mib(r['net_mib']):>10}"
                f"{r['net_mib'] * MIB / model_bytes:>8.1f}x",
                flush=True,
            )
    stream, add = cell["variants"]["streaming"], cell["variants"]["np.add"]
    ratio = stream["gb_per_s"] / add["gb_per_s"]
    cell["throughput_ratio"] = ratio
    cell["checked_ratio"] = cell["variants"]["checked"]["gb_per_s"] / add["gb_per_s"]
    line = (
        f"  streaming / np.add throughput = {ratio:.2f} (target >= 0.5): {verdict(ratio >= 0.5)}"
        f" (checked: {cell['checked_ratio']:.2f})"
    )
    full = cell["variants"].get("naive", {})
    if "checksum" in full:
        cell["speedup"] = full["agg_seconds"] / stream["agg_seconds"]
        cell["memory_ratio"] = full["net_mib"] / max(stream["net_mib"], 1.0)
        relative = abs(stream["checksum"] - full["checksum"]) / max(1.0, abs(full["checksum"]))
        line += (
            f"; vs naive: {cell['speedup']:.1f}x less time, {cell['memory_ratio']:.0f}x less net memory, "
            f"results differ by {relative:.1e} (relative)"
        )
    print(line, flush=True)
    return cell


def targets(cells: list[dict]) -> list[tuple[str, bool | None, str]]:
    checks: list[tuple[str, bool | None, str]] = []
    for cell in cells:
        tag = f"K={cell['clients']}, {cell['params']:.0e} params"
        if cell["clients"] == K_FOR_SPEEDUP:
            if "speedup" in cell:
                speedup, memory = cell["speedup"], cell["memory_ratio"]
                checks.append((f"time vs naive >= 5x ({tag})", speedup >= 5, f"{speedup:.1f}x"))
                checks.append((f"memory vs naive >= 10x ({tag})", memory >= 10, f"{memory:.0f}x"))
            else:
                checks.append((f"vs naive ({tag})", None, "naive " + cell["variants"]["naive"]["skipped"]))
        ratio = cell["throughput_ratio"]
        checks.append((f"throughput >= 0.5 x np.add ({tag})", ratio >= 0.5, f"{ratio:.2f}"))
    for num_params in sorted({c["params"] for c in cells}):
        row = sorted((c for c in cells if c["params"] == num_params), key=lambda c: c["clients"])
        if len(row) < 2:
            continue
        low, high = row[0]["variants"]["streaming"]["net_mib"], row[-1]["variants"]["streaming"]["net_mib"]
        flat = high <= low * 1.10 + 16
        checks.append(
            (
                f"peak flat in K ({num_params:.0e} params, K={row[0]['clients']}..{row[-1]['clients']})",
                flat,
                f"{fmt_mib(low)} -> {fmt_mib(high)} MiB",
            )
        )
    return checks


def markdown(cells: list[dict]) -> str:
    lines = [
        "| K | params | model MiB | variant | agg s | GB/s | net peak MiB | net peak / model |",
        "|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for cell in cells:
        for variant in VARIANTS[1:]:
            r = cell["variants"][variant]
            head = f"| {cell['clients']} | {cell['params']:,} | {cell['model_mib']:,.1f} | {variant} |"
            if "skipped" in r:
                lines.append(f"{head} skipped: {r['skipped']} | | | |")
                continue
            per_model = r["net_mib"] / cell["model_mib"]
            net = fmt_mib(r["net_mib"])
            figures = f"{r['agg_seconds']:.3f} | {r['gb_per_s']:.2f} | {net} | {per_model:.1f}x"
            lines.append(f"{head} {figures} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", default="10,50,200", help="comma-separated K values")
    parser.add_argument("--params", default="1e6,1e7,5e7", help="comma-separated float32 parameter counts")
    parser.add_argument("--quick", action="store_true", help="smoke run: K in 5,10 and 1e5,1e6 parameters")
    parser.add_argument("--naive-limit-gib", type=float, default=8.0, help="skip naive above this estimate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, int(args.clients), int(float(args.params)), args.seed)))
        return 0
    if args.quick:
        args.clients, args.params = "5,10", "1e5,1e6"
    clients, sizes = parse_counts(args.clients), parse_counts(args.params)
    print(
        "peak = ru_maxrss of a fresh process per variant; net = peak - generate-only's peak; "
        "agg s excludes making the update bytes"
    )
    cells = [run_cell(k, n, args) for n in sizes for k in clients]

    print("\n## Results\n")
    print(markdown(cells))
    print("\n## Targets\n")
    checks = targets(cells)
    for name, ok, value in checks:
        status = "n/a " if ok is None else verdict(ok)
        print(f"- {status} {name}: {value}")
    if args.json:
        payload = {"cells": cells, "targets": [{"target": n, "pass": ok, "value": v} for n, ok, v in checks]}
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
