"""Imports run one way: the service never imports its test helpers (``livediff.testing``), and
neither the service nor the benchmarks import anything from ``tests/``; shared helpers live in
``livediff.testing``."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "livediff"


def imported_modules(path: Path) -> Iterator[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def offenders(files: Iterator[Path], *prefixes: str) -> list[str]:
    return [
        f"{path.relative_to(REPO)} imports {name}"
        for path in files
        for name in imported_modules(path)
        if any(name == prefix or name.startswith(f"{prefix}.") for prefix in prefixes)
    ]


def test_the_service_never_imports_its_test_helpers() -> None:
    service = (path for path in PACKAGE.rglob("*.py") if "testing" not in path.parts)
    assert offenders(service, "livediff.testing", "tests") == []


def test_benchmarks_import_nothing_from_the_tests() -> None:
    scripts = (REPO / "benchmarks").rglob("*.py")
    assert offenders(scripts, "tests") == []
    mentions = [
        path.name
        for path in (REPO / "benchmarks").rglob("*.py")
        if '"tests"' in path.read_text() or "'tests'" in path.read_text()
    ]
    assert mentions == [], f"benchmarks that build a path into tests/: {mentions}"
