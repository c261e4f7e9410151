"""The paged-KV transformer of the disaggregated benchmark, checked against dense recompute."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from kvstore.bench.disagg.model import (
    ModelConfig,
    OutOfPagesError,
    PagedKVCache,
    Sequence,
    Transformer,
    generate_greedy,
)

ATOL = 1e-4


def make_config(**overrides: Any) -> ModelConfig:
    return dataclasses.replace(ModelConfig.tiny(), **overrides)


def make_model(seed: int = 0) -> Transformer:
    return Transformer(make_config(seed=seed))


def make_prompt(num_tokens: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, ModelConfig.tiny().vocab_size, (num_tokens,), generator=generator)


def make_cache(model: Transformer, num_pages: int = 16) -> PagedKVCache:
    return PagedKVCache(model.config, num_pages, model.device)


def prefill(model: Transformer, cache: PagedKVCache, tokens: torch.Tensor) -> Sequence:
    seq = Sequence()
    model.forward(tokens, seq, cache)
    return seq


class Recorder:
    """Records hook calls and whether each layer's first page holds K/V at that moment."""

    def __init__(self, cache: PagedKVCache, page: int) -> None:
        self.cache = cache
        self.page = page
        self.events: list[tuple[str, int, bool]] = []

    def _written(self, layer: int) -> bool:
        return bool(self.cache.page_view(layer, self.page).any())

    def before_layer(self, layer: int) -> None:
        self.events.append(("before", layer, self._written(layer)))

    def after_layer(self, layer: int) -> None:
        self.events.append(("after", layer, self._written(layer)))


@pytest.mark.parametrize("split", [1, 16, 21, 39])
def test_chunked_prefill_matches_whole_prefill(split: int) -> None:
    model = make_model()
    prompt = make_prompt(40)
    whole = model.forward(prompt, Sequence(), make_cache(model), hooks=None)

    cache = make_cache(model)
    seq = Sequence()
    head = model.forward(prompt[:split], seq, cache)
    tail = model.forward(prompt[split:], seq, cache)

    assert seq.num_tokens == 40
    assert len(seq.page_ids) == 3
    torch.testing.assert_close(torch.cat([head, tail]), whole, atol=ATOL, rtol=0)


def test_paged_prefill_matches_dense_recompute() -> None:
    model = make_model()
    prompt = make_prompt(37)
    paged = model.forward(prompt, Sequence(), make_cache(model))
    assert paged.dtype == torch.float32
    assert paged.shape == (37, model.config.vocab_size)
    torch.testing.assert_close(paged, model.forward_dense(prompt), atol=ATOL, rtol=0)


def test_decode_steps_match_dense_recompute() -> None:
    model = make_model()
    prompt = make_prompt(20)
    generation = generate_greedy(model, prompt, 12, make_cache(model))

    assert generation.logits.shape == (12, model.config.vocab_size)
    for step, token_id in enumerate(generation.token_ids):
        sequence = torch.cat([prompt, torch.tensor(generation.token_ids[:step], dtype=torch.long)])
        expected = model.forward_dense(sequence)[-1]
        torch.testing.assert_close(generation.logits[step], expected, atol=ATOL, rtol=0)
        assert token_id == int(expected.argmax())


def test_greedy_decode_is_not_degenerate() -> None:
    model = make_model()
    generation = generate_greedy(model, make_prompt(8), 16, make_cache(model))
    assert len(generation.token_ids) == 16
    assert len(set(generation.token_ids)) >= 2


def test_page_view_is_a_contiguous_block_layer_of_the_cache() -> None:
    config = make_config()
    cache = PagedKVCache(config, num_pages=4)
    cache.allocate(Sequence(), 1)  # occupy page 0 so the sequence's pages start at 1
    seq = Sequence()
    assert cache.allocate(seq, 20) == [1, 2]
    kv_shape = (20, config.num_kv_heads, config.head_dim)
    key = torch.arange(20 * config.num_kv_heads * config.head_dim, dtype=torch.float32)
    key = key.reshape(kv_shape)
    cache.write(1, seq, 0, key, -key)

    for index, page in enumerate(seq.page_ids):
        view = cache.page_view(1, page)
        assert view.shape == (2, config.page_tokens, config.num_kv_heads, config.head_dim)
        assert view.is_contiguous()
        assert view.data_ptr() == cache.layer(1).data_ptr() + page * config.page_nbytes
        positions = slice(index * config.page_tokens, (index + 1) * config.page_tokens)
        filled = key[positions].shape[0]
        torch.testing.assert_close(view[0, :filled], key[positions], atol=0, rtol=0)
        torch.testing.assert_close(view[1, :filled], -key[positions], atol=0, rtol=0)
        assert not view[:, filled:].any()
    assert not cache.page_view(0, 1).any()  # other layers untouched


def test_prefill_fills_pages_in_position_order() -> None:
    model = make_model()
    cache = make_cache(model)
    seq = prefill(model, cache, make_prompt(20))
    page_tokens = model.config.page_tokens
    for layer in range(model.config.num_layers):
        key, value = cache.gather(layer, seq, 20)
        assert key.shape == (20, model.config.num_kv_heads, model.config.head_dim)
        for index, page in enumerate(seq.page_ids):
            view = cache.page_view(layer, page)
            chunk = slice(index * page_tokens, (index + 1) * page_tokens)
            filled = key[chunk].shape[0]
            torch.testing.assert_close(view[0, :filled], key[chunk], atol=0, rtol=0)
            torch.testing.assert_close(view[1, :filled], value[chunk], atol=0, rtol=0)
            assert view[:, :filled].abs().sum() > 0
            assert not view[:, filled:].any()


def test_suffix_prefill_over_copied_prefix_pages_matches_full_prefill() -> None:
    model = make_model()
    prompt = make_prompt(48)
    source = make_cache(model)
    source_seq = Sequence()
    full = model.forward(prompt, source_seq, source)

    # A fresh cache whose page ids differ from the source's, as on another worker.
    target = make_cache(model)
    target.allocate(Sequence(), 3 * model.config.page_tokens)
    seq = Sequence()
    prefix_tokens = 2 * model.config.page_tokens
    target.allocate(seq, prefix_tokens)
    assert seq.page_ids != source_seq.page_ids[:2]
    for layer in range(model.config.num_layers):
        for source_page, target_page in zip(source_seq.page_ids[:2], seq.page_ids, strict=True):
            target.page_view(layer, target_page).copy_(source.page_view(layer, source_page))
    seq.num_tokens = prefix_tokens

    suffix = model.forward(prompt[prefix_tokens:], seq, target)
    torch.testing.assert_close(suffix, full[prefix_tokens:], atol=ATOL, rtol=0)

    reference = generate_greedy(model, prompt, 6, make_cache(model))
    seq.num_tokens = prefix_tokens  # re-run the suffix; its K/V is simply overwritten
    resumed = generate_greedy(model, prompt[prefix_tokens:], 6, target, seq=seq)
    assert resumed.token_ids == reference.token_ids
    torch.testing.assert_close(resumed.logits, reference.logits, atol=ATOL, rtol=0)


def test_hooks_wrap_each_layer_in_order() -> None:
    model = make_model()
    cache = make_cache(model)
    recorder = Recorder(cache, page=0)
    model.forward(make_prompt(5), Sequence(), cache, recorder)
    assert recorder.events == [
        ("before", 0, False),
        ("after", 0, True),
        ("before", 1, False),
        ("after", 1, True),
    ]


def test_same_seed_gives_identical_weights() -> None:
    first, second, other = make_model(seed=7), make_model(seed=7), make_model(seed=8)
    for (name, a), (_, b), (_, c) in zip(
        first.state_dict().items(),
        second.state_dict().items(),
        other.state_dict().items(),
        strict=True,
    ):
        assert torch.equal(a, b), name
        if a.dim() > 1:
            assert not torch.equal(a, c), name


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"num_kv_heads": 3}, "multiple of num_kv_heads"),
        ({"head_dim": 15}, "head_dim must be even"),
        ({"vocab_size": 0}, "vocab_size must be a positive int"),
        ({"page_tokens": -16}, "page_tokens must be a positive int"),
        ({"num_layers": 2.0}, "num_layers must be a positive int"),
        ({"dtype": torch.int32}, "floating-point"),
        ({"rms_eps": 0.0}, "rms_eps"),
        ({"rope_theta": float("nan")}, "rope_theta"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_config_raises_value_error(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_config(**overrides)


@pytest.mark.parametrize(
    "tokens", [torch.tensor([], dtype=torch.long), torch.zeros(2, 3).long(), torch.zeros(3)]
)
def test_forward_rejects_bad_tokens(tokens: torch.Tensor) -> None:
    model = make_model()
    with pytest.raises(ValueError, match="tokens must be"):
        model.forward(tokens, Sequence(), make_cache(model))


def test_small_config_is_valid() -> None:
    config = ModelConfig.small()
    assert config.page_tokens == 64
    assert config.page_nbytes == 2 * 64 * 2 * 64 * 4


def test_cache_rejects_exhaustion_and_bad_positions() -> None:
    config = make_config()
    with pytest.raises(ValueError, match="num_pages"):
        PagedKVCache(config, num_pages=0)
    cache = PagedKVCache(config, num_pages=2)
    seq = Sequence()
    with pytest.raises(OutOfPagesError):
        cache.allocate(seq, 3 * config.page_tokens)
    assert cache.allocate(seq, 2 * config.page_tokens) == [0, 1]
    kv = torch.zeros(1, config.num_kv_heads, config.head_dim)
    with pytest.raises(ValueError, match="outside"):
        cache.write(0, seq, 2 * config.page_tokens, kv, kv)
    cache.free(seq)
    assert (cache.num_free_pages, seq.page_ids, seq.num_tokens) == (2, [], 0)
    assert cache.allocate(seq, 1) == [0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    prompt = make_prompt(40)
    cpu = make_model()
    cuda = Transformer(cpu.config, device="cuda")
    expected = generate_greedy(cpu, prompt, 8, make_cache(cpu))
    actual = generate_greedy(cuda, prompt, 8, make_cache(cuda))
    assert actual.logits.device.type == "cuda"
    torch.testing.assert_close(actual.logits.cpu(), expected.logits, atol=1e-3, rtol=0)
