"""The decode worker, run as its own process: for each prompt, looks up its longest stored
prefix, loads it layer by layer while the unmatched suffix computes, then decodes greedily.

    python -m kvstore.bench.disagg.decode_worker --target HOST:PORT \\
        --requests prompts.pt --out results.pt --decode-tokens 16 [--model tiny] ...

A store that is down, or a load that fails, makes the worker recompute the whole prompt (see
kvstore.bench.disagg.serving): the tokens are the same, only slower. `--out` receives one
`StoreRun` (as a dict, logits included) per prompt; one JSON line per prompt is printed.
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
    decode_tokens: int,
    model: str,
    dtype: str,
    device: str,
    threads: int | None = None,
) -> WorkerProcess:
    """Start a decode worker process ; `.submit(prompts)`, then `.wait()` for its runs."""
    return start_worker(
        "kvstore.bench.disagg.decode_worker",
        target,
        workdir,
        model=model,
        dtype=dtype,
        device=device,
        threads=threads,
        extra_args=["--decode-tokens", str(decode_tokens)],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="decode_worker", description=__doc__)
    add_worker_arguments(parser)
    parser.add_argument("--decode-tokens", type=int, default=16, help="tokens to generate")
    args = parser.parse_args(argv)
    model, prompts = setup_worker(args)
    cache = cache_for(model, max(prompt.numel() for prompt in prompts) + args.decode_tokens)
    with Engine(model, cache, args.target, namespace_for(model.config)) as engine:
        runs = [
            engine.serve(prompt.to(model.device), args.decode_tokens, save=False)
            for prompt in prompts
        ]
    save_runs(runs, args.out)
    for run in runs:
        summary = {
            "prompt_tokens": run.num_prompt_tokens,
            "reused_tokens": run.num_reused_tokens,
            "bytes_fetched": run.bytes_fetched,
            "ttft_s": run.ttft_s,
            "load_stall_s": run.load_stall_s,
            "fallback": run.fallback,
            "token_ids": run.token_ids,
        }
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
