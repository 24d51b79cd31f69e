"""The Lambda functions, their least-privilege roles and their event source mappings.

sync:  ``Aggregate`` (DynamoDB stream of the updates table) and ``Finalize`` (finalize queue).
async: ``AsyncUpdate`` (DynamoDB stream, one batch at a time per shard).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import jsii
from aws_cdk import Duration, RemovalPolicy, Size
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_lambda_event_sources as sources
from aws_cdk import aws_logs as logs
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sqs as sqs
from aws_cdk import aws_stepfunctions as sfn
from constructs import Construct
from fedstream.stacks import constants
from fedstream.stacks.constructs.encryption import EncryptionKey
from fedstream.stacks.constructs.messaging import only_these_publish
from fedstream.stacks.constructs.nag import acknowledge, add_statement

_S3_WILDCARD_REASON = (
    "Run ids are created at run time; the server reads every object of a run (runs/*) and writes only "
    "global versions and aggregator state (runs/*/global/*, runs/*/state/*), never client updates."
)


@dataclass(frozen=True)
class FunctionSizing:
    memory_mb: int
    ephemeral_storage_mb: int


@jsii.implements(lambda_.IEventSourceDlq)
class QueueDestination:
    """An on-failure destination whose send permission the role already has (added explicitly).

    CDK's ``SqsDlq`` would grant it again with ``kms:GenerateDataKey*``/``kms:ReEncrypt*`` wildcards.
    """

    def __init__(self, queue: sqs.IQueue) -> None:
        self.queue = queue

    def bind(self, _target: object, _target_handler: object) -> lambda_.DlqDestinationConfig:
        return lambda_.DlqDestinationConfig(destination=self.queue.queue_arn)


class Functions(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        mode: str,
        code: lambda_.Code,
        environment: Mapping[str, str],
        sizing: FunctionSizing,
        encryption: EncryptionKey,
        bucket: s3.IBucket,
        updates_table: dynamodb.ITable,
        run_table: dynamodb.ITable,
        topic: sns.ITopic,
        stream_failures: sqs.IQueue,
        finalize_queue: sqs.IQueue | None,
        state_machine: sfn.IStateMachine | None,
        log_retention: logs.RetentionDays,
        removal_policy: RemovalPolicy,
    ) -> None:
        super().__init__(scope, construct_id)
        self._code = code
        self._environment = {
            **environment,
            "POWERTOOLS_SERVICE_NAME": constants.POWERTOOLS_SERVICE_NAME,
            "POWERTOOLS_METRICS_NAMESPACE": constants.METRIC_NAMESPACE,
        }
        self._sizing = sizing
        self._encryption = encryption
        self._bucket = bucket
        self._updates_table = updates_table
        self._run_table = run_table
        self._stream_failures = stream_failures
        self._log_retention = log_retention
        self._removal_policy = removal_policy
        self.functions: dict[str, lambda_.Function] = {}
        # The functions the updates table's stream feeds (their IteratorAge says if they keep up).
        self.stream_consumers: dict[str, lambda_.Function] = {}
        if mode == "sync":
            assert finalize_queue is not None and state_machine is not None
            aggregate = self._function(
                "Aggregate",
                constants.HANDLER_AGGREGATE,
                Duration.minutes(constants.AGGREGATE_TIMEOUT_MINUTES),
                "sync: counts reports per round and aggregates complete rounds",
                self._task_response(state_machine),
                self._report_stream_failures(),
                self._read_checked_update_versions(),
                key_services=("s3", "dynamodb", "sqs"),
            )
            self._from_updates_stream(aggregate, constants.SYNC_STREAM_BATCH_SIZE)
            finalize = self._function(
                "Finalize",
                constants.HANDLER_FINALIZE,
                Duration.minutes(constants.AGGREGATE_TIMEOUT_MINUTES),
                "sync: closes a round at its deadline with the quorum it has, or fails it",
                self._task_response(state_machine),
                self._read_checked_update_versions(),
                key_services=("s3", "dynamodb"),
            )
            # The event source grants receive/delete on the queue and kms:Decrypt for its messages.
            finalize.add_event_source(
                sources.SqsEventSource(finalize_queue, batch_size=1, report_batch_item_failures=True)
            )
        else:
            update = self._function(
                "AsyncUpdate",
                constants.HANDLER_ASYNC_UPDATE,
                Duration.minutes(constants.ASYNC_UPDATE_TIMEOUT_MINUTES),
                "async: applies each client update to the global model as it arrives",
                iam.PolicyStatement(
                    sid="PublishModelEvents", actions=["sns:Publish"], resources=[topic.topic_arn]
                ),
                self._report_stream_failures(),
                key_services=("s3", "dynamodb", "sqs", "sns"),
                writes_state=True,
            )
            self._from_updates_stream(
                update,
                constants.ASYNC_STREAM_BATCH_SIZE,
                parallelization_factor=constants.ASYNC_PARALLELIZATION_FACTOR,
            )
            # In async mode this function publishes, and an operator's ``start_run`` (version 0).
            assert update.role is not None
            only_these_publish(topic, [update.role], tagged_operators=True)

    # -- permissions ---------------------------------------------------------------------------

    def _server_statements(self, *, writes_state: bool) -> list[iam.PolicyStatement]:
        writable = ["runs/*/global/*", *(["runs/*/state/*"] if writes_state else [])]
        return [
            iam.PolicyStatement(
                sid="ReadRunObjects",
                actions=["s3:GetObject"],
                resources=[self._bucket.arn_for_objects("runs/*")],
            ),
            # With ListBucket a missing key answers 404 NoSuchKey (the store's MissingObject), not 403.
            iam.PolicyStatement(
                sid="TellMissingFromForbidden", actions=["s3:ListBucket"], resources=[self._bucket.bucket_arn]
            ),
            iam.PolicyStatement(
                sid="WriteGlobalVersions",
                actions=["s3:PutObject"],
                resources=[self._bucket.arn_for_objects(prefix) for prefix in writable],
            ),
            # What the Store calls on the run table: GetItem (run state, round), BatchGetItem (a round
            # and an object marker at registration, the markers of an async batch), PutItem and
            # UpdateItem (the verbs, and the items of a TransactWriteItems). The updates table is
            # read only through its stream.
            iam.PolicyStatement(
                sid="RunState",
                actions=[
                    "dynamodb:GetItem",
                    "dynamodb:BatchGetItem",
                    "dynamodb:PutItem",
                    "dynamodb:UpdateItem",
                ],
                resources=[self._run_table.table_arn],
            ),
        ]

    def _read_checked_update_versions(self) -> iam.PolicyStatement:
        # A round close (either sync function) reads each update at the S3 version registration
        # checked; a GetObject with a versionId needs GetObjectVersion. Updates only.
        return iam.PolicyStatement(
            sid="ReadCheckedUpdateVersions",
            actions=["s3:GetObjectVersion"],
            resources=[self._bucket.arn_for_objects("runs/*/updates/*")],
        )

    def _report_stream_failures(self) -> iam.PolicyStatement:
        # Lambda sends to a stream event source's on-failure destination with the function's role.
        return iam.PolicyStatement(
            sid="ReportStreamFailures",
            actions=["sqs:SendMessage"],
            resources=[self._stream_failures.queue_arn],
        )

    @staticmethod
    def _task_response(state_machine: sfn.IStateMachine) -> iam.PolicyStatement:
        return iam.PolicyStatement(
            sid="CallBackTheRound",
            actions=["states:SendTaskSuccess", "states:SendTaskFailure"],
            resources=[state_machine.state_machine_arn],
        )

    # -- building blocks -----------------------------------------------------------------------

    def _function(
        self,
        name: str,
        handler: str,
        timeout: Duration,
        description: str,
        *extra_statements: iam.PolicyStatement,
        key_services: tuple[str, ...],
        writes_state: bool = False,
    ) -> lambda_.Function:
        log_group = logs.LogGroup(
            self,
            f"{name}Logs",
            retention=self._log_retention,
            encryption_key=self._encryption.key,
            removal_policy=self._removal_policy,
        )
        role = iam.Role(
            self,
            f"{name}Role",
            assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
            description=f"fedstream {name} function",
        )
        log_group.grant_write(role)
        for statement in [*self._server_statements(writes_state=writes_state), *extra_statements]:
            add_statement(role, statement, wildcard_reason=_S3_WILDCARD_REASON)
        add_statement(role, self._encryption.use_via(*key_services))
        function = lambda_.Function(
            self,
            name,
            description=f"fedstream {description}",
            runtime=constants.LAMBDA_RUNTIME,
            architecture=constants.LAMBDA_ARCHITECTURE,
            handler=handler,
            code=self._code,
            memory_size=self._sizing.memory_mb,
            ephemeral_storage_size=Size.mebibytes(self._sizing.ephemeral_storage_mb),
            timeout=timeout,
            environment=self._environment,
            role=role,
            log_group=log_group,
            tracing=lambda_.Tracing.ACTIVE,
        )
        acknowledge(
            function,
            "AwsSolutions-L1",
            f"Python {constants.LAMBDA_PYTHON_VERSION} is the newest CPython the build machines can install "
            "to import-test the asset with; move constants.LAMBDA_RUNTIME when a newer one is there.",
        )
        acknowledge(
            role,
            "AwsSolutions-IAM5[Resource::*]",
            "X-Ray trace segments (xray:PutTraceSegments, PutTelemetryRecords) and the stream event source's "
            "dynamodb:ListStreams accept only Resource '*'.",
        )
        self.functions[name] = function
        return function

    def _from_updates_stream(
        self, function: lambda_.Function, batch_size: int, *, parallelization_factor: int | None = None
    ) -> None:
        self.stream_consumers[function.node.id] = function
        function.add_event_source(
            sources.DynamoEventSource(
                self._updates_table,
                starting_position=lambda_.StartingPosition.TRIM_HORIZON,
                batch_size=batch_size,
                bisect_batch_on_error=True,
                retry_attempts=constants.STREAM_RETRY_ATTEMPTS,
                # A record older than this goes to the failure queue (counted, alarmed) instead of
                # being retried until the stream drops it silently after 24 h.
                max_record_age=Duration.hours(constants.STREAM_MAX_RECORD_AGE_HOURS),
                report_batch_item_failures=True,
                on_failure=QueueDestination(self._stream_failures),
                parallelization_factor=parallelization_factor,
                # Clients only ever insert (a conditional put); nothing else is an update.
                filters=[lambda_.FilterCriteria.filter({"eventName": lambda_.FilterRule.is_equal("INSERT")})],
            )
        )
