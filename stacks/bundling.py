"""The Lambda asset, built without Docker.

``pip install --platform manylinux_2_X_<machine> --only-binary=:all: --python-version 3.13
--target <asset> --require-hashes -r <lock>`` fetches wheels for the Lambda runtime whatever the
build machine runs, then the ``fedstream/``, ``handlers/`` and ``plugins/`` packages are copied
beside them. A file dropped into ``plugins/`` changes the asset hash, so it deploys with the next
``cdk deploy``.

Then every module is byte-compiled by a CPython of the Lambda runtime's version (found by
:func:`lambda_python`), so the runtime loads bytecode instead of compiling each import again at
every cold start: it cannot write ``__pycache__`` into the read-only ``/var/task``. The ``.pyc``
files are hash-based and unchecked (PEP 552): the asset's zip resets every file's time, which would
make timestamp-based bytecode stale, and the asset never changes after it is built.

The wheels are pinned, each with its sha256, in ``stacks/lambda.lock`` (``stacks/lambda-dp.lock``
adds dp-accounting for the dp-noise aggregator): the resolved versions, for the Lambda runtime's
Python and platform. The asset hash covers the lock's bytes, so a changed dependency redeploys,
and pip refuses a wheel whose hash differs. ``python -m fedstream.stacks.bundling lock`` writes
the locks again from pyproject.toml (after a change to its dependencies; a test says when).
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import jsii
from aws_cdk import AssetHashType, BundlingOptions, DockerImage, ILocalBundling
from aws_cdk import aws_lambda as lambda_
from fedstream.stacks import constants

# Bump when the recipe below changes, so the asset hash changes with it.
RECIPE_VERSION = "3"
LOCKS = {False: "lambda.lock", True: "lambda-dp.lock"}  # with dp-accounting?
_LOCK_HEADER = "# requirements: "
_STRIPPED_DIRS = ("tests",)
LAMBDA_PYTHON_ENV = "FEDSTREAM_LAMBDA_PYTHON"


class BundlingError(RuntimeError):
    """The asset could not be built; the message says which step failed and why."""


def _python_version(python: str) -> str | None:
    """'3.13' for a working CPython executable, else None (pyenv shims of absent versions fail)."""
    try:
        probe = subprocess.run(
            [python, "-c", "import sys; print(sys.implementation.name, '%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:
        return None
    implementation, _, version = probe.stdout.strip().partition(" ")
    return version if probe.returncode == 0 and implementation == "cpython" else None


def lambda_python(version: str = constants.LAMBDA_PYTHON_VERSION) -> str | None:
    """A CPython of the Lambda runtime's version on this machine, or None.

    Looked for in order: ``$FEDSTREAM_LAMBDA_PYTHON``, the interpreter running this code,
    ``python3.13`` on PATH, and pyenv's versions.
    """
    candidates = [os.environ.get(LAMBDA_PYTHON_ENV, ""), sys.executable]
    candidates.append(shutil.which(f"python{version}") or "")
    pyenv_root = os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))
    candidates += sorted(glob.glob(f"{pyenv_root}/versions/{version}*/bin/python{version}"), reverse=True)
    for candidate in dict.fromkeys(filter(None, candidates)):
        if _python_version(candidate) == version:
            return candidate
    return None


def byte_compile(asset: Path, python: str) -> int:
    """Compile every ``.py`` under ``asset`` to unchecked hash-based ``.pyc`` with ``python``;
    returns how many ``.pyc`` files there are."""
    command = [
        python,
        "-m",
        "compileall",
        "-q",
        "-j",
        "0",
        "--invalidation-mode",
        "unchecked-hash",
        str(asset),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BundlingError(
            f"byte-compiling the asset with {python} failed:\n{(result.stdout + result.stderr).strip()}"
        )
    return sum(1 for _ in asset.rglob("__pycache__/*.pyc"))


def _requirement_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;@]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def lambda_requirements(aggregator: str, pyproject: Path = constants.PYPROJECT) -> tuple[str, ...]:
    """The pip requirements of the asset: the core's dependencies + the "server" extra.

    An optional requirement (``constants.OPTIONAL_REQUIREMENTS``) is kept only when the deployed
    aggregator needs it: dp-accounting pulls scipy, which only the dp-noise aggregator imports.
    """
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = [
        *project["dependencies"],
        *project["optional-dependencies"][constants.LAMBDA_REQUIREMENTS_EXTRA],
    ]
    kept = []
    for requirement in requirements:
        users = constants.OPTIONAL_REQUIREMENTS.get(_requirement_name(requirement))
        if users is None or aggregator in users:
            kept.append(requirement)
    return tuple(kept)


def pip_platforms(machine: str = constants.LAMBDA_PIP_MACHINE) -> list[str]:
    """Every manylinux tag the Lambda runtime's glibc accepts, newest first.

    pip does not widen an explicit ``--platform`` to older glibc versions, so each one is listed.
    """
    major, newest = constants.LAMBDA_GLIBC_MAX
    tags = [f"manylinux_{major}_{minor}_{machine}" for minor in range(newest, 16, -1)]
    return [*tags, f"manylinux2014_{machine}"]


def package_sources(packages: Mapping[str, str] = constants.LAMBDA_PACKAGES) -> tuple[tuple[str, Path], ...]:
    """(place in the asset, folder it comes from) for each package, wherever it is installed
    (a checkout's ``handlers/`` folder, or ``site-packages/fedstream/handlers``)."""
    sources = []
    for destination, name in packages.items():
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise BundlingError(f"package {name} is not importable here")
        sources.append((destination, Path(next(iter(spec.submodule_search_locations)))))
    return tuple(sources)


def lock_path(requirements: Sequence[str]) -> Path:
    """The lock of these requirements: with or without dp-accounting."""
    with_dp = "dp-accounting" in {_requirement_name(r) for r in requirements}
    return Path(__file__).resolve().parent / LOCKS[with_dp]


def locked_requirements(lock: Path) -> tuple[str, ...]:
    """The requirements a lock was written for (its header line)."""
    for line in lock.read_text().splitlines():
        if line.startswith(_LOCK_HEADER):
            return tuple(line.removeprefix(_LOCK_HEADER).split("; "))
    return ()


def locked_pins(lock: Path) -> dict[str, str]:
    """name -> pinned version of every wheel in a lock."""
    pins = {}
    for line in lock.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, rest = line.partition("==")
            pins[name.strip().lower()] = rest.split()[0]
    return pins


@dataclass(frozen=True)
class LambdaAssetSpec:
    """What goes into the asset; its fingerprint is the asset hash."""

    requirements: tuple[str, ...]
    python_version: str = constants.LAMBDA_PYTHON_VERSION
    machine: str = constants.LAMBDA_PIP_MACHINE
    sources: tuple[tuple[str, Path], ...] = field(default_factory=package_sources)

    @classmethod
    def for_aggregator(cls, aggregator: str) -> LambdaAssetSpec:
        return cls(requirements=lambda_requirements(aggregator))

    def source_files(self) -> Iterator[tuple[str, Path]]:
        """(path in the asset, file) for every file the asset's packages hold, in a stable order."""
        destinations = {destination for destination, _ in self.sources}
        for destination, root in self.sources:
            if not (root / "__init__.py").is_file():
                raise BundlingError(f"package folder {root} (for {destination}/) has no __init__.py")
            skipped = set(constants.LAMBDA_LEFT_OUT.get(destination, ()))
            skipped |= {d.split("/")[-1] for d in destinations if d.rpartition("/")[0] == destination}
            for path in sorted(root.rglob("*")):
                relative = path.relative_to(root)
                if relative.parts[0] in skipped or "__pycache__" in relative.parts:
                    continue
                if path.is_file() and path.suffix not in {".pyc", ".pyo"} and path.name != ".DS_Store":
                    yield f"{destination}/{relative.as_posix()}", path

    @property
    def lock(self) -> Path:
        return lock_path(self.requirements)

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for part in (RECIPE_VERSION, self.python_version, self.machine, *self.requirements):
            digest.update(part.encode() + b"\0")
        digest.update(self.lock.read_bytes())  # the resolved versions and their hashes
        for name, path in self.source_files():
            digest.update(name.encode() + b"\0")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        return digest.hexdigest()

    def _platform_arguments(self) -> list[str]:
        platforms = [arg for tag in pip_platforms(self.machine) for arg in ("--platform", tag)]
        return [
            *platforms,
            "--implementation", "cp",
            "--python-version", self.python_version,
            "--only-binary=:all:",
        ]  # fmt: skip

    def pip_command(self, target: Path) -> list[str]:
        return [
            sys.executable, "-m", "pip", "install",
            "--quiet", "--disable-pip-version-check", "--no-compile", "--no-warn-conflicts",
            "--target", str(target),
            *self._platform_arguments(),
            "--require-hashes", "--no-deps", "-r", str(self.lock),
        ]  # fmt: skip

    def write_lock(self, work: Path) -> Path:
        """Resolve the requirements for the Lambda runtime (``pip download``) and pin every wheel
        with its sha256 in :attr:`lock`."""
        command = [
            sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
            "--dest", str(work), *self._platform_arguments(), *self.requirements,
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise BundlingError(f"pip could not resolve the Lambda dependencies:\n{result.stderr.strip()}")
        lines = [
            "# The Lambda asset's wheels, pinned with their hashes, for "
            f"CPython {self.python_version} on manylinux {self.machine}.",
            "# Written by `python -m fedstream.stacks.bundling lock`; do not edit.",
            _LOCK_HEADER + "; ".join(self.requirements),
        ]
        for wheel in sorted(work.glob("*.whl"), key=lambda p: p.name.lower()):
            name, version = wheel.name.split("-")[:2]
            name = name.lower().replace("_", "-")
            lines.append(f"{name}=={version} --hash=sha256:{hashlib.sha256(wheel.read_bytes()).hexdigest()}")
        self.lock.write_text("\n".join(lines) + "\n")
        return self.lock


def build_lambda_asset(spec: LambdaAssetSpec, output_dir: Path, python: str | None = None) -> Path:
    """Install the wheels, copy the packages into ``output_dir`` and byte-compile it all with
    ``python`` (default: :func:`lambda_python`); returns ``output_dir``."""
    python = python or lambda_python(spec.python_version)
    if python is None:
        raise BundlingError(
            f"no CPython {spec.python_version} (the Lambda runtime's Python) on this machine to "
            "byte-compile the asset with: install one (python.org, `pyenv install "
            f"{spec.python_version}`, `uv python install {spec.python_version}`, or your OS's "
            f"python{spec.python_version} package), put python{spec.python_version} on PATH or set "
            f"{LAMBDA_PYTHON_ENV} to its path, and deploy again"
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    command = spec.pip_command(output_dir)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BundlingError(
            "pip could not install the Lambda dependencies "
            f"(python {spec.python_version}, {spec.machine}):\n{result.stderr.strip()}\n"
            f"command: {' '.join(command)}"
        )
    for stripped in _STRIPPED_DIRS:
        for directory in sorted(output_dir.glob(f"*/**/{stripped}"), reverse=True):
            if directory.is_dir():
                shutil.rmtree(directory)
    if (output_dir / "fedstream").exists():
        raise BundlingError("a dependency installed a top-level 'fedstream', which clashes with ours")
    for name, path in spec.source_files():
        destination = output_dir / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, destination)
    byte_compile(output_dir, python)
    return output_dir


def directory_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


@jsii.implements(ILocalBundling)
class LocalPipBundling:
    """CDK's local bundling hook: build on this machine with pip, never fall back to Docker."""

    def __init__(self, spec: LambdaAssetSpec) -> None:
        self.spec = spec

    def try_bundle(self, output_dir: str, *_args: object, **_options: object) -> bool:
        try:
            build_lambda_asset(self.spec, Path(output_dir))
        except BundlingError as exc:
            print(f"fedstream: building the Lambda asset failed: {exc}", file=sys.stderr)
            raise
        return True


def lambda_code(spec: LambdaAssetSpec, prebuilt_dir: str | None = None) -> lambda_.Code:
    """The asset as Lambda code: a prebuilt directory as is, else built by ``LocalPipBundling``."""
    if prebuilt_dir:
        path = Path(prebuilt_dir)
        missing = [d for d, _ in spec.sources if not (path / d / "__init__.py").is_file()]
        if missing:
            raise BundlingError(f"lambda_asset_dir {prebuilt_dir} lacks the packages {', '.join(missing)}")
        return lambda_.Code.from_asset(str(path))
    return lambda_.Code.from_asset(
        str(spec.sources[0][1]),
        asset_hash_type=AssetHashType.CUSTOM,
        asset_hash=spec.fingerprint(),
        bundling=BundlingOptions(
            # Only used if local bundling declined, which LocalPipBundling never does.
            image=DockerImage.from_registry(f"public.ecr.aws/sam/build-python{spec.python_version}"),
            local=LocalPipBundling(spec),
        ),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fedstream.stacks.bundling OUT_DIR [AGGREGATOR]``: build the asset outside CDK
    (for CI caches)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["lock"]:
        import tempfile

        for aggregator in ("fedavg", "dp-noise"):
            with tempfile.TemporaryDirectory() as work:
                lock = LambdaAssetSpec.for_aggregator(aggregator).write_lock(Path(work))
            print(f"{lock}: {len(locked_pins(lock))} wheels")
        return 0
    if not args:
        print("usage: python -m fedstream.stacks.bundling OUT_DIR [AGGREGATOR] | lock", file=sys.stderr)
        return 2
    spec = LambdaAssetSpec.for_aggregator(args[1] if len(args) > 1 else "fedavg")
    out = build_lambda_asset(spec, Path(args[0]))
    compiled = sum(1 for _ in out.rglob("__pycache__/*.pyc"))
    print(
        f"{out}: {directory_size(out) / 2**20:.1f} MiB unzipped, {compiled} modules byte-compiled, "
        f"requirements: {', '.join(spec.requirements)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
