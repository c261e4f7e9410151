"""A fuzz session: seeded blocks, batches of cases, and the invariants between them.

Before fuzzing, blocks are put (and pinned) in a namespace no case ever names. Each
batch stores the victim chain the cases aim at, runs its cases, deletes whatever the
cases stored, and then checks, polling with a bound, that the server is back where it
started: nothing reserved, DRAM holding exactly the seeded blocks, no pins but the
seeds', no namespace but the seeds', no data-plane connection open, no SSD write
pending nor SSD byte used but the seeds', and the seeded blocks byte-identical. At
the end a valid put and get round-trip on both transports.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import torch
from fuzz_cases import Case, DataPlaneCase, Ending, GrpcCase, data_plane_case, grpc_case
from fuzz_corpus import FUZZ_LAYOUT, FUZZ_NS, MAX_KEYS, VICTIM_KEYS, fuzz_namespace_bytes
from fuzz_run import DataPlaneRunner, GrpcRunner, Observation, StoredPut

from kvstore.client import ClientOptions, KVClient, KVForm
from kvstore.codec import expected_shape
from kvstore.layout import DType, KVLayout, Namespace
from kvstore.server import RunningServer
from kvstore.v1 import kvstore_pb2 as pb
from kvstore.v1 import kvstore_pb2_grpc as pb_grpc

SEED_LAYOUT = KVLayout(
    num_layers=2, num_kv_heads=2, head_dim=8, dtype=DType.FLOAT16, block_tokens=16
)
SEED_NS = Namespace(tenant="seeded", model_fingerprint="kept-apart", layout=SEED_LAYOUT)
SEED_KEYS = [b"seed-%d" % index for index in range(6)]
BATCH_CASES = 100
SETTLE_BOUND_S = 10.0
# The bytes of a failing case printed in full up to this; past it, rebuild the case.
_PRINT_BYTES = 4096


def random_blocks(layout: KVLayout, num_blocks: int, seed: int) -> torch.Tensor:
    """Blocks of random bit patterns in the layout's dtype (compare them as bytes)."""
    *outer, last = expected_shape(layout, KVForm.BLOCKS, num_blocks)
    generator = torch.Generator().manual_seed(seed)
    shape = (*outer, last * layout.dtype.itemsize)
    raw = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    return raw.view(layout.dtype.torch_dtype)


@dataclass(frozen=True)
class Snapshot:
    """What must return to its starting value after every batch."""

    put_reserved_bytes: int
    dram_used_bytes: int
    dram_num_blocks: int
    num_pinned: int
    num_namespaces: int
    data_plane_connections: int
    ssd_writes_pending: int
    ssd_used_bytes: int

    @classmethod
    def of(cls, stats: pb.StatsResponse) -> Snapshot:
        (dram,) = [tier for tier in stats.tiers if tier.tier == pb.DRAM]
        ssd_used_bytes = sum(tier.used_bytes for tier in stats.tiers if tier.tier == pb.SSD)
        return cls(
            stats.put_reserved_bytes,
            dram.used_bytes,
            dram.num_blocks,
            stats.num_pinned,
            stats.num_namespaces,
            stats.data_plane_connections,
            stats.ssd_writes_pending,
            ssd_used_bytes,
        )


class ErrorLog(logging.Handler):
    """Records ERROR and worse from any logger: an internal error the client never saw
    (it had gone), or an exception in a task nobody awaited."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def take(self) -> list[str]:
        taken = [f"{record.name}: {self.format(record)}" for record in self.records]
        self.records.clear()
        return taken


class FuzzSession:
    def __init__(self, running: RunningServer, channel: grpc.aio.Channel) -> None:
        self._running = running
        self._target = f"127.0.0.1:{running.port}"
        self.has_ssd = running.store.has_ssd
        self._stub = pb_grpc.KVStoreStub(channel)
        self._grpc = GrpcRunner(channel)
        self._data_plane = DataPlaneRunner(running.servicer.data_plane_port)
        options = ClientOptions(data_plane=False)
        self._seed_client = KVClient(self._target, SEED_NS, options=options)
        self._fuzz_client = KVClient(self._target, FUZZ_NS, options=options)
        self._seed_kv = random_blocks(SEED_LAYOUT, len(SEED_KEYS), seed=11)
        self._victim_kv = random_blocks(FUZZ_LAYOUT, len(VICTIM_KEYS), seed=12)
        self._errors = ErrorLog()
        self._baseline: Snapshot | None = None
        self.num_cases = 0
        self.num_lost_statuses = 0  # gRPC statuses grpc.aio lost (see fuzz_run.LOST_STATUS)
        # (what was called, how it ended, status): printed, so a run shows what it reached.
        self.outcomes: Counter[tuple[str, str, str]] = Counter()

    async def __aenter__(self) -> FuzzSession:
        logging.getLogger().addHandler(self._errors)
        put = await self._seed_client.put_blocks(SEED_KEYS, self._seed_kv)
        assert put.num_committed == len(SEED_KEYS)
        # Pinned, so that no eviction a case may cause on purpose can reach them.
        assert await self._seed_client.pin(SEED_KEYS, ttl_s=600) == len(SEED_KEYS)
        self._baseline = Snapshot.of(await self._stats())
        assert self._baseline.num_namespaces == 1
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        logging.getLogger().removeHandler(self._errors)
        await self._seed_client.close()
        await self._fuzz_client.close()

    async def _stats(self) -> pb.StatsResponse:
        return await self._stub.Stats(pb.StatsRequest(), timeout=SETTLE_BOUND_S)

    async def fuzz(self, transport: str, seed: int, num_cases: int) -> None:
        """Cases 0 .. num_cases - 1 of `seed` on `transport`, in batches; raises at the
        first batch with a problem, naming the cases and their bytes."""
        make: Callable[[int, int], Case] = grpc_case if transport == "grpc" else data_plane_case
        for start in range(0, num_cases, BATCH_CASES):
            indices = range(start, min(start + BATCH_CASES, num_cases))
            await self.run_batch([make(seed, index) for index in indices])

    async def run_batch(self, cases: list[Case]) -> None:
        put = await self._fuzz_client.put_blocks(VICTIM_KEYS, self._victim_kv)
        assert put.num_committed == len(VICTIM_KEYS), "the last batch left victims behind"
        problems: list[str] = []
        stored: list[StoredPut] = []
        for case in cases:
            seen = await self._run(case)
            stored += seen.puts
            what = case.rpc if isinstance(case, GrpcCase) else "data plane"
            self.outcomes.update((what, case.ending.value, code.name) for code in seen.codes)
            self.num_lost_statuses += seen.num_lost_statuses
            problems += [f"{problem}\n    in {_describe(case)}" for problem in seen.problems]
            if case.ending is Ending.STALL and not await self._reservations_freed():
                problems.append(f"a cut stall's reservation not freed\n    in {_describe(case)}")
        self.num_cases += len(cases)
        where = f"the batch of {_span(cases)}"
        problems += [f"server log: {line}" for line in self._errors.take()]
        assert not problems, f"{where}:\n" + "\n".join(problems[:10])
        await self._delete(stored)
        await self.settle(where)
        await self._check_seeds(where)

    async def _reservations_freed(self) -> bool:
        """Whether put reservations are back to the start within the bound (a case
        abandoned just before may still be being torn down)."""
        assert self._baseline is not None
        deadline = time.monotonic() + SETTLE_BOUND_S
        while (await self._stats()).put_reserved_bytes != self._baseline.put_reserved_bytes:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    async def _run(self, case: Case) -> Observation:
        if isinstance(case, DataPlaneCase):
            return await self._data_plane.run(case)
        return await self._grpc.run(case)

    async def _delete(self, stored: list[StoredPut]) -> None:
        """Unpin and delete what the batch stored, and the victims; a block still being
        read (a get the server is tearing down) is deleted once it is free."""
        victims = StoredPut(pb.Namespace.FromString(fuzz_namespace_bytes()), VICTIM_KEYS)
        requests = [
            (put.namespace, keys) for put in [*stored, victims] for keys in _batches(put.keys)
        ]
        valid = []
        for namespace, keys in requests:
            try:
                await self._stub.Unpin(pb.UnpinRequest(namespace=namespace, keys=keys), timeout=5)
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                continue  # a namespace no put could store in
            valid.append((namespace, keys))
        requests = valid
        deadline = time.monotonic() + SETTLE_BOUND_S
        while requests:
            busy = []
            for namespace, keys in requests:
                request = pb.DeleteRequest(namespace=namespace, keys=keys)
                if (await self._stub.Delete(request, timeout=5)).num_busy:
                    busy.append((namespace, keys))
            requests = busy
            assert time.monotonic() < deadline, f"blocks still busy: {requests[:3]}"
            if requests:
                await asyncio.sleep(0.01)

    async def settle(self, where: str, **expected_changes: int) -> None:
        """Poll Stats until the snapshot equals the baseline (with `expected_changes`)."""
        assert self._baseline is not None
        expected = Snapshot(**{**self._baseline.__dict__, **expected_changes})
        deadline = time.monotonic() + SETTLE_BOUND_S
        while (now := Snapshot.of(await self._stats())) != expected:
            if time.monotonic() > deadline:
                differ = {
                    name: (value, getattr(now, name))
                    for name, value in expected.__dict__.items()
                    if getattr(now, name) != value
                }
                raise AssertionError(
                    f"after {where}, not back to the start within {SETTLE_BOUND_S} s "
                    f"(field: (expected, now)): {differ}"
                )
            await asyncio.sleep(0.01)

    async def _check_seeds(self, where: str) -> None:
        got = torch.zeros_like(self._seed_kv)
        count = await self._seed_client.get_into(SEED_KEYS, got, form=KVForm.BLOCKS)
        assert count == len(SEED_KEYS), f"after {where}: {count} seeded blocks of {len(SEED_KEYS)}"
        assert torch.equal(got.view(torch.uint8), self._seed_kv.view(torch.uint8)), (
            f"after {where}: the seeded blocks changed"
        )

    async def finish(self) -> None:
        """A valid put and get on both transports, then the seeds unpinned: nothing held."""
        kv = random_blocks(FUZZ_LAYOUT, 2, seed=13)
        for data_plane in (True, False):
            keys = [b"final-%d-%d" % (data_plane, index) for index in range(2)]
            options = ClientOptions(data_plane=data_plane)
            async with KVClient(self._target, FUZZ_NS, options=options) as client:
                assert (await client.put_blocks(keys, kv)).num_committed == 2
                got = torch.zeros_like(kv)
                assert await client.get_into(keys, got, form=KVForm.BLOCKS) == 2
                assert torch.equal(got.view(torch.uint8), kv.view(torch.uint8))
                assert (await client.delete(keys[:1])) == (2, 0)
                assert (client.data_plane is not None) == data_plane
        await self._check_seeds("the last batch")
        assert await self._seed_client.unpin(SEED_KEYS) == len(SEED_KEYS)
        await self.settle("the final round trip", num_pinned=0)
        assert not self._errors.take()

    def print_summary(self) -> None:
        print(f"{self.num_cases} cases; statuses lost by grpc.aio: {self.num_lost_statuses}")
        for (what, ending, code), count in sorted(self.outcomes.items()):
            print(f"  {what:20} {ending:9} {code:20} {count}")


def _batches(keys: list[bytes]) -> Iterator[list[bytes]]:
    for start in range(0, len(keys), MAX_KEYS):
        yield keys[start : start + MAX_KEYS]


def _span(cases: list[Case]) -> str:
    first, last = cases[0], cases[-1]
    kind = "data-plane" if isinstance(first, DataPlaneCase) else "gRPC"
    return f"{kind} cases {first.index}..{last.index} of seed {first.seed}"


def _describe(case: Case) -> str:
    text = case.describe()
    if len(text) <= 2 * _PRINT_BYTES + 400:
        return text
    maker = "data_plane_case" if isinstance(case, DataPlaneCase) else "grpc_case"
    return (
        f"{text[: 2 * _PRINT_BYTES]}... (cut; rebuild it in full with "
        f"fuzz_cases.{maker}({case.seed}, {case.index}))"
    )
