"""KVConnector against a real in-process server, with a paged cache made of real tensors."""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path

import pytest
import torch
from threaded_server import server_thread  # tests/threaded_server.py

from kvstore.client import (
    ClientOptions,
    DType,
    KVLayout,
    Namespace,
    PermissionDenied,
    SyncKVClient,
    Unavailable,
)
from kvstore.client.connector import KVConnector, KVLoadError, KVSaveError
from kvstore.server.auth import token_sha256

LAYOUT = KVLayout(num_layers=3, num_kv_heads=2, head_dim=8, dtype=DType.FLOAT16, block_tokens=16)
NAMESPACE = Namespace(tenant="connector", model_fingerprint="toy", layout=LAYOUT)


class PagedCache:
    """Per-layer pages `[num_pages, 2, T, H, D]`, like the benchmark model's cache."""

    def __init__(
        self, num_pages: int = 8, *, seed: int | None = None, dtype: torch.dtype = torch.float16
    ) -> None:
        shape = (num_pages, *LAYOUT.layer_shape)
        generator = torch.Generator().manual_seed(seed or 0)
        self.layers = [
            torch.randn(shape, generator=generator).to(dtype)
            if seed is not None
            else torch.zeros(shape, dtype=dtype)
            for _ in range(LAYOUT.num_layers)
        ]

    def page_view(self, layer: int, page: int) -> torch.Tensor:
        return self.layers[layer][page]


class GatedCache(PagedCache):
    """Holds back writes into the last layer until `gate` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def page_view(self, layer: int, page: int) -> torch.Tensor:
        if layer == LAYOUT.num_layers - 1:
            assert self.gate.wait(10), "the test never opened the gate"
        return super().page_view(layer, page)


@pytest.fixture
def dead_target() -> str:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"127.0.0.1:{port}"


def tokens(num_tokens: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50_000, (num_tokens,), generator=generator).tolist()


def save_all(connector: KVConnector, keys: list[bytes], pages: list[int]) -> int:
    connector.start_save_kv(keys, pages)
    for layer in range(LAYOUT.num_layers):
        connector.save_kv_layer(layer)
    result = connector.wait_for_save()
    assert result is not None
    return result.num_committed


def test_save_then_load_round_trips_pages_through_the_store(store_target: str) -> None:
    prompt = tokens(3 * 16 + 5, seed=1)
    source = PagedCache(seed=7)
    with KVConnector(store_target, NAMESPACE, source) as saver:
        keys = saver.keys(prompt)
        assert save_all(saver, keys, [4, 1, 7]) == 3

    dest = PagedCache()
    with KVConnector(store_target, NAMESPACE, dest) as loader:
        match = loader.lookup(prompt)
        assert match.num_matched == 3
        loader.start_load_kv(match, [0, 2, 5])
        for layer in range(LAYOUT.num_layers):
            loader.wait_for_layer_load(layer)
            for src_page, dst_page in ((4, 0), (1, 2), (7, 5)):
                assert torch.equal(
                    dest.page_view(layer, dst_page), source.page_view(layer, src_page)
                )
        stats = loader.wait_for_load()
    assert (stats.num_blocks, stats.num_bytes) == (3, 3 * LAYOUT.block_bytes)
    assert not dest.layers[0][[1, 3, 4, 6, 7]].any(), "pages outside the load were written"


def test_the_connector_takes_a_cluster_target() -> None:
    """Saved through a cluster of three daemons (a run per block, so spread over them),
    loaded back page for page."""
    prompt = tokens(4 * 16 + 5, seed=11)
    source, dest = PagedCache(seed=8), PagedCache()
    options = ClientOptions(cluster_run_blocks=1)
    with contextlib.ExitStack() as servers:
        target = "cluster://" + ",".join(servers.enter_context(server_thread()) for _ in range(3))
        with KVConnector(target, NAMESPACE, source, options=options) as saver:
            assert save_all(saver, saver.keys(prompt), [4, 1, 7, 2]) == 4
        with KVConnector(target, NAMESPACE, dest, options=options) as loader:
            match = loader.lookup(prompt)
            assert match.num_matched == 4
            loader.start_load_kv(match, [0, 2, 5, 6])
            assert loader.wait_for_load().num_blocks == 4
        for layer in range(LAYOUT.num_layers):
            for src_page, dst_page in ((4, 0), (1, 2), (7, 5), (2, 6)):
                assert torch.equal(
                    dest.page_view(layer, dst_page), source.page_view(layer, src_page)
                )


def test_lookup_leaves_at_least_one_token_to_compute(store_target: str) -> None:
    prompt = tokens(2 * 16, seed=2)
    with KVConnector(store_target, NAMESPACE, PagedCache(seed=1)) as connector:
        save_all(connector, connector.keys(prompt), [0, 1])
        assert connector.lookup(prompt).num_matched == 1
        assert connector.lookup([*prompt, 5]).num_matched == 2
        assert connector.get_num_new_matched_tokens([*prompt, 5], num_computed_tokens=16) == 16
        assert connector.get_num_new_matched_tokens(tokens(40, seed=3)) == 0


def test_each_layer_is_ready_before_later_layers_arrive(store_target: str) -> None:
    prompt = tokens(2 * 16 + 1, seed=4)
    source = PagedCache(seed=9)
    cache = GatedCache()
    with KVConnector(store_target, NAMESPACE, source) as saver:
        save_all(saver, saver.keys(prompt), [3, 6])
    with KVConnector(store_target, NAMESPACE, cache) as loader:
        loader.start_load_kv(loader.lookup(prompt), [0, 1])
        last = LAYOUT.num_layers - 1
        for layer in range(last):
            loader.wait_for_layer_load(layer)
            assert torch.equal(cache.layers[layer][[0, 1]], source.layers[layer][[3, 6]])
        # The last layer is held back, so waiting for it times out and the load goes on.
        with pytest.raises(KVLoadError, match="did not arrive"):
            loader.wait_for_layer_load(last, timeout=0.05)
        assert not cache.layers[last].any()
        cache.gate.set()
        loader.wait_for_layer_load(last)
        assert torch.equal(cache.layers[last][[0, 1]], source.layers[last][[3, 6]])


def test_blocks_evicted_after_the_lookup_fail_the_load(store_target: str) -> None:
    prompt = tokens(2 * 16 + 1, seed=5)
    cache = PagedCache()
    with KVConnector(store_target, NAMESPACE, PagedCache(seed=3)) as saver:
        keys = saver.keys(prompt)
        save_all(saver, keys, [0, 1])
    with KVConnector(store_target, NAMESPACE, cache) as loader:
        match = loader.lookup(prompt)
        assert match.num_matched == 2
        with SyncKVClient(store_target, NAMESPACE) as client:
            assert client.delete([keys[1]]) == (1, 0)
        loader.start_load_kv(match, [0, 1])
        for layer in range(LAYOUT.num_layers):
            with pytest.raises(KVLoadError, match="served 1 of 2 blocks"):
                loader.wait_for_layer_load(layer)
        loader.abort()
        assert not any(layer.any() for layer in cache.layers), "a failed load wrote pages"


def test_loading_blocks_the_store_never_had_fails(store_target: str) -> None:
    with KVConnector(store_target, NAMESPACE, PagedCache()) as connector:
        connector.start_load_kv(connector.keys(tokens(16, seed=6)), [0])
        with pytest.raises(KVLoadError, match="none of the 1 blocks"):
            connector.wait_for_layer_load(0)


def test_a_store_that_is_down_fails_lookups_loads_and_saves_but_not_the_model(
    dead_target: str,
) -> None:
    prompt = tokens(2 * 16 + 1, seed=7)
    with KVConnector(dead_target, NAMESPACE, PagedCache()) as connector:
        keys = connector.keys(prompt)
        with pytest.raises(Unavailable):
            connector.lookup(prompt)
        connector.start_load_kv(keys, [0, 1])
        with pytest.raises(KVLoadError) as raised:
            connector.wait_for_layer_load(0)
        assert isinstance(raised.value.__cause__, Unavailable)
        connector.abort()
        connector.start_save_kv(keys, [0, 1])
        for layer in range(LAYOUT.num_layers):
            connector.save_kv_layer(layer)  # queued: the model thread does not block or fail
        with pytest.raises(KVSaveError, match="UNAVAILABLE"):
            connector.wait_for_save()


def test_save_layers_go_in_order_and_only_while_a_save_is_open(store_target: str) -> None:
    prompt = tokens(16, seed=8)
    with KVConnector(store_target, NAMESPACE, PagedCache(seed=2)) as connector:
        connector.save_kv_layer(0)  # nothing to save: ignored, as on every decode step
        assert connector.wait_for_save() is None
        keys = connector.keys(prompt)
        connector.start_save_kv(keys, [0])
        with pytest.raises(ValueError, match="save layer 0 next"):
            connector.save_kv_layer(1)
        connector.save_kv_layer(0)
        with pytest.raises(RuntimeError, match="only 1 of 3 layers"):
            connector.wait_for_save()
        connector.abort()
        assert connector.lookup([*prompt, 1]).num_matched == 0, "an aborted save was stored"
        assert save_all(connector, keys, [0]) == 1
        assert connector.lookup([*prompt, 1]).num_matched == 1


@pytest.mark.parametrize("layers_ready", [LAYOUT.num_layers, 1])
def test_a_save_opened_with_its_layers_ready_stores_every_layer_once(
    store_target: str, layers_ready: int
) -> None:
    prompt = tokens(2 * 16 + 1, seed=30 + layers_ready)
    source = PagedCache(seed=11)
    with KVConnector(store_target, NAMESPACE, source) as saver:
        keys = saver.keys(prompt)
        handle = saver.open_save(keys, [3, 6], layers_ready=layers_ready)
        if layers_ready < LAYOUT.num_layers:
            with pytest.raises(ValueError, match=f"save layer {layers_ready} next"):
                saver.save_kv_layer(0)  # only the layers after the ready ones may follow
        for layer in range(layers_ready, LAYOUT.num_layers):
            saver.save_kv_layer(layer)
        assert handle.result(timeout=30).num_committed == 2
    dest = PagedCache()
    with KVConnector(store_target, NAMESPACE, dest) as loader:
        loader.start_load_kv(loader.lookup(prompt), [0, 1])
        loader.wait_for_load()
    for layer in range(LAYOUT.num_layers):
        assert torch.equal(dest.page_view(layer, 0), source.page_view(layer, 3))
        assert torch.equal(dest.page_view(layer, 1), source.page_view(layer, 6))


def test_layers_ready_beyond_the_layout_are_refused(store_target: str) -> None:
    with KVConnector(store_target, NAMESPACE, PagedCache()) as connector:
        keys = connector.keys(tokens(16, seed=40))
        for bad in (-1, LAYOUT.num_layers + 1):
            with pytest.raises(ValueError, match=r"layers_ready must be 0\.\.3"):
                connector.open_save(keys, [0], layers_ready=bad)


def test_pages_of_another_layout_are_refused(store_target: str) -> None:
    with KVConnector(store_target, NAMESPACE, PagedCache(dtype=torch.float32)) as connector:
        with pytest.raises(ValueError, match="layout needs"):
            connector.start_load_kv([b"k" * 32], [0])
        with pytest.raises(ValueError, match="2 keys but 1 pages"):
            connector.start_save_kv([b"a", b"b"], [0])


def test_page_ids_outside_the_cache_or_named_twice_are_refused(store_target: str) -> None:
    """A negative page id would index the cache from its end (the wrong page, silently);
    one named twice would put two blocks in one page, or store one page as two blocks."""
    source = PagedCache(seed=5)
    with KVConnector(store_target, NAMESPACE, source) as connector:
        keys = connector.keys(tokens(32, seed=41))
        assert save_all(connector, keys, [1, 2]) == 2
        cases = [
            ([0, -1], "page id -1 is negative"),
            ([0, 8], "page id 8 is past the cache's last page"),
            ([3, 3], "page 3 is named more than once"),
        ]
        for pages, message in cases:
            with pytest.raises(ValueError, match=message):
                connector.start_load_kv(keys, pages)
            with pytest.raises(ValueError, match=message):
                connector.start_save_kv([b"x" * 32, b"y" * 32], pages)
    dest = PagedCache()
    with KVConnector(store_target, NAMESPACE, dest) as connector:
        connector.start_load_kv(keys, [6, 7])
        for layer in range(LAYOUT.num_layers):
            connector.wait_for_layer_load(layer)
            assert torch.equal(dest.page_view(layer, 6), source.page_view(layer, 1))
            assert torch.equal(dest.page_view(layer, 7), source.page_view(layer, 2))
        assert not any(dest.page_view(layer, 5).any() for layer in range(LAYOUT.num_layers))


def test_the_connector_carries_its_options_credentials(tmp_path: Path) -> None:
    """A worker's connector against a daemon that authenticates: its ClientOptions token
    admits it; another tenant's token is refused at the lookup, with nothing loaded."""
    tokens_file = tmp_path / "tokens.toml"
    tokens_file.write_text(
        f'[[tokens]]\nsha256 = "{token_sha256("conn-token-01")}"\ntenant = "connector"\n'
        f'[[tokens]]\nsha256 = "{token_sha256("other-token-1")}"\ntenant = "other"\n'
    )
    prompt = tokens(2 * 16 + 3, seed=3)
    with server_thread(**{"auth.tokens_file": str(tokens_file)}) as target:
        own = ClientOptions(token="conn-token-01")
        with KVConnector(target, NAMESPACE, PagedCache(seed=5), options=own) as saver:
            assert save_all(saver, saver.keys(prompt), [0, 1]) == 2
            assert saver.lookup(prompt).num_matched == 2
        foreign = ClientOptions(token="other-token-1")
        with (
            KVConnector(target, NAMESPACE, PagedCache(), options=foreign) as intruder,
            pytest.raises(PermissionDenied),
        ):
            intruder.lookup(prompt)
