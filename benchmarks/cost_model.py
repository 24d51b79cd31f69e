"""Lambda cost of one sync round: the streaming aggregate function against loading every model at once.

    .venv/bin/python benchmarks/cost_model.py                        # K = 100, 25M float32 (100 MB)
    .venv/bin/python benchmarks/cost_model.py --clients 100 --params 25e6 --engine-json results.json

The handler's compute is measured here, by running the code the aggregate function runs on each
update: at registration ``decode`` with the record's sha256 and the NaN/Inf scan; when the round
closes ``decode`` of the same S3 object version with neither (see ``ValidatedReport``) and
``WeightedSum.add``; at the end ``mean`` + ``encode`` + sha256 of the new global model. Updates
are made one at a time as in benchmarks/aggregation_engine.py. Download time from S3 is not
measured: it is added at an assumed rate (``--s3-mb-per-s``) and shown separately.

The load-everything design is not run (it needs more memory than this machine should give it);
its memory is computed, and its time scaled from the naive variant's measured throughput in an
aggregation_engine.py JSON (``--engine-json``) when one is given.

Request counts come from the code (fedstream/server/sync.py, fedstream/server/store.py,
handlers/, stacks/): see ``requests_per_round``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")  # as the Makefile does
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # one core, as benchmarks/aggregation_engine.py

from aggregation_engine import examples, incoming, model_spec
from fedstream.stacks import constants
from fedstream.stacks.config import DeploymentConfig

from fedstream.aggregation import WeightedSum
from fedstream.weights import decode, encode, sha256_hex

# AWS Lambda price list, x86_64, us-east-1, as published on aws.amazon.com/lambda/pricing in
# 2025 (first pricing tier; checked 2025-06): $0.0000166667 per GB-second, $0.20 per 1M requests.
PRICE_PER_GB_SECOND = 0.0000166667
PRICE_PER_REQUEST = 0.20 / 1_000_000
# Lambda gives a function CPU in proportion to its memory: one vCPU at 1,769 MB (AWS docs).
MB_PER_VCPU = 1769
MIB = 1024 * 1024


def measure_streaming(num_params: int, clients: int, seed: int) -> dict[str, float]:
    """Per-update seconds of the handler's steps at this model size, over ``clients`` updates."""
    spec = model_spec(num_params)
    counts = examples(seed, clients)
    decode_s = close_decode_s = add_s = sha_s = 0.0
    running: WeightedSum | None = None
    payload = 0
    for data, count in zip(incoming(spec, seed, clients), counts, strict=True):
        hashed = time.perf_counter()
        digest = sha256_hex(data)  # what the record carries; timed to show the hash's share of decode
        sha_s += time.perf_counter() - hashed
        payload = len(data)
        started = time.perf_counter()
        decode(data, spec, expected_sha256=digest)  # registration
        registered = time.perf_counter()
        weights, _ = decode(data, spec, check_finite=False)  # the close, at the pinned version
        decoded = time.perf_counter()
        if running is None:
            running = WeightedSum(weights)
        running.add(weights, float(count))
        decode_s += registered - started
        close_decode_s += decoded - registered
        add_s += time.perf_counter() - decoded
        del weights, data
    assert running is not None
    started = time.perf_counter()
    result = encode(running.mean(), {"version": "1"})
    sha256_hex(result)
    publish_s = time.perf_counter() - started
    return {
        "clients": clients,
        "payload_bytes": payload,
        "decode_with_sha256_s": decode_s / clients,
        "sha256_s": sha_s / clients,
        "close_decode_s": close_decode_s / clients,
        "add_s": add_s / clients,
        "publish_s": publish_s,
    }


def requests_per_round(clients: int, batch_size: int) -> list[tuple[str, str, int, int, str]]:
    """(who, request, best case, worst case, where in the code) for one sync round of K clients.

    Best case: the stream hands the aggregate function full batches and one warm container serves
    the round. Worst case: every record is its own invocation in a fresh container. No rejections,
    no retries, closed by the last report (not at the deadline).
    """
    k = clients
    return [
        (
            "Aggregate",
            "Lambda invocations",
            math.ceil(k / batch_size),
            k,
            f"DynamoDB stream, batch size {batch_size} (constants.SYNC_STREAM_BATCH_SIZE)",
        ),
        (
            "Finalize",
            "Lambda invocations",
            1,
            1,
            "model-ready message on the finalize queue (record_round_token)",
        ),
        (
            "Aggregate",
            "S3 GetObject, updates",
            2 * k,
            2 * k,
            "load_update: at registration (register_report), and the pinned version at the close",
        ),
        ("Aggregate", "S3 GetObject, global model", 1, k, "Store.global_model, cached per warm container"),
        ("Aggregate", "S3 PutObject, new global", 1, 1, "_aggregate_and_publish: put_once"),
        (
            "Aggregate",
            "DynamoDB GetItem",
            1,
            1,
            "close: run_state (registration and the close use the items their writes return)",
        ),
        (
            "Aggregate",
            "DynamoDB UpdateItem",
            k + 4,
            k + 4,
            "per record: report set-add; close: claim, state flip, round closed, callback flag",
        ),
        ("Aggregate", "Step Functions SendTaskSuccess", 1, 1, "deliver_round_result"),
        ("Finalize", "DynamoDB UpdateItem + GetItem", 2, 2, "record_round_token + deliver_round_result"),
        (
            "clients",
            "S3 GetObject + PutObject, DynamoDB PutItem",
            3 * k,
            3 * k,
            "each client: global model down, update up, update record",
        ),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--params", default="25e6", help="float32 parameters (25e6 = 100 MB)")
    parser.add_argument("--measure-clients", type=int, help="updates to time (default: --clients)")
    parser.add_argument("--s3-mb-per-s", type=float, default=100.0, help="assumed S3 download rate")
    parser.add_argument("--engine-json", type=Path, help="aggregation_engine.py --json output (naive rate)")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    num_params, k = int(float(args.params)), args.clients
    model_bytes = num_params * 4
    model_mib = model_bytes / MIB

    # The stack's defaults (max_model_mb=100 MiB, download_threads=4), raised if the model is larger.
    sizing = DeploymentConfig.model_construct()
    if model_mib > sizing.max_model_mb:
        sizing = DeploymentConfig.model_construct(max_model_mb=math.ceil(model_mib))
    memory_mb = sizing.memory_mb
    cpu_factor = max(1.0, MB_PER_VCPU / memory_mb)
    batch = constants.SYNC_STREAM_BATCH_SIZE

    print(f"K = {k} clients, {num_params:,} float32 parameters = {model_bytes / 1e6:,.0f} MB a model")
    print(
        f"aggregate function memory: {memory_mb:,} MB (DeploymentConfig.memory_mb: "
        f"{constants.LAMBDA_BASE_MEMORY_MB} + max_model_mb {sizing.max_model_mb} x "
        f"({constants.MODEL_COPIES_IN_MEMORY} copies + {sizing.download_threads} download threads), "
        "rounded up to 64)"
    )
    print(f"measuring the handler's per-update work over {args.measure_clients or k} updates ...", flush=True)
    m = measure_streaming(num_params, args.measure_clients or k, args.seed)
    per_update = m["close_decode_s"] + m["add_s"]
    print(
        f"  measured per update: registration's decode incl. sha256 {m['decode_with_sha256_s'] * 1e3:.1f} ms "
        f"(the sha256 alone: {m['sha256_s'] * 1e3:.1f} ms); at the close, decode of the pinned version "
        f"{m['close_decode_s'] * 1e3:.1f} ms + WeightedSum.add {m['add_s'] * 1e3:.1f} ms; "
        f"new global (mean + encode + sha256) {m['publish_s'] * 1e3:.0f} ms"
    )

    register_compute = k * m["decode_with_sha256_s"]
    close_compute = k * per_update + m["publish_s"]
    compute = (register_compute + close_compute) * cpu_factor
    download_one = model_bytes / (args.s3_mb_per_s * 1e6)
    # Registration downloads one record at a time; at the close, prefetch overlaps downloads and work.
    with_downloads = (register_compute * cpu_factor + k * download_one) + max(
        close_compute * cpu_factor, k * download_one
    )
    print(
        f"  per round: registration {register_compute:.1f} s + close {close_compute:.1f} s of compute here, "
        f"x {cpu_factor:.2f} for Lambda's CPU share = {compute:.1f} s"
    )
    gb = memory_mb / 1024
    rows = requests_per_round(k, batch)
    invocations_best = sum(best for _, what, best, _, _ in rows if what == "Lambda invocations")
    invocations_worst = sum(worst for _, what, _, worst, _ in rows if what == "Lambda invocations")

    print("\n## Streaming (the deployed design), per round\n")
    print(
        "| | handler seconds | GB-s | compute $ | requests $ (best..worst) | $ per round | $ per 100 rounds |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, seconds in (
        ("compute only (measured)", compute),
        (f"+ downloads at {args.s3_mb_per_s:g} MB/s", with_downloads),
    ):
        gb_s = gb * seconds
        low, high = invocations_best * PRICE_PER_REQUEST, invocations_worst * PRICE_PER_REQUEST
        per_round = gb_s * PRICE_PER_GB_SECOND + high
        print(
            f"| {label} | {seconds:,.1f} | {gb_s:,.1f} | {gb_s * PRICE_PER_GB_SECOND:.5f} | "
            f"{low:.7f}..{high:.7f} | {per_round:.5f} | {per_round * args.rounds:.3f} |"
        )

    print("\n## Requests per round (from the code)\n")
    print("| who | request | best | worst | where |")
    print("|---|---|---:|---:|---|")
    for who, what, best, worst, where in rows:
        print(f"| {who} | {what} | {best:,} | {worst:,} | {where} |")

    print("\n## Load every model into one function\n")
    naive_factor, naive_rate, source = (
        2.5,
        None,
        "estimate: K decoded + one stacked tensor + np.average's float64 product",
    )
    if args.engine_json and args.engine_json.exists():
        cells = json.loads(args.engine_json.read_text())["cells"]
        ran = [c for c in cells if "net_mib" in c["variants"].get("naive", {})]
        if ran:
            cell = max(ran, key=lambda c: c["clients"] * c["params"])
            naive = cell["variants"]["naive"]
            naive_factor = naive["net_mib"] / (cell["clients"] * cell["model_mib"])
            naive_rate = naive["gb_per_s"]
            where = f"K={cell['clients']} x {cell['params']:,} params"
            source = f"measured: naive variant at {where} in {args.engine_json}"
    base = constants.LAMBDA_BASE_MEMORY_MB
    hold_all = k * model_mib + base
    naive_mib = naive_factor * k * model_mib + base
    limit = constants.LAMBDA_MAX_MEMORY_MB
    print(
        f"- just holding the K decoded models: {k} x {model_mib:.1f} MiB + {base} MiB = {hold_all:,.0f} MB, "
        f"against Lambda's maximum of {limit:,} MB: {limit - hold_all:,.0f} MB would be left for the "
        f"result ({model_mib:.0f} MiB), download buffers and any arithmetic"
    )
    largest_k = math.floor((limit - base) / (naive_factor * model_mib))
    print(
        f"- load, np.stack, np.average (as benchmarked): {naive_factor:.2f} x K x model + {base} = "
        f"{naive_mib:,.0f} MB ({source}): "
        f"{'it cannot run on Lambda' if naive_mib > limit else 'it fits'}, needing "
        f"{naive_mib / limit:.1f}x the maximum; the largest K that fits is {largest_k}"
    )
    if naive_rate:
        # Above 1,769 MB a function has at least one vCPU: no CPU scaling for this one.
        naive_s = k * (m["payload_bytes"] / (naive_rate * 1e9) + m["sha256_s"])
        naive_gb_s = naive_mib / 1024 * naive_s
        naive_usd = naive_gb_s * PRICE_PER_GB_SECOND + PRICE_PER_REQUEST
        print(
            f"- if Lambda allowed {naive_mib:,.0f} MB: {k} updates at the naive variant's measured "
            f"{naive_rate:.2f} GB/s + one sha256 each = {naive_s:.0f} s, {naive_gb_s:,.0f} GB-s, "
            f"${naive_usd:.4f} a round, ${naive_usd * args.rounds:.2f} per {args.rounds} rounds "
            f"(1 invocation, {k} S3 GETs; downloads excluded)"
        )

    print("\n## Assumptions\n")
    print(
        f"- this machine's core stands for one Lambda vCPU; at {memory_mb:,} MB Lambda gives "
        f"{memory_mb / MB_PER_VCPU:.2f} vCPU, so measured compute is scaled by {cpu_factor:.2f}"
    )
    print(
        f"- prices: x86_64 us-east-1, ${PRICE_PER_GB_SECOND:.10f} per GB-s, "
        f"${PRICE_PER_REQUEST * 1e6:.2f} per 1M requests; GB-s = memory MB / 1024 x billed seconds; "
        "free tier ignored; $ per round takes the worst-case request count"
    )
    print(
        f"- S3 downloads at {args.s3_mb_per_s:g} MB/s are an assumption (not measured); registration "
        "fetches one update per record in turn, the close overlaps fetches with work (prefetch)"
    )
    print(
        "- not counted: cold-start init time, Powertools/X-Ray overhead, Step Functions transitions, "
        "SNS/SQS, CloudWatch, and S3/DynamoDB request charges (their counts are listed above)"
    )
    if k > constants.MAX_CLIENTS:
        print(
            f"- K = {k} is more than one stack deploys today (constants.MAX_CLIENTS = "
            f"{constants.MAX_CLIENTS}); the handler code has no such limit"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
