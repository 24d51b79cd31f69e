"""The sync state machine's definition: every task retries transient service errors with backoff and
jitter, and a task that still fails records the failure on the run item and tells the clients."""

from __future__ import annotations

import json
from importlib.resources import files

import pytest

DEFINITION = json.loads((files("fedstream.stacks") / "state_machine.asl.json").read_text())
STATES = DEFINITION["States"]
TASKS = {name: state for name, state in STATES.items() if state["Type"] == "Task"}
TRANSIENT_PREFIXES = {"dynamodb": "DynamoDB.", "sns": "SNS.", "sqs": "SQS."}
# Errors that are answers, not accidents: retrying them would repeat a decision (a run that exists,
# a round the handler failed, a callback the state machine asked for).
NEVER_RETRIED = {
    "States.ALL",
    "States.TaskFailed",
    "States.Timeout",
    "DynamoDB.ConditionalCheckFailedException",
}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_retries_only_its_services_transient_errors_with_backoff_and_jitter(name: str) -> None:
    task = TASKS[name]
    service = task["Resource"].split(":::")[1].split(":")[0]
    (retry,) = task["Retry"]
    assert retry["ErrorEquals"] and all(
        e.startswith(TRANSIENT_PREFIXES[service]) for e in retry["ErrorEquals"]
    )
    assert not NEVER_RETRIED & set(retry["ErrorEquals"])
    assert retry["BackoffRate"] > 1 and retry["JitterStrategy"] == "FULL"
    assert retry["MaxAttempts"] >= 3 and retry["MaxDelaySeconds"] <= 60


def failure_path(name: str) -> list[str]:
    """The states a failure of ``name`` goes through (States.ALL's catcher, then Next, to the end)."""
    (catcher,) = [c for c in STATES[name]["Catch"] if c["ErrorEquals"] == ["States.ALL"]]
    path, state = [], catcher["Next"]
    while state:
        path.append(state)
        state = STATES[state].get("Next")
    return path


@pytest.mark.parametrize(
    "name", ["InitRun", "OpenRound", "PublishModelReady", "MarkDeadline", "FinalizeRound"]
)
def test_a_task_that_still_fails_marks_the_run_failed_and_tells_the_clients(name: str) -> None:
    assert failure_path(name) == ["RunFailed", "NotifyFailed", "Failed"]
    assert "FAILED" in json.dumps(STATES["RunFailed"]["Parameters"])
    assert STATES["NotifyFailed"]["Parameters"]["Message"]["type"] == "training_complete"


def test_a_second_execution_for_an_existing_run_leaves_that_run_alone() -> None:
    (exists,) = [
        c
        for c in STATES["InitRun"]["Catch"]
        if "DynamoDB.ConditionalCheckFailedException" in c["ErrorEquals"]
    ]
    assert STATES[exists["Next"]]["Type"] == "Fail"  # not RunFailed: the existing run is not touched


def test_a_retried_open_round_that_had_written_its_round_goes_on() -> None:
    (written,) = [
        c
        for c in STATES["OpenRound"]["Catch"]
        if "DynamoDB.ConditionalCheckFailedException" in c["ErrorEquals"]
    ]
    assert written["Next"] == STATES["OpenRound"]["Next"] and written["ResultPath"] is None


def test_a_retried_init_run_whose_write_had_landed_takes_its_own_run_item() -> None:
    # the condition admits a run item only this execution could have written: a retry after a lost
    # answer goes on, another execution's run still ends in RunExists
    parameters = STATES["InitRun"]["Parameters"]
    assert parameters["ConditionExpression"] == "attribute_not_exists(run_id) OR execution_arn = :me"
    assert parameters["ExpressionAttributeValues"][":me"] == {"S.$": "$$.Execution.Id"}
    assert parameters["Item"]["execution_arn"] == {"S.$": "$$.Execution.Id"}
