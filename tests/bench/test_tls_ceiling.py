"""The bare stream behind `kvstore-bench tls`'s ceiling: a real sending process, real
sockets and real TLS with a throwaway certificate."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstore.bench.tls import make_certificates
from kvstore.bench.tls_ceiling import BareStream

ROUND_BYTES = 4 << 20
WRITE_BYTES = 256 << 10


@pytest.mark.parametrize("secure", [False, True], ids=["plaintext", "tls"])
def test_a_bare_stream_moves_its_rounds_and_times_both_sides(tmp_path: Path, secure: bool) -> None:
    with BareStream(
        ROUND_BYTES, WRITE_BYTES, make_certificates(tmp_path) if secure else None
    ) as stream:
        assert stream.version.startswith("TLSv") if secure else stream.version == "plaintext"
        rounds = [stream.round() for _ in range(2)]  # the sender serves round after round
    for one in rounds:
        assert one.gbps > 0
        assert one.send_cpu_s_per_gb > 0
        assert one.recv_cpu_s_per_gb > 0


def test_a_sender_that_dies_mid_stream_is_an_error_not_a_hang(tmp_path: Path) -> None:
    with BareStream(ROUND_BYTES, WRITE_BYTES, make_certificates(tmp_path)) as stream:
        assert stream._child is not None
        stream._child.kill()
        stream._child.wait()
        with pytest.raises((ConnectionError, OSError)):
            stream.round()


def test_a_bare_stream_moves_at_least_one_byte() -> None:
    with pytest.raises(ValueError, match="at least one byte"):
        BareStream(0, WRITE_BYTES)
