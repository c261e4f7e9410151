"""TLS on gRPC and on the data plane (kvstore.server.tls, kvstore.wire.tls) against the real
server on 127.0.0.1, with certificates that trustme makes for each test module: transfers
byte-identical over both transports, with and without mutual TLS; clients that do not trust
the server, name the wrong server, or bring no (or a foreign) certificate are refused on
both, and the server keeps serving; the configuration's errors; the client certificate's
name reaching the server on both transports.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from certificates import Pki, issue_client_cert, make_pki  # tests/certificates.py
from daemons import daemon_launcher  # tests/daemons.py

from kvstore.client import (
    ClientOptions,
    DType,
    KVClient,
    KVForm,
    KVLayout,
    Namespace,
    PermissionDenied,
    TLSOptions,
    Unauthenticated,
    Unavailable,
)
from kvstore.client._dataplane import DataPlanePool, DataPlaneUnreachable
from kvstore.put import PutSession
from kvstore.server import RunningServer
from kvstore.server.app import protections_line
from kvstore.server.auth import token_sha256
from kvstore.server.main import main as server_main
from kvstore.wire.frames import HELLO_PAYLOAD, FrameKind, frame_header
from kvstore.wire.tls import client_context

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, dtype=DType.BFLOAT16, block_tokens=16)
WIDE = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, dtype=DType.BFLOAT16, block_tokens=64)
# The client certificate's common name: with certificate_tenants, its tenant.
CLIENT_NAME = "tenant-tls"
NS = Namespace(tenant=CLIENT_NAME, model_fingerprint="tls", layout=LAYOUT)
SERVER_ALT_NAME = "kvstore.internal"  # in the server certificate beside 127.0.0.1

ServerFactory = Callable[..., Awaitable[RunningServer]]
MakeKV = Callable[..., torch.Tensor]
SameBytes = Callable[[torch.Tensor, torch.Tensor], bool]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(
        tmp_path_factory.mktemp("pki"), client_name=CLIENT_NAME, server_alt_name=SERVER_ALT_NAME
    )


def tls_settings(pki: Pki, *, mutual: bool) -> dict[str, Any]:
    settings = {"tls.cert_file": pki.server_cert, "tls.key_file": pki.server_key}
    if mutual:
        settings["tls.client_ca_file"] = pki.ca
    return settings


def client_tls(pki: Pki, **overrides: Any) -> TLSOptions:
    fields: dict[str, Any] = {
        "ca_file": pki.ca,
        "cert_file": pki.client_cert,
        "key_file": pki.client_key,
    }
    fields.update(overrides)
    return TLSOptions(**fields)


def make_client(running: RunningServer, *, data_plane: bool, **options: Any) -> KVClient:
    return KVClient(
        f"127.0.0.1:{running.port}",
        NS,
        options=ClientOptions(data_plane=data_plane, **options),
    )


async def round_trip(client: KVClient, make_kv: MakeKV, same_bytes: SameBytes, seed: int) -> None:
    """Put, look up and get back blocks (a multi-megabyte get too), byte for byte."""
    tokens = [seed * 1000 + i for i in range(3 * LAYOUT.block_tokens)]
    kv = make_kv(LAYOUT, 3, seed=seed)
    assert (await client.put(tokens, kv)).num_committed == 3
    match = await client.lookup(tokens)
    assert match.num_matched == 3
    dest = torch.zeros_like(kv)
    assert await client.get_into(match, dest) == 3
    assert same_bytes(dest, kv)
    # Frames far larger than a TLS record and than the socket buffers.
    keys = [b"big-%d-%d" % (seed, i) for i in range(40)]
    blocks = make_kv(LAYOUT, len(keys), form=KVForm.BLOCKS, seed=seed + 1)
    assert (await client.put_blocks(keys, blocks)).num_committed == len(keys)
    got = torch.zeros_like(blocks)
    assert await client.get_into(keys, got, form=KVForm.BLOCKS) == len(keys)
    assert same_bytes(got, blocks)


@pytest.mark.parametrize("mutual", [False, True], ids=["server-tls", "mutual-tls"])
@pytest.mark.parametrize("data_plane", [True, False], ids=["data-plane", "grpc"])
async def test_transfers_are_byte_identical_over_tls(
    pki: Pki,
    server_factory: ServerFactory,
    make_kv: MakeKV,
    same_bytes: SameBytes,
    mutual: bool,
    data_plane: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    landed: list[int] = []  # runs the daemon received in place (PUT_TAIL), by blocks
    land_run = PutSession.land_run

    def counted(session: PutSession, *args: Any) -> None:
        landed.append(args[1])
        land_run(session, *args)

    monkeypatch.setattr(PutSession, "land_run", counted)
    # 64 KiB pages: a 32 KiB layer lands in one (the tests' 4 KiB pages would split it).
    running = await server_factory(
        **tls_settings(pki, mutual=mutual), **{"store.page_bytes": 65536}
    )
    tls = client_tls(pki) if mutual else TLSOptions(ca_file=pki.ca)
    async with make_client(running, data_plane=data_plane, tls=tls) as client:
        before = (await client.stats()).data_plane_transfers
        await round_trip(client, make_kv, same_bytes, seed=1)
        after = (await client.stats()).data_plane_transfers
        if data_plane:
            assert client.data_plane == f"127.0.0.1:{running.servicer.data_plane_port}"
            assert after == before + 4  # two puts and two gets, all on the TLS data plane
        else:
            assert after == before
    # Layers of 32 KiB (the smallest the client sends as PUT_TAIL): read from the TLS
    # stream straight into their pages; gRPC carries no PUT_TAIL.
    wide = Namespace(tenant=CLIENT_NAME, model_fingerprint="tls-wide", layout=WIDE)
    blocks = make_kv(WIDE, 3, form=KVForm.BLOCKS, seed=3)
    async with KVClient(
        f"127.0.0.1:{running.port}",
        wide,
        options=ClientOptions(data_plane=data_plane, tls=tls, shared_memory=False),
    ) as client:
        assert (await client.put_blocks([b"w0", b"w1", b"w2"], blocks)).num_committed == 3
        got = torch.zeros_like(blocks)
        assert await client.get_into([b"w0", b"w1", b"w2"], got, form=KVForm.BLOCKS) == 3
    assert same_bytes(got, blocks)
    assert sum(landed) == (3 * WIDE.num_layers if data_plane else 0)


@pytest.mark.parametrize("data_plane", [True, False], ids=["data-plane", "grpc"])
async def test_a_client_that_does_not_trust_the_server_is_unavailable(
    pki: Pki, server_factory: ServerFactory, make_kv: MakeKV, data_plane: bool
) -> None:
    running = await server_factory(**tls_settings(pki, mutual=False))
    untrusting = TLSOptions(ca_file=pki.other_ca)
    async with make_client(running, data_plane=data_plane, tls=untrusting) as client:
        with pytest.raises(Unavailable, match=r"(?i)certificate|handshake|ssl"):
            await client.put(list(range(LAYOUT.block_tokens)), make_kv(LAYOUT, 1))
    await _serves_a_good_client(pki, running, make_kv)


async def _pool_handshake(running: RunningServer, context: Any, server_name: str | None) -> None:
    """Connect and say HELLO on the data plane alone, with `context`."""
    pool = DataPlanePool(
        "127.0.0.1",
        running.servicer.data_plane_port,
        1 << 20,
        tls_context=context,
        server_name=server_name,
    )
    now = asyncio.get_running_loop().time()
    connection = await pool.acquire(now + 5, now + 5)
    connection.close()


async def test_the_data_plane_refuses_a_client_that_does_not_trust_it(
    pki: Pki, server_factory: ServerFactory, make_kv: MakeKV
) -> None:
    running = await server_factory(**tls_settings(pki, mutual=False))
    with pytest.raises(DataPlaneUnreachable, match="CERTIFICATE_VERIFY_FAILED"):
        await _pool_handshake(running, client_context(pki.other_ca, None, None), None)
    await _pool_handshake(running, client_context(pki.ca, None, None), None)  # trusted: fine
    await _serves_a_good_client(pki, running, make_kv)


@pytest.mark.parametrize("data_plane", [True, False], ids=["data-plane", "grpc"])
async def test_server_name_is_checked_and_may_be_overridden(
    pki: Pki,
    server_factory: ServerFactory,
    make_kv: MakeKV,
    same_bytes: SameBytes,
    data_plane: bool,
) -> None:
    running = await server_factory(**tls_settings(pki, mutual=False))
    wrong = TLSOptions(ca_file=pki.ca, server_name="elsewhere.example")
    async with make_client(running, data_plane=data_plane, tls=wrong) as client:
        with pytest.raises(Unavailable):
            await client.put(list(range(LAYOUT.block_tokens)), make_kv(LAYOUT, 1))
    renamed = TLSOptions(ca_file=pki.ca, server_name=SERVER_ALT_NAME)
    async with make_client(running, data_plane=data_plane, tls=renamed) as client:
        await round_trip(client, make_kv, same_bytes, seed=7)
        assert (client.data_plane is not None) == data_plane


async def test_the_data_plane_checks_the_server_name(
    pki: Pki, server_factory: ServerFactory
) -> None:
    running = await server_factory(**tls_settings(pki, mutual=False))
    context = client_context(pki.ca, None, None)
    with pytest.raises(DataPlaneUnreachable, match=r"(?i)hostname|match"):
        await _pool_handshake(running, context, "elsewhere.example")
    await _pool_handshake(running, context, SERVER_ALT_NAME)


@pytest.mark.parametrize("who", ["no-certificate", "foreign-certificate"])
async def test_mutual_tls_refuses_a_client_without_a_good_certificate(
    pki: Pki, server_factory: ServerFactory, make_kv: MakeKV, who: str
) -> None:
    running = await server_factory(**tls_settings(pki, mutual=True))
    if who == "no-certificate":
        tls = TLSOptions(ca_file=pki.ca)
        context = client_context(pki.ca, None, None)
    else:
        tls = TLSOptions(ca_file=pki.ca, cert_file=pki.foreign_cert, key_file=pki.foreign_key)
        context = client_context(pki.ca, pki.foreign_cert, pki.foreign_key)
    # gRPC: the whole client (its data plane is found over gRPC, which fails first).
    async with make_client(running, data_plane=False, tls=tls) as client:
        with pytest.raises(Unavailable):
            await client.put(list(range(LAYOUT.block_tokens)), make_kv(LAYOUT, 1))
    # The data plane on its own: the handshake, or the HELLO after it, fails.
    with pytest.raises(DataPlaneUnreachable):
        await _pool_handshake(running, context, None)
    await _serves_a_good_client(pki, running, make_kv)


@pytest.mark.parametrize("data_plane", [True, False], ids=["data-plane", "grpc"])
async def test_a_plaintext_client_against_a_tls_server_is_unavailable(
    pki: Pki, server_factory: ServerFactory, make_kv: MakeKV, data_plane: bool
) -> None:
    running = await server_factory(**tls_settings(pki, mutual=False))
    async with make_client(running, data_plane=data_plane) as client:
        with pytest.raises(Unavailable):
            await client.put(list(range(LAYOUT.block_tokens)), make_kv(LAYOUT, 1))
    await _serves_a_good_client(pki, running, make_kv)


async def test_a_plaintext_connection_to_the_tls_data_plane_is_closed(
    pki: Pki, server_factory: ServerFactory, make_kv: MakeKV
) -> None:
    running = await server_factory(**tls_settings(pki, mutual=False))
    loop = asyncio.get_running_loop()
    # A good client with a connection open throughout: the plaintext one must not harm it.
    async with make_client(running, data_plane=True, tls=TLSOptions(ca_file=pki.ca)) as good:
        await good.put(list(range(LAYOUT.block_tokens)), make_kv(LAYOUT, 1, seed=3))
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, ("127.0.0.1", running.servicer.data_plane_port))
            hello = frame_header(FrameKind.HELLO, len(HELLO_PAYLOAD)) + HELLO_PAYLOAD
            await loop.sock_sendall(sock, hello)
            received = b""
            async with asyncio.timeout(10):
                while chunk := await loop.sock_recv(sock, 4096):
                    received += chunk
        finally:
            sock.close()
        # At most a TLS alert, never a frame: a HELLO reply would start with kind 1.
        assert not received.startswith(frame_header(FrameKind.HELLO, len(HELLO_PAYLOAD)))
        before = (await good.stats()).data_plane_transfers
        await good.put(list(range(100, 100 + LAYOUT.block_tokens)), make_kv(LAYOUT, 1, seed=4))
        assert (await good.stats()).data_plane_transfers == before + 1


@pytest.mark.parametrize("data_plane", [True, False], ids=["data-plane", "grpc"])
async def test_the_client_certificate_names_the_tenant_on_both_transports(
    pki: Pki, server_factory: ServerFactory, make_kv: MakeKV, data_plane: bool
) -> None:
    running = await server_factory(
        **tls_settings(pki, mutual=True), **{"auth.certificate_tenants": True}
    )
    async with make_client(running, data_plane=data_plane, tls=client_tls(pki)) as client:
        # A tenant's Stats do not count the store's transfers; the server does.
        assert running.data_plane is not None
        before = running.data_plane.transfers
        # Its own tenant (the certificate's common name): allowed.
        assert (await client.put(list(range(16)), make_kv(LAYOUT, 1))).num_committed == 1
        assert running.data_plane.transfers == before + int(data_plane)
        assert (await client.stats()).tenant_scope == CLIENT_NAME
    other = Namespace(tenant="someone-else", model_fingerprint="tls", layout=LAYOUT)
    async with KVClient(
        f"127.0.0.1:{running.port}",
        other,
        options=ClientOptions(data_plane=data_plane, tls=client_tls(pki)),
    ) as client:
        with pytest.raises(PermissionDenied, match=CLIENT_NAME):
            await client.put(list(range(16)), make_kv(LAYOUT, 1))


@pytest.mark.parametrize("data_plane", [True, False], ids=["data-plane", "grpc"])
async def test_a_common_name_with_a_nul_byte_names_no_tenant(
    pki: Pki,
    server_factory: ServerFactory,
    make_kv: MakeKV,
    tmp_path: Path,
    data_plane: bool,
) -> None:
    """gRPC's own x509_common_name ends at a NUL: "tenant-tls\\0.other" must not pass
    for tenant-tls on either transport (a CA that checks only a suffix signs it)."""
    cert_file, key_file = issue_client_cert(pki, tmp_path, f"{CLIENT_NAME}\x00.other.example")
    running = await server_factory(
        **tls_settings(pki, mutual=True), **{"auth.certificate_tenants": True}
    )
    async with make_client(running, data_plane=True, tls=client_tls(pki)) as owner:
        assert (await owner.put(list(range(16)), make_kv(LAYOUT, 1))).num_committed == 1
    tls = client_tls(pki, cert_file=cert_file, key_file=key_file)
    async with make_client(running, data_plane=data_plane, tls=tls) as intruder:
        with pytest.raises(Unauthenticated, match="control characters"):
            await intruder.lookup(list(range(16)))
        with pytest.raises(Unauthenticated, match="control characters"):
            await intruder.delete([b"any"])


async def test_the_data_plane_link_carries_the_certificate_name(
    pki: Pki, server_factory: ServerFactory, make_kv: MakeKV, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kvstore.server.dataplane as dataplane

    names: list[str | None] = []
    secure = dataplane._secure

    async def recording(link: Any, tls: Any) -> None:
        await secure(link, tls)
        names.append(link.peer_common_name)

    monkeypatch.setattr(dataplane, "_secure", recording)
    running = await server_factory(**tls_settings(pki, mutual=True))
    async with make_client(running, data_plane=True, tls=client_tls(pki)) as client:
        await client.put(list(range(16)), make_kv(LAYOUT, 1))
    assert names == [CLIENT_NAME]
    names.clear()
    running = await server_factory(**tls_settings(pki, mutual=False))
    async with make_client(running, data_plane=True, tls=TLSOptions(ca_file=pki.ca)) as client:
        await client.put(list(range(16)), make_kv(LAYOUT, 1))
    assert names == [None]  # no client certificate asked for, none named


async def _serves_a_good_client(pki: Pki, running: RunningServer, make_kv: MakeKV) -> None:
    """The server still serves a client that does everything right, on the data plane."""
    tls = client_tls(pki) if running.config.tls and running.config.tls.mutual else None
    options = tls or TLSOptions(ca_file=pki.ca)
    async with make_client(running, data_plane=True, tls=options) as client:
        before = (await client.stats()).data_plane_transfers
        tokens = list(range(500, 500 + LAYOUT.block_tokens))
        assert (await client.put(tokens, make_kv(LAYOUT, 1, seed=9))).num_committed == 1
        assert (await client.stats()).data_plane_transfers == before + 1


# -- configuration -------------------------------------------------------------------------


def test_protections_line_says_whether_tls_is_on(pki: Pki) -> None:
    from kvstore.server import load_config

    base = {"listen": "127.0.0.1:0"}
    assert "TLS off" in protections_line(load_config(None, base), None)
    plain = load_config(None, {**base, **tls_settings(pki, mutual=False)})
    assert "; TLS on;" in protections_line(plain, None)
    mutual = load_config(None, {**base, **tls_settings(pki, mutual=True)})
    assert "TLS on (mutual)" in protections_line(mutual, None)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--tls-cert", "{server_cert}"], "key_file"),
        (["--tls-key", "{server_key}"], "cert_file"),
    ],
)
def test_a_certificate_without_its_key_is_refused_by_the_cli(
    pki: Pki, capsys: pytest.CaptureFixture[str], flags: list[str], expected: str
) -> None:
    argv = ["--listen", "127.0.0.1:0", *(flag.format(**vars(pki)) for flag in flags)]
    with pytest.raises(SystemExit) as exit_info:
        server_main(argv)
    assert exit_info.value.code == 2
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize("which", ["cert", "key", "client-ca"])
@pytest.mark.parametrize("fault", ["missing", "not-pem"])
def test_an_unreadable_or_bad_tls_file_is_named_at_start_up(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture, which: str, fault: str
) -> None:
    bad = tmp_path / f"bad-{which}.pem"
    if fault == "not-pem":
        bad.write_text("this is not a certificate\n")
    files = {"cert": pki.server_cert, "key": pki.server_key, "client-ca": pki.ca}
    files[which] = str(bad)
    argv = ["--listen", "127.0.0.1:0", "--data-port", "-1", "--log-level", "error"]
    argv += ["--tls-cert", files["cert"], "--tls-key", files["key"]]
    argv += ["--tls-client-ca", files["client-ca"]]
    assert server_main(argv) == 1
    assert str(bad) in caplog.text
    assert "cannot start" in caplog.text


def test_tls_counts_as_protection_beyond_loopback(pki: Pki) -> None:
    from kvstore.errors import InvalidRequest
    from kvstore.server import load_config
    from kvstore.server.app import check_exposure

    exposed = {"listen": "0.0.0.0:0"}
    with pytest.raises(InvalidRequest, match="neither authentication nor TLS"):
        check_exposure(load_config(None, exposed))
    check_exposure(load_config(None, {**exposed, **tls_settings(pki, mutual=False)}))


def test_tls_options_need_both_certificate_and_key(pki: Pki) -> None:
    with pytest.raises(ValueError, match="both cert_file and key_file"):
        TLSOptions(ca_file=pki.ca, cert_file=pki.client_cert)


async def test_a_client_with_an_unreadable_ca_file_is_told_which(tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere.pem")
    with pytest.raises(ValueError, match=missing):
        KVClient("127.0.0.1:1", NS, options=ClientOptions(tls=TLSOptions(ca_file=missing)))


async def test_the_client_takes_tls_from_kvstore_tls_variables(
    pki: Pki, server_factory: ServerFactory, make_kv: MakeKV, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where ClientOptions.tls is None, KVSTORE_TLS_* make one (kvstore-bench's flags set
    them for its load processes)."""
    running = await server_factory(**tls_settings(pki, mutual=True))
    monkeypatch.setenv("KVSTORE_TLS_CA", pki.ca)
    monkeypatch.setenv("KVSTORE_TLS_CERT", pki.client_cert)
    monkeypatch.setenv("KVSTORE_TLS_KEY", pki.client_key)
    async with make_client(running, data_plane=True) as client:
        assert (await client.put(list(range(16)), make_kv(LAYOUT, 1))).num_committed == 1
    monkeypatch.delenv("KVSTORE_TLS_KEY")
    with pytest.raises(ValueError, match="KVSTORE_TLS_"):
        make_client(running, data_plane=True)


def test_kvstore_server_stats_reaches_a_daemon_with_tls_and_tokens(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tokens_file = tmp_path / "tokens.toml"
    tokens_file.write_text(
        f'[[tokens]]\nsha256 = "{token_sha256("admin-token-123")}"\n'
        'tenant = "ops"\nrole = "admin"\n'
    )
    tls_flags = ["--tls-cert", pki.server_cert, "--tls-key", pki.server_key]
    with daemon_launcher() as launch:
        server = launch(
            tmp_path / "ssd", *tls_flags, "--tokens-file", str(tokens_file), tls_ca=pki.ca
        )
        assert "protections: authentication on (1 bearer tokens); TLS on;" in server.log
        stats = ["stats", "--target", server.target, "--json"]
        secured = [*stats, "--tls-ca", pki.ca, "--token", "admin-token-123"]
        assert server_main(secured) == 0
        assert '"tenantScope": ""' in capsys.readouterr().out
        assert server_main([*stats, "--token", "admin-token-123"]) == 1  # plaintext
        assert server_main([*stats, "--tls-ca", pki.ca]) == 1  # no token
        assert "UNAUTHENTICATED" in capsys.readouterr().err
