"""The layering the design promises: the core imports neither gRPC nor the client or the
server, and the client and the server never import each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(folder: Path) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in sorted(folder.rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module)
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [
        ("kvstore", ("grpc", "kvstore.client", "kvstore.server", "kvstore.bench", "kvstore.v1")),
        ("client", ("kvstore.server", "kvstore.bench")),
        ("server", ("kvstore.client", "kvstore.bench")),
    ],
)
def test_folder_does_not_import(folder: str, forbidden: tuple[str, ...]) -> None:
    modules = imported_modules(ROOT / folder)
    assert modules, f"no Python files found under {folder}/"
    offenders = {
        path: sorted(
            name
            for name in names
            if any(name == prefix or name.startswith(prefix + ".") for prefix in forbidden)
        )
        for path, names in modules.items()
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_the_scan_sees_the_imports_of_a_module() -> None:
    """The scan finds imports in every form the code uses them."""
    module = ROOT / "kvstore" / "store.py"
    names = imported_modules(module.parent)[str(module.relative_to(ROOT))]
    assert "kvstore.config" in names
    assert "time" in names
