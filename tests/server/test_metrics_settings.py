"""`metrics_port` and `metrics_host`: flags and TOML, where /metrics binds by default,
each worker's own port, and the daemon's log line naming the bound port."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemons import Launch, daemon_launcher  # tests/daemons.py

from kvstore.bench.scrape import parse_samples
from kvstore.errors import InvalidRequest
from kvstore.server import load_config
from kvstore.server.app import metrics_host
from kvstore.server.main import main as server_main
from kvstore.server.workers import worker_configs

CLUSTER = {"cluster.etcd": "etcd://127.0.0.1:2379/kv"}  # never dialled here


def test_metrics_are_off_unless_a_port_is_given(tmp_path: Path) -> None:
    assert load_config(None, {}).metrics_port == -1
    path = tmp_path / "server.toml"
    path.write_text('metrics_port = 9100\nmetrics_host = "127.0.0.2"\n')
    config = load_config(path, {})
    assert (config.metrics_port, config.metrics_host) == (9100, "127.0.0.2")
    # A flag overrides the file.
    assert load_config(path, {"metrics_port": 0}).metrics_port == 0


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"listen": "127.0.0.1:50051"}, "127.0.0.1"),
        ({"listen": "[::1]:50051"}, "::1"),
        ({"listen": "localhost:50051"}, "localhost"),
        # Beyond loopback, /metrics (no authentication) stays on loopback unless named.
        ({"listen": "0.0.0.0:50051", "insecure": True}, "127.0.0.1"),
        ({"listen": "10.0.0.7:50051", "insecure": True}, "127.0.0.1"),
        ({"listen": "0.0.0.0:50051", "insecure": True, "metrics_host": "0.0.0.0"}, "0.0.0.0"),
        ({"listen": "127.0.0.1:50051", "metrics_host": "[::1]"}, "::1"),
    ],
)
def test_metrics_bind_loopback_unless_a_host_is_named(
    settings: dict[str, object], expected: str
) -> None:
    assert metrics_host(load_config(None, settings)) == expected


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"metrics_port": -2}, "metrics_port must be a port, 0 for any free port or -1"),
        ({"metrics_port": 70000}, "metrics_port must be a port"),
        ({"metrics_port": True}, "metrics_port must be a int"),
        ({"metrics_host": "127.0.0.1/metrics"}, "metrics_host must be a host name or address"),
        ({"metrics_host": " 127.0.0.1"}, "metrics_host must be a host name or address"),
    ],
)
def test_bad_metrics_settings_are_config_errors(settings: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        load_config(None, settings)


@pytest.mark.parametrize(
    ("value", "reason"), [("abc", "invalid int value"), ("-5", "metrics_port must be a port")]
)
def test_a_bad_metrics_port_flag_exits_2_with_the_reason(
    value: str, reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        server_main(["--metrics-port", value])
    assert exited.value.code == 2
    assert reason in capsys.readouterr().err


def test_each_worker_serves_its_own_metrics_port() -> None:
    base = {**CLUSTER, "listen": "127.0.0.1:7000", "workers": 3}
    shares = worker_configs(load_config(None, {**base, "metrics_port": 9100}))
    assert [share.metrics_port for share in shares] == [9100, 9101, 9102]
    for port in (0, -1):  # any free port for each, or off for all
        shares = worker_configs(load_config(None, {**base, "metrics_port": port}))
        assert [share.metrics_port for share in shares] == [port] * 3
    with pytest.raises(InvalidRequest, match="metrics_port port 65534 \\+ 3 workers runs past"):
        worker_configs(load_config(None, {**base, "metrics_port": 65534}))


@pytest.fixture
def launch() -> Iterator[Launch]:
    with daemon_launcher() as start:
        yield start


@pytest.mark.slow
def test_the_daemon_logs_the_bound_metrics_port(launch: Launch, tmp_path: Path) -> None:
    daemon = launch(tmp_path / "ssd", "--metrics-port", "0")
    found = re.search(r"metrics on (http://127\.0\.0\.1:(\d+)/metrics)", daemon.log)
    assert found is not None, daemon.log
    with urllib.request.urlopen(found.group(1), timeout=10) as response:
        samples = parse_samples(response.read().decode())
    # The SSD tier of this daemon is there, with its directory's capacity.
    assert samples.has("kvstore_tier_capacity_bytes", tier="ssd")
    assert samples.value("kvstore_tier_capacity_bytes", tier="dram") == 64 << 20
