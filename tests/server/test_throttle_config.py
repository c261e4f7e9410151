"""The read throttle's settings: `[store] read_bytes_per_s` and `--throttle-read TIER=RATE`."""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from kvstore.enums import TierKind
from kvstore.errors import InvalidRequest
from kvstore.server import ServerConfig, load_config
from kvstore.server.config import add_config_arguments, config_from_args, parse_throttle
from kvstore.server.main import print_stats
from kvstore.server.workers import worker_configs
from kvstore.v1 import kvstore_pb2 as pb

MB, MiB = 1000**2, 1 << 20


def parse_flags(*argv: str) -> ServerConfig:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)))


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "kvstore.toml"
    path.write_text(text)
    return path


def test_no_throttle_by_default() -> None:
    store = load_config(None, {}).store
    assert store.read_bytes_per_s == {}
    assert [store.read_rate(kind) for kind in TierKind] == [0, 0, 0]


def test_toml_table_of_sizes(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        '[store]\nssd_dir = "/tmp/x"\nread_bytes_per_s = {dram = "200MB", SSD = 5000000}\n',
    )
    store = load_config(path, {}).store
    assert store.read_bytes_per_s == {"dram": 200 * MB, "ssd": 5 * MB}
    assert store.read_rate(TierKind.DRAM) == 200 * MB
    assert store.read_rate(TierKind.SSD) == 5 * MB
    assert store.read_rate(TierKind.HBM) == 0


def test_flags_name_one_tier_each_over_the_file(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path, '[store]\nssd_dir = "/tmp/x"\nread_bytes_per_s = {dram = "1GB", ssd = "1GB"}\n'
    )
    config = parse_flags("--config", str(path), "--throttle-read", "dram=200MB")
    assert config.store.read_bytes_per_s == {"dram": 200 * MB, "ssd": 1000 * MB}
    config = parse_flags("--throttle-read", "dram=64MiB", "--throttle-read", "dram=1MiB")
    assert config.store.read_bytes_per_s == {"dram": MiB}


def test_parse_throttle() -> None:
    assert parse_throttle("dram=200MB") == ("dram", 200 * MB)
    assert parse_throttle(" SSD = 1.5GiB") == ("ssd", int(1.5 * (1 << 30)))


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--throttle-read", "dram"], "--throttle-read takes TIER=RATE"),
        (["--throttle-read", "=200MB"], "--throttle-read takes TIER=RATE"),
        (
            ["--throttle-read", "tape=200MB"],
            "unknown tier 'tape'; tiers are ['dram', 'hbm', 'ssd']",
        ),
        (["--throttle-read", "dram=-5MB"], "the read rate of dram must be positive"),
        (["--throttle-read", "dram=fast"], "the read rate of dram: cannot read 'fast' as a size"),
        (["--throttle-read", "dram=0"], "read_bytes_per_s.dram must be a positive rate"),
        (["--throttle-read", "ssd=1GB"], "the store has no SSD tier"),
        (["--throttle-read", "hbm=1GB"], "the store has no HBM tier"),
    ],
)
def test_bad_flags_are_rejected_clearly(argv: list[str], fragment: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_flags(*argv)
    assert fragment in str(caught.value)


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        ({"store.read_bytes_per_s": "200MB"}, "must be a table of tier = rate"),
        ({"store.read_bytes_per_s": {"dram": -1}}, "read_bytes_per_s.dram must be a positive"),
        ({"store.read_bytes_per_s": {"dram": True}}, "cannot read True as a size"),
        ({"store.read_bytes_per_s": {"nvme": 10}}, "unknown tier 'nvme'"),
    ],
)
def test_bad_tables_are_rejected_clearly(settings: dict[str, Any], fragment: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        load_config(None, settings)
    assert fragment in str(caught.value)


def test_workers_split_the_throttle_like_the_capacity() -> None:
    config = load_config(
        None,
        {
            "workers": 4,
            "cluster.etcd": "etcd://127.0.0.1:2379/kv",
            "store.read_bytes_per_s": {"dram": 400 * MB},
        },
    )
    shares = worker_configs(config)  # listen 127.0.0.1:50051: ports 50051..50054
    assert [share.store.read_bytes_per_s for share in shares] == [{"dram": 100 * MB}] * 4


def test_stats_prints_a_throttled_tier_with_its_rate() -> None:
    stats = pb.StatsResponse(
        tiers=[
            pb.TierStats(tier=pb.DRAM, name="dram", read_bytes_per_s=200 * MB),
            pb.TierStats(tier=pb.SSD, name="ssd"),
        ]
    )
    out = io.StringIO()
    print_stats(stats, Console(file=out, width=200))
    lines = out.getvalue().splitlines()
    assert any("dram (reads 200 MB/s)" in line for line in lines)
    assert not any("ssd (reads" in line for line in lines)
