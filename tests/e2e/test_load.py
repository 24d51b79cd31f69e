"""The 200-client load test: run it with ``.venv/bin/python -m pytest -m load -s``.

200 clients (threads running the real client loop with the instant trainer, so the server's work
is what is loaded) against one embedded AWS, through the real state machine, pollers and handlers.
It prints what it measured; what it asserts is what a user relies on: no update lost or counted
twice, no handler error, and aggregation memory that does not grow with the number of clients.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from fedstream.local.logs import json_lines
from fedstream.local.run import LocalRunConfig, RunSummary, run_local
from fedstream.server import sync

pytestmark = [pytest.mark.e2e, pytest.mark.load]
CLIENTS = 200
MIB = 1024 * 1024


def load_config(out: Path, **fields: Any) -> LocalRunConfig:
    return LocalRunConfig(
        clients=CLIENTS,
        dataset="digits",
        client_runtime="thread",
        progress=False,
        seed=5,
        out=out,
        round_timeout=600,
        **fields,
    )


def client_events(summary: RunSummary, event: str) -> list[dict[str, Any]]:
    events = []
    for log in sorted((summary.out / "clients").glob("*.log")):
        events += [e for e in json_lines(log.read_text()) if e.get("event") == event]
    return events


def assert_no_handler_errors(summary: RunSummary) -> None:
    for name, stats in summary.handlers.items():
        assert stats["failed_invocations"] == 0, name
        assert stats["dead_letters"] == 0, name


def test_sync_rounds_with_200_clients(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # GIVEN aggregation is traced: the peak of what it allocates while closing each round
    peaks: list[int] = []
    aggregate = sync._aggregate_and_publish

    def traced(*args: Any, **kwargs: Any) -> Any:
        tracemalloc.start()
        try:
            return aggregate(*args, **kwargs)
        finally:
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()

    monkeypatch.setattr(sync, "_aggregate_and_publish", traced)
    params = 250_000  # a 1 MB float32 model: 200 MB of updates a round

    # WHEN 200 clients train 3 rounds
    summary = run_local(load_config(tmp_path, rounds=3, trainer=f"instant:{params}"))

    # THEN every round aggregated all 200 updates, each registered exactly once
    assert summary.status == "SUCCEEDED", summary.error
    assert [r.clients for r in summary.rounds] == [CLIENTS] * 3
    logs = json_lines((tmp_path / "logs.jsonl").read_text())
    registered = [(e["round"], e["client_id"]) for e in logs if e.get("message") == "update registered"]
    assert len(registered) == len(set(registered)) == 3 * CLIENTS
    assert len(client_events(summary, "reported")) == 3 * CLIENTS
    assert summary.rejected == {}
    assert_no_handler_errors(summary)
    # and aggregating 200 updates held a few models' worth of memory, not 200
    model_bytes = params * 4
    print(
        f"\nsync: {CLIENTS} clients x 3 rounds in {summary.wall_seconds:.1f} s; round durations "
        f"{[round(r.duration_seconds or 0, 1) for r in summary.rounds]} s; aggregation peak "
        f"{max(peaks) / MIB:.1f} MiB = {max(peaks) / model_bytes:.1f} models "
        f"(all updates: {CLIENTS * model_bytes / MIB:.0f} MiB); handlers {json.dumps(summary.handlers)}"
    )
    assert len(peaks) == 3
    assert max(peaks) < 0.1 * CLIENTS * model_bytes


def test_async_updates_with_200_clients(tmp_path: Path) -> None:
    # GIVEN 200 clients, each taking 5 s per update (40 records/s offered), FedBuff with a buffer of 10
    config = load_config(
        tmp_path,
        mode="async",
        aggregator="fedbuff",
        params={"buffer_size": 10},
        updates=1500,
        trainer="instant:10000",
        stragglers=CLIENTS,
        straggler_delay=5.0,
    )

    # WHEN the run applies 1,500 updates
    summary = run_local(config)

    # THEN every record the clients wrote reached the handler once and was counted once
    assert summary.status == "SUCCEEDED", summary.error
    counts = summary.counts
    assert counts["applied"] >= 1500
    assert counts["received"] == counts["applied"] + counts["rejected"] + counts["buffered"]
    stream = summary.handlers["async-stream"]
    assert stream["records"] == counts["received"] == len(client_events(summary, "reported"))
    figures = summary.async_stats
    assert sum(figures["outcomes"].values()) == counts["received"]  # one marker per record
    assert_no_handler_errors(summary)
    # and no client had two updates in flight; the only refusals are records that came after the end
    assert figures["clients_with_two_in_flight"] == {}
    assert figures["max_backlog"] <= CLIENTS
    assert set(summary.rejected) <= {"run_finished"}
    assert summary.rejected.get("run_finished", 0) <= CLIENTS
    wait, staleness = figures["stream_wait_seconds"], figures["staleness"]
    print(
        f"\nasync: {CLIENTS} clients, {counts} in {summary.wall_seconds:.1f} s "
        f"({counts['received'] / summary.wall_seconds:.1f} records/s); rejected {summary.rejected}; "
        f"versions {summary.final_version}; stream wait p50 {wait['p50']:.2f} s, p95 {wait['p95']:.2f} s, "
        f"max {wait['max']:.2f} s; staleness p50 {staleness['p50']:g}, p95 {staleness['p95']:g}, "
        f"max {staleness['max']:g} (by quarter {staleness['mean_by_quarter']}); most records waiting at once "
        f"{figures['max_backlog']}; handlers {json.dumps(summary.handlers)}"
    )
