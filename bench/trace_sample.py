"""Cut a small sample from a Mooncake JSONL trace, for tests and the default of benchmarks.

    python -m kvstore.bench.trace_sample /work/shared/traces/conversation_trace.jsonl \\
        bench/data/conversation_sample.jsonl --requests 1000

The sample is the trace's first `--requests` requests, unchanged: their order, timestamps
and hash ids, so the reuse between them (a conversation's later turns hitting its earlier
ones) is the trace's own. Every line is checked as `kvstore.bench.trace.load_trace` reads
it, so a sample that loads is a valid trace.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kvstore.bench.trace import BLOCK_TOKENS, infinite_cache_hit_rate, load_trace

SAMPLE_DIR = Path(__file__).resolve().parent / "data"
CONVERSATION_SAMPLE = SAMPLE_DIR / "conversation_sample.jsonl"


def write_sample(source: Path, destination: Path, num_requests: int) -> int:
    """Write the first `num_requests` requests of `source` to `destination`; returns how
    many were written (fewer when the trace is shorter)."""
    if num_requests < 1:
        raise ValueError(f"a sample needs at least one request, got {num_requests}")
    requests = load_trace(source, block_tokens=BLOCK_TOKENS)[:num_requests]
    destination.parent.mkdir(parents=True, exist_ok=True)
    with destination.open("w", encoding="utf-8") as out:
        for request in requests:
            record = {
                "timestamp": int(request.timestamp_ms)
                if request.timestamp_ms.is_integer()
                else request.timestamp_ms,
                "input_length": request.input_length,
                "output_length": request.output_length,
                "hash_ids": list(request.hash_ids),
            }
            out.write(json.dumps(record) + "\n")
    return len(requests)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kvstore.bench.trace_sample", description=__doc__
    )
    parser.add_argument("source", type=Path, help="the full Mooncake JSONL trace")
    parser.add_argument("destination", type=Path, help="where the sample goes")
    parser.add_argument(
        "--requests", type=int, default=1000, help="requests to keep (default 1000)"
    )
    args = parser.parse_args(argv)
    count = write_sample(args.source, args.destination, args.requests)
    stats = infinite_cache_hit_rate(load_trace(args.destination))
    print(
        f"wrote {count} requests to {args.destination}: {stats.num_cacheable_blocks} full "
        f"blocks, {stats.num_unique_blocks} unique, infinite-cache hit rate "
        f"{stats.block_hit_rate:.1%}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
