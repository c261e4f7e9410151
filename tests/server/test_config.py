"""The daemon's configuration: defaults, TOML, flag overrides, sizes, and clear rejections."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from kvstore.errors import InvalidRequest
from kvstore.server import ServerConfig, load_config
from kvstore.server.config import add_config_arguments, config_from_args, parse_size

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

EXAMPLE_TOML = """
listen = "0.0.0.0:6000"
log_level = "debug"

[store]
dram_bytes = "1.5GiB"
page_bytes = "16KiB"
eviction_policy = "lfu"
max_lease_s = 600
max_put_reserved_bytes = "96MiB"
max_namespaces = 500

[limits]
max_message_bytes = "4MiB"
default_chunk_bytes = "512KiB"
max_keys = 4096
drain_grace_s = 7.5
stream_idle_timeout_s = 12
frame_timeout_s = 2.5
max_transfer_s = 90
"""


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "kvstore.toml"
    path.write_text(text)
    return path


def parse_flags(*argv: str) -> ServerConfig:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)))


def test_defaults() -> None:
    config = load_config(None, {})
    assert config.listen == "127.0.0.1:50051"
    assert config.log_level == "info"
    assert config.store.dram_bytes == GiB
    assert config.store.page_bytes == 64 * KiB
    assert config.store.eviction_policy == "lru"
    assert config.limits.max_message_bytes == 8 * MiB
    assert config.limits.max_chunk_bytes == 8 * MiB - 4096
    assert config.limits.min_chunk_bytes == 64 * KiB
    assert config.limits.stream_idle_timeout_s == 30.0
    assert config.limits.frame_timeout_s == 10.0
    assert config.limits.max_transfer_s == 600.0


def test_toml_file(tmp_path: Path) -> None:
    config = load_config(write_toml(tmp_path, EXAMPLE_TOML), {})
    assert config.listen == "0.0.0.0:6000"
    assert config.log_level == "debug"
    assert config.store.dram_bytes == int(1.5 * GiB)
    assert config.store.page_bytes == 16 * KiB
    assert config.store.eviction_policy == "lfu"
    assert config.store.max_lease_s == 600
    assert config.store.max_put_reserved_bytes == 96 * MiB
    assert config.store.max_namespaces == 500
    assert config.limits.max_message_bytes == 4 * MiB
    assert config.limits.default_chunk_bytes == 512 * KiB
    assert config.limits.max_keys == 4096
    assert config.limits.drain_grace_s == 7.5
    assert config.limits.stream_idle_timeout_s == 12.0
    assert config.limits.frame_timeout_s == 2.5
    assert config.limits.max_transfer_s == 90.0


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, EXAMPLE_TOML)
    config = parse_flags(
        "--config",
        str(path),
        "--listen",
        "127.0.0.1:0",
        "--dram-bytes",
        "64MiB",
        "--eviction-policy",
        "session",
        "--max-keys",
        "10",
        "--drain-grace-s",
        "0",
        "--log-level",
        "warning",
        "--stream-idle-timeout-s",
        "0.5",
        "--max-transfer-s",
        "5",
        "--max-put-reserved-bytes",
        "8MiB",
        "--max-namespaces",
        "7",
    )
    assert config.listen == "127.0.0.1:0"
    assert config.store.dram_bytes == 64 * MiB
    assert config.store.eviction_policy == "session"
    assert config.limits.max_keys == 10
    assert config.store.max_put_reserved_bytes == 8 * MiB
    assert config.store.max_namespaces == 7
    assert config.limits.drain_grace_s == 0
    assert config.log_level == "warning"
    assert config.limits.stream_idle_timeout_s == 0.5
    assert config.limits.max_transfer_s == 5.0
    # Settings no flag names keep the file's values.
    assert config.store.page_bytes == 16 * KiB
    assert config.limits.max_message_bytes == 4 * MiB
    assert config.limits.frame_timeout_s == 2.5
    assert parse_flags("--frame-timeout-s", "0.25").limits.frame_timeout_s == 0.25


def test_flags_alone() -> None:
    config = parse_flags(
        "--page-bytes", "4KiB", "--max-message-bytes", "1MiB", "--default-chunk-bytes", "256KiB"
    )
    assert config.store.page_bytes == 4 * KiB
    assert config.limits.max_message_bytes == MiB
    assert config.limits.default_chunk_bytes == 256 * KiB
    assert config.listen == "127.0.0.1:50051"
    assert config.tune_allocator is True
    assert parse_flags("--no-tune-allocator").tune_allocator is False
    assert (config.gc_freeze_interval_s, config.gc_full_interval_s) == (1.0, 3600.0)
    gc_flags = parse_flags("--gc-freeze-interval-s", "0", "--gc-full-interval-s", "60")
    assert (gc_flags.gc_freeze_interval_s, gc_flags.gc_full_interval_s) == (0.0, 60.0)


def test_a_smaller_message_limit_needs_a_smaller_default_chunk() -> None:
    with pytest.raises(InvalidRequest, match=r"default_chunk_bytes must be in \[65536, 1044480\]"):
        parse_flags("--max-message-bytes", "1MiB")


def test_the_chunk_floor_is_64KiB_or_the_whole_message() -> None:
    """Gets carry at least 64 KiB a message (kvstore.wire.chunks.MIN_CHUNK_BYTES), unless
    the message limit itself allows less; the default chunk must lie between."""
    limits = load_config(None, {"limits.default_chunk_bytes": "64KiB"}).limits
    assert (limits.min_chunk_bytes, limits.default_chunk_bytes) == (64 * KiB, 64 * KiB)
    with pytest.raises(InvalidRequest, match=r"default_chunk_bytes must be in \[65536, "):
        load_config(None, {"limits.default_chunk_bytes": "32KiB"})
    tight = load_config(
        None, {"limits.max_message_bytes": "64KiB", "limits.default_chunk_bytes": 60 * KiB}
    ).limits
    assert tight.min_chunk_bytes == tight.max_chunk_bytes == 60 * KiB


def test_overrides_dict() -> None:
    config = load_config(None, {"store.dram_bytes": "8MiB", "limits.max_keys": 3, "listen": None})
    assert config.store.dram_bytes == 8 * MiB
    assert config.limits.max_keys == 3
    assert config.listen == "127.0.0.1:50051", "a None override means 'not given'"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("64KiB", 64 * KiB),
        ("1.5GiB", int(1.5 * GiB)),
        ("512MiB", 512 * MiB),
        ("2 GiB", 2 * GiB),
        ("10MB", 10_000_000),
        ("1kb", 1000),
        ("4k", 4096),
        ("65536", 65536),
        ("100B", 100),
        (12345, 12345),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "12 parsecs", "-1MiB", "1.2.3GiB", "GiB"])
def test_parse_size_rejects_garbage(text: str) -> None:
    with pytest.raises(InvalidRequest, match=r"as a size; write e\.g\. 512MiB"):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('colour = "blue"\n', "unknown setting(s) ['colour'] in [top level]"),
        ("[store]\ndram_byte = 1\n", "unknown setting(s) ['dram_byte'] in [store]"),
        ("[limits]\nmax_key = 1\n", "unknown setting(s) ['max_key'] in [limits]"),
        ("[ssd]\npath = '/tmp'\n", "unknown setting(s) ['ssd']"),
    ],
)
def test_unknown_settings_are_rejected(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        load_config(write_toml(tmp_path, text), {})
    message = str(raised.value)
    assert fragment in message
    assert "known:" in message


def test_unknown_setting_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="dram_bytes"):
        load_config(write_toml(tmp_path, "[store]\nram = 1\n"), {})


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        ({"log_level": "loud"}, "log_level must be one of"),
        ({"listen": "localhost"}, "HOST:PORT"),
        ({"store.eviction_policy": "fifo"}, "eviction policy 'fifo'"),
        ({"store.max_lease_s": 0}, "max_lease_s must be > 0"),
        ({"store.page_bytes": 1000}, "page_bytes"),
        ({"store.page_bytes": 256}, "page_bytes"),
        ({"store.dram_bytes": "1KiB"}, "dram_bytes"),
        ({"limits.max_message_bytes": "1KiB"}, "between 64KiB and 1GiB"),
        ({"limits.max_message_bytes": "2GiB"}, "between 64KiB and 1GiB"),
        ({"store.max_lease_s": float("nan")}, "max_lease_s must be > 0"),
        ({"limits.drain_grace_s": float("nan")}, "drain_grace_s must be >= 0"),
        ({"store.ssd_bytes": -1}, "ssd_bytes must be >= 0"),
        ({"limits.default_chunk_bytes": "64MiB"}, "default_chunk_bytes"),
        ({"limits.max_keys": 0}, "max_keys must be >= 1"),
        ({"limits.drain_grace_s": -1}, "drain_grace_s must be >= 0"),
        ({"limits.stream_idle_timeout_s": 0}, "limits.stream_idle_timeout_s must be > 0"),
        ({"limits.frame_timeout_s": -1.0}, "limits.frame_timeout_s must be > 0"),
        ({"limits.max_transfer_s": 0}, "limits.max_transfer_s must be > 0"),
        ({"limits.max_transfer_s": "forever"}, "limits.max_transfer_s must be a float"),
        ({"limits.max_keys": "many"}, "limits.max_keys must be a int, got 'many'"),
        ({"store.max_lease_s": "long"}, "store.max_lease_s must be a float"),
        ({"log_level": 3}, "log_level must be a str"),
        ({"tune_allocator": "yes"}, "tune_allocator must be a bool"),
        ({"limits.max_keys": True}, "limits.max_keys must be a int"),
    ],
    ids=lambda value: str(value) if isinstance(value, dict) else "",
)
def test_bad_values_are_rejected_at_load(settings: dict[str, Any], fragment: str) -> None:
    """Every bad value fails in load_config with InvalidRequest, never later in the server."""
    with pytest.raises(InvalidRequest) as raised:
        load_config(None, settings)
    assert fragment in str(raised.value)


def test_unreadable_files_are_reported(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="cannot read config file"):
        load_config(tmp_path / "missing.toml", {})
    with pytest.raises(InvalidRequest, match="cannot read config file"):
        load_config(write_toml(tmp_path, "[store\n"), {})


def test_config_is_frozen() -> None:
    config = load_config(None, {})
    with pytest.raises(AttributeError):
        config.listen = "0.0.0.0:1"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        config.store.dram_bytes = 1  # type: ignore[misc]
