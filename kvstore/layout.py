"""KV layout: the shape of one block, and the namespace a block belongs to.

A block holds the K and V tensors of `block_tokens` consecutive tokens for every
layer, stored layer-major. Layer `l` occupies bytes `[l * layer_bytes, (l + 1) * layer_bytes)`
and inside a layer K (`[block_tokens, num_kv_heads, head_dim]`) precedes V, so one
layer of a block is a contiguous `[2, block_tokens, num_kv_heads, head_dim]` tensor.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from kvstore.errors import InvalidRequest

MAX_NAME_CHARS = 256
MAX_BLOCK_TOKENS = 65536
MAX_LAYERS = 1024
MAX_KV_HEADS = 1024
MAX_HEAD_DIM = 4096


class DType(enum.Enum):
    """Element type of K and V. The values equal the wire enum's numbers."""

    FLOAT16 = 1
    BFLOAT16 = 2
    FLOAT32 = 3
    UINT8 = 4
    INT8 = 5
    FLOAT8_E4M3FN = 6
    FLOAT8_E5M2 = 7

    @property
    def torch_dtype(self) -> torch.dtype:
        return _TORCH_DTYPES[self]

    @property
    def itemsize(self) -> int:
        return _ITEMSIZES[self]

    @classmethod
    def from_torch(cls, dtype: torch.dtype) -> DType:
        for member, candidate in _TORCH_DTYPES.items():
            if candidate == dtype:
                return member
        raise InvalidRequest(f"unsupported KV dtype {dtype}; use one of {_supported_names()}")


_TORCH_DTYPES: dict[DType, torch.dtype] = {
    DType.FLOAT16: torch.float16,
    DType.BFLOAT16: torch.bfloat16,
    DType.FLOAT32: torch.float32,
    DType.UINT8: torch.uint8,
    DType.INT8: torch.int8,
    DType.FLOAT8_E4M3FN: torch.float8_e4m3fn,
    DType.FLOAT8_E5M2: torch.float8_e5m2,
}


# Read on every put message and get chunk: a dict lookup, not torch's dtype attribute.
_ITEMSIZES: dict[DType, int] = {member: dtype.itemsize for member, dtype in _TORCH_DTYPES.items()}


def _supported_names() -> str:
    return ", ".join(str(d) for d in _TORCH_DTYPES.values())


@dataclass(frozen=True, kw_only=True, slots=True)
class KVLayout:
    """Shape and element type of one block; validated on construction."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: DType
    block_tokens: int
    # Derived once: the sizes below are read on every message of every transfer.
    _token_layer_bytes: int = field(init=False, repr=False, compare=False)
    _layer_bytes: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_range("num_layers", self.num_layers, MAX_LAYERS)
        _check_range("num_kv_heads", self.num_kv_heads, MAX_KV_HEADS)
        _check_range("head_dim", self.head_dim, MAX_HEAD_DIM)
        _check_range("block_tokens", self.block_tokens, MAX_BLOCK_TOKENS)
        if not isinstance(self.dtype, DType):
            raise InvalidRequest(f"layout.dtype must be a DType, got {self.dtype!r}")
        token_layer_bytes = 2 * self.num_kv_heads * self.head_dim * self.dtype.itemsize
        object.__setattr__(self, "_token_layer_bytes", token_layer_bytes)
        object.__setattr__(self, "_layer_bytes", token_layer_bytes * self.block_tokens)

    @property
    def token_layer_bytes(self) -> int:
        """Bytes of K and V for one token in one layer."""
        return self._token_layer_bytes

    @property
    def bytes_per_token(self) -> int:
        return self._token_layer_bytes * self.num_layers

    @property
    def layer_bytes(self) -> int:
        """Bytes of one layer of one block."""
        return self._layer_bytes

    @property
    def block_bytes(self) -> int:
        return self._layer_bytes * self.num_layers

    @property
    def layer_shape(self) -> tuple[int, int, int, int]:
        """Shape of one layer of one block: K and V stacked."""
        return (2, self.block_tokens, self.num_kv_heads, self.head_dim)


@dataclass(frozen=True, kw_only=True, slots=True)
class Namespace:
    """Who and what a block belongs to. Blocks in different namespaces never match."""

    tenant: str
    model_fingerprint: str
    layout: KVLayout
    tp_rank: int = 0
    tp_size: int = 1

    def __post_init__(self) -> None:
        for name in ("tenant", "model_fingerprint"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise InvalidRequest(f"namespace.{name} is required (a non-empty string)")
            if len(value) > MAX_NAME_CHARS:
                raise InvalidRequest(
                    f"namespace.{name} is {len(value)} characters; the limit is {MAX_NAME_CHARS}"
                )
        if self.tp_size < 1:
            raise InvalidRequest(f"namespace.tp_size must be >= 1, got {self.tp_size}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise InvalidRequest(
                f"namespace.tp_rank {self.tp_rank} is outside [0, tp_size={self.tp_size})"
            )

    def describe(self) -> str:
        lay = self.layout
        return (
            f"{self.tenant}/{self.model_fingerprint}/tp{self.tp_rank}of{self.tp_size}"
            f"/L{lay.num_layers}xH{lay.num_kv_heads}xD{lay.head_dim}"
            f"/{lay.dtype.name.lower()}/T{lay.block_tokens}"
        )


def _check_range(name: str, value: int, limit: int) -> None:
    if not isinstance(value, int) or not 1 <= value <= limit:
        raise InvalidRequest(f"layout.{name} must be an integer in [1, {limit}], got {value!r}")
