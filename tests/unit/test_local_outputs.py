"""A run into an --out that holds a previous run's outputs replaces them: nothing of the old run is
left to mix with the new one's (a 4-client run's site-3.log after a 2-client run), and nothing
else in the folder is touched."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedstream.local import run as local_run
from fedstream.local.progress import Progress
from fedstream.local.run import LocalRunConfig, run_local


class Stop(Exception):
    pass


def test_a_previous_runs_outputs_are_cleared_before_a_new_run_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # GIVEN an --out with a previous 4-client run's outputs and a file of the user's
    out = tmp_path / "runs"
    (out / "clients").mkdir(parents=True)
    for name in Progress.OUTPUT_FILES:
        (out / name).write_text("old")
    for n in range(1, 5):
        (out / "clients" / f"site-{n}.log").write_text("old")
    (out / "notes.txt").write_text("mine")

    # WHEN a 2-client run starts there (stopped where the embedded AWS would start)
    def no_aws(*_args, **_kwargs):
        raise Stop

    monkeypatch.setattr(local_run, "EmbeddedAWS", no_aws)
    with pytest.raises(Stop):
        run_local(
            LocalRunConfig(clients=2, rounds=1, dataset="digits", trainer="numpy", out=out, progress=False)
        )

    # THEN none of the old run's outputs or client logs are left; the user's file is
    assert not [name for name in Progress.OUTPUT_FILES if (out / name).exists()]
    assert list((out / "clients").iterdir()) == []
    assert (out / "notes.txt").read_text() == "mine"
