"""The prefill worker, run as its own process: computes prompts and saves each layer's KV of
their full blocks to the store while the later layers are still computing.

    python -m kvstore.bench.disagg.prefill_worker --target HOST:PORT \\
        --requests prompts.pt --out results.pt [--model tiny] [--dtype float32] [--device cpu]

`--requests` holds a torch.save'd list of 1-D token tensors; `--out` receives one `StoreRun`
(as a dict) per prompt. Prints one JSON line per prompt. Exits 1 if a save failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kvstore.bench.disagg.engine import Engine
from kvstore.bench.disagg.serving import (
    WorkerProcess,
    add_worker_arguments,
    cache_for,
    namespace_for,
    save_runs,
    setup_worker,
    start_worker,
)


def launch(
    target: str,
    workdir: Path,
    *,
    model: str,
    dtype: str,
    device: str,
    threads: int | None = None,
) -> WorkerProcess:
    """Start a prefill worker process ; `.submit(prompts)`, then `.wait()` for its runs."""
    return start_worker(
        "kvstore.bench.disagg.prefill_worker",
        target,
        workdir,
        model=model,
        dtype=dtype,
        device=device,
        threads=threads,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prefill_worker", description=__doc__)
    add_worker_arguments(parser)
    args = parser.parse_args(argv)
    model, prompts = setup_worker(args)
    cache = cache_for(model, max(prompt.numel() for prompt in prompts))
    with Engine(model, cache, args.target, namespace_for(model.config)) as engine:
        runs = [engine.serve(prompt.to(model.device), 1, load=False) for prompt in prompts]
    save_runs(runs, args.out)
    for run in runs:
        summary = {
            "prompt_tokens": run.num_prompt_tokens,
            "saved_blocks": run.num_saved_blocks,
            "ttft_s": run.ttft_s,
            "save_wait_s": run.save_wait_s,
            "save_error": run.save_error,
        }
        print(json.dumps(summary))
    return 1 if any(run.save_error for run in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
