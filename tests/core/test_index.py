"""BlockIndex: chain paths and the longest stored prefix, against a plain per-key probe."""

from __future__ import annotations

import random
from itertools import takewhile

from kvstore.index import BlockEntry, BlockIndex, NamespaceState
from kvstore.layout import DType, KVLayout, Namespace

LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=8, dtype=DType.FLOAT16, block_tokens=8)
NS = Namespace(tenant="t", model_fingerprint="m", layout=LAYOUT)


def add(index: BlockIndex, key: bytes, parent: BlockEntry | None = None) -> BlockEntry:
    entry = BlockEntry(
        namespace=index.namespace(NS),
        key=key,
        parent=parent,
        layer_checksums=[0],
        checksum_kind_value=1,
    )
    index.insert(entry)
    return entry


def chain_keys(entry: BlockEntry) -> list[bytes]:
    keys: list[bytes] = []
    current: BlockEntry | None = entry
    while current is not None:
        keys.append(current.key)
        current = current.parent
    return keys[::-1]


def probed_prefix(state: NamespaceState, keys: list[bytes]) -> list[BlockEntry]:
    """The definition: leading keys that are stored, found one dict probe at a time."""
    return [state.blocks[key] for key in takewhile(state.blocks.__contains__, keys)]


def assert_paths_hold(index: BlockIndex) -> None:
    for entry in index.entries():
        path = entry.path
        assert path is not None
        assert path.entry_at(entry.depth) is entry
        chain = chain_keys(entry)
        assert path.keys_match(chain, entry.depth + 1)
        assert [element.key for element in path.entries_to(entry.depth + 1)] == chain
        assert all(element.is_indexed() for element in path.entries_to(path.end))


def test_a_whole_chain_and_each_of_its_prefixes_are_found() -> None:
    index = BlockIndex()
    entries = [add(index, b"k0")]
    for number in range(1, 50):
        entries.append(add(index, b"k%d" % number, entries[-1]))
    state = index.namespace(NS)
    keys = [entry.key for entry in entries]
    assert index.present_prefix(state, keys) == entries
    for length in (1, 2, 17, 49):
        assert index.present_prefix(state, [*keys[:length], b"missing"]) == entries[:length]
    assert index.present_prefix(state, [b"missing", *keys]) == []
    assert index.present_prefix(state, []) == []
    assert entries[0].path is entries[-1].path, "an unbranched chain shares one path"


def test_branches_get_their_own_path_and_both_are_found() -> None:
    index = BlockIndex()
    root = add(index, b"root")
    left = add(index, b"left", add(index, b"mid", root))
    right = add(index, b"right", left.parent)
    assert left.path is not right.path
    state = index.namespace(NS)
    assert index.present_prefix(state, [b"root", b"mid", b"right"]) == [root, left.parent, right]
    assert index.present_prefix(state, [b"root", b"mid", b"left"]) == [root, left.parent, left]
    assert_paths_hold(index)


def test_keys_stored_under_other_parents_still_count_as_present() -> None:
    index = BlockIndex()
    first, second = add(index, b"a"), add(index, b"b")  # two roots, not a chain
    third = add(index, b"c", first)
    state = index.namespace(NS)
    assert index.present_prefix(state, [b"a", b"b", b"c", b"x"]) == [first, second, third]


def test_random_trees_with_evictions_match_the_per_key_probe() -> None:
    rng = random.Random(7)
    index = BlockIndex()
    state = index.namespace(NS)
    live: list[BlockEntry] = []
    for step in range(3000):
        if live and rng.random() < 0.35:
            leaves = [entry for entry in live if entry.num_children == 0]
            victim = rng.choice(leaves)
            index.remove(victim)
            live.remove(victim)
        else:
            parent = rng.choice(live) if live and rng.random() < 0.9 else None
            live.append(add(index, b"key-%d" % step, parent))
        if step % 25 == 0:
            assert_paths_hold(index)
        if live:
            tail = rng.choice(live)
            keys = chain_keys(tail)
            cut = rng.randrange(len(keys) + 1)
            queries = [
                keys,
                [*keys[:cut], b"gone-%d" % step, *keys[cut:]],
                [*keys[:cut], *(rng.choice(live).key for _ in range(3))],
                [rng.choice(live).key for _ in range(rng.randrange(1, 6))],
            ]
            for query in queries:
                assert index.present_prefix(state, query) == probed_prefix(state, query)


def test_children_lists_match_the_parent_links_through_inserts_and_removals() -> None:
    """Deletes walk `children` instead of the namespace: it must name exactly the
    indexed blocks whose parent is the entry, whatever order blocks come and go in."""
    rng = random.Random(7)
    index = BlockIndex()
    entries: list[BlockEntry] = []
    for number in range(2000):
        if entries and rng.random() < 0.35:
            leaves = [entry for entry in entries if entry.num_children == 0]
            leaf = rng.choice(leaves)
            index.remove(leaf)
            entries.remove(leaf)
        else:
            parent = rng.choice(entries) if entries and rng.random() < 0.9 else None
            entries.append(add(index, b"k%d" % number, parent))
    for entry in entries:
        expected = [other for other in entries if other.parent is entry]
        assert sorted(map(id, entry.children or [])) == sorted(map(id, expected))
        assert entry.num_children == len(expected)


def test_siblings_under_a_deep_block_cost_no_copy_of_the_chain_above() -> None:
    """Thousands of branches off a block thousands deep: each path holds what it adds
    (a copy of the chain per branch was quadratic: a reviewer's depth 8,000 with 8,000
    siblings took +1 GB)."""
    index = BlockIndex()
    chain = [add(index, b"c0")]
    for number in range(1, 2000):
        chain.append(add(index, b"c%d" % number, chain[-1]))
    middle = chain[1000]
    siblings = [add(index, b"s%d" % number, middle) for number in range(2000)]
    paths = {id(entry.path): entry.path for entry in index.entries()}
    held = sum(len(path.keys) for path in paths.values() if path is not None)
    assert held == len(chain) + len(siblings)  # every element held once
    state = index.namespace(NS)
    head = [entry.key for entry in chain[:1001]]
    for sibling in (siblings[0], siblings[-1]):
        assert index.present_prefix(state, [*head, sibling.key]) == [*chain[:1001], sibling]
    assert_paths_hold(index)


def test_branches_of_branches_stay_correct_past_the_segment_limit() -> None:
    """A zig-zag: each block's second child branches again, nesting segments until a
    branch copies its chain; every prefix is still found exactly."""
    index = BlockIndex()
    state = index.namespace(NS)
    spine = [add(index, b"z0")]
    for number in range(1, 60):
        add(index, b"z%d-first" % number, spine[-1])  # the first child extends the path
        spine.append(add(index, b"z%d" % number, spine[-1]))  # the second one branches
    keys = [entry.key for entry in spine]
    assert index.present_prefix(state, keys) == spine
    for length in (1, 17, 33, 59):
        assert index.present_prefix(state, [*keys[:length], b"nope"]) == spine[:length]
    depths = [len(entry.path.above) for entry in spine if entry.path is not None]
    assert max(depths) < 16
    assert_paths_hold(index)
