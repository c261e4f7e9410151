"""A small decoder-only transformer over a paged KV cache, for the disaggregated benchmark.

The cache layout is the contract with the KV store: per layer, one tensor of shape
``[num_pages, 2, page_tokens, num_kv_heads, head_dim]``. One page of one layer is therefore a
contiguous ``[2, page_tokens, num_kv_heads, head_dim]`` tensor (K then V), which is exactly one
block-layer in the store, so loading or saving a page needs no copy or reshape.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_INIT_STD = 0.02
_TOKEN_DTYPES = (torch.int64, torch.int32)

_POSITIVE_INT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "intermediate_size",
    "page_tokens",
)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape of the model and of its paged KV cache; validated on construction.

    ``page_tokens`` is the cache's page size and must equal the KV store's tokens per block.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float = 10_000.0
    rms_eps: float = 1e-6
    dtype: torch.dtype = torch.float32
    page_tokens: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        for name in _POSITIVE_INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads}) for grouped-query attention"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not (math.isfinite(self.rope_theta) and self.rope_theta > 0):
            raise ValueError(f"rope_theta must be positive and finite, got {self.rope_theta!r}")
        if not (math.isfinite(self.rms_eps) and self.rms_eps > 0):
            raise ValueError(f"rms_eps must be positive and finite, got {self.rms_eps!r}")
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point torch.dtype, got {self.dtype!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")

    @classmethod
    def tiny(cls) -> ModelConfig:
        """A model that runs in milliseconds on CPU, for tests."""
        return cls(
            vocab_size=512,
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            intermediate_size=128,
            page_tokens=16,
        )

    @classmethod
    def small(cls) -> ModelConfig:
        """About 55M parameters: prefilling a few thousand tokens takes seconds on CPU."""
        return cls(
            vocab_size=32_000,
            hidden_size=512,
            num_layers=8,
            num_heads=8,
            num_kv_heads=2,
            head_dim=64,
            intermediate_size=1408,
            page_tokens=64,
        )

    @property
    def page_nbytes(self) -> int:
        """Bytes of one page of one layer (K and V), i.e. one block-layer in the store."""
        return 2 * self.page_tokens * self.num_kv_heads * self.head_dim * self.dtype.itemsize


@dataclass(eq=False)
class Sequence:
    """One request's view of the cache: its page table and how many positions are filled."""

    page_ids: list[int] = field(default_factory=list)
    num_tokens: int = 0


class OutOfPagesError(RuntimeError):
    """The cache has too few free pages for an allocation."""


class PagedKVCache:
    """Per-layer K/V pages shared by many sequences; position ``p`` of a sequence lives in
    page ``seq.page_ids[p // page_tokens]`` at slot ``p % page_tokens``."""

    def __init__(
        self, config: ModelConfig, num_pages: int, device: torch.device | str | None = None
    ) -> None:
        if num_pages <= 0:
            raise ValueError(f"num_pages must be positive, got {num_pages}")
        self.config = config
        shape = (num_pages, 2, config.page_tokens, config.num_kv_heads, config.head_dim)
        self._layers = [
            torch.zeros(shape, dtype=config.dtype, device=device) for _ in range(config.num_layers)
        ]
        # Popped from the end, so low page ids are handed out first.
        self._free = list(range(num_pages - 1, -1, -1))

    @property
    def device(self) -> torch.device:
        return self._layers[0].device

    @property
    def num_pages(self) -> int:
        return self._layers[0].shape[0]

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    def pages_for(self, num_tokens: int) -> int:
        """Pages needed to hold ``num_tokens`` positions."""
        return -(-num_tokens // self.config.page_tokens)

    def allocate(self, seq: Sequence, num_tokens: int) -> list[int]:
        """Grow ``seq``'s page table to hold ``num_tokens`` positions; return the new page ids."""
        missing = self.pages_for(num_tokens) - len(seq.page_ids)
        if missing <= 0:
            return []
        if missing > len(self._free):
            raise OutOfPagesError(
                f"need {missing} more pages for {num_tokens} tokens, {len(self._free)} free"
            )
        new_pages = [self._free.pop() for _ in range(missing)]
        seq.page_ids.extend(new_pages)
        return new_pages

    def free(self, seq: Sequence) -> None:
        """Return ``seq``'s pages to the cache and reset it to empty."""
        self._free.extend(reversed(seq.page_ids))
        seq.page_ids.clear()
        seq.num_tokens = 0

    def layer(self, layer: int) -> Tensor:
        """All pages of one layer: ``[num_pages, 2, page_tokens, num_kv_heads, head_dim]``."""
        return self._layers[layer]

    def page_view(self, layer: int, page: int) -> Tensor:
        """A contiguous view ``[2, page_tokens, num_kv_heads, head_dim]`` (K then V) of one
        page; writing into it writes the cache."""
        return self._layers[layer][page]

    def write(self, layer: int, seq: Sequence, start: int, key: Tensor, value: Tensor) -> None:
        """Store ``key``/``value`` (``[n, num_kv_heads, head_dim]``) at positions
        ``[start, start + n)`` of ``seq``, whose pages must already be allocated."""
        end = start + key.shape[0]
        if start < 0 or end > len(seq.page_ids) * self.config.page_tokens:
            raise ValueError(
                f"positions [{start}, {end}) are outside the {len(seq.page_ids)} allocated pages"
            )
        positions = torch.arange(start, end, device=self.device)
        page_table = torch.tensor(seq.page_ids, device=self.device)
        pages = page_table[positions // self.config.page_tokens]
        slots = positions % self.config.page_tokens
        kv = self._layers[layer]
        kv[pages, 0, slots] = key
        kv[pages, 1, slots] = value

    def gather(self, layer: int, seq: Sequence, num_tokens: int) -> tuple[Tensor, Tensor]:
        """K and V (each ``[num_tokens, num_kv_heads, head_dim]``) at positions
        ``[0, num_tokens)`` of ``seq``."""
        num_pages = self.pages_for(num_tokens)
        if num_pages > len(seq.page_ids):
            raise ValueError(
                f"{num_tokens} tokens need {num_pages} pages, seq has {len(seq.page_ids)}"
            )
        page_table = torch.tensor(seq.page_ids[:num_pages], device=self.device)
        kv = self._layers[layer].index_select(0, page_table)
        c = self.config
        kv = kv.transpose(0, 1).reshape(2, num_pages * c.page_tokens, c.num_kv_heads, c.head_dim)
        return kv[0, :num_tokens], kv[1, :num_tokens]


class LayerHooks(Protocol):
    """Per-layer callbacks of a forward pass, where a KV connector plugs in."""

    def before_layer(self, layer: int) -> None:
        """Called before ``layer`` reads the cache (vLLM's ``wait_for_layer_load``)."""

    def after_layer(self, layer: int) -> None:
        """Called once ``layer`` has written its new K/V into the cache (``save_kv_layer``)."""


def _check_tokens(tokens: Tensor) -> None:
    if tokens.dim() != 1 or tokens.numel() == 0 or tokens.dtype not in _TOKEN_DTYPES:
        raise ValueError(
            "tokens must be a non-empty 1-D int64/int32 tensor, "
            f"got shape {tuple(tokens.shape)} {tokens.dtype}"
        )


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return xf.to(x.dtype) * weight


def _apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class _Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        q_size = config.num_heads * config.head_dim
        kv_size = config.num_kv_heads * config.head_dim
        self.split_sizes = [q_size, kv_size, kv_size]
        self.attn_norm = nn.Parameter(torch.ones(config.hidden_size))
        self.qkv_proj = nn.Parameter(torch.empty(q_size + 2 * kv_size, config.hidden_size))
        self.o_proj = nn.Parameter(torch.empty(config.hidden_size, q_size))
        self.mlp_norm = nn.Parameter(torch.ones(config.hidden_size))
        self.gate_up_proj = nn.Parameter(
            torch.empty(2 * config.intermediate_size, config.hidden_size)
        )
        self.down_proj = nn.Parameter(torch.empty(config.hidden_size, config.intermediate_size))

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c = self.config
        h = _rms_norm(x, self.attn_norm, c.rms_eps)
        q, k, v = torch.split(F.linear(h, self.qkv_proj), self.split_sizes, dim=-1)
        n = x.shape[0]
        q = _apply_rope(q.reshape(n, c.num_heads, c.head_dim), cos, sin)
        k = _apply_rope(k.reshape(n, c.num_kv_heads, c.head_dim), cos, sin)
        return q, k, v.reshape(n, c.num_kv_heads, c.head_dim)

    def attend(self, q: Tensor, key: Tensor, value: Tensor, start: int) -> Tensor:
        """Queries at positions ``[start, start + n)`` over keys at ``[0, start + n)``."""
        c = self.config
        n, total = q.shape[0], key.shape[0]
        qh, kh, vh = q.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        group = c.num_heads // c.num_kv_heads
        if group > 1:
            kh = kh.repeat_interleave(group, dim=0)
            vh = vh.repeat_interleave(group, dim=0)
        if start == 0:
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
        elif n == 1:
            out = F.scaled_dot_product_attention(qh, kh, vh)
        else:
            # is_causal aligns the mask top-left; a suffix needs it aligned bottom-right.
            key_pos = torch.arange(total, device=q.device)
            query_pos = torch.arange(start, start + n, device=q.device)
            mask = key_pos[None, :] <= query_pos[:, None]
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
        return F.linear(out.transpose(0, 1).reshape(n, -1), self.o_proj)

    def mlp(self, x: Tensor) -> Tensor:
        h = _rms_norm(x, self.mlp_norm, self.config.rms_eps)
        gate, up = F.linear(h, self.gate_up_proj).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_proj)


_KVFn = Callable[[int, Tensor, Tensor], tuple[Tensor, Tensor]]


class Transformer(nn.Module):
    """Decoder-only transformer (RMSNorm, GQA with RoPE, SwiGLU), weights drawn from
    ``config.seed``. Call ``forward`` directly: it is typed, ``__call__`` is not."""

    def __init__(self, config: ModelConfig, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Parameter(torch.empty(config.vocab_size, config.hidden_size))
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.num_layers))
        self.final_norm = nn.Parameter(torch.ones(config.hidden_size))
        self.lm_head = nn.Parameter(torch.empty(config.vocab_size, config.hidden_size))
        # Drawn in float32 on CPU so the weights do not depend on device or dtype.
        generator = torch.Generator().manual_seed(config.seed)
        with torch.no_grad():
            for param in self.parameters():
                if param.dim() > 1:
                    param.normal_(0.0, _INIT_STD, generator=generator)
        self.requires_grad_(False)
        self.to(device=device, dtype=config.dtype)

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @torch.no_grad()
    def forward(
        self,
        tokens: Tensor,
        seq: Sequence,
        cache: PagedKVCache,
        hooks: LayerHooks | None = None,
        *,
        last_logits_only: bool = False,
    ) -> Tensor:
        """Run ``tokens`` (``[n]``) at positions ``[seq.num_tokens, seq.num_tokens + n)``.

        Positions before ``seq.num_tokens`` must already be in ``cache`` (computed or loaded),
        so this is a full prefill, a suffix prefill, or (``n == 1``) a decode step. Allocates
        pages as needed and advances ``seq.num_tokens`` by ``n``. Returns float32 logits
        ``[n, vocab_size]``, or ``[1, vocab_size]`` for the last position only.
        """
        if cache.config != self.config:
            raise ValueError("cache was built for a different ModelConfig")
        if cache.device != self.device:
            raise ValueError(f"cache is on {cache.device}, model on {self.device}")
        _check_tokens(tokens)
        start = seq.num_tokens
        end = start + tokens.numel()
        cache.allocate(seq, end)

        def paged_kv(layer: int, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
            cache.write(layer, seq, start, key, value)
            return cache.gather(layer, seq, end)

        logits = self._run(tokens, start, paged_kv, hooks, last_logits_only)
        seq.num_tokens = end
        return logits

    @torch.no_grad()
    def forward_dense(self, tokens: Tensor) -> Tensor:
        """Recompute ``tokens`` (``[n]``) from position 0 without any cache: the reference
        that paged runs are checked against. Returns float32 logits ``[n, vocab_size]``."""
        _check_tokens(tokens)
        return self._run(tokens, 0, lambda _layer, key, value: (key, value), None, False)

    def _run(
        self,
        tokens: Tensor,
        start: int,
        kv_fn: _KVFn,
        hooks: LayerHooks | None,
        last_logits_only: bool,
    ) -> Tensor:
        tokens = tokens.to(self.device)
        cos, sin = self._rope(torch.arange(start, start + tokens.numel(), device=self.device))
        x = F.embedding(tokens, self.embed)
        for layer in range(self.config.num_layers):
            block = cast(_Block, self.blocks[layer])
            if hooks is not None:
                hooks.before_layer(layer)
            q, key, value = block.qkv(x, cos, sin)
            key, value = kv_fn(layer, key, value)
            x = x + block.attend(q, key, value, start)
            # Called before the MLP so that a connector's save overlaps with its compute.
            if hooks is not None:
                hooks.after_layer(layer)
            x = x + block.mlp(x)
        if last_logits_only:
            x = x[-1:]
        return F.linear(_rms_norm(x, self.final_norm, self.config.rms_eps), self.lm_head).float()

    def _rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos and sin ``[n, 1, head_dim]``, float32, broadcasting over heads."""
        head_dim = self.config.head_dim
        exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
        inv_freq = torch.exp(exponents * (-math.log(self.config.rope_theta) / head_dim))
        freqs = positions.float()[:, None] * inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        return angles.cos(), angles.sin()


@dataclass(frozen=True)
class Generation:
    """Greedy output: ``logits[i]`` (float32) is what ``token_ids[i]`` was the argmax of."""

    token_ids: list[int]
    logits: Tensor


def generate_greedy(
    model: Transformer,
    prompt: Tensor,
    num_new_tokens: int,
    cache: PagedKVCache,
    seq: Sequence | None = None,
    hooks: LayerHooks | None = None,
) -> Generation:
    """Prefill ``prompt`` then decode ``num_new_tokens`` tokens greedily.

    The prompt is appended at ``seq.num_tokens``: pass a ``seq`` whose prefix is already in
    ``cache`` (e.g. loaded from the store) to prefill only the remaining suffix, which must be
    non-empty. The last generated token is not fed back, so it has no K/V in the cache.
    """
    if num_new_tokens <= 0:
        raise ValueError(f"num_new_tokens must be positive, got {num_new_tokens}")
    seq = Sequence() if seq is None else seq
    step_logits = model.forward(prompt, seq, cache, hooks, last_logits_only=True)[0]
    all_logits = [step_logits]
    token_ids = [int(step_logits.argmax())]
    while len(token_ids) < num_new_tokens:
        last = torch.tensor([token_ids[-1]], device=model.device)
        step_logits = model.forward(last, seq, cache, hooks)[0]
        all_logits.append(step_logits)
        token_ids.append(int(step_logits.argmax()))
    return Generation(token_ids=token_ids, logits=torch.stack(all_logits))
