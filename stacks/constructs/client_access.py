"""One IAM role per client: its own queue, the global models, its own update prefix and key.

A client role may
  * receive (and delete) messages from its own queue only;
  * read global model versions (``runs/*/global/*``) and nothing else in the bucket, so it can never
    read another client's update;
  * write objects under ``runs/*/updates/{client_id}/`` only;
  * put updates-table items whose partition key is its own client id (``dynamodb:LeadingKeys``);
  * use the stack key only through S3, SQS and DynamoDB.

S3 wildcards match ``/`` too, so ``runs/*/updates/site-a/*`` also matches the odd key
``runs/r/updates/site-b/x/updates/site-a/y``: that lets site-a write a junk object deep below
site-b's prefix, never overwrite a well-formed ``runs/{run}/updates/site-b/{file}`` key (those have
one ``/updates/<client>/`` segment). The handlers accept only well-formed keys whose client is the
record's (``fedstream.keys.update_key_owner``) and the record's key is bound to the caller by IAM.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Literal

import pydantic
from aws_cdk import Duration
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_iam as iam
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_sqs as sqs
from constructs import Construct
from fedstream.stacks.constructs.encryption import EncryptionKey
from fedstream.stacks.constructs.nag import acknowledge_wildcards

_GLOBAL_READ_REASON = (
    "Run ids are chosen when a run starts; a client reads the global versions of any run of this "
    "stack (runs/*/global/*) and nothing else in the bucket."
)
_OWN_PREFIX_REASON = (
    "Run ids are chosen when a run starts; a client writes only below its own prefix "
    "runs/*/updates/{client_id}/, and the handlers accept only well-formed keys of the record's client."
)


class SameAccountTrust(pydantic.BaseModel):
    """Principals of this account: the named IAM roles and users, or (none named, the default) any
    principal of the account whose own policy allows ``sts:AssumeRole`` on the client's role."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    kind: Literal["same-account"] = "same-account"
    principals: tuple[
        Annotated[
            str, pydantic.StringConstraints(pattern=r"^arn:aws[a-z-]*:iam::\d{12}:(role|user)/[\w+=,.@/-]+$")
        ],
        ...,
    ] = ()


class AccountTrust(pydantic.BaseModel):
    """Principals of another account, presenting the agreed external id."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    kind: Literal["account"]
    account_id: str = pydantic.Field(pattern=r"^\d{12}$")
    external_id: str = pydantic.Field(min_length=2, max_length=1224, pattern=r"^[\w+=,.@:/-]+$")


class RolesAnywhereTrust(pydantic.BaseModel):
    """An on-premises machine with an X.509 certificate, through IAM Roles Anywhere."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)
    kind: Literal["roles-anywhere"]
    trust_anchor_arn: str = pydantic.Field(
        pattern=r"^arn:aws[a-z-]*:rolesanywhere:[a-z0-9-]+:\d{12}:trust-anchor/\S+$"
    )
    certificate_cn: str | None = pydantic.Field(
        None, description="the certificate's subject CN (default: client id)"
    )


ClientTrust = Annotated[
    SameAccountTrust | AccountTrust | RolesAnywhereTrust, pydantic.Field(discriminator="kind")
]

ROLES_ANYWHERE_ACTIONS = ("sts:AssumeRole", "sts:TagSession", "sts:SetSourceIdentity")


def client_statements(
    client_id: str,
    *,
    queue: sqs.IQueue,
    bucket: s3.IBucket,
    updates_table: dynamodb.ITable,
    encryption: EncryptionKey,
) -> list[tuple[iam.PolicyStatement, str | None]]:
    """The client's policy: each statement with the reason its wildcard is acceptable (None: it has none)."""
    return [
        (
            iam.PolicyStatement(
                sid="ReceiveFromOwnQueue",
                actions=[
                    "sqs:ReceiveMessage",
                    "sqs:DeleteMessage",
                    "sqs:ChangeMessageVisibility",
                    "sqs:GetQueueAttributes",
                    "sqs:GetQueueUrl",
                ],
                resources=[queue.queue_arn],
            ),
            None,
        ),
        (
            iam.PolicyStatement(
                sid="ReadGlobalModels",
                actions=["s3:GetObject"],
                resources=[bucket.arn_for_objects("runs/*/global/*")],
            ),
            _GLOBAL_READ_REASON,
        ),
        (
            iam.PolicyStatement(
                sid="WriteOwnUpdates",
                actions=["s3:PutObject", "s3:PutObjectTagging", "s3:AbortMultipartUpload"],
                resources=[bucket.arn_for_objects(f"runs/*/updates/{client_id}/*")],
            ),
            _OWN_PREFIX_REASON,
        ),
        (
            iam.PolicyStatement(
                sid="RecordOwnUpdates",
                actions=["dynamodb:PutItem"],
                resources=[updates_table.table_arn],
                conditions={
                    "ForAllValues:StringEquals": {"dynamodb:LeadingKeys": [client_id]},
                    # ForAllValues is true for a request without the key; demand that it is there.
                    "Null": {"dynamodb:LeadingKeys": "false"},
                },
            ),
            None,
        ),
        (encryption.use_via("s3", "sqs", "dynamodb"), None),
    ]


class ClientAccess(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        client_ids: Sequence[str],
        trust: Mapping[str, SameAccountTrust | AccountTrust | RolesAnywhereTrust],
        queues: Mapping[str, sqs.IQueue],
        bucket: s3.IBucket,
        updates_table: dynamodb.ITable,
        encryption: EncryptionKey,
    ) -> None:
        super().__init__(scope, construct_id)
        self.roles: dict[str, iam.Role] = {}
        for client_id in client_ids:
            self.roles[client_id] = self._role(
                client_id,
                trust.get(client_id, SameAccountTrust()),
                client_statements(
                    client_id,
                    queue=queues[client_id],
                    bucket=bucket,
                    updates_table=updates_table,
                    encryption=encryption,
                ),
            )

    def _role(
        self,
        client_id: str,
        trust: SameAccountTrust | AccountTrust | RolesAnywhereTrust,
        statements: list[tuple[iam.PolicyStatement, str | None]],
    ) -> iam.Role:
        role = iam.Role(
            self,
            client_id,
            description=f"fedstream client {client_id}: own queue, global models, own updates",
            assumed_by=self._principal(client_id, trust),
            external_ids=[trust.external_id] if isinstance(trust, AccountTrust) else None,
            max_session_duration=Duration.hours(12),
            inline_policies={
                "client": iam.PolicyDocument(statements=[statement for statement, _ in statements])
            },
        )
        if isinstance(trust, RolesAnywhereTrust):
            role.assume_role_policy.add_statements(
                iam.PolicyStatement(
                    actions=list(ROLES_ANYWHERE_ACTIONS[1:]), principals=[self._principal(client_id, trust)]
                )
            )
        for statement, wildcard_reason in statements:
            if wildcard_reason:
                acknowledge_wildcards(role, statement, wildcard_reason)
        return role

    @staticmethod
    def _principal(
        client_id: str, trust: SameAccountTrust | AccountTrust | RolesAnywhereTrust
    ) -> iam.IPrincipal:
        if isinstance(trust, AccountTrust):
            return iam.AccountPrincipal(trust.account_id)
        if isinstance(trust, RolesAnywhereTrust):
            return iam.ServicePrincipal("rolesanywhere.amazonaws.com").with_conditions(
                {
                    "ArnEquals": {"aws:SourceArn": trust.trust_anchor_arn},
                    "StringEquals": {"aws:PrincipalTag/x509Subject/CN": trust.certificate_cn or client_id},
                }
            )
        if trust.principals:
            return iam.CompositePrincipal(*(iam.ArnPrincipal(arn) for arn in trust.principals))
        return iam.AccountRootPrincipal()


def role_output_name(client_id: str) -> str:
    """``site-a`` -> ``SiteA``: the client's part of an output name."""
    parts = [p for p in client_id.replace(".", "-").replace("_", "-").split("-") if p]
    return "".join(p[:1].upper() + p[1:] for p in parts)
