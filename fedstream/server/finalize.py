"""Sync mode's deadline path: the finalize request the state machine sends when a round's time is
up closes the round with the quorum it has, or fails it with a clear error.

The request is acted on only if it carries the id the state machine wrote on the round when the
deadline passed, after that deadline, with the first task token seen with that id
(``check_finalize_request``); anything else is ``FinalizeRefused`` and changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fedstream.registry import AggregatorRegistry
from fedstream.server.records import Rejected
from fedstream.server.store import ConditionFailed, Repository
from fedstream.server.sync import RoundClosed, _now, close_round, deliver_round_result
from fedstream.settings import HandlerSettings


@dataclass
class Finalized:
    outcome: str  # "closed", "already_closed", "quorum_not_reached", "failed"
    closed: RoundClosed | None = None
    message: str = ""


class RoundBusy(Exception):
    """Another invocation is aggregating the round; the finalize request is retried later."""


def finalize_round(
    store: Repository,
    settings: HandlerSettings,
    registry: AggregatorRegistry,
    run_id: str,
    round_number: int,
    token: str,
    *,
    finalize_id: str,
) -> Finalized:
    """The deadline path: close with the quorum there is, or fail the round with a clear error.

    Only for the state machine's own request, after the round's deadline (``check_finalize_request``):
    anything else raises ``FinalizeRefused`` before the round or any task token is touched.
    """
    item = check_finalize_request(store, run_id, round_number, token, finalize_id)
    status = item["status"]
    if status == "closed":
        deliver_round_result(store, run_id, round_number, finalize_token=token)
        return Finalized("already_closed")
    if status == "failed":
        store.send_task_failure(token, "RoundFailed", str(item.get("failure", "round failed")))
        return Finalized("failed", message=str(item.get("failure", "")))
    reported = int(item.get("reported_count", 0))
    min_clients = int(item.get("min_clients", settings.min_clients))
    if status in ("open", "aggregating") and reported >= min_clients:  # a stale claim is taken over
        closed = close_round(
            store,
            settings,
            registry,
            run_id,
            round_number,
            min_reports=min_clients,
            callback_token=token,
            at_deadline=True,
        )
        if closed is not None:
            return Finalized("closed", closed)
    if status == "open" and reported < min_clients:
        message = (
            f"round {round_number} reached its deadline with {reported} of the {min_clients} "
            f"reports required (min_clients={min_clients})"
        )
        try:
            store.fail_round(run_id, round_number, message, below_quorum=min_clients)
        except ConditionFailed:
            raise RoundBusy(f"round {round_number} changed while finalizing; retrying") from None
        store.send_task_failure(token, "QuorumNotReached", message)
        return Finalized("quorum_not_reached", message=message)
    raise RoundBusy(f"round {round_number} is {status}; the finalize request will be retried")


# The handler's clock may trail the state machine's by this much: a genuine request arrives after
# its deadline by the state machine's clock, and a refused one is dropped, failing the run.
DEADLINE_CLOCK_SKEW_SECONDS = 2.0


class FinalizeRefused(Rejected):
    """A finalize request that is not the state machine's own, after the round's deadline.

    Logged with ``reason`` and counted, never retried, and nothing else happens: the round is not
    touched and no task token is answered.
    """


def round_deadline(item: Mapping[str, Any]) -> datetime | None:
    """When the round's deadline passes: ``opened_at`` + ``round_timeout``, both written by the
    state machine's ``OpenRound`` (None on a round item without them)."""
    opened, timeout = item.get("opened_at"), item.get("round_timeout")
    if not opened or timeout is None:
        return None
    try:
        opened_at = datetime.fromisoformat(str(opened).replace("Z", "+00:00"))
        seconds = float(timeout)
    except (TypeError, ValueError):
        return None
    if opened_at.tzinfo is None or not math.isfinite(seconds):
        return None
    return datetime.fromtimestamp(opened_at.timestamp() + seconds, UTC)


def check_finalize_request(
    store: Repository, run_id: str, round_number: int, token: str, finalize_id: str
) -> dict[str, Any]:
    """The round item, if the request is the state machine's ``FinalizeRound`` for this round.

    Everything compared here was written by the state machine alone, on the run table (which no
    client can read or write): ``opened_at`` and ``round_timeout`` when it opened the round, and
    ``finalize_id`` (a fresh random id) once the round's wait timed out (``MarkDeadline``), just
    before it sent this id with its finalize token to the queue. So a request must

    1. name a round that exists (``finalize_unknown_round``);
    2. come after the round's deadline: the state machine marked it, and the deadline has passed by
       this clock too (``before_deadline``);
    3. carry the round's own ``finalize_id`` (``finalize_id_mismatch``): a request for another round
       or run, or made up by anyone who can reach the queue, does not have it;
    4. carry the first task token ever presented with that id, which is then pinned on the round
       (``finalize_token_mismatch``), so even a leaked id cannot direct a callback elsewhere.

    Id and token are checked by one conditional write, so two requests cannot both pin a token.
    """
    item = store.round_item(run_id, round_number)
    if item is None:
        raise FinalizeRefused(
            "finalize_unknown_round", f"round {round_number} of run {run_id} does not exist"
        )
    if not item.get("finalize_id"):
        raise FinalizeRefused(
            "before_deadline", f"the state machine has not marked the deadline of round {round_number}"
        )
    deadline = round_deadline(item)
    if deadline is None:
        raise FinalizeRefused("before_deadline", f"round {round_number} has no deadline on record")
    early = deadline.timestamp() - _now().timestamp()
    if early > DEADLINE_CLOCK_SKEW_SECONDS:
        raise FinalizeRefused(
            "before_deadline",
            f"round {round_number}'s deadline is {early:.0f} s away ({deadline.isoformat()})",
        )
    try:
        return store.pin_finalize_token(run_id, round_number, finalize_id, token)
    except ConditionFailed:
        current = store.round_item(run_id, round_number) or {}
        if current.get("finalize_id") != finalize_id:
            raise FinalizeRefused(
                "finalize_id_mismatch", f"the request does not carry round {round_number}'s finalize id"
            ) from None
        raise FinalizeRefused(
            "finalize_token_mismatch",
            f"round {round_number}'s finalize request came with another task token first",
        ) from None
