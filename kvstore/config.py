"""The core's configuration: tier sizes and how blocks move between tiers."""

from __future__ import annotations

from dataclasses import dataclass

from kvstore.errors import InvalidRequest
from kvstore.eviction import POLICIES

MiB = 1 << 20
GiB = 1 << 30
WRITE_POLICIES = ("write-back", "write-through")


@dataclass(frozen=True, kw_only=True)
class StoreConfig:
    """Tier capacities and movement policy.

    - `write_policy`: "write-back" demotes DRAM blocks to SSD when DRAM passes its high
      watermark; "write-through" writes every admitted block to SSD when it is put.
    - `ssd_admit_after_seen`: a block earns SSD only once seen this many times (its put
      counts once, every lookup or get hit once more); 1 admits every block.
    - `promote_on_hit`: a get of an SSD-only block copies it back into DRAM.
    - `hbm_promote_after_seen`: blocks seen this often are copied into HBM on a get.
    - `high_watermark` / `low_watermark`: when a tier fills past high, a background
      task makes room down to low, so puts rarely wait for eviction.
    - `max_put_reserved_bytes`: DRAM one put may hold for blocks it has started sending
      but not completed (0: half of `dram_bytes`). Room is reserved as a block's first
      bytes arrive, so this bounds what one stream can take from everyone else.
    - `max_namespaces`: namespaces that may hold blocks or puts at once; a namespace
      is freed when its last block and put are gone.
    """

    dram_bytes: int = 1 * GiB
    page_bytes: int = 64 * 1024
    eviction_policy: str = "lru"
    max_lease_s: float = 3600.0
    pin_memory: bool = False
    hbm_bytes: int = 0
    hbm_device: str = "auto"
    hbm_promote_after_seen: int = 2
    ssd_dir: str | None = None
    ssd_bytes: int = 16 * GiB
    ssd_fsync: bool = False
    write_policy: str = "write-back"
    ssd_admit_after_seen: int = 1
    promote_on_hit: bool = True
    high_watermark: float = 0.95
    low_watermark: float = 0.85
    ssd_io_threads: int = 2
    max_put_reserved_bytes: int = 0
    max_namespaces: int = 65536

    def __post_init__(self) -> None:
        if self.eviction_policy not in POLICIES:
            raise InvalidRequest(
                f"unknown eviction policy {self.eviction_policy!r}; choose from {sorted(POLICIES)}"
            )
        if self.max_lease_s <= 0:
            raise InvalidRequest(f"max_lease_s must be > 0, got {self.max_lease_s}")
        # Checked here too, not only by the arena, so a bad config fails when it is loaded.
        if self.page_bytes < 512 or self.page_bytes & (self.page_bytes - 1):
            raise InvalidRequest(f"page_bytes must be a power of two >= 512, got {self.page_bytes}")
        if self.dram_bytes < self.page_bytes:
            raise InvalidRequest(
                f"dram_bytes ({self.dram_bytes}) must hold at least one page ({self.page_bytes} B)"
            )
        if self.hbm_bytes and self.hbm_bytes < self.page_bytes:
            raise InvalidRequest("hbm_bytes must be 0 (no HBM tier) or at least one page")
        if self.hbm_device not in ("auto", "cpu", "cuda") and not self.hbm_device.startswith(
            "cuda:"
        ):
            raise InvalidRequest(
                f"hbm_device must be auto, cpu or cuda[:N], got {self.hbm_device!r}"
            )
        if self.write_policy not in WRITE_POLICIES:
            raise InvalidRequest(f"write_policy must be one of {WRITE_POLICIES}")
        if not 0.0 < self.low_watermark < self.high_watermark <= 1.0:
            raise InvalidRequest("watermarks must satisfy 0 < low_watermark < high_watermark <= 1")
        if self.ssd_admit_after_seen < 1 or self.hbm_promote_after_seen < 1:
            raise InvalidRequest("ssd_admit_after_seen and hbm_promote_after_seen must be >= 1")
        if self.ssd_io_threads < 1:
            raise InvalidRequest("ssd_io_threads must be >= 1")
        if self.max_put_reserved_bytes < 0:
            raise InvalidRequest(
                f"max_put_reserved_bytes must be >= 0 (0: half of dram_bytes), "
                f"got {self.max_put_reserved_bytes}"
            )
        if self.max_namespaces < 1:
            raise InvalidRequest(f"max_namespaces must be >= 1, got {self.max_namespaces}")

    @property
    def put_reserved_limit_bytes(self) -> int:
        """`max_put_reserved_bytes`, with 0 resolved to half of DRAM."""
        return self.max_put_reserved_bytes or self.dram_bytes // 2
