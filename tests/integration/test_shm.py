"""The same-host path (kvstore.wire.shm): block bytes through a shared-memory buffer the
client owns, frames over the daemon's Unix socket.

Real daemons on loopback with their Unix socket in the test's directory, real clients,
real memfds, real torch tensors. Bad input is sent by hand over a raw Unix socket, and
every refusal is checked to leave the daemon serving and the stored blocks intact.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import mmap
import os
import shutil
import signal
import socket
import struct
import sys
import tempfile
import textwrap
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
import torch

from kvstore.arena import PageArena
from kvstore.client import (
    ClientOptions,
    DataLoss,
    DType,
    KVClient,
    KVForm,
    KVLayout,
    Namespace,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from kvstore.client._dataplane import DataPlaneUnreachable
from kvstore.client._shm import ShmPool
from kvstore.errors import InvalidRequest
from kvstore.server import RunningServer
from kvstore.server.auth import token_sha256
from kvstore.server.config import ServerConfig, load_config
from kvstore.server.shm_socket import auto_socket_name
from kvstore.server.workers import worker_configs
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire.chunks import encode_put_header
from kvstore.wire.frames import HELLO_PAYLOAD, FrameKind
from kvstore.wire.namespace import namespace_to_wire
from kvstore.wire.shm import BUFFER_SIZE, REGION

SMALL = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype=DType.FLOAT16, block_tokens=16)
# 32 layers of 16 KiB: a put and a get of 8 blocks span several 256 KiB messages.
LARGE = KVLayout(num_layers=32, num_kv_heads=8, head_dim=64, dtype=DType.BFLOAT16, block_tokens=8)
NS = Namespace(tenant="tenant-a", model_fingerprint="shm", layout=LARGE)
TOKEN_A, TOKEN_B = "tok-a-0123456789", "tok-b-0123456789"
MiB = 1 << 20
KiB = 1 << 10

ServerFactory = Callable[..., Awaitable[RunningServer]]
MakeKV = Callable[..., torch.Tensor]
Poll = Callable[..., Awaitable[None]]


def frame(kind: int, payload: bytes = b"") -> bytes:
    return struct.pack("<BI", kind, len(payload)) + payload


def sealed_memfd(size: int, *, seal: bool = True) -> int:
    fd = os.memfd_create("test-shm", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


class RawShm:
    """A plain Unix socket to the daemon, frames packed by hand."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()

    @classmethod
    async def open(cls, running: RunningServer, token: bytes = b"") -> RawShm:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        raw = cls(sock)
        await raw.loop.sock_connect(sock, running.servicer.shm_path)
        await raw.send(frame(FrameKind.HELLO, HELLO_PAYLOAD + token))
        return raw

    async def admitted(self, running: RunningServer) -> RawShm:
        assert await self.read_frame() == (
            FrameKind.HELLO,
            HELLO_PAYLOAD + running.servicer.shm_instance,
        )
        return self

    async def register(self, fd: int | None, size: int) -> tuple[int, bytes]:
        data = frame(FrameKind.REGISTER, BUFFER_SIZE.pack(size))
        if fd is None:
            await self.send(data)
        else:
            socket.send_fds(self.sock, [data], [fd])
        return await self.read_frame()

    async def send(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)

    async def read_frame(self) -> tuple[int, bytes]:
        async with asyncio.timeout(10):
            header = await self._exactly(5)
            kind, length = struct.unpack("<BI", header)
            return kind, await self._exactly(length)

    async def _exactly(self, count: int) -> bytes:
        received = bytearray()
        while len(received) < count:
            chunk = await self.loop.sock_recv(self.sock, count - len(received))
            if not chunk:
                raise ConnectionError(f"closed after {len(received)} of {count} bytes")
            received += chunk
        return bytes(received)

    async def expect_error(self, code: grpc.StatusCode) -> str:
        kind, payload = await self.read_frame()
        assert kind == FrameKind.ERROR, (kind, payload)
        assert struct.unpack_from("<I", payload)[0] == code.value[0], payload
        message = payload[4:].decode()
        assert await self.loop.sock_recv(self.sock, 1) == b""  # then closed
        return message

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
async def shm_server(server_factory: ServerFactory, tmp_path: Path) -> RunningServer:
    return await server_factory(shm_socket=str(tmp_path / "kv.sock"))


@pytest.fixture
async def clients() -> AsyncIterator[Callable[..., KVClient]]:
    made: list[KVClient] = []

    def make(running: RunningServer, namespace: Namespace = NS, **options: object) -> KVClient:
        client = KVClient(f"127.0.0.1:{running.port}", namespace, options=ClientOptions(**options))
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()


async def put_and_get(client: KVClient, kv: torch.Tensor, label: str) -> torch.Tensor:
    keys = [f"{label}-{index}".encode() for index in range(kv.shape[0])]
    result = await client.put_blocks(keys, kv)
    assert result.num_committed == len(keys)
    dest = torch.zeros_like(kv)
    assert await client.get_into(keys, dest, form=KVForm.BLOCKS) == len(keys)
    return dest


# -- the path itself ----------------------------------------------------------------------


@pytest.mark.parametrize("layout", [SMALL, LARGE], ids=["runs", "chunks"])
async def test_put_and_get_through_shared_memory_are_byte_identical(
    shm_server: RunningServer,
    clients: Callable[..., KVClient],
    make_kv: MakeKV,
    layout: KVLayout,
) -> None:
    namespace = Namespace(tenant="tenant-a", model_fingerprint="shm", layout=layout)
    client = clients(shm_server, namespace)
    kv = make_kv(layout, 8, form=KVForm.BLOCKS, seed=3)
    dest = await put_and_get(client, kv, "blocks")
    assert torch.equal(dest.view(torch.uint8), kv.view(torch.uint8))
    assert client.data_plane == f"unix:{shm_server.servicer.shm_path}"
    assert shm_server.data_plane is not None
    assert shm_server.data_plane.shm_transfers == 2  # the put and the get, nothing on TCP
    assert shm_server.data_plane.transfers == 2


async def test_a_client_with_small_messages_gets_more_than_its_buffer_holds(
    shm_server: RunningServer, clients: Callable[..., KVClient], make_kv: MakeKV
) -> None:
    """The shared buffer is four of the client's largest messages: replies are sized so
    that two fit it, whatever the get's size (replies packed to 2 MiB did not fit a
    1 MiB buffer)."""
    layout = KVLayout(
        num_layers=32, num_kv_heads=2, head_dim=128, dtype=DType.FLOAT16, block_tokens=16
    )
    namespace = Namespace(tenant="tenant-a", model_fingerprint="small-buffer", layout=layout)
    client = clients(shm_server, namespace, max_message_bytes=256 * KiB, chunk_bytes=128 * KiB)
    kv = make_kv(layout, 6, form=KVForm.BLOCKS, seed=5)  # 3 MiB, one run of 96 KiB a layer
    dest = await put_and_get(client, kv, "small-buffer")
    assert torch.equal(dest.view(torch.uint8), kv.view(torch.uint8))
    assert shm_server.data_plane is not None
    assert shm_server.data_plane.shm_transfers == 2


async def test_a_closed_connections_buffers_are_unmapped_off_the_loop(
    shm_server: RunningServer,
    clients: Callable[..., KVClient],
    make_kv: MakeKV,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """munmap of a client's touched buffers takes milliseconds per 64 MiB: a connection
    that ends unmaps them on a thread, so no step of the daemon's loop waits for it."""
    from kvstore.server.shm import ClientBuffers

    closed_on: list[threading.Thread] = []
    unmap = ClientBuffers.close

    def close(self: ClientBuffers) -> None:
        closed_on.append(threading.current_thread())
        unmap(self)

    monkeypatch.setattr(ClientBuffers, "close", close)
    client = clients(shm_server, NS, shared_memory=True)
    kv = make_kv(LARGE, 4, form=KVForm.BLOCKS, seed=5)
    dest = await put_and_get(client, kv, "unmapped")
    assert torch.equal(dest.view(torch.uint8), kv.view(torch.uint8))
    await client.close()

    deadline = asyncio.get_running_loop().time() + 10
    while not closed_on:
        assert asyncio.get_running_loop().time() < deadline, "the buffers were never closed"
        await asyncio.sleep(0.01)
    assert threading.current_thread() not in closed_on


@pytest.mark.parametrize("num_blocks", [1, 3, 40])
async def test_a_few_blocks_of_a_many_layer_model_pass_the_put_floor(
    shm_server: RunningServer, clients: Callable[..., KVClient], make_kv: MakeKV, num_blocks: int
) -> None:
    # 32 layers of 2 KiB: every layer's one short run fits in one message, which the
    # server's put floor must take (it once refused it as too many small pieces).
    layout = KVLayout(
        num_layers=32, num_kv_heads=1, head_dim=1, dtype=DType.BFLOAT16, block_tokens=512
    )
    namespace = Namespace(tenant="tenant-a", model_fingerprint="deep", layout=layout)
    client = clients(shm_server, namespace, shared_memory=True)
    kv = make_kv(layout, num_blocks, form=KVForm.BLOCKS, seed=9)
    dest = await put_and_get(client, kv, f"deep-{num_blocks}")
    assert torch.equal(dest.view(torch.uint8), kv.view(torch.uint8))


async def test_layer_put_and_iter_layers_through_shared_memory(
    shm_server: RunningServer, clients: Callable[..., KVClient], make_kv: MakeKV
) -> None:
    client = clients(shm_server)
    kv = make_kv(LARGE, 6, form=KVForm.BLOCKS, seed=5)  # [blocks, layers, ...]
    keys = [f"layer-{index}".encode() for index in range(6)]
    async with client.layer_put(keys) as put:
        for layer in range(LARGE.num_layers):
            await put.send_layer(layer, kv[:, layer].contiguous())
    assert put.result is not None
    assert put.result.num_committed == 6
    layers = []
    async for arrival in client.iter_layers(keys):
        layers.append(arrival.kv.clone())
    assert len(layers) == LARGE.num_layers
    assert torch.equal(torch.stack(layers, dim=1).view(torch.uint8), kv.view(torch.uint8))
    assert shm_server.data_plane is not None
    assert shm_server.data_plane.shm_transfers == 2


async def test_many_puts_and_gets_at_once_share_nothing(
    shm_server: RunningServer, clients: Callable[..., KVClient], make_kv: MakeKV
) -> None:
    """Concurrent transfers take their own connections and buffers."""
    client = clients(shm_server)
    tensors = [make_kv(LARGE, 4, form=KVForm.BLOCKS, seed=seed) for seed in range(6)]
    results = await asyncio.gather(
        *(put_and_get(client, kv, f"c{n}") for n, kv in enumerate(tensors))
    )
    for kv, dest in zip(tensors, results, strict=True):
        assert torch.equal(dest.view(torch.uint8), kv.view(torch.uint8))


# -- choosing the path --------------------------------------------------------------------


async def test_without_the_socket_transfers_fall_back_to_tcp(
    shm_server: RunningServer, clients: Callable[..., KVClient], make_kv: MakeKV
) -> None:
    os.unlink(shm_server.servicer.shm_path)  # the daemon is on another host, as it were
    client = clients(shm_server)
    kv = make_kv(LARGE, 3, form=KVForm.BLOCKS, seed=1)
    dest = await put_and_get(client, kv, "fallback")
    assert torch.equal(dest.view(torch.uint8), kv.view(torch.uint8))
    assert client.data_plane == f"127.0.0.1:{shm_server.servicer.data_plane_port}"
    assert shm_server.data_plane is not None
    assert shm_server.data_plane.shm_transfers == 0


async def test_without_the_socket_or_tcp_transfers_use_grpc(
    server_factory: ServerFactory, clients: Callable[..., KVClient], make_kv: MakeKV, tmp_path: Path
) -> None:
    running = await server_factory(shm_socket=str(tmp_path / "kv.sock"), data_port=-1)
    os.unlink(running.servicer.shm_path)
    client = clients(running)
    kv = make_kv(LARGE, 2, form=KVForm.BLOCKS, seed=2)
    dest = await put_and_get(client, kv, "grpc")
    assert torch.equal(dest.view(torch.uint8), kv.view(torch.uint8))
    assert client.data_plane is None


async def test_shared_memory_alone_serves_when_tcp_is_off(
    server_factory: ServerFactory, clients: Callable[..., KVClient], make_kv: MakeKV, tmp_path: Path
) -> None:
    running = await server_factory(shm_socket=str(tmp_path / "kv.sock"), data_port=-1)
    client = clients(running)
    kv = make_kv(LARGE, 2, form=KVForm.BLOCKS, seed=2)
    dest = await put_and_get(client, kv, "only")
    assert torch.equal(dest.view(torch.uint8), kv.view(torch.uint8))
    assert client.data_plane == f"unix:{running.servicer.shm_path}"


async def test_the_options_force_or_refuse_shared_memory(
    shm_server: RunningServer,
    server_factory: ServerFactory,
    clients: Callable[..., KVClient],
    make_kv: MakeKV,
) -> None:
    kv = make_kv(LARGE, 2, form=KVForm.BLOCKS, seed=4)
    refused = clients(shm_server, shared_memory=False)
    await put_and_get(refused, kv, "tcp")
    assert refused.data_plane == f"127.0.0.1:{shm_server.servicer.data_plane_port}"
    forced = clients(shm_server, shared_memory=True)
    await put_and_get(forced, kv, "shm")
    assert forced.data_plane == f"unix:{shm_server.servicer.shm_path}"
    # Required, but the daemon offers none: the transfer fails rather than use TCP.
    no_shm = await server_factory()  # the tests' default: shm_socket = "off"
    required = clients(no_shm, shared_memory=True)
    with pytest.raises(Unavailable, match="same-host path is required"):
        await required.put_blocks([b"k0"], kv[:1])
    with pytest.raises(ValueError, match="needs data_plane=True"):
        ClientOptions(shared_memory=True, data_plane=False)


async def test_a_socket_of_another_daemon_is_not_taken_for_this_one(
    shm_server: RunningServer, server_factory: ServerFactory, tmp_path: Path
) -> None:
    other = await server_factory(shm_socket=str(tmp_path / "other.sock"))
    pool = ShmPool(other.servicer.shm_path, shm_server.servicer.shm_instance, 8 * MiB, 32 * MiB)
    loop = asyncio.get_running_loop()
    with pytest.raises(DataPlaneUnreachable, match="another daemon"):
        await pool.acquire(loop.time() + 5, loop.time() + 5)


async def test_auto_puts_the_socket_in_the_runtime_dir_and_drain_removes_it(
    server_factory: ServerFactory,
) -> None:
    running = await server_factory(shm_socket="auto")
    path = running.servicer.shm_path
    assert path.endswith(".sock")
    assert os.stat(path).st_mode & 0o777 == 0o600  # this user's clients only
    await running.drain()
    with pytest.raises(FileNotFoundError):
        os.stat(path)


async def test_an_auto_socket_sweeps_the_files_of_daemons_that_are_gone(
    server_factory: ServerFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SIGKILLed daemons leave their auto-named files behind; the next auto daemon in the
    # directory removes those whose process is gone and which nobody listens on.
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    gone = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await gone.wait()
    dead_pid = gone.pid  # reaped: no process has it now

    def bound(name: str, *, listening: bool = False) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(tmp_path / name))
        if listening:
            sock.listen(1)
        return sock

    bound(auto_socket_name(dead_pid, "0badf00d")).close()  # a killed daemon's: swept
    own = bound(auto_socket_name(os.getpid(), "00c0ffee"))  # its process lives: kept
    own.close()
    # A live daemon seen under another pid namespace: its pid means nothing here, but
    # it listens, so its file stays.
    elsewhere = bound(auto_socket_name(dead_pid, "feedf00d"), listening=True)
    bound("kvstore-not-ours.sock").close()  # not an auto name: kept
    (tmp_path / auto_socket_name(dead_pid, "0000beef")).write_text("x")  # not a socket
    try:
        running = await server_factory(shm_socket="auto")
        left = sorted(os.listdir(tmp_path))
        assert left == sorted(
            [
                auto_socket_name(os.getpid(), "00c0ffee"),
                auto_socket_name(dead_pid, "feedf00d"),
                auto_socket_name(dead_pid, "0000beef"),
                "kvstore-not-ours.sock",
                os.path.basename(running.servicer.shm_path),
            ]
        )
    finally:
        elsewhere.close()


# 64 KiB layers: in 64 KiB messages a put carries each layer as a chunk of its own.
WIDE_LAYERS = KVLayout(
    num_layers=4, num_kv_heads=8, head_dim=128, dtype=DType.BFLOAT16, block_tokens=16
)


@pytest.mark.parametrize(
    "layout", [LARGE, WIDE_LAYERS], ids=["runs-across-pages", "chunk-per-layer"]
)
async def test_a_client_changing_its_buffer_during_a_put_never_gets_other_bytes_stored(
    shm_server: RunningServer,
    clients: Callable[..., KVClient],
    make_kv: MakeKV,
    monkeypatch: pytest.MonkeyPatch,
    layout: KVLayout,
) -> None:
    # The daemon applies PUT_SHM straight from the client's buffer, which the client
    # (another process: a bug, or malice) can write into meanwhile. The worst moment is
    # just before the daemon copies a piece into its arena: here a byte of the piece is
    # changed then, as such a client would. The put may be refused, but no block may
    # commit with bytes other than those its checksum was verified over.
    real_write, real_write_slices = PageArena.write, PageArena.write_slices
    changed: list[int] = []

    def change_first_byte(data: bytes | memoryview) -> None:
        if not changed and isinstance(data, memoryview) and not data.readonly:
            changed.append(data[0])
            data[0] ^= 0xFF

    def write(arena: PageArena, pages: list[int], offset: int, data: bytes | memoryview) -> None:
        change_first_byte(data)
        real_write(arena, pages, offset, data)

    def write_slices(
        arena: PageArena, blocks: list[list[int]], offset: int, data: memoryview, nbytes: int
    ) -> None:
        change_first_byte(data)
        real_write_slices(arena, blocks, offset, data, nbytes)

    monkeypatch.setattr(PageArena, "write", write)
    monkeypatch.setattr(PageArena, "write_slices", write_slices)
    namespace = Namespace(tenant="tenant-a", model_fingerprint="changing", layout=layout)
    client = clients(shm_server, namespace, chunk_bytes=64 * 1024)
    kv = make_kv(layout, 1, form=KVForm.BLOCKS, seed=12)
    with pytest.raises(DataLoss, match="checksum"):
        await client.put_blocks([b"changed"], kv)
    assert changed, "no piece came from a writable buffer"
    assert (await client.lookup_keys([b"changed"])).num_matched == 0
    monkeypatch.undo()  # the client stops changing its buffer: the same put now lands
    assert (await client.put_blocks([b"changed"], kv)).num_committed == 1
    assert shm_server.data_plane.shm_transfers == 1  # through the shared buffer
    got = torch.zeros_like(kv)
    assert await client.get_into([b"changed"], got, form=KVForm.BLOCKS) == 1
    assert torch.equal(got.view(torch.uint8), kv.view(torch.uint8))


async def test_the_socket_is_bound_where_no_other_user_can_reach_it(
    server_factory: ServerFactory,
    clients: Callable[..., KVClient],
    make_kv: MakeKV,
    tmp_path: Path,
) -> None:
    # Bound in a private directory and linked into place at 0600: at no moment does
    # the socket file sit at its path with the umask's mode; nothing is left beside it.
    directory = tmp_path / "run"
    directory.mkdir()
    path = directory / "kv.sock"
    umask = os.umask(0o022)  # what a daemon usually runs with: 0755 files
    try:
        running = await server_factory(shm_socket=str(path))
        assert os.umask(0o022) == 0o022  # the process's umask was never changed
    finally:
        os.umask(umask)
    assert running.servicer.shm_path == str(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.listdir(directory) == ["kv.sock"]  # the staging directory is gone
    client = clients(running)
    kv = make_kv(LARGE, 2, form=KVForm.BLOCKS)
    got = await put_and_get(client, kv, "private")
    assert torch.equal(got.view(torch.uint8), kv.view(torch.uint8))
    assert running.data_plane.shm_transfers == 2  # both through the linked socket


async def test_a_stale_socket_file_is_replaced_and_a_live_one_refused(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    path = tmp_path / "kv.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # a daemon that died: the file stays, nobody listens
    running = await server_factory(shm_socket=str(path))
    assert running.servicer.shm_path == str(path)
    with pytest.raises(OSError, match="another daemon listens"):
        await server_factory(shm_socket=str(path))
    (tmp_path / "plain").write_text("x")
    with pytest.raises(OSError, match="not a socket"):
        await server_factory(shm_socket=str(tmp_path / "plain"))


def test_shm_socket_settings_are_checked() -> None:
    assert load_config(None, {"shm_socket": "off"}).shm_socket_path() is None
    assert load_config(None, {"shm_socket": "/run/kv.sock"}).shm_socket_path() == "/run/kv.sock"
    with pytest.raises(InvalidRequest, match="at most 107 bytes"):
        load_config(None, {"shm_socket": "/" + "x" * 200})


# -- authentication and limits ------------------------------------------------------------


@pytest.fixture
async def secured(server_factory: ServerFactory, tmp_path: Path) -> RunningServer:
    tokens = tmp_path / "tokens.toml"
    lines = []
    for token, tenant in ((TOKEN_A, "tenant-a"), (TOKEN_B, "tenant-b")):
        lines += ["[[tokens]]", f'sha256 = "{token_sha256(token)}"', f'tenant = "{tenant}"']
        lines += ['role = "tenant"']
    tokens.write_text("\n".join(lines) + "\n")
    return await server_factory(
        shm_socket=str(tmp_path / "kv.sock"),
        auth__tokens_file=str(tokens),
        **{"quotas.tenant-b.max_data_connections": 1},
    )


async def test_a_bad_token_on_the_socket_is_unauthenticated_and_closed(
    secured: RunningServer,
) -> None:
    raw = await RawShm.open(secured, b"tok-never-issued")
    message = await raw.expect_error(grpc.StatusCode.UNAUTHENTICATED)
    assert "token" in message
    raw.close()
    silent = await RawShm.open(secured)  # no token at all
    await silent.expect_error(grpc.StatusCode.UNAUTHENTICATED)
    silent.close()


async def test_a_client_with_a_bad_token_gets_unauthenticated_not_a_fallback(
    secured: RunningServer, clients: Callable[..., KVClient], make_kv: MakeKV
) -> None:
    client = clients(secured, token="tok-never-issued")
    with pytest.raises(Unauthenticated):
        await client.put_blocks([b"k0"], make_kv(LARGE, 1, form=KVForm.BLOCKS))


async def test_tokens_decide_the_tenant_on_the_socket_too(
    secured: RunningServer, clients: Callable[..., KVClient], make_kv: MakeKV
) -> None:
    own = clients(secured, token=TOKEN_A)
    kv = make_kv(LARGE, 2, form=KVForm.BLOCKS, seed=8)
    dest = await put_and_get(own, kv, "mine")
    assert torch.equal(dest.view(torch.uint8), kv.view(torch.uint8))
    assert own.data_plane == f"unix:{secured.servicer.shm_path}"
    # Tenant b's token, tenant a's namespace: refused, as on every path.
    thief = clients(secured, NS, token=TOKEN_B)
    dest = torch.zeros_like(kv)
    with pytest.raises(Exception, match="PERMISSION_DENIED"):
        await thief.get_into([b"mine-0", b"mine-1"], dest, form=KVForm.BLOCKS)
    assert not dest.any()


async def test_a_revoked_token_maps_no_more_buffers_on_an_open_connection(
    secured: RunningServer, tmp_path: Path
) -> None:
    raw = await (await RawShm.open(secured, TOKEN_A.encode())).admitted(secured)
    try:
        fd = sealed_memfd(MiB)
        assert (await raw.register(fd, MiB))[0] == FrameKind.REGISTERED
        # Tenant a's token leaves the file; the reload (SIGHUP) takes effect at once.
        tokens = tmp_path / "tokens.toml"
        kept = [line for line in tokens.read_text().split("[[tokens]]") if "tenant-a" not in line]
        tokens.write_text("[[tokens]]".join(kept))
        assert secured.auth is not None
        assert secured.auth.reload()
        socket.send_fds(raw.sock, [frame(FrameKind.REGISTER, BUFFER_SIZE.pack(MiB))], [fd])
        os.close(fd)
        await raw.expect_error(grpc.StatusCode.UNAUTHENTICATED)
    finally:
        raw.close()


_SQUATTER = """
import os, socket, sys
path = sys.argv[1]
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(path)
os.chmod(path, 0o777)
listener.listen(4)
listener.settimeout(20)
print("ready", flush=True)
connection, _ = listener.accept()
connection.settimeout(3)
received = b""
try:
    while chunk := connection.recv(65536):
        received += chunk
except socket.timeout:
    pass
print(received.hex(), flush=True)
"""


# The other user's listener runs on the system's interpreter: this one may sit where only
# root can reach it (a pyenv under /root).
_OTHER_USERS_PYTHON = "/usr/bin/python3"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a listener as another user")
@pytest.mark.skipif(not os.path.exists(_OTHER_USERS_PYTHON), reason="no /usr/bin/python3")
async def test_no_token_goes_to_another_users_socket_at_the_daemons_path(
    server_factory: ServerFactory, clients: Callable[..., KVClient], make_kv: MakeKV
) -> None:
    """Another user holds the advertised path (the daemon's socket was removed, or the
    daemon is on another host): the client must not send its token there, and falls
    back to TCP."""
    shared = Path(tempfile.mkdtemp(prefix="kvstore-squat-"))
    shared.chmod(0o777)  # noqa: ASYNC240
    try:
        tokens = shared / "tokens.toml"
        entry = f'[[tokens]]\nsha256 = "{token_sha256(TOKEN_A)}"\ntenant = "tenant-a"\n'
        tokens.write_text(entry)
        path = shared / "kv.sock"
        running = await server_factory(shm_socket=str(path), auth__tokens_file=str(tokens))
        path.unlink()
        squatter = await asyncio.create_subprocess_exec(
            _OTHER_USERS_PYTHON, "-c", _SQUATTER, str(path),
            stdout=asyncio.subprocess.PIPE, user=65534, group=65534,
        )  # fmt: skip
        assert squatter.stdout is not None
        assert await squatter.stdout.readline() == b"ready\n"
        client = clients(running, token=TOKEN_A)
        kv = make_kv(LARGE, 1, form=KVForm.BLOCKS, seed=3)
        dest = await put_and_get(client, kv, "squat")
        assert torch.equal(dest.view(torch.uint8), kv.view(torch.uint8))
        assert client.data_plane == f"127.0.0.1:{running.servicer.data_plane_port}"
        received = bytes.fromhex((await squatter.stdout.readline()).decode().strip())
        await squatter.wait()
        assert TOKEN_A.encode() not in received
        assert received == b""  # refused before HELLO: nothing at all was sent
    finally:
        shutil.rmtree(shared, ignore_errors=True)


async def test_the_tenant_connection_quota_counts_socket_connections(
    secured: RunningServer,
) -> None:
    first = await (await RawShm.open(secured, TOKEN_B.encode())).admitted(secured)
    second = await RawShm.open(secured, TOKEN_B.encode())
    message = await second.expect_error(grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "max_data_connections" in message
    first.close()
    second.close()


# -- bad input ----------------------------------------------------------------------------


@pytest.fixture
async def seeded(
    shm_server: RunningServer, clients: Callable[..., KVClient], make_kv: MakeKV
) -> tuple[KVClient, torch.Tensor]:
    client = clients(shm_server)
    kv = make_kv(LARGE, 3, form=KVForm.BLOCKS, seed=11)
    await put_and_get(client, kv, "seed")
    return client, kv


async def assert_unharmed(client: KVClient, kv: torch.Tensor) -> None:
    keys = [f"seed-{index}".encode() for index in range(kv.shape[0])]
    dest = torch.zeros_like(kv)
    assert await client.get_into(keys, dest, form=KVForm.BLOCKS) == len(keys)
    assert torch.equal(dest.view(torch.uint8), kv.view(torch.uint8))
    stats = await client.stats()
    assert stats.put_reserved_bytes == 0


def region(buffer_id: int, offset: int, length: int) -> bytes:
    return REGION.pack(buffer_id, offset, length)


BAD_FRAMES = {
    # No buffer registered on this connection: ids never reach another's.
    "unregistered buffer": (
        None,
        frame(FrameKind.PUT_SHM, region(1, 0, 64)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "no buffer 1 is registered on this connection",
    ),
    "region past the end": (
        MiB,
        frame(FrameKind.PUT_SHM, region(1, MiB - 10, 64)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "lies outside buffer 1",
    ),
    "offset wraps around": (
        MiB,
        frame(FrameKind.PUT_SHM, region(1, (1 << 64) - 8, 64)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "lies outside buffer 1",
    ),
    "region over the message limit": (
        64 * MiB,
        frame(FrameKind.PUT_SHM, region(1, 0, 32 * MiB)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "exceeds the",
    ),
    "short region": (
        MiB,
        frame(FrameKind.PUT_SHM, b"\x01\x00"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "region is 20 bytes",
    ),
    "get region too small for a reply": (
        MiB,
        frame(FrameKind.GET_SHM, region(1, 0, 128)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "smaller than a",
    ),
    "an acknowledgement out of the blue": (
        MiB,
        frame(FrameKind.SHM_DONE),
        grpc.StatusCode.INVALID_ARGUMENT,
        "a transfer starts with",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FRAMES))
async def test_bad_frames_get_an_error_and_harm_nothing(
    case: str, shm_server: RunningServer, seeded: tuple[KVClient, torch.Tensor]
) -> None:
    buffer_bytes, data, code, expected = BAD_FRAMES[case]
    raw = await (await RawShm.open(shm_server)).admitted(shm_server)
    if buffer_bytes is not None:
        fd = sealed_memfd(buffer_bytes)
        assert await raw.register(fd, buffer_bytes) == (FrameKind.REGISTERED, b"\x01\x00\x00\x00")
        os.close(fd)
    if case == "get region too small for a reply":
        request = pb.GetBlocksRequest(namespace=namespace_to_wire(NS), keys=[b"seed-0"])
        data = frame(FrameKind.GET_SHM, region(1, 0, 128) + request.SerializeToString())
    await raw.send(data)
    assert expected in await raw.expect_error(code)
    raw.close()
    await assert_unharmed(*seeded)


async def test_a_client_cannot_name_another_clients_buffer(
    shm_server: RunningServer, seeded: tuple[KVClient, torch.Tensor]
) -> None:
    owner = await (await RawShm.open(shm_server)).admitted(shm_server)
    fd = sealed_memfd(MiB)
    assert (await owner.register(fd, MiB))[0] == FrameKind.REGISTERED
    os.close(fd)
    intruder = await (await RawShm.open(shm_server)).admitted(shm_server)
    fd = sealed_memfd(MiB)
    assert await intruder.register(fd, MiB) == (FrameKind.REGISTERED, b"\x01\x00\x00\x00")
    os.close(fd)
    # Its own id 1 is its own buffer; the owner's buffer has no name it could use.
    await intruder.send(frame(FrameKind.PUT_SHM, region(2, 0, 64)))
    assert "no buffer 2 is registered" in await intruder.expect_error(
        grpc.StatusCode.INVALID_ARGUMENT
    )
    owner.close()
    intruder.close()
    await assert_unharmed(*seeded)


@pytest.mark.parametrize(
    ("what", "expected"),
    [
        ("no descriptor", "exactly one file descriptor"),
        ("two descriptors", "a connection passes one descriptor"),
        ("unsealed memfd", "not sealed against shrinking"),
        ("regular file", "not a sealable memfd"),
        ("pipe", "not a memfd"),
        ("smaller than declared", "holds 4096 bytes, not the 1048576 declared"),
        ("zero size", "1 byte to"),
    ],
)
async def test_bad_registrations_are_refused(
    what: str,
    expected: str,
    shm_server: RunningServer,
    seeded: tuple[KVClient, torch.Tensor],
    tmp_path: Path,
) -> None:
    raw = await (await RawShm.open(shm_server)).admitted(shm_server)
    size = 0 if what == "zero size" else MiB
    data = frame(FrameKind.REGISTER, BUFFER_SIZE.pack(size))
    fds: list[int] = []
    if what == "two descriptors":
        fds = [sealed_memfd(MiB), sealed_memfd(MiB)]
    elif what == "unsealed memfd":
        fds = [sealed_memfd(MiB, seal=False)]
    elif what == "regular file":
        path = tmp_path / "file"
        path.write_bytes(b"\0" * MiB)
        fds = [os.open(path, os.O_RDWR)]
    elif what == "pipe":
        read_end, write_end = os.pipe()
        os.close(write_end)
        fds = [read_end]
    elif what == "smaller than declared":
        fds = [sealed_memfd(4096)]
    elif what == "zero size":
        fds = [sealed_memfd(MiB)]
    if fds:
        socket.send_fds(raw.sock, [data], fds)
        for fd in fds:
            os.close(fd)
    else:
        await raw.send(data)
    assert expected in await raw.expect_error(grpc.StatusCode.INVALID_ARGUMENT)
    raw.close()
    await assert_unharmed(*seeded)


@pytest.mark.parametrize("admitted", [False, True], ids=["in-hello", "after-hello"])
async def test_descriptors_trickled_with_a_frame_are_refused_not_hoarded(
    shm_server: RunningServer, seeded: tuple[KVClient, torch.Tensor], admitted: bool
) -> None:
    # A frame sent a byte at a time, each byte carrying a descriptor: the daemon holds
    # at most the one a REGISTER would pass, then refuses the connection and closes
    # them all, so no client can fill its descriptor table.
    if admitted:
        raw = await (await RawShm.open(shm_server)).admitted(shm_server)
        header = frame(FrameKind.PUT_SHM, REGION.pack(1, 0, 64))
    else:  # before the daemon knows who this is
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        raw = RawShm(sock)
        await raw.loop.sock_connect(sock, shm_server.servicer.shm_path)
        header = frame(FrameKind.HELLO, HELLO_PAYLOAD)
    await raw.send(header[:5])
    flood = os.memfd_create("fd-flood", os.MFD_CLOEXEC)
    try:
        for byte in header[5:8]:
            socket.send_fds(raw.sock, [bytes([byte])], [flood, flood])
        assert "a connection passes one descriptor" in await raw.expect_error(
            grpc.StatusCode.INVALID_ARGUMENT
        )
    finally:
        os.close(flood)
        raw.close()
    assert open_memfds("fd-flood") == 0  # every one the daemon received is closed
    await assert_unharmed(*seeded)


async def test_the_daemon_maps_client_buffers_up_to_its_budget_and_releases_them(
    shm_server: RunningServer, seeded: tuple[KVClient, torch.Tensor]
) -> None:
    # Address space is finite: all clients' buffers together stay within a budget
    # (MAX_MAPPED_BYTES); past it a REGISTER is RESOURCE_EXHAUSTED, and a closed
    # connection gives its buffers back.
    budget = shm_server.data_plane.mapped_bytes
    budget.limit = budget.mapped + 3 * MiB
    first = await (await RawShm.open(shm_server)).admitted(shm_server)
    fd = sealed_memfd(2 * MiB)
    try:
        assert (await first.register(fd, 2 * MiB))[0] == FrameKind.REGISTERED
        second = await (await RawShm.open(shm_server)).admitted(shm_server)
        socket.send_fds(second.sock, [frame(FrameKind.REGISTER, BUFFER_SIZE.pack(2 * MiB))], [fd])
        assert "maps at most" in await second.expect_error(grpc.StatusCode.RESOURCE_EXHAUSTED)
        second.close()
        first.close()  # its 2 MiB are unmapped (off the loop) and counted back
        deadline = asyncio.get_running_loop().time() + 10
        while budget.mapped > budget.limit - 3 * MiB:
            assert asyncio.get_running_loop().time() < deadline, budget.mapped
            await asyncio.sleep(0.01)
        third = await (await RawShm.open(shm_server)).admitted(shm_server)
        assert (await third.register(fd, 2 * MiB))[0] == FrameKind.REGISTERED
        third.close()
    finally:
        os.close(fd)
    await assert_unharmed(*seeded)


async def test_put_shm_on_the_tcp_data_plane_is_refused(
    shm_server: RunningServer, seeded: tuple[KVClient, torch.Tensor]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", shm_server.servicer.data_plane_port)
    writer.write(frame(FrameKind.HELLO, HELLO_PAYLOAD))
    assert await reader.readexactly(5 + len(HELLO_PAYLOAD)) == frame(FrameKind.HELLO, HELLO_PAYLOAD)
    writer.write(frame(FrameKind.PUT_SHM, region(1, 0, 64)))
    kind, length = struct.unpack("<BI", await reader.readexactly(5))
    payload = await reader.readexactly(length)
    assert kind == FrameKind.ERROR
    assert b"same-host socket only" in payload
    writer.close()
    await assert_unharmed(*seeded)


async def test_a_raw_put_through_a_registered_buffer_commits(
    shm_server: RunningServer, seeded: tuple[KVClient, torch.Tensor], make_kv: MakeKV
) -> None:
    """The documented frames, by hand: REGISTER, PUT_SHM, SHM_DONE, PUT_END, PUT_DONE."""
    client, _ = seeded
    layout = LARGE
    kv = make_kv(layout, 1, form=KVForm.BLOCKS, seed=12)
    raw = await (await RawShm.open(shm_server)).admitted(shm_server)
    fd = sealed_memfd(4 * MiB)
    assert (await raw.register(fd, 4 * MiB))[0] == FrameKind.REGISTERED
    import mmap

    from kvstore.checksum import ChecksumKind
    from kvstore.client._send import put_messages
    from kvstore.codec import ByteMap

    mapped = mmap.mmap(fd, 4 * MiB)
    header = encode_put_header(
        namespace=namespace_to_wire(NS).SerializeToString(),
        checksum_kind=ChecksumKind.XXH3_64.value,
    )
    source = ByteMap(kv, layout, KVForm.BLOCKS)
    messages = list(
        put_messages(header, [b"raw-0"], 0, b"", source, layout, ChecksumKind.XXH3_64, MiB)
    )
    message = b"".join(b"".join(bytes(part) for part in parts) for parts in messages)
    mapped[: len(message)] = message
    await raw.send(frame(FrameKind.PUT_SHM, region(1, 0, len(message))))
    assert await raw.read_frame() == (FrameKind.SHM_DONE, b"")
    await raw.send(frame(FrameKind.PUT_END))
    kind, payload = await raw.read_frame()
    assert kind == FrameKind.PUT_DONE
    assert pb.PutBlocksResponse.FromString(payload).num_committed == 1
    raw.close()
    mapped.close()
    os.close(fd)
    dest = torch.zeros_like(kv)
    assert await client.get_into([b"raw-0"], dest, form=KVForm.BLOCKS) == 1
    assert torch.equal(dest.view(torch.uint8), kv.view(torch.uint8))


async def test_a_put_through_shared_memory_lets_the_loop_run_between_messages(
    shm_server: RunningServer, seeded: tuple[KVClient, torch.Tensor], make_kv: MakeKV
) -> None:
    """PUT_SHM frames the client sent back to back are read without a wait: the daemon
    still lets its loop run (lookups, other transfers) after applying each, not only
    once the whole put is in."""
    from kvstore.checksum import ChecksumKind
    from kvstore.client._send import put_messages
    from kvstore.codec import ByteMap

    client, _ = seeded
    kv = make_kv(LARGE, 8, form=KVForm.BLOCKS, seed=13)
    keys = [f"sliced-{index}".encode() for index in range(8)]
    header = encode_put_header(
        namespace=namespace_to_wire(NS).SerializeToString(),
        checksum_kind=ChecksumKind.XXH3_64.value,
    )
    source = ByteMap(kv, LARGE, KVForm.BLOCKS)
    messages = [
        b"".join(bytes(part) for part in parts)
        for parts in put_messages(header, keys, 0, b"", source, LARGE, ChecksumKind.XXH3_64, 1)
    ]
    raw = await (await RawShm.open(shm_server)).admitted(shm_server)
    fd = sealed_memfd(8 * MiB)
    assert (await raw.register(fd, 8 * MiB))[0] == FrameKind.REGISTERED
    mapped = mmap.mmap(fd, 8 * MiB)
    frames, offset = [], 0
    for message in messages:
        mapped[offset : offset + len(message)] = message
        frames.append(frame(FrameKind.PUT_SHM, region(1, offset, len(message))))
        offset += len(message)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    ticker = asyncio.create_task(tick())
    ticks_at_done = []
    try:
        await raw.send(b"".join(frames) + frame(FrameKind.PUT_END))
        while (kind := (await raw.read_frame())[0]) == FrameKind.SHM_DONE:
            ticks_at_done.append(ticks)
        assert kind == FrameKind.PUT_DONE
    finally:
        ticker.cancel()
        raw.close()
        mapped.close()
        os.close(fd)
    assert len(ticks_at_done) == len(messages) >= 8
    # Applied in one step of the daemon's task, every SHM_DONE would be read at one count.
    assert len(set(ticks_at_done)) >= len(ticks_at_done) // 4
    dest = torch.zeros_like(kv)
    assert await client.get_into(keys, dest, form=KVForm.BLOCKS) == 8
    assert torch.equal(dest.view(torch.uint8), kv.view(torch.uint8))


# -- a client that dies -------------------------------------------------------------------

_DYING_CLIENT = textwrap.dedent(
    """
    import asyncio, os, sys, torch
    from kvstore.client import ClientOptions, DType, KVClient, KVLayout, Namespace
    layout = KVLayout(num_layers=32, num_kv_heads=8, head_dim=64, dtype=DType.BFLOAT16,
                      block_tokens=8)
    ns = Namespace(tenant="tenant-a", model_fingerprint="shm", layout=layout)

    async def main():
        client = KVClient(sys.argv[1], ns, options=ClientOptions(shared_memory=True))
        keys = [f"dying-{i}".encode() for i in range(4)]
        kv = torch.ones((4, *layout.layer_shape), dtype=torch.bfloat16)
        async with client.layer_put(keys) as put:
            for layer in range(3):
                await put.send_layer(layer, kv)
            print("sent", flush=True)
            await asyncio.sleep(60)  # killed here, mid-put, buffer registered

    asyncio.run(main())
    """
)


async def test_a_client_killed_mid_put_frees_what_it_held(
    shm_server: RunningServer, seeded: tuple[KVClient, torch.Tensor], poll: Poll
) -> None:
    client, kv = seeded
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _DYING_CLIENT,
        f"127.0.0.1:{shm_server.port}",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(child.stdout.readline(), 60)
        assert line.strip() == b"sent"

        async def reserved() -> bool:
            return (await client.stats()).put_reserved_bytes > 0

        await poll(reserved)
        child.send_signal(signal.SIGKILL)
        await asyncio.wait_for(child.wait(), 10)

        async def freed() -> bool:
            return (await client.stats()).put_reserved_bytes == 0

        await poll(freed)
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    await assert_unharmed(client, kv)
    assert (await client.lookup_keys([b"dying-0"])).num_matched == 0


_DYING_READER = textwrap.dedent(
    """
    import asyncio, sys
    from kvstore.client import ClientOptions, DType, KVClient, KVLayout, Namespace
    layout = KVLayout(num_layers=32, num_kv_heads=8, head_dim=64, dtype=DType.BFLOAT16,
                      block_tokens=8)
    ns = Namespace(tenant="tenant-a", model_fingerprint="shm", layout=layout)

    async def main():
        client = KVClient(sys.argv[1], ns, options=ClientOptions(shared_memory=True))
        keys = [f"read-{i}".encode() for i in range(96)]
        async for arrival in client.iter_layers(keys):
            print("got", arrival.layer, arrival.num_blocks, flush=True)
            await asyncio.sleep(60)  # killed here, mid-get, replies in its buffer

    asyncio.run(main())
    """
)


async def test_a_client_killed_mid_get_releases_the_blocks(
    server_factory: ServerFactory,
    clients: Callable[..., KVClient],
    make_kv: MakeKV,
    poll: Poll,
    tmp_path: Path,
) -> None:
    shm_server = await server_factory(
        shm_socket=str(tmp_path / "kv.sock"), store__dram_bytes=96 * MiB
    )
    client = clients(shm_server)
    # 48 MiB: more than the client's 32 MiB buffer, so the daemon is still reading.
    keys = [f"read-{index}".encode() for index in range(96)]
    kv = make_kv(LARGE, len(keys), form=KVForm.BLOCKS, seed=21)
    assert (await client.put_blocks(keys, kv)).num_committed == len(keys)
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _DYING_READER,
        f"127.0.0.1:{shm_server.port}",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        line = await asyncio.wait_for(child.stdout.readline(), 60)
        assert line.split() == [b"got", b"0", b"96"]
        # Mid-get the daemon holds every block for the read.
        assert await client.delete(keys[:1]) == (0, len(keys))
        child.send_signal(signal.SIGKILL)
        await asyncio.wait_for(child.wait(), 10)
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()

    async def released() -> bool:
        return (await client.delete(keys[:1])) == (len(keys), 0)

    await poll(released)
    assert (await client.lookup_keys(keys)).num_matched == 0
    # The daemon serves on, through shared memory.
    dest = await put_and_get(client, kv[:2], "after")
    assert torch.equal(dest.view(torch.uint8), kv[:2].view(torch.uint8))


def mapped_memfds(name: str) -> int:
    """Mappings of memfds called `name` in this process (the daemon runs in it here)."""
    with open("/proc/self/maps") as maps:
        return sum(f"/memfd:{name} (deleted)" in line for line in maps)


async def test_the_daemon_unmaps_a_buffer_when_its_connection_ends(
    shm_server: RunningServer, poll: Poll
) -> None:
    raw = await (await RawShm.open(shm_server)).admitted(shm_server)
    fd = os.memfd_create("unmap-probe", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, MiB)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    assert (await raw.register(fd, MiB))[0] == FrameKind.REGISTERED
    os.close(fd)  # from here only the daemon's mapping keeps the buffer
    assert mapped_memfds("unmap-probe") == 1
    raw.close()

    async def unmapped() -> bool:
        return mapped_memfds("unmap-probe") == 0

    await poll(unmapped)


async def test_the_tenant_transfer_quota_counts_shared_memory_transfers(
    server_factory: ServerFactory,
    clients: Callable[..., KVClient],
    make_kv: MakeKV,
    tmp_path: Path,
) -> None:
    running = await server_factory(
        shm_socket=str(tmp_path / "kv.sock"), **{"quotas.tenant-a.max_transfers": 1}
    )
    client = clients(running, shared_memory=True)
    kv = make_kv(LARGE, 2, form=KVForm.BLOCKS, seed=31)
    async with client.layer_put([b"held-0", b"held-1"]) as put:
        await put.send_layer(0, kv[:, 0].contiguous())  # the put holds the one slot
        with pytest.raises(ResourceExhausted, match="max_transfers"):
            await client.put_blocks([b"second-0"], kv[:1])
        for layer in range(1, LARGE.num_layers):
            await put.send_layer(layer, kv[:, layer].contiguous())
    assert put.result is not None
    assert put.result.num_committed == 2
    assert running.data_plane is not None
    assert running.data_plane.shm_transfers >= 1


def test_workers_get_a_socket_each() -> None:
    def config(shm_socket: str) -> ServerConfig:
        return load_config(
            None,
            {
                "shm_socket": shm_socket,
                "workers": 3,
                "cluster.etcd": "etcd://127.0.0.1:2379/kv",
                "store.dram_bytes": 96 * MiB,
            },
        )

    set_path = worker_configs(config("/run/kv.sock"))
    assert [share.shm_socket for share in set_path] == [
        "/run/kv.sock.0",
        "/run/kv.sock.1",
        "/run/kv.sock.2",
    ]
    auto = worker_configs(config("auto"))
    assert {share.shm_socket for share in auto} == {"auto"}
    paths = {share.shm_socket_path() for share in auto}
    assert len(paths) == 3  # "auto" picks a fresh name each time


async def test_a_get_through_shared_memory_lets_the_loop_run_between_replies(
    shm_server: RunningServer, seeded: tuple[KVClient, torch.Tensor]
) -> None:
    """Replies the region has room for go out without waiting on the client, each a
    copy and a few-byte frame that never blocks: the daemon still lets its loop run
    (lookups, other transfers) between them, not only once the whole get is written."""
    _, kv = seeded
    keys = [f"seed-{index}".encode() for index in range(kv.shape[0])]
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    raw = await (await RawShm.open(shm_server)).admitted(shm_server)
    fd = sealed_memfd(8 * MiB)
    try:
        assert await raw.register(fd, 8 * MiB) == (FrameKind.REGISTERED, b"\x01\x00\x00\x00")
    finally:
        os.close(fd)
    request = pb.GetBlocksRequest(
        namespace=namespace_to_wire(NS), keys=keys, max_chunk_bytes=64 << 10
    )
    ticker = asyncio.create_task(tick())
    ticks_at_replies = []
    try:
        await raw.send(
            frame(FrameKind.GET_SHM, region(1, 0, 8 * MiB) + request.SerializeToString())
        )
        while (kind := (await raw.read_frame())[0]) == FrameKind.GET_DATA_SHM:
            ticks_at_replies.append(ticks)
            await raw.send(frame(FrameKind.SHM_DONE))
        assert kind == FrameKind.GET_END
    finally:
        ticker.cancel()
        raw.close()
    assert len(ticks_at_replies) >= 8  # 1.5 MiB in 64 KiB replies
    # All sent in one step of the daemon's task, every reply would be read at one count.
    assert len(set(ticks_at_replies)) >= len(ticks_at_replies) // 4
    await assert_unharmed(*seeded)


def open_memfds(name: str) -> int:
    """Descriptors of memfds called `name` open in this process (the daemon runs in it)."""
    count = 0
    for entry in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{entry}") == f"/memfd:{name} (deleted)"
    return count


async def test_lookups_on_the_socket_are_answered_and_descriptors_sent_with_them_closed(
    shm_server: RunningServer, clients: Callable[..., KVClient], make_kv: MakeKV
) -> None:
    """Lookups on the same-host socket take the peeked path, as on TCP: a descriptor a
    client attaches to a LOOKUP frame is closed at once, and a REGISTER's, which a peek
    at its header leaves queued, still arrives."""
    keys = [b"peeked-%d" % index for index in range(3)]
    client = clients(shm_server, NS, shared_memory=True)
    assert (await client.put_blocks(keys, make_kv(LARGE, 3, form=KVForm.BLOCKS))).num_committed == 3
    raw = await (await RawShm.open(shm_server)).admitted(shm_server)
    try:
        request = pb.LookupPrefixRequest(namespace=namespace_to_wire(NS), keys=keys)
        stray = os.memfd_create("lookup-stray", os.MFD_CLOEXEC)
        socket.send_fds(raw.sock, [frame(FrameKind.LOOKUP, request.SerializeToString())], [stray])
        os.close(stray)
        kind, payload = await raw.read_frame()
        assert kind == FrameKind.LOOKUP_RESULT
        assert pb.LookupPrefixResponse.FromString(payload).num_matched == 3
        assert open_memfds("lookup-stray") == 0
        fd = sealed_memfd(MiB)
        assert (await raw.register(fd, MiB))[0] == FrameKind.REGISTERED
        os.close(fd)
    finally:
        raw.close()
