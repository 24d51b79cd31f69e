"""The fedstream stack: its composition from a checked ``DeploymentConfig`` (stacks/config.py)."""

from __future__ import annotations

import json
from typing import Any

from aws_cdk import App, Aws, CfnOutput, Duration, Environment, Stack, Tags, Validations
from cdk_nag import AwsSolutionsChecks
from constructs import Construct
from fedstream.stacks import constants
from fedstream.stacks.bundling import LambdaAssetSpec, lambda_code
from fedstream.stacks.config import DeploymentConfig
from fedstream.stacks.constructs.client_access import ClientAccess, role_output_name
from fedstream.stacks.constructs.encryption import EncryptionKey
from fedstream.stacks.constructs.functions import Functions, FunctionSizing
from fedstream.stacks.constructs.messaging import Messaging
from fedstream.stacks.constructs.observability import Observability
from fedstream.stacks.constructs.orchestration import Orchestration
from fedstream.stacks.constructs.storage import Storage

from fedstream.registry import AggregatorRegistry, default_registry
from fedstream.settings import ClientSettings


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
            stream_consumers=self.functions.stream_consumers,
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
        # sync: the start-execution input without the run's own fields; async: the client settings
        # a run publishes (`fedstream run start` reads both)
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
