"""The layering the design promises: the core imports neither gRPC, protobuf nor the wire,
the client loads none of the engine, and the client and the server never import each other."""

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


ENGINE = (
    "kvstore.store",
    "kvstore.pool",
    "kvstore.mover",
    "kvstore.tiers",
    "kvstore.eviction",
    "kvstore.put",
    "kvstore.read",
    "kvstore.recovery",
    "kvstore.index",
    "kvstore.arena",
)
UPPER = ("kvstore.client", "kvstore.server", "kvstore.bench")


@pytest.mark.parametrize(
    ("folder", "forbidden", "exempt"),
    [
        # The core: no gRPC, no protobuf, no wire, nothing above it.
        (
            "kvstore",
            ("grpc", "google.protobuf", "kvstore.v1", "kvstore.wire", "aetcd", *UPPER),
            ("wire", "cluster"),
        ),
        # Cluster membership talks to etcd (aetcd, over gRPC), never to the engine; only
        # kvstore/cluster/etcd.py opens gRPC channels (see below).
        ("kvstore/cluster", ("kvstore.v1", *UPPER, *ENGINE), ()),
        # The wire knows messages and frames, not gRPC and not who uses it.
        ("kvstore/wire", ("grpc", *UPPER, *ENGINE), ()),
        # The client library loads no part of the server's engine.
        ("client", ("kvstore.server", "kvstore.bench", *ENGINE), ()),
        ("server", ("kvstore.client", "kvstore.bench"), ()),
        # The load tool speaks through the client library, never the generated messages.
        ("bench", ("kvstore.v1",), ()),
    ],
)
def test_folder_does_not_import(
    folder: str, forbidden: tuple[str, ...], exempt: tuple[str, ...]
) -> None:
    modules = imported_modules(ROOT / folder)
    assert modules, f"no Python files found under {folder}/"
    skipped = tuple(f"{folder}/{subfolder}/" for subfolder in exempt)
    modules = {path: names for path, names in modules.items() if not path.startswith(skipped)}
    offenders = {
        path: sorted(
            name
            for name in names
            if any(name == prefix or name.startswith(prefix + ".") for prefix in forbidden)
        )
        for path, names in modules.items()
    }
    assert {path: names for path, names in offenders.items() if names} == {}


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        # The store is a facade over the pool; the mover works through the pool, and
        # nothing below it refers back up.
        ("kvstore/store.py", ("kvstore.mover",)),
        ("kvstore/pool.py", ("kvstore.mover", "kvstore.store")),
        ("kvstore/read.py", ("kvstore.mover",)),
        # Both transports call the transfer module; neither imports the other.
        ("server/dataplane.py", ("kvstore.server.servicer", "kvstore.server.handlers")),
        ("server/transfer.py", ("kvstore.server.servicer", "kvstore.server.dataplane", "grpc")),
        ("server/servicer.py", ("kvstore.server.dataplane",)),
        # etcd's channel (TLS or not) is opened in kvstore/cluster/etcd.py alone; targets,
        # members, placement and the etcd settings know no gRPC.
        ("kvstore/cluster/members.py", ("grpc", "aetcd")),
        ("kvstore/cluster/placement.py", ("grpc", "aetcd")),
        ("kvstore/cluster/etcd_options.py", ("grpc", "aetcd")),
        ("kvstore/cluster/etcd_probe.py", ("grpc", "aetcd")),
    ],
)
def test_module_does_not_import(module: str, forbidden: tuple[str, ...]) -> None:
    path = ROOT / module
    assert path.is_file(), f"{module} is gone: update this guard"
    names = imported_modules(path.parent)[str(path.relative_to(ROOT))]
    bad = sorted(
        name
        for name in names
        if any(name == prefix or name.startswith(prefix + ".") for prefix in forbidden)
    )
    assert bad == []


def test_the_scan_sees_the_imports_of_a_module() -> None:
    """The scan finds imports in every form the code uses them."""
    module = ROOT / "kvstore" / "store.py"
    names = imported_modules(module.parent)[str(module.relative_to(ROOT))]
    assert "kvstore.config" in names
    assert "time" in names
