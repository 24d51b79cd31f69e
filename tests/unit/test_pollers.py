"""The local event-source pollers behave like Lambda's event source mappings."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
from botocore.exceptions import EndpointConnectionError

from fedstream.local.pollers import Poller, QueuePoller, StreamPoller


class FakeStreams:
    """One shard holding the given records, served once."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = records

    def describe_stream(self, StreamArn: str) -> dict[str, Any]:
        return {"StreamDescription": {"Shards": [{"ShardId": "shard-1"}]}}

    def get_shard_iterator(self, **kwargs: Any) -> dict[str, Any]:
        return {"ShardIterator": "0"}

    def get_records(self, ShardIterator: str, Limit: int) -> dict[str, Any]:
        start = int(ShardIterator)
        batch = self.records[start : start + Limit]
        return {"Records": batch, "NextShardIterator": str(start + len(batch))}


def record(n: int) -> dict[str, Any]:
    return {"eventID": f"e{n}", "eventName": "INSERT", "dynamodb": {"SequenceNumber": str(n), "NewImage": {}}}


def run_until(poller: StreamPoller, done: Any, timeout: float = 120.0) -> None:
    """Run the poller until ``done()``; the timeout only ends a test that would hang (a slow machine
    still finishes, and the assertions say what went wrong)."""
    poller.start()
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        time.sleep(0.02)
    poller.stop()
    poller.join(timeout=30)


def test_a_partial_failure_retries_from_the_first_failed_record_and_poison_goes_to_the_dlq() -> None:
    # GIVEN a handler that always fails record 2 of 0..4
    deliveries: list[list[str]] = []
    dead: list[dict[str, Any]] = []

    def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
        numbers = [r["dynamodb"]["SequenceNumber"] for r in event["Records"]]
        deliveries.append(numbers)
        return {"batchItemFailures": [{"itemIdentifier": "2"}] if "2" in numbers else []}

    poller = StreamPoller(
        FakeStreams([record(n) for n in range(5)]),
        "arn",
        handler,
        "test",
        batch_size=10,
        max_retries=2,
        dead_letter=dead.append,
    )

    # WHEN the poller delivers the batch
    run_until(poller, lambda: poller.delivered >= 4)

    # THEN records before the failure are delivered once, the failing one is retried max_retries
    # times from where it failed, then goes to the dead-letter queue, and the rest go on
    assert deliveries[0] == ["0", "1", "2", "3", "4"]
    assert deliveries[1:3] == [["2", "3", "4"], ["2", "3", "4"]]
    assert deliveries[3] == ["3", "4"]
    assert [d["eventID"] for d in dead] == ["e2"]
    assert poller.delivered == 4


class Unreachable:
    """An embedded AWS that went away: every read is refused. The ``stop_at``-th read happens
    after the poller was asked to stop (as when a run tears down while a read is in flight)."""

    def __init__(self, stop_at: int) -> None:
        self.stop_at, self.reads = stop_at, 0
        self.poller: Poller | None = None

    def refuse(self) -> None:
        self.reads += 1
        if self.reads == self.stop_at:
            assert self.poller is not None
            self.poller.stop()  # from the poller's own thread: only asks
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1/")

    # the DynamoDB Streams calls
    def describe_stream(self, StreamArn: str) -> dict[str, Any]:
        return FakeStreams([]).describe_stream(StreamArn)

    def get_shard_iterator(self, **kwargs: Any) -> dict[str, Any]:
        return {"ShardIterator": "0"}

    def get_records(self, **kwargs: Any) -> dict[str, Any]:
        self.refuse()
        return {}

    # the SQS calls
    def get_queue_attributes(self, **kwargs: Any) -> dict[str, Any]:
        return {"Attributes": {"QueueArn": "arn:aws:sqs:us-east-1:123456789012:q"}}

    def receive_message(self, **kwargs: Any) -> dict[str, Any]:
        self.refuse()
        return {}


@pytest.mark.parametrize("kind", ["stream", "queue"])
def test_a_refused_connection_is_logged_and_retried_but_not_once_stop_was_requested(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    # GIVEN a poller whose source refuses every connection, asked to stop during its second read
    source = Unreachable(stop_at=2)
    poller: Poller = (
        StreamPoller(source, "arn", lambda event, context: {}, "test")
        if kind == "stream"
        else QueuePoller(source, "url", lambda event, context: {}, "test")
    )
    source.poller = poller
    caplog.set_level(logging.DEBUG, logger="fedstream.local")

    # WHEN it runs
    poller.start()
    poller.join(timeout=60)

    # THEN the first refusal is an error with its traceback, retried; the one after the stop
    # request ends the thread with a debug line only
    assert not poller.is_alive()
    assert source.reads == 2
    records = [r for r in caplog.records if r.name == "fedstream.local"]
    errors = [r for r in records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [f"{kind} poller error; retrying"]
    assert errors[0].exc_info is not None
    [debug] = [r.getMessage() for r in records if r.levelno == logging.DEBUG]
    assert debug.startswith(f"{kind} poller error after stop was requested: EndpointConnectionError")
