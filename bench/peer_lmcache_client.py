"""The LMCache side of `kvstore-bench peers`: a client of LMCache's "lm server"
(`python -m lmcache.v1.server HOST PORT cpu`), run by a Python that has LMCache.

It is started as a script, not imported, so it needs LMCache and torch but not kvstore.
It reads commands from stdin, one per line, and answers each with a JSON line:

    round BLOCK_BYTES TOTAL_BYTES   put then get TOTAL_BYTES of BLOCK_BYTES blocks

The put sends every block (the lm server acknowledges no PUT), then asks whether the
last key EXISTs: the server handles a connection's requests in order, so its answer
means every block has been stored. The get asks for each block and receives it into a
preallocated tensor, as a serving worker would. The answer gives each phase's seconds,
this process's CPU seconds and the server's (from /proc, by the pid given at start).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable

import torch
from lmcache.utils import CacheEngineKey
from lmcache.v1.memory_management import MemoryFormat
from lmcache.v1.protocol import (
    ClientCommand,
    ClientMetaMessage,
    ServerMetaMessage,
    ServerReturnCode,
)

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime: all threads
    return ticks / _TICKS_PER_S


def receive_into(sock: socket.socket, view: memoryview) -> None:
    while view:
        count = sock.recv_into(view)
        if count == 0:
            raise ConnectionError("the lm server closed the connection")
        view = view[count:]


def receive(sock: socket.socket, count: int) -> bytes:
    buffer = bytearray(count)
    receive_into(sock, memoryview(buffer))
    return bytes(buffer)


class Rounds:
    def __init__(self, host: str, port: int, server_pid: int) -> None:
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server_pid = server_pid
        # Per block size, the same tensors and keys every round, as kvstore's side keeps
        # its tensors: a fresh 512 MiB buffer would page-fault inside the timed span, and
        # fresh keys would pile up in a server that never evicts.
        self.buffers: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.reply_bytes = len(
            ServerMetaMessage(
                ServerReturnCode.SUCCESS, 0, MemoryFormat(1), torch.float16, torch.Size((0,))
            ).serialize()
        )

    def meta(self, command: ClientCommand, key: CacheEngineKey, length: int) -> bytes:
        shape = torch.Size((length, 0, 0, 0))
        message = ClientMetaMessage(command, key, length, MemoryFormat.BINARY, torch.uint8, shape)
        packed: bytes = message.serialize()
        return packed

    def reply(self) -> ServerMetaMessage:
        return ServerMetaMessage.deserialize(receive(self.sock, self.reply_bytes))

    def run(self, block_bytes: int, total_bytes: int) -> dict[str, float]:
        num_blocks = max(1, total_bytes // block_bytes)
        if (block_bytes, num_blocks) not in self.buffers:
            source = torch.randn(num_blocks, block_bytes // 2).to(torch.bfloat16)
            self.buffers[block_bytes, num_blocks] = (source, torch.zeros_like(source))
        source, dest = self.buffers[block_bytes, num_blocks]
        source[:, 0] += 1  # other bytes than last round's: the get must bring them
        dest.zero_()
        keys = [
            CacheEngineKey(f"kvstore-peers-{block_bytes}", 1, 0, index, torch.bfloat16)
            for index in range(num_blocks)
        ]
        put = self.timed(lambda: self.put_all(keys, source, block_bytes))
        get = self.timed(lambda: self.get_all(keys, dest, block_bytes))
        if not torch.equal(dest, source):
            raise RuntimeError("the lm server returned other bytes than were put")
        return {"bytes": num_blocks * block_bytes, **prefixed("put", put), **prefixed("get", get)}

    def timed(self, work: Callable[[], None]) -> dict[str, float]:
        server_before = process_cpu_s(self.server_pid)
        client_before = time.process_time()
        start = time.perf_counter()
        work()
        elapsed = time.perf_counter() - start
        return {
            "s": elapsed,
            "client_cpu_s": time.process_time() - client_before,
            "server_cpu_s": process_cpu_s(self.server_pid) - server_before,
        }

    def put_all(self, keys: list[CacheEngineKey], source: torch.Tensor, block_bytes: int) -> None:
        raw = source.view(torch.uint8).numpy()
        for index, key in enumerate(keys):
            self.sock.sendall(self.meta(ClientCommand.PUT, key, block_bytes))
            self.sock.sendall(memoryview(raw[index]))
        self.sock.sendall(self.meta(ClientCommand.EXIST, keys[-1], 0))
        if self.reply().code != ServerReturnCode.SUCCESS:
            raise RuntimeError("the lm server does not hold the last block put")

    def get_all(self, keys: list[CacheEngineKey], dest: torch.Tensor, block_bytes: int) -> None:
        raw = dest.view(torch.uint8).numpy()
        for index, key in enumerate(keys):
            self.sock.sendall(self.meta(ClientCommand.GET, key, 0))
            reply = self.reply()
            if reply.code != ServerReturnCode.SUCCESS or reply.length != block_bytes:
                raise RuntimeError(f"the lm server has no block {index} ({reply.code})")
            receive_into(self.sock, memoryview(raw[index]))


def prefixed(prefix: str, values: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}_{name}": value for name, value in values.items()}


def main() -> None:
    host, port, server_pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rounds = Rounds(host, port, server_pid)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command, *values = line.split()
        if command != "round":
            raise SystemExit(f"unknown command {command!r}")
        block_bytes, total_bytes = (int(value) for value in values)
        print(json.dumps(rounds.run(block_bytes, total_bytes)), flush=True)


if __name__ == "__main__":
    main()
