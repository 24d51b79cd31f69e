"""The finalize handler: a round's deadline passed."""

from __future__ import annotations

import json
import uuid

import pytest

from fedstream.schemas import FinalizeRequest
from handlers import aggregate, finalize
from tests.handlers.conftest import FakeContext, SyncWorld, stream_event
from tests.handlers.test_aggregate import scaled


def finalize_event(world: SyncWorld, round_number: int = 1, body: str | None = None) -> dict:
    body = (
        body
        or FinalizeRequest(
            run_id=world.run_id, round=round_number, version=0, task_token="finalize-token"
        ).model_dump_json()
    )
    return {
        "Records": [
            {
                "messageId": str(uuid.uuid4()),
                "receiptHandle": "rh",
                "body": body,
                "attributes": {},
                "messageAttributes": {},
                "md5OfBody": "",
                "eventSource": "aws:sqs",
                "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:finalize",
                "awsRegion": "us-east-1",
            }
        ]
    }


def test_a_round_with_a_quorum_closes_at_its_deadline(
    world: SyncWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN two of three clients reported (min_clients = 2); the round stays open
    aggregate.lambda_handler(
        stream_event(world.record("site-1", scaled(world, 1.0)), world.record("site-2", scaled(world, 3.0))),
        FakeContext(),
    )
    assert world.round_item()["status"] == "open"

    # WHEN the deadline passes
    response = finalize.lambda_handler(finalize_event(world), FakeContext())

    # THEN the round closes with the two reports, and the logs and metrics say so
    assert response == {"batchItemFailures": []}
    item = world.round_item()
    assert item["status"] == "closed"
    result = json.loads(item["result"])
    assert result["clients"] == ["site-1", "site-2"] and result["at_deadline"] is True
    assert world.run_state()["version"] == 1
    out = capsys.readouterr().out
    assert '"message":"round closed at its deadline"' in out
    assert '"RoundCompleted"' in out


def test_below_quorum_the_round_fails_with_a_clear_message(
    world: SyncWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    aggregate.lambda_handler(stream_event(world.record("site-1", scaled(world, 1.0))), FakeContext())

    finalize.lambda_handler(finalize_event(world), FakeContext())

    item = world.round_item()
    assert item["status"] == "failed"
    assert "1 of the 2 reports required" in item["failure"]
    assert world.run_state()["version"] == 0
    assert '"reason":"quorum_not_reached"' in capsys.readouterr().out


def test_a_round_closed_before_the_deadline_is_answered_from_its_stored_result(world: SyncWorld) -> None:
    aggregate.lambda_handler(
        stream_event(*(world.record(c, scaled(world, 1.0)) for c in ("site-1", "site-2", "site-3"))),
        FakeContext(),
    )
    stored = world.round_item()["result"]

    response = finalize.lambda_handler(finalize_event(world), FakeContext())

    assert response == {"batchItemFailures": []}
    assert world.round_item()["result"] == stored and world.run_state()["version"] == 1


def test_a_body_that_is_not_a_finalize_request_is_rejected_not_retried(
    world: SyncWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    response = finalize.lambda_handler(finalize_event(world, body="not json at all"), FakeContext())
    assert response == {"batchItemFailures": []}
    assert "finalize request rejected" in capsys.readouterr().out
