"""Fault injection on the local runtime: the run completes with the fault-free model, or fails
with a clear reason, and no update is lost or counted twice.

Every run here is the same small job (3 NumPy clients, 2 rounds, digits, seed 7) through the real
moto server process, state machine and handlers, with one fault plan armed
(``LocalRunConfig.faults``, the specs of ``fedstream local --fault``). The clients are ``fedstream
client`` processes where the fault acts on a process (``kill:``, ``hang:``) and the same client
loop on threads of this process otherwise (server-side faults; the models are bit for bit the same).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedstream.local.logs import json_lines
from fedstream.local.run import LocalRunConfig, RunSummary, run_local
from fedstream.weights import load_file

pytestmark = pytest.mark.e2e
CLIENTS = ["site-1", "site-2", "site-3"]


def run(out: Path, *faults: str, **overrides: Any) -> RunSummary:
    fields: dict[str, Any] = dict(
        clients=3,
        rounds=2,
        dataset="digits",
        trainer="numpy",
        seed=7,
        progress=False,
        out=out,
        faults=faults,
        client_runtime="process" if any(f.startswith(("kill:", "hang:")) for f in faults) else "thread",
    )
    fields.update(overrides)
    return run_local(LocalRunConfig(**fields))


def final_weights(summary: RunSummary) -> dict[str, np.ndarray]:
    weights, _ = load_file(summary.out / "final_model.safetensors")
    return weights


def registered(summary: RunSummary) -> list[tuple[int, str]]:
    """(round, client) of every report the aggregate handler accepted, from the structured logs."""
    logs = json_lines((summary.out / "logs.jsonl").read_text())
    return sorted((e["round"], e["client_id"]) for e in logs if e.get("message") == "update registered")


def assert_nothing_lost_or_doubled(summary: RunSummary, clients: list[str] = CLIENTS) -> None:
    assert summary.status == "SUCCEEDED", summary.error
    expected = [(r, c) for r in (1, 2) for c in clients]
    assert registered(summary) == expected  # each update accepted exactly once
    assert [r.clients for r in summary.rounds] == [len(clients), len(clients)]
    assert [r.version for r in summary.rounds] == [1, 2]
    assert all(stats["dead_letters"] == 0 for stats in summary.handlers.values())


@pytest.fixture(scope="module")
def fault_free(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    summary = run(tmp_path_factory.mktemp("fault-free"))
    assert_nothing_lost_or_doubled(summary)
    assert summary.faults_injected == {}
    return final_weights(summary)


def assert_same_model(summary: RunSummary, expected: dict[str, np.ndarray]) -> None:
    weights = final_weights(summary)
    assert weights.keys() == expected.keys()
    for name, array in expected.items():
        np.testing.assert_array_equal(weights[name], array)


@pytest.mark.parametrize(
    "point",
    [
        "aggregate.before_object_write",
        "aggregate.after_object_write",
        "aggregate.after_flip",
        "aggregate.before_callback",
    ],
)
def test_the_aggregate_handler_crashing_while_closing_a_round(
    tmp_path: Path, fault_free: dict[str, np.ndarray], point: str
) -> None:
    # GIVEN the aggregate handler raises at `point` the first time it closes a round
    summary = run(tmp_path, point)

    # THEN the stream's retry closes the round, and the run ends with the fault-free model
    assert summary.faults_injected == {point: 1}
    assert summary.handlers["sync-stream"]["failed_invocations"] == 1
    assert_nothing_lost_or_doubled(summary)
    assert_same_model(summary, fault_free)


def test_s3_and_dynamodb_throttling_is_absorbed_by_the_sdk_retries(
    tmp_path: Path, fault_free: dict[str, np.ndarray]
) -> None:
    faults = ("throttle:s3:GetObject:3", "throttle:s3:PutObject:2", "throttle:dynamodb:UpdateItem:3")
    summary = run(tmp_path, *faults)

    assert summary.faults_injected == {
        "throttle:s3:GetObject": 3,
        "throttle:s3:PutObject": 2,
        "throttle:dynamodb:UpdateItem": 3,
    }
    assert summary.handlers["sync-stream"]["failed_invocations"] == 0
    assert_nothing_lost_or_doubled(summary)
    assert_same_model(summary, fault_free)


def test_transient_errors_beyond_the_sdk_retries_fail_the_batch_and_the_retry_succeeds(
    tmp_path: Path, fault_free: dict[str, np.ndarray]
) -> None:
    # GIVEN S3 answers six GetObject calls in a row with 500 (the SDK makes five attempts)
    summary = run(tmp_path, "error:s3:GetObject:6", "error:dynamodb:GetItem:6")

    assert summary.faults_injected == {"error:s3:GetObject": 6, "error:dynamodb:GetItem": 6}
    assert summary.handlers["sync-stream"]["failed_invocations"] >= 1
    assert_nothing_lost_or_doubled(summary)
    assert_same_model(summary, fault_free)


def test_the_stream_redelivering_batches(tmp_path: Path, fault_free: dict[str, np.ndarray]) -> None:
    summary = run(tmp_path, "redeliver:100")

    redelivered = summary.handlers["sync-stream"]["redelivered"]
    assert redelivered == 6  # every record of both rounds came twice
    assert summary.rejected == {"duplicate": redelivered}
    assert_nothing_lost_or_doubled(summary)
    assert_same_model(summary, fault_free)


def test_a_client_killed_mid_training_is_restarted_and_retrains_the_same_round(
    tmp_path: Path, fault_free: dict[str, np.ndarray]
) -> None:
    # GIVEN site-3 trains slowly and is SIGKILLed while it trains round 2; its message comes back
    # to its queue after the visibility timeout and the restarted client takes it
    summary = run(tmp_path, "kill:site-3:2", stragglers=1, straggler_delay=2.0, visibility_timeout=5)

    assert summary.faults_injected == {"kill:site-3:2": 1}
    log = (tmp_path / "clients" / "site-3.log").read_text()
    assert log.count('"event": "ready"') == 2
    assert_nothing_lost_or_doubled(summary)
    assert_same_model(summary, fault_free)
    assert summary.client_exit_codes == dict.fromkeys(CLIENTS, 0)


def test_a_client_that_never_answers_leaves_rounds_to_close_at_the_deadline_with_the_quorum(
    tmp_path: Path,
) -> None:
    # GIVEN site-3 freezes (SIGSTOP) once ready, and a quorum of 2 may close a round at its deadline
    # (8 s: the two live clients report well before it, even on a loaded machine)
    summary = run(tmp_path, "hang:site-3", min_clients=2, round_timeout=8)

    # THEN both rounds close at the deadline with the two live clients
    assert summary.faults_injected == {"hang:site-3": 1}
    assert [r.at_deadline for r in summary.rounds] == [True, True]
    assert_nothing_lost_or_doubled(summary, clients=["site-1", "site-2"])
    # and when the frozen client comes back after the run, anything it sends is refused, not counted
    assert set(summary.rejected) <= {"round_closed"}
    assert summary.client_exit_codes == dict.fromkeys(CLIENTS, 0)


def test_a_client_that_never_answers_without_a_quorum_fails_the_run_with_the_reason(tmp_path: Path) -> None:
    summary = run(tmp_path, "hang:site-3", min_clients=3, round_timeout=3)

    # site-3 never reports; whether both others are in by the 3 s deadline depends on the machine
    assert summary.status == "FAILED"
    assert summary.error is not None
    assert re.search(r"round 1 reached its deadline with [0-2] of the 3 reports required", summary.error)
    assert summary.rounds == []


def test_the_state_machine_retries_throttled_dynamodb_and_sns_calls_and_the_run_succeeds(
    tmp_path: Path, fault_free: dict[str, np.ndarray]
) -> None:
    # GIVEN the state machine's first two DynamoDB PutItem calls (InitRun) and first two SNS
    # Publish calls (round 1's "model ready") are throttled, as the services would
    summary = run(tmp_path, "sfn:dynamodb:PutItem:2", "sfn:sns:Publish:2")

    # THEN its Retry absorbs them and the run ends with the fault-free model
    injected = re.findall(r"the state machine's (\w+ \w+) call", (tmp_path / "aws.log").read_text())
    assert injected == ["dynamodb PutItem"] * 2 + ["sns Publish"] * 2
    assert_nothing_lost_or_doubled(summary)
    assert_same_model(summary, fault_free)


@pytest.mark.parametrize(
    ("skip", "task"),
    [(0, "InitRun"), (1, "OpenRound"), (2, "OpenRound of round 2")],
    ids=["init", "open", "open2"],
)
def test_a_state_machine_write_that_took_effect_but_lost_its_answer_is_retried_and_the_run_succeeds(
    tmp_path: Path, fault_free: dict[str, np.ndarray], skip: int, task: str
) -> None:
    # GIVEN one of the state machine's conditional PutItem calls reaches DynamoDB and writes its
    # item, and its answer is lost (a server error): the Retry makes the same call again and finds
    # the item there
    summary = run(tmp_path, f"sfn:dynamodb:PutItem:1:{skip}:lost")

    # THEN it knows the item for its own (its own run, its own round) and the run ends with the
    # fault-free model
    log = (tmp_path / "aws.log").read_text()
    assert log.count("after the service applied it") == 1, task
    assert summary.status == "SUCCEEDED", summary.error
    assert_nothing_lost_or_doubled(summary)
    assert_same_model(summary, fault_free)


def test_a_state_machine_call_that_keeps_failing_fails_the_run_with_its_reason_and_tells_the_clients(
    tmp_path: Path,
) -> None:
    # GIVEN every DynamoDB PutItem of the state machine after the first (InitRun) is throttled, so
    # opening round 1 fails through all its retries
    summary = run(tmp_path, "sfn:dynamodb:PutItem:100:1", client_runtime="process")

    # THEN the run failed with the reason the state machine wrote on the run item (1 try + 6 retries)
    assert summary.status == "FAILED" and summary.rounds == []
    assert summary.error is not None
    assert summary.error.startswith("DynamoDB.ProvisionedThroughputExceededException: throttled by"), (
        summary.error
    )
    assert (tmp_path / "aws.log").read_text().count("fedstream fault:") == 7
    # AND every client was told training is over (reason "failed": exit code 4)
    assert summary.client_exit_codes == dict.fromkeys(CLIENTS, 4)
    for client in CLIENTS:
        assert '"reason": "failed"' in (tmp_path / "clients" / f"{client}.log").read_text()


@pytest.mark.parametrize("aggregator", ["fedasync", "fedbuff"])
def test_async_updates_survive_redelivery_and_throttling_with_counts_that_add_up(
    tmp_path: Path, aggregator: str
) -> None:
    faults = ("redeliver:5", "throttle:dynamodb:TransactWriteItems:3", "error:s3:GetObject:6")
    summary = run(tmp_path, *faults, mode="async", aggregator=aggregator, updates=12, clients=4)

    assert summary.status == "SUCCEEDED", summary.error
    counts = summary.counts
    assert counts["applied"] >= 12
    assert counts["received"] == counts["applied"] + counts["rejected"] + counts["buffered"]
    # every stream record was counted once: deliveries are the records plus the redelivered copies,
    # and each copy (and each record retried after a failed batch) was refused as a duplicate
    stream = summary.handlers["async-stream"]
    assert stream["redelivered"] > 0
    assert stream["records"] == counts["received"] + stream["redelivered"]
    assert summary.rejected["duplicate"] >= stream["redelivered"]
    assert summary.faults_injected["throttle:dynamodb:TransactWriteItems"] == 3
    assert all(stats["dead_letters"] == 0 for stats in summary.handlers.values())


def test_a_handler_fault_is_logged_in_the_runs_logs_not_printed_on_the_terminal(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    # GIVEN `fedstream local` as a user runs it, with DynamoDB GetItem answering 500 more often than
    # the SDK retries, so a handler invocation raises and the poller retries it
    command = [
        sys.executable, "-m", "fedstream.cli", "local", "--trainer", "numpy", "--dataset", "digits",
        "--clients", "2", "--rounds", "1", "--no-progress", "--out", str(tmp_path / "run"),
        "--fault", "error:dynamodb:GetItem:6",
    ]  # fmt: skip
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=600,
    )

    # THEN the run succeeds, the terminal shows no traceback, and logs.jsonl has the runtime's record
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    records = [json.loads(line) for line in (tmp_path / "run" / "logs.jsonl").read_text().splitlines()]
    retried = [r for r in records if r.get("logger") == "fedstream.local"]
    assert retried and all(r["level"] == "ERROR" and " raised; " in r["message"] for r in retried)
    assert all("InternalServerError" in r["exception"] for r in retried)
