"""Tests for the model presets and the capacity planner."""

from __future__ import annotations

import argparse
import json

import pytest

from kvstore.bench.plan import (
    add_plan_arguments,
    attention_flops_per_key,
    break_even_bandwidth,
    capacity_footprint_bytes,
    decode_operational_intensity,
    prefill_flops_per_token,
    recompute_seconds,
    run_plan,
    tier_sizes_for_sessions,
)
from kvstore.bench.presets import (
    PRESETS,
    ModelPreset,
    UnknownPresetError,
    get_preset,
    preset_names,
)


def make_preset(**overrides: object) -> ModelPreset:
    """A toy dense GQA model small enough to check every number by hand (128 B of KV/token)."""
    fields: dict[str, object] = {
        "name": "toy",
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
        "head_dim": 8,
        "hidden_size": 32,
        "params_total": 1000,
        "params_active": 1000,
    }
    fields.update(overrides)
    return ModelPreset(**fields)  # type: ignore[arg-type]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="plan")
    add_plan_arguments(parser)
    return parser.parse_args(list(argv))


# ---- presets -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kv_bytes_per_token"),
    [
        ("Llama-3-8B", 2 * 32 * 8 * 128 * 2),  # 131072
        ("Llama-3-70B", 2 * 80 * 8 * 128 * 2),  # 327680
        ("Qwen2.5-32B", 2 * 64 * 8 * 128 * 2),  # 262144
        ("DeepSeek-V3", 61 * (512 + 64) * 2),  # 70272
        ("Mixtral-8x7B", 2 * 32 * 8 * 128 * 2),
        ("Qwen3-30B-A3B", 2 * 48 * 4 * 128 * 2),  # 98304
    ],
)
def test_kv_bytes_per_token(name: str, kv_bytes_per_token: int) -> None:
    assert get_preset(name).kv_bytes_per_token == kv_bytes_per_token


def test_exact_kv_bytes_of_reference_models() -> None:
    assert get_preset("Llama-3-8B").kv_bytes_per_token == 131072
    assert get_preset("Llama-3-70B").kv_bytes_per_token == 327680
    assert get_preset("DeepSeek-V3").kv_bytes_per_token == 70272


def test_preset_kinds() -> None:
    assert get_preset("DeepSeek-V3").attention == "mla"
    assert get_preset("DeepSeek-V3").is_moe
    assert get_preset("Mixtral-8x7B").is_moe
    assert not get_preset("Llama-3-70B").is_moe
    assert {p.attention for p in PRESETS.values()} >= {"gqa", "mla"}


@pytest.mark.parametrize("alias", ["llama3-8b", "LLAMA-3-8B", "llama_3_8b", "Llama-3.1-8B"])
def test_get_preset_accepts_aliases(alias: str) -> None:
    assert get_preset(alias).name == "Llama-3-8B"


def test_get_preset_unknown_lists_valid_names() -> None:
    with pytest.raises(UnknownPresetError, match="gpt-5") as info:
        get_preset("gpt-5")
    for name in preset_names():
        assert name in str(info.value)


def test_aliases_are_unambiguous() -> None:
    owners: dict[str, str] = {}
    for preset in PRESETS.values():
        for key in (preset.name, *preset.aliases):
            assert get_preset(key) is preset
            owners.setdefault(key.lower(), preset.name)
            assert owners[key.lower()] == preset.name


def test_mha_kv_bytes_and_validation() -> None:
    mha = make_preset(num_kv_heads=4, attention="mha")
    assert mha.kv_bytes_per_token == 2 * 2 * 4 * 8 * 2
    with pytest.raises(ValueError, match="MHA"):
        make_preset(attention="mha")
    with pytest.raises(ValueError, match="MLA"):
        make_preset(attention="mla")


# ---- formulas ------------------------------------------------------------------------------


def test_capacity_footprint_by_hand() -> None:
    cf = capacity_footprint_bytes(
        make_preset(), context_tokens=10, batch=2, weight_bytes_per_param=2
    )
    assert cf.kv_bytes_per_request == 10 * 128
    assert cf.weight_bytes == 2000
    assert cf.per_request_bytes == 1280 + 2000 / 2
    assert cf.total_bytes == 2 * 1280 + 2000


def test_capacity_footprint_of_llama_70b_at_128k() -> None:
    cf = capacity_footprint_bytes(get_preset("Llama-3-70B"), 131072, 8, 2)
    assert cf.kv_bytes_per_request == 40 * 2**30  # 40 GiB of KV per request
    assert cf.total_bytes == 8 * 40 * 2**30 + 141.2e9


def test_decode_operational_intensity_by_hand() -> None:
    step = decode_operational_intensity(
        make_preset(), context_tokens=10, batch=2, weight_bytes_per_param=2
    )
    # per request: 2 * 1000 params + 4 * 2 layers * 4 heads * 8 dims * 10 keys = 2000 + 2560
    assert step.flops == 2 * 4560
    assert step.bytes_moved == 2000 + 2 * 1280
    assert step.operational_intensity == pytest.approx(9120 / 4560)


def test_mla_attention_flops() -> None:
    ds = get_preset("DeepSeek-V3")
    assert attention_flops_per_key(ds, absorbed=True) == 2 * 61 * 128 * (2 * 512 + 64)
    assert attention_flops_per_key(ds, absorbed=False) == 2 * 61 * 128 * (2 * 128 + 64)
    gqa = get_preset("Llama-3-8B")
    assert attention_flops_per_key(gqa, absorbed=True) == 4 * 32 * 32 * 128


def test_decode_oi_is_low_at_long_context_and_mla_raises_it() -> None:
    llama = decode_operational_intensity(get_preset("Llama-3-70B"), 131072, 8)
    deepseek = decode_operational_intensity(get_preset("DeepSeek-V3"), 131072, 8)
    assert llama.operational_intensity < 10
    assert deepseek.operational_intensity > 10 * llama.operational_intensity


def test_prefill_and_break_even_by_hand() -> None:
    toy = make_preset()
    # 2 * 1000 + 256 FLOPs per key * (10 + 1) / 2 mean keys
    assert prefill_flops_per_token(toy, 10) == 2000 + 256 * 5.5
    assert recompute_seconds(toy, 10, 1e6) == pytest.approx(10 * 3408 / 1e6)
    assert break_even_bandwidth(toy, 10, 1e6) == pytest.approx(128 * 1e6 / 3408)


def test_break_even_is_kv_bytes_over_recompute_time() -> None:
    llama = get_preset("Llama-3-8B")
    context, rate = 131072, 400e12
    kv_total = llama.kv_bytes_per_token * context
    bandwidth = break_even_bandwidth(llama, context, rate)
    assert bandwidth == pytest.approx(kv_total / recompute_seconds(llama, context, rate))
    assert 0.9e9 < bandwidth < 1.2e9  # about 1 GB/s at 128K tokens and 400 TFLOP/s
    assert break_even_bandwidth(llama, context, 2 * rate) == pytest.approx(2 * bandwidth)


def test_tier_sizes_by_hand() -> None:
    tiers = tier_sizes_for_sessions(make_preset(), 10, 100, hot_fraction=0.2, warm_fraction=0.5)
    assert (tiers.num_hot_sessions, tiers.num_warm_sessions) == (2, 5)
    assert tiers.session_kv_bytes == 12800
    assert (tiers.hbm_bytes, tiers.dram_bytes, tiers.ssd_bytes) == (25600, 64000, 128000)


def test_tier_sessions_round_up_without_float_noise() -> None:
    tiers = tier_sizes_for_sessions(make_preset(), 100, 1, hot_fraction=0.07, warm_fraction=0.291)
    assert (tiers.num_hot_sessions, tiers.num_warm_sessions) == (7, 30)


def test_tier_fractions_are_validated() -> None:
    with pytest.raises(ValueError, match="hot_fraction"):
        tier_sizes_for_sessions(make_preset(), 10, 100, hot_fraction=0.6, warm_fraction=0.5)


@pytest.mark.parametrize("bad", [0, -1, float("nan")])
def test_formulas_reject_non_positive(bad: float) -> None:
    with pytest.raises(ValueError, match="must be a positive"):
        capacity_footprint_bytes(make_preset(), 10, 1, bad)


# ---- CLI -----------------------------------------------------------------------------------


def test_run_plan_json_covers_every_preset(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_plan(parse("--json")) == 0
    report = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in report["models"]] == preset_names()
    assert report["inputs"]["context_tokens"] == 131072
    llama = next(m for m in report["models"] if m["name"] == "Llama-3-8B")
    assert llama["kv_bytes_per_token"] == 131072
    assert llama["capacity_footprint"]["kv_bytes_per_request"] == 16 * 2**30
    assert llama["tiers"]["num_hot_sessions"] == 10


def test_run_plan_selects_models(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse(
        "--model",
        "llama3-8b,deepseek-v3",
        "--model",
        "Llama-3-8B",
        "--json",
        "--context",
        "1024",
        "--batch",
        "1",
    )
    assert run_plan(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in report["models"]] == ["Llama-3-8B", "DeepSeek-V3"]


def test_run_plan_prints_tables(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_plan(parse("--model", "Llama-3-70B")) == 0
    out = capsys.readouterr().out
    assert "Llama-3-70B" in out
    assert "40.0 GiB" in out  # KV of one 128K-token request
    assert "Break-even" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--model", "gpt-5"), "valid names: Llama-3-8B"),
        (("--batch", "0"), "--batch must be positive"),
        (("--context", "-5"), "--context must be positive"),
        (("--sessions", "0"), "--sessions must be positive"),
        (("--prefill-tflops", "0"), "--prefill-tflops must be positive"),
        (("--prefill-tflops", "nan"), "--prefill-tflops must be positive"),
        (("--weight-bytes", "-1"), "--weight-bytes must be positive"),
        (("--hot-fraction", "0.9", "--warm-fraction", "0.5"), "--hot-fraction"),
        (("--model", ","), "--model needs"),
    ],
)
def test_run_plan_bad_values_exit_2(
    argv: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_plan(parse(*argv)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("plan: error: ")
    assert message in captured.err


def test_unparsable_number_is_an_argparse_error() -> None:
    with pytest.raises(SystemExit) as info:
        parse("--batch", "eight")
    assert info.value.code == 2
