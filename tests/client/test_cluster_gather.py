"""How a cluster get counts what arrived (kvstore.client._cluster_get.ChainGather): the
prefix of the chain whose layer l every owner delivered, cut at the first run of an owner
that failed before delivering it."""

from __future__ import annotations

import pytest

from kvstore.client import ClientOptions
from kvstore.client._cluster_get import ChainGather, OwnerProgress
from kvstore.client._cluster_nodes import NodePool
from kvstore.cluster.members import Member
from kvstore.cluster.placement import Run
from kvstore.codec import KVForm
from kvstore.layout import DType, KVLayout, Namespace

LAYOUT = KVLayout(num_layers=4, num_kv_heads=1, head_dim=8, dtype=DType.FLOAT16, block_tokens=4)
NAMESPACE = Namespace(tenant="t", model_fingerprint="m", layout=LAYOUT)
A, B = Member("a", "127.0.0.1:1", 0), Member("b", "127.0.0.1:2", 0)
# A chain of 8 blocks in runs of 2: A B A B.
RUNS = [Run(0, 2, A), Run(2, 4, B), Run(4, 6, A), Run(6, 8, B)]


def gather() -> ChainGather:
    keys = [bytes([i]) * 8 for i in range(8)]
    return ChainGather(NodePool(NAMESPACE, ClientOptions()), LAYOUT, keys, RUNS, None, KVForm.LAYER)


def progress(chain: ChainGather, member: Member) -> OwnerProgress:
    return next(p for p in chain._progress if p.owner.member is member)


def test_every_owner_delivered_the_layer() -> None:
    chain = gather()
    for member in (A, B):
        state = progress(chain, member)
        state.num_served, state.num_layers_done = 4, 2
    assert chain._prefix(0) == 8
    assert chain._prefix(1) == 8
    assert not chain._ready(2)


def test_an_owner_that_failed_after_layer_1_cuts_later_layers_at_its_first_run() -> None:
    chain = gather()
    a, b = progress(chain, A), progress(chain, B)
    a.num_served, a.num_layers_done, a.finished = 4, 4, True
    b.num_served, b.num_layers_done, b.failed = 4, 2, True
    assert [chain._prefix(layer) for layer in range(4)] == [8, 8, 2, 2]
    assert chain._ready(3)


def test_an_owner_serving_part_of_its_runs_ends_the_prefix_there() -> None:
    chain = gather()
    a, b = progress(chain, A), progress(chain, B)
    a.num_served, a.num_layers_done = 4, 4
    b.num_served, b.num_layers_done = 3, 4  # its second run lost a block: 2 + 1 of 4
    assert chain._prefix(0) == 7


@pytest.mark.parametrize("served", [0, 1])
def test_a_first_owner_with_nothing_whole_misses_the_whole_chain(served: int) -> None:
    chain = gather()
    a, b = progress(chain, A), progress(chain, B)
    a.num_served, a.num_layers_done = served, 4
    b.num_served, b.num_layers_done = 4, 4
    assert chain._prefix(0) == served
