"""Per-client roles: each client reaches its own queue, the global models, its own prefix and key."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from fedstream.keys import global_key, state_key, update_key
from tests.infrastructure.conftest import CLIENTS, EXTERNAL_ID, PARTNER_ACCOUNT, TRUST_ANCHOR, Synth, render

WRITE_ACTION = re.compile(
    r"^(s3:(Put|Delete|Abort|Restore|Replicate)|dynamodb:(Put|Update|Delete|BatchWrite)|sqs:Send|sns:Publish)"
)
READ_OBJECT = re.compile(r"^s3:GetObject")


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def client_roles(synth: Synth) -> dict[str, dict[str, Any]]:
    roles = {}
    for logical_id, role in synth.resources("AWS::IAM::Role").items():
        path = role["Metadata"]["aws:cdk:path"]
        if "/Clients/" in path:
            roles[path.split("/")[-2]] = {"id": logical_id, **role["Properties"]}
    assert set(roles) == set(CLIENTS)
    return roles


def statements(role: dict[str, Any]) -> list[dict[str, Any]]:
    (policy,) = role["Policies"]
    return [render(s) for s in policy["PolicyDocument"]["Statement"]]


def s3_matches(pattern: str, key: str) -> bool:
    """IAM's S3 resource wildcards: ``*`` is any run of characters, ``/`` included; ``?`` is one."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, key) is not None


def object_patterns(synth: Synth, statement: dict[str, Any]) -> list[str]:
    bucket = next(
        k
        for k, v in synth.resources("AWS::S3::Bucket").items()
        if "Storage/Models" in v["Metadata"]["aws:cdk:path"]
    )
    prefix = f"<{bucket}.Arn>/"
    patterns = []
    for resource in as_list(statement["Resource"]):
        assert resource.startswith(prefix), f"S3 statement on another resource: {resource}"
        patterns.append(resource.removeprefix(prefix))
    return patterns


def sample_keys(client: str) -> list[str]:
    return [
        update_key("run-1", client, 0, "a1b2"),
        update_key("r.2", client, 41, "x"),
        update_key("updates", client, 3, "n"),
    ]


def test_no_client_may_write_or_read_objects_anywhere_broad(synth: Synth):
    for client, role in client_roles(synth).items():
        for statement in statements(role):
            for action in as_list(statement["Action"]):
                if WRITE_ACTION.match(action) or READ_OBJECT.match(action):
                    for resource in as_list(statement["Resource"]):
                        assert resource != "*" and not resource.endswith(">/*"), (client, action, resource)


def test_a_client_writes_objects_only_under_its_own_prefix(synth: Synth):
    for client, role in client_roles(synth).items():
        writes = [s for s in statements(role) if any(a.startswith("s3:Put") for a in as_list(s["Action"]))]
        assert len(writes) == 1
        patterns = object_patterns(synth, writes[0])
        assert patterns == [f"runs/*/updates/{client}/*"]
        for key in sample_keys(client):
            assert any(s3_matches(p, key) for p in patterns), key
        for other in set(CLIENTS) - {client}:
            for key in sample_keys(other):
                assert not any(s3_matches(p, key) for p in patterns), (client, key)
        for key in (global_key("run-1", 3), state_key("run-1", "buffer")):
            assert not any(s3_matches(p, key) for p in patterns), (client, key)


def test_prefix_sharing_client_ids_cannot_write_each_others_updates():
    # site-a's pattern must not cover site-ab's keys (the trailing slash after the id does it).
    pattern = "runs/*/updates/site-a/*"
    assert not s3_matches(pattern, update_key("run-1", "site-ab", 0, "n"))
    assert s3_matches(pattern, update_key("run-1", "site-a", 0, "n"))


def test_no_client_can_read_any_update(synth: Synth):
    for client, role in client_roles(synth).items():
        reads = [s for s in statements(role) if any(READ_OBJECT.match(a) for a in as_list(s["Action"]))]
        patterns = [p for s in reads for p in object_patterns(synth, s)]
        assert patterns == ["runs/*/global/*"]
        assert any(s3_matches(p, global_key("run-1", 7)) for p in patterns)
        for owner in CLIENTS:
            for key in sample_keys(owner):
                assert not any(s3_matches(p, key) for p in patterns), (client, key)


def test_a_client_records_only_items_keyed_by_its_own_id(synth: Synth):
    updates_table = next(
        k
        for k, v in synth.resources("AWS::DynamoDB::Table").items()
        if "Storage/Updates" in v["Metadata"]["aws:cdk:path"]
    )
    for client, role in client_roles(synth).items():
        dynamo = [s for s in statements(role) if any(a.startswith("dynamodb:") for a in as_list(s["Action"]))]
        assert len(dynamo) == 1
        (statement,) = dynamo
        assert as_list(statement["Action"]) == ["dynamodb:PutItem"]
        assert statement["Resource"] == f"<{updates_table}.Arn>"
        assert statement["Condition"] == {
            "ForAllValues:StringEquals": {"dynamodb:LeadingKeys": [client]},
            "Null": {"dynamodb:LeadingKeys": "false"},
        }


def test_a_client_receives_only_from_its_own_queue(synth: Synth):
    for client, role in client_roles(synth).items():
        queue = next(
            k
            for k, v in synth.resources("AWS::SQS::Queue").items()
            if v["Metadata"]["aws:cdk:path"].endswith(f"Messaging/Client-{client}/Resource")
        )
        sqs = [s for s in statements(role) if any(a.startswith("sqs:") for a in as_list(s["Action"]))]
        assert [s["Resource"] for s in sqs] == [f"<{queue}.Arn>"]
        assert "sqs:ReceiveMessage" in sqs[0]["Action"] and not any(
            a == "sqs:SendMessage" for a in sqs[0]["Action"]
        )


def test_a_client_uses_the_key_only_through_its_services(synth: Synth):
    for role in client_roles(synth).values():
        (kms,) = [s for s in statements(role) if any(a.startswith("kms:") for a in as_list(s["Action"]))]
        assert not any("*" in a for a in as_list(kms["Action"]))
        services = kms["Condition"]["StringEquals"]["kms:ViaService"]
        assert sorted(s.split(".")[0] for s in services) == ["dynamodb", "s3", "sqs"]


def trust_statements(role: dict[str, Any]) -> list[dict[str, Any]]:
    return [render(s) for s in role["AssumeRolePolicyDocument"]["Statement"]]


def test_the_default_trust_is_this_account(sync_synth: Synth):
    (statement,) = trust_statements(client_roles(sync_synth)["site-a"])
    assert statement["Principal"] == {"AWS": "arn:<AWS::Partition>:iam::<AWS::AccountId>:root"}
    assert "Condition" not in statement


def test_same_account_trust_narrows_to_the_named_principals(tmp_path_factory: pytest.TempPathFactory):
    from tests.infrastructure.conftest import CLIENT_TRUST, synthesize

    runner = "arn:aws:iam::111122223333:role/site-a-runner"
    operator = "arn:aws:iam::111122223333:user/ops/alice"
    trust = {**CLIENT_TRUST, "site-a": {"kind": "same-account", "principals": [runner, operator]}}
    synth = synthesize("sync", tmp_path_factory.mktemp("cdk-principals"), client_trust=json.dumps(trust))

    (statement,) = trust_statements(client_roles(synth)["site-a"])
    assert sorted(as_list(statement["Principal"]["AWS"])) == sorted([runner, operator])
    assert "Condition" not in statement


@pytest.mark.parametrize(
    "principal", ["arn:aws:iam::111122223333:root", "arn:aws:iam::*:role/x", "site-a", "arn:aws:s3:::bucket"]
)
def test_a_named_principal_must_be_an_iam_role_or_user_arn(principal: str):
    import pydantic
    from fedstream.stacks.constructs.client_access import SameAccountTrust

    with pytest.raises(pydantic.ValidationError):
        SameAccountTrust(principals=(principal,))


def test_another_account_must_present_the_external_id(sync_synth: Synth):
    (statement,) = trust_statements(client_roles(sync_synth)["site-b"])
    assert statement["Principal"] == {"AWS": f"arn:<AWS::Partition>:iam::{PARTNER_ACCOUNT}:root"}
    assert statement["Condition"] == {"StringEquals": {"sts:ExternalId": EXTERNAL_ID}}


def test_an_on_premises_client_comes_through_roles_anywhere_with_its_certificate(sync_synth: Synth):
    trust = trust_statements(client_roles(sync_synth)["site-c"])
    actions = {a for s in trust for a in as_list(s["Action"])}
    assert actions == {"sts:AssumeRole", "sts:TagSession", "sts:SetSourceIdentity"}
    for statement in trust:
        assert statement["Principal"] == {"Service": "rolesanywhere.amazonaws.com"}
        assert statement["Condition"] == {
            "ArnEquals": {"aws:SourceArn": TRUST_ANCHOR},
            "StringEquals": {"aws:PrincipalTag/x509Subject/CN": "site-c"},
        }


@pytest.mark.parametrize("role_part", ["Functions/", "Orchestration/"])
def test_server_roles_use_resource_star_only_where_aws_demands_it(synth: Synth, role_part: str):
    allowed = ("xray:", "logs:", "dynamodb:ListStreams")
    for policy in synth.resources("AWS::IAM::Policy").values():
        if role_part not in policy["Metadata"]["aws:cdk:path"]:
            continue
        for statement in policy["Properties"]["PolicyDocument"]["Statement"]:
            if statement["Resource"] == "*":
                assert all(a.startswith(allowed) for a in as_list(statement["Action"])), statement


def test_server_roles_never_write_client_updates(synth: Synth):
    for policy in synth.resources("AWS::IAM::Policy").values():
        for statement in policy["Properties"]["PolicyDocument"]["Statement"]:
            statement = render(statement)
            if any(a.startswith("s3:Put") for a in as_list(statement["Action"])):
                for pattern in object_patterns(synth, statement):
                    assert pattern in {"runs/*/global/*", "runs/*/state/*"}, pattern
                    assert not any(s3_matches(pattern, k) for c in CLIENTS for k in sample_keys(c))


def test_a_client_role_holds_exactly_these_actions(synth: Synth):
    expected = {
        "sqs:ReceiveMessage",
        "sqs:DeleteMessage",
        "sqs:ChangeMessageVisibility",
        "sqs:GetQueueAttributes",
        "sqs:GetQueueUrl",
        "s3:GetObject",
        "s3:PutObject",
        "s3:PutObjectTagging",
        "s3:AbortMultipartUpload",
        "dynamodb:PutItem",
        "kms:Decrypt",
        "kms:Encrypt",
        "kms:GenerateDataKey",
        "kms:DescribeKey",
    }
    for client, role in client_roles(synth).items():
        actions = {a for s in statements(role) for a in as_list(s["Action"])}
        assert actions == expected, client
        assert all(s["Effect"] == "Allow" for s in statements(role))
