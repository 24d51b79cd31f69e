"""The model bucket (and its access-log bucket) and the two DynamoDB tables."""

from __future__ import annotations

from aws_cdk import Duration, RemovalPolicy
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from constructs import Construct
from fedstream.stacks import constants

ACCESS_LOG_RETENTION_DAYS = 90


class Storage(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        key: kms.IKey,
        removal_policy: RemovalPolicy,
        update_retention_days: int,
    ) -> None:
        super().__init__(scope, construct_id)
        self._removal_policy = removal_policy
        self._destroy = removal_policy == RemovalPolicy.DESTROY
        self.access_logs = self._access_log_bucket()
        self.bucket = self._model_bucket(key, update_retention_days)
        self.updates_table = self._updates_table(key)
        self.run_table = self._run_table(key)

    def _access_log_bucket(self) -> s3.Bucket:
        return s3.Bucket(
            self,
            "AccessLogs",
            # S3 server access logging can only deliver to SSE-S3 buckets, not SSE-KMS.
            encryption=s3.BucketEncryption.S3_MANAGED,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            enforce_ssl=True,
            minimum_tls_version=1.2,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
            lifecycle_rules=[
                s3.LifecycleRule(id="expire-access-logs", expiration=Duration.days(ACCESS_LOG_RETENTION_DAYS))
            ],
            removal_policy=self._removal_policy,
            auto_delete_objects=self._destroy,
        )

    def _model_bucket(self, key: kms.IKey, update_retention_days: int) -> s3.Bucket:
        tag_key, tag_value = constants.UPDATE_OBJECT_TAG
        return s3.Bucket(
            self,
            "Models",
            encryption=s3.BucketEncryption.KMS,
            encryption_key=key,
            bucket_key_enabled=True,
            versioned=True,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            enforce_ssl=True,
            minimum_tls_version=1.2,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
            server_access_logs_bucket=self.access_logs,
            server_access_logs_prefix="models/",
            lifecycle_rules=[
                s3.LifecycleRule(
                    id="expire-client-updates",
                    tag_filters={tag_key: tag_value},
                    expiration=Duration.days(update_retention_days),
                    noncurrent_version_expiration=Duration.days(1),
                ),
                s3.LifecycleRule(
                    id="tidy-versions-and-uploads",
                    noncurrent_version_expiration=Duration.days(constants.NONCURRENT_VERSION_DAYS),
                    abort_incomplete_multipart_upload_after=Duration.days(constants.INCOMPLETE_UPLOAD_DAYS),
                    expired_object_delete_marker=True,
                ),
            ],
            removal_policy=self._removal_policy,
            auto_delete_objects=self._destroy,
        )

    def _table(self, construct_id: str, key: kms.IKey, partition: str, sort: str, **extra) -> dynamodb.Table:
        return dynamodb.Table(
            self,
            construct_id,
            partition_key=dynamodb.Attribute(name=partition, type=dynamodb.AttributeType.STRING),
            sort_key=dynamodb.Attribute(name=sort, type=dynamodb.AttributeType.STRING),
            billing_mode=dynamodb.BillingMode.PAY_PER_REQUEST,
            encryption=dynamodb.TableEncryption.CUSTOMER_MANAGED,
            encryption_key=key,
            point_in_time_recovery_specification=dynamodb.PointInTimeRecoverySpecification(
                point_in_time_recovery_enabled=True
            ),
            deletion_protection=not self._destroy,
            removal_policy=self._removal_policy,
            **extra,
        )

    def _updates_table(self, key: kms.IKey) -> dynamodb.Table:
        return self._table(
            "Updates",
            key,
            constants.UPDATES_TABLE_PARTITION_KEY,
            constants.UPDATES_TABLE_SORT_KEY,
            stream=dynamodb.StreamViewType.NEW_IMAGE,
        )

    def _run_table(self, key: kms.IKey) -> dynamodb.Table:
        return self._table("Runs", key, constants.RUN_TABLE_PARTITION_KEY, constants.RUN_TABLE_SORT_KEY)
