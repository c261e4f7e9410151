"""Running one fuzz case against the real server, and judging what came back.

Every status must be one a person can act on: INTERNAL and UNKNOWN never are, and a
case that was not cut short must get an answer before its bound (a hang is a bug
too). Replies must decode, and protobuf must read an acknowledged put as the server
did. Every put's namespace and keys are returned, so that the batch can delete what
it stored (a put that fails keeps the blocks it committed).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass, field

import grpc
from fuzz_cases import STALL_DEADLINE_S, DataPlaneCase, Ending, GrpcCase
from fuzz_corpus import GET_FLOOR_BYTES
from google.protobuf.message import DecodeError

from kvstore.v1 import kvstore_pb2 as pb
from kvstore.wire.chunks import GetMessage, decode_get_message, decode_put_message
from kvstore.wire.errors import WireError
from kvstore.wire.frames import HELLO_PAYLOAD, FrameKind

Code = grpc.StatusCode
# A case that is not cut short must be answered well within this.
ANSWER_BOUND_S = 10.0
ANSWERS = {Code.OK, Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED, Code.DATA_LOSS}
# What grpc.aio's client makes of a call whose write failed because the server had
# already answered: the server's status is lost (issue 14, item 7; grpc issue 36066).
# The server reads a refused put on briefly (REFUSED_PUT_READ_ON_S) so that this is
# rare, but a fuzzed stream may still be writing after that. The server's side
# is still judged: every INTERNAL it answers is logged, and the session fails on that.
LOST_STATUS = (Code.INTERNAL, "Internal error from Core")
_CODES_BY_NUMBER = {code.value[0]: code for code in Code}
# A get's messages beyond one per GET_FLOOR_BYTES of layer data: runs are whole layers,
# layer by layer, so each layer (2 in the fuzz layouts) may end on a short message,
# and a change of checksum kind starts a new one.
GET_EXTRA_MESSAGES = 4


@dataclass(frozen=True)
class StoredPut:
    """The namespace and declared keys of a put that may have stored blocks (a put that
    fails keeps the blocks it committed), for the batch to delete."""

    namespace: pb.Namespace
    keys: list[bytes]


@dataclass
class Observation:
    codes: list[Code] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    puts: list[StoredPut] = field(default_factory=list)
    details: list[str] = field(default_factory=list)  # the messages of the statuses
    num_lost_statuses: int = 0

    def check_get_messages(self, num_messages: int, data_bytes: int, where: str) -> None:
        """However small a max_chunk_bytes it asked for, a get is not cut finer than
        the server's floor of layer data per message."""
        bound = -(-data_bytes // GET_FLOOR_BYTES) + GET_EXTRA_MESSAGES
        if num_messages > bound:
            self.problems.append(
                f"{where}: {num_messages} messages for {data_bytes} bytes of layer data, "
                f"more than {bound} (one per {GET_FLOOR_BYTES} B, the server's floor)"
            )

    def expect(self, code: Code, allowed: set[Code], where: str, details: str = "") -> None:
        self.codes.append(code)
        self.details.append(details)
        if code not in allowed:
            names = sorted(allowed_code.name for allowed_code in allowed)
            self.problems.append(
                f"{where}: status {code.name} ({details!r}), expected one of {names}"
            )


def put_keys(messages: list[bytes]) -> StoredPut | None:
    """A put's namespace and keys as the server reads them (kvstore.wire.chunks), up to
    the first message it cannot read; None if no namespace could be read."""
    namespace: pb.Namespace | None = None
    keys: list[bytes] = []
    for number, raw in enumerate(messages):
        try:
            message = decode_put_message(raw)
        except WireError:
            break
        if number == 0:
            if message.namespace is None:
                return None
            try:
                namespace = pb.Namespace.FromString(message.namespace)
            except DecodeError:
                return None
        # Keys the server refuses at declaration never stored anything.
        keys += [header.key for header in message.blocks if 1 <= len(header.key) <= 64]
    return StoredPut(namespace, keys) if namespace is not None else None


def accepted_put(messages: list[bytes], reply: bytes, seen: Observation) -> None:
    """Check a put the server acknowledged: protobuf reads it as the server did, and the
    reply has one known outcome per declared block."""
    ours = put_keys(messages)
    try:
        theirs = [pb.PutBlocksRequest.FromString(raw) for raw in messages]
    except DecodeError as error:
        seen.problems.append(f"the server acknowledged a put that protobuf rejects: {error}")
        return
    keys = [header.key for message in theirs for header in message.blocks]
    if ours is None or (ours.namespace, len(ours.keys)) != (theirs[0].namespace, len(keys)):
        seen.problems.append(
            f"the server and protobuf read this put differently: {ours} against "
            f"{theirs[0].namespace} and keys {keys}"
        )
        return
    _check_put_reply(pb.PutBlocksResponse.FromString(reply), ours, seen)


def _check_put_reply(reply: pb.PutBlocksResponse, put: StoredPut, seen: Observation) -> None:
    committed = sum(outcome == pb.COMMITTED for outcome in reply.outcomes)
    if len(reply.outcomes) != len(put.keys) or reply.num_committed != committed:
        seen.problems.append(
            f"put reply of {len(reply.outcomes)} outcomes ({reply.num_committed} committed, "
            f"{committed} COMMITTED) for {len(put.keys)} declared blocks"
        )
    if any(
        outcome not in (pb.COMMITTED, pb.ALREADY_PRESENT, pb.PARENT_MISSING)
        for outcome in reply.outcomes
    ):
        seen.problems.append(f"put reply with an unknown outcome: {list(reply.outcomes)}")


class GrpcRunner:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel

    async def run(self, case: GrpcCase) -> Observation:
        seen = Observation()
        allowed = set(ANSWERS)
        timeout = ANSWER_BOUND_S
        if case.ending is Ending.ABANDON:
            allowed.add(Code.CANCELLED)
        elif case.ending is Ending.STALL:
            allowed.add(Code.DEADLINE_EXCEEDED)
            if case.rpc == "PutBlocks":
                # No deadline: the server's idle limit must cut it (ANSWER_BOUND_S only
                # keeps a hang from hanging the test; its status names no server limit).
                allowed.discard(Code.OK)
            else:  # a lookup stream holds nothing, and the server lets it wait
                timeout = STALL_DEADLINE_S
        if case.rpc.startswith("Health/"):
            await self._health(case, seen)
        elif case.rpc == "PutBlocks":
            await self._put(case, seen, allowed, timeout)
        elif case.rpc == "LookupPrefixStream":
            await self._lookup_stream(case, seen, allowed, timeout)
        elif case.rpc == "GetBlocks":
            await self._get(case, seen, allowed)
        else:
            call = self._channel.unary_unary(f"/kvstore.v1.KVStore/{case.rpc}")
            try:
                await call(case.messages[0], timeout=timeout)
                code, details = Code.OK, ""
            except grpc.aio.AioRpcError as error:
                code, details = error.code(), error.details() or ""
            seen.expect(code, allowed, case.rpc, details)
        return seen

    async def _get(self, case: GrpcCase, seen: Observation, allowed: set[Code]) -> None:
        call = self._channel.unary_stream("/kvstore.v1.KVStore/GetBlocks")(
            case.messages[0], timeout=ANSWER_BOUND_S
        )
        num_messages = data_bytes = 0
        with contextlib.suppress(grpc.aio.AioRpcError):
            async for reply in call:
                num_messages += 1
                try:
                    data_bytes += _data_bytes(decode_get_message(reply))
                except WireError as error:
                    seen.problems.append(f"a GetBlocksResponse does not decode: {error}")
        seen.expect(await call.code(), allowed, "GetBlocks", await call.details())
        seen.check_get_messages(num_messages, data_bytes, "GetBlocks")

    async def _put(
        self, case: GrpcCase, seen: Observation, allowed: set[Code], timeout_s: float
    ) -> None:
        call = self._channel.stream_unary("/kvstore.v1.KVStore/PutBlocks")(timeout=timeout_s)
        if (put := put_keys(case.messages)) is not None:
            seen.puts.append(put)
        complete = case.ending is Ending.COMPLETE
        messages = case.messages if complete else case.messages[: case.num_sent]
        # A write fails once the server has answered (an error): its status is the call's.
        write_failed = False
        try:
            for message in messages:
                await call.write(message)
            if complete:
                await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            write_failed = True
        if case.ending is Ending.ABANDON:
            call.cancel()
        code = await _final_code(call, write_failed, seen)
        if code is None:
            return
        details = await call.details() or ""
        seen.expect(code, allowed, "PutBlocks", details)
        stall_cut = case.ending is Ending.STALL and code is Code.DEADLINE_EXCEEDED
        if stall_cut and "limits.stream_idle_timeout_s" not in details:
            seen.problems.append(
                f"a stalled put was not cut by the server's idle limit: {details!r}"
            )
        if code is Code.OK:
            accepted_put(case.messages, await call, seen)

    async def _lookup_stream(
        self, case: GrpcCase, seen: Observation, allowed: set[Code], timeout_s: float
    ) -> None:
        call = self._channel.stream_stream("/kvstore.v1.KVStore/LookupPrefixStream")(
            timeout=timeout_s
        )
        complete = case.ending is Ending.COMPLETE
        messages = case.messages if complete else case.messages[: case.num_sent]
        write_failed = False
        try:
            for message in messages:
                await call.write(message)
                raw = await call.read()
                if raw is grpc.aio.EOF:
                    seen.problems.append("the lookup stream ended before its result")
                    break
                result = pb.LookupPrefixResult.FromString(raw)
                result_code = _CODES_BY_NUMBER.get(result.code, Code.UNKNOWN)
                seen.expect(result_code, ANSWERS, "LookupPrefixStream result", result.message)
                if result_code is not Code.OK and not result.message:
                    seen.problems.append("a failed lookup result says nothing of why")
            if complete:
                await call.done_writing()
                if await call.read() is not grpc.aio.EOF:
                    seen.problems.append("the lookup stream sent a result nobody asked for")
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            write_failed = True
        if case.ending is Ending.ABANDON:
            call.cancel()
        code = await _final_code(call, write_failed, seen)
        if code is not None:
            seen.expect(code, allowed, "LookupPrefixStream", await call.details())

    async def _health(self, case: GrpcCase, seen: Observation) -> None:
        # A request left whole parses: only a mutated one may be INVALID_ARGUMENT.
        allowed = {Code.OK, Code.NOT_FOUND}
        if case.mutations:
            allowed.add(Code.INVALID_ARGUMENT)
        path = f"/grpc.health.v1.{case.rpc}"
        if case.rpc == "Health/Check":
            try:
                await self._channel.unary_unary(path)(case.messages[0], timeout=ANSWER_BOUND_S)
                code, details = Code.OK, ""
            except grpc.aio.AioRpcError as error:
                code, details = error.code(), error.details() or ""
        else:
            # Watch streams until cancelled: read its first answer, then hang up.
            call = self._channel.unary_stream(path)(case.messages[0], timeout=ANSWER_BOUND_S)
            with contextlib.suppress(grpc.aio.AioRpcError):
                await call.read()
            call.cancel()
            code, details = await call.code(), await call.details() or ""
            allowed.add(Code.CANCELLED)
        seen.expect(code, allowed, case.rpc, details)
        if code is Code.INVALID_ARGUMENT and "malformed request" not in details:
            seen.problems.append(f"{case.rpc}: INVALID_ARGUMENT that says nothing of why")


async def _final_code(
    call: grpc.aio.StreamUnaryCall | grpc.aio.StreamStreamCall,
    write_failed: bool,
    seen: Observation,
) -> Code | None:
    """The call's status; None when grpc.aio lost it to a failed write (counted)."""
    code = await call.code()
    if write_failed and (code, await call.details()) == LOST_STATUS:
        seen.num_lost_statuses += 1
        return None
    return code


class DataPlaneRunner:
    def __init__(self, port: int) -> None:
        self._port = port

    async def run(self, case: DataPlaneCase) -> Observation:
        seen = Observation()
        for messages in _sent_put_transfers(case.stream, ended_only=False):
            if (put := put_keys(messages)) is not None:
                seen.puts.append(put)
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, ("127.0.0.1", self._port))
            if case.ending is Ending.COMPLETE:
                await _send(loop, sock, case.stream)
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_WR)
                received = await _read_until_closed(loop, sock, ANSWER_BOUND_S)
                if received is None:
                    seen.problems.append(f"no answer and no close within {ANSWER_BOUND_S} s")
                else:
                    _judge_frames(case, received, seen)
            elif case.ending is Ending.ABANDON:
                await _send(loop, sock, case.stream[: case.num_sent])
                if case.reset:  # close with a reset (SO_LINGER 0) rather than a FIN
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:  # a slow sender: its DEADLINE, or the server's limit, ends it with ERROR
                await _send(loop, sock, case.stream[: case.num_sent])
                received = await _read_until_closed(loop, sock, ANSWER_BOUND_S)
                if received is None:
                    seen.problems.append(f"a stalled transfer not ended within {ANSWER_BOUND_S} s")
                else:
                    _judge_frames(case, received, seen)
                    cut = Code.DEADLINE_EXCEEDED in seen.codes
                    if not cut or not any(case.cut_by in text for text in seen.details):
                        seen.problems.append(
                            f"a stalled transfer ended with {seen.codes} {seen.details}, not "
                            f"DEADLINE_EXCEEDED naming {case.cut_by!r}"
                        )
        finally:
            sock.close()
        return seen


async def _send(loop: asyncio.AbstractEventLoop, sock: socket.socket, data: bytes) -> None:
    """Send what the server will take: after an ERROR it stops reading and hangs up."""
    with contextlib.suppress(OSError):
        await loop.sock_sendall(sock, data)


async def _read_until_closed(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, bound_s: float
) -> bytes | None:
    """Everything the server sends until it closes; None if it has not within `bound_s`."""
    received = bytearray()
    try:
        async with asyncio.timeout(bound_s):
            while chunk := await loop.sock_recv(sock, 1 << 20):
                received += chunk
    except TimeoutError:
        return None
    except OSError:  # a reset after the server's last frame
        pass
    return bytes(received)


def _data_bytes(message: GetMessage) -> int:
    return sum(len(chunk.data) for chunk in message.chunks) + sum(
        len(run.data) for run in message.runs
    )


def _sent_put_transfers(stream: bytes, *, ended_only: bool) -> list[list[bytes]]:
    """The PUT payloads of each put transfer in `stream`, read as the server reads it,
    up to the first frame that would end the connection; with `ended_only`, only the
    puts whose PUT_END was sent."""
    frames, position = [], 0
    while position + 5 <= len(stream):
        kind, length = struct.unpack_from("<BI", stream, position)
        if length > len(stream) - position - 5:
            break
        frames.append((kind, stream[position + 5 : position + 5 + length]))
        position += 5 + length
    puts: list[list[bytes]] = []
    current: list[bytes] | None = None
    for kind, payload in frames[1:]:  # after HELLO
        if current is not None:
            if kind == FrameKind.PUT:
                current.append(payload)
                continue
            if kind != FrameKind.PUT_END:
                break
            puts.append(current)
            current = None
        elif kind == FrameKind.PUT:
            current = [payload]
        elif kind not in (FrameKind.DEADLINE, FrameKind.GET, FrameKind.LOOKUP):
            break
    if current is not None and not ended_only:
        puts.append(current)
    return puts


def _judge_frames(case: DataPlaneCase, received: bytes, seen: Observation) -> None:
    # A DEADLINE frame may ask for 0 or 1 ms: DEADLINE_EXCEEDED is a fair answer.
    allowed = (ANSWERS - {Code.OK}) | {Code.DEADLINE_EXCEEDED}
    puts = _sent_put_transfers(case.stream, ended_only=True)
    num_done, position, ended = 0, 0, False
    num_messages = data_bytes = 0  # of the get in progress
    while position < len(received):
        if ended:
            seen.problems.append("frames after an ERROR frame")
            return
        if position + 5 > len(received):
            seen.problems.append(f"a frame header cut short: {received[position:].hex()}")
            return
        kind, length = struct.unpack_from("<BI", received, position)
        payload = received[position + 5 : position + 5 + length]
        if len(payload) < length:
            if kind != FrameKind.GET_DATA:  # a deadline may cut a get mid-frame, nothing else
                seen.problems.append(f"a kind-{kind} frame cut short")
            return
        position += 5 + length
        if kind == FrameKind.ERROR:
            ended = True
            if len(payload) < 4 or not payload[4:]:
                seen.problems.append(f"an ERROR frame without code or message: {payload.hex()}")
                continue
            (number,) = struct.unpack_from("<I", payload)
            code = _CODES_BY_NUMBER.get(number, Code.UNKNOWN)
            seen.expect(code, allowed, "ERROR frame", bytes(payload[4:]).decode(errors="replace"))
        elif kind == FrameKind.HELLO:
            if position != 5 + length or payload != HELLO_PAYLOAD:
                seen.problems.append(f"an unexpected HELLO: {payload.hex()}")
        elif kind == FrameKind.GET_DATA:
            num_messages += 1
            try:
                data_bytes += _data_bytes(decode_get_message(payload))
            except WireError as error:
                seen.problems.append(f"a GET_DATA payload does not decode: {error}")
        elif kind == FrameKind.PUT_DONE:
            seen.codes.append(Code.OK)
            if num_done >= len(puts):
                seen.problems.append("a PUT_DONE for a put that was never ended")
                continue
            accepted_put(puts[num_done], payload, seen)
            num_done += 1
        elif kind == FrameKind.LOOKUP_RESULT:
            seen.codes.append(Code.OK)
            try:
                pb.LookupPrefixResponse.FromString(payload)
            except DecodeError as error:
                seen.problems.append(f"a LOOKUP_RESULT payload does not parse: {error}")
        elif kind == FrameKind.GET_END:
            seen.codes.append(Code.OK)
            seen.check_get_messages(num_messages, data_bytes, "a data-plane get")
            num_messages = data_bytes = 0
        else:
            seen.problems.append(f"a frame of kind {kind}, which servers never send")
