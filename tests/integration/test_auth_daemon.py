"""The real `kvstore-server` with a tokens file: SIGHUP rotates tokens without dropping
service, `kvstore-server stats` works against it with a token, and the log says which
protections are on."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemons import Launch, daemon_launcher  # tests/daemons.py

from kvstore.server.auth import token_sha256

OLD, NEW = "tok-old-0123456789", "tok-new-0123456789"


@pytest.fixture
def launch() -> Iterator[Launch]:
    with daemon_launcher() as start:
        yield start


def tokens(*pairs: tuple[str, str]) -> str:
    return "".join(
        f'[[tokens]]\nsha256 = "{token_sha256(token)}"\ntenant = "{tenant}"\n'
        for token, tenant in pairs
    )


def stats_cli(
    target: str, token: str | None, *, as_json: bool = True
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "kvstore.server.main", "stats", "--target", target]
    if as_json:
        command.append("--json")
    if token is not None:
        command += ["--token", token]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def test_sighup_rotates_tokens_and_stats_takes_one(launch: Launch, tmp_path: Path) -> None:
    tokens_file = tmp_path / "tokens.toml"
    tokens_file.write_text(tokens((OLD, "team-a")))
    server = launch(tmp_path / "ssd", "--tokens-file", str(tokens_file))
    assert "protections: authentication on (1 bearer tokens)" in server.log
    assert stats_cli(server.target, OLD).returncode == 0
    refused = stats_cli(server.target, None)
    assert refused.returncode == 1
    assert "UNAUTHENTICATED" in refused.stderr
    tokens_file.write_text(tokens((NEW, "team-a")))
    server.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while stats_cli(server.target, NEW).returncode != 0:
        assert time.monotonic() < deadline, f"SIGHUP did not reload the tokens:\n{server.log}"
        time.sleep(0.2)
    assert "UNAUTHENTICATED" in stats_cli(server.target, OLD).stderr
    table = stats_cli(server.target, NEW, as_json=False)  # the module run as a script
    assert table.returncode == 0, table.stderr
    assert "kvstore tiers" in table.stdout
    assert server.process.poll() is None  # still serving
    assert "tokens file reloaded: 1 tokens" in server.log
    assert server.stop(signal.SIGTERM) == 0


def test_sighup_without_a_tokens_file_is_logged_not_fatal(launch: Launch, tmp_path: Path) -> None:
    server = launch(tmp_path / "ssd")
    server.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while "no tokens file to reload" not in server.log:
        assert server.process.poll() is None, f"SIGHUP ended the daemon:\n{server.log}"
        assert time.monotonic() < deadline, server.log
        time.sleep(0.1)
    assert stats_cli(server.target, None).returncode == 0
    assert server.stop(signal.SIGTERM) == 0
