"""`kvstore-bench lz4`'s in-process half: real prefill KV, and the codec figures on it."""

from __future__ import annotations

import torch

from kvstore.bench.lz4 import DTYPES, datasets, layout_of, measure_codec, prefill_kv


def test_the_prefill_kv_is_paged_blocks_of_the_model_layout() -> None:
    config, kv = prefill_kv(128)
    assert kv.shape == (
        2,
        config.num_layers,
        2,
        config.page_tokens,
        config.num_kv_heads,
        config.head_dim,
    )
    assert kv.abs().sum() > 0  # the prefill wrote every page
    sets = datasets(kv)
    assert set(sets) == {*DTYPES, "random"}
    assert sets["fp8"].dtype == torch.float8_e4m3fn
    assert sets["random"].shape == kv.shape


def test_codec_figures_random_bytes_stay_raw_and_kv_round_trips() -> None:
    config, kv = prefill_kv(128)
    sets = datasets(kv)
    layout = layout_of(config, torch.float16)
    ratio, compressed, compress_gbps, decompress_gbps = measure_codec(
        layout, sets["random"], min_saving=0.1, rounds=1
    )
    assert (ratio, compressed) == (1.0, 0.0)
    assert compress_gbps > 0
    assert decompress_gbps > 0
    # Every layer compressed (min_saving 0 keeps any saving): decoding checks each
    # layer's checksum, so a wrong round trip raises instead of returning a ratio.
    bf16 = layout_of(config, torch.bfloat16)
    ratio, compressed, _, _ = measure_codec(bf16, sets["bf16"], min_saving=0.0, rounds=1)
    assert ratio > 1.0
    assert compressed > 0
