"""The core (wire format, schemas, keys, settings, registry, aggregation, bounds, errors) and the
built-in aggregators depend on no server, AWS, client, local-runtime or deployment code: a plugin
author or the offline CLI can use them without any of them. Every import in these modules, at any
depth (functions too), is checked. And nothing anywhere imports the folders by their bare names
(``client``, ``handlers``, ``plugins``, ``stacks``): installed, they exist only as ``fedstream.*``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORE = [
    "__init__",
    "weights",
    "schemas",
    "keys",
    "settings",
    "registry",
    "aggregation",
    "bounds",
    "errors",
    "hookspecs",
]
FORBIDDEN = (
    "fedstream.server",
    "fedstream.local",
    "fedstream.cli",
    "fedstream.offline",
    "fedstream.client",
    "fedstream.handlers",
    "fedstream.stacks",
    "boto3",
    "botocore",
    "aws_lambda_powertools",
    "aws_cdk",
    "moto",
    "tensorflow",
    "keras",
)


def imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


BARE_NAMES = ("client", "handlers", "plugins", "stacks")
BUILT_INS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "plugins").glob("*.py"))


def matches(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("path", [f"fedstream/{m}.py" for m in CORE] + BUILT_INS)
def test_a_core_module_imports_nothing_from_the_server_aws_client_or_runtime(path: str) -> None:
    bad = sorted(m for m in imported_modules(ROOT / path) if matches(m, FORBIDDEN))
    assert not bad, f"{path} imports {bad}"


def test_no_module_imports_a_folder_by_its_bare_name() -> None:
    sources = [p for p in ROOT.rglob("*.py") if not ({".venv", "node_modules", "cdk.out"} & set(p.parts))]
    offenders = {
        p.relative_to(ROOT).as_posix(): bad
        for p in sources
        if (bad := sorted(m for m in imported_modules(p) if matches(m, BARE_NAMES)))
    }
    assert len(sources) > 100 and not offenders


def test_the_built_in_aggregators_register_under_the_fedstream_namespace() -> None:
    import importlib

    from fedstream.registry import BUILTIN_MODULES, dropin_dir

    assert all(m.startswith("fedstream.plugins.") for m in BUILTIN_MODULES)
    # the drop-in folder is for users' modules only: no built-in lives there
    homes = {Path(importlib.import_module(m).__file__).parent for m in BUILTIN_MODULES}
    assert homes == {ROOT / "plugins"} and dropin_dir() == ROOT / "plugins" / "dropin"


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def f():\n    import boto3\n    from fedstream.server import store\n")
    assert imported_modules(source) == {"boto3", "fedstream.server"}
