"""Records, messages and run state that cross a boundary, as pydantic models.

What a client or a queue sends is parsed into one of these models at the edge (strict: no
coercion, unknown fields refused) before the domain logic sees it. Items the server wrote itself
(round items, the run state) are read back as plain dicts in ``fedstream.server``.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

IDENTIFIER = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
Identifier = Annotated[str, Field(pattern=IDENTIFIER)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
MAX_EXAMPLES = 10**9


def utcnow() -> datetime:
    return datetime.now(UTC)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrainingMetrics(_Strict):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    # Range-checked: a reported accuracy can end a run at its target, so 1e100 must not pass.
    train_loss: float | None = Field(default=None, ge=0)
    train_accuracy: float | None = Field(default=None, ge=0, le=1)
    eval_loss: float | None = Field(default=None, ge=0)
    eval_accuracy: float | None = Field(default=None, ge=0, le=1)
    train_seconds: float | None = Field(default=None, ge=0)

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


def update_sort_key(run_id: str, base_version: int) -> str:
    return f"{run_id}#{base_version:010d}"


class UpdateRecord(_Strict):
    """The item a client puts in the updates table after uploading its weights.

    Partition key ``client_id`` (IAM binds it to the caller), sort key ``update_id`` =
    ``{run_id}#{base_version:010d}``: one update per client per global version, so the
    client's conditional put makes a retry harmless.
    """

    client_id: Identifier
    update_id: str
    run_id: Identifier
    base_version: int = Field(ge=0)
    round: int | None = Field(default=None, ge=1)
    object_key: str = Field(min_length=1, max_length=1024)
    sha256: Sha256
    num_examples: int = Field(gt=0, le=MAX_EXAMPLES)
    metrics: TrainingMetrics = TrainingMetrics()
    task_token: str | None = Field(default=None, max_length=2048)
    created_at: datetime = Field(default_factory=utcnow)

    @field_validator("update_id")
    @classmethod
    def _update_id_shape(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}#\d{10}", value):
            raise ValueError("update_id must be '{run_id}#{base_version:010d}'")
        return value

    @classmethod
    def create(cls, **fields) -> UpdateRecord:
        fields.setdefault("update_id", update_sort_key(fields["run_id"], fields["base_version"]))
        return cls(**fields)

    def consistent(self) -> str | None:
        """A reason string when the record contradicts itself, else None."""
        if self.update_id != update_sort_key(self.run_id, self.base_version):
            return "update_id does not match run_id and base_version"
        return None


class ModelReady(_Strict):
    """ "global model ready": sent to every client queue when a version is published. It carries no
    task token: the round's token travels to the finalize function only (``RoundToken``)."""

    type: Literal["model_ready"] = "model_ready"
    run_id: Identifier
    version: int = Field(ge=0)
    round: int | None = Field(default=None, ge=1)
    object_key: str
    sha256: Sha256
    client_settings: dict[str, float | int | str | bool] = Field(default_factory=dict)
    deadline_seconds: int | None = None
    # async: the updates ("{client_id}#{base_version}") the server consumed (applied, buffered or
    # rejected) in the batch that sent this message; a client named here may train again.
    consumed: list[str] = Field(default_factory=list, max_length=1000)


class TrainingComplete(_Strict):
    type: Literal["training_complete"] = "training_complete"
    run_id: Identifier
    reason: str = "done"
    final_version: int | None = None


class RoundToken(_Strict):
    """Sent by the state machine to the finalize queue (server-only) when a round opens: the token
    the round's result is sent back with. No message a client can read carries it."""

    type: Literal["round_token"] = "round_token"
    run_id: Identifier
    round: int = Field(ge=1)
    version: int = Field(ge=0)
    task_token: str = Field(min_length=1, max_length=2048)


class FinalizeRequest(_Strict):
    """Sent by the state machine to the finalize queue when a round's deadline passed.

    ``finalize_id`` is the random id the state machine wrote on the round item just before
    (``MarkDeadline``); the handler acts only on a request that carries the round's own id.
    """

    type: Literal["finalize"] = "finalize"
    run_id: Identifier
    round: int = Field(ge=1)
    version: int = Field(ge=0)
    finalize_id: str = Field(min_length=16, max_length=128)
    task_token: str = Field(min_length=1, max_length=2048)


Message = Annotated[ModelReady | TrainingComplete, Field(discriminator="type")]


class RunStatus:
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"


class RunState(BaseModel):
    """The run-state item (``run_id``, ``sk='state'``): the global pointer and counters."""

    model_config = ConfigDict(extra="ignore")

    run_id: str
    mode: Literal["sync", "async"]
    status: str = RunStatus.RUNNING
    version: int = 0
    global_key: str
    global_sha256: str
    round: int = 0
    applied: int = 0
    rejected: int = 0
    received: int = 0
    buffered: int = 0
    epsilon: float | None = None
