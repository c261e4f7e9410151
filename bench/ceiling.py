"""Plain grpcio moving raw-bytes messages: the ceiling for Python gRPC on this machine.

A server with identity (de)serializers, no protobuf: `Get` streams `count` messages of
`size` bytes, `Put` accepts a stream and returns the byte count, and `Call` is a unary
call that answers any request with 8 bytes. The throughput and lookup benchmarks
measure kvstore against it in the same run.

Both sides move distinct buffers, as many bytes as the run moves, made before the clock
starts: kvstore moves that much distinct data too, and re-sending one cache-hot buffer
flattered plain grpcio by 15-20 % on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import time

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
        size, count = struct.unpack("<QQ", request)
        if (size, count) not in payloads:
            payloads.clear()  # keep one set: they are as large as a whole run
            payloads[size, count] = distinct_messages(size, count)
        for payload in payloads[size, count]:
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


async def measure_ceiling(target: str, total_bytes: int, message_bytes: int) -> tuple[float, float]:
    """(put GB/s, get GB/s) moving `total_bytes` in messages of `message_bytes`."""
    count = max(1, total_bytes // message_bytes)
    async with grpc.aio.insecure_channel(target, options=OPTIONS) as channel:
        get = channel.unary_stream("/ceiling.Raw/Get", _identity, _identity)
        put = channel.stream_unary("/ceiling.Raw/Put", _identity, _identity)
        payloads = distinct_messages(message_bytes, count)

        async def messages() -> object:
            for payload in payloads:
                yield payload

        priming = get(struct.pack("<QQ", message_bytes, count))
        await priming.read()  # the server has made its set of messages
        priming.cancel()
        start = time.perf_counter()
        await put(messages())
        put_s = time.perf_counter() - start
        start = time.perf_counter()
        received = 0
        async for message in get(struct.pack("<QQ", message_bytes, count)):
            received += len(message)
        get_s = time.perf_counter() - start
    moved = count * message_bytes
    return moved / put_s / 1e9, received / get_s / 1e9


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
