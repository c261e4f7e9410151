"""NodePool: one client per member, replaced when the member comes back elsewhere."""

from __future__ import annotations

import asyncio
import gc

import pytest

from kvstore.client import ClientOptions, DType, KVLayout, Namespace
from kvstore.client._cluster_nodes import NodePool, gather_or_cancel
from kvstore.cluster.members import Member
from kvstore.cluster.placement import Placement

NAMESPACE = Namespace(
    tenant="t",
    model_fingerprint="m",
    layout=KVLayout(num_layers=1, num_kv_heads=1, head_dim=8, dtype=DType.FLOAT16, block_tokens=4),
)


async def test_a_member_back_under_its_id_at_another_address_gets_a_new_client() -> None:
    # A daemon restarted on its SSD directory keeps its node id; if it listens elsewhere,
    # the old client would dial the old address for ever.
    pool = NodePool(NAMESPACE, ClientOptions())
    before = Member("n1", "127.0.0.1:1001", 0, {"dram": 1})
    moved = Member("n1", "127.0.0.1:2002", 0, {"dram": 1})
    try:
        first = pool.client(before)
        assert pool.client(before) is first
        second = pool.client(moved)
        assert second is not first
        assert second.target == "127.0.0.1:2002"
        # A membership that lists it at its new address keeps the new client only.
        pool.keep_only(Placement([moved], run_blocks=2))
        assert pool.client(moved) is second
        pool.keep_only(Placement([before], run_blocks=2))  # and back again
        assert pool.client(before).target == "127.0.0.1:1001"
    finally:
        await pool.close()


def test_member_records_are_checked_field_by_field() -> None:
    good = b'{"node_id": "n", "address": "h:1", "data_port": 2, "capacity_bytes": {"dram": 3}}'
    assert Member.from_json(good) == Member("n", "h:1", 2, {"dram": 3})
    bad = [
        good.replace(b'"dram": 3', b'"dram": Infinity'),
        good.replace(b'"dram": 3', b'"dram": 1' + b"0" * 30),
        good.replace(b'"dram": 3', b'"dram": -3'),
        good.replace(b'"dram": 3', b'"dram": 3.5'),
        good.replace(b'"h:1"', b'"etcd://h:1/x"'),
        good.replace(b'"h:1"', b'"h"'),
        good.replace(b'"data_port": 2', b'"data_port": 70000'),
        good.replace(b'"n"', b'"' + b"n" * 65 + b'"'),
        b"[" * 100_000 + b"]" * 100_000,
    ]
    for raw in bad:
        with pytest.raises(ValueError, match="not a kvstore member record"):
            Member.from_json(raw)


async def test_a_part_that_raises_cancels_the_others_before_the_call_raises() -> None:
    """asyncio.gather would raise at once and leave the others running: a put on one node
    that a caller error ended would go on reading the caller's tensor on the others."""
    ended: list[str] = []

    async def refused() -> int:
        await asyncio.sleep(0.01)
        raise PermissionError("refused")

    async def slow(name: str) -> int:
        try:
            await asyncio.sleep(30)
            return 1
        finally:
            ended.append(name)

    with pytest.raises(PermissionError, match="refused"):
        await gather_or_cancel(slow("a"), refused(), slow("b"))
    assert sorted(ended) == ["a", "b"]  # both had ended when the error was raised


async def test_parts_that_fail_together_leave_no_exception_unretrieved() -> None:
    """Several parts failing in one step: the first is raised, and the others' errors are
    read, not left for asyncio to log as "Task exception was never retrieved" when the
    tasks are collected (a finalizer that ran Python code inside a later ast.parse and
    broke a test run on CPython 3.11.7)."""
    unretrieved: list[dict[str, object]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: unretrieved.append(context))
    try:

        async def refused(name: str) -> int:
            raise PermissionError(name)

        with pytest.raises(PermissionError, match="first"):
            await gather_or_cancel(refused("first"), refused("second"), refused("third"))
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert [context.get("message") for context in unretrieved] == []


async def test_results_come_in_order_and_a_cancelled_call_cancels_its_parts() -> None:
    async def value(result: int, delay_s: float) -> int:
        await asyncio.sleep(delay_s)
        return result

    assert await gather_or_cancel(value(1, 0.02), value(2, 0.0), value(3, 0.01)) == [1, 2, 3]
    assert await gather_or_cancel() == []
    ended: list[int] = []

    async def part(index: int) -> None:
        try:
            await asyncio.sleep(30)
        finally:
            ended.append(index)

    outer = asyncio.ensure_future(gather_or_cancel(part(0), part(1)))
    await asyncio.sleep(0.01)
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer
    assert sorted(ended) == [0, 1]


async def test_a_part_cancelled_from_inside_cuts_the_others_too() -> None:
    ended: list[str] = []

    async def cancelled_inside() -> int:
        await asyncio.sleep(0.01)
        raise asyncio.CancelledError

    async def slow() -> int:
        try:
            await asyncio.sleep(30)
            return 1
        finally:
            ended.append("slow")

    started = asyncio.get_running_loop().time()
    with pytest.raises(asyncio.CancelledError):
        await gather_or_cancel(slow(), cancelled_inside())
    assert ended == ["slow"]
    assert asyncio.get_running_loop().time() - started < 10  # not the slow part's 30 s
