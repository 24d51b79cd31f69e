"""Async mode, DynamoDB stream on the updates table: every update moves the global model."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes.dynamo_db_stream_event import (
    DynamoDBRecord,
    DynamoDBRecordEventName,
)
from aws_lambda_powertools.utilities.typing import LambdaContext

from fedstream.registry import default_registry
from fedstream.server import asynchronous
from fedstream.server.store import store_for
from fedstream.server.sync import Rejected
from fedstream.settings import HandlerSettings
from handlers.aggregate import correlation_keys
from handlers.observability import MetricUnit, count_rejection, logger, metrics, tracer

processor = BatchProcessor(event_type=EventType.DynamoDBStreams)


@tracer.capture_method
def record_handler(record: DynamoDBRecord) -> None:
    if record.event_name != DynamoDBRecordEventName.INSERT or record.dynamodb is None:
        return
    image: dict[str, Any] = record.dynamodb.new_image
    logger.append_keys(**correlation_keys(image))
    settings = HandlerSettings.from_env()
    try:
        outcome = asynchronous.handle_async_record(store_for(settings), settings, default_registry(), image)
    except Rejected as rejected:
        count_rejection(rejected.reason, detail=str(rejected))
        return
    metrics.add_metric(name="Staleness", unit=MetricUnit.Count, value=outcome.staleness)
    if outcome.conflict_retries:
        metrics.add_metric(name="ConflictRetries", unit=MetricUnit.Count, value=outcome.conflict_retries)
    if outcome.outcome == "applied":
        metrics.add_metric(name="UpdateApplied", unit=MetricUnit.Count, value=1)
        if outcome.lag_seconds is not None:
            metrics.add_metric(name="VersionLagSeconds", unit=MetricUnit.Seconds, value=outcome.lag_seconds)
    if "buffer_fill" in outcome.metrics:
        metrics.add_metric(name="BufferFill", unit=MetricUnit.Count, value=outcome.metrics["buffer_fill"])
    logger.info(
        f"update {outcome.outcome}",
        extra={
            "new_version": outcome.version,
            "staleness": outcome.staleness,
            "conflict_retries": outcome.conflict_retries,
            "metrics": outcome.metrics,
        },
    )
    if outcome.finished:
        logger.info(
            "run finished", extra={"finish_reason": outcome.finished, "final_version": outcome.version}
        )


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return process_partial_response(
        event=event, record_handler=record_handler, processor=processor, context=context
    )
