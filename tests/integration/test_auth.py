"""Authentication and authorization (server/auth.py, server/credentials.py), on both
transports: a request's tenant comes from its credential, never from the request alone.

The tokens file lists SHA-256 digests; the tests write it themselves. Every refusal is
checked to harm nothing: the other tenant's blocks stay byte-identical and unpinned.
"""

from __future__ import annotations

import asyncio
import datetime
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from raw_data_plane import HELLO, Raw, frame  # tests/raw_data_plane.py

from kvstore.client import (
    ClientOptions,
    DType,
    KVClient,
    KVForm,
    KVLayout,
    Namespace,
    PermissionDenied,
    TierKind,
    Unauthenticated,
)
from kvstore.errors import InvalidRequest
from kvstore.server import RunningServer
from kvstore.server.app import build_server, check_exposure
from kvstore.server.auth import token_sha256
from kvstore.server.config import load_config
from kvstore.server.dataplane import _CUT_AFTER_S
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc
from kvstore.wire.frames import FrameKind
from kvstore.wire.namespace import namespace_to_wire

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype=DType.FLOAT16, block_tokens=16)
NS_A = Namespace(tenant="team-a", model_fingerprint="auth", layout=LAYOUT)
NS_B = Namespace(tenant="team-b", model_fingerprint="auth", layout=LAYOUT)
TOKEN_A, TOKEN_B, TOKEN_ADMIN = "tok-a-0123456789", "tok-b-0123456789", "tok-admin-012345"
TOKEN_EXPIRED, TOKEN_UNKNOWN = "tok-old-a-012345", "tok-never-issued"
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED.value[0]
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED.value[0]
TRANSPORTS = pytest.mark.parametrize("data_plane", [False, True], ids=["grpc", "data-plane"])
B_KEYS = [b"b-0", b"b-1", b"b-2"]

ServerFactory = Callable[..., Awaitable[RunningServer]]
MakeKV = Callable[..., torch.Tensor]
Poll = Callable[..., Awaitable[None]]


def tokens_toml(entries: list[tuple[str, str, str, str | None]]) -> str:
    """[[tokens]] tables for (token, tenant, role, expires or None)."""
    lines = []
    for token, tenant, role, expires in entries:
        lines += ["[[tokens]]", f'sha256 = "{token_sha256(token)}"']
        lines += [f'tenant = "{tenant}"', f'role = "{role}"']
        if expires is not None:
            lines.append(f"expires = {expires}")
    return "\n".join(lines) + "\n"


STANDARD_TOKENS = [
    (TOKEN_A, "team-a", "tenant", None),
    (TOKEN_B, "team-b", "tenant", None),
    (TOKEN_ADMIN, "ops", "admin", None),
    (TOKEN_EXPIRED, "team-a", "tenant", "2020-01-01T00:00:00Z"),
]


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens.toml"
    path.write_text(tokens_toml(STANDARD_TOKENS))
    return path


@pytest.fixture
async def secured(server_factory: ServerFactory, tokens_file: Path) -> RunningServer:
    return await server_factory(auth__tokens_file=str(tokens_file))


@pytest.fixture
async def open_client() -> AsyncIterator[Callable[..., KVClient]]:
    clients: list[KVClient] = []

    def make(
        running: RunningServer, namespace: Namespace, token: str | None, data_plane: bool = True
    ) -> KVClient:
        options = ClientOptions(data_plane=data_plane, token=token)
        client = KVClient(f"127.0.0.1:{running.port}", namespace, options=options)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


async def seed_b(client: KVClient, make_kv: MakeKV) -> torch.Tensor:
    kv = make_kv(LAYOUT, len(B_KEYS), form=KVForm.BLOCKS, seed=7)
    assert (await client.put_blocks(B_KEYS, kv)).num_committed == len(B_KEYS)
    return kv


async def assert_b_unharmed(client_b: KVClient, kv: torch.Tensor) -> None:
    """B's blocks are all there, byte-identical, and nobody pinned them."""
    assert (await client_b.lookup_keys(B_KEYS)).num_matched == len(B_KEYS)
    dest = torch.zeros_like(kv)
    assert await client_b.get_into(B_KEYS, dest, form=KVForm.BLOCKS) == len(B_KEYS)
    assert torch.equal(dest.view(torch.uint8), kv.view(torch.uint8))
    (own,) = (await client_b.stats()).tenants  # b's own view: its entry only
    assert own.tenant == "team-b"
    assert own.pinned_bytes == 0


# -- the tenant's own work ---------------------------------------------------------------


@TRANSPORTS
async def test_a_tenant_works_in_its_own_namespaces(
    secured: RunningServer, open_client: Callable[..., KVClient], make_kv: MakeKV, data_plane: bool
) -> None:
    client = open_client(secured, NS_B, TOKEN_B, data_plane)
    admin = open_client(secured, NS_A, TOKEN_ADMIN)
    before = (await admin.stats()).data_plane_transfers
    kv = await seed_b(client, make_kv)
    await assert_b_unharmed(client, kv)
    assert await client.pin(B_KEYS, 5.0) == len(B_KEYS)
    assert await client.unpin(B_KEYS) == len(B_KEYS)
    moved = (await admin.stats()).data_plane_transfers - before
    # The put and the get: over the data plane when asked, else over gRPC.
    assert moved == (2 if data_plane else 0)
    assert await client.delete(B_KEYS[:1]) == (len(B_KEYS), 0)


async def test_the_token_comes_from_kvstore_token_when_options_have_none(
    secured: RunningServer, make_kv: MakeKV, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVSTORE_TOKEN", TOKEN_B)
    async with KVClient(f"127.0.0.1:{secured.port}", NS_B) as client:
        await seed_b(client, make_kv)
    monkeypatch.setenv("KVSTORE_TOKEN", TOKEN_A)
    async with KVClient(f"127.0.0.1:{secured.port}", NS_B) as client:
        with pytest.raises(PermissionDenied):
            await client.lookup_keys(B_KEYS)


# -- no credential, or a bad one ------------------------------------------------------------


@TRANSPORTS
@pytest.mark.parametrize(
    ("token", "message"),
    [(None, "no credential"), (TOKEN_UNKNOWN, "not known"), (TOKEN_EXPIRED, "expired")],
    ids=["none", "unknown", "expired"],
)
async def test_without_a_good_token_every_call_is_unauthenticated(
    secured: RunningServer,
    open_client: Callable[..., KVClient],
    make_kv: MakeKV,
    data_plane: bool,
    token: str | None,
    message: str,
) -> None:
    owner = open_client(secured, NS_B, TOKEN_B)
    kv = await seed_b(owner, make_kv)
    client = open_client(secured, NS_B, token, data_plane)
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: client.lookup_keys(B_KEYS),
        lambda: client.get_into(B_KEYS, torch.zeros_like(kv), form=KVForm.BLOCKS),
        lambda: client.put_blocks([b"x-0"], kv[:1]),
        lambda: client.pin(B_KEYS, 60.0),
        lambda: client.unpin(B_KEYS),
        lambda: client.delete(B_KEYS),
        client.stats,
    ]
    for call in calls:
        with pytest.raises(Unauthenticated, match=message):
            await call()
    await assert_b_unharmed(owner, kv)


@pytest.mark.parametrize(
    ("credential", "message"),
    [
        (b"", "no credential"),
        (TOKEN_UNKNOWN.encode(), "not known"),
        (TOKEN_EXPIRED.encode(), "expired"),
        (b"\xff\xfe not utf-8", "not UTF-8"),
    ],
    ids=["none", "unknown", "expired", "not-utf8"],
)
async def test_a_data_plane_hello_without_a_good_token_gets_an_error_frame_and_closes(
    secured: RunningServer, credential: bytes, message: str
) -> None:
    raw = await Raw.connect(secured)
    try:
        await raw.send(frame(FrameKind.HELLO, HELLO + credential))
        code, text = await raw.read_error()
        assert code == UNAUTHENTICATED
        assert message in text
        with pytest.raises(ConnectionError):
            await raw.read_frame()  # then the server closed the connection
    finally:
        raw.close()
    admitted = await Raw.open(secured, TOKEN_A.encode())  # the server goes on serving
    admitted.close()


async def test_a_data_plane_token_is_never_echoed(secured: RunningServer) -> None:
    raw = await Raw.open(secured, TOKEN_A.encode())  # asserts the reply is the bare HELLO
    raw.close()


# -- another tenant's namespace ---------------------------------------------------------------


@TRANSPORTS
@pytest.mark.parametrize("token", [TOKEN_A, TOKEN_ADMIN], ids=["tenant", "admin"])
async def test_another_tenants_namespace_is_permission_denied_and_harmed_nowhere(
    secured: RunningServer,
    open_client: Callable[..., KVClient],
    make_kv: MakeKV,
    data_plane: bool,
    token: str,
) -> None:
    owner = open_client(secured, NS_B, TOKEN_B)
    kv = await seed_b(owner, make_kv)
    # Claims to be tenant b in the request; its credential says otherwise.
    intruder = open_client(secured, NS_B, token, data_plane)
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: intruder.lookup_keys(B_KEYS),
        lambda: intruder.get_into(B_KEYS, torch.zeros_like(kv), form=KVForm.BLOCKS),
        lambda: intruder.put_blocks([b"b-0"], kv[:1]),
        lambda: intruder.pin(B_KEYS, 3600.0),
        lambda: intruder.unpin(B_KEYS),
    ]
    if token == TOKEN_A:
        calls.append(lambda: intruder.delete(B_KEYS))
    for call in calls:
        with pytest.raises(PermissionDenied, match="team-b"):
            await call()
    await assert_b_unharmed(owner, kv)


async def test_an_admin_may_delete_any_tenants_blocks(
    secured: RunningServer, open_client: Callable[..., KVClient], make_kv: MakeKV
) -> None:
    owner = open_client(secured, NS_B, TOKEN_B)
    await seed_b(owner, make_kv)
    admin = open_client(secured, NS_B, TOKEN_ADMIN)
    assert await admin.delete(B_KEYS[:1]) == (len(B_KEYS), 0)
    assert (await owner.lookup_keys(B_KEYS)).num_matched == 0


async def test_a_tenant_sees_only_its_own_share_in_stats_and_an_admin_sees_all(
    secured: RunningServer, open_client: Callable[..., KVClient], make_kv: MakeKV
) -> None:
    owner = open_client(secured, NS_B, TOKEN_B)
    await seed_b(owner, make_kv)
    a_client = open_client(secured, NS_A, TOKEN_A)
    kv = make_kv(LAYOUT, 1, form=KVForm.BLOCKS, seed=8)
    assert (await a_client.put_blocks([b"a-0"], kv)).num_committed == 1
    assert await a_client.pin([b"a-0"], 60.0) == 1
    scoped = await a_client.stats()
    assert scoped.tenant_scope == "team-a"
    (own,) = scoped.tenants
    assert own.tenant == "team-a"
    assert own.pinned_bytes == LAYOUT.block_bytes
    dram = scoped.tier(TierKind.DRAM)
    assert dram.capacity_bytes > 0
    # Nothing store-wide: b's blocks, lookups and pins are not a's to count.
    assert (dram.used_bytes, dram.num_blocks, dram.hits) == (0, 0, 0)
    assert (scoped.num_pinned, scoped.blocks_put, scoped.num_namespaces) == (0, 0, 0)
    whole = await open_client(secured, NS_A, TOKEN_ADMIN).stats()
    assert whole.tenant_scope == ""
    assert {entry.tenant for entry in whole.tenants} == {"team-a", "team-b"}
    assert whole.tier(TierKind.DRAM).num_blocks == len(B_KEYS) + 1
    assert whole.num_pinned == 1


async def test_a_lookup_stream_refuses_another_tenant_per_request_and_goes_on(
    secured: RunningServer, open_client: Callable[..., KVClient], make_kv: MakeKV
) -> None:
    """The stream carries both tenants' requests from one caller: b's are refused in
    their results, a's are answered on the same stream."""
    owner = open_client(secured, NS_B, TOKEN_B)
    await seed_b(owner, make_kv)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{secured.port}") as channel:
        stream = pb_grpc.KVStoreStub(channel).LookupPrefixStream(
            metadata=(("authorization", f"Bearer {TOKEN_A}"),), timeout=10
        )
        for namespace in (NS_B, NS_A):
            wire = namespace_to_wire(namespace)
            await stream.write(pb.LookupPrefixRequest(namespace=wire, keys=B_KEYS))
        denied, answered = await stream.read(), await stream.read()
        await stream.done_writing()
        assert denied.code == PERMISSION_DENIED
        assert "team-b" in denied.message
        assert answered.code == 0
        assert answered.match.num_matched == 0


# -- what stays open, what does not -------------------------------------------------------


async def test_health_stays_open_and_reflection_is_off(secured: RunningServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{secured.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for _ in reflect.ServerReflectionInfo(iter([request]), timeout=5):
                pass
        assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_reflection_can_be_turned_back_on(
    server_factory: ServerFactory, tokens_file: Path
) -> None:
    running = await server_factory(auth__tokens_file=str(tokens_file), auth__reflection=True)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        replies = [r async for r in reflect.ServerReflectionInfo(iter([request]), timeout=5)]
        names = {s.name for s in replies[0].list_services_response.service}
        assert "kvstore.v1.KVStore" in names


# -- rotation -------------------------------------------------------------------------------


async def test_reloaded_tokens_take_effect_and_a_bad_file_keeps_the_old_ones(
    secured: RunningServer,
    open_client: Callable[..., KVClient],
    make_kv: MakeKV,
    tokens_file: Path,
) -> None:
    rotated = "tok-a-rotated-99"
    old = open_client(secured, NS_A, TOKEN_A)
    new = open_client(secured, NS_A, rotated)
    assert (await old.lookup_keys([b"k"])).num_matched == 0
    with pytest.raises(Unauthenticated):
        await new.lookup_keys([b"k"])
    # Rotate: the old token is withdrawn and a new one issued, in one rewrite.
    tokens_file.write_text(tokens_toml([(rotated, "team-a", "tenant", None)]))  # noqa: ASYNC240
    assert secured.auth is not None
    assert secured.auth.reload()
    assert (await new.lookup_keys([b"k"])).num_matched == 0
    with pytest.raises(Unauthenticated, match="not known"):
        await old.lookup_keys([b"k"])
    # A broken file is refused at reload, and the tokens in force stay.
    tokens_file.write_text("[[tokens]]\nsha256 = 'not hex'\n")  # noqa: ASYNC240
    assert not secured.auth.reload()
    assert (await new.lookup_keys([b"k"])).num_matched == 0


def expires_in(seconds: float) -> str:
    moment = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def test_a_token_stops_working_when_it_expires(
    server_factory: ServerFactory,
    tmp_path: Path,
    open_client: Callable[..., KVClient],
    poll: Poll,
) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(tokens_toml([(TOKEN_A, "team-a", "tenant", expires_in(1.0))]))
    running = await server_factory(auth__tokens_file=str(path))
    client = open_client(running, NS_A, TOKEN_A)
    assert (await client.lookup_keys([b"k"])).num_matched == 0

    async def refused() -> bool:
        try:
            await client.lookup_keys([b"k"])
        except Unauthenticated as error:
            return "expired" in str(error)
        return False

    await poll(refused, timeout_s=10.0)


# -- malformed credentials (a seeded fuzz) ----------------------------------------------


def hostile_authorization_values(seed: int) -> list[str]:
    rng = random.Random(seed)
    fixed = [
        "",
        "Bearer",
        "Bearer ",
        "bearer",
        "Basic dXNlcjpwYXNz",
        f"Token {TOKEN_A}",
        f"Bearer {TOKEN_A}x",
        f"Bearer {TOKEN_A[:-1]}",
        f"Bearer {TOKEN_EXPIRED}",
        "Bearer " + "A" * 5000,
        "Bearer " + "x" * 4097,
    ]
    alphabet = "".join(chr(c) for c in range(0x20, 0x7F))
    randomized = [
        rng.choice(["Bearer ", "bearer ", "", "Bearer  "])
        + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        for _ in range(150)
    ]
    return fixed + randomized


async def test_hostile_authorization_metadata_is_unauthenticated_and_serving_goes_on(
    secured: RunningServer, open_client: Callable[..., KVClient], make_kv: MakeKV
) -> None:
    owner = open_client(secured, NS_B, TOKEN_B)
    kv = await seed_b(owner, make_kv)
    request = pb.StatsRequest()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{secured.port}") as channel:
        stub = pb_grpc.KVStoreStub(channel)
        for value in hostile_authorization_values(seed=15):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.Stats(request, metadata=(("authorization", value),), timeout=5)
            assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED, (value[:40], raised)
        twice = (("authorization", f"Bearer {TOKEN_B}"), ("authorization", f"Bearer {TOKEN_B}"))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Stats(request, metadata=twice, timeout=5)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    await assert_b_unharmed(owner, kv)


async def test_hostile_hello_credentials_are_refused_and_serving_goes_on(
    secured: RunningServer, open_client: Callable[..., KVClient], make_kv: MakeKV
) -> None:
    owner = open_client(secured, NS_B, TOKEN_B)
    kv = await seed_b(owner, make_kv)
    rng = random.Random(16)
    credentials = [rng.randbytes(rng.randint(1, 300)) for _ in range(60)]
    credentials += [TOKEN_A.encode() + b"\x00", b" " + TOKEN_A.encode(), b"x" * 4096]
    for credential in credentials:
        raw = await Raw.connect(secured)
        try:
            await raw.send(frame(FrameKind.HELLO, HELLO + credential))
            code, _ = await raw.read_error()
            assert code == UNAUTHENTICATED, credential[:40]
        finally:
            raw.close()
    # Past the 4 KiB a token may have: not read at all, and not a kvstore HELLO.
    raw = await Raw.connect(secured)
    try:
        await raw.send(frame(FrameKind.HELLO, HELLO + b"x" * 4097))
        code, text = await raw.read_error()
        assert code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "HELLO" in text
    finally:
        raw.close()
    await assert_b_unharmed(owner, kv)


# -- secure by default ----------------------------------------------------------------------


async def test_a_daemon_refuses_to_listen_beyond_loopback_unprotected() -> None:
    config = load_config(None, {"listen": "0.0.0.0:0", "log_level": "warning"})
    with pytest.raises(InvalidRequest, match="--insecure"):
        await build_server(config)  # refused before anything binds
    check_exposure(load_config(None, {"listen": "0.0.0.0:0", "insecure": True}))
    check_exposure(load_config(None, {"listen": "[::]:0", "auth.tokens_file": "t.toml"}))
    for loopback in ("127.0.0.1:0", "[::1]:0", "localhost:0", "127.0.0.2:0"):
        check_exposure(load_config(None, {"listen": loopback}))
    with pytest.raises(InvalidRequest):
        check_exposure(load_config(None, {"listen": "my-host.example:0"}))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[tokens]]\nsha256 = "abc"\ntenant = "a"\n', "64 hex digits"),
        (f'[[tokens]]\nsha256 = "{"0" * 64}"\n', "tenant must be"),
        (f'[[tokens]]\nsha256 = "{"0" * 64}"\ntenant = "a"\nrole = "root"\n', "role must be"),
        (f'[[tokens]]\nsha256 = "{"0" * 64}"\ntenant = "a"\ntoken = "x"\n', "unknown key"),
        (f'[[tokens]]\nsha256 = "{"0" * 64}"\ntenant = "a"\nexpires = 5\n', "date-time"),
        ("[[tokens]]\nsha256 = \n", "cannot read"),
        ('secret = "x"\n', "unknown key"),
        (
            f'[[tokens]]\nsha256 = "{"0" * 64}"\ntenant = "a"\n'
            f'[[tokens]]\nsha256 = "{"0" * 64}"\ntenant = "b"\n',
            "listed twice",
        ),
    ],
)
async def test_a_bad_tokens_file_stops_the_daemon_with_a_clear_message(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(text)
    with pytest.raises(InvalidRequest, match=message):
        await build_server(
            load_config(None, {"listen": "127.0.0.1:0", "auth.tokens_file": str(path)})
        )


async def test_a_missing_tokens_file_stops_the_daemon(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    config = load_config(None, {"listen": "127.0.0.1:0", "auth.tokens_file": str(missing)})
    with pytest.raises(InvalidRequest, match=r"absent\.toml"):
        await build_server(config)


def test_client_options_refuse_a_token_no_header_can_carry() -> None:
    for bad in ("has space", "line\nbreak", "x" * 4097, "tab\t"):
        with pytest.raises(ValueError, match=r"ClientOptions\.token"):
            ClientOptions(token=bad)
    assert "secret" not in repr(ClientOptions(token="secret"))


async def test_a_data_plane_admits_an_anonymous_hello_where_auth_is_off(
    server: RunningServer,
) -> None:
    raw = await Raw.open(server)
    raw.close()
    with_token = await Raw.open(server, b"ignored-token")  # no authentication: ignored
    with_token.close()


async def test_a_tenants_data_plane_connections_are_capped_by_its_quota(
    server_factory: ServerFactory,
    tokens_file: Path,
    open_client: Callable[..., KVClient],
    make_kv: MakeKV,
    poll: Poll,
) -> None:
    running = await server_factory(
        auth__tokens_file=str(tokens_file), quotas={"team-a": {"max_data_connections": 1}}
    )
    held = await Raw.open(running, TOKEN_A.encode())
    refused = await Raw.connect(running)
    try:
        await refused.send(frame(FrameKind.HELLO, HELLO + TOKEN_A.encode()))
        code, text = await refused.read_error()
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert "max_data_connections quota (1 open)" in text
    finally:
        refused.close()
    # Another tenant is not counted against team-a's quota.
    other = await Raw.open(running, TOKEN_B.encode())
    other.close()
    # team-a's client still works: its transfers fall back to gRPC.
    client = open_client(running, NS_A, TOKEN_A)
    kv = make_kv(LAYOUT, 1, form=KVForm.BLOCKS, seed=9)
    assert (await client.put_blocks([b"a-0"], kv)).num_committed == 1
    held.close()

    async def admitted_again() -> bool:
        raw = await Raw.connect(running)
        try:
            await raw.send(frame(FrameKind.HELLO, HELLO + TOKEN_A.encode()))
            return (await raw.read_frame())[0] == FrameKind.HELLO
        finally:
            raw.close()

    await poll(admitted_again, timeout_s=10.0)


async def test_silent_connections_cannot_keep_the_data_plane_from_a_tenant(
    server_factory: ServerFactory,
    tokens_file: Path,
    open_client: Callable[..., KVClient],
    make_kv: MakeKV,
) -> None:
    """Connections that never say HELLO hold every slot: a tenant's client still gets the
    data plane, by closing the oldest of them once it has waited past the round trips a
    HELLO needs, and once all slots are proven a new connection is turned away rather
    than cutting a proven one."""
    running = await server_factory(
        auth__tokens_file=str(tokens_file), limits__max_data_connections=3
    )
    assert running.data_plane is not None
    silent = [await Raw.connect(running) for _ in range(3)]
    try:
        # A flood of new connections cuts no handshake younger than _CUT_AFTER_S: the
        # newcomer is refused instead.
        flood = await Raw.connect(running)
        try:
            code, _ = await flood.read_error()
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        finally:
            flood.close()
        assert running.data_plane.handshakes_cut == 0
        await asyncio.sleep(_CUT_AFTER_S + 0.1)
        client = open_client(running, NS_A, TOKEN_A)
        kv = make_kv(LAYOUT, 1, form=KVForm.BLOCKS, seed=11)
        assert (await client.put_blocks([b"a-0"], kv)).num_committed == 1
        assert running.data_plane.transfers == 1  # not sent to gRPC
        assert running.data_plane.handshakes_cut == 1
        async with asyncio.timeout(10):
            assert await silent[0].loop.sock_recv(silent[0].sock, 1) == b""  # the oldest
        # The other two are now proven (HELLO said) and the client's own is pooled: a
        # fourth connection finds no handshake to cut, and is refused.
        for raw in silent[1:]:
            await raw.send(frame(FrameKind.HELLO, HELLO + TOKEN_B.encode()))
            assert await raw.read_frame() == (FrameKind.HELLO, HELLO)
        late = await Raw.connect(running)
        try:
            code, text = await late.read_error()
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            assert "limits.max_data_connections" in text
        finally:
            late.close()
        assert running.data_plane.handshakes_cut == 1
        for raw in silent[1:]:  # the proven ones are still served
            request = pb.GetBlocksRequest(namespace=namespace_to_wire(NS_B), keys=[b"none"])
            await raw.send(frame(FrameKind.GET, request.SerializeToString()))
            kinds = [(await raw.read_frame())[0]]
            while kinds[-1] == FrameKind.GET_DATA:
                kinds.append((await raw.read_frame())[0])
            assert kinds[-1] == FrameKind.GET_END, kinds
    finally:
        for raw in silent:
            raw.close()


def test_certificate_tenants_without_mutual_tls_is_a_config_error() -> None:
    with pytest.raises(InvalidRequest, match="needs mutual TLS"):
        load_config(None, {"auth.certificate_tenants": True})


async def test_an_admitted_data_plane_connection_loses_a_revoked_token_at_its_next_transfer(
    secured: RunningServer, tokens_file: Path
) -> None:
    """HELLO admitted the token; the file then drops it (SIGHUP's reload): the next
    transfer on the same connection is UNAUTHENTICATED, not served."""
    raw = await Raw.open(secured, TOKEN_A.encode())
    try:
        tokens_file.write_text(tokens_toml([(TOKEN_B, "team-b", "tenant", None)]))  # noqa: ASYNC240
        assert secured.auth is not None
        assert secured.auth.reload()
        request = pb.GetBlocksRequest(namespace=namespace_to_wire(NS_A), keys=[b"a-0"])
        await raw.send(frame(FrameKind.GET, request.SerializeToString()))
        code, text = await raw.read_error()
        assert code == UNAUTHENTICATED
        assert "not known" in text
    finally:
        raw.close()


async def test_a_reload_closes_the_idle_connections_of_revoked_tokens(
    secured: RunningServer, tokens_file: Path
) -> None:
    """An idle connection of a revoked token must not hold its slot (and its tenant's
    max_data_connections share) until it next asks for something."""
    revoked = await Raw.open(secured, TOKEN_A.encode())
    kept = await Raw.open(secured, TOKEN_B.encode())
    try:
        tokens_file.write_text(tokens_toml([(TOKEN_B, "team-b", "tenant", None)]))  # noqa: ASYNC240
        assert secured.reload_tokens()  # what SIGHUP does
        async with asyncio.timeout(5):
            assert await asyncio.get_running_loop().sock_recv(revoked.sock, 1) == b""
        # The other tenant's connection stays open and serves.
        request = pb.GetBlocksRequest(namespace=namespace_to_wire(NS_B), keys=[b"b-none"])
        await kept.send(frame(FrameKind.GET, request.SerializeToString()))
        kind, _ = await kept.read_frame()
        assert kind != FrameKind.ERROR
    finally:
        revoked.close()
        kept.close()


async def test_data_plane_lookups_take_the_tenant_from_hello_not_the_request(
    secured: RunningServer, open_client: Callable[..., KVClient], make_kv: MakeKV
) -> None:
    """LOOKUP frames: a's own namespace is answered, b's is PERMISSION_DENIED, and the
    lookups are counted for the tenant the token names."""
    assert secured.data_plane is not None
    owner = open_client(secured, NS_B, TOKEN_B)
    await seed_b(owner, make_kv)
    before = secured.data_plane.lookups
    assert (await owner.lookup_keys(B_KEYS)).num_matched == len(B_KEYS)
    intruder = open_client(secured, NS_B, TOKEN_A)
    with pytest.raises(PermissionDenied, match="team-b"):
        await intruder.lookup_keys(B_KEYS)
    a_client = open_client(secured, NS_A, TOKEN_A)
    assert (await a_client.lookup_keys(B_KEYS)).num_matched == 0
    assert secured.data_plane.lookups == before + 2  # the refused one is no answer
    (counted_b,) = [t for t in secured.store.report().tenants if t.tenant == "team-b"]
    assert (counted_b.lookup_keys, counted_b.lookup_hits) == (3, 3)
