"""The event loop thread's scheduler slice (kvstore.server.sched_hint): the daemon asks
Linux for a short one on the thread that runs its loop, where the kernel takes it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from kvstore.server import RunningServer
from kvstore.server.sched_hint import request_slice, thread_slice_s

ServerFactory = Callable[..., Awaitable[RunningServer]]


def _default_slice_s() -> float | None:
    """Put this thread back on the kernel's default slice (a runtime of 0); that slice."""
    return request_slice(0.0)


has_custom_slices = pytest.mark.skipif(
    request_slice(0.0005) != pytest.approx(0.0005) or _default_slice_s() is None,
    reason="needs a kernel that takes custom slices (Linux 6.12+) and shows them",
)


@has_custom_slices
def test_a_thread_gets_the_slice_it_asks_for_and_can_go_back() -> None:
    default_s = _default_slice_s()
    try:
        assert request_slice(0.002) == pytest.approx(0.002)
        assert thread_slice_s() == pytest.approx(0.002)
    finally:
        assert _default_slice_s() == default_s


@has_custom_slices
async def test_the_server_gives_its_loop_thread_the_configured_slice(
    server_factory: ServerFactory,
) -> None:
    """The server runs on this test's loop, in this thread."""
    default_s = _default_slice_s()
    assert default_s != pytest.approx(0.0001)
    try:
        running = await server_factory()
        assert running.config.loop_slice_ms == 0.1
        assert thread_slice_s() == pytest.approx(0.0001)
    finally:
        _default_slice_s()


@has_custom_slices
async def test_a_slice_of_0_leaves_the_kernels_default(server_factory: ServerFactory) -> None:
    default_s = _default_slice_s()
    await server_factory(loop_slice_ms=0)
    assert thread_slice_s() == default_s
