"""`fedstream aggregate --state PATH` with the server optimizers, run the way a user runs them: the
output of one call is the --global of the next, one state file throughout, and each model equals
the papers' update (tests/plugins/test_server_optimizers.py's float64 reference) with the moments
carried from call to call."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedstream.aggregation import state_from_bytes
from fedstream.cli import main
from fedstream.weights import load_file, save_file
from tests.plugins.test_server_optimizers import OPTIMIZERS, PARAMS, Reference, random_model, trained

# Three clients a round with example counts within the default influence bounds (at most 4x the
# median): every update is aggregated with the count it claims.
EXAMPLES = (12, 20, 35)
# How far the clients move in each round: large, then small, so that Yogi's v both grows and shrinks.
SCALES = (0.1, 0.003, 0.05)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any] | None, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if code == 0 else None, captured.err


def params(name: str, **extra: Any) -> list[str]:
    pairs = {**PARAMS[name], **extra}
    return [arg for key, value in pairs.items() for arg in ("--param", f"{key}={value}")]


def assert_model_close(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert set(actual) == set(expected)
    for tensor, want in expected.items():
        assert actual[tensor].dtype == want.dtype, tensor
        np.testing.assert_allclose(actual[tensor], want, rtol=1e-5, atol=1e-7, err_msg=tensor)


def differs(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return any(not np.allclose(a[t], b[t], rtol=1e-5, atol=1e-7) for t in a)


def mean_change(clients: list[tuple[dict[str, np.ndarray], int]], x: dict[str, np.ndarray]):
    """Delta = sum_k n_k (w_k - x) / sum_k n_k, in float64."""
    total = sum(n for _, n in clients)
    return {t: sum(n * (w[t].astype(np.float64) - x[t]) for w, n in clients) / total for t in x}


def read_state(path: Path):
    state, _ = state_from_bytes(path.read_bytes(), max_bytes=1 << 20)
    return state


# -- sync ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_three_rounds_through_the_cli_carry_the_moments_in_the_state_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    # GIVEN a global model (version 0), and an optimizer state file that does not exist yet
    rng = np.random.default_rng(21)
    x = random_model(rng)
    global_path = tmp_path / "global-0.safetensors"
    save_file(global_path, x, {"version": "0"})
    state_path = tmp_path / "opt.safetensors"
    carried = Reference(name, PARAMS[name], x)

    for round_number, scale in enumerate(SCALES, start=1):
        # GIVEN three clients that trained from the round's global model
        clients = [(trained(rng, x, scale), n) for n in EXAMPLES]
        updates = []
        for i, (weights, n) in enumerate(clients):
            path = tmp_path / f"r{round_number}-c{i}.safetensors"
            save_file(path, weights)
            updates.append(f"{path}:{n}")
        output = tmp_path / f"global-{round_number}.safetensors"
        common = ["aggregate", "--aggregator", name, *params(name), "--global", str(global_path), *updates]

        # WHEN the user aggregates the round with the same --state file as every round before
        code, report, err = run(
            capsys, *common, "--round", str(round_number), "--state", str(state_path), "-o", str(output)
        )

        # THEN the new model is one step of the papers' update with the moments carried from
        # the rounds before (every update taken, with the examples it claims)
        assert code == 0, err
        assert report is not None and report["refused"] == []
        assert [u["num_examples"] for u in report["updates"]] == list(EXAMPLES)
        weights, metadata = load_file(output)
        expected = carried.step(x, mean_change(clients, x))
        assert_model_close(weights, expected)
        assert metadata["version"] == str(round_number)
        assert report["metrics"]["server_step"] == round_number
        # AND the state file is there after the round, holding the steps taken so far
        assert report["state"] == str(state_path) and state_path.exists()
        assert read_state(state_path).values == {"step": round_number}

        # WHEN the same round is aggregated without the state, and with a state file never written
        code, _, err = run(capsys, *common, "-o", str(tmp_path / "no-state.safetensors"))
        assert code == 0, err
        fresh_path = tmp_path / f"fresh-{round_number}.safetensors"
        code, _, err = run(
            capsys, *common, "--state", str(fresh_path), "-o", str(tmp_path / "fresh.safetensors")
        )
        assert code == 0, err

        # THEN both take a first step (m = 0, v = tau^2), which from round 2 on is not the carried
        # model: the carried one used the moments in the state file
        first_step = Reference(name, PARAMS[name], x).step(x, mean_change(clients, x))
        without, _ = load_file(tmp_path / "no-state.safetensors")
        fresh, _ = load_file(tmp_path / "fresh.safetensors")
        assert_model_close(without, first_step)
        assert_model_close(fresh, first_step)
        assert read_state(fresh_path).values == {"step": 1}
        assert differs(weights, without) == (round_number > 1)

        x, global_path = weights, output


# -- async ---------------------------------------------------------------------------------------


def test_async_fedadam_buffers_in_the_state_file_and_steps_every_second_call(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN fedadam with a buffer of K = 2, version 0 of the model, and no state file yet
    name, buffer_size = "fedadam", 2
    rng = np.random.default_rng(5)
    published = [random_model(rng)]
    paths = [tmp_path / "v0.safetensors"]
    save_file(paths[0], published[0], {"version": "0"})
    state_path = tmp_path / "buffer.safetensors"
    reference = Reference(name, PARAMS[name], published[0])
    buffer = {t: np.zeros(w.shape) for t, w in published[0].items()}

    # Four clients, one update per call; the third trained on version 0 while version 1 is out
    for call, (base_version, scale) in enumerate([(0, 0.1), (0, 0.05), (0, 0.08), (1, 0.02)], start=1):
        newest = len(published) - 1
        weights = trained(rng, published[base_version], scale)
        path = tmp_path / f"update-{call}.safetensors"
        save_file(path, weights)
        output = tmp_path / f"out-{call}.safetensors"

        # WHEN the user applies it to the newest version, with the same --state file every call
        code, report, err = run(
            capsys,
            "aggregate",
            "--aggregator",
            name,
            "--mode",
            "async",
            *params(name, buffer_size=buffer_size),
            "--global",
            str(paths[-1]),
            "--base",
            f"0={paths[0]}",
            f"{path}:10:{base_version}",
            "--state",
            str(state_path),
            "-o",
            str(output),
        )
        assert code == 0, err
        assert report is not None and report["refused"] == []
        staleness = newest - base_version
        assert report["updates"][0]["staleness"] == staleness
        for t in buffer:
            buffer[t] += (1 + staleness) ** -0.5 * (
                weights[t].astype(np.float64) - published[base_version][t]
            )

        if call % buffer_size:
            # THEN an odd call only buffers: no model is written, and the state file holds the update
            assert not output.exists()
            assert report["output"] is None and report["version"] == newest
            assert report["pending_updates"] == 1
            assert read_state(state_path).values == {"count": 1, "step": newest}
            continue

        # THEN every second call steps from the newest model with Delta = buffer / K, the buffer
        # coming from the state file the call before wrote
        new, metadata = load_file(output)
        expected = reference.step(published[-1], {t: b / buffer_size for t, b in buffer.items()})
        assert_model_close(new, expected)
        assert metadata["version"] == str(newest + 1) == str(report["version"])
        assert report["pending_updates"] == 0
        assert read_state(state_path).values == {"count": 0, "step": newest + 1}
        published.append(new)
        paths.append(output)
        buffer = {t: np.zeros(b.shape) for t, b in buffer.items()}

    assert len(published) == 3  # two steps were taken


# -- a state file that is not one ----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_corrupt_state_file_is_a_one_line_error_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: str
) -> None:
    # GIVEN a state file of random bytes (a disk error, another program's file)
    rng = np.random.default_rng(3)
    x = random_model(rng)
    save_file(tmp_path / "g.safetensors", x, {"version": "0"})
    save_file(tmp_path / "a.safetensors", trained(rng, x, 0.1))
    state_path = tmp_path / "opt.safetensors"
    state_path.write_bytes(rng.bytes(300))
    update = f"{tmp_path / 'a.safetensors'}:10" + (":0" if mode == "async" else "")
    output = tmp_path / "out.safetensors"

    # WHEN the user aggregates with it
    code, _, err = run(
        capsys,
        "aggregate",
        "--aggregator",
        "fedadam",
        "--mode",
        mode,
        "--param",
        "buffer_size=1",
        "--global",
        str(tmp_path / "g.safetensors"),
        update,
        "--state",
        str(state_path),
        "-o",
        str(output),
    )

    # THEN the command fails on one line naming the file; no model is written, the file is kept
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert err.startswith("fedstream aggregate: error: ")
    assert f"--state {state_path}" in err
    assert not output.exists()
    assert state_path.stat().st_size == 300


def test_a_state_of_another_version_or_aggregator_is_refused_not_applied(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN round 1 of fedavgm run with a state file
    save_file(tmp_path / "g0.safetensors", {"w": np.zeros(3, np.float32)}, {"version": "0"})
    save_file(tmp_path / "a.safetensors", {"w": np.ones(3, np.float32)})
    save_file(tmp_path / "b.safetensors", {"w": np.full(3, 3.0, np.float32)})
    state = tmp_path / "state.safetensors"
    common = ["aggregate", "--global", str(tmp_path / "g0.safetensors"), f"{tmp_path / 'a.safetensors'}:1"]
    common += [
        f"{tmp_path / 'b.safetensors'}:1",
        "--state",
        str(state),
        "-o",
        str(tmp_path / "g1.safetensors"),
    ]
    code, _, err = run(capsys, *common, "--aggregator", "fedavgm")
    assert code == 0, err
    before = state.read_bytes()

    # WHEN the same round is run again (the state now belongs to version 1), or another aggregator
    # is named with that state
    again = run(capsys, *common, "--aggregator", "fedavgm")
    other = run(capsys, *common, "--aggregator", "fedavg")

    # THEN both are refused on one line naming the file, and the state is left as it was
    assert again[0] == 2 and f"--state {state} belongs to version 1, but --global is version 0" in again[2]
    assert other[0] == 2 and "holds the state of 'fedavgm', not of 'fedavg'" in other[2]
    assert state.read_bytes() == before
    np.testing.assert_allclose(load_file(tmp_path / "g1.safetensors")[0]["w"], 2.0)
