"""cdk-nag acknowledgments, each with its reason, and the wildcard findings of our own statements.

cdk-nag 3 reports every wildcard of an IAM policy as its own finding (``AwsSolutions-IAM5[...]``) and
has no prefix match, so a statement that needs a wildcard acknowledges exactly the findings it
produces, computed here the way cdk-nag flattens CloudFormation references.
"""

from __future__ import annotations

import json
from typing import Any

from aws_cdk import Acknowledgment, Stack, Validations
from aws_cdk import aws_iam as iam
from constructs import IConstruct

WILDCARD_RULE = "AwsSolutions-IAM5"


def acknowledge(scope: IConstruct, rule_id: str, reason: str) -> None:
    """Acknowledge one cdk-nag finding on ``scope`` and everything below it."""
    Validations.of(scope).acknowledge(Acknowledgment(id=rule_id, reason=reason))


def flatten_reference(node: Any) -> str:
    """A CloudFormation value as cdk-nag prints it: ``{"Fn::GetAtt": ["B", "Arn"]}`` -> ``<B.Arn>``."""
    if node is None:
        return ""
    if isinstance(node, str):
        return node.replace("${", "<").replace("}", ">")
    if isinstance(node, dict):
        if "Fn::Join" in node:
            delimiter, items = node["Fn::Join"]
            return delimiter.join(flatten_reference(item) for item in items)
        if "Fn::Sub" in node:
            return flatten_reference(node["Fn::Sub"])
        if "Fn::GetAtt" in node:
            resource, attribute = node["Fn::GetAtt"]
            return f"<{flatten_reference(resource)}.{flatten_reference(attribute)}>"
        if "Fn::ImportValue" in node:
            return flatten_reference(node["Fn::ImportValue"])
        if "Ref" in node:
            return f"<{flatten_reference(node['Ref'])}>"
    return json.dumps(node, separators=(",", ":"))


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def wildcard_findings(scope: IConstruct, statement: iam.PolicyStatement) -> list[str]:
    """The ``AwsSolutions-IAM5[...]`` finding ids that ``statement`` produces."""
    resolved = Stack.of(scope).resolve(statement.to_statement_json())
    if resolved.get("Effect") != "Allow":
        return []
    findings = [f"Action::{a}" for a in _as_list(resolved.get("Action", [])) if "*" in a]
    for resource in _as_list(resolved.get("Resource", [])):
        flat = flatten_reference(resource)
        if "*" in flat:
            findings.append(f"Resource::{flat}")
    return [f"{WILDCARD_RULE}[{finding}]" for finding in findings]


def acknowledge_wildcards(
    scope: IConstruct, statement: iam.PolicyStatement, reason: str
) -> iam.PolicyStatement:
    """Acknowledge exactly the wildcard findings of ``statement`` on ``scope``, with ``reason``."""
    for finding in wildcard_findings(scope, statement):
        acknowledge(scope, finding, reason)
    return statement


def add_statement(
    role: iam.Role, statement: iam.PolicyStatement, *, wildcard_reason: str | None = None
) -> iam.PolicyStatement:
    """Add ``statement`` to the role's policy; a wildcard in it must come with its reason."""
    findings = wildcard_findings(role, statement)
    if findings and not wildcard_reason:
        raise ValueError(
            f"statement {statement.sid or statement.actions} has wildcards {findings}: give a reason"
        )
    if wildcard_reason:
        acknowledge_wildcards(role, statement, wildcard_reason)
    role.add_to_principal_policy(statement)
    return statement
