"""End to end on the embedded AWS: a moto server over HTTP, the stack's state machine, the real
handlers behind the pollers, and the client loop: real ``fedstream client`` processes for the Keras
run (what a silo runs), threads of this process for the NumPy ones (same loop, no interpreter
start-up per client)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fedstream.local.logs import json_lines
from fedstream.local.run import LocalRunConfig, run_local
from fedstream.weights import load_file

pytestmark = pytest.mark.e2e


def test_keras_clients_train_a_model_over_two_rounds(tmp_path: Path) -> None:
    # GIVEN two TensorFlow clients on disjoint shards of the digits data
    config = LocalRunConfig(
        clients=2,
        rounds=2,
        dataset="digits",
        trainer="keras",
        epochs=2,
        learning_rate=0.2,
        out=tmp_path,
        progress=False,
        seed=3,
    )

    # WHEN the run goes through the state machine, the handlers and the clients
    summary = run_local(config)

    # THEN it succeeds, both rounds aggregate both clients, and the global model got better
    assert summary.status == "SUCCEEDED", summary.error
    assert [r.round for r in summary.rounds] == [1, 2]
    assert all(r.clients == 2 and not r.at_deadline for r in summary.rounds)
    assert summary.initial_accuracy is not None
    assert summary.accuracies[-1] > summary.initial_accuracy + 0.2
    assert summary.client_exit_codes == {"site-1": 0, "site-2": 0}
    # and the user finds every output where the docs say
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "SUCCEEDED" and len(metrics["rounds"]) == 2
    assert (tmp_path / "metrics.csv").read_text().startswith("round,version,")
    assert (tmp_path / "accuracy.png").stat().st_size > 10_000
    _, meta = load_file(tmp_path / "final_model.safetensors")
    assert meta["version"] == "2" and meta["parent_version"] == "1"
    # and the logs are one JSON object per line with the correlation keys
    logs = list(json_lines((tmp_path / "logs.jsonl").read_text()))
    registered = [e for e in logs if e.get("message") == "update registered"]
    assert len(registered) == 4
    assert all({"run_id", "client_id", "round", "version"} <= e.keys() for e in registered)

    # WHEN the final model is exported for serving
    from fedstream.cli import main

    export = tmp_path / "export"
    args = [
        "model",
        "export",
        str(tmp_path / "final_model.safetensors"),
        "--dataset",
        "digits",
        "--out",
        str(export),
    ]
    assert main(args) == 0

    # THEN Keras loads it and it scores the test accuracy the run reported; the SavedModel serves
    # the same logits; and the lineage names the run and the version
    import keras
    import numpy as np
    import tensorflow as tf
    from fedstream.client.data import load_dataset

    test = load_dataset("digits")
    model = keras.models.load_model(export / "model.keras")
    logits = np.asarray(model.predict(test.x_test, verbose=0))
    assert float(np.mean(logits.argmax(axis=1) == test.y_test)) == pytest.approx(
        summary.accuracies[-1], abs=1e-6
    )
    saved = tf.saved_model.load(str(export / "serving" / "fedstream" / "1"))  # it owns the variables
    served = saved.serve(tf.constant(test.x_test[:16]))
    np.testing.assert_allclose(np.asarray(served), logits[:16], rtol=1e-4, atol=1e-5)
    lineage = json.loads((export / "lineage.json").read_text())
    assert lineage["metadata"]["run_id"] == summary.run_id and lineage["metadata"]["version"] == "2"
    assert (export / "model.safetensors").read_bytes() == (tmp_path / "final_model.safetensors").read_bytes()


def test_a_straggler_misses_the_deadline_and_rounds_close_with_the_quorum(tmp_path: Path) -> None:
    # The straggler sleeps 13 s after each fit, so it misses round 1's 8 s deadline however fast the
    # machine, and round 2's too (it starts round 2 only after its round-1 report, at >= 13 s: its
    # report comes at >= 26 s, round 2 closes at about 16 s). The deadline leaves the two others
    # (NumPy, digits: well under a second each unloaded) room on a loaded machine.
    config = LocalRunConfig(
        clients=3,
        rounds=2,
        dataset="digits",
        trainer="numpy",
        min_clients=2,
        round_timeout=8,
        stragglers=1,
        straggler_delay=13.0,
        out=tmp_path,
        progress=False,
        client_runtime="thread",
    )

    summary = run_local(config)

    assert summary.status == "SUCCEEDED", summary.error
    assert [r.at_deadline for r in summary.rounds] == [True, True]
    assert all(r.clients == 2 for r in summary.rounds)
    logs = (tmp_path / "logs.jsonl").read_text()
    assert logs.count('"message":"round closed at its deadline"') == 2
    assert summary.accuracies[-1] > (summary.initial_accuracy or 0) + 0.3


def test_fewer_reports_than_min_clients_fail_the_run_with_a_clear_message(tmp_path: Path) -> None:
    # The straggler sleeps 30 s, so round 1 reaches its 3 s deadline without its report, however fast
    # the machine; the other client's report may or may not be in by then on a loaded one.
    # client_timeout=5: the run does not wait for the straggler to wake up before stopping it.
    config = LocalRunConfig(
        clients=2,
        rounds=2,
        dataset="digits",
        trainer="numpy",
        min_clients=2,
        round_timeout=3,
        stragglers=1,
        straggler_delay=30.0,
        out=tmp_path,
        progress=False,
        client_timeout=5,
        client_runtime="thread",
    )

    summary = run_local(config)

    assert summary.status == "FAILED"
    assert summary.error is not None
    assert re.search(r"round 1 reached its deadline with [01] of the 2 reports required", summary.error)
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "FAILED"


@pytest.mark.parametrize("aggregator", ["fedasync", "fedbuff"])
def test_async_runs_update_the_model_per_record_and_their_counts_add_up(
    tmp_path: Path, aggregator: str
) -> None:
    config = LocalRunConfig(
        mode="async",
        aggregator=aggregator,
        clients=4,
        updates=12,
        dataset="digits",
        trainer="numpy",
        out=tmp_path,
        progress=False,
        seed=1,
        client_runtime="thread",
    )

    summary = run_local(config)

    assert summary.status == "SUCCEEDED", summary.error
    counts = summary.counts
    assert counts["applied"] >= 12
    assert counts["received"] == counts["applied"] + counts["rejected"] + counts["buffered"]
    assert summary.accuracies[-1] > (summary.initial_accuracy or 0) + 0.3
    assert summary.client_exit_codes == {f"site-{n}": 0 for n in range(1, 5)}
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["counts"] == counts and metrics["config"]["mode"] == "async"


def test_clients_get_the_inner_aggregators_settings_and_never_a_rounds_task_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedstream.client.runner import FederatedClient

    from fedstream.server import sync

    # GIVEN a spy on every message the clients receive, and on every token the server records
    received: list[str] = []
    tokens: list[str] = []
    receive, record = FederatedClient._receive, sync.record_round_token

    def spy_receive(self, wait_seconds):
        messages = receive(self, wait_seconds)
        received.extend(m["Body"] for m in messages)
        return messages

    def spy_record(store, run_id, round_number, token):
        tokens.append(token)
        return record(store, run_id, round_number, token)

    monkeypatch.setattr(FederatedClient, "_receive", spy_receive)
    monkeypatch.setattr(sync, "record_round_token", spy_record)

    # WHEN a two-round sync run of dp-noise wrapped around fedprox, chosen as a user would on the
    # command line, goes through the state machine (clients on threads, so the spy sees them)
    config = LocalRunConfig(
        aggregator="dp-noise",
        params={"clip_norm": "5", "noise_multiplier": "0", "inner": "fedprox", "inner.mu": "0.05"},
        clients=2,
        rounds=2,
        dataset="digits",
        trainer="numpy",
        out=tmp_path,
        progress=False,
        client_runtime="thread",
    )
    summary = run_local(config)

    # THEN every client trained every round with FedProx's mu and the DP clip norm
    assert summary.status == "SUCCEEDED", summary.error
    for client in ("site-1", "site-2"):
        events = json_lines((tmp_path / "clients" / f"{client}.log").read_text())
        settings = [e["settings"] for e in events if e.get("event") == "training"]
        assert len(settings) == 2
        assert all(s["proximal_mu"] == 0.05 and s["dp_clip_norm"] == 5.0 for s in settings)
    # and each round's token reached the server while no client message named a token or held one
    assert len(set(tokens)) == 2
    assert len(received) >= 4  # two "model ready" and one "training complete" each, at least
    assert not [body for body in received if "task_token" in body]
    assert not [body for body in received for token in tokens if token in body]


def test_the_readme_plugin_stops_the_run_at_its_target_accuracy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.plugins.test_readme_example import readme_plugin

    # GIVEN the README's half-step plugin (its finish returns metrics={}) as a drop-in
    folder = tmp_path / "my_plugins"
    folder.mkdir()
    (folder / "half_step.py").write_text(readme_plugin())
    monkeypatch.setenv("FEDSTREAM_PLUGIN_PATH", str(folder))
    monkeypatch.setattr("fedstream.registry._default_registry", None)

    # WHEN a run of up to 6 rounds asks for a client-reported accuracy of 0.5
    config = LocalRunConfig(
        aggregator="half-step",
        clients=2,
        rounds=6,
        target_accuracy=0.5,
        dataset="digits",
        trainer="numpy",
        out=tmp_path / "run",
        progress=False,
        client_runtime="thread",
    )
    summary = run_local(config)

    # THEN the host's mean of the clients' eval accuracy reached the state machine: the run stopped
    # at the first round that met the target, before the sixth
    assert summary.status == "SUCCEEDED", summary.error
    reached = [r.eval_accuracy_clients for r in summary.rounds]
    assert len(reached) < 6 and reached[-1] is not None and reached[-1] >= 0.5
    assert all(a is not None and a < 0.5 for a in reached[:-1])
