"""The deploy-time configuration of a fedstream stack, from CDK context.

    cdk deploy -c mode=sync|async -c aggregator=NAME [-c aggregator_params='{"mu":0.01}']
               -c clients=site-a,site-b [-c rounds=10 -c min_clients=2 -c round_timeout=3600 ...]

Every value is checked before any resource exists: an unknown mode or aggregator, parameters the
aggregator refuses, an aggregator that does not run in the chosen mode or no clients fail the synth
with one message that says what to pass instead.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any, Literal

import pydantic
from aws_cdk import RemovalPolicy
from aws_cdk import aws_logs as logs
from fedstream.plugins.fedbuff import default_buffer_size
from fedstream.stacks import constants
from fedstream.stacks.constructs.client_access import ClientTrust, role_output_name

from fedstream.bounds import InfluenceBounds
from fedstream.registry import AggregatorRegistry, PluginError, default_registry
from fedstream.schemas import IDENTIFIER
from fedstream.settings import HandlerSettings

# The retention periods CloudWatch Logs offers, in days.
_RETENTION_DAYS = {
    1: "ONE_DAY", 3: "THREE_DAYS", 5: "FIVE_DAYS", 7: "ONE_WEEK", 14: "TWO_WEEKS", 30: "ONE_MONTH",
    60: "TWO_MONTHS", 90: "THREE_MONTHS", 120: "FOUR_MONTHS", 150: "FIVE_MONTHS", 180: "SIX_MONTHS",
    365: "ONE_YEAR", 400: "THIRTEEN_MONTHS", 545: "EIGHTEEN_MONTHS", 731: "TWO_YEARS", 1096: "THREE_YEARS",
    1827: "FIVE_YEARS", 2192: "SIX_YEARS", 2557: "SEVEN_YEARS", 2922: "EIGHT_YEARS", 3288: "NINE_YEARS",
    3653: "TEN_YEARS",
}  # fmt: skip


NO_TARGET_ACCURACY = 2.0
_BUFFER_SIZE = pydantic.TypeAdapter(pydantic.PositiveInt | None)


class ConfigError(ValueError):
    """The deploy-time context is wrong; the message names the context key and what it accepts."""


class DeploymentConfig(pydantic.BaseModel):
    """What ``-c key=value`` may set. Strings from the command line are parsed into these types."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    mode: Literal["sync", "async"] = pydantic.Field(
        description="sync rounds (state machine) or async updates"
    )
    aggregator: str = pydantic.Field(description="a registered aggregator (fedstream plugins list)")
    aggregator_params: dict[str, Any] = pydantic.Field(default_factory=dict, description="JSON object")
    bounds: InfluenceBounds = pydantic.Field(
        default_factory=InfluenceBounds, description="JSON: influence bounds (docs/security.md §6a)"
    )
    clients: tuple[str, ...] = pydantic.Field(min_length=1, description="comma-separated client ids")
    client_trust: dict[str, ClientTrust] = pydantic.Field(
        default_factory=dict, description="JSON: client id -> who may assume its role (default: this account)"
    )
    rounds: int = pydantic.Field(10, ge=1, le=100_000, description="sync: rounds per run (run input default)")
    min_clients: int | None = pydantic.Field(
        None, ge=1, description="quorum at a round's deadline (default: majority)"
    )
    round_timeout: int = pydantic.Field(3600, ge=60, le=31_536_000, description="sync: seconds per round")
    target_accuracy: float | None = pydantic.Field(
        None, ge=0.0, le=1.0, description="stop at this eval accuracy"
    )
    max_updates: int = pydantic.Field(
        0, ge=0, description="async: stop after this many applied updates (0: none)"
    )
    max_seconds: float = pydantic.Field(0.0, ge=0.0, description="async: wall-clock limit of a run (0: none)")
    seed: int | None = pydantic.Field(None, description="seed of the aggregators' random generator")
    max_model_mb: int = pydantic.Field(
        100, ge=1, le=4096, description="largest model file, MiB; sizes the functions"
    )
    download_threads: int = pydantic.Field(
        4, ge=1, le=64, description="parallel update downloads per function"
    )
    stall_minutes: int = pydantic.Field(
        constants.DEFAULT_STALL_MINUTES,
        ge=5,
        le=1440,
        description="NoUpdates alarm after this many quiet minutes",
    )
    update_retention_days: int = pydantic.Field(
        30, ge=1, description="tagged client updates expire after this"
    )
    log_retention_days: int = pydantic.Field(
        constants.DEFAULT_LOG_RETENTION_DAYS, description="CloudWatch Logs"
    )
    alarm_email: str | None = pydantic.Field(None, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
    removal: Literal["retain", "destroy"] = pydantic.Field(
        "retain", description="destroy: cdk destroy also deletes models, tables, key and logs"
    )
    stack_name: str = pydantic.Field(constants.DEFAULT_STACK_NAME, pattern=r"^[A-Za-z][A-Za-z0-9-]{0,127}$")
    lambda_asset_dir: str | None = pydantic.Field(None, description="a prebuilt asset directory (skips pip)")

    @pydantic.field_validator("clients", mode="before")
    @classmethod
    def _split_clients(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @pydantic.field_validator("aggregator_params", "client_trust", "bounds", mode="before")
    @classmethod
    def _parse_json(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return json.loads(value or "{}")
            except json.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON ({exc.msg} at character {exc.pos}): {value!r}") from None
        return value

    @pydantic.field_validator("clients")
    @classmethod
    def _check_clients(cls, clients: tuple[str, ...]) -> tuple[str, ...]:
        bad = [c for c in clients if not re.fullmatch(IDENTIFIER, c)]
        if bad:
            raise ValueError(
                "client ids must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit: "
                f"{bad}"
            )
        duplicates = sorted({c for c in clients if clients.count(c) > 1})
        if duplicates:
            raise ValueError(f"client ids are listed twice: {duplicates}")
        if len(clients) > constants.MAX_CLIENTS:
            raise ValueError(f"at most {constants.MAX_CLIENTS} clients fit one stack (got {len(clients)})")
        names: dict[str, str] = {}
        for client in clients:
            other = names.setdefault(role_output_name(client).lower(), client)
            if other != client:
                raise ValueError(f"client ids {other!r} and {client!r} give the same output name; rename one")
        return clients

    @pydantic.field_validator("log_retention_days")
    @classmethod
    def _check_retention(cls, days: int) -> int:
        if days not in _RETENTION_DAYS:
            raise ValueError(f"CloudWatch Logs keeps logs for one of {sorted(_RETENTION_DAYS)} days")
        return days

    @pydantic.model_validator(mode="after")
    def _check_consistency(self) -> DeploymentConfig:
        unknown = sorted(set(self.client_trust) - set(self.clients))
        if unknown:
            raise ValueError(f"client_trust names clients that are not in clients: {unknown}")
        if self.min_clients is not None and self.min_clients > len(self.clients):
            raise ValueError(f"min_clients={self.min_clients} is more than the {len(self.clients)} clients")
        listed = len(",".join(self.clients)) + len(json.dumps(self.aggregator_params))
        if listed > constants.LAMBDA_ENV_BUDGET_BYTES:
            budget = constants.LAMBDA_ENV_BUDGET_BYTES
            raise ValueError(
                f"the client ids and aggregator_params take {listed} bytes; Lambda's environment holds 4 KB "
                f"in all, so keep them under {budget} (shorter ids, or another stack)"
            )
        if self.memory_mb > constants.LAMBDA_MAX_MEMORY_MB:
            held, fewer = "", ""
            if self.held_updates:
                held = f" and {self.aggregator} holding {self.held_updates} updates at once"
                fewer = ", fewer clients" if self.mode == "sync" else ", a smaller buffer_size"
            raise ValueError(
                f"max_model_mb={self.max_model_mb} with download_threads={self.download_threads}{held} needs "
                f"{self.memory_mb} MB of Lambda memory (maximum {constants.LAMBDA_MAX_MEMORY_MB}); "
                f"lower download_threads{fewer} or max_model_mb"
            )
        return self

    # -- derived -------------------------------------------------------------------------------

    @property
    def quorum(self) -> int:
        return self.min_clients or max(1, math.ceil(len(self.clients) / 2))

    @property
    def held_updates(self) -> int:
        """Updates the aggregator keeps in memory at once: 0 when it streams them (FedAvg's running
        sum), every client's in a sync round, K = its buffer size in async."""
        if self.aggregator not in constants.AGGREGATORS_HOLDING_UPDATES:
            return 0
        if self.mode == "sync":
            return len(self.clients)
        try:  # as the aggregator's params model reads it; a bad value is refused by check_aggregator
            requested = _BUFFER_SIZE.validate_python(self.aggregator_params.get("buffer_size"))
        except pydantic.ValidationError:
            requested = None
        return requested or default_buffer_size(len(self.clients))

    @property
    def memory_mb(self) -> int:
        copies = (
            constants.MODEL_COPIES_IN_MEMORY
            + self.download_threads
            + self.held_updates * constants.HELD_UPDATE_COPIES[self.mode]
            + constants.STATE_MODEL_COPIES.get(self.aggregator, 0)
        )
        needed = constants.LAMBDA_BASE_MEMORY_MB + self.max_model_mb * copies
        return max(constants.LAMBDA_MIN_MEMORY_MB, 64 * math.ceil(needed / 64))

    @property
    def ephemeral_storage_mb(self) -> int:
        return min(10240, max(512, 2 * self.max_model_mb))

    @property
    def removal_policy(self) -> RemovalPolicy:
        return RemovalPolicy.DESTROY if self.removal == "destroy" else RemovalPolicy.RETAIN

    @property
    def log_retention(self) -> logs.RetentionDays:
        return logs.RetentionDays[_RETENTION_DAYS[self.log_retention_days]]

    def check_aggregator(self, registry: AggregatorRegistry) -> None:
        """The aggregator exists, runs in this mode and accepts the parameters."""
        info = registry.info(self.aggregator)
        if self.mode not in info.modes:
            fitting = [i.name for i in registry.infos() if self.mode in i.modes]
            modes = "/".join(sorted(info.modes))
            raise PluginError(
                f"aggregator {self.aggregator!r} runs in {modes} mode, not {self.mode!r}; "
                f"{self.mode} aggregators: {', '.join(fitting)}"
            )
        registry.validate_params(self.aggregator, self.aggregator_params)
        chosen = registry.create(
            self.aggregator, self.aggregator_params, mode=self.mode, num_clients=len(self.clients)
        )
        needed = chosen.min_clients if self.mode == "async" else 1
        if needed > len(self.clients):
            raise PluginError(
                f"aggregator {self.aggregator!r} needs at least {needed} clients (each has one update "
                f"in flight, and one refused update must not stall the run); {len(self.clients)} deployed"
            )

    @classmethod
    def from_context(
        cls, context: Mapping[str, Any], registry: AggregatorRegistry | None = None
    ) -> DeploymentConfig:
        """Parse and check the context; every problem is one ``ConfigError`` message."""
        ours = {k: v for k, v in context.items() if k in cls.model_fields}
        unknown = sorted(
            k for k in context if re.fullmatch(r"[a-z][a-z0-9_]*", k) and k not in cls.model_fields
        )
        if unknown:
            raise ConfigError(
                f"unknown context {', '.join(unknown)}; fedstream takes {', '.join(cls.model_fields)}"
            )
        try:
            config = cls.model_validate(ours)
        except pydantic.ValidationError as exc:
            raise ConfigError(_describe(exc)) from None
        try:
            config.check_aggregator(registry or default_registry())
        except PluginError as exc:
            raise ConfigError(f"{exc} (pass -c aggregator=NAME [-c aggregator_params='{{...}}'])") from None
        return config

    def handler_settings(self, **resources: str) -> HandlerSettings:
        return HandlerSettings(
            mode=self.mode,
            aggregator=self.aggregator,
            aggregator_params=self.aggregator_params,
            bounds=self.bounds,
            client_ids=self.clients,
            min_clients=self.quorum,
            max_model_bytes=self.max_model_mb * 2**20,
            seed=self.seed,
            download_threads=self.download_threads,
            max_updates=self.max_updates,
            target_accuracy=self.target_accuracy,
            max_seconds=self.max_seconds,
            **resources,
        )

    def run_input(self, registry: AggregatorRegistry) -> dict[str, Any]:
        """The sync state machine's input without the run's own fields (run_id, model key, sha256)."""
        aggregator = registry.create(
            self.aggregator,
            self.aggregator_params,
            seed=self.seed,
            mode=self.mode,
            num_clients=len(self.clients),
        )
        return {
            "rounds": self.rounds,
            "min_clients": self.quorum,
            "round_timeout": self.round_timeout,
            # The definition compares eval accuracy to this; like the local runtime, 2.0 means "no target".
            "target_accuracy": NO_TARGET_ACCURACY if self.target_accuracy is None else self.target_accuracy,
            "client_settings": aggregator.client_settings(),
        }


def _describe(exc: pydantic.ValidationError) -> str:
    problems = []
    for error in exc.errors():
        key = ".".join(str(p) for p in error["loc"]) or "context"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "missing":
            hint = (
                DeploymentConfig.model_fields[key].description if key in DeploymentConfig.model_fields else ""
            )
            message = f"is required ({hint}): pass -c {key}=..."
        elif error["type"] == "literal_error" and key == "mode":
            message = f"must be sync or async, got {error['input']!r}: pass -c mode=sync or -c mode=async"
        problems.append(f"{key} {message}" if error["type"] == "missing" else f"{key}: {message}")
    return "invalid deploy context: " + "; ".join(problems)
