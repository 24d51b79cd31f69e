"""The stack's customer-managed KMS key: models, tables, topics, queues and logs are encrypted with it."""

from __future__ import annotations

from aws_cdk import Aws, Duration, RemovalPolicy
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from constructs import Construct


class EncryptionKey(Construct):
    """One symmetric key with yearly rotation.

    The key policy keeps CDK's default (the account administers it; IAM policies grant its use), and
    adds the three AWS services that use the key on their own behalf: CloudWatch Logs (encrypted log
    groups), CloudWatch alarms (publishing to the encrypted alarm topic) and SNS (delivering the
    model events into the encrypted client queues).
    """

    def __init__(self, scope: Construct, construct_id: str, *, removal_policy: RemovalPolicy) -> None:
        super().__init__(scope, construct_id)
        self.key = kms.Key(
            self,
            "Key",
            description="fedstream: models, tables, topics, queues and logs",
            enable_key_rotation=True,
            removal_policy=removal_policy,
            pending_window=Duration.days(7) if removal_policy == RemovalPolicy.DESTROY else None,
        )
        self._allow_cloudwatch_logs()
        self._allow_cloudwatch_alarms()
        self._allow_sns_delivery()

    def _allow_cloudwatch_logs(self) -> None:
        self.key.add_to_resource_policy(
            iam.PolicyStatement(
                sid="CloudWatchLogsEncryptsThisAccountsLogGroups",
                principals=[iam.ServicePrincipal(f"logs.{Aws.REGION}.amazonaws.com")],
                actions=[
                    "kms:Encrypt*",
                    "kms:Decrypt*",
                    "kms:ReEncrypt*",
                    "kms:GenerateDataKey*",
                    "kms:Describe*",
                ],
                resources=["*"],
                conditions={
                    "ArnLike": {
                        "kms:EncryptionContext:aws:logs:arn": (
                            f"arn:{Aws.PARTITION}:logs:{Aws.REGION}:{Aws.ACCOUNT_ID}:log-group:*"
                        )
                    }
                },
            )
        )

    def _allow_cloudwatch_alarms(self) -> None:
        self.key.add_to_resource_policy(
            iam.PolicyStatement(
                sid="CloudWatchAlarmsPublishToTheEncryptedAlarmTopic",
                principals=[iam.ServicePrincipal("cloudwatch.amazonaws.com")],
                actions=["kms:Decrypt", "kms:GenerateDataKey"],
                resources=["*"],
                conditions={"StringEquals": {"aws:SourceAccount": Aws.ACCOUNT_ID}},
            )
        )

    def _allow_sns_delivery(self) -> None:
        # Scoped to this account's topics, not to the model-events topic itself: that topic is encrypted
        # with this key, so naming it here would be a dependency cycle. Each client queue's policy
        # admits messages from the model-events topic only.
        self.key.add_to_resource_policy(
            iam.PolicyStatement(
                sid="SnsDeliversThisAccountsTopicsToEncryptedQueues",
                principals=[iam.ServicePrincipal("sns.amazonaws.com")],
                actions=["kms:Decrypt", "kms:GenerateDataKey"],
                resources=["*"],
                conditions={
                    "ArnLike": {"aws:SourceArn": f"arn:{Aws.PARTITION}:sns:{Aws.REGION}:{Aws.ACCOUNT_ID}:*"}
                },
            )
        )

    def use_via(self, *services: str) -> iam.PolicyStatement:
        """Use of the key, only through the given services (``s3``, ``sqs``, ``sns``, ``dynamodb``)."""
        return iam.PolicyStatement(
            sid="UseTheStackKeyThroughServices",
            actions=["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey", "kms:DescribeKey"],
            resources=[self.key.key_arn],
            conditions={
                "StringEquals": {
                    "kms:ViaService": [f"{service}.{Aws.REGION}.amazonaws.com" for service in services]
                }
            },
        )
