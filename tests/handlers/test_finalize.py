"""The finalize handler: a round's deadline passed.

The tests play the state machine's part: ``mark_deadline`` writes what ``OpenRound`` and
``MarkDeadline`` write on the round item, and ``finalize_event`` sends what ``FinalizeRound`` sends.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fedstream.handlers import aggregate, finalize

from fedstream.local.logs import json_lines, metric_counts
from fedstream.schemas import FinalizeRequest
from fedstream.server.store import Store
from tests.handlers.conftest import FakeContext, SyncWorld, stream_event
from tests.handlers.test_aggregate import scaled

FINALIZE_TOKEN = "finalize-token"
NO_FAILURES = {"batchItemFailures": []}


def mark_deadline(
    world: SyncWorld,
    round_number: int = 1,
    *,
    opened_at: datetime | None = None,
    round_timeout: int = 60,
) -> str:
    """What the state machine writes on a round by the time it sends its finalize request: the
    round's deadline (``opened_at`` + ``round_timeout``, by default long past) and a fresh finalize
    id, which is returned. A round already marked keeps its id (the same deadline, redelivered)."""
    item = world.round_item(round_number)
    if item.get("finalize_id") and opened_at is None:
        return str(item["finalize_id"])
    finalize_id = str(uuid.uuid4())
    opened = opened_at or datetime.now(UTC) - timedelta(seconds=round_timeout + 60)
    world.store.conditional_update(
        {"run_id": world.run_id, "sk": f"round#{round_number}"},
        "SET opened_at = :opened, round_timeout = :timeout, finalize_id = :id, deadline_at = :at "
        "REMOVE finalize_token",
        "attribute_exists(run_id)",
        {
            ":opened": opened.isoformat(),
            ":timeout": round_timeout,
            ":id": finalize_id,
            ":at": datetime.now(UTC).isoformat(),
        },
    )
    return finalize_id


def finalize_event(
    world: SyncWorld,
    round_number: int = 1,
    body: str | None = None,
    *,
    token: str = FINALIZE_TOKEN,
    finalize_id: str | None = None,
) -> dict:
    """The finalize queue's event; without ``body``, the state machine's request for the round
    (whose deadline is marked first if it was not)."""
    body = (
        body
        or FinalizeRequest(
            run_id=world.run_id,
            round=round_number,
            version=0,
            finalize_id=finalize_id or mark_deadline(world, round_number),
            task_token=token,
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


@pytest.fixture
def task_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every SendTaskSuccess/SendTaskFailure the handlers make, as (call, token)."""
    calls: list[tuple[str, str]] = []
    for name in ("send_task_success", "send_task_failure"):
        original = getattr(Store, name)

        def spy(self: Store, token: str, *args: Any, _name: str = name, _original: Any = original) -> bool:
            calls.append((_name, token))
            return _original(self, token, *args)

        monkeypatch.setattr(Store, name, spy)
    return calls


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


# ---- requests that are not the state machine's own -----------------------------------------------


def assert_refused(out: str, reason: str, *secrets: str) -> None:
    """One "finalize request refused" warning and one ``UpdatesRejected{reason}``, no secret logged."""
    warnings = [e for e in json_lines(out) if e.get("message") == "finalize request refused"]
    assert [w["reason"] for w in warnings] == [reason], out
    assert metric_counts(out, "UpdatesRejected", "reason") == {reason: 1}
    for secret in secrets:
        assert secret not in out


def report(world: SyncWorld, *clients: str) -> None:
    response = aggregate.lambda_handler(
        stream_event(*(world.record(c, scaled(world, 1.0)) for c in clients)), FakeContext()
    )
    assert response == NO_FAILURES


@pytest.mark.parametrize("clients", [("site-1", "site-2"), ("site-1",)], ids=["quorum", "below-quorum"])
def test_a_forged_request_can_neither_close_nor_fail_the_round(
    world: SyncWorld,
    clients: tuple[str, ...],
    task_calls: list[tuple[str, str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN a round past its deadline, marked by the state machine, with or without a quorum
    report(world, *clients)
    real_id = mark_deadline(world)
    capsys.readouterr()

    # WHEN someone who can reach the queue sends a well-formed request with its own id and token
    forged = str(uuid.uuid4())
    response = finalize.lambda_handler(
        finalize_event(world, token="attacker-token", finalize_id=forged), FakeContext()
    )

    # THEN it is refused, logged and counted, and nothing else happens
    assert response == NO_FAILURES
    assert_refused(capsys.readouterr().out, "finalize_id_mismatch", forged, real_id, "attacker-token")
    item = world.round_item()
    assert item["status"] == "open" and "finalize_token" not in item
    assert world.run_state()["version"] == 0
    assert task_calls == []

    # AND the state machine's own request still closes (or fails) the round, answering its token
    assert finalize.lambda_handler(finalize_event(world), FakeContext()) == NO_FAILURES
    assert world.round_item()["status"] == ("closed" if len(clients) >= 2 else "failed")
    assert [token for _, token in task_calls] == [FINALIZE_TOKEN]


def test_a_leaked_finalize_id_cannot_send_the_callback_to_another_token(
    world: SyncWorld, task_calls: list[tuple[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the state machine's request closed the round at its deadline
    report(world, "site-1", "site-2")
    real_id = mark_deadline(world)
    assert finalize.lambda_handler(finalize_event(world), FakeContext()) == NO_FAILURES
    assert world.round_item()["status"] == "closed"
    assert task_calls == [("send_task_success", FINALIZE_TOKEN)]
    capsys.readouterr()

    # WHEN a request carries the round's id with another task token
    response = finalize.lambda_handler(finalize_event(world, token="token-of-my-choosing"), FakeContext())

    # THEN it is refused: the first token presented with the id is the round's
    assert response == NO_FAILURES
    assert_refused(capsys.readouterr().out, "finalize_token_mismatch", real_id, "token-of-my-choosing")
    assert task_calls == [("send_task_success", FINALIZE_TOKEN)]
    assert world.round_item()["finalize_token"] == FINALIZE_TOKEN

    # AND the genuine request redelivered is answered once only (the callback went out already)
    assert finalize.lambda_handler(finalize_event(world), FakeContext()) == NO_FAILURES
    assert task_calls == [("send_task_success", FINALIZE_TOKEN)]


@pytest.mark.parametrize("marked", [False, True], ids=["state-machine-still-waiting", "id-written-early"])
def test_a_request_before_the_deadline_is_refused(
    world: SyncWorld, marked: bool, task_calls: list[tuple[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a round with a quorum, opened just now with an hour to go
    report(world, "site-1", "site-2")
    now = datetime.now(UTC)
    if marked:  # even with the round's own id, the deadline is the deadline
        finalize_id = mark_deadline(world, opened_at=now, round_timeout=3600)
    else:  # the state machine is still waiting for the aggregate callback
        finalize_id = str(uuid.uuid4())
        world.store.conditional_update(
            {"run_id": world.run_id, "sk": "round#1"},
            "SET opened_at = :opened, round_timeout = :timeout",
            "attribute_exists(run_id)",
            {":opened": now.isoformat(), ":timeout": 3600},
        )
    capsys.readouterr()

    # WHEN a finalize request arrives
    response = finalize.lambda_handler(finalize_event(world, finalize_id=finalize_id), FakeContext())

    # THEN it is refused, and the round stays open for the clients still training
    assert response == NO_FAILURES
    assert_refused(capsys.readouterr().out, "before_deadline", finalize_id, FINALIZE_TOKEN)
    item = world.round_item()
    assert item["status"] == "open" and "finalize_token" not in item
    assert world.run_state()["version"] == 0
    assert task_calls == []


def open_round(world: SyncWorld, round_number: int) -> None:
    """Another round item, as ``OpenRound`` writes it."""
    world.store.runs.put_item(
        Item={
            "run_id": world.run_id,
            "sk": f"round#{round_number}",
            "round": round_number,
            "version": 0,
            "status": "open",
            "reported_count": 0,
            "min_clients": 2,
            "opened_at": datetime.now(UTC).isoformat(),
            "round_timeout": 3600,
        }
    )


def test_a_request_for_another_round_is_refused(
    world: SyncWorld, task_calls: list[tuple[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN round 1 with a quorum and round 2, both past their deadlines, each with its own id
    report(world, "site-1", "site-2")
    open_round(world, 2)
    ids = {1: mark_deadline(world, 1), 2: mark_deadline(world, 2)}
    capsys.readouterr()
    requests: list[tuple[str, dict[str, Any], str]] = [
        # another round's id
        ("finalize_id_mismatch", finalize_event(world, 1, finalize_id=ids[2]), ids[2]),
        ("finalize_id_mismatch", finalize_event(world, 2, finalize_id=ids[1]), ids[1]),
        # a round, or a run, that does not exist: no failure is sent to the token either
        ("finalize_unknown_round", finalize_event(world, 3, finalize_id=ids[1]), ids[1]),
        (
            "finalize_unknown_round",
            finalize_event(
                world,
                body=FinalizeRequest(
                    run_id="run-zz", round=1, version=0, finalize_id=ids[1], task_token=FINALIZE_TOKEN
                ).model_dump_json(),
            ),
            ids[1],
        ),
    ]
    for reason, event, finalize_id in requests:
        # WHEN the request arrives
        response = finalize.lambda_handler(event, FakeContext())

        # THEN it is refused and both rounds are as they were
        assert response == NO_FAILURES
        assert_refused(capsys.readouterr().out, reason, finalize_id, FINALIZE_TOKEN)
        for round_number in (1, 2):
            item = world.round_item(round_number)
            assert item["status"] == "open" and "finalize_token" not in item
    assert world.run_state()["version"] == 0
    assert task_calls == []

    # AND each round's own request is still answered
    assert finalize.lambda_handler(finalize_event(world, 1), FakeContext()) == NO_FAILURES
    assert world.round_item(1)["status"] == "closed"
