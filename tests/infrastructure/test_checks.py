"""The checks every synth must pass: cdk-nag, cfn-lint and the ASL validator."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from aws_cdk import App, Stack, Validations, assertions
from aws_cdk import aws_s3 as s3
from fedstream.stacks.fedstream_stack import add_checks

from tests.infrastructure.conftest import Synth

# CDK puts an explicit DependsOn on a function's role next to the GetAtt that already implies it.
CFN_LINT_IGNORED = ("W3005",)
SAMPLE_SUBSTITUTIONS = {
    "TopicArn": "arn:aws:sns:eu-west-1:123456789012:fedstream-model-events",
    "RunTable": "fedstream-runs",
    "FinalizeQueueUrl": "https://sqs.eu-west-1.amazonaws.com/123456789012/fedstream-finalize",
}


def test_cdk_nag_reports_nothing_unacknowledged(synth: Synth):
    # The fixture's synth would have raised on any finding; the report it wrote says so too.
    report = json.loads((synth.outdir / "validation-report.json").read_text())
    failures = [
        r for r in report["pluginReports"] if r.get("conclusion") != "success" and r.get("violations")
    ]
    assert failures == []


def test_cdk_nag_is_really_checking():
    # GIVEN an app with the same checks and a bucket that breaks two AWS Solutions rules
    app = App(context={"aws:cdk:bundling-stacks": []})
    stack = Stack(app, "Probe")
    s3.Bucket(stack, "Leaky")
    add_checks(app)
    # WHEN it synthesizes THEN the findings fail the synth
    with pytest.raises(RuntimeError, match=r"AwsSolutions-S10"):
        assertions.Template.from_stack(stack)


def test_every_acknowledgment_names_its_reason(synth: Synth):
    acknowledged = []
    for construct in synth.stack.node.find_all():
        for entry in construct.node.metadata:
            if entry.type == Validations.ACKNOWLEDGED_RULES_METADATA_KEY:
                acknowledged.extend(entry.data.items())
    assert acknowledged, "expected the wildcard and runtime acknowledgments"
    for rule, reason in acknowledged:
        text = reason if isinstance(reason, str) else json.dumps(reason)
        assert len(text.strip()) > 20, rule


def test_cfn_lint_finds_no_errors_in_either_template(sync_synth: Synth, async_synth: Synth, tmp_path: Path):
    paths = []
    for synth in (sync_synth, async_synth):
        path = tmp_path / f"fedstream-{synth.mode}.template.json"
        path.write_text(json.dumps(synth.json, indent=1))
        paths.append(str(path))
    cfn_lint = Path(sys.executable).with_name("cfn-lint")
    command = [
        str(cfn_lint) if cfn_lint.exists() else "cfn-lint",
        "--ignore-checks",
        *CFN_LINT_IGNORED,
        "--",
        *paths,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_deployed_state_machine_definition_is_valid_asl(sync_synth: Synth, tmp_path: Path):
    npx = shutil.which("npx")
    if npx is None:
        pytest.skip("npx (Node.js) is not installed: the ASL validator (npm asl-validator) cannot run")
    (machine,) = sync_synth.resources("AWS::StepFunctions::StateMachine").values()
    definition = machine["Properties"]["DefinitionString"]
    assert set(machine["Properties"]["DefinitionSubstitutions"]) == set(SAMPLE_SUBSTITUTIONS)
    for name, value in SAMPLE_SUBSTITUTIONS.items():
        definition = definition.replace("${" + name + "}", value)
    assert "${" not in definition
    path = tmp_path / "state_machine.asl.json"
    path.write_text(definition)
    result = subprocess.run(
        [npx, "--yes", "asl-validator", "--json-path", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if result.returncode != 0 and "is invalid" not in result.stdout + result.stderr:
        pytest.skip(f"asl-validator could not be fetched or run: {result.stderr.strip()[-300:]}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is valid" in result.stdout
