"""`fedstream aggregate` and `fedstream privacy`, run the way a user runs them."""

from __future__ import annotations

import json

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp

from fedstream.cli import main
from fedstream.weights import load_file, save_file


@pytest.fixture
def files(tmp_path):
    """A global model (version 4) and two client updates with 1 and 3 examples."""
    save_file(tmp_path / "global.safetensors", {"w": np.zeros((2, 2), np.float32)}, {"version": "4"})
    save_file(tmp_path / "a.safetensors", {"w": np.array([[1, 2], [3, 4]], np.float32)})
    save_file(tmp_path / "b.safetensors", {"w": np.array([[5, 6], [7, 8]], np.float32)})
    return tmp_path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def aggregate(files, *extra: str) -> list[str]:
    return [
        "aggregate",
        "--global",
        str(files / "global.safetensors"),
        "-o",
        str(files / "out.safetensors"),
        *extra,
    ]


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err


def test_fedavg_aggregate_writes_the_weighted_mean_and_prints_metrics(files, capsys):
    a, b = files / "a.safetensors", files / "b.safetensors"

    code, out, err = run(capsys, *aggregate(files, "--aggregator", "fedavg", f"{a}:1", f"{b}:3"))

    assert code == 0, err
    weights, metadata = load_file(files / "out.safetensors")
    np.testing.assert_allclose(weights["w"], [[4.0, 5.0], [6.0, 7.0]])  # (1*a + 3*b) / 4
    assert weights["w"].dtype == np.float32
    assert metadata["aggregator"] == "fedavg"
    assert (metadata["version"], metadata["parent_version"]) == ("5", "4")
    assert metadata["creator"] == "fedstream aggregate"
    assert metadata["created_at"].startswith("20")
    report = json.loads(out)
    assert report["metrics"] == {"num_clients": 2.0, "num_examples": 4.0}
    assert report["version"] == 5


def test_dp_noise_aggregate_prints_epsilon(files, capsys):
    a, b = files / "a.safetensors", files / "b.safetensors"
    params = ["--param", "clip_norm=1.0", "--param", "noise_multiplier=1.1", "--param", "sample_rate=0.5"]

    code, out, err = run(
        capsys,
        *aggregate(
            files, "--aggregator", "dp-noise", *params, "--round", "3", "--seed", "1", f"{a}:1", f"{b}:3"
        ),
    )

    assert code == 0, err
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(0.5, dp_accounting.GaussianDpEvent(1.1)), 3)
    report = json.loads(out)
    assert report["metrics"]["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5))
    assert report["metrics"]["clipped_fraction"] == 1.0  # both updates move further than 1
    assert report["carry"] == {"clip_norm": 1.0}


def test_async_updates_are_applied_in_order_with_their_staleness(files, capsys):
    a, b = files / "a.safetensors", files / "b.safetensors"
    params = ["--param", "staleness_function=constant", "--param", "alpha=0.5"]

    # GIVEN global version 4; a was trained on version 4, b on version 3
    code, out, err = run(
        capsys, *aggregate(files, "--aggregator", "fedasync", *params, f"{a}:10:4", f"{b}:10:3")
    )

    assert code == 0, err
    weights, metadata = load_file(files / "out.safetensors")
    first = 0.5 * np.array([[1, 2], [3, 4]])
    np.testing.assert_allclose(weights["w"], 0.5 * first + 0.5 * np.array([[5, 6], [7, 8]]))
    assert (metadata["version"], metadata["parent_version"]) == ("6", "4")
    report = json.loads(out)
    assert [u["staleness"] for u in report["updates"]] == [0, 2]  # b's base 3 is 2 behind version 5


def test_fedbuff_takes_base_weights_from_base_options(files, capsys):
    a, b = files / "a.safetensors", files / "b.safetensors"
    save_file(files / "v3.safetensors", {"w": np.ones((2, 2), np.float32)})
    argv = aggregate(files, "--aggregator", "fedbuff", "--param", "buffer_size=2", f"{a}:1:4", f"{b}:1:3")

    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, "--base 3=PATH")

    code, out, err = run(capsys, *argv, "--base", f"3={files / 'v3.safetensors'}")
    assert code == 0, err
    weights, _ = load_file(files / "out.safetensors")
    delta_a, delta_b = np.array([[1, 2], [3, 4]]), np.array([[5, 6], [7, 8]]) - 1
    np.testing.assert_allclose(weights["w"], (delta_a + delta_b / np.sqrt(2)) / 2, rtol=1e-6)
    assert json.loads(out)["pending_updates"] == 0


def test_privacy_prints_epsilon_after_t_rounds(capsys):
    code, out, _ = run(capsys, "privacy", "--noise-multiplier", "1.0", "--sample-rate", "1", "--rounds", "10")

    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(1.0), 10)
    assert code == 0
    assert out.startswith(f"epsilon = {accountant.get_epsilon(1e-5):.4f} after 10 rounds")


def test_privacy_prints_how_many_rounds_fit_a_budget(capsys):
    argv = ["privacy", "--noise-multiplier", "3.0", "--sample-rate", "1", "--epsilon", "8", "--delta", "1e-5"]
    code, out, _ = run(capsys, *argv, "--json")

    report = json.loads(out)
    assert code == 0
    rounds = report["rounds"]
    assert report["epsilon"] <= 8.0
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(3.0), rounds + 1)
    assert accountant.get_epsilon(1e-5) > 8.0

    code, out, _ = run(capsys, *argv)
    assert out.startswith(f"{rounds} rounds fit within epsilon 8")


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--aggregator", "fedavgg", "{a}:1"], "unknown aggregator 'fedavgg'"),
        (["--aggregator", "fedavg", "--param", "weighted=maybe", "{a}:1"], "weighted"),
        (["--aggregator", "fedavg", "--param", "bogus=1", "{a}:1"], "bogus"),
        (["--aggregator", "fedavg", "--param", "novalue", "{a}:1"], "key=value"),
        (["--aggregator", "fedavg", "{a}"], "PATH:NUM_EXAMPLES"),
        (["--aggregator", "fedavg", "{a}:many"], "whole numbers"),
        (["--aggregator", "fedavg", "{a}:1", "{missing}:1"], "No such file"),
        (["--aggregator", "fedavg", "{shape}:1"], "shape"),
        (["--aggregator", "dp-noise", "--param", "clip_norm=1", "{a}:1"], "noise_multiplier"),
        (["--aggregator", "fedasync", "{a}:1"], "PATH:NUM_EXAMPLES:BASE_VERSION"),
        (["--aggregator", "fedasync", "{a}:1:9"], "newer than version 4"),
        (["--aggregator", "fedasync", "{a}:1:0", "--param", "max_staleness=2"], "stale"),
        (["--aggregator", "fedbuff", "{a}:1:4"], "no new version"),
    ],
)
def test_bad_input_is_one_line_on_stderr_and_exit_2(files, capsys, extra, fragment):
    save_file(files / "shape.safetensors", {"w": np.zeros((4,), np.float32)})
    paths = {
        "a": files / "a.safetensors",
        "missing": files / "missing.safetensors",
        "shape": files / "shape.safetensors",
    }
    argv = aggregate(files, *[e.format(**paths) for e in extra])

    code, _, err = run(capsys, *argv)

    assert_one_line_error(code, err, fragment)
    assert err.startswith("fedstream aggregate: error:")
    assert not (files / "out.safetensors").exists()


def test_a_file_that_is_not_a_model_is_refused(files, capsys):
    (files / "evil.safetensors").write_bytes(b"\x80\x04K\x01.")  # a pickle

    code, _, err = run(capsys, *aggregate(files, "--aggregator", "fedavg", f"{files / 'evil.safetensors'}:1"))

    assert_one_line_error(code, err, "pickle")


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--noise-multiplier", "-1", "--rounds", "3"], "--noise-multiplier"),
        (["--noise-multiplier", "1", "--sample-rate", "2", "--rounds", "3"], "--sample-rate"),
        (["--noise-multiplier", "1", "--epsilon", "0"], "--epsilon"),
        (["--noise-multiplier", "1", "--rounds", "3", "--delta", "1"], "--delta"),
    ],
)
def test_bad_privacy_arguments_are_one_line_errors(capsys, argv, fragment):
    code, _, err = run(capsys, "privacy", *argv)
    assert_one_line_error(code, err, fragment)


def test_arguments_argparse_rejects_exit_2_without_a_traceback(capsys):
    with pytest.raises(SystemExit) as info:
        main(["privacy", "--noise-multiplier", "1"])  # neither --rounds nor --epsilon
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert "one of the arguments --rounds --epsilon is required" in err
    assert "Traceback" not in err
