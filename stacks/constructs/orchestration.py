"""The sync-mode state machine: the definition in ``stacks/state_machine.asl.json``, filled in here."""

from __future__ import annotations

from aws_cdk import RemovalPolicy
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_iam as iam
from aws_cdk import aws_logs as logs
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sqs as sqs
from aws_cdk import aws_stepfunctions as sfn
from constructs import Construct
from fedstream.stacks import constants
from fedstream.stacks.constructs.encryption import EncryptionKey
from fedstream.stacks.constructs.messaging import only_these_publish, only_these_request_finalize
from fedstream.stacks.constructs.nag import acknowledge, add_statement


class Orchestration(Construct):
    """Rounds: init run state, publish "model ready" with a task token, wait, finalize at the deadline.

    The definition uses only service integrations (DynamoDB, SNS, SQS), so its role may do exactly
    those three things on these three resources. The local runtime runs the same JSON file.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        encryption: EncryptionKey,
        topic: sns.ITopic,
        run_table: dynamodb.ITable,
        finalize_queue: sqs.IQueue,
        log_retention: logs.RetentionDays,
        removal_policy: RemovalPolicy,
    ) -> None:
        super().__init__(scope, construct_id)
        self.log_group = logs.LogGroup(
            self,
            "Logs",
            retention=log_retention,
            encryption_key=encryption.key,
            removal_policy=removal_policy,
        )
        self.role = iam.Role(
            self,
            "Role",
            assumed_by=iam.ServicePrincipal("states.amazonaws.com"),
            description="fedstream sync state machine: run-table writes, topic publish, finalize queue",
        )
        add_statement(
            self.role,
            iam.PolicyStatement(
                sid="RunState",
                actions=["dynamodb:PutItem", "dynamodb:UpdateItem"],
                resources=[run_table.table_arn],
            ),
        )
        add_statement(
            self.role,
            iam.PolicyStatement(
                sid="PublishModelEvents", actions=["sns:Publish"], resources=[topic.topic_arn]
            ),
        )
        add_statement(
            self.role,
            iam.PolicyStatement(
                sid="RequestFinalize", actions=["sqs:SendMessage"], resources=[finalize_queue.queue_arn]
            ),
        )
        add_statement(self.role, encryption.use_via("dynamodb", "sns", "sqs"))
        # In sync mode this role is the only publisher, and the only direct sender of finalize requests.
        only_these_publish(topic, [self.role])
        only_these_request_finalize(finalize_queue, [self.role])
        self.state_machine = sfn.StateMachine(
            self,
            "Rounds",
            # Inline (not an S3 asset), so the template carries the definition cfn-lint checks.
            definition_body=sfn.DefinitionBody.from_string(constants.STATE_MACHINE_DEFINITION.read_text()),
            definition_substitutions={
                "TopicArn": topic.topic_arn,
                "RunTable": run_table.table_name,
                "FinalizeQueueUrl": finalize_queue.queue_url,
            },
            state_machine_type=sfn.StateMachineType.STANDARD,
            role=self.role,
            tracing_enabled=True,
            # Every event is logged (cdk-nag AwsSolutions-SF1) but without execution data: inputs and
            # outputs carry the rounds' task tokens, which must not land in a log group.
            logs=sfn.LogOptions(
                destination=self.log_group, level=sfn.LogLevel.ALL, include_execution_data=False
            ),
            removal_policy=removal_policy,
        )
        acknowledge(
            self.role,
            "AwsSolutions-IAM5[Resource::*]",
            "Added by CDK for logging and tracing: CloudWatch Logs vended delivery "
            "(logs:CreateLogDelivery, ...) and X-Ray segments accept only Resource '*'.",
        )
