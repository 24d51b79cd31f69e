"""Fault points in the aggregate handler: a crash at any step of closing a round is recovered by
the stream's retry, with the same model, one version, one callback, and no update lost or doubled."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fedstream.handlers import aggregate

from fedstream import faults
from fedstream.server.store import Store
from tests.handlers.conftest import FakeContext, SyncWorld, stream_event
from tests.handlers.test_aggregate import expected_mean, global_version, good_items


@pytest.fixture(autouse=True)
def _disarmed() -> Iterator[None]:
    faults.disarm()
    yield
    faults.disarm()


@pytest.fixture
def callbacks(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    """Every SendTaskSuccess the handlers send (moto would accept one token twice; AWS would not)."""
    sent: list[tuple[str, dict[str, Any]]] = []

    def send_task_success(self: Store, token: str, output: dict[str, Any]) -> bool:
        sent.append((token, dict(output)))
        return True

    monkeypatch.setattr(Store, "send_task_success", send_task_success)
    return sent


def failed_sequence_numbers(response: dict[str, Any]) -> list[str]:
    return [f["itemIdentifier"] for f in response["batchItemFailures"]]


@pytest.mark.parametrize("point", sorted(p for p in faults.POINTS if p.startswith("aggregate.")))
def test_a_crash_while_closing_a_round_is_recovered_by_the_retry(
    world: SyncWorld, callbacks: list[tuple[str, dict[str, Any]]], point: str
) -> None:
    # GIVEN a complete round whose closing invocation crashes at `point`
    event = stream_event(*good_items(world))
    faults.arm(point)
    response = aggregate.lambda_handler(event, FakeContext())
    assert faults.fired() == {point: 1}
    # THEN the record that closed the round is reported failed, so Lambda retries from it
    assert failed_sequence_numbers(response) == [event["Records"][-1]["dynamodb"]["SequenceNumber"]]

    # WHEN the stream delivers the failed record again
    retry = aggregate.lambda_handler({"Records": event["Records"][-1:]}, FakeContext())

    # THEN the round is closed once, with all three reports, into exactly the fault-free model
    assert failed_sequence_numbers(retry) == []
    item = world.round_item()
    assert item["status"] == "closed" and item["reported"] == ["site-1", "site-2", "site-3"]
    assert world.run_state()["version"] == 1
    for name, array in expected_mean(world).items():
        np.testing.assert_allclose(global_version(world, 1)[name], array, rtol=1e-6)
    # and the state machine was called back exactly once, with version 1
    assert [(token, output["version"]) for token, output in callbacks] == [("token-round-1", 1)]


def test_a_callback_that_cannot_be_sent_is_sent_by_the_retry(
    world: SyncWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN Step Functions throttles the first SendTaskSuccess
    sent: list[str] = []

    def flaky_send(self: Store, token: str, output: dict[str, Any]) -> bool:
        if not sent:
            sent.append("throttled")
            raise RuntimeError("ThrottlingException")
        sent.append(token)
        return True

    monkeypatch.setattr(Store, "send_task_success", flaky_send)
    event = stream_event(*good_items(world))
    response = aggregate.lambda_handler(event, FakeContext())
    assert len(failed_sequence_numbers(response)) == 1

    # WHEN the failed record is retried
    retry = aggregate.lambda_handler({"Records": event["Records"][-1:]}, FakeContext())

    # THEN the callback goes out on the retry, and only then
    assert failed_sequence_numbers(retry) == []
    assert sent == ["throttled", "token-round-1"]
    assert world.run_state()["version"] == 1


def test_arming_an_unknown_point_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"unknown fault point 'aggregate\.nowhere'"):
        faults.arm("aggregate.nowhere")
