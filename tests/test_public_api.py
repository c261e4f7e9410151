"""Guards the public surfaces (client library, connector, server): a change here is an API
change, made on purpose."""

from __future__ import annotations

import dataclasses
import importlib
import inspect

import grpc
import pytest

import kvstore.client
import kvstore.server
from kvstore.client import KVStoreClientError, connector

EXPECTED_CLIENT_API = [
    "Aborted",
    "AlreadyExists",
    "BandwidthMeter",
    "BlockEvent",
    "BlockEventKind",
    "BlockEvents",
    "BlockView",
    "Cancelled",
    "ChecksumError",
    "ChecksumKind",
    "ClientOptions",
    "DType",
    "DataLoss",
    "DeadlineExceeded",
    "Durability",
    "EtcdOptions",
    "FailedPrecondition",
    "FetchPlan",
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
    "PrefillModel",
    "PrefixMatch",
    "ProtocolError",
    "PutOutcome",
    "PutResult",
    "ResourceExhausted",
    "StoreStats",
    "SyncKVClient",
    "SyncLayerPut",
    "TLSOptions",
    "TOKEN_ENV",
    "TenantStats",
    "TenantTierStats",
    "TierKind",
    "TierStats",
    "Timeouts",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "WatchedBlock",
    "break_even_bandwidth",
    "plan_fetch",
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


# -- the server's surface ------------------------------------------------------------------

EXPECTED_SERVER_API = [
    "Limits",
    "RunningServer",
    "ServerConfig",
    "build_server",
    "load_config",
    "serve",
]


def test_server_all_is_exactly_the_published_list() -> None:
    assert sorted(kvstore.server.__all__) == EXPECTED_SERVER_API
    namespace: dict[str, object] = {}
    exec("from kvstore.server import *", namespace)
    assert sorted(name for name in namespace if not name.startswith("__")) == EXPECTED_SERVER_API


def test_running_server_keeps_what_callers_read() -> None:
    """Tests, benchmarks and embedders read these off the server `build_server` returns."""
    fields = {field.name for field in dataclasses.fields(kvstore.server.RunningServer)}
    assert {"server", "port", "store", "config", "data_plane"} <= fields
    assert inspect.iscoroutinefunction(kvstore.server.RunningServer.drain)
    assert list(inspect.signature(kvstore.server.build_server).parameters) == ["config"]


# -- the connector's surface ---------------------------------------------------------------

EXPECTED_CONNECTOR_API = [
    "KVConnector",
    "KVLoadError",
    "KVSaveError",
    "KVTransferError",
    "LoadStats",
    "PagedCache",
    "SaveHandle",
]
# The vLLM KV-connector-style calls a serving engine's worker makes.
EXPECTED_CONNECTOR_METHODS = [
    "abort",
    "abort_load",
    "close",
    "get_num_new_matched_tokens",
    "keys",
    "load_in_flight",
    "lookup",
    "open_save",
    "save_kv_layer",
    "start_load_kv",
    "start_save_kv",
    "wait_for_layer_load",
    "wait_for_load",
    "wait_for_save",
]


def test_connector_all_is_exactly_the_published_list() -> None:
    assert sorted(connector.__all__) == EXPECTED_CONNECTOR_API
    for name in EXPECTED_CONNECTOR_API:
        assert getattr(connector, name) is not None


def test_connector_methods_are_exactly_the_published_list() -> None:
    methods = sorted(
        name
        for name, value in vars(connector.KVConnector).items()
        if callable(value) and not name.startswith("_")
    )
    assert methods == EXPECTED_CONNECTOR_METHODS
    assert issubclass(connector.KVLoadError, connector.KVTransferError)
    assert issubclass(connector.KVSaveError, connector.KVTransferError)


# -- the vLLM connector's surface ----------------------------------------------------------

EXPECTED_VLLM_CONNECTOR_API = [
    "LOAD_PARAM",
    "SAVE_PARAM",
    "SESSION_END_PARAM",
    "SESSION_PARAM",
    "VLLM_AVAILABLE",
    "ConnectorConfig",
    "ConnectorConfigError",
    "KVConnectorRole",
    "KVStoreConnector",
    "KVStoreConnectorMetadata",
    "KVStoreConnectorStats",
    "MatchPlan",
]


def test_vllm_connector_all_is_exactly_the_published_list() -> None:
    from kvstore.client import vllm_connector

    assert sorted(vllm_connector.__all__) == sorted(EXPECTED_VLLM_CONNECTOR_API)
    for name in EXPECTED_VLLM_CONNECTOR_API:
        assert hasattr(vllm_connector, name)
