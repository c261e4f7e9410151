"""Tests for Mooncake trace loading, hit-rate prediction and block keys."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from kvstore.bench.trace import (
    CacheHitStats,
    TraceFormatError,
    TraceRequest,
    block_keys_for_request,
    infinite_cache_hit_rate,
    load_trace,
    lru_cache_hit_rate,
)


def make_request(input_length: int, *hash_ids: int, timestamp_ms: float = 0.0) -> TraceRequest:
    return TraceRequest(timestamp_ms, input_length, 1, hash_ids)


def write_trace(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def record(input_length: int, hash_ids: list[int], timestamp: int = 0) -> dict[str, Any]:
    return {
        "timestamp": timestamp,
        "input_length": input_length,
        "output_length": 7,
        "hash_ids": hash_ids,
    }


def without_eviction_fields(stats: CacheHitStats) -> CacheHitStats:
    return dataclasses.replace(stats, num_evicted_blocks=0, capacity_blocks=None)


# ---- loading -------------------------------------------------------------------------------


def test_load_trace_round_trip(tmp_path: Path) -> None:
    path = write_trace(tmp_path / "t.jsonl", [record(1100, [1, 2, 3], 5), record(512, [1], 9)])
    assert load_trace(path) == [
        TraceRequest(5.0, 1100, 7, (1, 2, 3)),
        TraceRequest(9.0, 512, 7, (1,)),
    ]


def test_load_trace_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(record(10, [0])) + "\n\n   \n" + json.dumps(record(10, [1])))
    assert [r.hash_ids for r in load_trace(path)] == [(0,), (1,)]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"timestamp": 0, "input_length": 10, "output_length": 1}', "hash_ids"),
        (json.dumps(record(0, [])), "input_length"),
        (json.dumps(record(10, [0]) | {"timestamp": True}), "timestamp"),
        (json.dumps(record(10, [0]) | {"timestamp": -1}), "timestamp"),
        (json.dumps(record(10, [0]) | {"output_length": 1.5}), "output_length"),
        (json.dumps(record(10, [0]) | {"hash_ids": "0"}), "hash_ids must be a list"),
        (json.dumps(record(10, ["a"])), "hash_ids must be integers"),
        (json.dumps(record(10, [-1])), "hash_ids must be integers"),
        (json.dumps(record(1100, [1, 2])), "needs 3 hash_ids"),
        (json.dumps(record(1024, [1, 2, 3])), "needs 2 hash_ids"),
    ],
)
def test_malformed_line_names_its_line_number(tmp_path: Path, line: str, reason: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(record(10, [0])) + "\n\n" + line + "\n")
    with pytest.raises(TraceFormatError, match=reason) as info:
        load_trace(path)
    assert info.value.line_number == 3
    assert "bad.jsonl:3: " in str(info.value)


# ---- infinite cache ------------------------------------------------------------------------


def hand_checked_requests() -> list[TraceRequest]:
    return [
        make_request(1100, 1, 2, 3),  # 2 full blocks + 76 tokens; stores 1, 2; no hit
        make_request(1536, 1, 2, 3),  # 3 is now full but was never stored: hits 1, 2
        make_request(2000, 1, 2, 3, 4),  # hits 1, 2, 3; the partial 4 cannot hit
        make_request(1536, 1, 5, 3),  # 5 misses, so 3 does not count though it is cached
    ]


def test_infinite_cache_by_hand() -> None:
    stats = infinite_cache_hit_rate(hand_checked_requests())
    assert stats == CacheHitStats(
        num_requests=4,
        num_blocks=3 + 3 + 4 + 3,
        num_cacheable_blocks=2 + 3 + 3 + 3,
        num_hit_blocks=0 + 2 + 3 + 1,
        num_tokens=1100 + 1536 + 2000 + 1536,
        num_hit_tokens=6 * 512,
        num_unique_blocks=4,  # 1, 2, 3, 5
        num_evicted_blocks=0,
        capacity_blocks=None,
    )
    assert stats.block_hit_rate == pytest.approx(6 / 11)
    assert stats.token_hit_rate == pytest.approx(3072 / 6172)


def test_infinite_cache_from_file(tmp_path: Path) -> None:
    path = write_trace(
        tmp_path / "t.jsonl",
        [
            record(1024, [10, 11]),
            record(1536, [10, 11, 12]),
            record(600, [10, 13]),
        ],
    )
    stats = infinite_cache_hit_rate(load_trace(path))
    assert (stats.num_hit_blocks, stats.num_hit_tokens) == (0 + 2 + 1, 3 * 512)
    assert stats.token_hit_rate == pytest.approx(1536 / (1024 + 1536 + 600))


def test_smaller_blocks() -> None:
    stats = infinite_cache_hit_rate([make_request(20, 1, 2, 3), make_request(16, 1, 2)], 8)
    assert (stats.num_cacheable_blocks, stats.num_hit_blocks, stats.num_hit_tokens) == (4, 2, 16)


def test_empty_trace_rates_are_zero() -> None:
    stats = infinite_cache_hit_rate([])
    assert (stats.block_hit_rate, stats.token_hit_rate) == (0.0, 0.0)


# ---- LRU cache -----------------------------------------------------------------------------


def test_lru_with_room_for_everything_equals_infinite() -> None:
    requests = hand_checked_requests()
    infinite = infinite_cache_hit_rate(requests)
    lru = lru_cache_hit_rate(requests, capacity_blocks=infinite.num_unique_blocks)
    assert lru.num_evicted_blocks == 0
    assert without_eviction_fields(lru) == infinite


def test_small_lru_hits_less_than_infinite() -> None:
    a, b = make_request(1024, 1, 2), make_request(1024, 3, 4)
    requests = [a, b, a, b]
    assert infinite_cache_hit_rate(requests).num_hit_blocks == 4
    lru = lru_cache_hit_rate(requests, capacity_blocks=2)
    assert lru.num_hit_blocks == 0
    assert lru.num_evicted_blocks == 6
    assert lru.token_hit_rate < infinite_cache_hit_rate(requests).token_hit_rate


def test_lru_evicts_chain_tails_first() -> None:
    a, b = make_request(1024, 1, 2), make_request(1024, 3, 4)
    # Capacity 3: b evicts a's tail (2), so a's head (1) still hits; then a evicts b's tail (4).
    lru = lru_cache_hit_rate([a, b, a, b], capacity_blocks=3)
    assert lru.num_hit_blocks == 0 + 0 + 1 + 1
    assert lru.num_evicted_blocks == 3


def test_lru_keeps_the_head_of_a_request_longer_than_the_cache() -> None:
    long = make_request(2048, 1, 2, 3, 4)
    lru = lru_cache_hit_rate([long, long], capacity_blocks=2)
    assert lru.num_hit_blocks == 2


def test_lru_shared_prefix_outlives_its_children() -> None:
    requests = [
        make_request(1024, 0, 1),
        make_request(1024, 0, 2),
        make_request(1024, 0, 3),
        make_request(1024, 0, 4),
    ]
    # Block 0 is touched by every request, so only the tails 1, 2, ... are ever evicted.
    lru = lru_cache_hit_rate(requests, capacity_blocks=2)
    assert lru.num_hit_blocks == 3


@pytest.mark.parametrize("capacity", [0, -3])
def test_lru_rejects_non_positive_capacity(capacity: int) -> None:
    with pytest.raises(ValueError, match="capacity_blocks"):
        lru_cache_hit_rate([], capacity)


# ---- block keys ----------------------------------------------------------------------------


def test_block_keys_are_stable_and_documented() -> None:
    keys = block_keys_for_request(make_request(1100, 7, 8, 9), b"tenant")
    assert len(keys) == 3
    assert all(len(key) == 16 for key in keys)
    expected = hashlib.sha256(
        b"kvstore.bench.trace.v1\x00"
        + (6).to_bytes(4, "little")
        + b"tenant"
        + (8).to_bytes(8, "little")
    ).digest()[:16]
    assert keys[1] == expected


def test_block_keys_match_across_requests_and_differ_by_salt_and_id() -> None:
    first = block_keys_for_request(make_request(1024, 1, 2), b"a")
    second = block_keys_for_request(make_request(1536, 1, 2, 3), b"a")
    other_salt = block_keys_for_request(make_request(1024, 1, 2), b"b")
    assert second[:2] == first
    assert len(set(second)) == 3
    assert not set(first) & set(other_salt)
    # The salt length is part of the key, so salt/id boundaries cannot be shifted.
    assert block_keys_for_request(make_request(512, 0), b"") != block_keys_for_request(
        make_request(512, 0), b"\x00"
    )
