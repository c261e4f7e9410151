"""Puts sent as raw messages, on gRPC or the data plane, for tests of what the server
does with a put that kvstore's own client would not send."""

from __future__ import annotations

import asyncio
import struct

import grpc
import xxhash
from raw_data_plane import Raw, frame  # tests/raw_data_plane.py

from kvstore.checksum import ChecksumKind
from kvstore.layout import Namespace
from kvstore.server import RunningServer
from kvstore.wire.chunks import encode_put_header
from kvstore.wire.frames import FrameKind
from kvstore.wire.namespace import namespace_to_wire


def opening(namespace: Namespace, keys: list[bytes]) -> bytes:
    return encode_put_header(
        namespace=namespace_to_wire(namespace).SerializeToString(),
        checksum_kind=ChecksumKind.XXH3_64.value,
        blocks=[(key, keys[index - 1] if index else b"") for index, key in enumerate(keys)],
    )


def checksum(data: bytes) -> int:
    return xxhash.xxh3_64_intdigest(data)


async def raw_put(
    running: RunningServer, messages: list[bytes], data_plane: bool
) -> tuple[int, str]:
    """Send a put's raw messages; the status code and message the server answers."""
    if data_plane:
        raw = await Raw.open(running)
        try:
            await raw.send(b"".join(frame(FrameKind.PUT, message) for message in messages))
            await raw.send(frame(FrameKind.PUT_END))
            kind, payload = await raw.read_frame()
            if kind == FrameKind.PUT_DONE:
                return 0, ""
            assert kind == FrameKind.ERROR, (kind, payload[:100])
            (code,) = struct.unpack_from("<I", payload)
            return code, payload[4:].decode()
        finally:
            raw.close()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        call = channel.stream_unary("/kvstore.v1.KVStore/PutBlocks")(timeout=30)
        try:
            for message in messages:
                if call.done():  # answered already: a write now would race the status
                    break
                await call.write(message)
            else:
                await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            # A write to a call the server has ended fails with INTERNAL ("Internal error
            # from Core", grpc issue 36066) or InvalidStateError; the call's own status
            # is the server's answer. grpc.aio can overwrite that status with its own
            # INTERNAL: the server reads a refused put on briefly so that it does not.
            pass
        try:
            await call
        except grpc.aio.AioRpcError as error:
            return error.code().value[0], error.details() or ""
        return 0, ""
