"""`[quotas."TENANT"]` tables through the real config loader: what loads, and the
start-up errors for bad ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstore.config import TenantQuota
from kvstore.errors import InvalidRequest
from kvstore.server import load_config

TIERS = """
[store]
dram_bytes = "64MiB"
page_bytes = "64KiB"
"""


def load(tmp_path: Path, text: str) -> object:
    path = tmp_path / "kvstore.toml"
    path.write_text(text + TIERS)
    return load_config(path, {})


def test_quota_tables_load_into_the_store_config(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
[quotas."team-a"]
dram_bytes = "16MiB"
pinned_bytes = "4MiB"
max_lease_s = 60
max_transfers = 8

[quotas.b]
dram_bytes = 1048576
""",
    )
    assert config.store.quotas == {  # type: ignore[attr-defined]
        "team-a": TenantQuota(
            dram_bytes=16 << 20, pinned_bytes=4 << 20, max_lease_s=60, max_transfers=8
        ),
        "b": TenantQuota(dram_bytes=1 << 20),
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[quotas.a]\ndram_byte = "1MiB"\n',
            r"unknown setting\(s\) \['dram_byte'\] in \[quotas.'a'\]",
        ),
        ("[quotas.a]\ndram_bytes = -1\n", r"\[quotas.'a'\]: quota dram_bytes must be >= 0"),
        ('[quotas.a]\npinned_bytes = "lots"\n', "cannot read 'lots' as a size"),
        ('[quotas.a]\nmax_transfers = "8"\n', r"quotas.'a'.max_transfers must be a int"),
        (
            '[quotas.a]\nhbm_bytes = "1MiB"\n',
            r"quotas for \['a'\] set hbm_bytes, but the store has no HBM",
        ),
        ('[quotas.a]\nssd_bytes = "1MiB"\n', "no SSD tier"),
        (
            '[quotas.a]\ndram_bytes = "40MiB"\n[quotas.b]\ndram_bytes = "40MiB"\n',
            r"the dram_bytes quotas of \['a', 'b'\] add up to 80.0 MiB, more than the DRAM "
            r"tier's 64.0 MiB",
        ),
        ("quotas = 3\n", "quotas must be tables"),
    ],
)
def test_bad_quotas_fail_at_start_up(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        load(tmp_path, text)


def test_quotas_inside_the_store_table_are_refused() -> None:
    with pytest.raises(InvalidRequest, match=r'quotas go in \[quotas."TENANT"\] tables'):
        load_config(None, {"store.quotas": {"a": {"dram_bytes": 1}}})
