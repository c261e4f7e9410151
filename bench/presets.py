"""Model presets for KV-cache sizing.

Figures come from each model's published configuration (Hugging Face ``config.json`` and model
cards). Parameter counts include embeddings; ``params_active`` is what one token touches (equal to
``params_total`` for dense models).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

AttentionKind = Literal["mha", "gqa", "mla"]


class UnknownPresetError(ValueError):
    """Raised by `get_preset` for a name that matches no preset; the message lists valid names."""


@dataclass(frozen=True, kw_only=True)
class ModelPreset:
    """The shape of a model, as far as KV-cache sizing and FLOP counts need it.

    For MLA models ``num_kv_heads`` and ``head_dim`` describe the decompressed per-head K/V
    (``head_dim`` is both the non-rotary QK dim and the V dim), while the cache holds only the
    per-layer latent of ``kv_lora_rank + qk_rope_head_dim`` values per token.
    """

    name: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    params_total: int
    params_active: int
    kv_dtype_bytes: int = 2
    attention: AttentionKind = "gqa"
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for field_name in (
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "hidden_size",
            "params_total",
            "params_active",
            "kv_dtype_bytes",
        ):
            if getattr(self, field_name) <= 0:
                raise ValueError(f"{self.name}: {field_name} must be positive")
        if self.params_active > self.params_total:
            raise ValueError(f"{self.name}: params_active exceeds params_total")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.name}: num_heads must be a multiple of num_kv_heads")
        if self.attention == "mha" and self.num_kv_heads != self.num_heads:
            raise ValueError(f"{self.name}: MHA needs num_kv_heads == num_heads")
        if self.attention == "mla":
            if self.kv_lora_rank <= 0 or self.qk_rope_head_dim <= 0:
                raise ValueError(f"{self.name}: MLA needs kv_lora_rank and qk_rope_head_dim")
        elif self.kv_lora_rank or self.qk_rope_head_dim:
            raise ValueError(f"{self.name}: latent dims are only meaningful for MLA")

    @property
    def is_moe(self) -> bool:
        """Whether a token touches fewer parameters than the model holds."""
        return self.params_active < self.params_total

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of KV cache one token occupies, over all layers.

        GQA/MHA: ``2 (K and V) * layers * kv_heads * head_dim * dtype_bytes``.
        MLA: ``layers * (kv_lora_rank + qk_rope_head_dim) * dtype_bytes`` (one shared latent).
        """
        if self.attention == "mla":
            latent_dim = self.kv_lora_rank + self.qk_rope_head_dim
            return self.num_layers * latent_dim * self.kv_dtype_bytes
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.kv_dtype_bytes

    def weight_bytes(self, bytes_per_param: float, *, active_only: bool = False) -> float:
        """Bytes of weights at ``bytes_per_param`` (2 for bf16, 0.5 for 4-bit)."""
        params = self.params_active if active_only else self.params_total
        return params * bytes_per_param


PRESETS: dict[str, ModelPreset] = {
    preset.name: preset
    for preset in (
        ModelPreset(
            name="Llama-3-8B",
            aliases=("llama-3.1-8b", "meta-llama-3-8b"),
            num_layers=32,
            num_heads=32,
            num_kv_heads=8,
            head_dim=128,
            hidden_size=4096,
            params_total=8_030_000_000,
            params_active=8_030_000_000,
        ),
        ModelPreset(
            name="Llama-3-70B",
            aliases=("llama-3.1-70b", "meta-llama-3-70b"),
            num_layers=80,
            num_heads=64,
            num_kv_heads=8,
            head_dim=128,
            hidden_size=8192,
            params_total=70_600_000_000,
            params_active=70_600_000_000,
        ),
        ModelPreset(
            name="Qwen2.5-32B",
            aliases=("qwen2.5-32b-instruct",),
            num_layers=64,
            num_heads=40,
            num_kv_heads=8,
            head_dim=128,
            hidden_size=5120,
            params_total=32_500_000_000,
            params_active=32_500_000_000,
        ),
        ModelPreset(
            name="DeepSeek-V3",
            aliases=("dsv3", "deepseek-r1"),
            num_layers=61,
            num_heads=128,
            num_kv_heads=128,
            head_dim=128,
            hidden_size=7168,
            params_total=671_000_000_000,
            params_active=37_000_000_000,
            attention="mla",
            kv_lora_rank=512,
            qk_rope_head_dim=64,
        ),
        ModelPreset(
            name="Mixtral-8x7B",
            aliases=("mixtral", "mixtral-8x7b-instruct"),
            num_layers=32,
            num_heads=32,
            num_kv_heads=8,
            head_dim=128,
            hidden_size=4096,
            params_total=46_700_000_000,
            params_active=12_900_000_000,
        ),
        ModelPreset(
            name="Qwen3-30B-A3B",
            aliases=("qwen3-30b", "qwen3-moe"),
            num_layers=48,
            num_heads=32,
            num_kv_heads=4,
            head_dim=128,
            hidden_size=2048,
            params_total=30_500_000_000,
            params_active=3_300_000_000,
        ),
    )
}


def _normalize(name: str) -> str:
    # "Llama-3-8B", "llama3-8b" and "llama_3_8b" all normalize to "llama38b".
    return re.sub(r"[^a-z0-9]", "", name.lower())


_INDEX: dict[str, ModelPreset] = {
    _normalize(key): preset for preset in PRESETS.values() for key in (preset.name, *preset.aliases)
}


def preset_names() -> list[str]:
    """Canonical preset names, in definition order."""
    return list(PRESETS)


def get_preset(name: str) -> ModelPreset:
    """Return the preset called ``name`` (case-, dash- and dot-insensitive; aliases accepted).

    Raises `UnknownPresetError` naming the valid presets when nothing matches.
    """
    preset = _INDEX.get(_normalize(name))
    if preset is None:
        raise UnknownPresetError(
            f"unknown model preset {name!r}; valid names: {', '.join(preset_names())}"
        )
    return preset
