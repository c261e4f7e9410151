"""The same-host path's socket file: bound where only this user can reach it, taking
over a dead daemon's, and sweeping the ones dead daemons left in a shared directory.

A daemon removes its socket file when it stops, but one killed with SIGKILL cannot. A set
path is taken over by the next daemon on it; an "auto" name is fresh every run
(`kvstore-PID-RANDOM.sock`), so those files would pile up in the temporary directory.
A daemon that picks an auto name first removes the auto-named files of daemons that are
gone: their process no longer exists and nothing listens on the file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import stat
import tempfile

logger = logging.getLogger(__name__)

AUTO_SOCKET_NAME = re.compile(r"kvstore-(\d+)-[0-9a-f]{8}\.sock")


def auto_socket_name(pid: int, token: str) -> str:
    """The file name an "auto" shm_socket gets: the daemon's pid and a random token."""
    return f"kvstore-{pid}-{token}.sock"


# sun_path holds 108 bytes, the terminating NUL included.
_MAX_SOCKET_PATH_BYTES = 107


def bind_private(listener: socket.socket, path: str) -> None:
    """Bind `listener` to `path` as a socket file of mode 0600, never reachable by other
    users on the way: it is bound inside a fresh 0700 directory beside `path`, made
    0600 there, then linked into place (a link, unlike a rename, fails if something
    took `path` meanwhile). Binding at `path` and then chmod-ing would leave the file
    with the umask's mode for that moment, and a umask is the whole process's.

    Where the staging name would not fit a socket address, `path` is bound directly and
    chmod-ed at once, and the log says so."""
    directory = os.path.dirname(path) or "."
    staging_name = os.path.join(directory, ".kvXXXXXXXX", "s")
    if len(os.fsencode(staging_name)) > _MAX_SOCKET_PATH_BYTES:
        logger.warning(
            "shm_socket %s is too long to bind privately first; it is made 0600 right "
            "after binding (until then it has the umask's mode)",
            path,
        )
        listener.bind(path)
        os.chmod(path, 0o600)
        return
    staging = tempfile.mkdtemp(prefix=".kv", dir=directory)  # mode 0700
    staged = os.path.join(staging, "s")
    try:
        listener.bind(staged)
        os.chmod(staged, 0o600)
        os.link(staged, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staged)
        os.rmdir(staging)


def remove_stale_socket(path: str) -> None:
    """Unlink a Unix socket file nobody listens on (a daemon that died); refuse to take
    over one in use, or a path that is not a socket."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"{path} exists and is not a socket; choose another shm_socket path")
    if _nobody_listens(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    raise OSError(f"another daemon listens on {path}; give this one its own shm_socket path")


def sweep_dead_auto_sockets(directory: str) -> int:
    """Remove the auto-named socket files in `directory` whose daemon is gone; returns
    how many. A file is left alone unless its pid names no process here *and* a connect
    is refused: a daemon in another pid namespace that shares the directory still
    listens, so its file stays. Files this user cannot remove are skipped."""
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    removed = 0
    for name in names:
        match = AUTO_SOCKET_NAME.fullmatch(name)
        if match is None or _process_exists(int(match.group(1))):
            continue
        path = os.path.join(directory, name)
        try:
            if not stat.S_ISSOCK(os.lstat(path).st_mode) or not _nobody_listens(path):
                continue
            os.unlink(path)
        except OSError:
            continue
        removed += 1
    if removed:
        logger.info("removed %d socket files of daemons that are gone from %s", removed, directory)
    return removed


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process (or a pid no process can have: keep it)
    return True


def _nobody_listens(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return True
    except OSError:
        return False  # not ours to judge (permission denied, a path too long)
    finally:
        probe.close()
    return False
