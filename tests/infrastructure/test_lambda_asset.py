"""The Lambda asset: what goes in, its hash, and (slow, needs PyPI) a real build imported by CPython.

Deselect the build with ``-m "not slow"``.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from aws_cdk import App, Stack
from aws_cdk import aws_lambda as lambda_
from fedstream.stacks import constants
from fedstream.stacks.bundling import (
    BundlingError,
    LambdaAssetSpec,
    build_lambda_asset,
    byte_compile,
    directory_size,
    lambda_code,
    lambda_python,
    lambda_requirements,
    locked_pins,
    locked_requirements,
    package_sources,
    pip_platforms,
)

HANDLERS = (constants.HANDLER_AGGREGATE, constants.HANDLER_FINALIZE, constants.HANDLER_ASYNC_UPDATE)


def requirement_names(requirements: tuple[str, ...]) -> set[str]:
    return {r.split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in requirements}


def test_the_asset_carries_the_core_and_server_dependencies():
    names = requirement_names(lambda_requirements("fedavg"))
    assert {"numpy", "safetensors", "pluggy", "pydantic", "aws-lambda-powertools[tracer]", "boto3"} <= names


def test_dp_accounting_ships_only_with_the_dp_noise_aggregator():
    assert "dp-accounting" not in requirement_names(lambda_requirements("fedavg"))
    assert "dp-accounting" not in requirement_names(lambda_requirements("fedasync"))
    assert "dp-accounting" in requirement_names(lambda_requirements("dp-noise"))


def test_pip_targets_every_manylinux_the_lambda_glibc_runs():
    platforms = pip_platforms("x86_64")
    assert platforms[0] == "manylinux_2_34_x86_64"
    assert "manylinux_2_17_x86_64" in platforms and platforms[-1] == "manylinux2014_x86_64"


def test_the_pip_command_builds_wheels_for_the_lambda_runtime(tmp_path: Path):
    spec = LambdaAssetSpec.for_aggregator("fedavg")
    command = spec.pip_command(tmp_path)
    assert command[command.index("--python-version") + 1] == constants.LAMBDA_PYTHON_VERSION
    assert "--only-binary=:all:" in command and command[command.index("--target") + 1] == str(tmp_path)
    # exactly the locked wheels, each checked against its hash
    assert {"--require-hashes", "--no-deps"} <= set(command)
    assert command[command.index("-r") + 1] == str(spec.lock) and spec.lock.name == "lambda.lock"
    assert LambdaAssetSpec.for_aggregator("dp-noise").lock.name == "lambda-dp.lock"


@pytest.mark.parametrize("aggregator", ["fedavg", "dp-noise"])
def test_the_lock_is_current_and_pins_every_requirement_with_a_hash(aggregator: str):
    from packaging.requirements import Requirement

    spec = LambdaAssetSpec.for_aggregator(aggregator)
    assert locked_requirements(spec.lock) == spec.requirements, (
        "pyproject.toml's dependencies changed: run `python -m fedstream.stacks.bundling lock`"
    )
    pins = locked_pins(spec.lock)
    for text in spec.requirements:
        requirement = Requirement(text)
        assert requirement.name.lower() in pins, requirement.name
        assert requirement.specifier.contains(pins[requirement.name.lower()]), text
    wheels = [line for line in spec.lock.read_text().splitlines() if not line.startswith("#")]
    assert len(wheels) == len(pins) and all(" --hash=sha256:" in line for line in wheels)


def test_a_changed_lock_changes_the_asset_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from fedstream.stacks import bundling

    spec = LambdaAssetSpec.for_aggregator("fedavg")
    before = spec.fingerprint()
    lock = tmp_path / "lambda.lock"
    lock.write_text(spec.lock.read_text().replace("numpy==", "numpy==0", 1))
    monkeypatch.setattr(bundling, "lock_path", lambda requirements: lock)

    assert spec.fingerprint() != before


def copy_sources(root: Path) -> tuple[tuple[str, Path], ...]:
    copies = []
    for destination, source in package_sources():
        copy = root / destination.replace("/", "-")
        shutil.copytree(source, copy, ignore=shutil.ignore_patterns("__pycache__"))
        copies.append((destination, copy))
    return tuple(copies)


def test_a_plugin_dropped_into_the_dropin_folder_changes_the_asset_hash(tmp_path: Path):
    # GIVEN the asset's sources
    sources = copy_sources(tmp_path)
    spec = LambdaAssetSpec(requirements=("numpy",), sources=sources)
    before = spec.fingerprint()
    # WHEN a user drops a plugin module into plugins/dropin/
    dropin = dict(sources)["fedstream/plugins"] / "dropin"
    dropin.mkdir(exist_ok=True)
    (dropin / "my_aggregator.py").write_text("# a user's aggregator\n")
    # THEN the asset hash changes, so the next cdk deploy ships it, and it goes where the registry looks
    assert spec.fingerprint() != before
    assert "fedstream/plugins/dropin/my_aggregator.py" in dict(spec.source_files())
    (dropin / "__pycache__").mkdir(exist_ok=True)
    (dropin / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    assert spec.fingerprint() == LambdaAssetSpec(requirements=("numpy",), sources=sources).fingerprint()


def test_the_asset_holds_one_fedstream_package_without_the_client_or_the_stack():
    names = [name for name, _ in LambdaAssetSpec(requirements=()).source_files()]
    assert {name.split("/")[0] for name in names} == {"fedstream"}
    for module in (constants.HANDLER_AGGREGATE, constants.HANDLER_FINALIZE, constants.HANDLER_ASYNC_UPDATE):
        assert module.rsplit(".", 1)[0].replace(".", "/") + ".py" in names
    assert "fedstream/plugins/fedavg.py" in names and "fedstream/server/sync.py" in names
    left_out = ("fedstream/client/", "fedstream/stacks/", "fedstream/local/")
    assert not [n for n in names if n.startswith(left_out)]


def test_a_prebuilt_asset_without_the_packages_is_refused(tmp_path: Path):
    with pytest.raises(BundlingError, match="lacks the packages"):
        lambda_code(LambdaAssetSpec(requirements=()), str(tmp_path))


@pytest.mark.parametrize("handler", HANDLERS)
def test_every_handler_the_stack_names_exists(handler: str):
    module, function = handler.rsplit(".", 1)
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"{module} is not importable"
    tree = ast.parse(Path(spec.origin).read_text())
    names = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert function in names


LAMBDA_PYTHON = lambda_python()
needs_lambda_python = pytest.mark.skipif(
    LAMBDA_PYTHON is None,
    reason=f"no local CPython {constants.LAMBDA_PYTHON_VERSION} to compile and run with",
)
PYC_TAG = "cpython-" + constants.LAMBDA_PYTHON_VERSION.replace(".", "")


def pyc_of(module: Path) -> Path:
    return module.parent / "__pycache__" / f"{module.stem}.{PYC_TAG}.pyc"


def test_the_lambda_python_is_taken_from_the_environment_only_if_its_version_matches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # GIVEN FEDSTREAM_LAMBDA_PYTHON pointing at the interpreter running the tests
    monkeypatch.setenv("FEDSTREAM_LAMBDA_PYTHON", sys.executable)
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    # THEN it is the Lambda Python for its own version, and not for another one
    assert lambda_python(here) == sys.executable
    assert lambda_python("3.99") is None
    # AND a path that is not a Python is passed over, not fatal
    monkeypatch.setenv("FEDSTREAM_LAMBDA_PYTHON", str(tmp_path / "no-such-python"))
    assert lambda_python("3.99") is None


def test_without_the_lambda_python_the_build_stops_and_says_how_to_get_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    from fedstream.stacks import bundling

    monkeypatch.setattr(bundling, "lambda_python", lambda version: None)
    with pytest.raises(BundlingError, match=r"no CPython 3\.\d+ .*FEDSTREAM_LAMBDA_PYTHON") as refused:
        build_lambda_asset(LambdaAssetSpec(requirements=()), tmp_path / "asset")
    assert "pyenv install" in str(refused.value)
    assert not (tmp_path / "asset").exists()  # refused before pip ran


@needs_lambda_python
def test_byte_compiled_modules_load_from_bytecode_whatever_the_zip_does_to_file_times(tmp_path: Path):
    assert LAMBDA_PYTHON is not None
    # GIVEN an asset folder with a package
    package = tmp_path / "asset" / "pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "mod.py").write_text("def fail():\n    raise ValueError('from the asset')\n")
    # WHEN it is byte-compiled for the Lambda runtime
    assert byte_compile(tmp_path / "asset", LAMBDA_PYTHON) == 2
    # THEN each module has a hash-based pyc that the runtime never checks against the source
    # (PEP 552 flags = 1)
    pyc = pyc_of(package / "mod.py")
    assert int.from_bytes(pyc.read_bytes()[4:8], "little") == 0b01
    # AND with the sources dated 1980, as the asset's zip leaves them, the runtime still loads the
    # bytecode (timestamp-based bytecode would be stale), and tracebacks name the source
    for path in (package / "__init__.py", package / "mod.py"):
        os.utime(path, (315532800, 315532800))
    result = subprocess.run(
        [LAMBDA_PYTHON, "-S", "-B", "-v", "-c", "import pkg.mod; pkg.mod.fail()"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path / "asset")},
        capture_output=True,
        text=True,
        check=False,
    )
    assert f"# code object from '{pyc}'" in result.stderr
    assert f'File "{package / "mod.py"}", line 2, in fail' in result.stderr


@needs_lambda_python
def test_a_module_the_lambda_python_cannot_compile_fails_the_build_naming_it(tmp_path: Path):
    assert LAMBDA_PYTHON is not None
    (tmp_path / "broken.py").write_text("def f(:\n")
    with pytest.raises(BundlingError, match=r"broken\.py"):
        byte_compile(tmp_path, LAMBDA_PYTHON)


IMPORT_PROBE = """
import importlib, json, pathlib, sys
root = pathlib.Path(sys.argv[1])
handlers = json.loads(sys.argv[2])
imported = []
for handler in handlers:
    module, function = handler.rsplit(".", 1)
    if not (root / (module.replace(".", "/") + ".py")).exists():
        continue
    assert callable(getattr(importlib.import_module(module), function)), handler
    imported.append(handler)
for path in sorted((root / "fedstream" / "handlers").glob("*.py")):
    importlib.import_module("fedstream.handlers." + path.stem)
from fedstream.registry import default_registry
import dp_accounting, numpy, pydantic_core, safetensors.numpy  # native wheels load
print(json.dumps({"handlers": imported, "aggregators": default_registry().names(),
                  "numpy": numpy.__version__, "file": numpy.__file__}))
"""


@pytest.mark.slow
@needs_lambda_python
def test_the_built_asset_imports_every_handler_on_the_lambda_python_from_its_bytecode(tmp_path: Path):
    python = LAMBDA_PYTHON
    assert python is not None
    # GIVEN the asset built by CDK's local bundling (pip, no Docker) for the largest aggregator
    spec = LambdaAssetSpec.for_aggregator("dp-noise")
    app = App(outdir=str(tmp_path / "cdk.out"))
    stack = Stack(app, "AssetProbe")
    lambda_.Function(
        stack,
        "Probe",
        runtime=constants.LAMBDA_RUNTIME,
        architecture=constants.LAMBDA_ARCHITECTURE,
        handler=constants.HANDLER_AGGREGATE,
        code=lambda_code(spec),
    )
    app.synth()
    manifest = json.loads((tmp_path / "cdk.out" / "AssetProbe.assets.json").read_text())
    (code,) = [f for f in manifest["files"].values() if f["displayName"] == "Probe/Code"]
    asset = tmp_path / "cdk.out" / code["source"]["path"]
    assert (asset / "fedstream" / "handlers" / "__init__.py").is_file()
    assert directory_size(asset) < constants.LAMBDA_UNZIPPED_LIMIT_BYTES
    sources = sorted(asset.rglob("*.py"))
    assert sources and not [s for s in sources if not pyc_of(s).is_file()], "modules without bytecode"
    # WHEN every handler module is imported from it alone (-S: no site-packages, a clean cwd, -B:
    # nothing written), its files dated 1980 as in the asset's zip
    for path in asset.rglob("*"):
        os.utime(path, (315532800, 315532800), follow_symlinks=False)
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(asset),
        "PYTHONDONTWRITEBYTECODE": "1",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "POWERTOOLS_TRACE_DISABLED": "1",
        "FEDSTREAM_DISABLE_PLUGIN_AUTOLOAD": "",
    }
    result = subprocess.run(
        [python, "-S", "-v", "-c", IMPORT_PROBE, str(asset), json.dumps(HANDLERS)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    # THEN they import, the plugins register and the native wheels load from the asset
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["file"].startswith(str(asset))
    assert report["handlers"] == list(HANDLERS)
    assert {"fedavg", "fedprox", "dp-noise", "fedasync", "fedbuff"} <= set(report["aggregators"])
    # AND every module of the asset came from its bytecode: none was compiled from source (python -v
    # says "code object from '<pyc>'" for bytecode, "code object from <source>" for a compile)
    loaded = [line for line in result.stderr.splitlines() if line.startswith("# code object from ")]
    from_bytecode = [line for line in loaded if line.startswith(f"# code object from '{asset}")]
    compiled_here = [line for line in loaded if line.startswith(f"# code object from {asset}")]
    assert len(from_bytecode) > 300 and compiled_here == []
