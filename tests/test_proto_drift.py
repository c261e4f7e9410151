"""The committed generated code must be exactly what proto/generate.py produces from the .proto."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
GENERATED = ["kvstore_pb2.py", "kvstore_pb2.pyi", "kvstore_pb2_grpc.py", "kvstore_pb2_grpc.pyi"]


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "kvstore_proto_generate", REPO / "proto/generate.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("generated")
    load_generator().generate(out_dir)
    return out_dir / "kvstore" / "v1"


@pytest.mark.parametrize("name", GENERATED)
def test_generated_code_has_not_drifted(regenerated: Path, name: str) -> None:
    committed = REPO / "proto" / "kvstore" / "v1" / name
    fresh = regenerated / name
    assert fresh.exists(), f"generate() did not write {name}"
    assert committed.read_bytes() == fresh.read_bytes(), (
        f"proto/kvstore/v1/{name} differs from what `python proto/generate.py` writes; "
        f"regenerate it instead of editing it by hand"
    )


def test_nothing_else_is_generated(regenerated: Path) -> None:
    assert sorted(path.name for path in regenerated.iterdir() if path.is_file()) == sorted(
        GENERATED
    )
