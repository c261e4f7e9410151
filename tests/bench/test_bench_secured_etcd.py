"""kvstore-bench against a cluster kept in a secured etcd: `--target etcds://...` with the
`--etcd-*` flags reaches etcd over TLS, logged in, from every KVClient of the run
(through the KVSTORE_ETCD_* variables); the password only ever as a file's path."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from certificates import make_pki  # tests/certificates.py
from etcd_server import EtcdServerTLS, EtcdUser, enable_auth, etcd_server
from threaded_server import server_thread  # tests/threaded_server.py

from kvstore.bench.cli import main as bench_main
from kvstore.cluster.etcd import list_members
from kvstore.cluster.etcd_options import ETCD_SETTINGS, PASSWORD_ENV, EtcdOptions, load_access
from kvstore.cluster.members import parse_etcd_url

PREFIX = "kvbench"
USER, PASSWORD = "bench", "bench-pw"


async def registered(url: str, options: EtcdOptions) -> list[str]:
    """The members' addresses once the daemon has registered (its first try is at once)."""
    for _ in range(100):
        members = await list_members(url, options=options)
        if members:
            return [member.address for member in members]
        await asyncio.sleep(0.05)
    raise AssertionError("the daemon did not register within 5 s")


def test_the_bench_reaches_a_cluster_through_a_secured_etcd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # bench_main sets the variables for its load processes; monkeypatch restores them.
    for _, _, variable, _ in ETCD_SETTINGS:
        monkeypatch.setenv(variable, "")
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    pki = make_pki(tmp_path, client_name="bench", server_alt_name="etcd.internal")
    (tmp_path / "password").write_text(PASSWORD + "\n")
    tls = EtcdServerTLS(pki.server_cert, pki.server_key)
    with etcd_server(tmp_path / "etcd", tls=tls) as etcd:
        url = etcd.url(PREFIX)
        options = EtcdOptions(ca_file=pki.ca, user=USER, password=PASSWORD)
        access = load_access(parse_etcd_url(url), EtcdOptions(ca_file=pki.ca))
        asyncio.run(enable_auth(etcd, access, "root-pw", [EtcdUser(USER, PASSWORD, f"/{PREFIX}/")]))
        cluster = {
            "cluster.etcd": url,
            "cluster.etcd_ca_file": pki.ca,
            "cluster.etcd_user": USER,
            "cluster.etcd_password_file": str(tmp_path / "password"),
            "cluster.lease_ttl_s": 5,
        }
        with server_thread(**cluster) as target:
            assert asyncio.run(registered(url, options)) == [target]
            lookup = ["lookup", "--keys", "16", "--iterations", "5", "--target", url, "--json"]
            etcd_flags = ["--etcd-ca", pki.ca, "--etcd-user", USER]
            password = ["--etcd-password-file", str(tmp_path / "password")]
            assert bench_main([*lookup, *etcd_flags, *password]) == 0
            assert json.loads(capsys.readouterr().out)["hit"]["p50_ms"] > 0
