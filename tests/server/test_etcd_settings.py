"""The etcd TLS and credential settings (kvstore.cluster.etcd_options, [cluster] etcd_*):
from TOML, flags and the environment; the password from a file's first line or
$KVSTORE_ETCD_PASSWORD, never a setting, never in a repr; etcds:// targets."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from kvstore.cluster.etcd_options import EtcdOptions, load_access, read_password_file
from kvstore.cluster.members import is_cluster_target, parse_etcd_url
from kvstore.errors import InvalidRequest
from kvstore.server import load_config

ETCD_VARIABLES = (
    "KVSTORE_ETCD_CA",
    "KVSTORE_ETCD_CERT",
    "KVSTORE_ETCD_KEY",
    "KVSTORE_ETCD_SERVER_NAME",
    "KVSTORE_ETCD_USER",
    "KVSTORE_ETCD_PASSWORD_FILE",
    "KVSTORE_ETCD_PASSWORD",
)
CA_PEM = "-----BEGIN CERTIFICATE-----\nnot checked here\n-----END CERTIFICATE-----\n"


@pytest.fixture(autouse=True)
def no_etcd_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ETCD_VARIABLES:
        monkeypatch.delenv(variable, raising=False)


def test_etcds_urls_are_tls_targets() -> None:
    assert parse_etcd_url("etcds://a:1,b:2/kv").tls
    assert parse_etcd_url("etcds://a:1,b:2/kv").endpoints == (("a", 1), ("b", 2))
    assert not parse_etcd_url("etcd://a:1/kv").tls
    assert is_cluster_target("etcds://a:1/kv")
    with pytest.raises(ValueError, match="must start with etcd:// or etcds://"):
        parse_etcd_url("https://a:1/kv")


def test_the_cluster_section_takes_tls_and_a_password_file(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text(CA_PEM)
    (tmp_path / "password").write_text("pass word\nsecond line ignored\n")
    path = tmp_path / "server.toml"
    path.write_text(
        "[cluster]\n"
        'etcd = "etcds://10.0.0.5:2379/kv"\n'
        f'etcd_ca_file = "{tmp_path / "ca.pem"}"\n'
        'etcd_server_name = "etcd.internal"\n'
        'etcd_user = "kvstore"\n'
        f'etcd_password_file = "{tmp_path / "password"}"\n'
    )
    config = load_config(path, {})
    assert config.cluster is not None
    access = config.cluster.etcd_access()
    assert (access.tls, access.server_name, access.user) == (True, "etcd.internal", "kvstore")
    assert access.root_pem == CA_PEM.encode()
    assert access.password == "pass word"
    assert "pass word" not in repr(config) + repr(access)


def test_the_password_comes_from_the_environment_and_never_from_a_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVSTORE_ETCD_PASSWORD", "from-the-env")
    settings = {"cluster.etcd": "etcd://h:1/kv", "cluster.etcd_user": "kvstore"}
    config = load_config(None, settings)
    assert config.cluster is not None
    assert config.cluster.etcd_access().password == "from-the-env"
    assert "from-the-env" not in repr(config)
    # Workers get their config pickled on stdin: the password travels there, not in argv.
    assert pickle.loads(pickle.dumps(config)).cluster.etcd_password == "from-the-env"
    with pytest.raises(InvalidRequest, match=r"etcd_password is not a setting.*password_file"):
        load_config(None, {**settings, "cluster.etcd_password": "typed-in"})
    path = tmp_path / "server.toml"
    path.write_text('[cluster]\netcd = "etcd://h:1/kv"\netcd_password = "in-a-file"\n')
    with pytest.raises(InvalidRequest, match="etcd_password is not a setting"):
        load_config(path, {})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"cluster.etcd_ca_file": "ca.pem"}, "cluster URL is etcd:// .*write etcds://"),
        ({"cluster.etcd_cert_file": "c.pem"}, "both a client certificate and its key"),
        ({"cluster.etcd_user": "kv"}, "etcd user 'kv' needs a password"),
        ({"cluster.etcd_password_file": "/p"}, "an etcd password needs its user"),
        (
            {"cluster.etcd_user": "kv", "cluster.etcd_password_file": "/nonexistent/p"},
            "cannot read the etcd password file /nonexistent/p",
        ),
    ],
)
def test_etcd_settings_that_cannot_work_are_config_errors(
    settings: dict[str, str], message: str
) -> None:
    with pytest.raises(InvalidRequest, match=message):
        load_config(None, {"cluster.etcd": "etcd://h:1/kv", **settings})


def test_an_empty_password_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        read_password_file(str(tmp_path / "empty"))


def test_options_come_from_the_environment_under_the_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert EtcdOptions.from_environment() is None
    monkeypatch.setenv("KVSTORE_ETCD_CA", "/env/ca.pem")
    monkeypatch.setenv("KVSTORE_ETCD_USER", "kvstore")
    monkeypatch.setenv("KVSTORE_ETCD_PASSWORD", "env-password")
    options = EtcdOptions.from_environment(overrides={"ca_file": "/flag/ca.pem", "user": None})
    assert options == EtcdOptions(ca_file="/flag/ca.pem", user="kvstore", password="env-password")
    assert "env-password" not in repr(options)
    # A password file named takes the place of the variable.
    monkeypatch.setenv("KVSTORE_ETCD_PASSWORD_FILE", "/run/secrets/etcd")
    options = EtcdOptions.from_environment()
    assert options is not None
    assert (options.password_file, options.password) == ("/run/secrets/etcd", None)
    monkeypatch.setenv("KVSTORE_ETCD_CERT", "/env/cert.pem")
    with pytest.raises(ValueError, match="from the KVSTORE_ETCD_\\* environment variables"):
        EtcdOptions.from_environment()


def test_tls_to_etcd_without_a_ca_trusts_the_system_store() -> None:
    access = load_access(parse_etcd_url("etcds://h:1/kv"), None)
    assert access.tls
    assert access.root_pem is None
