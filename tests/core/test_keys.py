"""Chained block keys: the documented formula, published test vectors, and input checks.

The vectors below are the reference for other implementations (a C++ or Rust client
must produce the same keys for the same tokens):

    tokens = 0, 1, ..., 31 (two full blocks of 16), each as a little-endian u32
    root   = 32 zero bytes (SHA-256) or 16 zero bytes (xxh3-128, big-endian digest)
    key_0  = H(root || extra || tokens[0:16])
    key_1  = H(key_0 || tokens[16:32])
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest
import torch
import xxhash

from kvstore.errors import InvalidRequest
from kvstore.keys import MAX_KEY_BYTES, HashAlgorithm, chain_keys, validate_key

VECTOR_TOKENS = list(range(32))
VECTOR_BLOCK_TOKENS = 16
SALT = b"tenant-salt"

PUBLISHED_VECTORS: dict[tuple[HashAlgorithm, bytes], list[str]] = {
    (HashAlgorithm.SHA256, b""): [
        "aa330374288acbdcb5008f2959fd6df7d265c735fbb9b4b4c42ec2036accd6d3",
        "8f3d3a653ef4f75ccd8845b6a76dd246da5b5e735809babef53877d21125357c",
    ],
    (HashAlgorithm.SHA256, SALT): [
        "cc7151f34b9aaaa5d5fa607b575a2b3a9aee500eaa42d0395f8431495f7d1967",
        "fda086e1912a658a4d66ec6e55cac2921174b4bbcd2b46079612f933cf6d2bad",
    ],
    (HashAlgorithm.XXH3_128, b""): [
        "16d310809c3605d60b49a1755bdbc8b2",
        "f5d6d115dc50f02d9a2cecb9b5456d8b",
    ],
    (HashAlgorithm.XXH3_128, SALT): [
        "fc308667a225ec6c9a21218adea4bfb5",
        "7724c29d1db78ce754bc6162316cde90",
    ],
}


def reference_keys(
    tokens: list[int], block_tokens: int, extra: bytes, algorithm: HashAlgorithm
) -> list[bytes]:
    """The documented formula, written out independently of kvstore.keys."""
    if algorithm is HashAlgorithm.SHA256:
        digest_bytes = 32

        def digest(data: bytes) -> bytes:
            return hashlib.sha256(data).digest()
    else:
        digest_bytes = 16

        def digest(data: bytes) -> bytes:
            return xxhash.xxh3_128(data).digest()

    keys: list[bytes] = []
    parent = bytes(digest_bytes) + extra
    for start in range(0, len(tokens) - block_tokens + 1, block_tokens):
        block = tokens[start : start + block_tokens]
        key = digest(parent + struct.pack(f"<{block_tokens}I", *block))
        keys.append(key)
        parent = key
    return keys


@pytest.mark.parametrize(("algorithm", "extra"), list(PUBLISHED_VECTORS))
def test_published_vectors(algorithm: HashAlgorithm, extra: bytes) -> None:
    expected = PUBLISHED_VECTORS[(algorithm, extra)]
    independent = reference_keys(VECTOR_TOKENS, VECTOR_BLOCK_TOKENS, extra, algorithm)
    assert [key.hex() for key in independent] == expected, "the published vector is wrong"
    keys = chain_keys(VECTOR_TOKENS, VECTOR_BLOCK_TOKENS, extra=extra, algorithm=algorithm)
    assert [key.hex() for key in keys] == expected


def test_sha256_is_the_default() -> None:
    assert chain_keys(VECTOR_TOKENS, VECTOR_BLOCK_TOKENS) == [
        bytes.fromhex(h) for h in PUBLISHED_VECTORS[(HashAlgorithm.SHA256, b"")]
    ]


@pytest.mark.parametrize("algorithm", list(HashAlgorithm))
def test_root_is_zero_bytes_of_digest_size(algorithm: HashAlgorithm) -> None:
    assert algorithm.root == bytes(algorithm.digest_bytes)
    keys = chain_keys(VECTOR_TOKENS, VECTOR_BLOCK_TOKENS, algorithm=algorithm)
    assert all(len(key) == algorithm.digest_bytes <= MAX_KEY_BYTES for key in keys)


@pytest.mark.parametrize("block_tokens", [16, 64, 256, 512])
@pytest.mark.parametrize("algorithm", list(HashAlgorithm))
def test_every_block_size_matches_the_formula(block_tokens: int, algorithm: HashAlgorithm) -> None:
    tokens = [(i * 7919) % 150_000 for i in range(3 * block_tokens + 5)]
    keys = chain_keys(tokens, block_tokens, extra=SALT, algorithm=algorithm)
    assert len(keys) == 3
    assert keys == reference_keys(tokens, block_tokens, SALT, algorithm)
    assert len(set(keys)) == 3


def test_only_full_blocks_are_hashed() -> None:
    full = chain_keys(list(range(32)), 16)
    assert chain_keys(list(range(47)), 16) == full
    assert chain_keys(list(range(48)), 16)[:2] == full
    assert len(chain_keys(list(range(48)), 16)) == 3
    assert chain_keys(list(range(15)), 16) == []
    assert chain_keys([], 16) == []


def test_keys_are_chained_prefixes() -> None:
    """A key depends on every token before it: same prefix, same keys; a change later, new tail."""
    base = list(range(64))
    changed = [*base[:40], 999_999, *base[41:]]
    a, b = chain_keys(base, 16), chain_keys(changed, 16)
    assert a[:2] == b[:2]
    assert a[2] != b[2]
    assert a[3] != b[3], "a change in block 2 must propagate to every later key"


def test_extra_changes_every_key() -> None:
    plain = chain_keys(list(range(64)), 16)
    salted = chain_keys(list(range(64)), 16, extra=SALT)
    other = chain_keys(list(range(64)), 16, extra=b"tenant-salt2")
    assert all(p != s for p, s in zip(plain, salted, strict=True))
    assert all(s != o for s, o in zip(salted, other, strict=True))


def test_extra_enters_the_first_block_only() -> None:
    salted = chain_keys(list(range(32)), 16, extra=SALT)
    first = hashlib.sha256(bytes(32) + SALT + struct.pack("<16I", *range(16))).digest()
    second = hashlib.sha256(first + struct.pack("<16I", *range(16, 32))).digest()
    assert salted == [first, second]


@pytest.mark.parametrize("algorithm", list(HashAlgorithm))
@pytest.mark.parametrize("hashed", [1, 3, 5])
def test_a_chain_continued_after_a_key_equals_the_chain_hashed_whole(
    algorithm: HashAlgorithm, hashed: int
) -> None:
    tokens = list(range(1000, 1000 + 6 * 16 + 5))
    whole = chain_keys(tokens, 16, extra=SALT, algorithm=algorithm)
    head = whole[:hashed]
    tail = chain_keys(tokens[hashed * 16 :], 16, algorithm=algorithm, after=head[-1])
    assert head + tail == whole


def test_extra_and_after_together_are_refused() -> None:
    with pytest.raises(InvalidRequest, match="extra enters a chain's first block only"):
        chain_keys(list(range(32)), 16, extra=SALT, after=bytes(32))


def test_token_container_types_agree() -> None:
    tokens = list(range(40))
    expected = chain_keys(tokens, 16)
    assert chain_keys(np.array(tokens, dtype=np.int64), 16) == expected
    assert chain_keys(np.array(tokens, dtype=np.uint32), 16) == expected
    assert chain_keys(tuple(tokens), 16) == expected
    assert chain_keys(torch.tensor(tokens).numpy(), 16) == expected


def test_large_token_ids_are_u32() -> None:
    tokens = [2**32 - 1] * 16
    expected = hashlib.sha256(bytes(32) + b"\xff" * 64).digest()
    assert chain_keys(tokens, 16) == [expected]


@pytest.mark.parametrize(
    ("tokens", "fragment"),
    [
        ([-1, *range(15)], "[0, 2**32)"),
        ([2**32, *range(15)], "[0, 2**32)"),
        ([[0] * 16, [1] * 16], "one-dimensional"),
        ([0.5] * 16, "integers"),
    ],
    ids=["negative", "too-large", "two-dimensional", "floats"],
)
def test_bad_tokens_raise_invalid_request(tokens: object, fragment: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        chain_keys(tokens, 16)  # type: ignore[arg-type]
    assert fragment in str(raised.value)


def test_block_tokens_must_be_positive() -> None:
    with pytest.raises(InvalidRequest, match="block_tokens"):
        chain_keys(list(range(16)), 0)


def test_validate_key_limits() -> None:
    validate_key(b"\x00")
    validate_key(b"k" * MAX_KEY_BYTES)
    with pytest.raises(InvalidRequest, match="empty"):
        validate_key(b"")
    with pytest.raises(InvalidRequest, match="65 bytes"):
        validate_key(b"k" * (MAX_KEY_BYTES + 1))
