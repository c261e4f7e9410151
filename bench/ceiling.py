"""Plain grpcio moving raw-bytes messages: the ceiling for Python gRPC on this machine.

A server with identity (de)serializers, no protobuf. `Get` streams messages
`first..first+count-1` of a set of `total` messages of `size` bytes; `Put` accepts a
stream and returns the byte count; `Call` is a unary call that answers any request with
8 bytes. The throughput and lookup benchmarks measure kvstore against it in the same run.

Both sides move distinct buffers, as many bytes as the run moves, made before the clock
starts: kvstore moves that much distinct data too, and re-sending one cache-hot buffer
flatters plain grpcio (by 15-20 % in an ad-hoc run on this machine).
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import time
from collections.abc import AsyncIterator

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kvstore.allocator import tune_allocator

MAX_MESSAGE_BYTES = 64 << 20
OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


def _identity(data: bytes) -> bytes:
    return data


def distinct_messages(size: int, count: int) -> list[bytes]:
    """`count` random messages of `size` bytes, each its own buffer."""
    rng = np.random.default_rng(count)
    return [rng.bytes(size) for _ in range(count)]


async def _serve(port: int) -> None:
    server = grpc.aio.server(options=OPTIONS)
    payloads: dict[tuple[int, int], list[bytes]] = {}

    async def get(request: bytes, context: grpc.aio.ServicerContext) -> object:
        size, total, first, count = struct.unpack("<QQQQ", request)
        if (size, total) not in payloads:
            payloads.clear()  # keep one set: they are as large as a whole run
            payloads[size, total] = distinct_messages(size, total)
        for payload in payloads[size, total][first : first + count]:
            yield payload

    async def put(requests: object, context: grpc.aio.ServicerContext) -> bytes:
        total = 0
        async for message in requests:  # type: ignore[attr-defined]
            total += len(message)
        return struct.pack("<Q", total)

    async def call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return struct.pack("<Q", len(request))

    handler = grpc.method_handlers_generic_handler(
        "ceiling.Raw",
        {
            "Call": grpc.unary_unary_rpc_method_handler(call, _identity, _identity),
            "Get": grpc.unary_stream_rpc_method_handler(get, _identity, _identity),
            "Put": grpc.stream_unary_rpc_method_handler(put, _identity, _identity),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await server.wait_for_termination()


async def measure_ceiling(
    target: str, total_bytes: int, message_bytes: int, streams: int = 1
) -> tuple[float, float]:
    """(put GB/s, get GB/s) moving `total_bytes` in messages of `message_bytes`, split
    over `streams` concurrent streams on one channel."""
    count = max(1, total_bytes // message_bytes)
    shares = _split(count, streams)
    async with grpc.aio.insecure_channel(target, options=OPTIONS) as channel:
        get = channel.unary_stream("/ceiling.Raw/Get", _identity, _identity)
        put = channel.stream_unary("/ceiling.Raw/Put", _identity, _identity)
        payloads = distinct_messages(message_bytes, count)

        async def put_share(first: int, end: int) -> None:
            async def messages() -> AsyncIterator[bytes]:
                for payload in payloads[first:end]:
                    yield payload

            await put(messages())

        async def get_share(first: int, end: int) -> int:
            received = 0
            async for message in get(
                struct.pack("<QQQQ", message_bytes, count, first, end - first)
            ):
                received += len(message)
            return received

        priming = get(struct.pack("<QQQQ", message_bytes, count, 0, 1))
        await priming.read()  # the server has made its set of messages
        priming.cancel()
        start = time.perf_counter()
        await asyncio.gather(*(put_share(first, end) for first, end in shares))
        put_s = time.perf_counter() - start
        start = time.perf_counter()
        received = sum(await asyncio.gather(*(get_share(first, end) for first, end in shares)))
        get_s = time.perf_counter() - start
    moved = count * message_bytes
    return moved / put_s / 1e9, received / get_s / 1e9


def _split(count: int, parts: int) -> list[tuple[int, int]]:
    """`range(count)` cut into at most `parts` consecutive (first, end) pieces."""
    step = -(-count // max(1, parts))
    return [(first, min(count, first + step)) for first in range(0, count, step)]


def unary_call(channel: grpc.aio.Channel) -> grpc.aio.UnaryUnaryMultiCallable:
    """The ceiling server's `Call` on `channel`: raw bytes in, 8 bytes out."""
    return channel.unary_unary("/ceiling.Raw/Call", _identity, _identity)


def main() -> None:
    tune_allocator()  # the same treatment the kvstore server gives itself
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(_serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
