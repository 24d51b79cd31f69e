"""Event-source pollers: deliver Lambda-shaped events to the real handlers, in process.

They do what Lambda's event source mappings do: batch records, honour ``batchItemFailures`` by
retrying from the first failed record (streams) or leaving failed messages on the queue (SQS),
and send a record that keeps failing to a dead-letter list after ``max_retries``.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

log = logging.getLogger("fedstream.local")
Handler = Callable[[dict[str, Any], Any], dict[str, Any]]

# One Lambda container runs one invocation at a time; the in-process runtime does the same.
INVOKE_LOCK = threading.Lock()
SHARD_LIST_SECONDS = 10.0  # how often the stream's shards are listed again


@dataclass
class FakeLambdaContext:
    function_name: str
    memory_limit_in_mb: int = 1024
    timeout_seconds: float = 900.0
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    invoked_function_arn: str = ""
    log_group_name: str = ""
    log_stream_name: str = "local"
    _started: float = field(default_factory=time.monotonic)

    def get_remaining_time_in_millis(self) -> int:
        return int(max(0.0, self.timeout_seconds - (time.monotonic() - self._started)) * 1000)


def invoke(handler: Handler, event: dict[str, Any], function_name: str) -> dict[str, Any]:
    with INVOKE_LOCK:
        return handler(event, FakeLambdaContext(function_name=function_name)) or {}


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _is_connection_error(exc: BaseException) -> bool:
    """The embedded AWS could not be reached (refused, reset, closed), after botocore's retries."""
    from botocore import exceptions

    return isinstance(exc, exceptions.ConnectionError | exceptions.HTTPClientError | ConnectionError)


class Poller(threading.Thread):
    def __init__(self, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self._stop_event = threading.Event()
        self.invocations = 0
        self.failures = 0
        self.found_empty_at = 0.0  # when a read last found nothing to deliver
        self.dead_letters: list[dict[str, Any]] = []
        self.delivered = 0
        self.redelivered = 0

    def stats(self) -> dict[str, int]:
        """Invocations, failed invocations, records delivered and records sent to the dead letters."""
        return {
            "invocations": self.invocations,
            "failed_invocations": self.failures,
            "records": self.delivered,
            "dead_letters": len(self.dead_letters),
            "redelivered": self.redelivered,
        }

    def stop(self, timeout: float = 30.0) -> None:
        """Stop polling and wait for the current call to end.

        Every wait in the loop is on the stop event, and a queue's long poll is 1 s, so the thread
        ends as soon as the call in progress (a read, or a handler invocation) returns. Idempotent.
        """
        self._stop_event.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)

    def _failed(self, message: str, exc: BaseException) -> bool:
        """Log a failed poll and say whether to retry: not once a stop was requested.

        After a stop the embedded AWS may be going away: a refused connection then is expected,
        not an error worth a traceback in the run's (or a later test's) output.
        """
        if self._quiet_after_stop(message, exc):
            return False
        log.exception("%s; retrying", message)
        self._stop_event.wait(0.5)
        return not self._stop_event.is_set()

    def _quiet_after_stop(self, message: str, exc: BaseException) -> bool:
        """True (and a debug line) for a connection error after a stop was requested."""
        if not (self._stop_event.is_set() and _is_connection_error(exc)):
            return False
        log.debug("%s after stop was requested: %r", message, exc)
        return True

    def drain(self, timeout: float = 30.0) -> None:
        """Wait until the source is found empty after this call began (or ``timeout`` passed).

        Once the producers have stopped, that means every record in it was delivered.
        """
        began = time.monotonic()
        while time.monotonic() - began < timeout and self.found_empty_at <= began and self.is_alive():
            time.sleep(0.05)


class StreamPoller(Poller):
    """DynamoDB stream -> handler, with partial-batch failures and bisect-free retry."""

    def __init__(
        self,
        streams: Any,
        stream_arn: str,
        handler: Handler,
        function_name: str,
        *,
        batch_size: int = 10,
        max_retries: int = 3,
        idle_sleep: float = 0.1,
        dead_letter: Callable[[dict[str, Any]], None] | None = None,
        redeliver_batches: int = 0,
    ) -> None:
        super().__init__(f"stream-poller-{function_name}")
        # Fault injection: each of the first N batches read is delivered twice, as a stream may.
        self.redeliver_batches = redeliver_batches
        self._shards: list[dict[str, Any]] = []
        self._shards_listed_at = -SHARD_LIST_SECONDS
        self.dead_letter = dead_letter
        self.streams, self.stream_arn, self.handler = streams, stream_arn, handler
        self.function_name, self.batch_size, self.max_retries = function_name, batch_size, max_retries
        self.idle_sleep = idle_sleep

    def run(self) -> None:
        iterators: dict[str, str | None] = {}
        pending: list[dict[str, Any]] = []
        while not self._stop_event.is_set():
            try:
                if not pending:
                    pending = self._read(iterators)
                if not pending:
                    self.found_empty_at = time.monotonic()
                    self._stop_event.wait(self.idle_sleep)
                    continue
                pending = self._deliver(pending)
            except Exception as exc:
                if not self._failed("stream poller error", exc):
                    break

    def _read(self, iterators: dict[str, str | None]) -> list[dict[str, Any]]:
        if time.monotonic() - self._shards_listed_at > SHARD_LIST_SECONDS:  # as Lambda, not every poll
            description = self.streams.describe_stream(StreamArn=self.stream_arn)["StreamDescription"]
            self._shards = description["Shards"]
            self._shards_listed_at = time.monotonic()
        for shard in self._shards:
            if shard["ShardId"] not in iterators:
                iterators[shard["ShardId"]] = self.streams.get_shard_iterator(
                    StreamArn=self.stream_arn, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON"
                )["ShardIterator"]
        records: list[dict[str, Any]] = []
        for shard_id, iterator in iterators.items():
            if iterator is None:
                continue
            response = self.streams.get_records(ShardIterator=iterator, Limit=self.batch_size)
            iterators[shard_id] = response.get("NextShardIterator")
            records += [self._lambda_record(r) for r in response.get("Records", [])]
        if records and self.redeliver_batches > 0:
            self.redeliver_batches -= 1
            self.redelivered += len(records)
            records += [dict(r) for r in records]
        return records

    def _lambda_record(self, record: dict[str, Any]) -> dict[str, Any]:
        out = _jsonable(dict(record))
        out["eventSourceARN"] = self.stream_arn
        out.setdefault("eventSource", "aws:dynamodb")
        out.setdefault("awsRegion", "us-east-1")
        return out

    def _deliver(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Invoke until the batch succeeds; returns records still to deliver (the rest of a split)."""
        attempts = 0
        records = batch[: self.batch_size]
        rest = batch[self.batch_size :]
        while records and not self._stop_event.is_set():
            try:
                response = invoke(self.handler, {"Records": records}, self.function_name)
                failed = [f["itemIdentifier"] for f in response.get("batchItemFailures", [])]
            except Exception as exc:
                if self._quiet_after_stop(f"handler {self.function_name}", exc):
                    return batch  # undelivered, as when a poller stops between reads
                log.exception("handler %s raised; the whole batch is retried", self.function_name)
                failed = [records[0]["dynamodb"]["SequenceNumber"]]
            self.invocations += 1
            if not failed:
                self.delivered += len(records)
                return rest
            self.failures += 1
            first = min(i for i, r in enumerate(records) if r["dynamodb"]["SequenceNumber"] in set(failed))
            self.delivered += first
            records = records[first:]
            attempts += 1
            if attempts > self.max_retries:
                self.dead_letters.append(records[0])
                if self.dead_letter is not None:
                    self.dead_letter(records[0])
                log.error("record %s sent to the dead-letter queue", records[0].get("eventID"))
                records, attempts = records[1:], 0
            else:
                self._stop_event.wait(min(2.0, 0.1 * 2**attempts))
        return rest


class QueuePoller(Poller):
    """SQS queue -> handler; failed messages stay on the queue and come back after visibility."""

    def __init__(
        self, sqs: Any, queue_url: str, handler: Handler, function_name: str, *, batch_size: int = 10
    ):
        super().__init__(f"queue-poller-{function_name}")
        self.sqs, self.queue_url, self.handler = sqs, queue_url, handler
        self.function_name, self.batch_size = function_name, batch_size
        self.queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])[
            "Attributes"
        ]["QueueArn"]

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                messages = self.sqs.receive_message(
                    QueueUrl=self.queue_url,
                    MaxNumberOfMessages=self.batch_size,
                    WaitTimeSeconds=1,
                    AttributeNames=["All"],
                ).get("Messages", [])
                if messages:
                    self._deliver(messages)
                else:
                    self.found_empty_at = time.monotonic()
            except Exception as exc:
                if not self._failed("queue poller error", exc):
                    break

    def _deliver(self, messages: list[dict[str, Any]]) -> None:
        records = [
            {
                "messageId": m["MessageId"],
                "receiptHandle": m["ReceiptHandle"],
                "body": m["Body"],
                "attributes": m.get("Attributes", {}),
                "messageAttributes": {},
                "md5OfBody": m.get("MD5OfBody", ""),
                "eventSource": "aws:sqs",
                "eventSourceARN": self.queue_arn,
                "awsRegion": "us-east-1",
            }
            for m in messages
        ]
        try:
            response = invoke(self.handler, {"Records": records}, self.function_name)
            failed = {f["itemIdentifier"] for f in response.get("batchItemFailures", [])}
        except Exception as exc:
            if self._quiet_after_stop(f"handler {self.function_name}", exc):
                return  # the messages come back after their visibility timeout
            log.exception("handler %s raised; every message is retried", self.function_name)
            failed = {r["messageId"] for r in records}
        self.invocations += 1
        self.failures += bool(failed)
        self.delivered += len(records) - len(failed)
        for record in records:
            if record["messageId"] not in failed:
                self.sqs.delete_message(QueueUrl=self.queue_url, ReceiptHandle=record["receiptHandle"])
