"""``fedstream local`` refuses bad arguments before anything starts, ``--help`` shows the defaults,
and a reader closing the pipe (``fedstream ... | head``) ends the command quietly."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fedstream.client import data

import fedstream.local.run as local_run
from fedstream.cli import build_parser, main
from fedstream.local.cli import check_arguments

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION": "20"}


@pytest.fixture
def nothing_starts(monkeypatch: pytest.MonkeyPatch) -> list[local_run.LocalRunConfig]:
    """Fail the test if the embedded AWS would start; record the configs handed to ``run_local``."""

    def no_aws(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the embedded AWS was started")

    reached: list[local_run.LocalRunConfig] = []

    def fake_run_local(config: local_run.LocalRunConfig) -> object:
        reached.append(config)
        return argparse.Namespace(status="SUCCEEDED")

    monkeypatch.setattr(local_run, "EmbeddedAWS", no_aws)
    monkeypatch.setattr(local_run, "run_local", fake_run_local)
    return reached


@pytest.fixture
def no_fashion_mnist(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    empty = tmp_path / "no-fashion-mnist"
    empty.mkdir()
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", empty)


def _existing_file(tmp_path: Path) -> str:
    path = tmp_path / "a-file"
    path.write_text("not a directory")
    return str(path)


BAD = [
    (["--trainer", "bogus"], "--trainer", "unknown trainer 'bogus'"),
    (["--trainer", "nosuchmod:fn"], "--trainer", "cannot import 'nosuchmod'"),
    (["--trainer", "os:no_such_function"], "--trainer", "has no 'no_such_function'"),
    (["--trainer", "os:sep"], "--trainer", "is not callable"),
    (["--trainer", "instant:abc"], "--trainer", "whole number"),
    (["--trainer", "instant:0"], "--trainer", "whole number"),
    (["--partition", "dirichlet:abc"], "--partition", "ALPHA must be a number > 0"),
    (["--partition", "dirichlet:0"], "--partition", "ALPHA must be a number > 0"),
    (["--partition", "dirichlet:-1"], "--partition", "ALPHA must be a number > 0"),
    (["--partition", "shards:0"], "--partition", "S must be an integer >= 1"),
    (["--partition", "shards:1.5"], "--partition", "S must be an integer >= 1"),
    (["--partition", "random"], "--partition", "unknown partition scheme 'random'"),
    (["--dataset", "fashion-mnist"], "--dataset", "apt-get install dataset-fashion-mnist"),
    (["--rounds", "0"], "--rounds", "at least 1, got 0"),
    (["--updates", "0"], "--updates", "at least 1, got 0"),
    (["--clients", "0"], "--clients", "at least 1, got 0"),
    (["--clients", "-2"], "--clients", "at least 1, got -2"),
    (["--epochs", "0"], "--epochs", "at least 1"),
    (["--batch-size", "0"], "--batch-size", "at least 1"),
    (["--round-timeout", "0"], "--round-timeout", "at least 1"),
    (["--seed", "-1"], "--seed", "at least 0"),
    (["--min-clients", "5"], "--min-clients", "between 1 and --clients (3)"),
    (["--max-seconds", "-1"], "--max-seconds", "0 (no limit) or more"),
    (["--learning-rate", "0"], "--learning-rate", "> 0"),
    (["--target-accuracy", "1.5"], "--target-accuracy", "(0, 1]"),
    (["--stragglers", "4:2"], "--stragglers", "between 0 and --clients (3)"),
    (["--out", "{file}"], "--out", "exists and is not a directory"),
    (["--out", "{file}/run"], "--out", "cannot create it"),
    (["--out", "{full}"], "--out", "not empty; name a new folder, leave --out out (a new runs/RUN-ID/)"),
    (["--aggregator", "bogus"], "--aggregator", "unknown aggregator 'bogus'; choose one of dp-noise"),
    (["--mode", "async", "--aggregator", "fedavg"], "--aggregator", "runs in sync mode, not --mode async"),
    (["--mode", "sync", "--aggregator", "fedbuff"], "--aggregator", "runs in async mode, not --mode sync"),
    (["--aggregator", "fedprox", "--param", "mu=abc"], "--param", "mu: Input should be a valid number"),
    (["--aggregator", "fedavg", "--param", "mu"], "--param", "expects key=value"),
    (["--aggregator", "dp-noise", "--param", "clip_norm=1"], "--param", "noise_multiplier: Field required"),
    (["--mode", "async", "--aggregator", "fedbuff", "--clients", "1"], "--clients", "needs at least 2"),
    (["--fault", "nonsense"], "--fault", "unknown fault"),
    (["--fault", "kill:site-7"], "--fault", "no client 'site-7' in this run"),
    (["--attack", "site-9=sign-flip:2"], "--attack", "site-9: not a client of this run (site-1..site-3)"),
    (["--attack", "site-1=bogus"], "--attack", "unknown attack 'bogus'"),
    (["--attack", "site-1"], "--attack", "expects CLIENT=SPEC"),
]


@pytest.mark.usefixtures("no_fashion_mnist")
@pytest.mark.parametrize(("argv", "option", "fragment"), BAD, ids=[" ".join(a) for a, _, _ in BAD])
def test_a_bad_argument_is_one_line_naming_the_option_and_exit_2_before_anything_starts(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    nothing_starts: list[local_run.LocalRunConfig],
    argv: list[str],
    option: str,
    fragment: str,
) -> None:
    full = tmp_path / "earlier-run"
    full.mkdir()
    (full / "metrics.json").write_text("{}")
    argv = [a.replace("{file}", _existing_file(tmp_path)).replace("{full}", str(full)) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "run")]

    code = main(["local", "--no-progress", *argv])

    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"fedstream local: error: {option}"), err
    assert fragment in err, err
    assert "Traceback" not in err
    assert nothing_starts == []
    assert not (tmp_path / "run").exists()


def test_good_arguments_reach_run_local_unchanged(
    tmp_path: Path, nothing_starts: list[local_run.LocalRunConfig]
) -> None:
    module = tmp_path / "my_trainer.py"
    module.write_text("def make(**_):\n    raise AssertionError('not called by the checks')\n")
    spec = f"{module}:make"

    code = main(
        [
            "local",
            "--no-progress",
            "--trainer",
            spec,
            "--partition",
            "dirichlet:0.5",
            "--rounds",
            "1",
            "--clients",
            "2",
            "--out",
            str(tmp_path / "new" / "run"),
        ]
    )

    assert code == 0
    [config] = nothing_starts
    assert (config.trainer, config.partition, config.rounds, config.clients) == (spec, "dirichlet:0.5", 1, 2)
    assert not (tmp_path / "new").exists()  # the checks create nothing


@pytest.mark.parametrize("trainer", ["keras", "numpy", "instant", "instant:50"])
@pytest.mark.parametrize("partition", ["iid", "dirichlet:0.1", "shards:2"])
def test_the_documented_trainers_and_partitions_pass(tmp_path: Path, trainer: str, partition: str) -> None:
    args = build_parser().parse_args(
        ["local", "--trainer", trainer, "--partition", partition, "--out", str(tmp_path)]
    )

    check_arguments(args)


def test_fashion_mnist_passes_when_its_files_are_there(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte"):
        (tmp_path / f"{stem}.gz").write_bytes(b"")
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"")
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path)

    check_arguments(
        build_parser().parse_args(["local", "--dataset", "fashion-mnist", "--out", str(tmp_path / "run")])
    )


def test_a_user_module_that_fails_to_import_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, nothing_starts: list[local_run.LocalRunConfig]
) -> None:
    module = tmp_path / "broken.py"
    module.write_text("def make(:\n")

    code = main(["local", "--trainer", f"{module}:make", "--out", str(tmp_path / "run")])

    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("fedstream local: error: --trainer") and "SyntaxError" in err, err
    assert nothing_starts == []


def test_the_checks_do_not_import_tensorflow(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from fedstream.cli import build_parser\n"
        "from fedstream.local.cli import check_arguments\n"
        f"args = build_parser().parse_args(['local', '--trainer', 'keras', '--out', {str(tmp_path)!r}])\n"
        "check_arguments(args)\n"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'TensorFlow was imported'\n"
    )

    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=ENV, capture_output=True, text=True)

    assert done.returncode == 0, done.stderr


def test_help_shows_the_defaults_and_every_trainer_kind(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "400")

    with pytest.raises(SystemExit) as exit_:
        main(["local", "--help"])

    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "keras | numpy | instant[:N] | module:function" in out
    for default in (
        "(default: 3)",
        "(default: 20)",
        "(default: iid)",
        "(default: keras)",
        "(default: a new runs/RUN-ID/, with runs/latest pointing at it)",
    ):
        assert default in out, default
    assert "(default: None)" not in out and "(default: False)" not in out


def _plugins_list_json() -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from fedstream.cli import main; sys.exit(main())",
            "plugins",
            "list",
            "--json",
        ],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_a_reader_closing_the_pipe_before_any_output_ends_the_command_quietly() -> None:
    process = _plugins_list_json()
    process.stdout.close()  # the reader is gone before the command writes a byte: EPIPE for sure

    err = process.stderr.read().decode()
    code = process.wait(timeout=120)

    assert code == 141, err
    assert "Broken pipe" not in err and "Traceback" not in err and "Exception ignored" not in err, err
    assert err == ""


def test_a_reader_closing_the_pipe_after_one_line_ends_the_command_quietly() -> None:
    process = _plugins_list_json()
    first = process.stdout.readline()
    process.stdout.close()

    err = process.stderr.read().decode()
    code = process.wait(timeout=120)

    assert first.strip()
    assert code in (0, 141), err
    assert "Broken pipe" not in err and "Traceback" not in err and "Exception ignored" not in err, err


def test_a_broken_pipe_that_is_not_stdout_is_still_an_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def broken(_config: object) -> object:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(local_run, "run_local", broken)

    code = main(["local", "--out", str(tmp_path)])

    assert code == 2
    assert "fedstream local: error: [Errno 32] Broken pipe" in capsys.readouterr().err


def test_an_earlier_runs_folder_is_taken_with_overwrite(
    tmp_path: Path, nothing_starts: list[local_run.LocalRunConfig]
) -> None:
    (tmp_path / "metrics.json").write_text("{}")

    code = main(["local", "--no-progress", "--out", str(tmp_path), "--overwrite"])

    assert code == 0
    [config] = nothing_starts
    assert config.out == tmp_path


def test_without_out_each_run_gets_a_new_folder_and_runs_latest_points_at_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, nothing_starts: list[local_run.LocalRunConfig]
) -> None:
    monkeypatch.chdir(tmp_path)

    assert main(["local", "--no-progress"]) == 0
    assert main(["local", "--no-progress"]) == 0

    first, second = nothing_starts
    assert first.run_id != second.run_id
    assert (first.out, second.out) == (Path("runs", first.run_id), Path("runs", second.run_id))
    assert first.out.is_dir() and second.out.is_dir()
    assert os.readlink("runs/latest") == second.run_id
    assert Path("runs/latest").resolve() == second.out.resolve()
