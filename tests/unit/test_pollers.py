"""The local event-source pollers behave like Lambda's event source mappings."""

from __future__ import annotations

import time
from typing import Any

from fedstream.local.pollers import StreamPoller


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


def run_until(poller: StreamPoller, done: Any, timeout: float = 10.0) -> None:
    poller.start()
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        time.sleep(0.02)
    poller.stop()
    poller.join(timeout=5)


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
