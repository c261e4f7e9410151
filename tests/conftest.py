"""Shared factories and fixtures: layouts, namespaces, KV tensors, a real server, real clients.

The server is the real `kvstore.server.build_server` on 127.0.0.1 port 0 inside the test's
event loop; clients are real `KVClient`s on real channels. Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
import pytest
import torch
from threaded_server import server_thread  # tests/threaded_server.py

from kvstore.client import ClientOptions, KVClient
from kvstore.codec import KVForm, expected_shape
from kvstore.layout import DType, KVLayout, Namespace
from kvstore.server import RunningServer, build_server, load_config
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc

KiB = 1 << 10
MiB = 1 << 20

# Small enough to fill in a test, big enough for a few MiB of blocks.
SERVER_DEFAULTS: dict[str, Any] = {
    "listen": "127.0.0.1:0",
    # Tests of the TCP data plane stay on TCP; tests/integration/test_shm.py turns the
    # same-host path on.
    "shm_socket": "off",
    "log_level": "warning",
    "store.dram_bytes": 32 * MiB,
    "store.page_bytes": 4 * KiB,
    "limits.max_message_bytes": 2 * MiB,
    "limits.default_chunk_bytes": 256 * KiB,
    "limits.max_keys": 1000,
    "limits.drain_grace_s": 2.0,
}


# -- plain factories ------------------------------------------------------------------------


def make_layout(**overrides: Any) -> KVLayout:
    """A small layout: 2 layers x 2 KV heads x 8 dims, fp16, 16 tokens a block (2 KiB a block)."""
    fields: dict[str, Any] = {
        "num_layers": 2,
        "num_kv_heads": 2,
        "head_dim": 8,
        "dtype": DType.FLOAT16,
        "block_tokens": 16,
    }
    fields.update(overrides)
    return KVLayout(**fields)


def make_namespace(layout: KVLayout | None = None, **overrides: Any) -> Namespace:
    fields: dict[str, Any] = {
        "tenant": "tenant-a",
        "model_fingerprint": "llama-toy-v1",
        "layout": layout if layout is not None else make_layout(),
    }
    fields.update(overrides)
    return Namespace(**fields)


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, *, seed: int = 0) -> torch.Tensor:
    """Random bit patterns of `dtype` (NaNs included for float types): compare with same_bytes."""
    generator = torch.Generator().manual_seed(seed)
    nbytes = dtype.itemsize
    raw = torch.randint(0, 256, (*shape, nbytes), dtype=torch.uint8, generator=generator)
    return raw.view(dtype).reshape(shape)


def make_kv(
    layout: KVLayout,
    num_blocks: int,
    *,
    form: KVForm = KVForm.SEQUENCE,
    extra_tokens: int = 0,
    seed: int = 0,
) -> torch.Tensor:
    """A KV tensor of `num_blocks` blocks in `form`; `sequence` may carry extra trailing tokens."""
    shape = list(expected_shape(layout, form, num_blocks))
    if form is KVForm.SEQUENCE:
        shape[2] += extra_tokens
    return random_tensor(tuple(shape), layout.dtype.torch_dtype, seed=seed)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality (NaN payloads and signed zeros included)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


async def wait_for_async(
    probe: Callable[[], Awaitable[bool]], *, timeout_s: float = 10.0, poll_s: float = 0.01
) -> None:
    """Bounded polling for an async condition (e.g. a Stats field reaching a value)."""
    deadline = time.monotonic() + timeout_s
    while not await probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(poll_s)


# -- fixtures --------------------------------------------------------------------------------

ServerFactory = Callable[..., Awaitable[RunningServer]]
ClientFactory = Callable[..., KVClient]


@pytest.fixture
async def server_factory() -> AsyncIterator[ServerFactory]:
    """Start real servers with config overrides ({"store.dram_bytes": ...}); drained after."""
    started: list[RunningServer] = []

    async def start(**overrides: Any) -> RunningServer:
        settings = {**SERVER_DEFAULTS, **{k.replace("__", "."): v for k, v in overrides.items()}}
        running = await build_server(load_config(None, settings))
        started.append(running)
        return running

    yield start
    for running in started:
        await running.drain()


@pytest.fixture
async def server(server_factory: ServerFactory) -> RunningServer:
    return await server_factory()


@pytest.fixture
def target(server: RunningServer) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.fixture(params=["data-plane", "grpc"])
async def connect(target: str, request: pytest.FixtureRequest) -> AsyncIterator[ClientFactory]:
    """A factory of KVClients connected to the `server` fixture (or `at=`); closed after.

    Every test that uses it runs twice: puts and gets over the TCP data plane (the
    default), and over gRPC alone. A test may still pass `data_plane=` itself.
    """
    clients: list[KVClient] = []
    data_plane = request.param == "data-plane"

    def connect(
        namespace: Namespace | None = None, *, at: str | None = None, **options: Any
    ) -> KVClient:
        client = KVClient(
            at or target,
            namespace if namespace is not None else make_namespace(),
            options=ClientOptions(**{"data_plane": data_plane, **options}),
        )
        clients.append(client)
        return client

    yield connect
    for client in clients:
        await client.close()


@pytest.fixture
async def channel(target: str) -> AsyncIterator[grpc.aio.Channel]:
    """A raw channel that may send messages beyond the server's limit."""
    async with grpc.aio.insecure_channel(
        target, options=[("grpc.max_send_message_length", 64 * MiB)]
    ) as raw_channel:
        yield raw_channel


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> pb_grpc.KVStoreStub:
    return pb_grpc.KVStoreStub(channel)


# -- the factories as fixtures, so test modules need not import conftest ---------------------


@pytest.fixture(name="make_layout")
def make_layout_fixture() -> Callable[..., KVLayout]:
    return make_layout


@pytest.fixture(name="make_namespace")
def make_namespace_fixture() -> Callable[..., Namespace]:
    return make_namespace


@pytest.fixture(name="make_kv")
def make_kv_fixture() -> Callable[..., torch.Tensor]:
    return make_kv


@pytest.fixture(name="same_bytes")
def same_bytes_fixture() -> Callable[[torch.Tensor, torch.Tensor], bool]:
    return same_bytes


def run_clean_child(script: str) -> None:
    """Run `script` in a fresh interpreter: it must print "ok" and log no traceback,
    gRPC's late callbacks into a closed event loop among them."""
    finished = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.strip() == "ok"
    assert "Event loop is closed" not in finished.stderr
    assert "Traceback" not in finished.stderr


@pytest.fixture(name="run_clean_child")
def run_clean_child_fixture() -> Callable[[str], None]:
    return run_clean_child


@pytest.fixture(name="poll")
def poll_fixture() -> Callable[..., Awaitable[None]]:
    return wait_for_async


@pytest.fixture(scope="module")
def store_target() -> Iterator[str]:
    """A server on its own loop thread, for blocking clients (SyncKVClient, the connector)."""
    with server_thread() as target:
        yield target
