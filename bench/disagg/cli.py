"""`kvstore-bench disagg`: prefill/decode disaggregation with a real transformer.

    kvstore-bench disagg check [--model tiny] [--dtype float32]
        a prefill process saves a prompt's KV, a decode process loads it (full and partial
        hit) and decodes; both are compared with a single process that never used the store.
    kvstore-bench disagg agent [--model small] [--turns 8]
        an agent session whose context grows every turn; TTFT with the store vs recompute.
    kvstore-bench disagg miss [--model tiny] [--prompt-tokens 1024] [--repeats 15]
        fresh prompts (misses) through the connector, each save mode against recompute
        timed beside it: the medians of the paired ratios.
    kvstore-bench disagg sweep [--model small] [--prompt-tokens 2048] [--rates 20MB,80MB]
        TTFT (fetch, no store, the cost model's plan) against the store's throttled read
        rate, a daemon per rate; the predicted break-even beside the measured one.

Without `--target`, a kvstore-server is spawned as a separate process for the run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from kvstore.bench.disagg import decode_worker, prefill_worker
from kvstore.bench.disagg.agent import (
    AgentSettings,
    print_turn,
    reports_json,
    run_session,
    summary_table,
)
from kvstore.bench.disagg.engine import Engine
from kvstore.bench.disagg.miss import describe, run_misses
from kvstore.bench.disagg.model import Transformer, generate_greedy
from kvstore.bench.disagg.serving import (
    DTYPES,
    MODELS,
    StoreRun,
    cache_for,
    default_device,
    logit_tolerance,
    model_config,
    namespace_for,
    random_prompt,
)
from kvstore.bench.disagg.sweep import add_sweep_arguments, print_report, report_json, run_sweep
from kvstore.bench.spawn import spawned_server

_DEFAULT_MODEL = {"check": "tiny", "agent": "small", "sweep": "small", "miss": "tiny"}


def add_disagg_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "mode", choices=("check", "agent", "sweep", "miss"), help="what to run (see above)"
    )
    parser.add_argument("--target", help="a running kvstore server HOST:PORT (default: spawn)")
    parser.add_argument(
        "--model", choices=sorted(MODELS), help="default: tiny for check, small for agent"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=default_device())
    parser.add_argument("--turns", type=int, default=8, help="agent turns")
    parser.add_argument("--decode-tokens", type=int, default=16, help="tokens per reply")
    parser.add_argument("--prompt-tokens", type=int, help="check, sweep: prompt length")
    parser.add_argument("--system-tokens", type=int, default=512, help="agent: first turn")
    parser.add_argument(
        "--tool-tokens",
        type=_token_range,
        default=(256, 1536),
        metavar="MIN:MAX",
        help="agent: tool result length range (default 256:1536)",
    )
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--pin-ttl", type=float, default=30.0, help="agent: seconds a turn's chain stays pinned"
    )
    parser.add_argument(
        "--prefill-rate", type=float, help="agent: tokens/s to plan with (default: measured)"
    )
    parser.add_argument("--chunk-tokens", type=int, help="agent: chunked prefill step size")
    parser.add_argument(
        "--save-during-forward",
        choices=("auto", "true", "false"),
        default="auto",
        help="agent: the connector's save_during_forward (default auto: after the pass on CPU)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-dram-bytes", default="2GiB", help="for a spawned server")
    parser.add_argument("--json", action="store_true", help="print JSON")
    add_sweep_arguments(parser)


def run_disagg(args: argparse.Namespace) -> int:
    """Run `check` (0 if the decode worker matches the reference) or `agent`."""
    if args.device == "cuda" and not torch.cuda.is_available():
        print("kvstore-bench disagg: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    model_name = args.model or _DEFAULT_MODEL[args.mode]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mode == "sweep":
        return _sweep(args, model_name)
    with _store(args.target, args.server_dram_bytes) as target:
        if args.mode == "check":
            return _check(args, model_name, target)
        if args.mode == "miss":
            return _miss(args, model_name, target)
        return _agent(args, model_name, target)


def _miss(args: argparse.Namespace, model_name: str, target: str) -> int:
    prompt_tokens = args.prompt_tokens or 1024
    config = model_config(model_name, args.dtype)
    model = Transformer(config, device=args.device)
    cache = cache_for(model, 2 * prompt_tokens + 2 * config.page_tokens)
    try:
        reports = run_misses(
            model, cache, target, prompt_tokens, 15 if args.repeats is None else args.repeats
        )
    except ValueError as error:
        print(f"kvstore-bench disagg miss: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([dataclasses.asdict(report) for report in reports], indent=2))
    else:
        print(f"misses of {prompt_tokens} tokens, {model_name} {args.dtype} on {args.device}")
        for report in reports:
            print(describe(report))
    return 0


@contextlib.contextmanager
def _store(target: str | None, dram_bytes: str) -> Iterator[str]:
    if target is not None:
        yield target
        return
    with spawned_server(["--dram-bytes", dram_bytes, "--log-level", "warning"]) as spawned:
        yield spawned


def _check(args: argparse.Namespace, model_name: str, target: str) -> int:
    config = model_config(model_name, args.dtype)
    block_tokens = config.page_tokens
    prompt = random_prompt(config, args.prompt_tokens or 5 * block_tokens + 7, args.seed)
    follow_up = random_prompt(config, 2 * block_tokens + 3, args.seed + 1)
    cases = {"full hit": prompt, "partial hit": torch.cat([prompt, follow_up])}
    with tempfile.TemporaryDirectory(prefix="kvstore-disagg-") as workdir:
        options = {"model": model_name, "dtype": args.dtype, "device": args.device}
        prefill = prefill_worker.launch(target, Path(workdir), threads=args.threads, **options)
        decode = decode_worker.launch(
            target,
            Path(workdir),
            decode_tokens=args.decode_tokens,
            threads=args.threads,
            **options,
        )
        # The decode process gets its prompts once the prefill process has saved the KV.
        prefill.submit([prompt])
        saved = prefill.wait()
        decode.submit(list(cases.values()))
        decoded = decode.wait()
    model = Transformer(config, device=args.device)
    tolerance = logit_tolerance(config.dtype)
    rows = []
    for (name, case_prompt), run in zip(cases.items(), decoded, strict=True):
        cache = cache_for(model, case_prompt.numel() + args.decode_tokens)
        reference = generate_greedy(model, case_prompt.to(model.device), args.decode_tokens, cache)
        rows.append(_compare(name, run, reference.token_ids, reference.logits.cpu(), tolerance))
    ok = all(row["tokens_match"] and row["within_tolerance"] for row in rows)
    report = {
        "model": model_name,
        "dtype": args.dtype,
        "device": args.device,
        "prefill_saved_blocks": saved[0].num_saved_blocks,
        "prefill_save_error": saved[0].save_error,
        "tolerance": tolerance,
        "cases": rows,
        "ok": ok,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_check(report)
    return 0 if ok else 1


def _compare(
    name: str, run: StoreRun, token_ids: list[int], logits: torch.Tensor, tolerance: float
) -> dict[str, object]:
    """Logits are compared up to and including the first differing token."""
    same = [a == b for a, b in zip(run.token_ids, token_ids, strict=True)]
    compared = same.index(False) + 1 if False in same else len(same)
    max_diff = float((run.logits[:compared] - logits[:compared]).abs().max())
    return {
        "case": name,
        "prompt_tokens": run.num_prompt_tokens,
        "reused_tokens": run.num_reused_tokens,
        "computed_tokens": run.num_prompt_tokens - run.num_reused_tokens,
        "bytes_fetched": run.bytes_fetched,
        "ttft_s": run.ttft_s,
        "fallback": run.fallback,
        "tokens_match": all(same),
        "max_logit_diff": max_diff,
        "within_tolerance": max_diff <= tolerance,
    }


def _console(*, stderr: bool = False) -> Console:
    """Rich's console, wide enough for the tables when output goes to a file or pipe."""
    console = Console(stderr=stderr)
    if not console.is_terminal:
        console = Console(stderr=stderr, width=160)
    return console


def _print_check(report: dict[str, object]) -> None:
    console = _console()
    title = (
        f"disagg check: {report['model']} {report['dtype']} on {report['device']}; prefill "
        f"process saved {report['prefill_saved_blocks']} blocks"
    )
    table = Table(title=title)
    columns = ("case", "prompt", "reused", "computed", "TTFT", "tokens", "max |Δlogit|")
    for column in columns:
        table.add_column(column, justify="left" if column == "case" else "right")
    cases = report["cases"]
    assert isinstance(cases, list)
    for row in cases:
        table.add_row(
            str(row["case"]),
            str(row["prompt_tokens"]),
            str(row["reused_tokens"]),
            str(row["computed_tokens"]),
            f"{row['ttft_s'] * 1000:.0f} ms",
            "match" if row["tokens_match"] else "DIFFER",
            f"{row['max_logit_diff']:.2e}",
        )
    console.print(table)
    for row in cases:
        if row["fallback"]:
            console.print(f"{row['case']}: {row['fallback']}")
    verdict = "OK" if report["ok"] else "FAILED"
    console.print(f"{verdict}: tolerance {report['tolerance']:.0e} for {report['dtype']}")


def _agent(args: argparse.Namespace, model_name: str, target: str) -> int:
    settings = AgentSettings(
        turns=args.turns,
        tool_tokens=args.tool_tokens,
        system_tokens=args.system_tokens,
        decode_tokens=args.decode_tokens,
        seed=args.seed,
    )
    config = model_config(model_name, args.dtype)
    model = Transformer(config, device=args.device)
    cache = cache_for(model, settings.max_context_tokens)
    # A fresh tenant per session: a rerun against the same server starts cold.
    namespace = namespace_for(config, tenant=f"agent-{uuid.uuid4().hex[:12]}")
    console = _console(stderr=args.json)
    title = f"agent session: {model_name} {args.dtype} on {args.device}, {settings.turns} turns"
    console.print(title)
    settings_keys: dict[str, float | bool | str] = {"pin_ttl_s": args.pin_ttl}
    if args.save_during_forward != "auto":
        settings_keys["save_during_forward"] = args.save_during_forward == "true"
    if args.prefill_rate is not None:
        settings_keys["prefill_tokens_per_s"] = args.prefill_rate
    with Engine(
        model, cache, target, namespace, chunk_tokens=args.chunk_tokens, **settings_keys
    ) as engine:
        reports = run_session(engine, settings, print_turn(console))
    if args.json:
        context = {"model": model_name, "dtype": args.dtype, "device": args.device}
        print(reports_json(reports, {**context, "settings": settings.__dict__}))
    else:
        console.print(summary_table(reports, title))
    return 0 if all(report.first_token_match for report in reports) else 1


def _sweep(args: argparse.Namespace, model_name: str) -> int:
    if args.target is not None:
        print("kvstore-bench disagg sweep: spawns its own daemons; drop --target", file=sys.stderr)
        return 2
    try:
        report = run_sweep(args, model_name)
    except ValueError as error:
        print(f"kvstore-bench disagg sweep: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report_json(report), indent=2))
    else:
        print_report(report, _console())
    return 0


def _token_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    try:
        values = (int(low), int(high or low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX token counts, got {text!r}") from None
    if not 1 <= values[0] <= values[1]:
        raise argparse.ArgumentTypeError(f"expected 1 <= MIN <= MAX, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kvstore-bench disagg",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_disagg_arguments(parser)
    return run_disagg(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
