"""A bounded, seeded fuzz of every RPC and of the data plane, against the real server.

Each case is rebuilt from (seed, index) alone (fuzz_cases.py), so a failure, which
prints both and the bytes sent, reproduces. The default run is 2,000 cases; the slow
one 20,000 with other seeds.
"""

from __future__ import annotations

import pytest
from fuzz_session import FuzzSession

DEFAULT_CASES = 1000  # per transport


@pytest.mark.parametrize(("transport", "seed"), [("grpc", 1), ("data-plane", 2)])
async def test_fuzz(transport: str, seed: int, fuzz_session: FuzzSession) -> None:
    await fuzz_session.fuzz(transport, seed, DEFAULT_CASES)
    await fuzz_session.finish()
    fuzz_session.print_summary()
    assert fuzz_session.num_cases == DEFAULT_CASES
