"""The async step on a MemoryStore: FedAsync and FedBuff steps, one update in flight per client,
staleness, redelivery and crashes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedstream.server import asynchronous
from fedstream.server.asynchronous import BatchResult
from fedstream.server.memory import Crash, MemoryStore
from fedstream.weights import Weights
from tests.protocol.conftest import CLIENTS, Run, assert_model, make_settings


def fedasync_by_hand(run: Run, shifts: list[float]) -> Weights:
    """FedAsync (alpha 0.6, s(t) = (1 + t)^-0.5) over updates all trained from version 0, in order."""
    model = {name: array.astype(np.float64) for name, array in run.base.items()}
    for staleness, by in enumerate(shifts):
        mixing = 0.6 * (1 + staleness) ** -0.5
        model = {name: (1 - mixing) * model[name] + mixing * (run.base[name] + by) for name in model}
    return model


def outcomes(result: BatchResult) -> list[str]:
    return [v.outcome if v.reason is None else v.reason for v in result.verdicts]


def counters(run: Run) -> tuple[int, int, int, int]:
    state = run.state()
    return state["version"], state["received"], state["applied"], state["rejected"]


def store_of(run: Run) -> MemoryStore:
    assert isinstance(run.store, MemoryStore)
    return run.store


def test_an_update_moves_the_model_and_every_client_hears_it_was_consumed(async_run: Run) -> None:
    # GIVEN an async run at version 0 (FedAsync, alpha 0.6)
    run = async_run

    # WHEN site-1's update, trained from version 0 and moving every weight by 1, arrives
    result = run.batch(run.update("site-1", 0, by=1.0))

    # THEN it is applied: version 1 is 0.4 x0 + 0.6 (x0 + 1) = x0 + 0.6
    assert outcomes(result) == ["applied"]
    assert counters(run) == (1, 1, 1, 0)
    assert_model(run.model(), {name: array + 0.6 for name, array in run.base.items()})
    # AND every client heard of version 0, then of version 1 naming site-1's update as consumed
    assert [(m["version"], m["consumed"]) for m in store_of(run).published] == [(0, []), (1, ["site-1#0"])]
    lineage = run.store.run_items(run.run_id, ["version#1"])["version#1"]
    assert lineage["parent"] == 0 and lineage["applied"] == ["site-1#0"]


def test_a_batch_takes_its_steps_in_memory_and_publishes_only_its_last_version(async_run: Run) -> None:
    # GIVEN three updates trained from version 0, delivered in one batch
    run = async_run
    updates = [run.update(client, 0, by=by) for client, by in zip(CLIENTS, (1.0, 2.0, 3.0), strict=True)]

    # WHEN the batch is handled
    result = run.batch(*updates)

    # THEN it took three steps, staleness counting the steps before each (0, 1, 2)
    assert outcomes(result) == ["applied"] * 3
    assert [v.staleness for v in result.verdicts] == [0, 1, 2]
    assert_model(run.model(), fedasync_by_hand(run, [1.0, 2.0, 3.0]))
    # AND published version 3 alone, whose lineage holds all three
    versions = {item["sk"]: item for item in store_of(run).run_items_with_prefix(run.run_id, "version#")}
    assert sorted(versions) == ["version#0", "version#3"]
    assert versions["version#3"]["applied"] == ["site-1#0", "site-2#0", "site-3#0"]
    assert store_of(run).published[-1]["consumed"] == ["site-1#0", "site-2#0", "site-3#0"]


@pytest.mark.aggregator("fedbuff", buffer_size=2)
def test_fedbuff_buffers_until_k_updates_and_a_redelivered_batch_is_not_buffered_twice(
    async_run: Run,
) -> None:
    # GIVEN FedBuff with K = 2, and site-1's update buffered
    run = async_run
    first = run.update("site-1", 0, by=1.0)
    assert outcomes(run.batch(first)) == ["buffered"]
    assert (run.state()["version"], run.state()["buffer_ids"]) == (0, ["site-1#0"])

    # WHEN the stream delivers that batch again, then site-2's update
    assert outcomes(run.batch(first)) == ["duplicate"]
    assert outcomes(run.batch(run.update("site-2", 0, by=3.0))) == ["applied"]

    # THEN one step was taken with each update once: the mean of the deltas 1 and 3
    assert counters(run) == (1, 2, 2, 0)
    assert run.state()["buffered"] == 0
    assert_model(run.model(), {name: array + 2.0 for name, array in run.base.items()})


@pytest.mark.aggregator("fedbuff", buffer_size=2)
def test_a_steps_client_metrics_are_the_example_weighted_means_of_its_updates_across_batches(
    async_run: Run,
) -> None:
    # GIVEN FedBuff with K = 2: site-1's update (30 examples, eval accuracy 0.2) is buffered
    run = async_run
    metrics = {"train_loss": 2.0, "eval_accuracy": 0.2}
    assert outcomes(run.batch(run.update("site-1", 0, examples=30, metrics=metrics))) == ["buffered"]

    # WHEN site-2's update (10 examples, eval accuracy 0.6) arrives in a later batch and makes the step
    metrics = {"train_loss": 1.0, "eval_accuracy": 0.6}
    assert outcomes(run.batch(run.update("site-2", 0, examples=10, metrics=metrics))) == ["applied"]

    # THEN the version's metrics are the means over both updates, weighted by their examples
    # (the plugin returns none of these), and the next step starts counting afresh
    reported = json.loads(run.state()["last_metrics"])
    assert reported["eval_accuracy"] == pytest.approx((30 * 0.2 + 10 * 0.6) / 40)
    assert reported["train_loss"] == pytest.approx((30 * 2.0 + 10 * 1.0) / 40)
    assert (reported["num_clients"], reported["num_examples"]) == (2, 40)
    version = run.store.run_items(run.run_id, ["version#1"])["version#1"]
    assert json.loads(version["metrics"])["eval_accuracy"] == pytest.approx(0.3)
    assert json.loads(run.state()["reports_since_step"])["num_clients"] == 0


@pytest.mark.aggregator("fedbuff", buffer_size=2)
def test_the_target_accuracy_is_judged_on_the_steps_mean_not_on_one_client(async_run: Run) -> None:
    # GIVEN a run that stops at eval accuracy 0.5, and a buffered update reporting 0.1
    run = Run(async_run.store, async_run.settings, run_id="run-target")
    run.start_async(max_updates=100, target_accuracy=0.5)
    low, high = {"eval_accuracy": 0.1}, {"eval_accuracy": 0.7}
    run.batch(run.update("site-1", 0, examples=10, metrics=low))

    # WHEN one client claims 0.7 in the update that makes the step (mean 0.4)
    run.batch(run.update("site-2", 0, examples=10, metrics=high))

    # THEN the run goes on; a step whose mean reaches 0.5 ends it
    assert run.state()["status"] == "RUNNING"
    assert outcomes(run.batch(run.update("site-3", 0, examples=10, metrics=high))) == ["buffered"]
    assert outcomes(run.batch(run.update("site-1", 1, by=2.0, examples=10, metrics=high))) == ["applied"]
    assert run.state()["status"] == "SUCCEEDED" and run.state()["finish_reason"] == "target_accuracy"


@pytest.mark.aggregator("fedasync", max_staleness=1)
def test_an_update_staler_than_the_bound_is_refused_with_its_reason(async_run: Run) -> None:
    # GIVEN a staleness bound of 1
    run = async_run

    # WHEN three updates trained from version 0 arrive in one batch
    result = run.batch(*(run.update(client, 0) for client in CLIENTS))

    # THEN staleness 0 and 1 are applied; the third, 2 versions behind, is refused and counted
    assert outcomes(result) == ["applied", "applied", "stale"]
    assert counters(run) == (2, 3, 2, 1)


def test_unknown_clients_other_runs_and_future_versions_are_refused(async_run: Run) -> None:
    # GIVEN an async run at version 0
    run = async_run
    other_run = Run(run.store, run.settings, run_id="run-zz").update("site-1", 0)

    # WHEN a batch brings an unregistered client, a run that does not exist and a future base version
    result = run.batch(run.update("site-9", 0), other_run, run.update("site-3", 5))

    # THEN each is refused with its reason and the model did not move; only the run's own record is
    # counted (the others name no run of this deployment)
    assert outcomes(result) == ["unknown_client", "unknown_run", "future_base_version"]
    assert counters(run) == (0, 1, 0, 1)


def test_a_client_cannot_have_two_updates_in_flight(async_run: Run) -> None:
    # GIVEN version 3: site-2 and site-3 released at version 2, site-1 at version 3
    run = async_run
    run.batch(run.update("site-2", 0), run.update("site-3", 0))
    run.batch(run.update("site-1", 2))
    assert run.state()["released"] == {"site-1": 3, "site-2": 2, "site-3": 2}

    # WHEN site-1 sends an update back-dated to version 1, and site-2 two updates in one batch
    result = run.batch(run.update("site-1", 1), run.update("site-2", 2), run.update("site-2", 3))

    # THEN the back-dated one and site-2's second are refused as in flight; site-2's first applies
    assert outcomes(result) == ["in_flight", "applied", "in_flight"]
    assert counters(run) == (4, 6, 4, 2)


def test_a_replayed_object_is_refused(async_run: Run) -> None:
    # GIVEN site-1's update X applied at version 0 (which released site-1 at version 1)
    run = async_run
    first = run.update("site-1", 0)
    run.batch(first)

    # WHEN site-1 sends X again as its update on version 1
    replayed = {**first, "base_version": 1, "update_id": f"{run.run_id}#0000000001"}
    result = run.batch(replayed)

    # THEN it is refused as a replay and the model stays at version 1
    assert outcomes(result) == ["replay"]
    assert counters(run) == (1, 2, 1, 1)


def test_a_record_repeated_within_a_batch_is_counted_once(async_run: Run) -> None:
    # GIVEN site-1's update, which the stream (at least once) puts twice into one batch
    run = async_run
    record = run.update("site-1", 0, by=1.0)

    # WHEN the batch is handled
    result = run.batch(record, record)

    # THEN the copy is a duplicate: one step, one count
    assert outcomes(result) == ["applied", "duplicate"]
    assert counters(run) == (1, 1, 1, 0)
    assert_model(run.model(), {name: array + 0.6 for name, array in run.base.items()})


def test_a_redelivered_batch_changes_nothing_but_names_its_updates_again(async_run: Run) -> None:
    # GIVEN a batch of two updates, applied
    run = async_run
    batch = [run.update("site-1", 0, by=1.0), run.update("site-2", 0, by=2.0)]
    run.batch(*batch)
    before = run.model()

    # WHEN the stream delivers it again, to a fresh process
    result = run.batch(*batch, store=store_of(run).another_process())

    # THEN both are duplicates: the model, the version and the counters are as they were
    assert outcomes(result) == ["duplicate", "duplicate"]
    assert counters(run) == (2, 2, 2, 0)
    assert_model(run.model(), before, atol=0)
    # AND the clients are told again that both were consumed (a lost message is not a lost client)
    last = store_of(run).published[-1]
    assert (last["version"], last["consumed"]) == (2, ["site-1#0", "site-2#0"])


@pytest.mark.parametrize(
    ("operation", "after"),
    [
        ("put_once", True),  # the new version's object is written; the transaction is not sent
        ("commit_async_step", False),  # the transaction never reaches the table
        ("commit_async_step", True),  # committed; the invocation dies before it hears so
        ("publish", False),  # committed; the clients are not told
    ],
    ids=lambda v: ("after" if v else "before") if isinstance(v, bool) else v,
)
def test_a_crash_in_an_async_batch_is_recovered_by_the_retry(
    async_run: Run, operation: str, after: bool
) -> None:
    # GIVEN a batch of two updates whose invocation crashes at `operation`
    run = async_run
    batch = [run.update("site-1", 0, by=1.0), run.update("site-2", 0, by=2.0)]
    store_of(run).crash(operation, after=after)
    with pytest.raises(Crash):
        run.batch(*batch)

    # WHEN the stream delivers the batch again, to a fresh process
    run.batch(*batch, store=store_of(run).another_process())

    # THEN both updates are in the model exactly once, as without the crash
    assert counters(run) == (2, 2, 2, 0)
    assert_model(run.model(), fedasync_by_hand(run, [1.0, 2.0]))
    assert run.store.run_items(run.run_id, ["version#2"])["version#2"]["applied"] == ["site-1#0", "site-2#0"]
    # AND the clients heard that both were consumed
    last = store_of(run).published[-1]
    assert (last["version"], last["consumed"]) == (2, ["site-1#0", "site-2#0"])


def test_a_commit_that_lost_a_race_is_recomputed_from_the_fresh_state(async_run: Run) -> None:
    # GIVEN two processes: A committed a batch (and keeps its state as its guess), then B another
    run = async_run
    a, b = store_of(run), store_of(run).another_process()
    run.batch(run.update("site-1", 0, by=1.0), store=a)
    run.batch(run.update("site-2", 0, by=2.0), store=b)

    # WHEN A takes the next batch, starting from its stale guess of the run
    result = run.batch(run.update("site-3", 0, by=3.0), store=a)

    # THEN its commit fails its condition once, it recomputes from the stored state, and every
    # update is in the model once, at the staleness it really had
    [commit] = result.commits
    assert commit.conflict_retries == 1
    assert [v.staleness for v in result.verdicts] == [2]
    assert counters(run) == (3, 3, 3, 0)
    assert_model(run.model(), fedasync_by_hand(run, [1.0, 2.0, 3.0]))


def test_the_batch_that_reaches_max_updates_ends_the_run_and_refuses_the_rest() -> None:
    # GIVEN a run that stops after two applied updates
    settings = make_settings("async", aggregator_params={"max_staleness": 1000})
    run = Run(MemoryStore(settings), settings, run_id="run-m")
    run.start_async(max_updates=2)

    # WHEN a batch of three updates arrives, then one more
    result = run.batch(*(run.update(client, 0) for client in CLIENTS))
    after = run.batch(run.update("site-1", 2))

    # THEN two are applied, the rest refused, the run ends, and clients are told to stop, once
    assert outcomes(result) == ["applied", "applied", "run_finished"]
    assert outcomes(after) == ["run_finished"]
    state = run.state()
    assert (state["status"], state["finish_reason"], state["applied"], state["rejected"]) == (
        "SUCCEEDED",
        "max_updates",
        2,
        2,
    )
    assert [m["type"] for m in store_of(run).published] == ["model_ready", "training_complete"]


def test_a_batch_larger_than_one_transaction_is_committed_in_several() -> None:
    # GIVEN 110 clients' updates in one batch: more records than one 100-item transaction holds
    clients = tuple(f"site-{n}" for n in range(110))
    settings = make_settings("async", aggregator_params={"max_staleness": 1000}, client_ids=clients)
    run = Run(MemoryStore(settings), settings, run_id="run-b")
    run.start_async()

    # WHEN the batch is handled
    result = run.batch(*(run.update(client, 0, by=0.01) for client in clients))

    # THEN it goes in three transactions (49 + 49 + 12) and every update is applied once
    most = asynchronous.MAX_RECORDS_PER_COMMIT
    assert [len(commit.verdicts) for commit in result.commits] == [most, most, 110 - 2 * most]
    assert outcomes(result) == ["applied"] * 110
    assert counters(run) == (110, 110, 110, 0)
    versions = store_of(run).run_items_with_prefix(run.run_id, "version#")
    assert sorted(ref for item in versions for ref in item["applied"]) == sorted(f"{c}#0" for c in clients)


@pytest.mark.aggregator("fedbuff", buffer_size=3)
def test_two_processes_buffering_at_once_lose_no_update(async_run: Run) -> None:
    # GIVEN FedBuff with K = 3: process B buffered site-3's update (and keeps the state it committed
    # as its guess), then process A buffered site-1's at the same version
    run = async_run
    a, b = store_of(run).another_process(), store_of(run).another_process()
    assert outcomes(run.batch(run.update("site-3", 0, by=3.0), store=b)) == ["buffered"]
    assert outcomes(run.batch(run.update("site-1", 0, by=1.0), store=a)) == ["buffered"]

    # WHEN B takes site-2's update from its guess (version 0, a buffer of one)
    result = run.batch(run.update("site-2", 0, by=2.0), store=b)

    # THEN the buffer's sequence refuses B's first commit; from the stored state, the third update
    # completes the buffer: one step with all three deltas, none lost
    assert outcomes(result) == ["applied"] and result.commits[0].conflict_retries == 1
    assert counters(run) == (1, 3, 3, 0)
    assert run.store.run_items(run.run_id, ["version#1"])["version#1"]["applied"] == [
        "site-3#0",
        "site-1#0",
        "site-2#0",
    ]
    assert_model(run.model(), {name: array + 2.0 for name, array in run.base.items()})
