"""Capacity planning behind ``kvstore-bench plan``.

The metrics follow Zhao & Liu, "Heterogeneous Computing: The Key to Powering the Future of AI Agent
Inference" (arXiv 2601.22001), section 2:

- Operational Intensity (OI): operations performed per byte moved from DRAM (the roofline's
  x-axis).
- Capacity Footprint (CF): bytes needed per request in DRAM for generation. With a KV cache the
  paper writes it as ``KV(L) + W / B``: the request's own K and V for ``L`` tokens plus its share
  of the weights ``W`` over a batch of ``B``; ``B * CF`` is what the DRAM (or HBM) must hold.

Everything here is a closed-form estimate: 2 FLOPs per parameter per token, attention FLOPs from the
QK and AV products, and no activations, norms or softmax. Good enough to see which regime a workload
is in and whether fetching a cached prefix beats recomputing it; not a performance model.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from kvstore.bench.presets import ModelPreset, UnknownPresetError, get_preset, preset_names
from kvstore.client import cost
from kvstore.client.cost import PrefillModel
from kvstore.units import human_bytes

DEFAULT_CONTEXT_TOKENS = 131_072
DEFAULT_BATCH = 8
DEFAULT_SESSIONS = 100
DEFAULT_PREFILL_TFLOPS = 400.0  # effective (achieved) dense bf16 rate of an H100-class part
DEFAULT_WEIGHT_BYTES = 2.0
DEFAULT_HOT_FRACTION = 0.1
DEFAULT_WARM_FRACTION = 0.5


@dataclass(frozen=True)
class CapacityFootprint:
    """Bytes one request needs (``per_request_bytes``) and a whole batch needs (``total_bytes``)."""

    kv_bytes_per_request: int
    weight_bytes: float
    batch: int

    @property
    def per_request_bytes(self) -> float:
        """CF = KV(L) + W / B."""
        return self.kv_bytes_per_request + self.weight_bytes / self.batch

    @property
    def total_bytes(self) -> float:
        """B * CF = B * KV(L) + W."""
        return self.batch * self.kv_bytes_per_request + self.weight_bytes


@dataclass(frozen=True)
class DecodeStep:
    """FLOPs and DRAM bytes of one decode step for a batch."""

    flops: float
    bytes_moved: float

    @property
    def operational_intensity(self) -> float:
        """FLOPs per byte moved."""
        return self.flops / self.bytes_moved


@dataclass(frozen=True)
class TierSizes:
    """Bytes of KV cache each tier needs to hold a population of agent sessions.

    Tiers are sized inclusively: DRAM also holds the hot sessions and SSD holds every session, so a
    demotion never has to write and losing an upper tier loses no data.
    """

    num_sessions: int
    context_tokens_per_session: int
    hot_fraction: float
    warm_fraction: float
    num_hot_sessions: int
    num_warm_sessions: int
    session_kv_bytes: int
    hbm_bytes: int
    dram_bytes: int
    ssd_bytes: int


def kv_bytes(preset: ModelPreset, context_tokens: int) -> int:
    """Bytes of KV cache for ``context_tokens`` tokens of one request."""
    return preset.kv_bytes_per_token * context_tokens


def attention_flops_per_key(preset: ModelPreset, *, absorbed: bool) -> int:
    """FLOPs one query token spends on one key token, over all layers.

    GQA/MHA: ``4 * layers * heads * head_dim`` (QK^T and AV, 2 FLOPs per multiply-add; KV heads
    are shared, but every query head does its own products).

    MLA: prefill decompresses the latent into per-head K (``head_dim + rope``) and V
    (``head_dim``): ``2 * layers * heads * (2 * head_dim + rope)``. Decode runs the absorbed form
    directly against the cached latent, QK over ``kv_lora_rank + rope`` and AV over
    ``kv_lora_rank``: ``2 * layers * heads * (2 * kv_lora_rank + rope)``; this is why MLA decode
    has a far higher OI than GQA decode for the same bytes.
    """
    layers_heads = preset.num_layers * preset.num_heads
    if preset.attention != "mla":
        return 4 * layers_heads * preset.head_dim
    if absorbed:
        return 2 * layers_heads * (2 * preset.kv_lora_rank + preset.qk_rope_head_dim)
    return 2 * layers_heads * (2 * preset.head_dim + preset.qk_rope_head_dim)


def capacity_footprint_bytes(
    preset: ModelPreset, context_tokens: int, batch: int, weight_bytes_per_param: float
) -> CapacityFootprint:
    """Capacity Footprint of a request holding ``context_tokens`` tokens in a batch of ``batch``.

    Per the paper (footnote 1): ``CF = KV(L) + W / B`` with ``KV(L) = L * kv_bytes_per_token`` and
    ``W = params_total * weight_bytes_per_param`` (all experts of a MoE must be resident).
    """
    _require_positive(
        context_tokens=context_tokens, batch=batch, weight_bytes_per_param=weight_bytes_per_param
    )
    return CapacityFootprint(
        kv_bytes_per_request=kv_bytes(preset, context_tokens),
        weight_bytes=preset.weight_bytes(weight_bytes_per_param),
        batch=batch,
    )


def decode_operational_intensity(
    preset: ModelPreset, context_tokens: int, batch: int, weight_bytes_per_param: float = 2.0
) -> DecodeStep:
    """One decode step of ``batch`` requests, each attending to ``context_tokens`` cached tokens.

    ``FLOPs = B * (2 * P_active + A * L)`` where ``A`` is `attention_flops_per_key` (absorbed form
    for MLA) and ``bytes = P_active * weight_bytes_per_param + B * L * kv_bytes_per_token``: the
    active weights are read once for the whole batch, every request's KV is read once. OI is their
    ratio (the paper's ops per byte moved from DRAM).

    At long context the KV terms dominate and, for GQA/MHA with 2-byte KV, OI tends to
    ``num_heads / num_kv_heads`` (the GQA group size): 8 for Llama-3-70B whatever the batch.
    For a MoE the batch's tokens route to different experts, so the weight bytes are a lower bound
    and the OI an upper bound.
    """
    _require_positive(
        context_tokens=context_tokens, batch=batch, weight_bytes_per_param=weight_bytes_per_param
    )
    flops_per_request = (
        2 * preset.params_active + attention_flops_per_key(preset, absorbed=True) * context_tokens
    )
    bytes_moved = preset.weight_bytes(weight_bytes_per_param, active_only=True) + batch * kv_bytes(
        preset, context_tokens
    )
    return DecodeStep(flops=float(batch * flops_per_request), bytes_moved=float(bytes_moved))


def prefill_flops_per_token(preset: ModelPreset, context_tokens: int) -> float:
    """Mean FLOPs per token to prefill a prefix of ``context_tokens`` tokens from scratch.

    ``2 * P_active + A * (L + 1) / 2``: with causal attention token ``i`` attends to ``i + 1`` keys,
    so the mean over the prefix is ``(L + 1) / 2`` keys (``A`` as in `attention_flops_per_key`,
    non-absorbed for MLA).
    """
    _require_positive(context_tokens=context_tokens)
    mean_keys = (context_tokens + 1) / 2
    return 2 * preset.params_active + attention_flops_per_key(preset, absorbed=False) * mean_keys


def prefill_model(
    preset: ModelPreset, context_tokens: int, prefill_flops_per_s: float
) -> PrefillModel:
    """The prefill rate of ``preset`` over a ``context_tokens`` prefix at the given FLOP rate."""
    return PrefillModel.from_flops(
        flops_per_token=prefill_flops_per_token(preset, context_tokens),
        flops_per_s=prefill_flops_per_s,
    )


def recompute_seconds(
    preset: ModelPreset, context_tokens: int, prefill_flops_per_s: float
) -> float:
    """Seconds to recompute the KV cache of a ``context_tokens`` prefix at the given FLOP rate."""
    return prefill_model(preset, context_tokens, prefill_flops_per_s).seconds(context_tokens)


def break_even_bandwidth(
    preset: ModelPreset, context_tokens: int, prefill_flops_per_s: float
) -> float:
    """Bandwidth (bytes/s) above which fetching a prefix's cached KV beats recomputing it.

    `kvstore.client.cost.break_even_bandwidth` per token: ``BW* = b * R / F(L)`` with ``b`` the
    KV bytes per token, ``R`` the FLOP rate and ``F`` = `prefill_flops_per_token`. The prefix
    length cancels except through the attention term of ``F(L)``, and batch size, weight
    precision and tier never enter: the break-even is set by bytes per token against FLOPs per
    token. Longer prefixes cost more FLOPs per token, so they lower the bar for fetching.
    """
    return cost.break_even_bandwidth(
        block_bytes=preset.kv_bytes_per_token,
        block_tokens=1,
        prefill=prefill_model(preset, context_tokens, prefill_flops_per_s),
    )


def tier_sizes_for_sessions(
    preset: ModelPreset,
    num_sessions: int,
    context_tokens_per_session: int,
    *,
    hot_fraction: float = DEFAULT_HOT_FRACTION,
    warm_fraction: float = DEFAULT_WARM_FRACTION,
) -> TierSizes:
    """Size HBM, DRAM and SSD for ``num_sessions`` agent sessions of ``context_tokens_per_session``.

    HBM holds the sessions in a turn right now (``hot_fraction``: their whole context is the
    working set of the step), DRAM the recently active ones (``warm_fraction``, hot included) that
    will be fetched back at their next turn, and SSD every session. Session counts round up.
    """
    _require_positive(
        num_sessions=num_sessions, context_tokens_per_session=context_tokens_per_session
    )
    if not 0.0 <= hot_fraction <= warm_fraction <= 1.0:
        raise ValueError(
            "need 0 <= hot_fraction <= warm_fraction <= 1, "
            f"got hot_fraction={hot_fraction!r}, warm_fraction={warm_fraction!r}"
        )
    session_kv = kv_bytes(preset, context_tokens_per_session)
    num_hot = _ceil_sessions(num_sessions, hot_fraction)
    num_warm = _ceil_sessions(num_sessions, warm_fraction)
    return TierSizes(
        num_sessions=num_sessions,
        context_tokens_per_session=context_tokens_per_session,
        hot_fraction=hot_fraction,
        warm_fraction=warm_fraction,
        num_hot_sessions=num_hot,
        num_warm_sessions=num_warm,
        session_kv_bytes=session_kv,
        hbm_bytes=num_hot * session_kv,
        dram_bytes=num_warm * session_kv,
        ssd_bytes=num_sessions * session_kv,
    )


def _ceil_sessions(num_sessions: int, fraction: float) -> int:
    # The epsilon keeps 100 * 0.07 == 7.000000000000001 from rounding up to 8.
    return min(num_sessions, math.ceil(num_sessions * fraction - 1e-9))


def _require_positive(**values: float) -> None:
    for name, value in values.items():
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive number, got {value!r}")


# ---- CLI ---------------------------------------------------------------------------------------


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``plan`` subcommand's options to ``parser``."""
    parser.add_argument(
        "--model",
        action="append",
        metavar="NAME[,NAME...]",
        help=f"model preset (repeatable or comma list; default all: {', '.join(preset_names())})",
    )
    parser.add_argument(
        "--context",
        type=int,
        default=DEFAULT_CONTEXT_TOKENS,
        help="context tokens per request or session (default %(default)s)",
    )
    parser.add_argument(
        "--batch", type=int, default=DEFAULT_BATCH, help="decode batch size (default %(default)s)"
    )
    parser.add_argument(
        "--sessions",
        type=int,
        default=DEFAULT_SESSIONS,
        help="agent sessions to size tiers for (default %(default)s)",
    )
    parser.add_argument(
        "--prefill-tflops",
        type=float,
        default=DEFAULT_PREFILL_TFLOPS,
        help="effective prefill rate in TFLOP/s (default %(default)s)",
    )
    parser.add_argument(
        "--weight-bytes",
        type=float,
        default=DEFAULT_WEIGHT_BYTES,
        help="bytes per weight parameter (default %(default)s; 0.5 for 4-bit)",
    )
    parser.add_argument(
        "--hot-fraction",
        type=float,
        default=DEFAULT_HOT_FRACTION,
        help="sessions mid-turn, held in HBM (default %(default)s)",
    )
    parser.add_argument(
        "--warm-fraction",
        type=float,
        default=DEFAULT_WARM_FRACTION,
        help="recently active sessions, held in DRAM (default %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def run_plan(args: argparse.Namespace) -> int:
    """Run ``kvstore-bench plan``: 0 on success, 2 (message on stderr) for bad arguments."""
    try:
        _validate_args(args)
        presets = _selected_presets(args.model)
        rows = [_plan_model(preset, args) for preset in presets]
    except (UnknownPresetError, ValueError) as exc:
        print(f"plan: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"inputs": _inputs(args), "models": rows}, indent=2))
    else:
        _print_tables(rows, args)
    return 0


def _validate_args(args: argparse.Namespace) -> None:
    for flag, value in (
        ("--context", args.context),
        ("--batch", args.batch),
        ("--sessions", args.sessions),
        ("--prefill-tflops", args.prefill_tflops),
        ("--weight-bytes", args.weight_bytes),
    ):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{flag} must be positive, got {value!r}")
    if not 0.0 <= args.hot_fraction <= args.warm_fraction <= 1.0:
        raise ValueError(
            "need 0 <= --hot-fraction <= --warm-fraction <= 1, got "
            f"{args.hot_fraction!r} and {args.warm_fraction!r}"
        )


def _selected_presets(model_args: list[str] | None) -> list[ModelPreset]:
    if not model_args:
        return [get_preset(name) for name in preset_names()]
    names = [name.strip() for arg in model_args for name in arg.split(",") if name.strip()]
    if not names:
        raise ValueError("--model needs at least one name")
    return list(dict.fromkeys(get_preset(name) for name in names))


def _inputs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "context_tokens": args.context,
        "batch": args.batch,
        "sessions": args.sessions,
        "prefill_flops_per_s": args.prefill_tflops * 1e12,
        "weight_bytes_per_param": args.weight_bytes,
        "hot_fraction": args.hot_fraction,
        "warm_fraction": args.warm_fraction,
    }


def _plan_model(preset: ModelPreset, args: argparse.Namespace) -> dict[str, Any]:
    rate = args.prefill_tflops * 1e12
    cf = capacity_footprint_bytes(preset, args.context, args.batch, args.weight_bytes)
    step = decode_operational_intensity(preset, args.context, args.batch, args.weight_bytes)
    tiers = tier_sizes_for_sessions(
        preset,
        args.sessions,
        args.context,
        hot_fraction=args.hot_fraction,
        warm_fraction=args.warm_fraction,
    )
    return {
        "name": preset.name,
        "attention": preset.attention,
        "moe": preset.is_moe,
        "params_total": preset.params_total,
        "params_active": preset.params_active,
        "kv_bytes_per_token": preset.kv_bytes_per_token,
        "capacity_footprint": {
            "kv_bytes_per_request": cf.kv_bytes_per_request,
            "weight_bytes": cf.weight_bytes,
            "per_request_bytes": cf.per_request_bytes,
            "total_bytes": cf.total_bytes,
        },
        "decode": {
            "flops": step.flops,
            "bytes_moved": step.bytes_moved,
            "operational_intensity": step.operational_intensity,
        },
        "prefill": {
            "flops_per_token": prefill_flops_per_token(preset, args.context),
            "recompute_seconds": recompute_seconds(preset, args.context, rate),
            "break_even_bytes_per_s": break_even_bandwidth(preset, args.context, rate),
        },
        "tiers": asdict(tiers),
    }


def _print_tables(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    console = Console()
    if not console.is_terminal:
        console.width = 120  # rich assumes 80 columns when piped, which wraps every cell

    memory = Table(
        title=f"Capacity footprint: {args.context:,} tokens/request, batch "
        f"{args.batch}, weights at {args.weight_bytes:g} B/param"
    )
    for header in (
        "Model",
        "Attn",
        "Params (active)",
        "KV/token",
        "KV/request",
        "Weights",
        "CF/request",
        "CF x batch",
    ):
        memory.add_column(header, justify="left" if header in ("Model", "Attn") else "right")
    for row in rows:
        cf = row["capacity_footprint"]
        memory.add_row(
            row["name"],
            row["attention"],
            f"{row['params_total'] / 1e9:.1f}B ({row['params_active'] / 1e9:.1f}B)",
            human_bytes(row["kv_bytes_per_token"]),
            human_bytes(cf["kv_bytes_per_request"]),
            human_bytes(cf["weight_bytes"]),
            human_bytes(cf["per_request_bytes"]),
            human_bytes(cf["total_bytes"]),
        )
    console.print(memory)

    compute = Table(
        title=f"Decode OI and fetch-vs-recompute at {args.prefill_tflops:g} TFLOP/s prefill"
    )
    for header in (
        "Model",
        "Decode FLOPs",
        "Bytes moved",
        "OI (FLOP/B)",
        "Prefill FLOP/token",
        "Recompute prefix",
        "Break-even BW",
    ):
        compute.add_column(header, justify="left" if header == "Model" else "right")
    for row in rows:
        decode, prefill = row["decode"], row["prefill"]
        compute.add_row(
            row["name"],
            _fmt_flops(decode["flops"]),
            human_bytes(decode["bytes_moved"]),
            f"{decode['operational_intensity']:.1f}",
            _fmt_flops(prefill["flops_per_token"]),
            f"{prefill['recompute_seconds']:.2f} s",
            _fmt_rate(prefill["break_even_bytes_per_s"]),
        )
    console.print(compute)
    console.print(
        "Break-even BW = KV bytes/token x FLOP rate / prefill FLOPs/token (batch and "
        "tier do not enter); fetching wins above it."
    )

    tiers = Table(title=f"Tiers for {args.sessions} sessions of {args.context:,} tokens")
    for header in ("Model", "KV/session", "Hot", "HBM", "Warm", "DRAM", "SSD"):
        tiers.add_column(header, justify="left" if header == "Model" else "right")
    for row in rows:
        t = row["tiers"]
        tiers.add_row(
            row["name"],
            human_bytes(t["session_kv_bytes"]),
            str(t["num_hot_sessions"]),
            human_bytes(t["hbm_bytes"]),
            str(t["num_warm_sessions"]),
            human_bytes(t["dram_bytes"]),
            human_bytes(t["ssd_bytes"]),
        )
    console.print(tiers)
    console.print(
        f"HBM holds the hot sessions ({args.hot_fraction:.0%}, mid-turn), DRAM the warm "
        f"ones ({args.warm_fraction:.0%}, hot included), SSD all of them."
    )


def _fmt_rate(bytes_per_s: float) -> str:
    if bytes_per_s >= 1e9:
        return f"{bytes_per_s / 1e9:.2f} GB/s"
    return f"{bytes_per_s / 1e6:.0f} MB/s"


def _fmt_flops(flops: float) -> str:
    for scale, unit in ((1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP")):
        if flops >= scale:
            return f"{flops / scale:.1f} {unit}"
    return f"{flops / 1e6:.1f} MFLOP"
