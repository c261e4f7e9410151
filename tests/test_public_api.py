"""Guards the client library's public surface: a change here is an API change, made on purpose."""

from __future__ import annotations

import importlib

import grpc
import pytest

import kvstore.client
from kvstore.client import KVStoreClientError

EXPECTED_CLIENT_API = [
    "Aborted",
    "AlreadyExists",
    "Cancelled",
    "ChecksumError",
    "ChecksumKind",
    "ClientOptions",
    "DType",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "HashAlgorithm",
    "Internal",
    "InvalidArgument",
    "KVClient",
    "KVForm",
    "KVLayout",
    "KVStoreClientError",
    "LayerArrival",
    "LayerPut",
    "Namespace",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "PrefixMatch",
    "ProtocolError",
    "PutOutcome",
    "PutResult",
    "ResourceExhausted",
    "StoreStats",
    "SyncKVClient",
    "SyncLayerPut",
    "TierKind",
    "TierStats",
    "Timeouts",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
]


def test_client_all_is_exactly_the_published_list() -> None:
    assert sorted(kvstore.client.__all__) == EXPECTED_CLIENT_API
    assert len(set(kvstore.client.__all__)) == len(kvstore.client.__all__), "duplicates in __all__"


@pytest.mark.parametrize("name", EXPECTED_CLIENT_API)
def test_every_public_name_is_importable(name: str) -> None:
    module = importlib.import_module("kvstore.client")
    assert getattr(module, name) is not None
    namespace: dict[str, object] = {}
    exec(f"from kvstore.client import {name}", namespace)
    assert namespace[name] is getattr(module, name)


def test_star_import_exports_the_list() -> None:
    namespace: dict[str, object] = {}
    exec("from kvstore.client import *", namespace)
    assert sorted(name for name in namespace if not name.startswith("__")) == EXPECTED_CLIENT_API


def test_one_exception_class_per_status_code() -> None:
    classes = [
        getattr(kvstore.client, name)
        for name in EXPECTED_CLIENT_API
        if isinstance(getattr(kvstore.client, name), type)
        and issubclass(getattr(kvstore.client, name), KVStoreClientError)
        and name not in ("KVStoreClientError", "ChecksumError", "ProtocolError")
    ]
    codes = [cls.code for cls in classes]
    assert len(codes) == len(set(codes))
    assert set(codes) == set(grpc.StatusCode) - {grpc.StatusCode.OK}
    assert issubclass(kvstore.client.ChecksumError, kvstore.client.DataLoss)
