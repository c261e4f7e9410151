"""etcd over TLS and with etcd's authentication (kvstore.cluster.etcd_options): a daemon
registers and a client finds it through an etcd that serves TLS and demands a user and
password, or a client certificate; settings that etcd refuses (a CA that did not sign its
certificate, plaintext against TLS and back, a wrong password, no user, a user without
permission on the prefix, a missing password file) stop the daemon at start-up with a
message that names etcd and what to change, and raise the client's own errors. Against a
real etcd on loopback (tests/etcd_server.py), with certificates made for the module
(tests/certificates.py) and authentication turned on through etcd's Auth API.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from certificates import Pki, make_pki  # tests/certificates.py
from etcd_server import EtcdServer, EtcdServerTLS, EtcdUser, enable_auth, etcd_server

from kvstore.client import (
    ClientOptions,
    EtcdOptions,
    InvalidArgument,
    KVClient,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from kvstore.client._cluster import ClusterClient
from kvstore.client._vllm_types import KVTransferConfig, Request, VllmConfig
from kvstore.client.vllm_connector import ConnectorConfig, KVConnectorRole, KVStoreConnector
from kvstore.cluster.etcd import list_members
from kvstore.cluster.etcd_options import load_access
from kvstore.cluster.members import parse_etcd_url
from kvstore.layout import Namespace
from kvstore.server import RunningServer, build_server, load_config
from kvstore.server.main import main as server_main

MiB = 1 << 20
PREFIX = "kvsecure"
USER, PASSWORD = "kvstore", "s3cret-kv"
ROOT_PASSWORD = "r00t-pw"
STRANGER = EtcdUser("stranger", "stranger-pw")  # may log in, may touch no key
NUM_BLOCKS = 4


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(
        tmp_path_factory.mktemp("pki"), client_name="kvstore-node", server_alt_name="etcd.internal"
    )


@pytest.fixture(scope="module")
def secrets_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """PASSWORD in `password`, a wrong one in `wrong-password`."""
    directory = tmp_path_factory.mktemp("secrets")
    (directory / "password").write_text(PASSWORD + "\n")
    (directory / "wrong-password").write_text("not-" + PASSWORD + "\n")
    return directory


@pytest.fixture(scope="module")
def secured_etcd(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[EtcdServer]:
    """etcd serving TLS with authentication on: root, USER (read and write under
    /PREFIX/) and STRANGER. An unused token lives 1 s, so that tests meet stale ones."""
    tls = EtcdServerTLS(pki.server_cert, pki.server_key)
    with etcd_server(tmp_path_factory.mktemp("secured"), tls=tls, auth_token_ttl_s=1) as etcd:
        access = load_access(parse_etcd_url(etcd.url("x")), EtcdOptions(ca_file=pki.ca))
        users = [EtcdUser(USER, PASSWORD, f"/{PREFIX}/"), STRANGER]
        asyncio.run(enable_auth(etcd, access, ROOT_PASSWORD, users))
        yield etcd


@pytest.fixture(scope="module")
def plain_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    with etcd_server(tmp_path_factory.mktemp("plain")) as etcd:
        yield etcd


@pytest.fixture
def no_etcd_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in (
        "KVSTORE_ETCD_CA",
        "KVSTORE_ETCD_CERT",
        "KVSTORE_ETCD_KEY",
        "KVSTORE_ETCD_SERVER_NAME",
        "KVSTORE_ETCD_USER",
        "KVSTORE_ETCD_PASSWORD_FILE",
        "KVSTORE_ETCD_PASSWORD",
    ):
        monkeypatch.delenv(variable, raising=False)


def good_options(pki: Pki) -> EtcdOptions:
    return EtcdOptions(ca_file=pki.ca, user=USER, password=PASSWORD)


@pytest.fixture
async def daemons() -> AsyncIterator[Callable[..., Awaitable[RunningServer]]]:
    """In-process daemons with [cluster] `settings`, drained when the test ends."""
    started: list[RunningServer] = []

    async def start(**settings: Any) -> RunningServer:
        config = load_config(
            None,
            {
                "listen": "127.0.0.1:0",
                "log_level": "warning",
                "store.dram_bytes": 8 * MiB,
                "store.page_bytes": 4096,
                "limits.drain_grace_s": 0.5,
                "cluster.lease_ttl_s": 5,
                **settings,
            },
        )
        running = await build_server(config)
        started.append(running)
        return running

    yield start
    for running in started:
        await running.drain()


def secured_daemon_settings(url: str, pki: Pki, secrets_dir: Path) -> dict[str, Any]:
    """[cluster] settings of a daemon that registers in the secured etcd as USER."""
    return {
        "cluster.etcd": url,
        "cluster.etcd_ca_file": pki.ca,
        "cluster.etcd_user": USER,
        "cluster.etcd_password_file": str(secrets_dir / "password"),
    }


async def members_of(url: str, options: EtcdOptions) -> list[str]:
    return [member.node_id for member in await list_members(url, options=options)]


async def wait_for_members(url: str, options: EtcdOptions, count: int) -> list[str]:
    for _ in range(200):
        found = await members_of(url, options)
        if len(found) == count:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"etcd did not list {count} member(s) within 10 s")


async def round_trip(client: KVClient, make_kv: Callable[..., torch.Tensor]) -> None:
    """A put, lookup and get through the cluster client, byte for byte."""
    tokens = list(range(NUM_BLOCKS * 16))  # the make_namespace layout: 16 tokens a block
    kv = make_kv(client.namespace.layout, NUM_BLOCKS, seed=3)
    assert (await client.put(tokens, kv)).num_committed == NUM_BLOCKS
    dest = torch.zeros_like(kv)
    assert await client.get_into(await client.lookup(tokens), dest) == NUM_BLOCKS
    assert torch.equal(dest.view(torch.uint8), kv.view(torch.uint8))


# -- working setups ----------------------------------------------------------------------


async def test_a_daemon_registers_and_a_client_finds_it_over_tls_with_credentials(
    secured_etcd: EtcdServer,
    pki: Pki,
    secrets_dir: Path,
    daemons: Callable[..., Awaitable[RunningServer]],
    make_namespace: Callable[..., Namespace],
    make_kv: Callable[..., torch.Tensor],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_etcd_environment: None,
) -> None:
    url = secured_etcd.url(PREFIX)
    assert url.startswith("etcds://")
    node = await daemons(**secured_daemon_settings(url, pki, secrets_dir))
    assert node.membership is not None
    node_id = node.membership.member.node_id
    assert await wait_for_members(url, good_options(pki), 1) == [node_id]

    options = ClientOptions(etcd=good_options(pki), cluster_refresh_s=0.1)
    async with KVClient(url, make_namespace(), options=options) as client:
        assert isinstance(client, ClusterClient)
        await round_trip(client, make_kv)
        assert [member.node_id for member in client.membership.members] == [node_id]

    # `kvstore-server cluster status` with the flags, the password from the environment.
    monkeypatch.setenv("KVSTORE_ETCD_PASSWORD", PASSWORD)
    status = ["cluster", "status", "--cluster", url, "--json", "--etcd-ca", pki.ca]
    assert await asyncio.to_thread(server_main, [*status, "--etcd-user", USER]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(row["node_id"], row["health"]) for row in rows] == [(node_id, "SERVING")]
    monkeypatch.setenv("KVSTORE_ETCD_PASSWORD", "not-the-password")
    assert await asyncio.to_thread(server_main, [*status, "--etcd-user", USER]) == 1
    assert f"refused user '{USER}': wrong password" in capsys.readouterr().out

    # The daemon's token has gone stale (etcd forgets it after 1 s unused; keep-alives
    # do not use it): withdrawing logs in again, and the key goes at once, not with
    # its lease.
    await asyncio.sleep(2.5)
    await node.drain()
    assert await members_of(url, good_options(pki)) == []


async def test_the_vllm_connector_reaches_a_secured_etcd_through_its_own_settings(
    secured_etcd: EtcdServer,
    pki: Pki,
    secrets_dir: Path,
    daemons: Callable[..., Awaitable[RunningServer]],
    make_kv: Callable[..., torch.Tensor],
    no_etcd_environment: None,
) -> None:
    # kv_connector_extra_config's etcd_* keys, with nothing in the environment: the
    # scheduler side finds through the secured etcd what a client put.
    url = secured_etcd.url(PREFIX)
    node = await daemons(**secured_daemon_settings(url, pki, secrets_dir))
    assert node.membership is not None
    await wait_for_members(url, good_options(pki), 1)
    extra = {
        "target": url,
        "tenant": "vllm-etcd",
        "model_fingerprint": "tiny",
        "block_size": 16,
        "num_layers": 2,
        "num_kv_heads": 2,
        "head_dim": 8,
        "dtype": "float16",
        "etcd_ca": pki.ca,
        "etcd_user": USER,
        "etcd_password_file": str(secrets_dir / "password"),
    }
    config = ConnectorConfig.from_extra_config(extra)
    prompt = list(range(NUM_BLOCKS * 16 + 1))  # the last token is always computed
    kv = make_kv(config.namespace.layout, NUM_BLOCKS, seed=5)
    options = ClientOptions(etcd=good_options(pki))
    async with KVClient(url, config.namespace, options=options) as client:
        assert (await client.put(prompt[:-1], kv)).num_committed == NUM_BLOCKS

    vllm_config = VllmConfig(KVTransferConfig(kv_connector_extra_config=extra))
    scheduler = await asyncio.to_thread(KVStoreConnector, vllm_config, KVConnectorRole.SCHEDULER)
    try:
        matched = await asyncio.to_thread(
            scheduler.get_num_new_matched_tokens, Request("turn-2", prompt), 0
        )
        assert matched == (NUM_BLOCKS * 16, False)
    finally:
        await asyncio.to_thread(scheduler.shutdown)


async def test_mutual_tls_etcd_takes_the_certificate_its_ca_signed_and_no_other(
    tmp_path: Path,
    pki: Pki,
    daemons: Callable[..., Awaitable[RunningServer]],
    make_namespace: Callable[..., Namespace],
    make_kv: Callable[..., torch.Tensor],
    no_etcd_environment: None,
) -> None:
    tls = EtcdServerTLS(pki.server_cert, pki.server_key, client_ca_file=pki.ca)
    with etcd_server(tmp_path, tls=tls) as etcd:
        url = etcd.url(PREFIX)
        mutual = EtcdOptions(ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key)
        node = await daemons(
            **{
                "cluster.etcd": url,
                "cluster.etcd_ca_file": pki.ca,
                "cluster.etcd_cert_file": pki.client_cert,
                "cluster.etcd_key_file": pki.client_key,
                # A name in etcd's certificate other than the host connected to.
                "cluster.etcd_server_name": "etcd.internal",
            }
        )
        assert node.membership is not None
        assert await wait_for_members(url, mutual, 1) == [node.membership.member.node_id]
        async with KVClient(url, make_namespace(), options=ClientOptions(etcd=mutual)) as client:
            await round_trip(client, make_kv)

        no_certificate = ClientOptions(etcd=EtcdOptions(ca_file=pki.ca))
        with pytest.raises(Unavailable, match=r"requires a client certificate.*--etcd-cert"):
            await KVClient(url, make_namespace(), options=no_certificate).start()
        foreign = ClientOptions(
            etcd=EtcdOptions(ca_file=pki.ca, cert_file=pki.foreign_cert, key_file=pki.foreign_key)
        )
        with pytest.raises(Unavailable, match="refused the client certificate"):
            await KVClient(url, make_namespace(), options=foreign).start()


# -- what etcd refuses: the daemon stops at start-up, saying what to change ---------------


def refused_start_cases() -> list[Any]:
    return [
        pytest.param(
            "secured",
            ["--etcd-ca", "{other_ca}", "--etcd-user", USER, "--etcd-password-file", "{password}"],
            r"etcd at 127\.0\.0\.1:\d+: its TLS certificate does not verify against .*other-ca"
            r"\.pem.*--etcd-ca",
            id="a-CA-that-did-not-sign-etcd",
        ),
        pytest.param(
            "secured-as-plaintext",
            [],
            r"etcd at 127\.0\.0\.1:\d+ speaks TLS, but the cluster URL is etcd://.*etcds://",
            id="plaintext-against-TLS",
        ),
        pytest.param(
            "plain",
            ["--etcd-ca", "{ca}"],
            r"etcd at 127\.0\.0\.1:\d+ does not answer TLS.*write etcd://",
            id="TLS-against-plaintext",
        ),
        pytest.param(
            "secured",
            ["--etcd-ca", "{ca}", "--etcd-user", USER, "--etcd-password-file", "{wrong_password}"],
            rf"etcd at 127\.0\.0\.1:\d+ refused user '{USER}': wrong password.*"
            r"--etcd-password-file",
            id="a-wrong-password",
        ),
        pytest.param(
            "secured",
            ["--etcd-ca", "{ca}"],
            r"etcd at 127\.0\.0\.1:\d+ has authentication enabled: give --etcd-user",
            id="no-user",
        ),
        pytest.param(
            "secured",
            ["--etcd-ca", "{ca}", "--etcd-user", STRANGER.name],
            rf"user '{STRANGER.name}' may not use /{PREFIX}/.*grant it a role with readwrite",
            id="no-permission-on-the-prefix",
        ),
    ]


@pytest.mark.parametrize(("etcd_kind", "flags", "message"), refused_start_cases())
def test_a_daemon_that_etcd_refuses_does_not_start_and_says_why(
    secured_etcd: EtcdServer,
    plain_etcd: EtcdServer,
    pki: Pki,
    secrets_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    no_etcd_environment: None,
    etcd_kind: str,
    flags: list[str],
    message: str,
) -> None:
    monkeypatch.setenv("KVSTORE_ETCD_PASSWORD", STRANGER.password)  # used by the stranger
    url = {
        "secured": secured_etcd.url(PREFIX),
        "secured-as-plaintext": secured_etcd.url(PREFIX).replace("etcds://", "etcd://"),
        "plain": plain_etcd.url(PREFIX).replace("etcd://", "etcds://"),
    }[etcd_kind]
    paths = {
        "ca": pki.ca,
        "other_ca": pki.other_ca,
        "password": str(secrets_dir / "password"),
        "wrong_password": str(secrets_dir / "wrong-password"),
    }
    argv = ["--listen", "127.0.0.1:0", "--dram-bytes", "8MiB", "--cluster", url]
    argv += [flag.format(**paths) for flag in flags]
    with caplog.at_level(logging.ERROR, logger="kvstore.server"):
        assert server_main(argv) == 1
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert logged.startswith("cannot start: ")
    assert len(logged) < 1000
    assert re.search(message, logged), logged


@pytest.mark.slow
def test_workers_that_etcd_refuses_stop_the_supervisor_and_say_why(
    secured_etcd: EtcdServer,
    pki: Pki,
    secrets_dir: Path,
    capfd: pytest.CaptureFixture[str],
    no_etcd_environment: None,
) -> None:
    # Each worker checks etcd as a lone daemon does; the first that cannot start stops
    # the rest, and the supervisor exits 1 rather than restarting them forever.
    argv = ["--listen", "127.0.0.1:0", "--dram-bytes", "16MiB", "--workers", "2"]
    argv += ["--cluster", secured_etcd.url(PREFIX), "--etcd-ca", pki.ca, "--etcd-user", USER]
    argv += ["--etcd-password-file", str(secrets_dir / "wrong-password")]
    assert server_main(argv) == 1
    output = capfd.readouterr()
    logged = output.out + output.err
    assert re.search(f"refused user '{USER}': wrong password", logged), logged[-2000:]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        pytest.param(
            ["--etcd-user", USER, "--etcd-password-file", "/nonexistent/etcd-password"],
            "cannot read the etcd password file /nonexistent/etcd-password: No such file",
            id="a-missing-password-file",
        ),
        pytest.param(
            ["--etcd-user", USER],
            f"etcd user '{USER}' needs a password: --etcd-password-file FILE",
            id="a-user-without-a-password",
        ),
        pytest.param(
            ["--etcd-ca", "/nonexistent/ca.pem"],
            "etcd TLS: cannot read TLS file /nonexistent/ca.pem",
            id="a-missing-CA-file",
        ),
    ],
)
def test_settings_that_cannot_work_stop_the_daemon_before_it_calls_etcd(
    secured_etcd: EtcdServer,
    capsys: pytest.CaptureFixture[str],
    no_etcd_environment: None,
    flags: list[str],
    message: str,
) -> None:
    argv = ["--listen", "127.0.0.1:0", "--cluster", secured_etcd.url(PREFIX), *flags]
    with pytest.raises(SystemExit) as exit_info:
        server_main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_tls_settings_beside_a_plaintext_url_are_refused(
    plain_etcd: EtcdServer, pki: Pki, capsys: pytest.CaptureFixture[str], no_etcd_environment: None
) -> None:
    argv = ["--cluster", plain_etcd.url(PREFIX), "--etcd-ca", pki.ca]
    with pytest.raises(SystemExit):
        server_main(argv)
    assert "write etcds://HOST:PORT/PREFIX to speak TLS to etcd" in capsys.readouterr().err


# -- what etcd refuses: the client raises its own errors ----------------------------------


@pytest.mark.parametrize(
    ("kind", "options", "error", "message"),
    [
        pytest.param(
            "secured",
            {"ca_file": "other_ca", "user": USER, "password": PASSWORD},
            Unavailable,
            "does not verify against",
            id="a-CA-that-did-not-sign-etcd",
        ),
        pytest.param(
            "secured-as-plaintext", {}, Unavailable, "speaks TLS", id="plaintext-against-TLS"
        ),
        pytest.param(
            "plain",
            {"ca_file": "ca"},
            Unavailable,
            "does not answer TLS",
            id="TLS-against-plaintext",
        ),
        pytest.param(
            "secured",
            {"ca_file": "ca", "user": USER, "password": "wrong"},
            Unauthenticated,
            f"refused user '{USER}': wrong password",
            id="a-wrong-password",
        ),
        pytest.param(
            "secured", {"ca_file": "ca"}, Unauthenticated, "authentication enabled", id="no-user"
        ),
        pytest.param(
            "secured",
            {"ca_file": "ca", "user": STRANGER.name, "password": STRANGER.password},
            PermissionDenied,
            f"may not use /{PREFIX}/",
            id="no-permission-on-the-prefix",
        ),
    ],
)
async def test_a_client_that_etcd_refuses_raises_the_client_error_saying_why(
    secured_etcd: EtcdServer,
    plain_etcd: EtcdServer,
    pki: Pki,
    make_namespace: Callable[..., Namespace],
    no_etcd_environment: None,
    kind: str,
    options: dict[str, str],
    error: type[Exception],
    message: str,
) -> None:
    url = {
        "secured": secured_etcd.url(PREFIX),
        "secured-as-plaintext": secured_etcd.url(PREFIX).replace("etcds://", "etcd://"),
        "plain": plain_etcd.url(PREFIX).replace("etcd://", "etcds://"),
    }[kind]
    files = {"ca": pki.ca, "other_ca": pki.other_ca}
    if "ca_file" in options:
        options = {**options, "ca_file": files[options["ca_file"]]}
    client = KVClient(url, make_namespace(), options=ClientOptions(etcd=EtcdOptions(**options)))
    with pytest.raises(
        error, match=f"cannot read the cluster's members from {url}: etcd at .*{message}"
    ):
        await asyncio.wait_for(client.start(), timeout=10)
    await client.close()


async def test_a_client_is_told_of_a_missing_password_file_when_made(
    secured_etcd: EtcdServer,
    pki: Pki,
    make_namespace: Callable[..., Namespace],
    monkeypatch: pytest.MonkeyPatch,
    no_etcd_environment: None,
) -> None:
    # Through the environment, as a tool or a child process would take it.
    monkeypatch.setenv("KVSTORE_ETCD_CA", pki.ca)
    monkeypatch.setenv("KVSTORE_ETCD_USER", USER)
    monkeypatch.setenv("KVSTORE_ETCD_PASSWORD_FILE", "/nonexistent/etcd-password")
    with pytest.raises(InvalidArgument, match="cannot read the etcd password file"):
        KVClient(secured_etcd.url(PREFIX), make_namespace())
