"""Sync mode, DynamoDB stream on the updates table: register reports, aggregate complete rounds."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes.dynamo_db_stream_event import (
    DynamoDBRecord,
    DynamoDBRecordEventName,
)
from aws_lambda_powertools.utilities.typing import LambdaContext
from fedstream.handlers.observability import MetricUnit, count_rejection, logger, metrics, tracer

from fedstream.errors import Refused
from fedstream.registry import default_registry
from fedstream.server import sync
from fedstream.server.store import store_for
from fedstream.settings import HandlerSettings

processor = BatchProcessor(event_type=EventType.DynamoDBStreams)


def emit_round_closed(closed: sync.RoundClosed) -> None:
    metrics.add_metric(name="RoundCompleted", unit=MetricUnit.Count, value=1)
    metrics.add_metric(name="ClientsReported", unit=MetricUnit.Count, value=len(closed.clients))
    metrics.add_metric(name="AggregationSeconds", unit=MetricUnit.Seconds, value=closed.aggregation_seconds)
    metrics.add_metric(name="ModelBytes", unit=MetricUnit.Bytes, value=closed.model_bytes)
    if closed.duration_seconds is not None:
        metrics.add_metric(
            name="RoundDurationSeconds", unit=MetricUnit.Seconds, value=closed.duration_seconds
        )
    if "epsilon" in closed.metrics:
        metrics.add_metric(name="Epsilon", unit=MetricUnit.Count, value=closed.metrics["epsilon"])
    for client_id, reason in closed.skipped.items():
        count_rejection(
            reason,
            client_id=client_id,
            round=closed.round,
            detail=closed.skipped_why.get(client_id, ""),
        )
    logger.info(
        "round closed at its deadline" if closed.at_deadline else "round closed",
        extra={
            "round": closed.round,
            "version": closed.version,
            "clients": closed.clients,
            "metrics": closed.metrics,
            "aggregation_seconds": round(closed.aggregation_seconds, 4),
            "callback_delivered": closed.callback_delivered,
        },
    )


def _as_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def correlation_keys(image: dict[str, Any]) -> dict[str, Any]:
    """The log correlation keys of an update record (before it is validated)."""
    return {
        "run_id": image.get("run_id"),
        "client_id": image.get("client_id"),
        "round": _as_int(image.get("round")),
        "version": _as_int(image.get("base_version")),
    }


def log_registered(registered: sync.Registered) -> None:
    logger.info(
        "update registered",
        extra={"reported": registered.reported_count, "required": registered.required},
    )


@tracer.capture_method
def record_handler(record: DynamoDBRecord) -> None:
    if record.event_name != DynamoDBRecordEventName.INSERT or record.dynamodb is None:
        return
    image: dict[str, Any] = record.dynamodb.new_image
    logger.append_keys(**correlation_keys(image))
    settings = HandlerSettings.from_env()
    try:
        _, closed = sync.handle_sync_record(
            store_for(settings), settings, default_registry(), image, on_registered=log_registered
        )
    except Refused as refused:
        # The record's refusal, or the round's failure (an ``AggregationError`` the close raised
        # after failing the round): logged and counted with its reason, never retried.
        count_rejection(refused.reason, detail=str(refused))
        return
    if closed is not None:
        emit_round_closed(closed)


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return process_partial_response(
        event=event, record_handler=record_handler, processor=processor, context=context
    )
