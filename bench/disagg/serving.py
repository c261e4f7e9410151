"""What the disaggregated workers share: the model and its store namespace, `LayerHooks` over a
`KVConnector`, what one request served through the store reports (`StoreRun`; the engine in
kvstore.bench.disagg.engine serves it), and recompute without the store.

Fallback policy: the store only ever saves work. If the lookup fails (store down), the request
is prefilled in full. If a load fails part-way (store down, blocks evicted since the lookup,
a checksum mismatch), the worker side reports its blocks and they are recomputed, so a store
failure costs time, never tokens. A failed save is reported in `StoreRun.save_error` and does
not affect the output.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kvstore.bench.disagg.model import ModelConfig, PagedKVCache, Sequence, Transformer
from kvstore.client import DType, KVLayout, Namespace
from kvstore.client.connector import KVConnector

MODELS: dict[str, Callable[[], ModelConfig]] = {
    "tiny": ModelConfig.tiny,
    "small": ModelConfig.small,
}
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


# Largest |logit difference| accepted between a run that loaded part of its KV and one that
# computed all of it. The loaded K/V are bit-identical to computed ones, but a suffix prefill
# multiplies matrices of other shapes than a whole prefill does, so it rounds differently.
_LOGIT_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def logit_tolerance(dtype: torch.dtype) -> float:
    """The |logit| difference the store path may show against recompute in `dtype`."""
    return _LOGIT_TOLERANCE[dtype]


def model_config(name: str, dtype: str = "float32") -> ModelConfig:
    """A named config (`tiny`, `small`) in a named dtype (`float32`, `bfloat16`, `float16`)."""
    return dataclasses.replace(MODELS[name](), dtype=DTYPES[dtype])


def default_device() -> str:
    """CUDA when present, else CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def namespace_for(config: ModelConfig, *, tenant: str = "disagg") -> Namespace:
    """The store namespace of a model: its blocks match only the same weights and layout."""
    fingerprint = hashlib.sha256(repr(config).encode()).hexdigest()[:16]
    layout = KVLayout(
        num_layers=config.num_layers,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        dtype=DType.from_torch(config.dtype),
        block_tokens=config.page_tokens,
    )
    return Namespace(tenant=tenant, model_fingerprint=f"disagg-{fingerprint}", layout=layout)


def cache_for(model: Transformer, max_tokens: int) -> PagedKVCache:
    """A cache that holds one sequence of up to `max_tokens` positions."""
    num_pages = -(-max_tokens // model.config.page_tokens) + 1
    return PagedKVCache(model.config, num_pages, model.device)


class ConnectorHooks:
    """The model's `LayerHooks` over a connector: wait for a layer's load before the layer
    reads the cache, queue its save once it has written its new K/V."""

    def __init__(self, connector: KVConnector) -> None:
        self.connector = connector

    def before_layer(self, layer: int) -> None:
        self.connector.wait_for_layer_load(layer)

    def after_layer(self, layer: int) -> None:
        self.connector.save_kv_layer(layer)


@dataclass(frozen=True)
class StoreRun:
    """One request served with the store."""

    token_ids: list[int]
    logits: Tensor  # float32 [num_new_tokens, vocab_size]
    num_prompt_tokens: int
    num_reused_tokens: int  # loaded from the store instead of computed
    bytes_fetched: int
    ttft_s: float  # request in to first token: lookup, overlapped load, suffix prefill
    load_stall_s: float  # of ttft_s, time the model waited for layers to arrive
    num_saved_blocks: int  # blocks this request's saves committed
    save_wait_s: float  # blocked in wait_for_save after the first token
    fallback: str | None = None  # why the store was bypassed, if it was
    save_error: str | None = None
    decision: str = ""  # the scheduler side's fetch-or-recompute reason
    num_matched_tokens: int = 0  # stored, whether loaded or recomputed
    match_s: float = 0.0  # of ttft_s, the scheduler side's arrival and count (its lookup)


@dataclass(frozen=True)
class Recompute:
    """One request computed without the store."""

    token_ids: list[int]
    logits: Tensor  # float32 [num_new_tokens, vocab_size]
    ttft_s: float


def recompute(
    model: Transformer, cache: PagedKVCache, prompt: Tensor, num_new_tokens: int
) -> Recompute:
    """Full prefill of `prompt` then greedy decoding, timed like `Engine.serve`."""
    start = time.perf_counter()
    seq = Sequence()
    first_logits = model.forward(prompt, seq, cache, last_logits_only=True)[0]
    token_ids = [int(first_logits.argmax())]
    ttft_s = time.perf_counter() - start
    logits = _decode(model, cache, seq, token_ids, [first_logits], num_new_tokens)
    cache.free(seq)
    return Recompute(token_ids=token_ids, logits=logits, ttft_s=ttft_s)


def _decode(
    model: Transformer,
    cache: PagedKVCache,
    seq: Sequence,
    token_ids: list[int],
    logits: list[Tensor],
    num_new_tokens: int,
) -> Tensor:
    """Decode greedily after a prefill until `token_ids` holds `num_new_tokens`; all logits."""
    while len(token_ids) < num_new_tokens:
        last = torch.tensor([token_ids[-1]], device=model.device)
        logits.append(model.forward(last, seq, cache)[0])
        token_ids.append(int(logits[-1].argmax()))
    return torch.stack(logits).cpu()


def random_prompt(config: ModelConfig, num_tokens: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (num_tokens,), generator=generator)


# -- worker processes ---------------------------------------------------------------------


class WorkerFailed(RuntimeError):
    """A worker process exited without writing its results."""


@dataclass
class WorkerProcess:
    """A started `prefill_worker` or `decode_worker`: it loads its model, then waits for
    `submit(prompts)`; `wait()` returns its `StoreRun`s."""

    process: subprocess.Popen[str]
    workdir: Path
    name: str

    @property
    def out_path(self) -> Path:
        return _results_path(self.workdir, self.name)

    def submit(self, prompts: list[Tensor]) -> None:
        """Hand the worker its requests (it reads their path from stdin)."""
        requests = self.workdir / f"{self.name}-requests.pt"
        torch.save([prompt.cpu() for prompt in prompts], requests)
        assert self.process.stdin is not None
        # A worker that already died shows up in wait(), with its stderr.
        with contextlib.suppress(BrokenPipeError):
            self.process.stdin.write(f"{requests}\n")
            self.process.stdin.flush()

    def wait(self, timeout: float | None = None) -> list[StoreRun]:
        _, stderr = self.process.communicate(timeout=timeout)
        if not self.out_path.exists():
            raise WorkerFailed(
                f"{self.process.args!r} exited with {self.process.returncode}: {stderr[-4000:]}"
            )
        records: list[dict[str, Any]] = torch.load(self.out_path, weights_only=True)
        return [StoreRun(**record) for record in records]


def start_worker(
    module: str,
    target: str,
    workdir: Path,
    *,
    model: str,
    dtype: str,
    device: str,
    threads: int | None = None,
    extra_args: list[str] | None = None,
) -> WorkerProcess:
    """Start `python -m module` against the store at `target`; `submit` its prompts later,
    so that its start-up (importing torch, building the model) overlaps with other work.
    `threads` caps torch's intra-op threads (a tiny model runs faster on one when the
    cores are busy)."""
    workdir.mkdir(parents=True, exist_ok=True)
    name = module.rsplit(".", 1)[-1]
    out_path = _results_path(workdir, name)
    out_path.unlink(missing_ok=True)
    command = [
        *(sys.executable, "-m", module, "--target", target, "--out", str(out_path)),
        *("--model", model, "--dtype", dtype, "--device", device),
        *(["--threads", str(threads)] if threads else []),
        *(extra_args or []),
    ]
    pipe = subprocess.PIPE
    process = subprocess.Popen(command, stdin=pipe, stdout=pipe, stderr=pipe, text=True)
    return WorkerProcess(process=process, workdir=workdir, name=name)


def _results_path(workdir: Path, name: str) -> Path:
    return workdir / f"{name}-results.pt"


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """The options both worker processes take."""
    parser.add_argument("--target", required=True, help="kvstore server HOST:PORT")
    parser.add_argument(
        "--requests", type=Path, help="torch.save'd prompts (default: a path read from stdin)"
    )
    parser.add_argument("--out", type=Path, required=True, help="where to torch.save results")
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")


def setup_worker(args: argparse.Namespace) -> tuple[Transformer, list[Tensor]]:
    """The model named by a worker's arguments, then its prompts (once they arrive)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model = Transformer(model_config(args.model, args.dtype), device=args.device)
    requests = args.requests or Path(sys.stdin.readline().strip())
    prompts: list[Tensor] = torch.load(requests, weights_only=True)
    return model, prompts


def save_runs(runs: list[StoreRun], path: Path) -> None:
    torch.save([asdict(run) for run in runs], path)
