"""Cold-start import time of the Lambda handlers, with and without the asset's bytecode.

A cold start imports the handler module from ``/var/task``, which is read-only: without ``.pyc``
files in the asset, CPython compiles every module of fedstream, numpy, pydantic, boto3 and
Powertools from source again at every cold start, and cannot keep the result. This script builds
the asset as ``cdk deploy`` does (or takes a built one), makes a copy without its ``__pycache__``
folders, makes both read-only, and imports each handler module in a fresh process of the Lambda
runtime's Python (``-S``: nothing but the asset on the path), alternating the two copies.

CPU: Lambda gives a function CPU in proportion to its memory (one vCPU at 1,769 MB). Where this
machine lets the script make a cgroup (cgroup v1 ``cpu`` controller, as root), each probe runs
under a CFS quota of ``memory_mb / 1769`` of one core; elsewhere it runs unthrottled and says so.
The page cache is warm (one discarded run per copy first): a real cold start also reads the
files from disk.

    .venv/bin/python benchmarks/cold_start.py                       # default stack: 1,344 MB, fedavg
    .venv/bin/python benchmarks/cold_start.py --aggregator dp-noise --repeat 9
    .venv/bin/python benchmarks/cold_start.py --asset cdk.out/asset.<hash>   # an asset cdk built
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")

from fedstream.stacks import constants
from fedstream.stacks.bundling import (
    LambdaAssetSpec,
    build_lambda_asset,
    directory_size,
    lambda_python,
)

MB_PER_VCPU = 1769  # AWS: a function has one vCPU at 1,769 MB
CFS_PERIOD_US = 100_000
CGROUP_CPU = Path("/sys/fs/cgroup/cpu")
HANDLERS = (constants.HANDLER_AGGREGATE, constants.HANDLER_FINALIZE, constants.HANDLER_ASYNC_UPDATE)

PROBE = """
import importlib, json, sys, time
wall, cpu = time.perf_counter(), time.process_time()
importlib.import_module(sys.argv[1])
print(json.dumps({"import_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                  "modules": len(sys.modules)}))
"""


@contextlib.contextmanager
def cpu_quota(vcpu: float) -> Iterator[Path | None]:
    """A cgroup holding ``vcpu`` of one core, or None where none can be made."""
    group = CGROUP_CPU / f"fedstream-cold-start-{os.getpid()}"
    try:
        group.mkdir()
        (group / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
        (group / "cpu.cfs_quota_us").write_text(str(round(vcpu * CFS_PERIOD_US)))
    except OSError:
        with contextlib.suppress(OSError):
            group.rmdir()
        yield None
        return
    try:
        yield group
    finally:
        with contextlib.suppress(OSError):
            group.rmdir()


def set_writable(root: Path, writable: bool) -> None:
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        path.chmod(mode | 0o200 if writable else mode & ~0o222)


def probe(python: str, asset: Path, module: str, group: Path | None) -> dict[str, float]:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(asset),
        "PYTHONDONTWRITEBYTECODE": "1",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "POWERTOOLS_SERVICE_NAME": "fedstream",
        "POWERTOOLS_TRACE_DISABLED": "1",
    }

    def enter_group() -> None:
        if group is not None:
            (group / "cgroup.procs").write_text(str(os.getpid()))

    result = subprocess.run(
        [python, "-S", "-c", PROBE, module],
        cwd=asset.parent,
        env=env,
        preexec_fn=enter_group,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"importing {module} from {asset} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> int:
    version = constants.LAMBDA_PYTHON_VERSION
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--asset", type=Path, help="a built asset (default: build one)")
    parser.add_argument("--aggregator", default="fedavg", help="the asset to build (dp-noise adds scipy)")
    parser.add_argument("--memory-mb", type=int, default=1344, help="the function's memory (default: 1344)")
    parser.add_argument("--repeat", type=int, default=7, help="imports per handler and copy")
    parser.add_argument("--python", default=None, help=f"CPython {version} to import with")
    args = parser.parse_args()
    python = args.python or lambda_python()
    if python is None:
        print(f"no CPython {version} here (set FEDSTREAM_LAMBDA_PYTHON)", file=sys.stderr)
        return 2
    vcpu = min(1.0, args.memory_mb / MB_PER_VCPU)
    with tempfile.TemporaryDirectory(prefix="fedstream-cold-start-") as work:
        compiled = Path(work) / "with-bytecode"
        if args.asset:
            shutil.copytree(args.asset, compiled, symlinks=True)
        else:
            print(f"building the {args.aggregator} asset ...", flush=True)
            build_lambda_asset(LambdaAssetSpec.for_aggregator(args.aggregator), compiled, python)
        source_only = Path(work) / "source-only"
        shutil.copytree(compiled, source_only, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        copies = {"source only": source_only, "bytecode": compiled}
        for copy in copies.values():
            set_writable(copy, False)
        try:
            with cpu_quota(vcpu) as group:
                runs: dict[tuple[str, str], list[dict[str, float]]] = {}
                for handler in HANDLERS:
                    module = handler.rsplit(".", 1)[0]
                    for copy in copies.values():  # warm the page cache
                        probe(python, copy, module, group)
                    for _ in range(args.repeat):
                        for name, copy in copies.items():
                            runs.setdefault((handler, name), []).append(probe(python, copy, module, group))
        finally:
            for copy in copies.values():
                set_writable(copy, True)
        version = subprocess.run([python, "-VV"], capture_output=True, text=True, check=False).stdout.strip()
        print(f"python: {version}")
        print(f"cpu: {cpu_model()}, {os.cpu_count()} cores")
        limit = (
            f"{vcpu:.2f} of one core (cgroup CFS quota)" if group else "full speed: no cgroup could be made"
        )
        print(f"function memory: {args.memory_mb:,} MB -> {vcpu:.2f} vCPU; probes ran at {limit}")
        print(
            f"asset: {directory_size(compiled) / 2**20:.1f} MiB with bytecode, "
            f"{directory_size(source_only) / 2**20:.1f} MiB without; "
            f"{args.repeat} imports per cell, warm page cache"
        )
        print()
        print(
            "| handler module | modules | source only, s: median (min-max) "
            "| bytecode, s: median (min-max) | gain |"
        )
        print("|---|---|---|---|---|")
        for handler in HANDLERS:
            cells = []
            medians = []
            for name in copies:
                times = [r["import_s"] for r in runs[(handler, name)]]
                medians.append(statistics.median(times))
                cells.append(f"{medians[-1]:.2f} ({min(times):.2f}-{max(times):.2f})")
            modules = runs[(handler, "bytecode")][0]["modules"]
            gain = medians[0] / medians[1]
            print(f"| `{handler.rsplit('.', 1)[0]}` | {modules} | {cells[0]} | {cells[1]} | {gain:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
