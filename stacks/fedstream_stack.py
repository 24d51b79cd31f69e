"""The fedstream stack: its deploy-time configuration (from CDK context) and its composition.

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
from aws_cdk import App, Aws, CfnOutput, Duration, Environment, RemovalPolicy, Stack, Tags, Validations
from aws_cdk import aws_logs as logs
from cdk_nag import AwsSolutionsChecks
from constructs import Construct

from fedstream.bounds import InfluenceBounds
from fedstream.registry import AggregatorRegistry, PluginError, default_registry
from fedstream.schemas import IDENTIFIER
from fedstream.settings import ClientSettings, HandlerSettings
from plugins.fedbuff import default_buffer_size
from stacks import constants
from stacks.bundling import LambdaAssetSpec, lambda_code
from stacks.constructs.client_access import ClientAccess, ClientTrust, role_output_name
from stacks.constructs.encryption import EncryptionKey
from stacks.constructs.functions import Functions, FunctionSizing
from stacks.constructs.messaging import Messaging
from stacks.constructs.observability import Observability
from stacks.constructs.orchestration import Orchestration
from stacks.constructs.storage import Storage

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


class FedstreamStack(Stack):
    """One deployment: storage, messaging, (sync) the state machine, functions, client roles, dashboard."""

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        config: DeploymentConfig,
        registry: AggregatorRegistry | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            scope,
            construct_id,
            description=f"fedstream federated learning ({config.mode} mode, {config.aggregator})",
            **kwargs,
        )
        registry = registry or default_registry()
        self.config = config
        Tags.of(self).add("project", constants.PROJECT_TAG)
        Tags.of(self).add("fedstream:mode", config.mode)
        removal = config.removal_policy
        sync = config.mode == "sync"

        self.encryption = EncryptionKey(self, "Encryption", removal_policy=removal)
        key = self.encryption.key
        self.storage = Storage(
            self,
            "Storage",
            key=key,
            removal_policy=removal,
            update_retention_days=config.update_retention_days,
        )
        finalize_timeout_seconds = constants.AGGREGATE_TIMEOUT_MINUTES * 60
        self.messaging = Messaging(
            self,
            "Messaging",
            key=key,
            client_ids=config.clients,
            with_finalize_queue=sync,
            finalize_visibility=Duration.seconds(
                finalize_timeout_seconds * constants.SQS_VISIBILITY_PER_FUNCTION_TIMEOUT
            ),
        )
        self.orchestration: Orchestration | None = None
        if sync:
            assert self.messaging.finalize_queue is not None
            self.orchestration = Orchestration(
                self,
                "Orchestration",
                encryption=self.encryption,
                topic=self.messaging.topic,
                run_table=self.storage.run_table,
                finalize_queue=self.messaging.finalize_queue,
                log_retention=config.log_retention,
                removal_policy=removal,
            )
        state_machine = self.orchestration.state_machine if self.orchestration else None
        settings = config.handler_settings(
            bucket=self.storage.bucket.bucket_name,
            run_table=self.storage.run_table.table_name,
            updates_table=self.storage.updates_table.table_name,
            topic_arn=self.messaging.topic.topic_arn,
        )
        self.functions = Functions(
            self,
            "Functions",
            mode=config.mode,
            code=lambda_code(LambdaAssetSpec.for_aggregator(config.aggregator), config.lambda_asset_dir),
            environment=settings.to_env(),
            sizing=FunctionSizing(
                memory_mb=config.memory_mb, ephemeral_storage_mb=config.ephemeral_storage_mb
            ),
            encryption=self.encryption,
            bucket=self.storage.bucket,
            updates_table=self.storage.updates_table,
            run_table=self.storage.run_table,
            topic=self.messaging.topic,
            stream_failures=self.messaging.stream_failures,
            finalize_queue=self.messaging.finalize_queue,
            state_machine=state_machine,
            log_retention=config.log_retention,
            removal_policy=removal,
        )
        self.client_access = ClientAccess(
            self,
            "Clients",
            client_ids=config.clients,
            trust=config.client_trust,
            queues=self.messaging.client_queues,
            bucket=self.storage.bucket,
            updates_table=self.storage.updates_table,
            encryption=self.encryption,
        )
        log_groups = [f.log_group for f in self.functions.functions.values()]
        if self.orchestration is not None:
            log_groups.append(self.orchestration.log_group)
        self.observability = Observability(
            self,
            "Observability",
            mode=config.mode,
            key=key,
            functions=self.functions.functions,
            log_groups=log_groups,
            dead_letter_queues=self.messaging.dead_letter_queues,
            updates_table=self.storage.updates_table,
            state_machine=state_machine,
            stall_minutes=config.stall_minutes,
            alarm_email=config.alarm_email,
        )
        self._outputs(registry)

    def _output(self, name: str, value: str, description: str) -> None:
        CfnOutput(self, name, value=value, description=description).override_logical_id(name)

    def _outputs(self, registry: AggregatorRegistry) -> None:
        config = self.config
        self._output("Mode", config.mode, "sync or async")
        self._output("Aggregator", config.aggregator, "the aggregator the functions run")
        self._output("Region", Aws.REGION, "the stack's region")
        self._output("BucketName", self.storage.bucket.bucket_name, "model bucket (runs/{run_id}/...)")
        self._output("UpdatesTableName", self.storage.updates_table.table_name, "client update records")
        self._output("RunTableName", self.storage.run_table.table_name, "run state")
        self._output("TopicArn", self.messaging.topic.topic_arn, "model events, fanned out to client queues")
        self._output("AlarmTopicArn", self.observability.alarm_topic.topic_arn, "subscribe to get alarms")
        self._output(
            "DashboardUrl",
            f"https://{Aws.REGION}.console.aws.amazon.com/cloudwatch/home?region={Aws.REGION}"
            f"#dashboards:name={self.observability.dashboard.dashboard_name}",
            "CloudWatch dashboard",
        )
        if self.orchestration is not None:
            self._output(
                "StateMachineArn", self.orchestration.state_machine.state_machine_arn, "start a sync run here"
            )
            self._output(
                "RunInputDefaults",
                json.dumps(config.run_input(registry), sort_keys=True),
                "add run_id, version, object_key and sha256 to get a start-execution input",
            )
        for client_id in config.clients:
            name = role_output_name(client_id)
            settings = {
                "client_id": client_id,
                "queue_url": self.messaging.client_queues[client_id].queue_url,
                "bucket": self.storage.bucket.bucket_name,
                "updates_table": self.storage.updates_table.table_name,
                "region": Aws.REGION,
                "max_model_bytes": config.max_model_mb * 2**20,
            }
            assert set(settings) <= set(ClientSettings.model_fields), "the output must load as ClientSettings"
            self._output(
                f"Client{name}Config",
                self.to_json_string(settings),
                f"ClientSettings JSON for client {client_id}",
            )
            self._output(
                f"Client{name}RoleArn",
                self.client_access.roles[client_id].role_arn,
                f"role client {client_id} assumes",
            )


def add_checks(app: App) -> None:
    """cdk-nag's AWS Solutions pack on every synth: any unacknowledged finding fails the synth."""
    Validations.of(app).add_plugins(AwsSolutionsChecks(app, verbose=True))


def create_stack(
    app: App, *, env: Environment | None = None, registry: AggregatorRegistry | None = None
) -> FedstreamStack:
    """Read the app's context, build the stack and register the checks (``app.py`` and the tests)."""
    config = DeploymentConfig.from_context(app.node.get_all_context(), registry)
    stack = FedstreamStack(app, config.stack_name, config=config, registry=registry, env=env)
    add_checks(app)
    return stack
