"""docs/grafana/kvstore.json: every metric its queries use exists in a real scrape of a
running daemon after some traffic, so no panel of the shipped dashboard stays empty
because of a misspelt or renamed metric."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from kvstore.bench.scrape import parse_samples
from kvstore.client import InvalidArgument, KVClient
from kvstore.layout import Namespace
from kvstore.server import RunningServer

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "kvstore.json"
# Every metric the daemon serves starts with one of these; PromQL functions, keywords and
# label names never do.
METRIC_NAME = re.compile(r"\b(?:kvstore|process|python)_[a-z0-9_]+\b")

ServerFactory = Callable[..., Any]
MakeKV = Callable[..., torch.Tensor]


def queries(node: Any) -> Iterator[str]:
    """Every PromQL text in the dashboard: panel targets and template variable queries."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                yield value
            elif key == "query" and isinstance(value, str | dict):
                yield from (
                    [value] if isinstance(value, str) else queries({"expr": value.get("query")})
                )
            else:
                yield from queries(value)
    elif isinstance(node, list):
        for item in node:
            yield from queries(item)


def test_the_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    graphs = [panel for panel in panels if panel["type"] != "row"]
    assert len(graphs) >= 20
    for panel in graphs:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            for opening, closing in ("()", "{}", "[]"):
                assert expr.count(opening) == expr.count(closing), (panel["title"], expr)
            assert '$instance"' in expr, f"{panel['title']}: every query follows $instance"


async def test_every_metric_the_dashboard_uses_exists_in_a_scrape(
    server_factory: ServerFactory, make_namespace: Callable[..., Namespace], make_kv: MakeKV
) -> None:
    names = {name for text in queries(json.loads(DASHBOARD.read_text())) for name in
             METRIC_NAME.findall(text)}  # fmt: skip
    assert {"kvstore_tier_hits_total", "kvstore_lookup_seconds_bucket"} <= names
    # A quota, so that the quota series exist; the data plane is on by default.
    running: RunningServer = await server_factory(
        metrics_port=0, quotas={"team-a": {"dram_bytes": "8MiB"}}
    )
    namespace = make_namespace(tenant="team-a")
    layout = namespace.layout
    tokens = list(range(4 * layout.block_tokens))
    async with KVClient(f"127.0.0.1:{running.port}", namespace) as client:
        await client.put(tokens, make_kv(layout, 4))
        match = await client.lookup(tokens)
        await client.get_into(match, make_kv(layout, 4))
        await client.pin(client.keys(tokens), ttl_s=60)
        with pytest.raises(InvalidArgument):  # an error, so that the error series exist
            await client.lookup_keys([b"k%d" % index for index in range(1001)])
    assert running.metrics is not None
    url = running.metrics.url

    def fetch() -> str:
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())

    scraped = parse_samples(await asyncio.to_thread(fetch)).names()
    assert sorted(names - scraped) == []
