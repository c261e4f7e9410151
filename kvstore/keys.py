"""Block keys: the chained prefix hash the client library uses by default.

    key_0 = H(ROOT || extra || tokens_0)
    key_i = H(key_{i-1} || tokens_i)            for i > 0

`tokens_i` are the block's token ids as little-endian u32. `ROOT` is all-zero bytes
of the digest's size (32 for SHA-256, 16 for xxh3-128). `extra` (a tenant salt, a LoRA
id) enters the first block only, which is enough: every later key chains from it.
Only full blocks are hashed; a trailing partial block has no key. Digests: SHA-256 by
default, xxh3-128 (big-endian digest bytes, as `xxhash.xxh3_128().digest()`) as an
option. The server treats keys as opaque bytes of 1 to 64 bytes.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Sequence

import numpy as np
import xxhash

from kvstore.errors import InvalidRequest

MAX_KEY_BYTES = 64
_U32_MAX = 2**32 - 1


class HashAlgorithm(enum.Enum):
    SHA256 = "sha256"
    XXH3_128 = "xxh3_128"

    @property
    def digest_bytes(self) -> int:
        return 32 if self is HashAlgorithm.SHA256 else 16

    @property
    def root(self) -> bytes:
        return bytes(self.digest_bytes)


def chain_keys(
    tokens: Sequence[int] | np.ndarray,
    block_tokens: int,
    *,
    extra: bytes = b"",
    algorithm: HashAlgorithm = HashAlgorithm.SHA256,
    after: bytes | None = None,
) -> list[bytes]:
    """Keys of every full block of `tokens`, first block first.

    `after`: the key of the block before `tokens` (they continue a chain already
    hashed up to it), so a chain grows without hashing its head again; `extra`, which
    enters a chain's first block only, must then be empty.
    """
    if block_tokens < 1:
        raise InvalidRequest(f"block_tokens must be >= 1, got {block_tokens}")
    if after is not None and extra:
        raise InvalidRequest("extra enters a chain's first block only; give it or after")
    token_array = _as_u32(tokens)
    num_blocks = len(token_array) // block_tokens
    token_bytes = token_array[: num_blocks * block_tokens].astype("<u4", copy=False).tobytes()
    stride = 4 * block_tokens
    digest = _digest_function(algorithm)
    keys: list[bytes] = []
    parent = algorithm.root + extra if after is None else after
    for index in range(num_blocks):
        key = digest(parent + token_bytes[index * stride : (index + 1) * stride])
        keys.append(key)
        parent = key
    return keys


def validate_key(key: bytes, what: str = "key") -> None:
    if not key:
        raise InvalidRequest(f"{what} is empty; keys are 1 to {MAX_KEY_BYTES} bytes")
    if len(key) > MAX_KEY_BYTES:
        raise InvalidRequest(f"{what} is {len(key)} bytes; keys are at most {MAX_KEY_BYTES} bytes")


def validate_keys(keys: list[bytes], what: str = "keys", *, start: int = 0) -> None:
    """validate_key for `keys[start:]`, in C-speed passes when they are all fine."""
    rest = keys[start:] if start else keys
    if rest and (b"" in rest or max(map(len, rest)) > MAX_KEY_BYTES):
        for index, key in enumerate(rest, start):
            validate_key(key, f"{what}[{index}]")


def _as_u32(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    array = np.asarray(tokens)
    if array.ndim != 1:
        raise InvalidRequest(f"tokens must be one-dimensional, got shape {array.shape}")
    if array.size == 0:
        return array.astype(np.uint32)
    if not np.issubdtype(array.dtype, np.integer):
        raise InvalidRequest(f"tokens must be integers, got dtype {array.dtype}")
    if int(array.min()) < 0 or int(array.max()) > _U32_MAX:
        raise InvalidRequest("token ids must lie in [0, 2**32)")
    return array.astype(np.uint32, copy=False)


def _digest_function(algorithm: HashAlgorithm):  # type: ignore[no-untyped-def]
    if algorithm is HashAlgorithm.SHA256:
        return lambda data: hashlib.sha256(data).digest()
    return lambda data: xxhash.xxh3_128_digest(data)
