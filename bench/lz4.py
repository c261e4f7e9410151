"""`kvstore-bench lz4`: what lz4 after a byte shuffle buys the SSD tier, on real KV.

The KV is a real prefill's: the disagg benchmark's transformer (kvstore.bench.disagg.model,
`ModelConfig.small()`, seeded random weights) prefills `--tokens` tokens, and its paged
cache, one page per block, is cast to fp16, bf16 and fp8 (float8_e4m3fn). Random bytes
are the incompressible baseline. For each dataset:

- **codec**: ratio (original bytes / stored bytes, over whole blocks, raw layers
  included), and compress and decompress GB/s of the tier's own encoder and decoder
  (`encode_payload` / `decode_payload`: shuffle, lz4, checksums), in this process.
- **SSD tier**: a `kvstore-server` per setting (`--ssd-compression off` and `lz4`), in its
  own process, write-through: put GB/s (acknowledged once the file is in place), then
  a restart on the same directory and a get of every block from SSD only, with the
  files evicted from the page cache (GB/s); and the capacity: blocks of this data that
  fit in `--ssd-bytes`, from the tier's exact accounting (used bytes / blocks).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from kvstore.allocator import tune_allocator
from kvstore.bench.disagg.model import ModelConfig, PagedKVCache, Sequence, Transformer
from kvstore.bench.spawn import spawned_server
from kvstore.bench.tiers import block_files, make_cold
from kvstore.checksum import ChecksumKind, checksum
from kvstore.client import KVClient, KVForm, Namespace, TierKind
from kvstore.layer_codec import LayerCodec
from kvstore.layout import DType, KVLayout
from kvstore.tiers.blockfile import BlockFileHeader, decode_payload, encode_payload
from kvstore.units import human_bytes, parse_size

DTYPES = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp8": torch.float8_e4m3fn,
}


@dataclass(frozen=True)
class DatasetFigures:
    dataset: str
    block_bytes: int
    ratio: float  # original / stored
    layers_compressed: float  # fraction of layers stored compressed
    compress_gbps: float  # original bytes per second
    decompress_gbps: float
    put_raw_gbps: float
    put_lz4_gbps: float
    get_raw_gbps: float
    get_lz4_gbps: float
    ssd_bytes: int
    blocks_fit_raw: int
    blocks_fit_lz4: int


def prefill_kv(num_tokens: int) -> tuple[ModelConfig, torch.Tensor]:
    """The paged KV of one prefill, `[pages, layers, 2, page_tokens, kv_heads, head_dim]`."""
    config = ModelConfig.small()
    model = Transformer(config)
    cache = PagedKVCache(config, -(-num_tokens // config.page_tokens))
    tokens = torch.randint(
        0, config.vocab_size, (num_tokens,), generator=torch.Generator().manual_seed(0)
    )
    model.forward(tokens, Sequence(), cache, last_logits_only=True)
    kv = torch.stack([cache.layer(layer) for layer in range(config.num_layers)], dim=1)
    return config, kv


def datasets(kv: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each dataset as blocks `[pages, layers, ...]` in its dtype; random: fp16-shaped bytes."""
    out = {name: kv.to(dtype).contiguous() for name, dtype in DTYPES.items()}
    noise = np.random.default_rng(0).integers(0, 256, kv.numel() * 2, dtype=np.uint8)
    out["random"] = torch.from_numpy(noise).view(torch.float16).reshape(kv.shape)
    return out


def layout_of(config: ModelConfig, dtype: torch.dtype) -> KVLayout:
    return KVLayout(
        num_layers=config.num_layers,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        dtype=DType.from_torch(dtype),
        block_tokens=config.page_tokens,
    )


def measure_codec(
    layout: KVLayout, blocks: torch.Tensor, min_saving: float, rounds: int
) -> tuple[float, float, float, float]:
    """(ratio, fraction of layers compressed, compress GB/s, decompress GB/s)."""
    namespace = Namespace(tenant="bench", model_fingerprint="lz4", layout=layout)
    codec = LayerCodec(layout.dtype.itemsize, min_saving)
    payloads = [block.view(torch.uint8).numpy().tobytes() for block in blocks]
    headers = [
        BlockFileHeader(
            namespace,
            f"{index}".encode(),
            b"",
            ChecksumKind.XXH3_64,
            tuple(
                checksum(
                    ChecksumKind.XXH3_64,
                    payload[layer * layout.layer_bytes : (layer + 1) * layout.layer_bytes],
                )
                for layer in range(layout.num_layers)
            ),
        )
        for index, payload in enumerate(payloads)
    ]
    original = len(payloads) * layout.block_bytes
    compress, decompress = [], []
    encoded: list[tuple[BlockFileHeader, list[bytes | memoryview]]] = []
    for _ in range(rounds):
        start = time.perf_counter()
        encoded = [
            encode_payload(header, [payload], codec)
            for header, payload in zip(headers, payloads, strict=True)
        ]
        compress.append(original / (time.perf_counter() - start) / 1e9)
        stored = [(header, b"".join(bytes(part) for part in parts)) for header, parts in encoded]
        start = time.perf_counter()
        for header, data in stored:
            decode_payload(header, data)
        decompress.append(original / (time.perf_counter() - start) / 1e9)
    stored_bytes = sum(header.payload_bytes for header, _ in encoded)
    num_compressed = sum(
        sum(1 for encoding in header.layer_encodings if encoding.value != "raw")
        for header, _ in encoded
    )
    return (
        original / stored_bytes,
        num_compressed / (len(encoded) * layout.num_layers),
        statistics.median(compress),
        statistics.median(decompress),
    )


async def _put_all(
    target: str, namespace: Namespace, blocks: torch.Tensor, copies: int, chain_blocks: int
) -> tuple[float, int]:
    """Put `copies` copies of the blocks under distinct keys, write-through; (GB/s, blocks)."""
    keys = [f"c{copy}-{index}".encode() for copy in range(copies) for index in range(len(blocks))]
    source = blocks.repeat(copies, *([1] * (blocks.dim() - 1)))
    block_bytes = namespace.layout.block_bytes
    async with KVClient(target, namespace) as client:
        start = time.perf_counter()
        for first in range(0, len(keys), chain_blocks):
            chain = keys[first : first + chain_blocks]
            result = await client.put_blocks(
                chain, source[first : first + len(chain)], form=KVForm.BLOCKS
            )
            if result.num_committed != len(chain):
                raise RuntimeError(f"a put stored {result.num_committed} of {len(chain)} blocks")
        seconds = time.perf_counter() - start
        ssd = (await client.stats()).tier(TierKind.SSD)
    if ssd.num_blocks != len(keys):
        raise RuntimeError(f"{ssd.num_blocks} of {len(keys)} blocks reached SSD")
    return len(keys) * block_bytes / seconds / 1e9, ssd.used_bytes


async def _get_all(
    target: str,
    namespace: Namespace,
    num_blocks: int,
    copies: int,
    chain_blocks: int,
    ssd_dir: Path,
    rounds: int,
) -> float:
    keys = [f"c{copy}-{index}".encode() for copy in range(copies) for index in range(num_blocks)]
    layout = namespace.layout
    dest = torch.empty(
        (chain_blocks, layout.num_layers, *layout.layer_shape), dtype=layout.dtype.torch_dtype
    )
    samples = []
    async with KVClient(target, namespace) as client:
        for _ in range(rounds):
            make_cold(block_files(ssd_dir))
            start = time.perf_counter()
            for first in range(0, len(keys), chain_blocks):
                chain = keys[first : first + chain_blocks]
                served = await client.get_into(chain, dest[: len(chain)], form=KVForm.BLOCKS)
                if served != len(chain):
                    raise RuntimeError(f"served {served} of {len(chain)} blocks")
            samples.append(len(keys) * layout.block_bytes / (time.perf_counter() - start) / 1e9)
        if (await client.stats()).tier(TierKind.DRAM).num_blocks:
            raise RuntimeError("blocks were promoted into DRAM: the get did not measure the SSD")
    return statistics.median(samples)


def measure_ssd(
    workdir: Path,
    namespace: Namespace,
    blocks: torch.Tensor,
    compression: str,
    copies: int,
    chain_blocks: int,
    rounds: int,
) -> tuple[float, float, int]:
    """(put GB/s, cold get GB/s, SSD bytes used) of one server setting."""
    ssd_dir = workdir / f"ssd-{compression}"
    total = copies * len(blocks) * namespace.layout.block_bytes
    common = [
        "--ssd-dir", str(ssd_dir), "--ssd-bytes", str(4 * total),
        "--dram-bytes", str(total + (64 << 20)), "--ssd-compression", compression,
        "--log-level", "warning",
    ]  # fmt: skip
    with spawned_server([*common, "--write-policy", "write-through"]) as target:
        put_gbps, used_bytes = asyncio.run(
            _put_all(target, namespace, blocks, copies, chain_blocks)
        )
    with spawned_server([*common, "--no-promote-on-hit"]) as target:
        get_gbps = asyncio.run(
            _get_all(target, namespace, len(blocks), copies, chain_blocks, ssd_dir, rounds)
        )
    shutil.rmtree(ssd_dir, ignore_errors=True)
    return put_gbps, get_gbps, used_bytes


def add_lz4_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=2048, help="prefill length (tokens)")
    parser.add_argument(
        "--copies",
        type=int,
        default=8,
        help="copies of the prefill's blocks put to each SSD server",
    )
    parser.add_argument("--chain-blocks", type=int, default=32, help="blocks per put and get")
    parser.add_argument("--ssd-bytes", default="16GiB", help="SSD size the capacity column is for")
    parser.add_argument("--min-saving", type=float, default=0.1, help="ssd_compress_min_saving")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds (median)")
    parser.add_argument("--datasets", default="fp16,bf16,fp8,random", help="comma-separated")
    parser.add_argument("--dir", type=Path, default=None, help="where the SSD directories go")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run_lz4(args: argparse.Namespace) -> int:
    tune_allocator()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    wanted = args.datasets.split(",")
    known = [*DTYPES, "random"]  # the names `datasets` makes
    unknown = [name for name in wanted if name not in known]
    if unknown:
        raise SystemExit(
            f"kvstore-bench lz4: unknown dataset(s) {', '.join(unknown)}; "
            f"choose from {', '.join(known)}"
        )
    if args.rounds < 1:
        raise SystemExit("kvstore-bench lz4: --rounds must be at least 1")
    config, kv = prefill_kv(args.tokens)
    ssd_bytes = parse_size(args.ssd_bytes)
    available = datasets(kv)
    figures = []
    workdir = Path(tempfile.mkdtemp(prefix="kvstore-bench-lz4-", dir=args.dir))
    try:
        for name, blocks in available.items():
            if name not in wanted:
                continue
            layout = layout_of(config, blocks.dtype)
            namespace = Namespace(tenant="bench", model_fingerprint=f"lz4-{name}", layout=layout)
            ratio, compressed, compress, decompress = measure_codec(
                layout, blocks, args.min_saving, args.rounds
            )
            runs = {
                compression: measure_ssd(
                    workdir,
                    namespace,
                    blocks,
                    compression,
                    args.copies,
                    args.chain_blocks,
                    args.rounds,
                )
                for compression in ("off", "lz4")
            }
            num_blocks = args.copies * len(blocks)
            figures.append(
                DatasetFigures(
                    dataset=name,
                    block_bytes=layout.block_bytes,
                    ratio=ratio,
                    layers_compressed=compressed,
                    compress_gbps=compress,
                    decompress_gbps=decompress,
                    put_raw_gbps=runs["off"][0],
                    put_lz4_gbps=runs["lz4"][0],
                    get_raw_gbps=runs["off"][1],
                    get_lz4_gbps=runs["lz4"][1],
                    ssd_bytes=ssd_bytes,
                    blocks_fit_raw=int(ssd_bytes // (runs["off"][2] / num_blocks)),
                    blocks_fit_lz4=int(ssd_bytes // (runs["lz4"][2] / num_blocks)),
                )
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps([asdict(figure) for figure in figures], indent=2))
        return 0
    print_report(figures, args.tokens)
    return 0


def print_report(figures: list[DatasetFigures], tokens: int) -> None:
    console = Console(width=140)
    table = Table(title=f"lz4 on the SSD tier (one run; KV of a {tokens}-token prefill)")
    columns = (
        "data", "block", "ratio", "layers lz4", "compress GB/s", "decompress GB/s",
        "put raw", "put lz4", "put ratio", "get raw", "get lz4", "get ratio",
        "blocks fit raw", "blocks fit lz4",
    )  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column == "data" else "right")
    for figure in figures:
        table.add_row(
            figure.dataset,
            human_bytes(figure.block_bytes),
            f"{figure.ratio:.2f}x",
            f"{figure.layers_compressed:.0%}",
            f"{figure.compress_gbps:.2f}",
            f"{figure.decompress_gbps:.2f}",
            f"{figure.put_raw_gbps:.2f}",
            f"{figure.put_lz4_gbps:.2f}",
            f"{figure.put_lz4_gbps / figure.put_raw_gbps:.2f}x",
            f"{figure.get_raw_gbps:.2f}",
            f"{figure.get_lz4_gbps:.2f}",
            f"{figure.get_lz4_gbps / figure.get_raw_gbps:.2f}x",
            f"{figure.blocks_fit_raw:,}",
            f"{figure.blocks_fit_lz4:,}",
        )
    console.print(table)
    if figures:
        console.print(
            f"put/get GB/s: SSD tier, write-through puts, cold gets from SSD only (separate server "
            f"processes); blocks fit: in {human_bytes(figures[0].ssd_bytes)} of SSD, from the "
            "tier's accounting of the stored files."
        )
