"""The bad-input corpus (``tests/corpus/cases.py``) against the real handlers, in both modes.

Every hostile update travels as a client would send it (object in S3, item in DynamoDB, the item's
INSERT on the stream) in one batch with two good updates from site-2 and site-3. Each test checks
what an operator would see: the batch reports no failure (the bad record is not retried), one
``UpdatesRejected{reason}`` metric and one "update rejected" log line naming the reason and the
detail, and a run that goes on — the sync round closes at its deadline with the two good reports,
the async model advances by exactly the two good updates — with a global model equal to the one
the good updates alone make: no update lost, none doubled.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import pytest
from fedstream.client.runner import FederatedClient
from fedstream.handlers import aggregate, async_update, finalize

from fedstream.bounds import InfluenceBounds
from fedstream.local.logs import json_lines, metric_counts
from fedstream.settings import ClientSettings
from fedstream.weights import Weights, decode
from tests.corpus.cases import (
    BAD_CLIENT,
    CASES,
    PICKLE_SENTINEL,
    SYNC_TOKEN,
    Case,
    CaseContext,
    Channel,
    cases_for,
    client_record,
    shifted,
)
from tests.handlers.conftest import FakeContext, SyncWorld, stream_event
from tests.handlers.test_finalize import finalize_event

GOOD = (("site-2", 2.0, 30), ("site-3", 4.0, 60))  # client, shift of every weight, num_examples
NO_FAILURES = {"batchItemFailures": []}


# ---- helpers ------------------------------------------------------------------------------------


def good_records(ctx: CaseContext) -> list[dict[str, Any]]:
    return [client_record(ctx, c, shifted(ctx.world, by), num_examples=n) for c, by, n in GOOD]


def sync_expected(world: SyncWorld) -> Weights:
    """FedAvg of the good updates alone, by hand: the example-weighted mean shift."""
    shift = sum(by * n for _, by, n in GOOD) / sum(n for _, _, n in GOOD)
    return {name: array + shift for name, array in world.base.items()}


def async_expected(world: SyncWorld) -> Weights:
    """FedAsync (alpha 0.6, s(t) = (1 + t)^-0.5) over the good updates in order, both from version 0."""
    model = {name: array.astype(np.float64) for name, array in world.base.items()}
    for staleness, (_, by, _) in enumerate(GOOD):
        mixing = 0.6 * (1 + staleness) ** -0.5
        model = {name: (1 - mixing) * model[name] + mixing * (world.base[name] + by) for name in model}
    return model


def global_model(world: SyncWorld) -> tuple[int, Weights]:
    state = world.run_state()
    weights, _ = decode(world.store.get_bytes(state["global_key"]))
    return int(state["version"]), weights


def lineage(world: SyncWorld) -> list[str]:
    """Every update applied to reach the current async version, oldest first."""
    applied: list[str] = []
    version = int(world.run_state()["version"])
    while version > 0:
        item = world.store.runs.get_item(Key={"run_id": world.run_id, "sk": f"version#{version}"})["Item"]
        applied = [*item["applied"], *applied]
        version = int(item["parent"])
    return applied


def rejection_logs(out: str) -> list[dict[str, Any]]:
    return [entry for entry in json_lines(out) if entry.get("message") == "update rejected"]


def emf_reasons(out: str) -> dict[str, int]:
    """Every EMF metric line carrying a ``reason`` dimension, counted by reason."""
    counts: dict[str, int] = {}
    for entry in json_lines(out):
        if "_aws" in entry and "reason" in entry:
            counts[str(entry["reason"])] = counts.get(str(entry["reason"]), 0) + 1
    return counts


def deadline(world: SyncWorld) -> dict[str, Any]:
    """The state machine's round timeout: the finalize handler closes the round with its quorum."""
    return finalize.lambda_handler(finalize_event(world), FakeContext())


def send_updates(mode: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    handler = aggregate if mode == "sync" else async_update
    return handler.lambda_handler(stream_event(*items), FakeContext())


def world_for(request: pytest.FixtureRequest, mode: str) -> SyncWorld:
    return request.getfixturevalue("world" if mode == "sync" else "async_world")


def update_params() -> list[Any]:
    params: list[Any] = []
    for case in cases_for("updates"):
        for mode in ("sync", "async"):
            if mode not in case.expect:
                continue
            marks: list[pytest.MarkDecorator] = []
            if mode in case.known_bug:
                marks.append(pytest.mark.xfail(strict=True, reason=case.known_bug[mode]))
            if mode == "async" and case.async_aggregator:
                aggregator, aggregator_params = case.async_aggregator
                marks.append(pytest.mark.aggregator(aggregator, **aggregator_params))
            params.append(pytest.param(case, mode, id=f"{case.name}-{mode}", marks=marks))
    return params


def channel_params(channel: Channel) -> list[Any]:
    return [pytest.param(case, id=case.name) for case in cases_for(channel)]


# ---- the corpus itself --------------------------------------------------------------------------


def test_the_corpus_holds_at_least_25_distinct_named_cases_each_with_an_expected_outcome() -> None:
    names = [case.name for case in CASES]
    assert len(names) == len(set(names)) >= 25
    for case in CASES:
        assert case.expect, case.name
        for reason, detail in case.expect.values():
            assert reason and detail, case.name


# ---- hostile updates: both modes ----------------------------------------------------------------


@pytest.mark.parametrize(("case", "mode"), update_params())
def test_a_hostile_update_is_rejected_with_its_reason_and_the_run_goes_on(
    case: Case,
    mode: str,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN two good updates and one hostile input, each uploaded and recorded as a client would
    world = world_for(request, mode)
    ctx = CaseContext(world, mode)
    ctx.good = good_records(ctx)
    bad = case.build(ctx)
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
    capsys.readouterr()
    expected_reason, expected_detail = case.expect[mode]

    # WHEN the stream delivers them (and, in sync mode, the round's deadline passes)
    first, rest = ctx.good[0], ctx.good[1:]
    responses: list[dict[str, Any]] = []
    if case.position == "after_round_closed":
        responses += [send_updates(mode, ctx.good), deadline(world), send_updates(mode, [bad])]
    else:
        order = {
            "first": [bad, *ctx.good],
            "after_first_good": [first, bad, *rest],
            "last": [*ctx.good, bad],
        }[case.position]
        responses.append(send_updates(mode, order))
        if mode == "sync":
            responses.append(deadline(world))

    # THEN nothing is retried, the rejection is counted and logged with its reason and detail
    out = capsys.readouterr().out
    assert responses == [NO_FAILURES] * len(responses)
    assert metric_counts(out, "UpdatesRejected", "reason") == {expected_reason: 1}
    [logged] = rejection_logs(out)
    assert logged["reason"] == expected_reason
    assert expected_detail in logged["detail"], logged["detail"]
    if isinstance(bad.get("client_id"), str):
        assert logged["client_id"] == bad["client_id"]
    assert PICKLE_SENTINEL not in out
    assert SYNC_TOKEN not in out  # task tokens are never logged

    # AND the run goes on with exactly the good updates: none lost, none doubled, nothing else
    version, weights = global_model(world)
    if mode == "sync":
        round_item = world.round_item()
        assert round_item["status"] == "closed"
        assert sorted(round_item["reported"]) == ["site-2", "site-3"]
        assert json.loads(round_item["result"])["clients"] == ["site-2", "site-3"]
        expected = sync_expected(world)
        assert version == 1
    else:
        assert lineage(world) == ["site-2#0", "site-3#0"]
        state = world.run_state()
        assert (version, state["applied"]) == (2, 2)
        assert state["received"] == state["applied"] + state["rejected"] + state["buffered"]
        expected = async_expected(world)
    for name, array in expected.items():
        np.testing.assert_allclose(weights[name], array, rtol=1e-5, atol=1e-6)


# ---- hostile finalize requests ------------------------------------------------------------------


def _finalize_body(world: SyncWorld, case: Case) -> tuple[CaseContext, str]:
    ctx = CaseContext(world, "sync")
    ctx.good = good_records(ctx)
    assert send_updates("sync", ctx.good) == NO_FAILURES  # two reports: a quorum, round still open
    return ctx, case.build(ctx)


@pytest.mark.parametrize("case", channel_params("finalize"))
def test_a_hostile_finalize_request_is_dropped_and_the_round_is_untouched(
    case: Case, world: SyncWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN an open round with a quorum of good reports
    _, body = _finalize_body(world, case)
    capsys.readouterr()

    # WHEN the finalize queue delivers a hostile body
    response = finalize.lambda_handler(finalize_event(world, body=body), FakeContext())

    # THEN it is dropped with a log line (not retried), and the round is as it was
    assert response == NO_FAILURES
    assert case.expect["sync"][1] in capsys.readouterr().out
    assert world.round_item()["status"] == "open" and world.run_state()["version"] == 0

    # AND the real deadline still closes the round with the good updates
    assert deadline(world) == NO_FAILURES
    version, weights = global_model(world)
    assert version == 1
    for name, array in sync_expected(world).items():
        np.testing.assert_allclose(weights[name], array, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", channel_params("finalize"))
def test_a_hostile_finalize_request_is_counted_with_its_reason(
    case: Case, world: SyncWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    _, body = _finalize_body(world, case)
    capsys.readouterr()

    finalize.lambda_handler(finalize_event(world, body=body), FakeContext())

    out = capsys.readouterr().out
    reason = case.expect["sync"][0]
    assert emf_reasons(out) == {reason: 1}
    assert any(entry.get("reason") == reason for entry in json_lines(out) if "_aws" not in entry)


# ---- hostile messages on a client's queue -------------------------------------------------------


class MustNotTrain:
    def __init__(self, world: SyncWorld) -> None:
        self.world = world

    def initial_weights(self) -> Weights:
        return self.world.base

    def fit(self, weights: Weights, settings: dict[str, Any]) -> Any:
        raise AssertionError("a hostile message must never reach training")


def queue_depth(world: SyncWorld, url: str) -> int:
    attributes = world.aws.client("sqs").get_queue_attributes(
        QueueUrl=url, AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    )["Attributes"]
    return sum(int(v) for v in attributes.values())


@pytest.mark.parametrize("case", channel_params("client_queue"))
def test_a_hostile_client_message_is_dropped_without_training(
    case: Case, world: SyncWorld, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a hostile body on site-1's own queue
    body = case.build(CaseContext(world, "sync"))
    url = world.resources.queue_urls[BAD_CLIENT]
    sqs = world.aws.client("sqs")
    sqs.send_message(QueueUrl=url, MessageBody=body)
    messages = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=60)["Messages"]
    settings = ClientSettings(
        client_id=BAD_CLIENT,
        queue_url=url,
        bucket=world.resources.bucket,
        updates_table=world.resources.updates_table,
        endpoint_url=world.aws.endpoint,
        wait_seconds=0,
    )
    client = FederatedClient(settings, MustNotTrain(world), session=world.aws.session())

    # WHEN the client handles the batch
    with caplog.at_level(logging.ERROR, logger="fedstream.client"):
        outcome = client._handle_batch(messages)

    # THEN it rejects the message with its reason, deletes it (no poison loop), writes nothing, and
    # keeps polling
    assert outcome is None
    assert (client.stats.rejected_messages, client.stats.trained) == (1, 0)
    assert case.expect["client"][1] in caplog.text
    assert queue_depth(world, url) == 0
    assert world.store.updates.scan()["Count"] == 0
    assert PICKLE_SENTINEL not in capsys.readouterr().out


# ---- huge-norm weights: accepted, bounded only by an aggregator ----------------------------------


def huge(world: SyncWorld) -> Weights:
    """Finite float32 weights with an L2 norm near 4e30: valid on the wire."""
    signs = np.random.default_rng(3)
    return {
        name: (signs.choice([-1.0, 1.0], a.shape) * 1e30).astype(a.dtype) for name, a in world.base.items()
    }


def flat(weights: Weights) -> np.ndarray:
    return np.concatenate([np.asarray(weights[name], np.float64).ravel() for name in sorted(weights)])


def test_fedavg_refuses_a_huge_norm_update_by_default(
    world: SyncWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN site-1 sends finite weights of norm ~4e30 with two good updates (a complete round)
    ctx = CaseContext(world, "sync")
    items = [client_record(ctx, BAD_CLIENT, huge(world), num_examples=10), *good_records(ctx)]

    assert send_updates("sync", items) == NO_FAILURES

    # THEN it is refused as norm_bound (far beyond the round's median delta norm), logged and
    # counted, and the round closes with FedAvg of the good updates alone
    version, weights = global_model(world)
    assert version == 1 and world.round_item()["status"] == "closed"
    assert metric_counts(capsys.readouterr().out, "UpdatesRejected", "reason") == {"norm_bound": 1}
    for name, array in sync_expected(world).items():
        np.testing.assert_allclose(weights[name], array, rtol=1e-5)


def test_with_bounds_off_fedavg_follows_a_huge_norm_update(
    world: SyncWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN influence bounds turned off at deploy time, and the same round
    monkeypatch.setenv("FEDSTREAM_BOUNDS", InfluenceBounds.off().model_dump_json())
    ctx = CaseContext(world, "sync")
    items = [client_record(ctx, BAD_CLIENT, huge(world), num_examples=10), *good_records(ctx)]

    assert send_updates("sync", items) == NO_FAILURES

    # THEN it is accepted and FedAvg follows it (10 of 100 examples): what the bound prevents
    version, weights = global_model(world)
    assert version == 1 and world.round_item()["status"] == "closed"
    assert np.linalg.norm(flat(weights) - flat(world.base)) > 1e29


def dp_clip(update: Weights, base: Weights, clip_norm: float) -> np.ndarray:
    moved = flat(update) - flat(base)
    return moved * min(1.0, clip_norm / np.linalg.norm(moved))


@pytest.mark.parametrize("clip_norm", [0.5, 2.0])
def test_dp_noise_clipping_bounds_a_huge_norm_update_to_clip_norm_over_m(
    world: SyncWorld, monkeypatch: pytest.MonkeyPatch, clip_norm: float
) -> None:
    # GIVEN dp-noise with clip norm C and no noise, and the same round: a huge update and two good
    # ones (influence bounds off: the clipping alone is under test)
    monkeypatch.setenv("FEDSTREAM_BOUNDS", InfluenceBounds.off().model_dump_json())
    monkeypatch.setenv("FEDSTREAM_AGGREGATOR", "dp-noise")
    monkeypatch.setenv(
        "FEDSTREAM_AGGREGATOR_PARAMS", json.dumps({"clip_norm": clip_norm, "noise_multiplier": 0})
    )
    ctx = CaseContext(world, "sync")
    hostile = huge(world)
    goods = [shifted(world, by) for _, by, _ in GOOD]
    items = [client_record(ctx, BAD_CLIENT, hostile), *good_records(ctx)]

    assert send_updates("sync", items) == NO_FAILURES

    # THEN the model is base + mean of the clipped deltas (m = 3, unweighted), so the hostile update
    # moved it by exactly C/m and the whole round by at most C
    version, weights = global_model(world)
    assert version == 1
    base = flat(world.base)
    m = 3
    honest = sum(dp_clip(g, world.base, clip_norm) for g in goods) / m
    hostile_part = flat(weights) - base - honest
    np.testing.assert_allclose(
        hostile_part, dp_clip(hostile, world.base, clip_norm) / m, rtol=1e-4, atol=1e-6
    )
    assert np.linalg.norm(hostile_part) <= clip_norm / m * (1 + 1e-5)
    assert np.linalg.norm(flat(weights) - base) <= clip_norm * (1 + 1e-5)


def _strict_json(text: str) -> Any:
    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_a_clip_only_dp_noise_round_calls_back_with_strict_json(
    world: SyncWorld, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FEDSTREAM_AGGREGATOR", "dp-noise")
    monkeypatch.setenv("FEDSTREAM_AGGREGATOR_PARAMS", json.dumps({"clip_norm": 1.0, "noise_multiplier": 0}))
    ctx = CaseContext(world, "sync")
    items = [client_record(ctx, BAD_CLIENT, huge(world)), *good_records(ctx)]

    assert send_updates("sync", items) == NO_FAILURES

    _strict_json(world.round_item()["result"])  # what SendTaskSuccess received
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("{"):
            _strict_json(line)


def test_async_before_three_updates_only_the_absolute_norm_bound_holds(
    async_world: SyncWorld, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a fresh async run (no update taken yet: no median to compare with) and one huge update
    ctx = CaseContext(async_world, "async")
    item = client_record(ctx, BAD_CLIENT, huge(async_world))

    # WHEN the deployment sets no absolute bound  THEN it is applied with FedAsync's mixing weight
    # 0.6: the model is moved by ~0.6 * 4e30 (what max_update_norm is for)
    assert send_updates("async", [item]) == NO_FAILURES
    version, weights = global_model(async_world)
    assert version == 1
    assert np.linalg.norm(flat(weights) - flat(async_world.base)) > 1e29

    # AND WHEN the deployment sets max_update_norm  THEN the same update is refused as norm_bound
    monkeypatch.setenv("FEDSTREAM_BOUNDS", InfluenceBounds(max_update_norm=100.0).model_dump_json())
    capsys.readouterr()
    again = client_record(ctx, "site-2", huge(async_world), version=1)
    assert send_updates("async", [again]) == NO_FAILURES
    assert metric_counts(capsys.readouterr().out, "UpdatesRejected", "reason") == {"norm_bound": 1}
    assert global_model(async_world)[0] == 1


# ---- what a client may still do with its own records: known gaps ---------------------------------


def _sync_ctx(world: SyncWorld) -> CaseContext:
    return CaseContext(world, "sync")


def test_a_forged_task_token_reported_first_does_not_lock_honest_clients_out(
    world: SyncWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN site-1 reports first, with a well-formed update but a forged token
    ctx = _sync_ctx(world)
    forged = client_record(ctx, BAD_CLIENT, shifted(world, 1.0), task_token="forged-by-site-1")
    items = [forged, *good_records(ctx)]

    send_updates("sync", items)

    # THEN the honest reports are still registered (whatever happens to the forged one)
    reported = set(world.round_item().get("reported", []))
    assert {"site-2", "site-3"} <= reported, metric_counts(
        capsys.readouterr().out, "UpdatesRejected", "reason"
    )


def test_a_record_rewritten_after_registration_cannot_count_another_clients_update(world: SyncWorld) -> None:
    # GIVEN site-1 registered a good update (shift 1, 10 examples)
    ctx = _sync_ctx(world)
    own = client_record(ctx, BAD_CLIENT, shifted(world, 1.0), num_examples=10)
    assert send_updates("sync", [own]) == NO_FAILURES
    goods = good_records(ctx)
    # WHEN it overwrites its record (its IAM allows a plain PutItem on its own key) to name site-2's
    # object with a huge example count, and the round then completes
    world.store_record(
        {**own, "object_key": goods[0]["object_key"], "sha256": goods[0]["sha256"], "num_examples": 10**9}
    )
    assert send_updates("sync", goods) == NO_FAILURES

    # THEN site-2's update is not counted twice: the round uses what was validated (site-1's own
    # update) or skips site-1 as foreign_object_key
    _, weights = global_model(world)
    validated = (1.0 * 10 + 2.0 * 30 + 4.0 * 60) / 100
    skipped = (2.0 * 30 + 4.0 * 60) / 90
    shift = float(np.mean(flat(weights) - flat(world.base)))
    assert min(abs(shift - validated), abs(shift - skipped)) < 1e-4, shift


def test_a_record_rewritten_after_registration_into_garbage_does_not_wedge_the_round(
    world: SyncWorld,
) -> None:
    ctx = _sync_ctx(world)
    own = client_record(ctx, BAD_CLIENT, shifted(world, 1.0))
    assert send_updates("sync", [own]) == NO_FAILURES
    world.store_record({**own, "num_examples": 0})  # a malformed record, after it was validated

    response = send_updates("sync", good_records(ctx))

    # THEN the round closes (it is not wedged), aggregating what registration validated:
    # site-1's own update (shift 1, 10 examples) and the good ones
    assert response == NO_FAILURES
    assert world.round_item()["status"] == "closed"
    version, weights = global_model(world)
    assert version == 1
    shift = (1.0 * 10 + sum(by * n for _, by, n in GOOD)) / (10 + sum(n for _, _, n in GOOD))
    for name, array in world.base.items():
        np.testing.assert_allclose(weights[name], array + shift, rtol=1e-5, atol=1e-6)
