"""The sync round protocol on a MemoryStore: reports, the close, the callback, crashes and retries."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

from fedstream import keys
from fedstream.aggregation import AggregationError
from fedstream.server import finalize, sync
from fedstream.server.memory import Crash, MemoryStore
from fedstream.weights import encode
from tests.protocol.conftest import ROUND_TOKEN, Run, assert_model, shifted

HONEST = (("site-1", 1.0, 10), ("site-2", 2.0, 30), ("site-3", 4.0, 60))


def honest_records(run: Run) -> list[dict[str, Any]]:
    return [run.record(client, shifted(run.base, by), examples=n) for client, by, n in HONEST]


def honest_mean(run: Run) -> dict[str, np.ndarray]:
    return run.mean(*((by, n) for _, by, n in HONEST))


def successes(store: MemoryStore) -> list[tuple[str, int]]:
    """The callbacks Step Functions accepted: (token, version)."""
    return [(c.token, c.output["version"]) for c in store.callbacks if c.kind == "success" and c.accepted]


def test_a_round_closes_once_every_expected_client_reported_into_the_weighted_mean(
    run: Run, store: MemoryStore
) -> None:
    # GIVEN round 1 open on version 0, three clients expected
    first, second, third = honest_records(run)

    # WHEN two of them report
    assert run.deliver(first, second) == ["registered", "registered"]

    # THEN the round waits for the third: still open, no new version, nobody called back
    assert run.round()["status"] == "open" and run.round()["reported_count"] == 2
    assert run.state()["version"] == 0 and store.callbacks == []

    # WHEN the third reports
    assert run.deliver(third) == ["closed"]

    # THEN the round is closed, version 1 is the example-weighted mean, and the state machine hears
    # of version 1 once, on the round's token
    assert run.round()["status"] == "closed"
    assert run.state()["version"] == 1
    assert_model(run.model(1), honest_mean(run))
    assert successes(store) == [(ROUND_TOKEN, 1)]
    [callback] = store.callbacks
    assert callback.output["clients"] == ["site-1", "site-2", "site-3"]


def _refused_record(run: Run, reason: str) -> dict[str, Any]:
    update = shifted(run.base, 9.0)
    if reason == "wrong_base_version":
        return run.record("site-1", update, version=1)
    if reason == "unknown_client":
        return run.record("site-9", update)
    if reason == "unknown_round":
        return run.record("site-1", update, round=7)
    if reason == "task_token_mismatch":
        return run.record("site-1", update, task_token="a-token-of-my-own")
    if reason == "missing_object":
        return {
            **run.record("site-1", update),
            "object_key": keys.update_key(run.run_id, "site-1", 0, "gone"),
        }
    if reason == "sha256_mismatch":
        return run.record("site-1", update, sha256="0" * 64)
    if reason == "unreadable_object":
        record = run.record("site-1", update)
        run.store.archive(record["object_key"])  # type: ignore[attr-defined]
        return record
    if reason == "no_change":  # a copy of the global model: free-riding
        return run.record("site-1", run.base)
    if reason == "foreign_object_key":  # site-2's object, named by site-1
        key, sha = run.upload("site-2", update)
        return run.record("site-1", update, object_key=key, sha256=sha)
    raise AssertionError(reason)


@pytest.mark.parametrize(
    "reason",
    [
        "wrong_base_version",
        "unknown_client",
        "unknown_round",
        "task_token_mismatch",
        "missing_object",
        "sha256_mismatch",
        "unreadable_object",
        "no_change",
        "foreign_object_key",
    ],
)
def test_a_refused_record_names_its_reason_and_the_round_goes_on(
    run: Run, store: MemoryStore, reason: str
) -> None:
    # GIVEN a bad record ahead of the three honest ones
    bad = _refused_record(run, reason)

    # WHEN they arrive
    outcomes = run.deliver(bad, *honest_records(run))

    # THEN the bad one is refused with its reason, takes no one's place, and the round closes with
    # the honest three into their mean
    assert outcomes == [reason, "registered", "registered", "closed"]
    assert run.round()["reported"] == ["site-1", "site-2", "site-3"]
    assert_model(run.model(1), honest_mean(run))
    assert successes(store) == [(ROUND_TOKEN, 1)]


def test_a_duplicate_within_the_round_is_counted_once(run: Run) -> None:
    # GIVEN site-1's report
    first = run.record("site-1", shifted(run.base, 1.0))

    # WHEN the stream delivers it twice, then site-1 sends a second, different update
    second_update = run.record("site-1", shifted(run.base, 5.0))
    outcomes = run.deliver(first, first, second_update)

    # THEN both the redelivery and the second update are duplicates: one report of site-1 counts
    assert outcomes == ["registered", "duplicate", "duplicate"]
    assert run.round()["reported_count"] == 1 and run.round()["reported"] == ["site-1"]


def test_a_redelivered_batch_after_the_close_changes_nothing(run: Run, store: MemoryStore) -> None:
    # GIVEN a round closed by three reports
    records = honest_records(run)
    run.deliver(*records)
    model = run.model(1)

    # WHEN the stream delivers the same three records again (on a fresh process)
    outcomes = run.deliver(*records, store=store.another_process())

    # THEN each is recognised as the report already registered: no count, no version, no callback
    assert outcomes == ["duplicate"] * 3
    assert run.round()["reported_count"] == 3 and run.state()["version"] == 1
    assert_model(run.model(1), model)
    assert successes(store) == [(ROUND_TOKEN, 1)]


def test_a_late_record_is_refused_from_the_rounds_state_without_a_download(
    run: Run, store: MemoryStore
) -> None:
    # GIVEN a closed round
    run.deliver(*honest_records(run))
    late = run.record("site-1", b"\x80\x04 not even a model")
    reads = store.calls["get_object"]

    # WHEN a late record arrives for it
    outcomes = run.deliver(late)

    # THEN it is refused as round_closed, and its object was never read
    assert outcomes == ["round_closed"]
    assert store.calls["get_object"] == reads
    assert run.state()["version"] == 1


def test_a_replayed_object_is_refused_in_a_later_round(run: Run) -> None:
    # GIVEN round 1 closed with site-1's object X, and round 2 open on version 1
    records = honest_records(run)
    run.deliver(*records)
    run.open_round(2, version=1, token="token-round-2")

    # WHEN site-1 reports object X again for round 2, beside two fresh updates
    replayed = {
        **records[0],
        "round": 2,
        "base_version": 1,
        "update_id": f"{run.run_id}#0000000001",
        "task_token": "token-round-2",
    }
    fresh = [
        run.record(client, shifted(run.model(1), 0.5), round=2, version=1, task_token="token-round-2")
        for client in ("site-2", "site-3")
    ]
    outcomes = run.deliver(replayed, *fresh)

    # THEN it is refused as a replay; round 2 holds the other two and waits for its deadline
    assert outcomes == ["replay", "registered", "registered"]
    assert run.round(2)["reported"] == ["site-2", "site-3"] and run.round(2)["status"] == "open"


def test_the_callback_waits_for_the_rounds_token_whichever_comes_second(store: MemoryStore) -> None:
    # GIVEN a round whose token the finalize function has not recorded yet
    run = Run(store, store.settings)
    run.start_sync(token=None)

    # WHEN the round closes
    assert run.deliver(*honest_records(run))[-1] == "closed"

    # THEN nobody is called back yet (no client can name the token)...
    assert run.state()["version"] == 1 and store.callbacks == []

    # ...and once the token arrives from the topic (twice: SQS delivers at least once), the
    # result goes to it once
    assert sync.record_round_token(store, run.run_id, 1, ROUND_TOKEN)
    assert not sync.record_round_token(store, run.run_id, 1, ROUND_TOKEN)
    assert successes(store) == [(ROUND_TOKEN, 1)]


def test_two_processes_closing_a_complete_round_at_once_aggregate_it_once(
    run: Run, store: MemoryStore
) -> None:
    # GIVEN a round whose three reports are registered
    for record in honest_records(run):
        sync.register_report(store, run.settings, sync.parse_record(record))
    results: list[Any] = []

    def close(process: MemoryStore) -> None:
        results.append(sync.close_round(process, run.settings, run.registry, run.run_id, 1, min_reports=3))

    # WHEN two invocations, each with its own store, try to close it at the same time
    threads = [threading.Thread(target=close, args=(store.another_process(),)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # THEN exactly one aggregated; one version was published and one callback sent
    assert sorted(r is None for r in results) == [False, True]
    assert store.object_keys(f"runs/{run.run_id}/global/") == [keys.global_key(run.run_id, v) for v in (0, 1)]
    assert successes(store) == [(ROUND_TOKEN, 1)]


def test_the_close_aggregates_the_object_version_that_registration_checked(
    run: Run, store: MemoryStore
) -> None:
    # GIVEN three registered reports
    records = honest_records(run)
    for record in records:
        sync.register_report(store, run.settings, sync.parse_record(record))

    # WHEN site-2 overwrites its object afterwards (a new S3 version, ten times the shift)
    store.put_object(records[1]["object_key"], encode(shifted(run.base, 20.0)))
    closed = sync.close_round(store, run.settings, run.registry, run.run_id, 1, min_reports=3)

    # THEN the close read the version that was checked: the mean is the honest one
    assert closed is not None and closed.clients == ["site-1", "site-2", "site-3"]
    assert_model(run.model(1), honest_mean(run))


def test_a_round_with_no_usable_update_fails_and_tells_the_state_machine(
    run: Run, store: MemoryStore
) -> None:
    # GIVEN three registered reports whose objects all vanish before the close
    records = honest_records(run)
    for record in records:
        sync.register_report(store, run.settings, sync.parse_record(record))
    with store.backend.lock:
        for record in records:
            del store.backend.objects[record["object_key"]]

    # WHEN the round closes
    with pytest.raises(AggregationError) as failed:
        sync.close_round(store, run.settings, run.registry, run.run_id, 1, min_reports=3)

    # THEN it fails naming the reason, no version is published, and the token gets the failure
    assert failed.value.reason == "no_updates"
    assert run.round()["status"] == "failed" and "missing_object" in run.round()["failure"]
    assert run.state()["version"] == 0
    assert [(c.kind, c.token, c.error) for c in store.callbacks] == [
        ("failure", ROUND_TOKEN, "AggregationFailed")
    ]


@pytest.mark.parametrize(
    ("operation", "after"),
    [
        ("add_report", True),  # the last report is stored; its invocation dies
        ("put_once", False),  # aggregated; the new version's object is not written
        ("put_once", True),  # the object is written; the version pointer is not flipped
        ("publish_version", True),  # the pointer is flipped; the round is not marked closed
        ("close_round", True),  # the round is closed; the callback is not sent
        ("send_task_success", False),  # Step Functions cannot be reached
    ],
    ids=lambda v: ("after" if v else "before") if isinstance(v, bool) else v,
)
def test_a_crash_while_closing_is_recovered_by_the_redelivered_record(
    run: Run, store: MemoryStore, operation: str, after: bool
) -> None:
    # GIVEN two reports in, and the invocation that takes the third crashing at `operation`
    first, second, third = honest_records(run)
    run.deliver(first, second)
    store.crash(operation, after=after)
    with pytest.raises(Crash):
        run.deliver(third)

    # WHEN the stream delivers the failed record again, to a fresh process
    outcome = run.deliver(third, store=store.another_process())

    # THEN the record is recognised as registered (before the crash), the round is closed once,
    # with all three reports, into exactly the fault-free model
    assert outcome == ["duplicate"]
    assert run.round()["status"] == "closed" and run.round()["reported"] == ["site-1", "site-2", "site-3"]
    assert run.state()["version"] == 1
    assert_model(run.model(1), honest_mean(run))
    assert store.object_keys(f"runs/{run.run_id}/global/") == [keys.global_key(run.run_id, v) for v in (0, 1)]
    # AND the state machine was called back exactly once, with version 1
    assert successes(store) == [(ROUND_TOKEN, 1)]


def test_a_claim_orphaned_by_a_crash_is_taken_over_once_its_lease_expires(
    run: Run, store: MemoryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN the invocation that completes the round dies right after its claim was written (its
    # process killed, or the response lost: nothing gives the claim back)
    first, second, third = honest_records(run)
    run.deliver(first, second)
    store.crash("claim_round", after=True)
    with pytest.raises(Crash):
        run.deliver(third)
    assert run.round()["status"] == "aggregating"

    # WHEN the record is redelivered within the claim's lease
    within = run.deliver(third, store=store.another_process())

    # THEN nothing can happen yet: the claim may still be held by a live invocation
    assert within == ["duplicate"]
    assert run.round()["status"] == "aggregating" and run.state()["version"] == 0

    # WHEN it is redelivered once the lease has passed
    clock = sync.time.time
    monkeypatch.setattr(sync.time, "time", lambda: clock() + sync.CLAIM_LEASE_SECONDS + 1)
    run.deliver(third, store=store.another_process())

    # THEN the claim is taken over and the round closes into the fault-free model, called back once
    assert run.round()["status"] == "closed" and run.state()["version"] == 1
    assert_model(run.model(1), honest_mean(run))
    assert successes(store) == [(ROUND_TOKEN, 1)]


# ---- races: another process moves between this one's checks and its conditional write -----------


def test_two_updates_of_one_client_racing_each_other_count_once(run: Run, store: MemoryStore) -> None:
    # GIVEN two different updates of site-1, the second registered by another invocation while the
    # first is between its checks (the round had no report of site-1) and its write
    first = run.record("site-1", shifted(run.base, 1.0))
    second = run.record("site-1", shifted(run.base, 2.0))
    raced: list[str] = []
    store.before("add_report", lambda: raced.extend(run.deliver(second, store=store.another_process())))

    # WHEN the first one's write comes
    outcome = run.deliver(first)

    # THEN the round's condition refuses it: site-1 reported once, with the second update
    assert (raced, outcome) == (["registered"], ["duplicate"])
    assert run.round()["reported_count"] == 1 and run.round()["reported"] == ["site-1"]


def test_a_report_racing_the_deadline_close_is_refused_as_late(run: Run, store: MemoryStore) -> None:
    # GIVEN two reports in (a quorum), and the deadline's finalize request closing the round while
    # site-3's report is between its checks and its write
    report = [run.record(c, shifted(run.base, by), examples=n) for c, by, n in HONEST]
    run.deliver(*report[:2])
    finalize_id = run.mark_deadline()
    store.before(
        "add_report",
        lambda: finalize.finalize_round(
            store.another_process(), run.settings, run.registry, run.run_id, 1, "fin", finalize_id=finalize_id
        ),
    )

    # WHEN site-3's write comes
    outcome = run.deliver(report[2])

    # THEN it is refused as late, and the round holds the two reports it closed with
    assert outcome == ["round_closed"]
    assert run.round()["reported"] == ["site-1", "site-2"] and run.round()["reported_count"] == 2
    assert_model(run.model(1), run.mean((1.0, 10), (2.0, 30)))


def test_a_report_arriving_while_the_deadline_fails_the_round_saves_it(run: Run, store: MemoryStore) -> None:
    # GIVEN one report of the two required, and site-2's report registered just as the finalize
    # request, having counted one, is about to fail the round
    run.deliver(run.record("site-1", shifted(run.base, 1.0)))
    finalize_id = run.mark_deadline()
    late = run.record("site-2", shifted(run.base, 3.0))
    store.before("fail_round", lambda: run.deliver(late, store=store.another_process()))

    # WHEN the finalize request's write comes
    with pytest.raises(finalize.RoundBusy):
        finalize.finalize_round(
            store, run.settings, run.registry, run.run_id, 1, "fin", finalize_id=finalize_id
        )

    # THEN the round is not failed under a quorum it has; the request's retry closes it with both
    assert run.round()["status"] == "open" and run.round()["reported_count"] == 2
    retried = finalize.finalize_round(
        store, run.settings, run.registry, run.run_id, 1, "fin", finalize_id=finalize_id
    )
    assert retried.outcome == "closed"
    assert_model(run.model(1), run.mean((1.0, 10), (3.0, 10)))
    assert [(c.kind, c.token) for c in store.callbacks] == [("success", "fin")]
