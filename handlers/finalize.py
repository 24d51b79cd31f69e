"""Sync mode, finalize queue.

Two kinds of message arrive here, both sent by the state machine only (the queue's policy denies
anyone else): "the round's token" when a round opens (``RoundToken``: recorded on the round, so the
aggregate handler can call back with it; clients never see a token), and "the round's deadline
passed" (close the round with a quorum, or fail it).

A finalize request is acted on only if it carries the id the state machine wrote on the round when
its deadline passed, with the first task token seen with that id
(``fedstream.server.finalize.check_finalize_request``).
Any other request is refused: a warning and an ``UpdatesRejected{reason}`` metric, nothing else.
"""

from __future__ import annotations

from typing import Annotated, Any

import pydantic
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext
from fedstream.handlers.aggregate import emit_round_closed
from fedstream.handlers.observability import count_rejection, logger, metrics, tracer

from fedstream.registry import default_registry
from fedstream.schemas import FinalizeRequest, RoundToken
from fedstream.server import finalize, sync
from fedstream.server.store import store_for
from fedstream.settings import HandlerSettings

processor = BatchProcessor(event_type=EventType.SQS)
_REQUEST = pydantic.TypeAdapter(Annotated[FinalizeRequest | RoundToken, pydantic.Field(discriminator="type")])


@tracer.capture_method
def record_handler(record: SQSRecord) -> None:
    try:
        request = _REQUEST.validate_json(record.body, strict=True)
    except pydantic.ValidationError as exc:
        count_rejection(
            "malformed_request",
            message="finalize request rejected: not a valid request",
            detail=f"{exc.error_count()} validation errors",
        )
        return
    settings = HandlerSettings.from_env()
    logger.append_keys(run_id=request.run_id, round=request.round, version=request.version)
    if isinstance(request, RoundToken):
        recorded = sync.record_round_token(
            store_for(settings), request.run_id, request.round, request.task_token
        )
        logger.info("round token recorded" if recorded else "round token already known")
        return
    try:
        result = finalize.finalize_round(
            store_for(settings),
            settings,
            default_registry(),
            request.run_id,
            request.round,
            request.task_token,
            finalize_id=request.finalize_id,
        )
    except finalize.FinalizeRefused as exc:
        # Neither the id nor the token is logged: both are secrets of the round.
        count_rejection(exc.reason, message="finalize request refused", detail=str(exc))
        return
    if result.closed is not None:
        emit_round_closed(result.closed)
    elif result.outcome == "quorum_not_reached":
        logger.error(
            "round failed at its deadline", extra={"reason": "quorum_not_reached", "detail": result.message}
        )
    else:
        logger.info("finalize request answered", extra={"outcome": result.outcome})


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return process_partial_response(
        event=event, record_handler=record_handler, processor=processor, context=context
    )
