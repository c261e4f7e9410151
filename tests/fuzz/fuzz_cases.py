"""Fuzz cases: what one case sends, on which transport, and how it ends.

Case `index` of seed `seed` is a pure function of the two (its own random.Random), so
any case can be rebuilt alone from the numbers a failure prints.
"""

from __future__ import annotations

import enum
import random
import struct
from dataclasses import dataclass, field

from fuzz_corpus import get_request, health_request, unary_request
from fuzz_puts import put_stream
from fuzz_wire import mutate

from kvstore.wire.frames import HELLO_PAYLOAD, MAGIC, FrameKind

KV_RPCS = ("LookupPrefix", "GetBlocks", "Pin", "Unpin", "Delete", "Stats", "GetDataPlane")
STREAM_RPCS = ("LookupPrefixStream", "PutBlocks")
HEALTH_RPCS = ("Health/Check", "Health/Watch")
_RPC_WEIGHTS = {
    "LookupPrefix": 2.0,
    "GetBlocks": 2.0,
    "Pin": 1.0,
    "Unpin": 0.7,
    "Delete": 0.7,
    "Stats": 0.3,
    "GetDataPlane": 0.3,
    "LookupPrefixStream": 1.5,
    "PutBlocks": 3.5,
    "Health/Check": 0.3,
    "Health/Watch": 0.2,
}
# The deadline of a slow sender that sends one (a lookup stream's, or a data-plane
# DEADLINE frame's). Without one, the server's own limits end a stalled put or get
# (conftest.FUZZ_SERVER): limits.stream_idle_timeout_s while it waits for the next
# message or frame, limits.frame_timeout_s for a data-plane frame cut short.
STALL_DEADLINE_S = 0.15


class Ending(enum.Enum):
    COMPLETE = "complete"  # everything sent, the stream half-closed, the answer read
    ABANDON = "abandon"  # part sent, then the call cancelled or the socket closed
    STALL = "stall"  # part sent, then silence until a deadline or the server's limit ends it


def case_rng(seed: int, index: int) -> random.Random:
    return random.Random(f"kvstore-fuzz:{seed}:{index}")


@dataclass
class GrpcCase:
    seed: int
    index: int
    rpc: str
    messages: list[bytes]
    ending: Ending = Ending.COMPLETE
    num_sent: int = 0  # messages sent before an ABANDON or a STALL
    mutations: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return (
            f"seed {self.seed} case {self.index}: gRPC {self.rpc}, {self.ending.value}"
            f"{f' after {self.num_sent} messages' if self.ending is not Ending.COMPLETE else ''}"
            f", mutations {self.mutations or 'none'}; messages: "
            f"{[message.hex() for message in self.messages]}"
        )


@dataclass
class DataPlaneCase:
    seed: int
    index: int
    stream: bytes  # every byte sent, HELLO included
    ending: Ending = Ending.COMPLETE
    num_sent: int = 0  # bytes sent before an ABANDON or a STALL
    reset: bool = False  # abandon with a TCP reset rather than a FIN
    # What a STALL's DEADLINE_EXCEEDED must name: the deadline or the server's limit.
    cut_by: str = ""
    mutations: list[str] = field(default_factory=list)

    def describe(self) -> str:
        sent = len(self.stream) if self.ending is Ending.COMPLETE else self.num_sent
        return (
            f"seed {self.seed} case {self.index}: data plane, {self.ending.value} after "
            f"{sent} of {len(self.stream)} bytes{' (reset)' if self.reset else ''}, "
            f"mutations {self.mutations or 'none'}; bytes: {self.stream.hex()}"
        )


Case = GrpcCase | DataPlaneCase


def grpc_case(seed: int, index: int) -> GrpcCase:
    rng = case_rng(seed, index)
    rpc = rng.choices(list(_RPC_WEIGHTS), list(_RPC_WEIGHTS.values()))[0]
    if rpc == "PutBlocks":
        messages = put_stream(rng)
    elif rpc == "LookupPrefixStream":
        messages = [unary_request(rng, "LookupPrefix") for _ in range(rng.randint(1, 4))]
    elif rpc in HEALTH_RPCS:
        messages = [health_request(rng)]
    else:
        messages = [unary_request(rng, rpc)]
    case = GrpcCase(seed, index, rpc, messages)
    if rng.random() < 0.7:
        _mutate_messages(rng, case.messages, case.mutations, streamed=rpc in STREAM_RPCS)
    if rpc in STREAM_RPCS:
        roll = rng.random()
        if roll < 0.08:
            case.ending, case.num_sent = Ending.ABANDON, rng.randint(0, len(case.messages))
        elif roll < 0.09:
            case.ending, case.num_sent = Ending.STALL, rng.randint(0, len(case.messages))
    return case


def _mutate_messages(
    rng: random.Random, messages: list[bytes], names: list[str], *, streamed: bool
) -> None:
    """Mutate one message's bytes, or (in a stream) the order and number of messages."""
    if streamed and messages and rng.random() < 0.25:
        action = rng.choice(("duplicate", "drop", "swap", "truncate"))
        at = rng.randrange(len(messages))
        if action == "duplicate":
            messages.insert(at, messages[at])
        elif action == "drop":
            del messages[at]
        elif action == "swap":
            other = rng.randrange(len(messages))
            messages[at], messages[other] = messages[other], messages[at]
        else:
            del messages[at:]
        names.append(f"stream:{action}@{at}")
        return
    if not messages:
        return
    at = rng.randrange(len(messages))
    messages[at], applied = mutate(rng, messages[at])
    names.extend(f"{name}@{at}" for name in applied)


# -- the data plane -----------------------------------------------------------------------------

_DEADLINE_PAYLOADS = (
    struct.pack("<I", 10_000),
    struct.pack("<I", 10_000),
    struct.pack("<I", 0),
    struct.pack("<I", 1),
    struct.pack("<I", 2**32 - 1),
    b"\x10\x27\x00",  # 3 bytes
    b"\x10\x27\x00\x00\x00",  # 5 bytes
)
_BAD_HELLOS = (
    MAGIC + struct.pack("<H", 1),
    MAGIC + struct.pack("<H", 3),
    MAGIC,
    b"KVDQ\x02\x00",
    HELLO_PAYLOAD + b"\x00",
)


def frame(kind: int, payload: bytes = b"") -> bytes:
    return struct.pack("<BI", kind, len(payload)) + payload


def data_plane_case(seed: int, index: int) -> DataPlaneCase:
    rng = case_rng(seed, index)
    frames: list[tuple[int, bytes]] = [(FrameKind.HELLO, HELLO_PAYLOAD)]
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        if rng.random() < 0.5:
            frames.append((FrameKind.DEADLINE, rng.choice(_DEADLINE_PAYLOADS)))
        roll = rng.random()
        if roll < 0.2:  # a lookup: answered at once, no transfer
            frames.append((FrameKind.LOOKUP, unary_request(rng, "LookupPrefix")))
        elif roll < 0.6:
            frames += [(FrameKind.PUT, message) for message in put_stream(rng)]
            frames.append((FrameKind.PUT_END, b""))
        else:
            frames.append((FrameKind.GET, get_request(rng)))
    names: list[str] = []
    if rng.random() < 0.5:  # a message's bytes
        carrying = [at for at, (kind, _) in enumerate(frames) if kind in (2, 5, 16)]
        if carrying:
            at = rng.choice(carrying)
            payload, applied = mutate(rng, frames[at][1])
            frames[at] = (frames[at][0], payload)
            names += [f"{name}@frame{at}" for name in applied]
    if rng.random() < 0.35:  # the frames themselves
        names.append(_mutate_frames(rng, frames))
    stream = b"".join(frame(kind, payload) for kind, payload in frames)
    if rng.random() < 0.15:  # the stream's bytes: headers that lie, cuts, flips
        stream, name = _mutate_stream(rng, stream)
        names.append(name)
    case = DataPlaneCase(seed, index, stream, mutations=names)
    roll = rng.random()
    if roll < 0.08:
        case.ending, case.num_sent = Ending.ABANDON, rng.randint(0, len(stream))
        case.reset = rng.random() < 0.5
    elif roll < 0.09:
        _make_slow_sender(rng, case)
    return case


def _mutate_frames(rng: random.Random, frames: list[tuple[int, bytes]]) -> str:
    action = rng.choice(("kind", "drop", "duplicate", "swap", "insert", "hello"))
    at = rng.randrange(len(frames))
    payload = frames[at][1]
    if action == "kind":
        frames[at] = (rng.choice((0, *range(1, 10), 10, 127, 255)), payload)
    elif action == "drop":
        del frames[at]
    elif action == "duplicate":
        frames.insert(at, frames[at])
    elif action == "swap":
        other = rng.randrange(len(frames))
        frames[at], frames[other] = frames[other], frames[at]
    elif action == "insert":
        frames.insert(at, (rng.randrange(256), rng.randbytes(rng.choice((0, 1, 4, 6, 64)))))
    else:
        frames[0] = (FrameKind.HELLO, rng.choice(_BAD_HELLOS))
    return f"frames:{action}@{at}"


def _mutate_stream(rng: random.Random, stream: bytes) -> tuple[bytes, str]:
    action = rng.choice(("length", "truncate", "flip"))
    if action == "truncate":
        at = rng.randrange(len(stream))
        return stream[:at], f"stream:truncate@{at}"
    if action == "flip":
        at = rng.randrange(len(stream))
        return stream[:at] + bytes([stream[at] ^ (1 << rng.randrange(8))]) + stream[at + 1 :], (
            f"stream:flip@{at}"
        )
    headers = _header_offsets(stream)
    at = rng.choice(headers)
    (length,) = struct.unpack_from("<I", stream, at + 1)
    lie = rng.choice(
        (length + 1, max(0, length - 1), length + 1000, (64 << 10) + 1, 2**31, 2**32 - 1)
    )
    return stream[: at + 1] + struct.pack("<I", lie) + stream[at + 5 :], f"stream:length@{at}"


def _header_offsets(stream: bytes) -> list[int]:
    offsets, position = [], 0
    while position + 5 <= len(stream):
        offsets.append(position)
        position += 5 + struct.unpack_from("<I", stream, position + 1)[0]
    return offsets or [0]


def _make_slow_sender(rng: random.Random, case: DataPlaneCase) -> None:
    """HELLO, maybe a short DEADLINE, then a PUT or GET frame cut short: the deadline,
    else the server's frame timeout, must end it with DEADLINE_EXCEEDED."""
    deadline_ms = round(STALL_DEADLINE_S * 1000)
    if rng.random() < 0.7:
        body = frame(FrameKind.PUT, (put_stream(rng) or [b""])[0])
    else:
        body = frame(FrameKind.GET, get_request(rng))
    cut = rng.randint(1, len(body) - 1)
    with_deadline = rng.random() < 0.5
    prefix = frame(FrameKind.HELLO, HELLO_PAYLOAD)
    if with_deadline:
        prefix += frame(FrameKind.DEADLINE, struct.pack("<I", deadline_ms))
    case.stream = prefix + body
    case.num_sent = len(prefix) + cut
    case.ending = Ending.STALL
    case.cut_by = "its deadline" if with_deadline else "limits.frame_timeout_s"
    case.mutations.append(f"slow-sender:{'deadline' if with_deadline else 'no-deadline'}")
