"""The wheel a user installs: one top-level package, ``fedstream``, that works without the repo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILT_INS = {"fedavg", "fedprox", "dp-noise", "fedasync", "fedbuff", "median", "trimmed-mean", "krum"}
BUILT_INS |= {"fedavgm", "fedadam", "fedyogi", "fedadagrad"}


def run(*command: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"{' '.join(map(str, command))}\n{result.stdout}\n{result.stderr}"
    return result.stdout


SOURCES = ("pyproject.toml", "README.md", "fedstream", "client", "handlers", "plugins", "stacks")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # built from a copy of what git tracks, so no build/ folder or stray file of this checkout leaks in
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("dist")
    tracked = run("git", "ls-files", "-z", *SOURCES, cwd=ROOT).split("\0")
    for name in filter(None, tracked):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    # --no-build-isolation: the dev install carries setuptools, so the build needs no network
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
        "--wheel-dir", out, source, cwd=out)  # fmt: skip
    (path,) = out.glob("fedstream-*.whl")
    return path


def test_the_wheel_holds_only_the_fedstream_package_with_the_state_machine(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"fedstream"}
    for module in ("client/cli.py", "handlers/aggregate.py", "plugins/fedavg.py", "stacks/bundling.py",
                   "server/sync.py", "local/run.py", "stacks/state_machine.asl.json"):  # fmt: skip
        assert f"fedstream/{module}" in names


def test_installed_into_a_clean_venv_it_adds_only_fedstream_and_lists_its_plugins(
    wheel: Path, tmp_path: Path
) -> None:
    # GIVEN a clean venv (no pip, nothing installed) outside the repo
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(
        run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).strip()
    )
    before = set(os.listdir(site))

    # WHEN the wheel is installed into it (the dependencies come from this environment, after it)
    run(sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps", "--no-index",
        wheel, cwd=tmp_path)  # fmt: skip
    added = set(os.listdir(site)) - before
    (site / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "FEDSTREAM_DISABLE_PLUGIN_AUTOLOAD": "1",
    }
    listed = json.loads(run(venv / "bin" / "fedstream", "plugins", "list", "--json", cwd=tmp_path, env=env))
    probe = (
        "import fedstream.plugins, fedstream.registry as r; print(fedstream.plugins.__file__, r.dropin_dir())"
    )
    where = run(python, "-c", probe, cwd=tmp_path, env=env)

    # THEN only fedstream was added, and it runs from the venv with every built-in aggregator
    assert {name for name in added if not name.endswith(".dist-info")} == {"fedstream"}
    assert {p["name"] for p in listed} == BUILT_INS
    assert {p["source"] for p in listed} == {"built-in"}
    plugins_file, dropin = where.split()
    assert (
        Path(plugins_file).is_relative_to(site) and Path(dropin) == site / "fedstream" / "plugins" / "dropin"
    )
