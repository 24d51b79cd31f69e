"""The deadline path on a MemoryStore: the state machine's finalize request, and requests that are not."""

from __future__ import annotations

import json
import uuid

import pytest

from fedstream.server import finalize, sync
from fedstream.server.finalize import FinalizeRefused
from fedstream.server.memory import Crash, MemoryStore
from tests.protocol.conftest import CLIENTS, ROUND_TOKEN, Run, assert_model, shifted

FINALIZE_TOKEN = "finalize-token"


def report(run: Run, *clients: str) -> None:
    records = [
        run.record(client, shifted(run.base, 1.0 + n), examples=10) for n, client in enumerate(clients)
    ]
    outcomes = run.deliver(*records)
    assert outcomes == ["registered"] * (len(clients) - 1) + ["closed" if len(clients) == 3 else "registered"]


def request(run: Run, finalize_id: str, token: str = FINALIZE_TOKEN, number: int = 1) -> finalize.Finalized:
    return finalize.finalize_round(
        run.store, run.settings, run.registry, run.run_id, number, token, finalize_id=finalize_id
    )


def calls(store: MemoryStore) -> list[tuple[str, str, str]]:
    """Every callback sent: (kind, token, version or error)."""
    return [
        (c.kind, c.token, str(c.output["version"]) if c.kind == "success" else c.error)
        for c in store.callbacks
    ]


def test_a_round_with_a_quorum_closes_at_its_deadline(run: Run, store: MemoryStore) -> None:
    # GIVEN two of three clients reported (a quorum of two): the round stays open
    report(run, "site-1", "site-2")
    assert run.round()["status"] == "open"

    # WHEN the deadline passes and the state machine sends its finalize request
    finalized = request(run, run.mark_deadline())

    # THEN the round closes with the two reports into their mean, answering the finalize token
    assert finalized.outcome == "closed" and finalized.closed is not None
    result = json.loads(run.round()["result"])
    assert result["clients"] == ["site-1", "site-2"] and result["at_deadline"] is True
    assert_model(run.model(1), run.mean((1.0, 10), (2.0, 10)))
    assert calls(store) == [("success", FINALIZE_TOKEN, "1")]


def test_below_quorum_the_round_fails_with_a_clear_message(run: Run, store: MemoryStore) -> None:
    # GIVEN one report of the two required
    report(run, "site-1")

    # WHEN the deadline passes
    finalized = request(run, run.mark_deadline())

    # THEN the round fails, saying why, no version is published, and the token hears the failure
    assert finalized.outcome == "quorum_not_reached"
    assert run.round()["status"] == "failed"
    assert "1 of the 2 reports required" in run.round()["failure"]
    assert run.state()["version"] == 0
    assert calls(store) == [("failure", FINALIZE_TOKEN, "QuorumNotReached")]


def test_a_round_closed_before_its_deadline_is_answered_from_its_stored_result(
    run: Run, store: MemoryStore
) -> None:
    # GIVEN a round every client reported to (closed, the round's token called back)
    report(run, "site-1", "site-2", "site-3")
    stored = run.round()["result"]
    finalize_id = run.mark_deadline()

    # WHEN the finalize request arrives anyway, and is delivered twice
    first, again = request(run, finalize_id), request(run, finalize_id)

    # THEN the finalize token gets the stored result once; nothing is aggregated again
    assert (first.outcome, again.outcome) == ("already_closed", "already_closed")
    assert run.round()["result"] == stored and run.state()["version"] == 1
    assert calls(store) == [("success", ROUND_TOKEN, "1"), ("success", FINALIZE_TOKEN, "1")]


@pytest.mark.parametrize("clients", [("site-1", "site-2"), ("site-1",)], ids=["quorum", "below-quorum"])
def test_a_forged_request_can_neither_close_nor_fail_the_round(
    run: Run, store: MemoryStore, clients: tuple[str, ...]
) -> None:
    # GIVEN a round past its deadline, marked by the state machine, with or without a quorum
    report(run, *clients)
    real_id = run.mark_deadline()

    # WHEN someone who can reach the queue sends a request with an id and a token of their own
    with pytest.raises(FinalizeRefused) as refused:
        request(run, str(uuid.uuid4()), token="attacker-token")

    # THEN it is refused, and nothing else happens: the round is open and no token was answered
    assert refused.value.reason == "finalize_id_mismatch"
    assert run.round()["status"] == "open" and "finalize_token" not in run.round()
    assert store.callbacks == []

    # AND the state machine's own request still closes (or fails) the round
    request(run, real_id)
    assert run.round()["status"] == ("closed" if len(clients) == 2 else "failed")
    assert [token for _, token, _ in calls(store)] == [FINALIZE_TOKEN]


def test_a_leaked_finalize_id_cannot_send_the_callback_to_another_token(run: Run, store: MemoryStore) -> None:
    # GIVEN the state machine's request closed the round at its deadline
    report(run, "site-1", "site-2")
    finalize_id = run.mark_deadline()
    request(run, finalize_id)

    # WHEN a request carries the round's id with another task token
    with pytest.raises(FinalizeRefused) as refused:
        request(run, finalize_id, token="token-of-my-choosing")

    # THEN it is refused: the first token presented with the id is the round's
    assert refused.value.reason == "finalize_token_mismatch"
    assert run.round()["finalize_token"] == FINALIZE_TOKEN

    # AND the genuine request redelivered is not answered twice
    assert request(run, finalize_id).outcome == "already_closed"
    assert calls(store) == [("success", FINALIZE_TOKEN, "1")]


@pytest.mark.parametrize("marked", [False, True], ids=["state-machine-still-waiting", "id-written-early"])
def test_a_request_before_the_deadline_is_refused(run: Run, store: MemoryStore, marked: bool) -> None:
    # GIVEN a round with a quorum, opened just now with a minute to go
    report(run, "site-1", "site-2")
    finalize_id = run.mark_deadline(passed=False) if marked else str(uuid.uuid4())

    # WHEN a finalize request arrives
    with pytest.raises(FinalizeRefused) as refused:
        request(run, finalize_id)

    # THEN it is refused and the round stays open for the clients still training
    assert refused.value.reason == "before_deadline"
    assert run.round()["status"] == "open" and run.state()["version"] == 0
    assert store.callbacks == []


def test_a_request_for_a_round_that_does_not_exist_is_refused(run: Run, store: MemoryStore) -> None:
    # GIVEN round 1 past its deadline
    report(run, "site-1", "site-2")
    finalize_id = run.mark_deadline()

    # WHEN its id comes with round 3, which was never opened
    with pytest.raises(FinalizeRefused) as refused:
        request(run, finalize_id, number=3)

    # THEN it is refused, and no round item appears for it
    assert refused.value.reason == "finalize_unknown_round"
    assert run.round(3) == {} and store.callbacks == []


def test_the_deadline_takes_over_a_claim_orphaned_past_its_lease(
    run: Run, store: MemoryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN every client reported, and the invocation that claimed the round died right after its
    # claim (or lost the claim's response: a retried write then finds the round claimed)
    first, second, third = (run.record(c, shifted(run.base, 1.0 + n)) for n, c in enumerate(CLIENTS))
    run.deliver(first, second)
    store.crash("claim_round", after=True)
    with pytest.raises(Crash):
        run.deliver(third)
    assert run.round()["status"] == "aggregating"

    # WHEN the deadline passes, after the claim's lease
    clock = sync.time.time
    monkeypatch.setattr(sync.time, "time", lambda: clock() + sync.CLAIM_LEASE_SECONDS + 1)
    finalized = request(run, run.mark_deadline())

    # THEN the finalize request closes the round with every report, answering its token
    assert finalized.outcome == "closed" and run.state()["version"] == 1
    assert calls(store) == [("success", FINALIZE_TOKEN, "1")]


def test_the_deadline_leaves_a_live_claim_to_its_holder(run: Run, store: MemoryStore) -> None:
    # GIVEN every client reported and another invocation holds a fresh claim on the round
    reports = [run.record(c, shifted(run.base, 1.0 + n)) for n, c in enumerate(CLIENTS)]
    run.deliver(*reports[:2])
    store.crash("claim_round", after=True)
    with pytest.raises(Crash):
        run.deliver(reports[2])

    # WHEN the finalize request comes within the claim's lease
    # THEN it does not aggregate beside the holder: it is retried later, and nothing was answered
    with pytest.raises(finalize.RoundBusy, match="aggregating"):
        request(run, run.mark_deadline())
    assert run.round()["status"] == "aggregating" and run.state()["version"] == 0
    assert calls(store) == []
