"""Scrape a daemon's Prometheus /metrics during a run, into a JSONL file to plot from.

`--scrape URL` scrapes that endpoint (a daemon started elsewhere); a bare `--scrape`
starts the run's own daemon with `--metrics-port` and scrapes it. Each line of the
file is one scrape:

    {"t_s": 1.002, "unix_s": 1796547182.1, "samples": [[name, {labels}, value], ...]}

or, where a scrape failed, `{"t_s": ..., "unix_s": ..., "error": "..."}`. `t_s` counts
from the scraper's start. `kvstore-bench plot FILE` draws rates, latency percentiles,
tier use and the daemon's health from it (kvstore.bench.plot).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from prometheus_client.parser import text_string_to_metric_families

__all__ = [
    "AUTO",
    "Samples",
    "Scraper",
    "add_scrape_arguments",
    "parse_samples",
    "read_scrapes",
]

AUTO = "auto"  # --scrape with no URL: scrape the daemon the run starts
# Series that say nothing about kvstore and would only fatten the file.
_SKIPPED_PREFIXES = ("python_gc_", "python_info")
_SKIPPED_SUFFIXES = ("_created",)

SampleKey = tuple[str, frozenset[tuple[str, str]]]


@dataclass
class Samples:
    """One scrape: each sample's value by its name and labels."""

    values: dict[SampleKey, float] = field(default_factory=dict)

    def value(self, name: str, **labels: str) -> float:
        """The sample `name{labels}`; KeyError naming what the scrape has instead."""
        key = (name, frozenset(labels.items()))
        if key not in self.values:
            present = sorted(str(dict(ls)) for n, ls in self.values if n == name)
            raise KeyError(f"no sample {name}{labels} in the scrape; it has {name} with {present}")
        return self.values[key]

    def has(self, name: str, **labels: str) -> bool:
        return (name, frozenset(labels.items())) in self.values

    def names(self) -> set[str]:
        return {name for name, _ in self.values}

    def rows(self) -> list[tuple[str, dict[str, str], float]]:
        values = self.values
        return [(name, dict(sorted(labels)), value) for (name, labels), value in values.items()]


def parse_samples(text: str) -> Samples:
    """Prometheus text exposition into Samples."""
    samples = Samples()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.values[(sample.name, frozenset(sample.labels.items()))] = float(sample.value)
    return samples


def _kept(name: str) -> bool:
    return not (name.startswith(_SKIPPED_PREFIXES) or name.endswith(_SKIPPED_SUFFIXES))


class Scraper:
    """Scrapes `url` every `interval_s` on a thread, appending lines to `path`, from
    `start` until `stop` (which takes one last scrape, so the file ends with the run)."""

    def __init__(self, url: str, path: Path, interval_s: float = 1.0) -> None:
        if interval_s <= 0:
            raise ValueError(f"the scrape interval must be > 0 s, got {interval_s}")
        self.url = url
        self.path = path
        self.interval_s = interval_s
        self.num_scrapes = 0
        self.num_failed = 0
        self.seconds: list[float] = []  # each successful scrape's round trip
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0

    def __enter__(self) -> Scraper:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="kvstore-scrape", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self.scrape_once()

    def scrape_once(self) -> None:
        """One scrape, appended to the file (an error line if it failed)."""
        line: dict[str, object] = {
            "t_s": round(time.monotonic() - self._started, 4),
            "unix_s": round(time.time(), 4),
        }
        try:
            started = time.perf_counter()
            with urllib.request.urlopen(self.url, timeout=max(self.interval_s, 5.0)) as reply:
                text = reply.read().decode()
            self.seconds.append(time.perf_counter() - started)
            rows = parse_samples(text).rows()
            line["samples"] = [[name, labels, value] for name, labels, value in rows if _kept(name)]
            self.num_scrapes += 1
        except (OSError, urllib.error.URLError, ValueError) as error:
            line["error"] = f"{type(error).__name__}: {error}"
            self.num_failed += 1
        with self.path.open("a") as out:
            out.write(json.dumps(line, separators=(",", ":")) + "\n")

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            self.scrape_once()
            next_at += self.interval_s
            self._stop.wait(max(0.0, next_at - time.monotonic()))


@dataclass(frozen=True)
class Scrape:
    t_s: float
    samples: Samples | None  # None: the scrape failed
    error: str = ""


def read_scrapes(path: Path) -> list[Scrape]:
    """The scrapes of a file `Scraper` wrote, in order."""
    return list(_scrapes(path.read_text().splitlines()))


def _scrapes(lines: Iterable[str]) -> Iterator[Scrape]:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            t_s = float(record["t_s"])
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"line {number} is not a scrape record: {error}") from None
        if "error" in record:
            yield Scrape(t_s, None, str(record["error"]))
            continue
        samples = Samples()
        for name, labels, value in record.get("samples", []):
            samples.values[(name, frozenset(labels.items()))] = float(value)
        yield Scrape(t_s, samples)


def add_scrape_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--scrape",
        nargs="?",
        const=AUTO,
        metavar="URL",
        help="scrape Prometheus metrics during the run: from URL "
        "(http://HOST:PORT/metrics), or with no URL from the daemon the run starts "
        "(started with --metrics-port); see --scrape-out",
    )
    group.add_argument(
        "--scrape-out",
        type=Path,
        default=Path("kvstore-metrics.jsonl"),
        metavar="PATH",
        help="JSONL file of the scrapes (default kvstore-metrics.jsonl); "
        "`kvstore-bench plot PATH` draws it",
    )
    group.add_argument(
        "--scrape-interval",
        type=float,
        default=1.0,
        metavar="S",
        help="seconds between scrapes (default 1)",
    )
