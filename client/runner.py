"""The FL client loop: poll the client's own queue, train on each new global model, report.

For every "global model ready" message: download the model and verify its sha256, train locally,
upload the update under the client's own prefix, put the record with a condition (a retry never
double-counts), and only then delete the message. Visibility is extended while training. On
"training complete" the loop exits 0. SIGTERM lets the current step finish (or abandons a training
step before its upload, leaving the message to be redelivered) and exits.

In async mode a client has one update in flight: after reporting it holds the newest "model
ready" it hears of, without training, until a message names its update as consumed (applied,
buffered or rejected). If that word never comes (a lost message), it trains on the newest version
it holds after ``ack_timeout_seconds``.

A client takes part in one run: the one its settings name, or else the newest on its queue (by
the time SQS received its messages). Messages of other runs (left on a queue by an earlier run)
are deleted unread. A following client (``follow=True``, ``fedstream client --follow``: a site's
long-running service) does not exit when its run ends: it waits for the next run and takes part
in it. It also moves on when a run it is in goes quiet and a newer one starts, so a sync run the
operator stopped (which cannot tell clients) does not hold it.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import boto3
import pydantic
from botocore.config import Config
from botocore.exceptions import ClientError

from fedstream import keys
from fedstream.schemas import Message, ModelReady, TrainingComplete, TrainingMetrics, UpdateRecord
from fedstream.settings import ClientSettings
from fedstream.weights import ModelSpec, Weights, WireFormatError, decode, encode, sha256_hex

log = logging.getLogger("fedstream.client")
_MESSAGE = pydantic.TypeAdapter(Message)
UPDATE_TAG = "fedstream%3Aobject=update"
RECEIVE_BATCH = 10  # SQS's maximum per receive
MAX_DRAINED = 200  # messages read before acting on them, when the queue has a backlog


def _sent_ms(message: dict[str, Any]) -> int:
    """When SQS received the message (epoch ms; 0 if the queue did not say)."""
    try:
        return int(message.get("Attributes", {}).get("SentTimestamp", 0))
    except (TypeError, ValueError):
        return 0


class Stopped(Exception):
    """SIGTERM arrived while training: the message stays on the queue for redelivery."""


@dataclass
class ClientStats:
    trained: int = 0
    skipped: int = 0
    rejected_messages: int = 0
    last_version: int = -1
    ack_timeouts: int = 0
    failed_steps: int = 0  # training produced weights or metrics that could not be sent
    runs: int = 0  # runs taken part in (trained at least once)


@dataclass(frozen=True)
class InFlight:
    """The client's async update that the server has not named as consumed yet."""

    run_id: str
    ref: str  # "{client_id}#{base_version}", as the server names it
    since: float  # time.monotonic() when it was reported


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def default_session(region: str, endpoint_url: str | None = None) -> boto3.Session:
    """The standard credential chain; for the embedded AWS on this machine (``fedstream local
    --serve``), which takes any key, placeholder keys when the chain has none."""
    from urllib.parse import urlparse

    session = boto3.Session(region_name=region)
    on_loopback = endpoint_url and urlparse(endpoint_url).hostname in LOOPBACK
    if on_loopback and session.get_credentials() is None:
        return boto3.Session(
            region_name=region,
            aws_access_key_id="embedded",
            aws_secret_access_key="embedded",  # noqa: S106 - the embedded AWS takes any key
        )
    return session


class FederatedClient:
    def __init__(
        self,
        settings: ClientSettings,
        trainer: Any,
        session: boto3.Session | None = None,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        follow: bool = False,
    ) -> None:
        self.settings = settings
        self.follow = follow
        self.trainer = trainer
        session = session or default_session(settings.region, settings.endpoint_url)
        config = Config(retries={"mode": "standard", "max_attempts": 5})
        kwargs = {"endpoint_url": settings.endpoint_url, "config": config, "region_name": settings.region}
        self.sqs = session.client("sqs", **kwargs)
        self.s3 = session.client("s3", **kwargs)
        self.table = session.resource("dynamodb", **kwargs).Table(settings.updates_table)
        self.stop = threading.Event()
        self.stats = ClientStats()
        self.on_event = on_event or (lambda event, fields: None)
        self._spec: ModelSpec | None = None
        self.in_flight: InFlight | None = None
        self.run_id: str | None = settings.run_id
        self._run_heard_ms = 0  # SQS SentTimestamp of the newest message of run_id handled
        # The newest "model ready" heard while an update was in flight (not deleted: if this process
        # dies, the queue delivers it again).
        self._held: tuple[dict[str, Any], ModelReady] | None = None

    # ---- the loop ---------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        def handler(signum: int, frame: Any) -> None:
            log.info("signal %s: stopping after the current step", signum)
            self.stop.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def run(self, max_idle_seconds: float | None = None) -> int:
        if self._spec is None:
            self._spec = ModelSpec.of(self.trainer.initial_weights())
        self.on_event("ready", {})
        idle_since = time.monotonic()
        while not self.stop.is_set():
            messages = self._receive(self.settings.wait_seconds)
            if len(messages) == RECEIVE_BATCH:
                # A full batch: more are waiting. Read them all, so training starts from the newest
                # version on the queue rather than from the oldest ten (async mode publishes often).
                while len(messages) < MAX_DRAINED and len(batch := self._receive(0)) > 0:
                    messages += batch
            if not messages and self._held is not None and not self._waiting_for_release():
                done = self._handle_batch([])  # the wait for a release timed out: train on the held version
                if done is not None:
                    return done
                idle_since = time.monotonic()
                continue
            if not messages:
                if max_idle_seconds is not None and time.monotonic() - idle_since > max_idle_seconds:
                    log.warning("no message for %.0f s; giving up", max_idle_seconds)
                    return 3
                continue
            done = self._handle_batch(messages)
            if done is not None:
                return done
            idle_since = time.monotonic()  # idle from the end of this step, however long it took
        return 0

    def _receive(self, wait_seconds: int) -> list[dict[str, Any]]:
        return self.sqs.receive_message(
            QueueUrl=self.settings.queue_url,
            MaxNumberOfMessages=RECEIVE_BATCH,
            WaitTimeSeconds=wait_seconds,
            VisibilityTimeout=self.settings.visibility_timeout,
            AttributeNames=["SentTimestamp"],
        ).get("Messages", [])

    def _handle_batch(self, messages: list[dict[str, Any]]) -> int | None:
        parsed: list[tuple[dict[str, Any], ModelReady | TrainingComplete]] = []
        done_with: list[dict[str, Any]] = []
        for message in messages:
            try:
                parsed.append((message, _MESSAGE.validate_json(message["Body"], strict=True)))
            except pydantic.ValidationError as exc:
                self.stats.rejected_messages += 1
                log.error("message rejected: not a fedstream message (%d errors)", exc.error_count())
                done_with.append(message)
        run_id = self._run_of(parsed)
        if run_id is not None:  # another run's message (left over on the queue): not ours
            done_with += [m for m, p in parsed if p.run_id != run_id]
            self.stats.skipped += sum(p.run_id != run_id for _, p in parsed)
            parsed = [(m, p) for m, p in parsed if p.run_id == run_id]
        if parsed and run_id == self.run_id:
            self._run_heard_ms = max(self._run_heard_ms, *(_sent_ms(m) for m, _ in parsed))
        complete = [(m, p) for m, p in parsed if isinstance(p, TrainingComplete)]
        if complete:
            held = [self._held[0]] if self._held is not None else []
            self._held = None
            self._delete_all(done_with + held + [message for message, _ in parsed])
            _, body = complete[0]
            self.on_event(
                "complete",
                {"run_id": body.run_id, "reason": body.reason, "final_version": body.final_version},
            )
            log.info("run %s complete (%s)", body.run_id, body.reason)
            if not self.follow:
                return 0 if body.reason == "done" else 4
            self._leave_run()
            return None
        ready = [(m, p) for m, p in parsed if isinstance(p, ModelReady)]
        for _, body in ready:
            self._note_consumed(body)
        if self._held is not None:  # a copy received just now (same version) wins: its receipt is valid
            ready.insert(0, self._held)
            self._held = None
        if not ready:
            self._delete_all(done_with)
            return None
        newest = max(range(len(ready)), key=lambda i: (ready[i][1].version, i))
        keep = ready[newest][0]["MessageId"]
        for index, (message, _) in enumerate(ready):
            if index != newest and message["MessageId"] != keep:  # a newer version supersedes it
                self.stats.skipped += 1
                done_with.append(message)
        self._delete_all(done_with)
        message, body = ready[newest]
        if body.version <= self.stats.last_version:
            self.stats.skipped += 1
            self._delete(message)
            return None
        if self._waiting_for_release():
            self._held = (message, body)
            return None
        try:
            self._train_and_report(message, body)
        except Stopped:
            return 0
        return None

    def _run_of(self, parsed: list[tuple[dict[str, Any], ModelReady | TrainingComplete]]) -> str | None:
        """The run whose messages this batch acts on; the others' are left-overs.

        Before the client is in a run: the run of the message SQS received last. In a run: that run,
        unless the client follows runs and another run's "model ready" was sent after everything it
        heard of its own (the operator started a new run; the old one ended or was stopped).
        """
        if self.run_id is None:
            if not parsed:
                return None
            return max(enumerate(parsed), key=lambda ip: (_sent_ms(ip[1][0]), ip[0]))[1][1].run_id
        if self.follow and self.settings.run_id is None:
            newer = [
                (_sent_ms(m), p.run_id)
                for m, p in parsed
                if p.run_id != self.run_id and isinstance(p, ModelReady) and _sent_ms(m) > self._run_heard_ms
            ]
            if newer:
                moved_to = max(newer)[1]
                log.warning("run %s started after run %s went quiet: moving to it", moved_to, self.run_id)
                self.on_event("left", {"run_id": self.run_id, "for": moved_to})
                self._leave_run()
                return moved_to
        return self.run_id

    def _leave_run(self) -> None:
        """Forget the run this client was in, so that it takes part in the next one."""
        if self._held is not None:
            self._delete(self._held[0])
        self.run_id = self.settings.run_id
        self._run_heard_ms = 0
        self._held = None
        self.in_flight = None
        self.stats.last_version = -1

    def _note_consumed(self, body: ModelReady) -> None:
        flight = self.in_flight
        if flight is not None and body.run_id == flight.run_id and flight.ref in body.consumed:
            self.in_flight = None
            self.on_event("released", {"ref": flight.ref, "version": body.version})

    def _waiting_for_release(self) -> bool:
        flight = self.in_flight
        if flight is None:
            return False
        waited = time.monotonic() - flight.since
        if waited < self.settings.ack_timeout_seconds:
            return True
        log.warning("update %s not named as consumed after %.0f s; training again", flight.ref, waited)
        self.stats.ack_timeouts += 1
        self.in_flight = None
        self.on_event("ack_timeout", {"ref": flight.ref})
        return False

    # ---- one step ---------------------------------------------------------------------------
    def _train_and_report(self, message: dict[str, Any], body: ModelReady) -> None:
        if self.run_id != body.run_id:
            self.stats.runs += 1
            log.info("taking part in run %s", body.run_id)
        self.run_id = body.run_id
        self._run_heard_ms = max(self._run_heard_ms, _sent_ms(message))
        global_weights = self._download_global(body)
        if global_weights is None:
            self._delete(message)
            return
        self.on_event(
            "training", {"version": body.version, "round": body.round, "settings": dict(body.client_settings)}
        )
        result = self._train_with_heartbeat(message, global_weights, body)
        if self.stop.is_set():
            raise Stopped
        try:
            data = encode(
                result.weights,
                {
                    "run_id": body.run_id,
                    "client_id": self.settings.client_id,
                    "base_version": str(body.version),
                    "creator": "fedstream.client",
                },
            )
            metrics = TrainingMetrics(**result.metrics)
        except (WireFormatError, pydantic.ValidationError) as exc:
            # A global model that training cannot handle (it diverged to NaN or Inf): skip this
            # version and wait for the next, never crash-loop on a redelivered message.
            self._failed_step(message, body, exc)
            return
        key = keys.update_key(body.run_id, self.settings.client_id, body.version, uuid.uuid4().hex[:12])
        # The tag lets the bucket lifecycle expire old updates (S3 lifecycle cannot match runs/*/updates/).
        self.s3.put_object(Bucket=self.settings.bucket, Key=key, Body=data, Tagging=UPDATE_TAG)
        record = UpdateRecord.create(
            client_id=self.settings.client_id,
            run_id=body.run_id,
            base_version=body.version,
            round=body.round,
            object_key=key,
            sha256=sha256_hex(data),
            num_examples=result.num_examples,
            metrics=metrics,
        )
        self._put_record(record)
        self._delete(message)
        self.stats.trained += 1
        self.stats.last_version = body.version
        if body.round is None:  # async: wait until the server names this update as consumed
            ref = f"{self.settings.client_id}#{body.version}"
            self.in_flight = InFlight(body.run_id, ref, time.monotonic())
        self.on_event("reported", {"version": body.version, "round": body.round, **result.metrics})

    def _failed_step(self, message: dict[str, Any], body: ModelReady, exc: Exception) -> None:
        reason = exc.reason if isinstance(exc, WireFormatError) else "invalid_metrics"
        log.error("training on version %s failed (%s): %s; version skipped", body.version, reason, exc)
        self.stats.failed_steps += 1
        self.stats.last_version = body.version
        self._delete(message)
        self.on_event("failed_step", {"version": body.version, "round": body.round, "reason": reason})

    def _download_global(self, body: ModelReady) -> Weights | None:
        try:
            data = self.s3.get_object(Bucket=self.settings.bucket, Key=body.object_key)["Body"].read()
            if self._spec is None:
                self._spec = ModelSpec.of(self.trainer.initial_weights())
            weights, _ = decode(
                data, self._spec, max_bytes=self.settings.max_model_bytes, expected_sha256=body.sha256
            )
        except WireFormatError as exc:
            self.stats.rejected_messages += 1
            log.error("global model %s rejected: %s (%s)", body.object_key, exc, exc.reason)
            return None
        except ClientError as exc:
            log.error("global model %s unavailable: %s", body.object_key, exc)
            return None
        return weights

    def _train_with_heartbeat(self, message: dict[str, Any], weights: Weights, body: ModelReady) -> Any:
        done = threading.Event()
        interval = max(1.0, self.settings.visibility_timeout / 3)

        def heartbeat() -> None:
            while not done.wait(interval):
                try:
                    self.sqs.change_message_visibility(
                        QueueUrl=self.settings.queue_url,
                        ReceiptHandle=message["ReceiptHandle"],
                        VisibilityTimeout=self.settings.visibility_timeout,
                    )
                except ClientError as exc:
                    log.warning("could not extend visibility: %s", exc)

        beat = threading.Thread(target=heartbeat, daemon=True)
        beat.start()
        try:
            return self.trainer.fit(weights, dict(body.client_settings))
        finally:
            done.set()
            beat.join()

    def _put_record(self, record: UpdateRecord) -> None:
        item = json.loads(record.model_dump_json(exclude_none=True), parse_float=Decimal)
        try:
            self.table.put_item(Item=item, ConditionExpression="attribute_not_exists(client_id)")
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
                raise
            log.info("record for version %s already written; not counted twice", record.base_version)

    def _delete_all(self, messages: list[dict[str, Any]]) -> None:
        for start in range(0, len(messages), RECEIVE_BATCH):
            batch = messages[start : start + RECEIVE_BATCH]
            entries = [{"Id": str(n), "ReceiptHandle": m["ReceiptHandle"]} for n, m in enumerate(batch)]
            failed = self.sqs.delete_message_batch(QueueUrl=self.settings.queue_url, Entries=entries).get(
                "Failed", []
            )
            for failure in failed:  # the message comes back after its visibility timeout; harmless
                log.warning("could not delete a superseded message: %s", failure.get("Message"))

    def _delete(self, message: dict[str, Any]) -> None:
        self.sqs.delete_message(QueueUrl=self.settings.queue_url, ReceiptHandle=message["ReceiptHandle"])
