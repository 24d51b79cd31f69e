"""One synth per mode per test session, Lambda bundling skipped (``aws:cdk:bundling-stacks`` = [])."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")

from aws_cdk import App, assertions
from fedstream.stacks.fedstream_stack import FedstreamStack, create_stack

REPO_ROOT = Path(__file__).resolve().parents[2]
CLIENTS = ("site-a", "site-b", "site-c")
PARTNER_ACCOUNT = "111122223333"
EXTERNAL_ID = "fedstream-site-b"
TRUST_ANCHOR = (
    "arn:aws:rolesanywhere:eu-west-1:444455556666:trust-anchor/0b7a1d2c-1111-2222-3333-444455556666"
)
CLIENT_TRUST = {
    "site-b": {"kind": "account", "account_id": PARTNER_ACCOUNT, "external_id": EXTERNAL_ID},
    "site-c": {"kind": "roles-anywhere", "trust_anchor_arn": TRUST_ANCHOR},
}
MODE_CONTEXT = {
    "sync": {
        "aggregator": "fedprox",
        "aggregator_params": '{"mu": 0.05}',
        "rounds": "5",
        "round_timeout": "900",
    },
    "async": {"aggregator": "fedasync"},
}


def feature_flags() -> dict[str, Any]:
    """The context of cdk.json, so the tests synthesize what ``cdk deploy`` would."""
    return dict(json.loads((REPO_ROOT / "cdk.json").read_text())["context"])


def deploy_context(mode: str, **overrides: Any) -> dict[str, Any]:
    return {
        **feature_flags(),
        "aws:cdk:bundling-stacks": [],
        # The CDK CLI turns this on; the tests find resources by their construct path.
        "aws:cdk:enable-path-metadata": True,
        "mode": mode,
        "clients": ",".join(CLIENTS),
        "client_trust": json.dumps(CLIENT_TRUST),
        **MODE_CONTEXT[mode],
        **overrides,
    }


def render(value: Any) -> Any:
    """CloudFormation intrinsics as readable placeholders: Ref X -> "<X>", GetAtt X.Arn -> "<X.Arn>"."""
    if isinstance(value, list):
        return [render(v) for v in value]
    if isinstance(value, dict):
        if "Ref" in value:
            return f"<{value['Ref']}>"
        if "Fn::GetAtt" in value:
            resource, attribute = value["Fn::GetAtt"]
            return f"<{resource}.{attribute}>"
        if "Fn::Join" in value:
            delimiter, items = value["Fn::Join"]
            return delimiter.join(str(render(item)) for item in items)
        return {k: render(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class Synth:
    mode: str
    stack: FedstreamStack
    template: assertions.Template
    outdir: Path

    @property
    def json(self) -> dict[str, Any]:
        return self.template.to_json()

    def resources(self, resource_type: str) -> dict[str, dict[str, Any]]:
        return {k: v for k, v in self.json["Resources"].items() if v["Type"] == resource_type}


def synthesize(mode: str, outdir: Path, **overrides: Any) -> Synth:
    app = App(context=deploy_context(mode, **overrides), outdir=str(outdir))
    stack = create_stack(app)
    # Template.from_stack synthesizes the app: cdk-nag and CDK's own checks run, a finding raises.
    template = assertions.Template.from_stack(stack)
    return Synth(mode=mode, stack=stack, template=template, outdir=outdir)


@pytest.fixture(scope="session")
def synth_mode(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Synth]]:
    cache: dict[str, Synth] = {}

    def get(mode: str) -> Synth:
        if mode not in cache:
            cache[mode] = synthesize(mode, tmp_path_factory.mktemp(f"cdk-{mode}"))
        return cache[mode]

    yield get


@pytest.fixture(scope="session")
def sync_synth(synth_mode: Callable[[str], Synth]) -> Synth:
    return synth_mode("sync")


@pytest.fixture(scope="session")
def async_synth(synth_mode: Callable[[str], Synth]) -> Synth:
    return synth_mode("async")


@pytest.fixture(params=["sync", "async"])
def synth(request: pytest.FixtureRequest, synth_mode: Callable[[str], Synth]) -> Synth:
    return synth_mode(request.param)
