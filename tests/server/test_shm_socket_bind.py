"""bind_private: the same-host socket file is never at its path with a mode other users
could use, whatever the umask; real sockets on a real directory."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvstore.server.shm_socket import bind_private


@pytest.fixture
def open_umask() -> Iterator[None]:
    """The loosest umask: a socket bound straight at its path would be 0777."""
    previous = os.umask(0)
    yield
    os.umask(previous)


def test_the_socket_path_only_ever_holds_a_0600_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, open_umask: None
) -> None:
    path = tmp_path / "kv.sock"
    seen: list[tuple[str, int | None, int]] = []  # (step, mode at `path`, staging dir mode)
    real_chmod, real_link = os.chmod, os.link

    def mode_at_path() -> int | None:
        try:
            return stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            return None

    def chmod(target: str, mode: int) -> None:
        parent = os.path.dirname(target)
        seen.append(("chmod", mode_at_path(), stat.S_IMODE(os.stat(parent).st_mode)))
        real_chmod(target, mode)

    def link(source: str, target: str) -> None:
        seen.append(("link", mode_at_path(), stat.S_IMODE(os.stat(source).st_mode)))
        real_link(source, target)

    monkeypatch.setattr(os, "chmod", chmod)
    monkeypatch.setattr(os, "link", link)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        bind_private(listener, str(path))
        listener.listen(1)
        # Before the link, nothing is at the path; the staged socket sits in a 0700
        # directory while it has the umask's mode, and is 0600 by the time it is linked.
        assert seen == [("chmod", None, 0o700), ("link", None, 0o600)]
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert sorted(os.listdir(tmp_path)) == ["kv.sock"]
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(path))  # the linked file reaches the bound listener
            accepted, _ = listener.accept()
            accepted.close()
    finally:
        listener.close()


def test_a_path_taken_meanwhile_is_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "kv.sock"
    path.write_text("someone else's")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with pytest.raises(FileExistsError):
            bind_private(listener, str(path))
    finally:
        listener.close()
    assert path.read_text() == "someone else's"
    assert sorted(os.listdir(tmp_path)) == ["kv.sock"]  # no staging directory left


def test_a_path_too_long_to_stage_is_bound_directly_and_made_0600(
    tmp_path: Path, open_umask: None, caplog: pytest.LogCaptureFixture
) -> None:
    # A path that fits a socket address (107 bytes), but not with the staging name
    # ("/.kvXXXXXXXX/s", 6 bytes more than "/kv.sock") in its place.
    directory = tmp_path / ("d" * (97 - len(str(tmp_path)) - 1))
    directory.mkdir()
    path = directory / "kv.sock"
    assert len(os.fsencode(str(path))) == 105
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        bind_private(listener, str(path))
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        listener.close()
    assert "too long to bind privately" in caplog.text
