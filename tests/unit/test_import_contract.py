"""The core (wire format, schemas, keys, settings, registry, aggregation, bounds, errors) depends on
no server, AWS, client, local-runtime or deployment code: a plugin author or the offline CLI can use
it without any of them. Every import in these modules, at any depth (functions too), is checked."""

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
    "client",
    "handlers",
    "stacks",
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


@pytest.mark.parametrize("module", CORE)
def test_a_core_module_imports_nothing_from_the_server_aws_client_or_runtime(module: str) -> None:
    imports = imported_modules(ROOT / "fedstream" / f"{module}.py")
    bad = sorted(m for m in imports if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))
    assert not bad, f"fedstream/{module}.py imports {bad}"


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def f():\n    import boto3\n    from fedstream.server import store\n")
    assert imported_modules(source) == {"boto3", "fedstream.server"}
