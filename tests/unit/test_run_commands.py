"""``fedstream run``: finding the deployment from an outputs file (``cdk deploy --outputs-file``'s
nesting or flat), and the mistakes refused on one line before any AWS call."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedstream.cli import CliError, main
from fedstream.runs import Deployment, load_outputs

OUTPUTS = {
    "Mode": "sync",
    "Aggregator": "fedprox",
    "Region": "eu-west-1",
    "BucketName": "models",
    "RunTableName": "runs",
    "UpdatesTableName": "updates",
    "TopicArn": "arn:aws:sns:eu-west-1:123456789012:model-ready",
    "StateMachineArn": "arn:aws:states:eu-west-1:123456789012:stateMachine:rounds",
    "RunInputDefaults": json.dumps({"rounds": 5, "client_settings": {"proximal_mu": 0.05}}),
    "ClientSiteAConfig": json.dumps({"client_id": "site-a", "queue_url": "https://sqs/q-a"}),
    "ClientSiteARoleArn": "arn:aws:iam::123456789012:role/site-a",
}


@pytest.mark.parametrize("nested", [True, False])
def test_an_outputs_file_loads_nested_under_its_stack_or_flat(tmp_path: Path, nested: bool) -> None:
    path = tmp_path / "outputs.json"
    path.write_text(json.dumps({"fedstream-prod": OUTPUTS} if nested else OUTPUTS))

    deployment = Deployment.from_outputs(load_outputs(path))

    assert (deployment.mode, deployment.aggregator, deployment.region) == ("sync", "fedprox", "eu-west-1")
    assert deployment.run_defaults["client_settings"] == {"proximal_mu": 0.05}
    assert list(deployment.clients) == ["site-a"] and deployment.endpoint_url is None


def test_outputs_that_are_not_a_fedstream_stacks_are_refused_naming_what_is_missing() -> None:
    with pytest.raises(CliError, match="lack BucketName, RunTableName"):
        Deployment.from_outputs({k: v for k, v in OUTPUTS.items() if k not in ("BucketName", "RunTableName")})


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["run", "status", "run-1"], "name the deployment: --outputs FILE"),
        (["run", "list", "--outputs", "{missing}"], "No such file or directory"),
        (["run", "list", "--outputs", "{junk}"], "not JSON"),
        (["run", "start", "--outputs", "{outputs}"], "--dataset is needed to make the initial model"),
        (["run", "start", "--outputs", "{outputs}", "--model", "{junk}"], "not a fedstream model"),
        (
            ["run", "start", "--outputs", "{outputs}", "--rounds", "0", "--dataset", "digits"],
            "--rounds must be",
        ),
        (["run", "start", "--outputs", "{async}", "--updates", "-1"], "--updates and --max-seconds"),
        (["model", "export", "--dataset", "digits", "--out", "x"], "give the model: a .safetensors file"),
    ],
)
def test_run_command_mistakes_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str
) -> None:
    (tmp_path / "outputs.json").write_text(json.dumps(OUTPUTS))
    (tmp_path / "async.json").write_text(json.dumps({**OUTPUTS, "Mode": "async"}))
    (tmp_path / "junk").write_text("not json, not safetensors")
    files = {
        "{missing}": "missing.json",
        "{junk}": "junk",
        "{outputs}": "outputs.json",
        "{async}": "async.json",
    }
    argv = [str(tmp_path / files[a]) if a in files else a for a in argv]

    code = main(argv)

    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert fragment in err, err


@pytest.mark.parametrize(
    ("started", "finished", "line"),
    [
        # Step Functions' $$.Execution.StartTime and $$.State.EnteredTime (sync)
        (
            "2026-12-02T17:25:03.192Z",
            "2026-12-02T17:26:15.900Z",
            "started 2026-12-02 17:25:03 UTC, finished 2026-12-02 17:26:15 UTC (1 min 13 s)",
        ),
        # Python's isoformat (async), a run still going, and a run item without times
        ("2026-12-02T17:25:03.192+00:00", None, "started 2026-12-02 17:25:03 UTC"),
        (None, None, None),
    ],
)
def test_run_status_says_when_a_run_started_and_how_long_it_took(
    started: str | None, finished: str | None, line: str | None
) -> None:
    from fedstream.runs import status_lines

    status = {"run_id": "r", "mode": "sync", "status": "SUCCEEDED", "version": 2, "rounds": []}
    lines = status_lines(status | {"started_at": started, "finished_at": finished})
    assert lines[1:] == ([f"  {line}"] if line else [])
