"""Round overhead on the embedded AWS: what a round (sync) or an update (async) costs besides training.

Clients are threads with the instant trainer (no learning, a 1,000-parameter model), so nearly all
of each interval is the server's path: DynamoDB stream -> handler -> Step Functions or SNS -> SQS ->
client. Two runs through ``fedstream local``:

- sync FedAvg, ``--rounds`` rounds: from the last client's record of round r to every client
  holding round r+1's global model (r = 1 .. rounds-1);
- async FedAsync with ``--async-clients`` clients, ``--updates`` applied updates: from a client's
  record to the first client holding the version its batch produced; and the stream handler's
  throughput (records per second of handler time, records per batch), the stream wait (record
  written -> batch committed, from the run's update markers) and the staleness.

Each interval is split where the logs allow: the client's events (``out/clients/*.log``), the
handlers' log lines (``logs.jsonl``), and the entry time of every stream-handler invocation, which
this script records by wrapping the handler functions the local runtime's pollers call (the
server code is not changed). Prints a markdown table of median and p95 per stage.

    .venv/bin/python benchmarks/round_overhead.py                          # 30 rounds, 200 updates, 5 clients
    .venv/bin/python benchmarks/round_overhead.py --rounds 5 --updates 20  # smoke run, ~30 s
    .venv/bin/python benchmarks/round_overhead.py --profile runs/bench-round-overhead/profile.txt

``--profile`` attaches ``py-spy record --idle --threads --subprocesses`` to this process (and so
to the embedded AWS's process) and prints where the stream handler's wall time went.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from botocore.client import BaseClient

from fedstream.local.logs import json_lines
from fedstream.local.run import LocalRunConfig, RunSummary, run_local

DEFAULT_OUT = Path("runs/bench-round-overhead")
STREAM_HANDLERS = ("lambda_handler (handlers/aggregate.py", "lambda_handler (handlers/async_update.py")


# ---- recording the stream handler's invocations ---------------------------------------------


@dataclass
class Invocation:
    started: float
    ended: float
    records: list[tuple[str, int, int | None]]  # (client_id, base_version, round) per record


@dataclass
class Recorder:
    invocations: list[Invocation] = field(default_factory=list)
    # AWS requests the stream handler made, by operation: botocore API calls on its thread, and on
    # the ThreadPoolExecutor workers it starts (the close's prefetch) while it runs
    requests: Counter[str] = field(default_factory=Counter)
    _inside: threading.local = field(default_factory=threading.local)
    _running: int = 0

    def wrap(self, handler: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(handler)
        def timed(event: dict[str, Any], context: Any) -> Any:
            started = time.time()
            self._inside.active, self._running = True, self._running + 1
            try:
                return handler(event, context)
            finally:
                self._inside.active, self._running = False, self._running - 1
                records = [_record_identity(r) for r in event.get("Records", [])]
                self.invocations.append(Invocation(started, time.time(), records))

        return timed

    def count_requests(self, make_api_call: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(make_api_call)
        def counted(client: Any, operation: str, params: Any) -> Any:
            worker = self._running and threading.current_thread().name.startswith("ThreadPoolExecutor")
            if worker or getattr(self._inside, "active", False):
                self.requests[f"{client.meta.service_model.service_name} {operation}"] += 1
            return make_api_call(client, operation, params)

        return counted

    @property
    def records(self) -> int:
        return sum(len(i.records) for i in self.invocations)

    def first_invocation(self, client_id: str, base_version: int) -> Invocation | None:
        for invocation in self.invocations:
            if any(c == client_id and v == base_version for c, v, _ in invocation.records):
                return invocation
        return None

    def poll_split(self, put: float, invocation: Invocation) -> tuple[float, float]:
        """(waiting behind earlier invocations, polling) of a record put at ``put``.

        The pollers invoke one batch at a time: a record put while an invocation runs waits for
        it to end; after that, the poller's loop (sleep when the stream was empty, describe_stream,
        get_records, and the invoke lock, which the finalize poller shares) delivers it.
        """
        index = self.invocations.index(invocation)
        previous_end = self.invocations[index - 1].ended if index else put
        available = max(put, min(previous_end, invocation.started))
        return available - put, invocation.started - available


def _record_identity(record: dict[str, Any]) -> tuple[str, int, int | None]:
    image = record.get("dynamodb", {}).get("NewImage", {})
    round_number = image.get("round", {}).get("N")
    return (
        image.get("client_id", {}).get("S", ""),
        int(image.get("base_version", {}).get("N", -1)),
        None if round_number is None else int(round_number),
    )


def run_recorded(config: LocalRunConfig) -> tuple[RunSummary, Recorder]:
    """One local run with the stream handler's invocations timed (the pollers look it up at start)."""
    from fedstream.handlers import aggregate, async_update

    recorder = Recorder()
    originals = aggregate.lambda_handler, async_update.lambda_handler, BaseClient._make_api_call
    aggregate.lambda_handler = recorder.wrap(originals[0])
    async_update.lambda_handler = recorder.wrap(originals[1])
    BaseClient._make_api_call = recorder.count_requests(originals[2])
    try:
        summary = run_local(config)
    finally:
        aggregate.lambda_handler, async_update.lambda_handler, BaseClient._make_api_call = originals
    return summary, recorder


def requests_table(recorders: dict[str, tuple[Recorder, int]]) -> str:
    """The stream handler's AWS requests per record and per round (sync) or applied update (async)."""
    rows = ["| mode | request | per record | per round / applied update |", "|---|---|---:|---:|"]
    for mode, (recorder, units) in recorders.items():
        records = max(recorder.records, 1)
        for name, count in [*recorder.requests.most_common(), ("all", sum(recorder.requests.values()))]:
            rows.append(f"| {mode} | {name} | {count / records:.2f} | {count / max(units, 1):.1f} |")
    return "\n".join(rows)


# ---- reading the logs -------------------------------------------------------------------------


def log_time(entry: dict[str, Any]) -> float:
    """Powertools' ``timestamp`` ("2026-01-01 12:00:00,123+0000", millisecond resolution) as unix time."""
    return datetime.strptime(entry["timestamp"], "%Y-%m-%d %H:%M:%S,%f%z").timestamp()


def handler_lines(out: Path) -> list[dict[str, Any]]:
    """The handlers' structured log lines (not the EMF metric lines), in the order written."""
    return [e for e in json_lines((out / "logs.jsonl").read_text()) if "message" in e and "timestamp" in e]


def client_events(out: Path) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for path in sorted((out / "clients").glob("*.log")):
        events += [e for e in json_lines(path.read_text()) if "event" in e]
    return events


def previous_line_times(lines: list[dict[str, Any]]) -> dict[int, float]:
    """For each line, the time of the line before it in the same invocation (same request id)."""
    last: dict[str, float] = {}
    previous: dict[int, float] = {}
    for index, line in enumerate(lines):
        request = str(line.get("function_request_id"))
        if request in last:
            previous[index] = last[request]
        last[request] = log_time(line)
    return previous


# ---- the intervals ----------------------------------------------------------------------------


@dataclass
class Stage:
    mode: str
    name: str
    seconds: list[float] = field(default_factory=list)
    indent: bool = False

    def add(self, value: float | None) -> None:
        if value is not None:
            self.seconds.append(value)


def sync_stages(out: Path, recorder: Recorder) -> tuple[list[Stage], dict[str, int]]:
    lines = handler_lines(out)
    previous = previous_line_times(lines)
    events = client_events(out)
    reported = {(e["client_id"], e["round"]): e["at"] for e in events if e["event"] == "reported"}
    training: dict[int, list[float]] = defaultdict(list)
    for e in events:
        if e["event"] == "training":
            training[int(e["round"])].append(e["at"])
    closing: dict[int, tuple[int, dict[str, Any]]] = {}
    closed: dict[int, dict[str, Any]] = {}
    for index, line in enumerate(lines):
        if line["message"] == "update registered" and line["reported"] >= line["required"]:
            closing.setdefault(int(line["round"]), (index, line))
        elif line["message"].startswith("round closed"):
            closed.setdefault(int(line["round"]), line)

    names = [
        ("last record put -> stream handler invoked (stream poll)", False),
        ("of which waiting behind earlier invocations (backlog)", True),
        ("of which polling (sleep, describe_stream, get_records)", True),
        ("stream handler invoked -> last record registered", False),
        ("of which that record's own registration", True),
        ("last record registered -> round closed (close + callback)", False),
        ("of which aggregation_seconds", True),
        ("round closed -> first client holds round r+1", False),
        ("round closed -> every client holds round r+1", False),
        ("total: last record put -> every client holds round r+1", False),
    ]
    stages = [Stage("sync", name, indent=indent) for name, indent in names]
    notes = Counter()
    for round_number in sorted(closed):
        nxt = training.get(round_number + 1)
        if round_number not in closing or not nxt:
            continue
        index, line = closing[round_number]
        client = str(line["client_id"])
        put = reported.get((client, round_number))
        invocation = recorder.first_invocation(client, int(line["version"]))
        if put is None or invocation is None:
            notes["rounds without a matched record"] += 1
            continue
        last_put = max(t for (_, r), t in reported.items() if r == round_number)
        notes["rounds whose closing record was not the last 'reported' event"] += last_put > put
        registered, closed_at = log_time(line), log_time(closed[round_number])
        own_start = max(invocation.started, previous.get(index, invocation.started))
        values = [
            invocation.started - put,
            *recorder.poll_split(put, invocation),
            registered - invocation.started,
            registered - own_start,
            closed_at - registered,
            float(closed[round_number]["aggregation_seconds"]),
            min(nxt) - closed_at,
            max(nxt) - closed_at,
            max(nxt) - last_put,
        ]
        for stage, value in zip(stages, values, strict=True):
            stage.add(value)
    return stages, dict(notes)


def async_stages(out: Path, recorder: Recorder) -> tuple[list[Stage], dict[str, int]]:
    """Per record: stream poll, its batch's handling to the commit, the new version reaching a client."""
    lines = handler_lines(out)
    commits = [line for line in lines if line["message"] == "batch committed"]
    events = client_events(out)
    reported = {(e["client_id"], e["version"]): e["at"] for e in events if e["event"] == "reported"}
    first_training: dict[int, float] = {}
    for e in sorted((e for e in events if e["event"] == "training"), key=lambda e: e["at"]):
        first_training.setdefault(int(e["version"]), e["at"])

    names = [
        ("record put -> stream handler invoked (stream poll)", False),
        ("of which waiting behind earlier invocations (backlog)", True),
        ("of which polling (sleep, describe_stream, get_records)", True),
        ("stream handler invoked -> batch committed", False),
        ("batch committed -> first client holds the new version", False),
        ("total: record put -> first client holds the new version", False),
    ]
    stages = [Stage("async", name, indent=indent) for name, indent in names]
    notes = Counter()
    for invocation in recorder.invocations:
        committed = [c for c in commits if invocation.started <= log_time(c) <= invocation.ended + 0.002]
        if not committed:
            notes["invocations without a commit (only refused or duplicate records)"] += 1
            continue
        commit = committed[-1]
        at, holds = log_time(commit), first_training.get(int(commit["version"]))
        if not commit["published"] or holds is None:
            notes["batches whose version no client trained on (buffered only, or superseded)"] += 1
            holds = None
        for client, base, _ in invocation.records:
            put = reported.get((client, base))
            if put is None:
                notes["records without a matched 'reported' event"] += 1
                continue
            values = [
                invocation.started - put,
                *recorder.poll_split(put, invocation),
                at - invocation.started,
                None if holds is None else holds - at,
                None if holds is None else holds - put,
            ]
            for stage, value in zip(stages, values, strict=True):
                stage.add(value)
    return stages, dict(notes)


def async_throughput(summary: RunSummary, recorder: Recorder) -> str:
    """What the async stream handler got through, and how long records waited for it."""
    busy = sum(i.ended - i.started for i in recorder.invocations)
    sizes = [len(i.records) for i in recorder.invocations if i.records]
    figures = summary.async_stats
    wait, staleness = figures.get("stream_wait_seconds", {}), figures.get("staleness", {})
    records = recorder.records

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.0f} ms"

    def three(values: dict[str, Any], show: Any) -> str:
        return " / ".join(show(values.get(name)) for name in ("p50", "p95", "max"))

    rows = [
        "| figure | value |",
        "|---|---:|",
        f"| records handled | {records} in {len(sizes)} invocations |",
        f"| records per invocation, mean / max | {np.mean(sizes):.1f} / {max(sizes)} |",
        f"| handler busy | {busy:.1f} s of {summary.wall_seconds:.1f} s |",
        f"| records/s while the handler runs | {records / busy:.1f} |",
        f"| handler time per record | {busy / records * 1000:.1f} ms |",
        f"| stream wait p50 / p95 / max | {three(wait, ms)} |",
        f"| staleness p50 / p95 / max | {three(staleness, str)} |",
        f"| most records written and not yet consumed at once | {figures.get('max_backlog')} |",
    ]
    return "\n".join(rows)


def table(stages: Iterable[Stage]) -> str:
    rows = [
        "| mode | interval | n | median ms | p95 ms |",
        "|---|---|---:|---:|---:|",
    ]
    for stage in stages:
        name = f"&nbsp;&nbsp;{stage.name}" if stage.indent else stage.name
        if not stage.seconds:
            rows.append(f"| {stage.mode} | {name} | 0 | - | - |")
            continue
        ms = np.asarray(stage.seconds) * 1000
        rows.append(
            f"| {stage.mode} | {name} | {len(ms)} | {np.median(ms):.0f} | {np.percentile(ms, 95):.0f} |"
        )
    return "\n".join(rows)


# ---- the profile ------------------------------------------------------------------------------


def start_profiler(path: Path, rate: int) -> subprocess.Popen[bytes]:
    path.parent.mkdir(parents=True, exist_ok=True)
    spy = Path(sys.executable).with_name("py-spy")
    command = [str(spy), "record", "--pid", str(os.getpid()), "--idle", "--threads", "--subprocesses"]
    command += ["--rate", str(rate), "--format", "raw", "--output", str(path)]
    profiler = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(2)  # let it attach
    return profiler


def stop_profiler(profiler: subprocess.Popen[bytes]) -> None:
    profiler.send_signal(signal.SIGINT)
    try:
        profiler.wait(timeout=60)
    except subprocess.TimeoutExpired:
        profiler.kill()
        profiler.wait()


def _function(frame: str) -> str:
    """``func (path/to/module.py:12)`` -> ``module.py:func``."""
    name, _, where = frame.partition(" (")
    return f"{where.split(':')[0].rsplit('/', 1)[-1]}:{name}"


def _kind(frames: list[str]) -> str:
    """What a handler sample was doing, judged by the frames below the handler's own code."""
    joined = ";".join(frames)
    leaf = frames[-1]
    if "botocore" in joined or "boto3" in joined:
        if any(s in leaf for s in ("recv_into", "readinto", "readline", "_read_status", "recv (")):
            return "waiting for the embedded AWS's response (socket read)"
        return "botocore: building, signing, sending, parsing requests"
    if "aws_lambda_powertools" in joined.split("lambda_handler (handlers/", 1)[-1] and "logging" in joined:
        return "Powertools logging / metrics"
    if "hashlib" in joined or "sha256" in joined:
        return "sha256"
    if "pydantic" in joined:
        return "pydantic validation"
    if "numpy" in joined or "weights.py" in joined:
        return "decode / encode / aggregate (numpy)"
    return "other Python"


def _ours(frame: str) -> bool:
    where = frame.split(" (", 1)[-1]
    return where.startswith(("fedstream/", "handlers/")) and not where.startswith("fedstream/local/")


def _idle(frame: str) -> bool:
    return any(s in frame for s in ("wait (threading.py", "wait_for (threading.py", "sleep", "select ("))


def _moto_action(frames: list[str]) -> str:
    """The service action a moto request thread was in (``SQSResponse.receive_message``)."""
    for frame in frames:
        name, _, where = frame.partition(" (")
        if "/responses.py:" not in where or where.startswith("moto/core/"):
            continue
        if "<locals>" not in name and not name.endswith(("call_action", "get_backend", "_backend")):
            return name
    return "response serialisation and dispatch (moto/core, any service)"


def summarise_profile(path: Path, top: int = 14) -> str:
    """Where the stream handler's samples went, and what the embedded AWS was busy with meanwhile."""
    kinds: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    moto: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count, frames = int(count_text), stack.split(";")
        if any(f.startswith("BaseResponse.call_action (moto/") for f in frames) and not _idle(frames[-1]):
            moto[_moto_action(frames)] += count
        handler = next((i for i, f in enumerate(frames) if f.startswith(STREAM_HANDLERS)), None)
        if handler is None:
            continue
        total += count
        below = frames[handler:]
        kinds[_kind(below)] += count
        mine = [f for f in below if _ours(f)]
        ours[_function(mine[-1]) if mine else "?"] += count
    if not total:
        return "no stream-handler samples in the profile"
    out = [f"stream handler: {total} samples (wall time, --idle)", ""]
    out += ["| by kind of work | share |", "|---|---:|"]
    out += [f"| {k} | {v / total:.0%} |" for k, v in kinds.most_common()]
    out += ["", "| innermost fedstream / handlers frame | share |", "|---|---:|"]
    out += [f"| `{k}` | {v / total:.0%} |" for k, v in ours.most_common(top)]
    if moto:
        busy = sum(moto.values())
        out += ["", f"embedded AWS: {busy} samples handling a request (any caller, waits excluded)", ""]
        out += ["| moto action | share |", "|---|---:|"]
        out += [f"| `{k}` | {v / busy:.0%} |" for k, v in moto.most_common(top)]
    return "\n".join(out)


# ---- main -------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=30, help="sync rounds (rounds-1 round transitions)")
    parser.add_argument("--updates", type=int, default=200, help="async updates applied before the run stops")
    parser.add_argument("--async-clients", type=int, default=10, help="clients in the async run")
    parser.add_argument("--mode", choices=("both", "sync", "async"), default="both")
    parser.add_argument("--trainer", default="instant:1000")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--profile", type=Path, help="write py-spy raw stacks here and summarise them")
    parser.add_argument("--profile-rate", type=int, default=100, help="py-spy samples per second")
    args = parser.parse_args()

    profiler = start_profiler(args.profile, args.profile_rate) if args.profile else None
    common = dict(
        trainer=args.trainer,
        client_runtime="thread",
        dataset="digits",
        progress=False,
        seed=0,
    )
    stages: list[Stage] = []
    notes: dict[str, int] = {}
    recorders: dict[str, tuple[Recorder, int]] = {}
    started = time.monotonic()
    try:
        if args.mode in ("both", "sync"):
            out = args.out / "sync"
            config = LocalRunConfig(
                mode="sync", aggregator="fedavg", rounds=args.rounds, clients=args.clients, out=out, **common
            )
            summary, recorder = run_recorded(config)
            print(f"sync: {summary.status}, {len(summary.rounds)} rounds in {summary.wall_seconds:.1f} s")
            recorders["sync"] = recorder, len(summary.rounds)
            found, found_notes = sync_stages(out, recorder)
            stages += found
            notes.update({f"sync: {k}": v for k, v in found_notes.items()})
        if args.mode in ("both", "async"):
            out = args.out / "async"
            config = LocalRunConfig(
                mode="async",
                aggregator="fedasync",
                updates=args.updates,
                clients=args.async_clients,
                out=out,
                **common,
            )
            summary, recorder = run_recorded(config)
            print(
                f"async: {summary.status}, {summary.counts.get('applied', 0)} updates applied "
                f"({summary.counts.get('rejected', 0)} rejected) in {summary.wall_seconds:.1f} s"
            )
            recorders["async"] = recorder, summary.counts.get("applied", 0)
            throughput = async_throughput(summary, recorder)
            found, found_notes = async_stages(out, recorder)
            stages += found
            notes.update({f"async: {k}": v for k, v in found_notes.items()})
    finally:
        if profiler is not None:
            stop_profiler(profiler)
    elapsed = time.monotonic() - started
    print(
        f"\n{args.clients} (sync) and {args.async_clients} (async) thread clients, {args.trainer}; "
        f"whole script {elapsed:.0f} s\n"
    )
    print(table(stages))
    if notes:
        print()
        for name, value in notes.items():
            print(f"- {name}: {value}")
    print()
    print(requests_table(recorders))
    if "async" in recorders:
        print()
        print(throughput)
    if args.profile:
        print()
        print(summarise_profile(args.profile))


if __name__ == "__main__":
    main()
