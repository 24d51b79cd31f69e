"""End to end on the embedded AWS: a malicious client process (fedstream.local.attack) against the
default influence bounds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedstream.bounds import InfluenceBounds
from fedstream.local.run import LocalRunConfig, run_local
from fedstream.weights import load_file

pytestmark = pytest.mark.e2e


def test_a_boosted_update_is_refused_by_the_norm_bound_and_the_run_learns_without_it(tmp_path: Path) -> None:
    # GIVEN four numpy clients on digits, the last of which boosts its honest update a million times
    config = LocalRunConfig(
        clients=4,
        rounds=2,
        dataset="digits",
        trainer="numpy",
        attackers={"site-4": "scale:1e6"},
        out=tmp_path,
        progress=False,
        seed=2,
    )

    # WHEN the run goes through the state machine with the default bounds
    summary = run_local(config)

    # THEN it succeeds, and every round closes with the three honest clients only
    assert summary.status == "SUCCEEDED", summary.error
    assert [r.round for r in summary.rounds] == [1, 2]
    assert all(r.clients == 3 for r in summary.rounds)
    # and the attacker's two updates were refused as norm_bound, nobody else's
    assert summary.rejected == {"norm_bound": 2}
    assert summary.rejected_by_client == {"site-4": {"norm_bound": 2}}
    assert summary.client_exit_codes == {f"site-{i}": 0 for i in range(1, 5)}
    # and the model learned as an honest run does, its weights on the honest scale
    assert summary.initial_accuracy is not None
    assert summary.accuracies[-1] > summary.initial_accuracy + 0.3
    weights, meta = load_file(tmp_path / "final_model.safetensors")
    assert meta["version"] == "2"
    assert all(np.all(np.isfinite(w)) and float(np.max(np.abs(w))) < 10 for w in weights.values())
    # and metrics.json says what was configured and what was refused
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["attackers"] == {"site-4": "scale:1e6"}
    assert metrics["config"]["bounds"] == InfluenceBounds().model_dump()
    assert metrics["rejected"] == {"norm_bound": 2}
    assert metrics["rejected_by_client"] == {"site-4": {"norm_bound": 2}}
    # and the attacker was an ordinary client process that trained every round
    attacker_log = (tmp_path / "clients" / "site-4.log").read_text()
    assert '"event": "ready"' in attacker_log and "Traceback" not in attacker_log
