"""``fedstream model init`` and ``fedstream model train``: version 0 of a model, and one client's
update from it, as ``fedstream aggregate`` takes it; bad input is one line and exit 2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedstream.cli import main
from fedstream.weights import decode, encode

NUMPY = ["--dataset", "digits", "--trainer", "numpy"]


def test_init_writes_version_0_of_the_trainers_model_seeded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("a", "b"):
        assert (
            main(["model", "init", *NUMPY, "--seed", "3", "--out", str(tmp_path / f"{name}.safetensors")])
            == 0
        )

    a, meta = decode((tmp_path / "a.safetensors").read_bytes())
    b, _ = decode((tmp_path / "b.safetensors").read_bytes())
    assert meta["version"] == "0" and meta["trainer"] == "numpy" and meta["dataset"] == "digits"
    assert list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert "650 parameters" in capsys.readouterr().out  # 64 x 10 + 10


def test_train_writes_an_update_and_prints_it_as_aggregate_takes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    g = tmp_path / "g.safetensors"
    main(["model", "init", *NUMPY, "--out", str(g)])
    capsys.readouterr()

    code = main(
        ["model", "train", str(g), *NUMPY, "--clients", "2", "--client", "2", "--out", str(tmp_path / "u")]
    )

    out = capsys.readouterr().out
    assert code == 0
    path, examples = out.split()[0].rsplit(":", 1)
    assert path == str(tmp_path / "u") and 600 < int(examples) < 900  # half of 1,437 training digits
    update, meta = decode((tmp_path / "u").read_bytes())
    base, _ = decode(g.read_bytes())
    assert meta["base_version"] == "0" and meta["client"] == "2 of 2" and meta["num_examples"] == examples
    assert any(not np.array_equal(update[k], base[k]) for k in base)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["init", "--dataset", "nope", "--out", "{new}"], "--dataset: unknown dataset 'nope'"),
        (["init", "--dataset", "digits", "--trainer", "instant", "--out", "{new}"], "learns nothing"),
        (
            ["init", "--dataset", "digits", "--trainer", "bogus", "--out", "{new}"],
            "--trainer: unknown trainer",
        ),
        (["init", *NUMPY, "--out", "{model}"], "exists; name a new file"),
        (["train", "{junk}", *NUMPY, "--out", "{new}"], "is not a fedstream model"),
        (["train", "{missing}", *NUMPY, "--out", "{new}"], "cannot read"),
        (
            ["train", "{model}", *NUMPY, "--client", "3", "--clients", "2", "--out", "{new}"],
            "--client must be",
        ),
        (["train", "{model}", *NUMPY, "--partition", "shards:0", "--out", "{new}"], "--partition"),
        (["train", "{other}", *NUMPY, "--out", "{new}"], "does not fit the numpy model of 'digits'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], fragment: str
) -> None:
    model = tmp_path / "model.safetensors"
    main(["model", "init", *NUMPY, "--out", str(model)])
    (tmp_path / "junk").write_bytes(b"not safetensors")
    (tmp_path / "other").write_bytes(encode({"w": np.zeros((3, 3), np.float32)}))
    names = {
        "{new}": "new",
        "{model}": model.name,
        "{junk}": "junk",
        "{missing}": "missing",
        "{other}": "other",
    }
    argv = [str(tmp_path / names[a]) if a in names else a for a in argv]
    capsys.readouterr()

    code = main(["model", *argv])

    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert fragment in err, err
    assert not (tmp_path / "new").exists()
