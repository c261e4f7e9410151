"""SyncKVClient offers every call of KVClient, with the same parameters."""

from __future__ import annotations

import inspect

import pytest

from kvstore.client import KVClient, LayerPut, SyncKVClient, SyncLayerPut


def _public_calls(cls: type) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(member)
        for name, member in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_")
    }


def _parameters(signature: inspect.Signature) -> list[tuple[str, object, object]]:
    return [
        (parameter.name, parameter.kind, parameter.default)
        for parameter in signature.parameters.values()
    ]


ASYNC_CALLS = _public_calls(KVClient)


def test_the_async_client_has_the_calls_this_test_expects() -> None:
    coroutines = {
        name
        for name, member in inspect.getmembers(KVClient, inspect.iscoroutinefunction)
        if not name.startswith("_")
    }
    assert coroutines == {
        "close",
        "delete",
        "get_into",
        "lookup",
        "lookup_keys",
        "pin",
        "put",
        "put_blocks",
        "stats",
        "unpin",
    }
    assert {"keys", "iter_layers", "layer_put"} <= set(ASYNC_CALLS)


@pytest.mark.parametrize("name", sorted(ASYNC_CALLS))
def test_every_call_has_a_blocking_twin_with_the_same_parameters(name: str) -> None:
    sync_call = getattr(SyncKVClient, name, None)
    assert sync_call is not None, f"SyncKVClient lacks {name}()"
    assert _parameters(inspect.signature(sync_call)) == _parameters(ASYNC_CALLS[name])


def test_the_blocking_layer_put_has_the_same_calls() -> None:
    assert _parameters(inspect.signature(SyncLayerPut.send_layer)) == _parameters(
        inspect.signature(LayerPut.send_layer)
    )
    assert isinstance(inspect.getattr_static(SyncLayerPut, "result"), property)
