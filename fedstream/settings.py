"""Settings a Lambda handler reads from its environment, and a client from its config.

The CDK stack builds the functions' environment with ``HandlerSettings(...).to_env()``, so the
stack and the handlers cannot disagree on a variable name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fedstream.bounds import InfluenceBounds
from fedstream.weights import DEFAULT_MAX_BYTES

ENV_PREFIX = "FEDSTREAM_"


class HandlerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["sync", "async"]
    bucket: str
    run_table: str
    updates_table: str
    topic_arn: str = ""
    aggregator: str = "fedavg"
    aggregator_params: dict[str, Any] = Field(default_factory=dict)
    client_ids: tuple[str, ...] = ()
    min_clients: int = Field(1, ge=1)
    max_model_bytes: int = Field(DEFAULT_MAX_BYTES, gt=0)
    seed: int | None = None
    download_threads: int = Field(8, ge=1, le=64)
    # how far one client's update may move the model (docs/security.md, "A malicious participant")
    bounds: InfluenceBounds = Field(default_factory=InfluenceBounds)
    # async run control
    max_updates: int = Field(0, ge=0, description="stop after this many applied updates (0: no limit)")
    target_accuracy: float | None = None
    max_seconds: float = Field(0.0, ge=0.0, description="async wall-clock limit (0: none)")

    @field_validator("client_ids", mode="before")
    @classmethod
    def _split_ids(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        return value

    @field_validator("aggregator_params", "bounds", mode="before")
    @classmethod
    def _parse_params(cls, value: Any) -> Any:
        if isinstance(value, str):
            return json.loads(value or "{}")
        return value

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> HandlerSettings:
        environ = os.environ if environ is None else environ
        fields = {
            name: environ[ENV_PREFIX + name.upper()]
            for name in cls.model_fields
            if ENV_PREFIX + name.upper() in environ
        }
        return cls.model_validate(fields)

    def to_env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if value is None:
                continue
            if name == "client_ids":
                value = ",".join(value)
            elif name in ("aggregator_params", "bounds"):
                value = json.dumps(value, sort_keys=True)
            out[ENV_PREFIX + name.upper()] = str(value)
        return out


class ClientSettings(BaseModel):
    """What a client needs to take part; the stack's outputs provide every field."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    client_id: str
    queue_url: str
    bucket: str
    updates_table: str
    region: str = "us-east-1"
    endpoint_url: str | None = None
    max_model_bytes: int = DEFAULT_MAX_BYTES
    wait_seconds: int = Field(20, ge=0, le=20)
    visibility_timeout: int = Field(300, ge=5, le=43200)
    # async: train again this long after reporting if no message named the update as consumed
    ack_timeout_seconds: float = Field(300.0, gt=0)
    # the run to take part in (None: the first run it trains in); other runs' messages are dropped
    run_id: str | None = None
