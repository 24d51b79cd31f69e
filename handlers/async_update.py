"""Async mode, DynamoDB stream on the updates table: each batch of updates moves the global model.

The batch is judged, applied and committed as a whole (``fedstream.server.asynchronous``), so there
is no per-record failure to report: a rejected update is a verdict (logged and counted), and an
error fails the invocation, which the stream retries (bisecting the batch, then sending what still
fails to the stream-failures queue); whatever part of it was committed, the retry finds already
processed and changes nothing there.
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.utilities.data_classes.dynamo_db_stream_event import (
    DynamoDBRecord,
    DynamoDBRecordEventName,
)
from aws_lambda_powertools.utilities.typing import LambdaContext
from fedstream.handlers.aggregate import correlation_keys
from fedstream.handlers.observability import MetricUnit, count_rejection, logger, metrics, tracer

from fedstream.registry import default_registry
from fedstream.server import asynchronous
from fedstream.server.asynchronous import Arrival, BatchCommit, Verdict
from fedstream.server.store import store_for
from fedstream.settings import HandlerSettings


def arrivals(event: dict[str, Any]) -> list[Arrival]:
    """The INSERT records of a stream event, with the time the stream took each (epoch seconds)."""
    out = []
    for raw in event.get("Records", []):
        record = DynamoDBRecord(raw)
        if record.event_name != DynamoDBRecordEventName.INSERT or record.dynamodb is None:
            continue
        # Read raw: Powertools truncates it to whole seconds (AWS sends whole seconds anyway).
        written = (raw.get("dynamodb") or {}).get("ApproximateCreationDateTime")
        out.append(Arrival(record.dynamodb.new_image, None if written is None else float(written)))
    return out


def log_verdict(verdict: Verdict) -> None:
    keys = correlation_keys(dict(verdict.arrival.image))
    if verdict.outcome == "rejected":
        assert verdict.reason is not None
        count_rejection(verdict.reason, detail=verdict.detail, **keys)
        return
    metrics.add_metric(name="Staleness", unit=MetricUnit.Count, value=verdict.staleness or 0)
    if verdict.stream_wait is not None:
        metrics.add_metric(name="StreamWaitSeconds", unit=MetricUnit.Seconds, value=verdict.stream_wait)
    logger.info(
        f"update {verdict.outcome}",
        extra={
            **keys,
            "at_version": verdict.version,
            "staleness": verdict.staleness,
            "stream_wait_seconds": verdict.stream_wait,
            "metrics": verdict.metrics,
        },
    )


def log_commit(commit: BatchCommit) -> None:
    if not commit.committed:
        return
    applied = sum(v.outcome == "applied" for v in commit.verdicts)
    metrics.add_metric(name="BatchSize", unit=MetricUnit.Count, value=len(commit.verdicts))
    metrics.add_metric(name="BufferFill", unit=MetricUnit.Count, value=commit.buffered)
    metrics.add_metric(name="AggregationSeconds", unit=MetricUnit.Seconds, value=commit.aggregation_seconds)
    if applied:
        metrics.add_metric(name="UpdateApplied", unit=MetricUnit.Count, value=applied)
    if commit.conflict_retries:
        metrics.add_metric(name="ConflictRetries", unit=MetricUnit.Count, value=commit.conflict_retries)
    logger.info(
        "batch committed",
        extra={
            "run_id": commit.run_id,
            "version": commit.version,
            "published": commit.published,
            "steps": commit.steps,
            "records": len(commit.verdicts),
            "buffered": commit.buffered,
            "conflict_retries": commit.conflict_retries,
            "aggregation_seconds": commit.aggregation_seconds,
            "metrics": commit.metrics,
        },
    )
    if commit.finished:
        logger.info(
            "run finished",
            extra={
                "run_id": commit.run_id,
                "finish_reason": commit.finished,
                "final_version": commit.version,
            },
        )


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    settings = HandlerSettings.from_env()
    result = asynchronous.handle_async_batch(
        store_for(settings), settings, default_registry(), arrivals(event)
    )
    for verdict in result.verdicts:
        log_verdict(verdict)
    for commit in result.commits:
        log_commit(commit)
    return {"batchItemFailures": []}
