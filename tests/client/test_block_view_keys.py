"""The block view's key sets (client/_vllm_block_view.py): what a node's events say it
holds, and when the view is complete enough to tell a miss."""

from __future__ import annotations

from kvstore.client._vllm_block_view import KeySets
from kvstore.client._watch import BlockEvents
from kvstore.enums import TierKind
from kvstore.events import BlockEvent, BlockEventKind

Kind = BlockEventKind


def batch(node: str, *events: tuple[BlockEventKind, bytes]) -> BlockEvents:
    tiered = (Kind.SNAPSHOT, Kind.STORED)
    return BlockEvents(
        node,
        0,
        tuple(
            BlockEvent(kind, key, b"", TierKind.DRAM if kind in tiered else None)
            for kind, key in events
        ),
    )


def test_events_add_and_remove_keys_once_the_snapshot_has_ended() -> None:
    keys = KeySets()
    keys.apply(batch("a", (Kind.SNAPSHOT, b"k1")))
    assert keys.held_prefix([b"k1"], {"a"}) is None  # the snapshot is not over
    keys.apply(batch("a", (Kind.SNAPSHOT_END, b""), (Kind.STORED, b"k2")))
    assert keys.held_prefix([b"k1", b"k2", b"k3"], {"a"}) == 2
    keys.apply(batch("a", (Kind.TIER_CHANGED, b"k2"), (Kind.REMOVED, b"k1")))
    assert keys.held_prefix([b"k1", b"k2"], {"a"}) == 0
    assert keys.held_prefix([b"k2"], {"a"}) == 1


def test_a_gap_leaves_the_view_incomplete_until_a_new_snapshot_ends() -> None:
    keys = KeySets()
    keys.apply(batch("a", (Kind.SNAPSHOT, b"k1"), (Kind.SNAPSHOT_END, b"")))
    keys.apply(batch("a", (Kind.GAP, b"")))
    assert keys.held_prefix([b"k1"], {"a"}) is None
    keys.apply(batch("a", (Kind.SNAPSHOT, b"k2"), (Kind.SNAPSHOT_END, b"")))
    assert keys.held_prefix([b"k1"], {"a"}) == 0  # k1 went while events were lost
    assert keys.held_prefix([b"k2"], {"a"}) == 1


def test_every_node_must_have_its_snapshot_and_any_node_may_hold_a_key() -> None:
    keys = KeySets()
    keys.apply(batch("a", (Kind.SNAPSHOT, b"k1"), (Kind.SNAPSHOT_END, b"")))
    assert keys.held_prefix([b"k1", b"k2"], {"a", "b"}) is None  # b: nothing yet
    assert keys.held_prefix([b"k1"], set()) is None  # no member known
    keys.apply(batch("b", (Kind.SNAPSHOT, b"k2"), (Kind.SNAPSHOT_END, b"")))
    assert keys.held_prefix([b"k1", b"k2", b"k3"], {"a", "b"}) == 2
