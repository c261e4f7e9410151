"""The codec: torch KV tensors ↔ block-layer bytes, for every dtype and KV form, without copies."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from kvstore.codec import (
    ByteMap,
    KVForm,
    as_bytes,
    block_layer_pieces,
    check_tensor,
    cpu_contiguous,
    expected_shape,
    read_pieces,
    write_pieces,
)
from kvstore.errors import InvalidRequest
from kvstore.layout import DType, KVLayout

ALL_DTYPES = list(DType)
NUM_BLOCKS = 3


def layout_for(dtype: DType) -> KVLayout:
    return KVLayout(num_layers=3, num_kv_heads=2, head_dim=4, dtype=dtype, block_tokens=4)


def block_bytes(kv: torch.Tensor, form: KVForm, layout: KVLayout, block: int, layer: int) -> bytes:
    pieces = block_layer_pieces(kv, form, block, layer, layout.block_tokens)
    return b"".join(bytes(run) for _, run in read_pieces(pieces, 7))


def to_form(sequence: torch.Tensor, layout: KVLayout, form: KVForm, layer: int = 0) -> torch.Tensor:
    """The same KV rearranged: sequence [L, 2, N, H, D] → blocks or one layer's blocks."""
    lay = layout
    num_blocks = sequence.shape[2] // lay.block_tokens
    split = sequence.reshape(
        lay.num_layers, 2, num_blocks, lay.block_tokens, lay.num_kv_heads, lay.head_dim
    )
    blocks = split.permute(2, 0, 1, 3, 4, 5).contiguous()  # [B, L, 2, T, H, D]
    if form is KVForm.BLOCKS:
        return blocks
    if form is KVForm.LAYER:
        return blocks[:, layer].contiguous()
    return sequence


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: d.name.lower())
@pytest.mark.parametrize("form", list(KVForm), ids=lambda f: f.value)
def test_round_trip_through_block_bytes_is_bit_exact(
    dtype: DType,
    form: KVForm,
    make_kv: Callable[..., torch.Tensor],
    same_bytes: Callable[[torch.Tensor, torch.Tensor], bool],
) -> None:
    layout = layout_for(dtype)
    source = make_kv(layout, NUM_BLOCKS, form=form, seed=dtype.value)
    check_tensor(source, layout, form, NUM_BLOCKS)
    dest = torch.zeros_like(source)
    layers = [0] if form is KVForm.LAYER else range(layout.num_layers)
    for block in range(NUM_BLOCKS):
        for layer in layers:
            pieces = block_layer_pieces(source, form, block, layer, layout.block_tokens)
            assert sum(piece.numel() for piece in pieces) == layout.layer_bytes
            targets = block_layer_pieces(dest, form, block, layer, layout.block_tokens)
            for offset, run in read_pieces(pieces, 5):  # odd chunks straddle K/V and elements
                write_pieces(targets, offset, bytes(run))
    assert same_bytes(dest, source)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: d.name.lower())
def test_every_form_yields_the_same_block_bytes(
    dtype: DType, make_kv: Callable[..., torch.Tensor]
) -> None:
    layout = layout_for(dtype)
    sequence = make_kv(layout, NUM_BLOCKS, seed=7)
    blocks = to_form(sequence, layout, KVForm.BLOCKS)
    for layer in range(layout.num_layers):
        one_layer = to_form(sequence, layout, KVForm.LAYER, layer)
        for block in range(NUM_BLOCKS):
            expected = block_bytes(blocks, KVForm.BLOCKS, layout, block, layer)
            assert block_bytes(sequence, KVForm.SEQUENCE, layout, block, layer) == expected
            assert block_bytes(one_layer, KVForm.LAYER, layout, block, layer) == expected


def test_layer_bytes_are_k_then_v_little_endian() -> None:
    layout = KVLayout(num_layers=1, num_kv_heads=1, head_dim=2, dtype=DType.FLOAT32, block_tokens=1)
    kv = torch.tensor([[[[[1.0, 2.0]]], [[[3.0, 4.0]]]]])  # [L=1, 2, N=1, H=1, D=2]
    data = block_bytes(kv, KVForm.SEQUENCE, layout, 0, 0)
    assert data == torch.tensor([1.0, 2.0, 3.0, 4.0]).numpy().astype("<f4").tobytes()


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: d.name.lower())
def test_pieces_are_views_not_copies(dtype: DType, make_kv: Callable[..., torch.Tensor]) -> None:
    layout = layout_for(dtype)
    tokens = slice(layout.block_tokens, 2 * layout.block_tokens)

    blocks = make_kv(layout, NUM_BLOCKS, form=KVForm.BLOCKS)
    (piece,) = block_layer_pieces(blocks, KVForm.BLOCKS, 1, 2, layout.block_tokens)
    assert piece.data_ptr() == blocks[1, 2].data_ptr()

    one_layer = make_kv(layout, NUM_BLOCKS, form=KVForm.LAYER)
    (piece,) = block_layer_pieces(one_layer, KVForm.LAYER, 2, 0, layout.block_tokens)
    assert piece.data_ptr() == one_layer[2].data_ptr()

    sequence = make_kv(layout, NUM_BLOCKS)
    k, v = block_layer_pieces(sequence, KVForm.SEQUENCE, 1, 2, layout.block_tokens)
    assert k.data_ptr() == sequence[2, 0, tokens].data_ptr()
    assert v.data_ptr() == sequence[2, 1, tokens].data_ptr()

    # The runs handed to the wire are views too: a change to the tensor shows through.
    ((_, run),) = read_pieces([k], layout.layer_bytes)
    flat = as_bytes(sequence[2, 0, tokens])
    assert flat.data_ptr() == k.data_ptr()
    flat[0] = (int(flat[0]) + 1) % 256
    assert run[0] == int(flat[0])


def test_cpu_contiguous_copies_only_when_it_must(make_kv: Callable[..., torch.Tensor]) -> None:
    layout = layout_for(DType.BFLOAT16)
    kv = make_kv(layout, NUM_BLOCKS)
    assert cpu_contiguous(kv) is kv
    strided = kv.transpose(3, 4)
    copied = cpu_contiguous(strided)
    assert copied.is_contiguous()
    assert copied.data_ptr() != strided.data_ptr()
    assert torch.equal(copied.view(torch.int16), strided.contiguous().view(torch.int16))


def test_eight_bit_types_travel_as_raw_bytes() -> None:
    layout = layout_for(DType.FLOAT8_E4M3FN)
    values = torch.tensor([0.5, -1.0, 448.0, 0.0], dtype=torch.float32).to(torch.float8_e4m3fn)
    kv = torch.zeros(expected_shape(layout, KVForm.BLOCKS, 1), dtype=torch.float8_e4m3fn)
    kv[0, 0, 0, 0, 0] = values
    data = block_bytes(kv, KVForm.BLOCKS, layout, 0, 0)
    assert data[:4] == values.view(torch.uint8).numpy().tobytes() == bytes([0x30, 0xB8, 0x7E, 0x00])


@pytest.mark.parametrize(
    ("shape_change", "dtype", "fragment"),
    [
        (None, torch.float32, "dtype"),
        ((1, 0), None, "shape"),
    ],
    ids=["wrong-dtype", "wrong-shape"],
)
def test_check_tensor_rejects_mismatches(
    shape_change: tuple[int, int] | None, dtype: torch.dtype | None, fragment: str
) -> None:
    layout = layout_for(DType.FLOAT16)
    shape = list(expected_shape(layout, KVForm.BLOCKS, 2))
    if shape_change is not None:
        shape[shape_change[0]] += 1
    tensor = torch.zeros(shape, dtype=dtype or torch.float16)
    with pytest.raises(InvalidRequest, match=fragment):
        check_tensor(tensor, layout, KVForm.BLOCKS, 2)


def test_sequence_may_hold_a_trailing_partial_block() -> None:
    layout = layout_for(DType.FLOAT16)
    shape = list(expected_shape(layout, KVForm.SEQUENCE, 2))
    shape[2] += 3
    tensor = torch.zeros(shape, dtype=torch.float16)
    check_tensor(tensor, layout, KVForm.SEQUENCE, 2, at_least=True)
    with pytest.raises(InvalidRequest):
        check_tensor(tensor, layout, KVForm.SEQUENCE, 2)
    with pytest.raises(InvalidRequest):
        check_tensor(tensor, layout, KVForm.SEQUENCE, 3, at_least=True)


def test_write_past_the_end_of_a_layer_is_rejected() -> None:
    target = [torch.zeros(4, dtype=torch.uint8), torch.zeros(4, dtype=torch.uint8)]
    with pytest.raises(InvalidRequest, match="past the end"):
        write_pieces(target, 6, b"\x01" * 3)


def test_dtype_mapping_matches_torch() -> None:
    for dtype in DType:
        assert DType.from_torch(dtype.torch_dtype) is dtype
        assert dtype.itemsize == dtype.torch_dtype.itemsize
    assert {d for d in DType if d.itemsize == 1} == {
        DType.UINT8,
        DType.INT8,
        DType.FLOAT8_E4M3FN,
        DType.FLOAT8_E5M2,
    }
    with pytest.raises(InvalidRequest, match="unsupported"):
        DType.from_torch(torch.float64)


# -- ByteMap: the arithmetic byte map the client sends from and receives into ------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: d.name.lower())
@pytest.mark.parametrize("form", list(KVForm), ids=lambda f: f.value)
def test_byte_map_agrees_with_the_pieces(
    dtype: DType, form: KVForm, make_kv: Callable[..., torch.Tensor]
) -> None:
    layout = layout_for(dtype)
    kv = make_kv(layout, NUM_BLOCKS, form=form, seed=dtype.value + 100)
    byte_map = ByteMap(kv, layout, form)
    layers = [0] if form is KVForm.LAYER else range(layout.num_layers)
    for block in range(NUM_BLOCKS):
        for layer in layers:
            runs = byte_map.runs(block, layer, 5)
            assert all(len(run) <= 5 for _, run in runs)
            starts = [0]
            for _, run in runs[:-1]:
                starts.append(starts[-1] + len(run))
            assert [offset for offset, _ in runs] == starts, "runs must tile the layer in order"
            data = b"".join(bytes(run) for _, run in runs)
            assert data == block_bytes(kv, form, layout, block, layer)


@pytest.mark.parametrize("form", list(KVForm), ids=lambda f: f.value)
def test_byte_map_run_views_are_each_blocks_layer(
    form: KVForm, make_kv: Callable[..., torch.Tensor]
) -> None:
    layout = layout_for(DType.BFLOAT16)
    kv = make_kv(layout, NUM_BLOCKS, form=form, seed=7)
    byte_map = ByteMap(kv, layout, form)
    layers = [0] if form is KVForm.LAYER else range(layout.num_layers)
    for layer in layers:
        views = byte_map.run_views(1, NUM_BLOCKS, layer)
        if form is KVForm.SEQUENCE:
            assert views is None  # K and V of a block-layer lie apart
            continue
        assert views is not None
        assert [bytes(view) for view in views] == [
            block_bytes(kv, form, layout, block, layer) for block in range(1, NUM_BLOCKS)
        ]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: d.name.lower())
@pytest.mark.parametrize("form", list(KVForm), ids=lambda f: f.value)
def test_byte_map_write_round_trip(
    dtype: DType,
    form: KVForm,
    make_kv: Callable[..., torch.Tensor],
    same_bytes: Callable[[torch.Tensor, torch.Tensor], bool],
) -> None:
    layout = layout_for(dtype)
    source = make_kv(layout, NUM_BLOCKS, form=form, seed=dtype.value + 200)
    dest = torch.zeros_like(source)
    reader, writer = ByteMap(source, layout, form), ByteMap(dest, layout, form)
    layers = [0] if form is KVForm.LAYER else range(layout.num_layers)
    for block in range(NUM_BLOCKS):
        for layer in layers:
            for offset, run in reader.runs(block, layer, 7):
                writer.write(block, layer, offset, run)
    assert same_bytes(dest, source)


def test_byte_map_runs_are_views_of_the_tensor(make_kv: Callable[..., torch.Tensor]) -> None:
    layout = layout_for(DType.BFLOAT16)
    kv = make_kv(layout, NUM_BLOCKS)
    ((_, key_run), (_, value_run)) = ByteMap(kv, layout, KVForm.SEQUENCE).runs(
        1, 2, layout.layer_bytes
    )
    flat = as_bytes(kv[2, 1, layout.block_tokens : 2 * layout.block_tokens])
    flat[0] = (int(flat[0]) + 1) % 256
    assert value_run[0] == int(flat[0]), "runs must alias the tensor, not copy it"
    assert len(key_run) == len(value_run) == layout.layer_bytes // 2


def test_byte_map_with_a_trailing_partial_block(
    make_kv: Callable[..., torch.Tensor],
) -> None:
    layout = layout_for(DType.FLOAT16)
    kv = make_kv(layout, 2, extra_tokens=3)
    data = b"".join(bytes(run) for _, run in ByteMap(kv, layout, KVForm.SEQUENCE).runs(1, 1, 64))
    assert data == block_bytes(kv, KVForm.SEQUENCE, layout, 1, 1)


def test_byte_map_rejects_what_it_cannot_address() -> None:
    layout = layout_for(DType.FLOAT16)
    kv = torch.zeros(expected_shape(layout, KVForm.BLOCKS, 2), dtype=torch.float16)
    with pytest.raises(InvalidRequest, match="contiguous"):
        ByteMap(kv.transpose(0, 1), layout, KVForm.BLOCKS)
    with pytest.raises(InvalidRequest, match="past the end"):
        ByteMap(kv, layout, KVForm.BLOCKS).write(0, 0, layout.layer_bytes - 1, b"\x00\x00")
