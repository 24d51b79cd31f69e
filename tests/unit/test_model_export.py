"""``fedstream model export`` refuses what it cannot export with one line (the export itself is
checked end to end in tests/e2e/test_sync_local.py: Keras loads it and scores what the run reported)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedstream.cli import main
from fedstream.weights import encode


@pytest.mark.parametrize(
    ("setup", "dataset", "message"),
    [
        ("good", "cifar", "unknown dataset 'cifar'"),
        ("missing", "digits", "cannot read"),
        ("garbage", "digits", "is not a fedstream model"),
        ("busy", "digits", "exists and is not an empty directory"),
        ("numpy", "digits", "does not fit the built-in model of 'digits'"),
    ],
)
def test_a_model_that_cannot_be_exported_is_refused_on_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], setup: str, dataset: str, message: str
) -> None:
    model, out = tmp_path / "model.safetensors", tmp_path / "out"
    if setup in ("good", "busy"):
        model.write_bytes(encode({"w": np.zeros(3, np.float32)}))
    if setup == "garbage":
        model.write_bytes(b"not a model")
    if setup == "numpy":  # the NumPy trainer's weights: not the Keras model's names
        model.write_bytes(encode({"W": np.zeros((64, 10), np.float32), "b": np.zeros(10, np.float32)}))
    if setup == "busy":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    code = main(["model", "export", str(model), "--dataset", dataset, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert setup != "busy" or (out / "keep.txt").read_text() == "mine"
