"""Plain grpcio moving raw-bytes messages: the ceiling for Python gRPC on this machine.

A server with identity (de)serializers, no protobuf. `Get` streams messages
`first..first+count-1` of a set of `total` messages of `size` bytes; `Put` accepts a
stream and returns the byte count; `Call` is a unary call that answers any request with
8 bytes, and `Chat` does the same for each message on one open stream; `Cpu` answers
the server process's CPU time. The throughput and lookup benchmarks measure kvstore
against it in the same run.

Both sides move distinct buffers, as many bytes as the run moves, made before the clock
starts: kvstore moves that much distinct data too, and re-sending one cache-hot buffer
flatters plain grpcio (by 15-20 % in an ad-hoc run on this machine).

`PutCopy` and `GetCopy` add exactly the per-byte work kvstore's design asks of each
side, and nothing else: the server copies each message into, or out of, one
preallocated buffer (the arena), and the client copies between messages and a tensor it
owns, with one xxh3-64 pass over each message at the end that checks it (the server on
puts, the client on gets). Measured with `with_copies=True`, that is the most any
kvstore-like store can reach through Python gRPC here.
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import time
from collections.abc import AsyncIterator

import grpc
import numpy as np
import torch
import xxhash
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kvstore.allocator import tune_allocator
from kvstore.bench.cost import Round, timed_phase

MAX_MESSAGE_BYTES = 64 << 20
OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


def _identity(data: bytes) -> bytes:
    return data


# The copy variants frame each payload the way kvstore does: a few header bytes first.
_HEADER = bytes(32)
_PUT_ARENA_BYTES = 256 << 20  # past any cache: as costly to write as a larger arena


def distinct_messages(size: int, count: int) -> list[bytes]:
    """`count` random messages of `size` bytes, each its own buffer."""
    rng = np.random.default_rng(count)
    return [rng.bytes(size) for _ in range(count)]


class _Arena:
    """One preallocated buffer that the copy variants write into and read out of."""

    def __init__(self) -> None:
        self._tensor = torch.empty(0, dtype=torch.uint8)

    def view(self, nbytes: int) -> memoryview:
        if self._tensor.numel() < nbytes:  # filled, so its pages are in memory from here on
            self._tensor = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
        return self._tensor.numpy().data


async def _serve(port: int) -> None:
    server = grpc.aio.server(options=OPTIONS)
    payloads: dict[tuple[int, int], list[bytes]] = {}
    arena = _Arena()

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

    async def cpu(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return struct.pack("<d", time.process_time())

    async def chat(requests: object, context: grpc.aio.ServicerContext) -> None:
        while (request := await context.read()) is not grpc.aio.EOF:
            await context.write(struct.pack("<Q", len(request)))

    async def get_copy(request: bytes, context: grpc.aio.ServicerContext) -> object:
        size, total, first, count = struct.unpack("<QQQQ", request)
        view = arena.view(size * total)
        for index in range(first, first + count):
            yield b"".join((_HEADER, view[index * size : (index + 1) * size]))

    async def put_copy(requests: object, context: grpc.aio.ServicerContext) -> bytes:
        total = 0
        view = arena.view(_PUT_ARENA_BYTES)
        async for message in requests:  # type: ignore[attr-defined]
            payload = memoryview(message)[len(_HEADER) :]
            start = total % (_PUT_ARENA_BYTES - len(payload) + 1)
            view[start : start + len(payload)] = payload
            xxhash.xxh3_64_intdigest(payload)
            total += len(payload)
        return struct.pack("<Q", total)

    handler = grpc.method_handlers_generic_handler(
        "ceiling.Raw",
        {
            "Call": grpc.unary_unary_rpc_method_handler(call, _identity, _identity),
            "Cpu": grpc.unary_unary_rpc_method_handler(cpu, _identity, _identity),
            "Chat": grpc.stream_stream_rpc_method_handler(chat, _identity, _identity),
            "Get": grpc.unary_stream_rpc_method_handler(get, _identity, _identity),
            "Put": grpc.stream_unary_rpc_method_handler(put, _identity, _identity),
            "GetCopy": grpc.unary_stream_rpc_method_handler(get_copy, _identity, _identity),
            "PutCopy": grpc.stream_unary_rpc_method_handler(put_copy, _identity, _identity),
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
    target: str,
    total_bytes: int,
    message_bytes: int,
    streams: int = 1,
    *,
    with_copies: bool = False,
) -> Round:
    """A put then a get of `total_bytes` in messages of `message_bytes`, split over
    `streams` concurrent streams on one channel; `with_copies` adds kvstore's copies
    and checksums (see the module docstring)."""
    count = max(1, total_bytes // message_bytes)
    shares = _split(count, streams)
    suffix = "Copy" if with_copies else ""
    async with grpc.aio.insecure_channel(target, options=OPTIONS) as channel:
        get = channel.unary_stream(f"/ceiling.Raw/Get{suffix}", _identity, _identity)
        put = channel.stream_unary(f"/ceiling.Raw/Put{suffix}", _identity, _identity)
        cpu = channel.unary_unary("/ceiling.Raw/Cpu", _identity, _identity)
        if with_copies:
            source_view, dest_view = _caller_tensors(count * message_bytes)
        else:
            payloads = distinct_messages(message_bytes, count)

        async def server_cpu() -> float:
            (seconds,) = struct.unpack("<d", await cpu(b""))
            return float(seconds)

        async def messages(first: int, end: int) -> AsyncIterator[bytes]:
            for index in range(first, end):
                if not with_copies:
                    yield payloads[index]
                    continue
                part = source_view[index * message_bytes : (index + 1) * message_bytes]
                xxhash.xxh3_64_intdigest(part)  # the checksum the message carries
                yield b"".join((_HEADER, part))

        async def put_share(first: int, end: int) -> None:
            await put(messages(first, end))

        async def get_share(first: int, end: int) -> int:
            received = 0
            index = first
            async for message in get(
                struct.pack("<QQQQ", message_bytes, count, first, end - first)
            ):
                if with_copies:
                    payload = memoryview(message)[len(_HEADER) :]
                    xxhash.xxh3_64_intdigest(payload)
                    start = index * message_bytes
                    dest_view[start : start + len(payload)] = payload
                    index += 1
                    received += len(payload)
                else:
                    received += len(message)
            return received

        received = 0

        async def put_all() -> None:
            await asyncio.gather(*(put_share(first, end) for first, end in shares))

        async def get_all() -> None:
            nonlocal received
            received = sum(await asyncio.gather(*(get_share(first, end) for first, end in shares)))

        priming = get(struct.pack("<QQQQ", message_bytes, count, 0, 1))
        await priming.read()  # the server has made its set of messages
        priming.cancel()
        moved = count * message_bytes
        put_phase = await timed_phase(moved, server_cpu, put_all)
        get_phase = await timed_phase(moved, server_cpu, get_all)
    if received != moved:
        raise RuntimeError(f"plain grpcio returned {received} of {moved} bytes")
    return Round(put=put_phase, get=get_phase)


_CALLER_TENSORS: dict[int, tuple[memoryview, memoryview]] = {}


def _caller_tensors(nbytes: int) -> tuple[memoryview, memoryview]:
    """The caller's tensors, as views: the source of puts and the destination of gets.

    Kept from round to round, as a serving worker keeps its KV buffers, and touched
    before the clock starts, so no round pays for first-touch page faults.
    """
    if nbytes not in _CALLER_TENSORS:
        _CALLER_TENSORS.clear()
        source = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
        dest = torch.zeros(nbytes, dtype=torch.uint8)
        _CALLER_TENSORS[nbytes] = (source.numpy().data, dest.numpy().data)
    return _CALLER_TENSORS[nbytes]


def _split(count: int, parts: int) -> list[tuple[int, int]]:
    """`range(count)` cut into at most `parts` consecutive (first, end) pieces."""
    step = -(-count // max(1, parts))
    return [(first, min(count, first + step)) for first in range(0, count, step)]


def unary_call(channel: grpc.aio.Channel) -> grpc.aio.UnaryUnaryMultiCallable:
    """The ceiling server's `Call` on `channel`: raw bytes in, 8 bytes out."""
    return channel.unary_unary("/ceiling.Raw/Call", _identity, _identity)


class StreamCall:
    """The ceiling server's `Chat`: one open stream, a raw message out, 8 bytes back."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._call = channel.stream_stream("/ceiling.Raw/Chat", _identity, _identity)()

    async def __call__(self, request: bytes) -> bytes:
        await self._call.write(request)
        reply = await self._call.read()
        assert isinstance(reply, bytes)
        return reply

    def close(self) -> None:
        self._call.cancel()


def main() -> None:
    tune_allocator()  # the same treatment the kvstore server gives itself
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(_serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
