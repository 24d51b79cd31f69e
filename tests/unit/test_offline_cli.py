"""`fedstream aggregate` and `fedstream privacy`, run the way a user runs them."""

from __future__ import annotations

import json

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp

from fedstream.cli import main
from fedstream.weights import load_file, save_file, sha256_hex


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


# --- influence bounds ------------------------------------------------------------------------------


@pytest.fixture
def round_files(files):
    """Three honest updates of global version 4 (zeros), moved by 1, 2 and 3; a huge one; a copy."""
    for name, by in [("h1", 1.0), ("h2", 2.0), ("h3", 3.0), ("huge", 1e4), ("copy", 0.0)]:
        save_file(files / f"{name}.safetensors", {"w": np.full((2, 2), by, np.float32)})
    return files


def refused_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("refused ")]


def output(files) -> np.ndarray:
    return load_file(files / "out.safetensors")[0]["w"]


def updates(files, *specs: str) -> list[str]:
    """``"h1:10"`` -> ``"<files>/h1.safetensors:10"``."""
    return [f"{files / name}.safetensors:{rest}" for name, _, rest in (spec.partition(":") for spec in specs)]


def test_a_huge_norm_update_is_refused_and_the_others_are_averaged(round_files, capsys):
    argv = aggregate(
        round_files, "--aggregator", "fedavg", *updates(round_files, "h1:10", "huge:10", "h2:10", "h3:10")
    )

    code, _, err = run(capsys, *argv)

    assert code == 0, err
    (line,) = refused_lines(err)
    assert line.startswith(f"refused {round_files / 'huge.safetensors'}: norm_bound (")
    assert "more than 10x the median" in line
    np.testing.assert_allclose(output(round_files), np.full((2, 2), 2.0))  # the mean of 1, 2 and 3


def test_a_copy_of_the_global_model_is_refused_as_no_change(round_files, capsys):
    argv = aggregate(
        round_files, "--aggregator", "fedavg", *updates(round_files, "h1:10", "copy:10", "h3:10")
    )

    code, _, err = run(capsys, *argv)

    assert code == 0, err
    (line,) = refused_lines(err)
    assert line.startswith(f"refused {round_files / 'copy.safetensors'}: no_change (")
    np.testing.assert_allclose(output(round_files), np.full((2, 2), 2.0))


def test_an_inflated_example_count_is_capped_at_4x_the_median(round_files, capsys):
    argv = aggregate(
        round_files, "--aggregator", "fedavg", *updates(round_files, "h1:10", "h2:10", "h3:100000")
    )

    code, _, err = run(capsys, *argv)

    assert code == 0, err
    assert refused_lines(err) == []
    # h3 counts as 4 x median(10, 10, 100000) = 40 examples, not 100000
    np.testing.assert_allclose(
        output(round_files), np.full((2, 2), (10 * 1 + 10 * 2 + 40 * 3) / 60), rtol=1e-6
    )


def test_with_no_bounds_the_huge_update_is_averaged_in(round_files, capsys):
    argv = aggregate(
        round_files,
        "--aggregator",
        "fedavg",
        "--no-bounds",
        *updates(round_files, "h1:10", "huge:10", "h2:10", "h3:10"),
    )

    code, _, err = run(capsys, *argv)

    assert code == 0, err
    assert refused_lines(err) == []
    np.testing.assert_allclose(output(round_files), np.full((2, 2), (1 + 1e4 + 2 + 3) / 4))


def test_bound_options_set_the_bounds(round_files, capsys):
    # max_update_norm holds from the first update; h3 moves by 3 in 4 weights: norm 6
    argv = aggregate(
        round_files,
        "--aggregator",
        "fedavg",
        "--no-bounds",
        "--bound",
        "max_update_norm=5",
        *updates(round_files, "h1:10", "h3:10"),
    )
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    (line,) = refused_lines(err)
    assert line.startswith(f"refused {round_files / 'h3.safetensors'}: norm_bound (")
    assert "max_update_norm 5" in line
    np.testing.assert_allclose(output(round_files), np.ones((2, 2)))

    # norm_factor=20000 lets the huge one in; "none" turns an absolute bound off
    argv = aggregate(
        round_files,
        "--aggregator",
        "fedavg",
        "--bound",
        "norm_factor=20000",
        "--bound",
        "max_update_norm=none",
        *updates(round_files, "h1:10", "huge:10", "h2:10", "h3:10"),
    )
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    assert refused_lines(err) == []


def test_when_every_update_is_refused_the_command_fails_and_writes_nothing(round_files, capsys):
    save_file(round_files / "copy2.safetensors", {"w": np.zeros((2, 2), np.float32)}, {"other": "metadata"})
    argv = aggregate(round_files, "--aggregator", "fedavg", *updates(round_files, "copy:10", "copy2:10"))

    code, _, err = run(capsys, *argv)

    assert code == 2
    assert len(refused_lines(err)) == 2
    assert all(": no_change (" in line for line in refused_lines(err))
    assert "fedstream aggregate: error: no update was aggregated: all 2 were refused" in err
    assert not (round_files / "out.safetensors").exists()


def test_the_same_update_twice_is_refused_as_a_duplicate(round_files, capsys):
    save_file(round_files / "h1-again.safetensors", {"w": np.full((2, 2), 1.0, np.float32)})
    argv = aggregate(
        round_files, "--aggregator", "fedavg", *updates(round_files, "h1:10", "h2:10", "h1:10", "h1-again:10")
    )

    code, _, err = run(capsys, *argv)

    assert code == 0, err
    h1, again = round_files / "h1.safetensors", round_files / "h1-again.safetensors"
    assert refused_lines(err) == [
        f"refused {h1}: duplicate ({h1} is given more than once)",
        f"refused {again}: duplicate (the same bytes as {h1} (sha256 {sha256_hex(h1.read_bytes())}))",
    ]
    np.testing.assert_allclose(output(round_files), np.full((2, 2), 1.5))


def test_async_updates_are_judged_against_the_norms_of_the_updates_taken(round_files, capsys):
    # GIVEN fedasync (x <- x/2 + u/2), three honest updates, then a huge one and a copy of the base
    params = ["--param", "staleness_function=constant", "--param", "alpha=0.5"]
    specs = ("h1:10:4", "h2:10:4", "copy:10:4", "h3:10:4", "huge:10:4")
    argv = aggregate(round_files, "--aggregator", "fedasync", *params, *updates(round_files, *specs))

    code, _, err = run(capsys, *argv)

    # THEN the copy is refused; the huge one is refused once three norms are known
    assert code == 0, err
    copy, huge = refused_lines(err)
    assert copy.startswith(f"refused {round_files / 'copy.safetensors'}: no_change (")
    assert huge.startswith(f"refused {round_files / 'huge.safetensors'}: norm_bound (")
    x = 0.5 * (0.5 * (0.5 * 0 + 0.5 * 1) + 0.5 * 2) + 0.5 * 3  # h1, h2, h3 applied in turn
    np.testing.assert_allclose(output(round_files), np.full((2, 2), x))

    # WITH --no-bounds only the copy is refused (it changes nothing), and the huge one is taken
    code, _, err = run(capsys, *argv, "--no-bounds")
    assert code == 0, err
    assert [line.split(": ")[1].split(" ")[0] for line in refused_lines(err)] == ["no_change"]
    np.testing.assert_allclose(output(round_files), np.full((2, 2), 0.5 * x + 0.5 * 1e4))


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
        (["--aggregator", "dp-noise", "--param", "clip_norm=1", "{a}:1"], "noise_multiplier"),
        (["--aggregator", "fedasync", "{a}:1"], "PATH:NUM_EXAMPLES:BASE_VERSION"),
        (["--aggregator", "fedbuff", "{a}:1:4"], "no new version"),
        (["--aggregator", "fedavg", "--bound", "norm_facto=2", "{a}:1"], "--bound norm_facto: unknown bound"),
        (["--aggregator", "fedavg", "--bound", "norm_factor=-1", "{a}:1"], "--bound norm_factor='-1'"),
        (["--aggregator", "fedavg", "--bound", "window=lots", "{a}:1"], "--bound window='lots'"),
        (["--aggregator", "fedavg", "--bound", "norm_factor", "{a}:1"], "--bound expects NAME=VALUE"),
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


@pytest.mark.parametrize(
    ("options", "name", "suffix", "reason", "fragment"),
    [
        (["fedavg"], "shape", ":1", "tensor_shape", "has shape (4,), expected (2, 2)"),
        (["fedavg"], "evil", ":1", "not_safetensors", "pickle"),
        (["fedasync"], "a", ":1:9", "future_base_version", "base version 9 > current 4"),
        (["fedasync", "--param", "max_staleness=2"], "a", ":1:0", "stale", "4 versions stale"),
    ],
)
def test_an_update_the_server_would_refuse_is_refused_on_one_line(
    files, capsys, options, name, suffix, reason, fragment
):
    save_file(files / "shape.safetensors", {"w": np.zeros((4,), np.float32)})
    (files / "evil.safetensors").write_bytes(b"\x80\x04K\x01.")  # a pickle
    path = files / f"{name}.safetensors"
    argv = aggregate(files, "--aggregator", *options, f"{path}{suffix}")

    # GIVEN only that update: it is refused, and with nothing left the command fails
    code, _, err = run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[0].startswith(f"refused {path}: {reason} (") and fragment in lines[0], err
    assert (
        lines[1]
        == "fedstream aggregate: error: no update was aggregated: all 1 were refused (see the lines above)"
    )
    assert "Traceback" not in err
    assert not (files / "out.safetensors").exists()

    # GIVEN a good update after it: the good one is aggregated and the command succeeds
    good = f"{files / 'b.safetensors'}:1" + (":4" if options[0] == "fedasync" else "")
    code, _, err = run(capsys, *argv, good)
    assert code == 0, err
    assert [line for line in err.splitlines() if line.startswith("refused ")] == [lines[0]]
    assert (files / "out.safetensors").exists()


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
