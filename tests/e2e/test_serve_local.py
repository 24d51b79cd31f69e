"""An operator's view: ``fedstream local --serve`` stands in for a deployment, ``fedstream client
--config`` processes take part from "other terminals", and ``fedstream run ...`` drives whole runs.

Every part is its own process, as on separate machines: the server (the embedded AWS, the handlers
and the state machine), the clients, and each ``fedstream`` command. No AWS credentials are set: the
commands and clients use placeholder keys for the embedded AWS on this machine.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from tests.e2e.processes import AS_IN_A_TERMINAL, kill_everything

pytestmark = pytest.mark.e2e

ENV = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
ENV |= {"AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"}


def fedstream(*arguments: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedstream.cli", *arguments],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture
def serve(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """``fedstream local --serve`` with the test's arguments; yields its outputs file."""
    out = tmp_path / "server"
    server = subprocess.Popen(
        [*AS_IN_A_TERMINAL, "local", "--serve", "--out", str(out), *request.param],
        env=ENV,
        stdout=(tmp_path / "serve.out").open("w"),
        stderr=(tmp_path / "serve.err").open("w"),
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while not (out / "outputs.json").exists() and time.monotonic() < deadline:
        assert server.poll() is None, (tmp_path / "serve.err").read_text()
        time.sleep(0.2)
    try:
        yield out / "outputs.json"
        os.killpg(server.pid, signal.SIGINT)  # Ctrl-C, as in its terminal
        code = server.wait(timeout=120)
        errors = (tmp_path / "serve.err").read_text()
        assert code == 0 and "Traceback" not in errors, errors
    finally:
        kill_everything(server)  # after a failure: nothing is left running


@pytest.fixture
def clients() -> Iterator[list[subprocess.Popen[bytes]]]:
    """The client processes a test starts; any still running at its end are killed."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for client in started:
        kill_everything(client)


def start_clients(
    outputs: Path, trainer: str, count: int, started: list[subprocess.Popen[bytes]], *flags: str
) -> list[subprocess.Popen[bytes]]:
    configs = outputs.parent / "clients"
    started += [
        subprocess.Popen(
            [
                sys.executable, "-m", "fedstream.cli", "client",
                "--config", str(configs / f"site-{index + 1}.json"),
                "--trainer", trainer, "--dataset", "digits",
                "--num-clients", str(count), "--client-index", str(index),
                "--max-idle", "300", *flags,
            ],
            env=ENV,
            stdout=(outputs.parent / f"site-{index + 1}.log").open("w"),
            stderr=subprocess.STDOUT,
        )
        for index in range(count)
    ]  # fmt: skip
    return started


def digits_test_accuracy(model_path: Path) -> float:
    """What a user would do with the export: load it in Keras and score the held-out digits."""
    import keras
    from fedstream.client.data import load_dataset

    data = load_dataset("digits")
    model = keras.models.load_model(model_path)
    logits = model.predict(data.x_test, verbose=0)
    return float(np.mean(np.argmax(logits, axis=-1) == data.y_test))


@pytest.mark.parametrize("serve", [["--mode", "sync", "--clients", "2", "--rounds", "2"]], indirect=True)
def test_a_sync_run_started_watched_and_exported_with_the_run_commands(
    serve: Path, tmp_path: Path, clients: list[subprocess.Popen[bytes]]
) -> None:
    # GIVEN a served sync deployment and two Keras clients started from their config files
    start_clients(serve, "keras", 2, clients)
    outputs = ["--outputs", str(serve)]

    # WHEN a run is started from version 0 of the Keras model and watched to its end
    started = fedstream("run", "start", *outputs, "--trainer", "keras", "--dataset", "digits", cwd=tmp_path)
    assert started.returncode == 0, started.stderr
    run_id = started.stdout.strip()
    watch = fedstream(
        "run", "watch", run_id, *outputs, "--interval", "0.5", "--test-dataset", "digits", cwd=tmp_path
    )

    # THEN the watch printed both rounds, each with its test accuracy, and the run succeeded
    assert watch.returncode == 0, watch.stdout + watch.stderr
    rounds = re.findall(r"^round (\d): 2 clients, version \d.*test accuracy ([0-9.]+)$", watch.stdout, re.M)
    assert [r for r, _ in rounds] == ["1", "2"], watch.stdout
    assert f"{run_id}: sync SUCCEEDED, version 2" in watch.stdout
    # AND the run's final model exports to a Keras file that scores what the watch reported
    export = fedstream(
        "model", "export", "--run", run_id, *outputs, "--dataset", "digits", "--out", "exported", cwd=tmp_path
    )
    assert export.returncode == 0, export.stderr
    lineage = json.loads((tmp_path / "exported" / "lineage.json").read_text())
    assert lineage["metadata"]["version"] == "2" and lineage["source"].startswith("s3://")
    assert digits_test_accuracy(tmp_path / "exported" / "model.keras") == pytest.approx(
        float(rounds[-1][1]), abs=5e-5
    )
    # AND the run is listed, with when it started and ended, and the clients finished
    listing = fedstream("run", "list", *outputs, "--json", cwd=tmp_path)
    assert [(r["run_id"], r["status"], r["version"]) for r in json.loads(listing.stdout)] == [
        (run_id, "SUCCEEDED", 2)
    ]
    status = json.loads(fedstream("run", "status", run_id, *outputs, "--json", cwd=tmp_path).stdout)
    started_at = datetime.fromisoformat(status["started_at"])
    assert started_at < datetime.fromisoformat(status["finished_at"]) <= datetime.now(UTC)
    assert [client.wait(timeout=300) for client in clients] == [0, 0]


@pytest.mark.parametrize(
    "serve", [["--mode", "async", "--aggregator", "fedbuff", "--param", "buffer_size=2", "--clients", "3"]],
    indirect=True,
)  # fmt: skip
def test_async_runs_one_after_another_with_following_clients_and_one_stopped_by_the_operator(
    serve: Path, tmp_path: Path, clients: list[subprocess.Popen[bytes]]
) -> None:
    # GIVEN a served async deployment (FedBuff, K = 2) and three clients run as a site's service
    # would run them: following one run after another
    start_clients(serve, "numpy", 3, clients, "--follow")
    outputs = ["--outputs", str(serve)]

    def start_run(updates: int) -> str:
        started = fedstream(
            "run", "start", *outputs, "--trainer", "numpy", "--dataset", "digits",
            "--updates", str(updates), cwd=tmp_path,
        )  # fmt: skip
        assert started.returncode == 0, started.stderr
        return started.stdout.strip()

    # WHEN a run of 12 updates is started and watched
    run_id = start_run(12)
    watch = fedstream("run", "watch", run_id, *outputs, "--interval", "0.5", cwd=tmp_path)

    # THEN it succeeded after 12 applied updates in FedBuff's steps of 2: version 6, and a line per
    # published version (a stream batch that takes two steps publishes only the second)
    assert watch.returncode == 0, watch.stdout + watch.stderr
    assert f"{run_id}: async SUCCEEDED, version 6 (max_updates)" in watch.stdout
    published = [
        (int(v), int(n)) for v, n in re.findall(r"^version (\d+): (\d+) applied", watch.stdout, re.M)
    ]
    assert published[-1][0] == 6 and sum(n for _, n in published) == 12, watch.stdout
    assert [v for v, _ in published] == sorted({v for v, _ in published})
    status = json.loads(fedstream("run", "status", run_id, *outputs, "--json", cwd=tmp_path).stdout)
    assert status["counts"]["applied"] == 12 and status["staleness"]["max"] is not None

    # WHEN the operator starts a second run and stops it
    second = fedstream("run", "start", *outputs, "--model", str(tmp_path / "none"), cwd=tmp_path)
    assert second.returncode == 2 and "--model" in second.stderr  # a missing file: one line
    second_id = start_run(100)
    stopped = fedstream("run", "stop", second_id, *outputs, cwd=tmp_path)
    assert stopped.returncode == 0, stopped.stderr

    # AND then a third run
    third_id = start_run(6)
    watch = fedstream("run", "watch", third_id, *outputs, "--interval", "0.5", cwd=tmp_path)

    # THEN the same client processes took part in it: 6 updates applied, version 3
    assert watch.returncode == 0, watch.stdout + watch.stderr
    assert f"{third_id}: async SUCCEEDED, version 3 (max_updates)" in watch.stdout
    assert [client.poll() for client in clients] == [None, None, None]
    # AND the runs are listed newest first, the stopped one STOPPED
    listing = json.loads(fedstream("run", "list", *outputs, "--json", cwd=tmp_path).stdout)
    assert [(r["run_id"], r["status"]) for r in listing] == [
        (third_id, "SUCCEEDED"),
        (second_id, "STOPPED"),
        (run_id, "SUCCEEDED"),
    ]
    # AND each client says which runs it took part in, and stops cleanly when its service stops
    for client in clients:
        client.send_signal(signal.SIGTERM)
    assert [client.wait(timeout=300) for client in clients] == [0, 0, 0]
    logs = [(serve.parent / f"site-{index}.log").read_text() for index in (1, 2, 3)]
    assert all(f"taking part in run {third_id}" in log for log in logs), logs
    assert all(f"run {run_id} complete (done)" in log for log in logs), logs
