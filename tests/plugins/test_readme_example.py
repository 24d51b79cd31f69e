"""The plugin example in the README works when copied into a plugin folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from fedstream.cli import main
from fedstream.weights import encode, load_file

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_plugin() -> str:
    text = README.read_text()
    match = re.search(r"<!-- plugin-example -->\s*```python\n(.*?)```", text, re.S)
    assert match, "the README lost its plugin example"
    return match.group(1)


def test_the_readme_plugin_is_discovered_and_aggregates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the README's example saved as a drop-in module
    folder = tmp_path / "my_plugins"
    folder.mkdir()
    (folder / "half_step.py").write_text(readme_plugin())
    monkeypatch.setenv("FEDSTREAM_PLUGIN_PATH", str(folder))
    monkeypatch.setattr("fedstream.registry._default_registry", None)

    # WHEN a user lists the plugins
    assert main(["plugins", "list", "--json"]) == 0
    listed = {p["name"]: p for p in json.loads(capsys.readouterr().out)}

    # THEN it is there with its source, and it aggregates half way to the weighted mean
    assert "drop-in file" in listed["half-step"]["source"]
    g = {"w": np.zeros(4, np.float32)}
    (tmp_path / "g.safetensors").write_bytes(encode(g))
    (tmp_path / "a.safetensors").write_bytes(encode({"w": np.full(4, 2.0, np.float32)}))
    (tmp_path / "b.safetensors").write_bytes(encode({"w": np.full(4, 6.0, np.float32)}))
    out = tmp_path / "new.safetensors"
    code = main(
        [
            "aggregate",
            "--aggregator",
            "half-step",
            "--global",
            str(tmp_path / "g.safetensors"),
            f"{tmp_path / 'a.safetensors'}:3",
            f"{tmp_path / 'b.safetensors'}:1",
            "-o",
            str(out),
        ]
    )
    assert code == 0
    weights, _ = load_file(out)
    np.testing.assert_allclose(weights["w"], np.full(4, (2.0 * 3 + 6.0) / 4 / 2))


def readme_optimizer() -> str:
    match = re.search(r"<!-- optimizer-example -->\s*```python\n(.*?)```", README.read_text(), re.S)
    assert match, "the README lost its server optimizer example"
    return match.group(1)


def test_the_readme_server_optimizer_is_short_and_keeps_its_momentum_between_calls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the README's server optimizer saved as a drop-in module, under 40 lines
    source = readme_optimizer()
    assert len(source.strip().splitlines()) < 40
    folder = tmp_path / "my_plugins"
    folder.mkdir()
    (folder / "sign_momentum.py").write_text(source)
    monkeypatch.setenv("FEDSTREAM_PLUGIN_PATH", str(folder))
    monkeypatch.setattr("fedstream.registry._default_registry", None)

    def step(global_path: Path, update: np.ndarray, out: Path) -> np.ndarray:
        (tmp_path / "u.safetensors").write_bytes(encode({"w": update.astype(np.float32)}))
        args = ["aggregate", "--aggregator", "sign-momentum", "--global", str(global_path), "--no-bounds"]
        args += [
            "--state",
            str(tmp_path / "state.safetensors"),
            f"{tmp_path / 'u.safetensors'}:1",
            "-o",
            str(out),
        ]
        assert main(args) == 0
        capsys.readouterr()
        return load_file(out)[0]["w"]

    # WHEN a client moves the model up by 1, then (next round) down by 0.5
    (tmp_path / "g0.safetensors").write_bytes(encode({"w": np.zeros(3, np.float32)}))
    x1 = step(tmp_path / "g0.safetensors", np.ones(3), tmp_path / "g1.safetensors")
    x2 = step(tmp_path / "g1.safetensors", x1 - 0.5, tmp_path / "g2.safetensors")

    # THEN the second step still goes up: m = 0.9 * 0.1 - 0.1 * 0.5 > 0 came from the stored state
    np.testing.assert_allclose(x1, 0.01, rtol=1e-6)
    np.testing.assert_allclose(x2, 0.02, rtol=1e-6)
