"""The server's inner seams: the transfer module and the data plane reach the core
without the gRPC servicer, and the servicer does not reach the data plane."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVER = Path(__file__).resolve().parents[2] / "server"
PACKAGE = "kvstore.server"


def server_imports() -> dict[str, set[str]]:
    """Each kvstore.server module, and the kvstore.server modules it imports."""
    graph: dict[str, set[str]] = {}
    for path in sorted(SERVER.glob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                assert not node.level, f"{path.name}: relative import; the scan reads absolute ones"
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
        module = PACKAGE if path.stem == "__init__" else f"{PACKAGE}.{path.stem}"
        graph[module] = {name for name in names if name.startswith(PACKAGE + ".")}
    return graph


def reached_from(module: str, graph: dict[str, set[str]]) -> set[str]:
    """The kvstore.server modules `module` loads, directly or through others."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        for name in graph.get(todo.pop(), set()):
            if name in graph and name not in seen:
                seen.add(name)
                todo.append(name)
    return seen


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("kvstore.server.transfer", {"kvstore.server.servicer", "kvstore.server.dataplane"}),
        ("kvstore.server.dataplane", {"kvstore.server.servicer", "kvstore.server.handlers"}),
        ("kvstore.server.servicer", {"kvstore.server.dataplane"}),
        ("kvstore.server.lifecycle", {"kvstore.server.servicer", "kvstore.server.dataplane"}),
    ],
)
def test_module_does_not_reach(module: str, forbidden: set[str]) -> None:
    graph = server_imports()
    assert module in graph
    assert not graph[module] & forbidden, "imported directly"
    assert not reached_from(module, graph) & forbidden, "imported through another module"


def test_the_scan_sees_what_the_transports_share() -> None:
    graph = server_imports()
    for transport in ("kvstore.server.servicer", "kvstore.server.dataplane"):
        assert {"kvstore.server.transfer", "kvstore.server.lifecycle"} <= graph[transport]
    assert "kvstore.server.servicer" in reached_from("kvstore.server.app", graph)
