"""A bounded, seeded fuzz of every RPC and of the data plane, against the real server.

Each case is rebuilt from (seed, index) alone (fuzz_cases.py), so a failure, which
prints both and the bytes sent, reproduces; KVSTORE_FUZZ_REPLAY replays chosen cases.
The default run is 2,000 cases; the slow one (`-m slow`) 20,000 with other seeds,
8,000 of them on a write-through server with an SSD tier.
"""

from __future__ import annotations

import os

import grpc
import pytest
from fuzz_cases import STREAM_RPCS, GrpcCase, data_plane_case, grpc_case
from fuzz_session import FuzzSession
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

import kvstore.put
import kvstore.server.transfer

DEFAULT_CASES = 1000  # per transport
SLOW_SEEDS = (101, 102, 103, 104, 105)
SLOW_CASES = 2000  # per transport and seed


@pytest.mark.parametrize(("transport", "seed"), [("grpc", 1), ("data-plane", 2)])
async def test_fuzz(transport: str, seed: int, fuzz_session: FuzzSession) -> None:
    await fuzz_session.fuzz(transport, seed, DEFAULT_CASES)
    await fuzz_session.finish()
    fuzz_session.print_summary()
    assert fuzz_session.num_cases == DEFAULT_CASES


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("transport", ["grpc", "data-plane"])
@pytest.mark.parametrize("fuzz_session", ["write-back", "write-through"], indirect=True)
async def test_fuzz_long(transport: str, fuzz_session: FuzzSession) -> None:
    # Minutes of work: skipped unless asked for with -m slow (see conftest.py).
    # Write-back without SSD for three seeds, write-through with one for two: 20,000 cases.
    seeds = SLOW_SEEDS[3:] if fuzz_session.has_ssd else SLOW_SEEDS[:3]
    for seed in seeds:
        await fuzz_session.fuzz(transport, seed, SLOW_CASES)
    await fuzz_session.finish()
    fuzz_session.print_summary()


@pytest.mark.skipif(
    "KVSTORE_FUZZ_REPLAY" not in os.environ,
    reason="set KVSTORE_FUZZ_REPLAY=grpc:SEED:FIRST-LAST (or data-plane:...) to replay cases",
)
async def test_replay(fuzz_session: FuzzSession) -> None:
    """Replay cases one batch each, so the first case that breaks an invariant is named."""
    transport, seed, span = os.environ["KVSTORE_FUZZ_REPLAY"].split(":")
    first, _, last = span.partition("-")
    make = grpc_case if transport == "grpc" else data_plane_case
    for index in range(int(first), int(last or first) + 1):
        await fuzz_session.run_batch([make(int(seed), index)])
    await fuzz_session.finish()


# -- the fuzz can fail: faults injected into the server must be caught ------------------------


def _put_cases(seed: int, count: int) -> list[GrpcCase]:
    cases = (grpc_case(seed, index) for index in range(10 * count))
    return [case for case in cases if case.rpc in STREAM_RPCS][:count]


async def test_an_internal_error_fails_the_fuzz(
    fuzz_session: FuzzSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    decode = kvstore.server.transfer.decode_put_message
    calls = 0

    def sometimes_broken(raw: bytes | memoryview) -> object:
        nonlocal calls
        calls += 1
        if calls % 5 == 0:
            raise RuntimeError("an injected fault")
        return decode(raw)

    monkeypatch.setattr(kvstore.server.transfer, "decode_put_message", sometimes_broken)
    with pytest.raises(AssertionError, match="INTERNAL") as raised:
        await fuzz_session.run_batch(_put_cases(seed=3, count=40))
    assert "an injected fault" in str(raised.value)  # the server's log, quoted


async def test_a_leaked_reservation_fails_the_fuzz(
    fuzz_session: FuzzSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kvstore.put.PutSession, "abort", lambda self: None)
    # Seen as reservations or parents' pins left behind, whichever the batch meets first
    # (after a stall the server cut, or at the batch's end).
    with pytest.raises(
        AssertionError, match=r"reservation not freed|put_reserved_bytes|still busy"
    ):
        await fuzz_session.run_batch(_put_cases(seed=4, count=60))


# -- grpcio's own services answer bad bytes as ours do -------------------------------------------

MALFORMED = [
    b"\xff\xff",  # a truncated tag
    b"\x0a\x05ab",  # a string field longer than the message
    b"\x0a\x02\xff\xfe",  # a string that is not UTF-8
]


@pytest.mark.parametrize(
    ("rpc", "message_type"),
    [
        ("grpc.health.v1.Health/Check", "grpc.health.v1.HealthCheckRequest"),
        ("grpc.health.v1.Health/Watch", "grpc.health.v1.HealthCheckRequest"),
        (
            "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            "grpc.reflection.v1alpha.ServerReflectionRequest",
        ),
    ],
)
async def test_a_malformed_request_to_health_or_reflection_is_invalid_argument(
    rpc: str, message_type: str, channel: grpc.aio.Channel
) -> None:
    for raw in MALFORMED:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await _call_once(channel, rpc, raw)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
        details = raised.value.details() or ""
        assert f"malformed request to {rpc}" in details, details
        assert message_type in details, details
    # The service goes on answering well-formed requests: the server is SERVING, and
    # reflection lists the KVStore service.
    if rpc.startswith("grpc.health"):
        reply = health_pb2.HealthCheckResponse.FromString(await _call_once(channel, rpc, b""))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    else:
        list_services = reflection_pb2.ServerReflectionRequest(list_services="")
        raw = await _call_once(channel, rpc, list_services.SerializeToString())
        reply = reflection_pb2.ServerReflectionResponse.FromString(raw)
        names = [service.name for service in reply.list_services_response.service]
        assert "kvstore.v1.KVStore" in names


async def _call_once(channel: grpc.aio.Channel, rpc: str, raw: bytes) -> bytes:
    """Send `raw` as the request of `rpc`; its first reply."""
    if rpc.endswith("Check"):
        return await channel.unary_unary(f"/{rpc}")(raw, timeout=5)
    if rpc.endswith("Watch"):  # streams until cancelled
        watch = channel.unary_stream(f"/{rpc}")(raw, timeout=5)
        try:
            return await watch.read()
        finally:
            watch.cancel()
    call = channel.stream_stream(f"/{rpc}")(timeout=5)
    await call.write(raw)
    await call.done_writing()
    return await call.read()
