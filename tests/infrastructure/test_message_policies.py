"""Who may publish to the model topic and send to the finalize queue: the resource policies.

Beyond the statements' text, each deny is evaluated the way IAM evaluates a condition block (every
operator must hold; a negated operator on a key the request does not carry holds), so the tests say
which callers it stops and which it lets through.
"""

from __future__ import annotations

import json
from typing import Any

from fedstream.stacks import constants
from fedstream.stacks.constructs.messaging import OPERATOR_PUBLISHER_TAG

from tests.infrastructure.conftest import Synth
from tests.infrastructure.test_resources import logical_id

# The roles that publish in each mode (by construct path), and the statements' sids.
PUBLISHERS = {"sync": "Orchestration/Role/", "async": "Functions/AsyncUpdateRole/"}
TOPIC_DENY = "OnlyTheServerPublishes"
FINALIZE_DENY = "OnlyTheStateMachineSends"


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def role_arn(synth: Synth, path: str) -> dict[str, Any]:
    return {"Fn::GetAtt": [logical_id(synth, "AWS::IAM::Role", path), "Arn"]}


def topic_ref(synth: Synth) -> dict[str, Any]:
    return {"Ref": logical_id(synth, "AWS::SNS::Topic", "Messaging/ModelEvents/")}


def topic_statements(synth: Synth) -> list[dict[str, Any]]:
    (statements,) = [
        p["Properties"]["PolicyDocument"]["Statement"]
        for p in synth.resources("AWS::SNS::TopicPolicy").values()
        if p["Properties"]["Topics"] == [topic_ref(synth)]
    ]
    return statements


def finalize_queue_statements(synth: Synth) -> tuple[str, list[dict[str, Any]]]:
    queue = logical_id(synth, "AWS::SQS::Queue", "Messaging/Finalize/")
    (statements,) = [
        p["Properties"]["PolicyDocument"]["Statement"]
        for p in synth.resources("AWS::SQS::QueuePolicy").values()
        if p["Properties"]["Queues"] == [{"Ref": queue}]
    ]
    return queue, statements


def denies(statement: dict[str, Any], request: dict[str, Any]) -> bool:
    """Whether a Deny statement (negated ARN/string operators only) applies to a request context."""
    assert statement["Effect"] == "Deny" and statement["Principal"] in ("*", {"AWS": "*"})
    for operator, keys in statement.get("Condition", {}).items():
        assert operator in ("ArnNotEquals", "StringNotEquals"), operator
        for key, values in keys.items():
            # a negated operator holds when the key is absent or equals none of the values
            if key in request and request[key] in as_list(values):
                return False
    return True


def roles_allowed(synth: Synth, action: str, resource: dict[str, Any]) -> set[str]:
    """The roles whose identity policies allow ``action`` on ``resource``."""
    roles = set()
    for policy in synth.resources("AWS::IAM::Policy").values():
        for statement in policy["Properties"]["PolicyDocument"]["Statement"]:
            if (
                statement["Effect"] == "Allow"
                and action in as_list(statement["Action"])
                and resource in as_list(statement["Resource"])
            ):
                roles.update(r["Ref"] for r in policy["Properties"]["Roles"])
    return roles


# -- the model topic ---------------------------------------------------------------------------


def test_only_the_server_may_publish_to_the_model_topic(synth: Synth):
    statements = topic_statements(synth)
    (deny,) = [s for s in statements if s.get("Sid") == TOPIC_DENY]
    publisher = role_arn(synth, PUBLISHERS[synth.mode])
    assert deny["Effect"] == "Deny" and deny["Action"] == "sns:Publish"
    assert deny["Principal"] == {"AWS": "*"} and deny["Resource"] == topic_ref(synth)
    assert deny["Condition"]["ArnNotEquals"] == {"aws:PrincipalArn": [publisher]}
    # one deny only (a second would leave no publisher), and no allow for anyone
    assert [s for s in statements if s["Effect"] == "Deny" and "aws:PrincipalArn" in json.dumps(s)] == [deny]
    assert [s for s in statements if s["Effect"] == "Allow"] == []
    # every role that may publish by its own policy is the one the topic admits
    assert roles_allowed(synth, "sns:Publish", topic_ref(synth)) == {publisher["Fn::GetAtt"][0]}


def test_the_topic_policy_stops_every_other_publisher(synth: Synth):
    (deny,) = [s for s in topic_statements(synth) if s.get("Sid") == TOPIC_DENY]
    publisher = role_arn(synth, PUBLISHERS[synth.mode])
    client_role = role_arn(synth, "Clients/site-a/")
    operator_tagged = {"aws:PrincipalTag/" + OPERATOR_PUBLISHER_TAG: {"Ref": "AWS::StackName"}}

    assert not denies(deny, {"aws:PrincipalArn": publisher})
    assert denies(deny, {"aws:PrincipalArn": client_role})
    assert denies(deny, {"aws:PrincipalArn": "arn:aws:iam::111122223333:role/anyone"})
    assert denies(deny, {})  # anonymous, or a service on someone's behalf
    # async only: an operator tagged for this stack may publish version 0 (start_run)
    assert denies(deny, {"aws:PrincipalArn": client_role, **operator_tagged}) is (synth.mode == "sync")
    wrong_stack = {"aws:PrincipalTag/" + OPERATOR_PUBLISHER_TAG: "another-stack"}
    assert denies(deny, {"aws:PrincipalArn": client_role, **wrong_stack})


# -- the finalize queue ------------------------------------------------------------------------


def test_the_finalize_queue_denies_sends_but_the_state_machines(sync_synth: Synth):
    queue, statements = finalize_queue_statements(sync_synth)
    state_machine = role_arn(sync_synth, "Orchestration/Role/")
    (deny,) = [s for s in statements if s.get("Sid") == FINALIZE_DENY]
    assert deny == {
        "Action": "sqs:SendMessage",
        "Condition": {"ArnNotEquals": {"aws:PrincipalArn": [state_machine]}},
        "Effect": "Deny",
        "Principal": {"AWS": "*"},
        "Resource": {"Fn::GetAtt": [queue, "Arn"]},
        "Sid": FINALIZE_DENY,
    }
    # nothing is allowed by the queue (it is not subscribed to the model topic: no client message
    # carries a token); the only role that may send by its policy is the state machine's
    assert not [s for s in statements if s["Effect"] == "Allow"]
    assert roles_allowed(sync_synth, "sqs:SendMessage", {"Fn::GetAtt": [queue, "Arn"]}) == {
        state_machine["Fn::GetAtt"][0]
    }


def test_the_finalize_queue_deny_stops_every_other_sender(sync_synth: Synth):
    _, statements = finalize_queue_statements(sync_synth)
    (deny,) = [s for s in statements if s.get("Sid") == FINALIZE_DENY]
    state_machine = role_arn(sync_synth, "Orchestration/Role/")
    topic = topic_ref(sync_synth)

    assert not denies(deny, {"aws:PrincipalArn": state_machine})
    assert denies(deny, {"aws:SourceArn": topic})  # not even the model topic
    assert denies(deny, {"aws:SourceArn": "arn:aws:sns:eu-west-1:123456789012:another-topic"})
    for role in ("Clients/site-a/", "Functions/AggregateRole/", "Functions/FinalizeRole/"):
        assert denies(deny, {"aws:PrincipalArn": role_arn(sync_synth, role)}), role
    assert denies(deny, {})


def test_async_mode_has_no_finalize_queue_to_guard(async_synth: Synth):
    statements = [
        s
        for p in async_synth.resources("AWS::SQS::QueuePolicy").values()
        for s in p["Properties"]["PolicyDocument"]["Statement"]
    ]
    assert not [s for s in statements if s.get("Sid") == FINALIZE_DENY]


# -- the state machine's side of the finalize check -------------------------------------------


def test_the_state_machine_marks_the_deadline_before_it_asks_to_finalize(sync_synth: Synth):
    (machine,) = sync_synth.resources("AWS::StepFunctions::StateMachine").values()
    states = json.loads(machine["Properties"]["DefinitionString"])["States"]
    # OpenRound records the round's deadline (opened_at + round_timeout) on the round item
    opened = states["OpenRound"]["Parameters"]["Item"]
    assert opened["opened_at"] == {"S.$": "$$.State.EnteredTime"}
    assert opened["round_timeout"] == {"N.$": "States.JsonToString($.round_timeout)"}
    # the wait's timeout leads through a fresh id, written on the round, to the finalize request
    (timeout,) = [c for c in states["WaitForRound"]["Catch"] if c["ErrorEquals"] == ["States.Timeout"]]
    assert timeout["Next"] == "NewFinalizeId"
    assert states["NewFinalizeId"]["Parameters"] == {"id.$": "States.UUID()"}
    assert states["NewFinalizeId"]["Next"] == "MarkDeadline"
    mark = states["MarkDeadline"]
    assert mark["Resource"] == "arn:aws:states:::dynamodb:updateItem" and mark["Next"] == "FinalizeRound"
    assert mark["Parameters"]["ExpressionAttributeValues"][":id"] == {"S.$": "$.finalize.id"}
    assert "finalize_id = :id" in mark["Parameters"]["UpdateExpression"]
    body = states["FinalizeRound"]["Parameters"]["MessageBody"]
    assert body["finalize_id.$"] == "$.finalize.id" and body["task_token.$"] == "$$.Task.Token"
    assert constants.STATE_MACHINE_DEFINITION.read_text() == machine["Properties"]["DefinitionString"]


def test_the_rounds_task_token_goes_to_the_server_only_queue_never_to_the_topic(sync_synth: Synth):
    (machine,) = sync_synth.resources("AWS::StepFunctions::StateMachine").values()
    states = json.loads(machine["Properties"]["DefinitionString"])["States"]
    for name, state in states.items():
        if "sns:publish" in state.get("Resource", ""):
            assert "waitForTaskToken" not in state["Resource"], name
            assert "$$.Task.Token" not in json.dumps(state["Parameters"]), name
    wait = states["WaitForRound"]
    assert wait["Resource"] == "arn:aws:states:::sqs:sendMessage.waitForTaskToken"
    assert wait["Parameters"]["QueueUrl"] == "${FinalizeQueueUrl}"
    assert wait["Parameters"]["MessageBody"]["type"] == "round_token"
    assert wait["Parameters"]["MessageBody"]["task_token.$"] == "$$.Task.Token"
    assert states["PublishModelReady"]["Next"] == "WaitForRound"
