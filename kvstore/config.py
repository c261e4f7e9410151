"""The core's configuration: tier sizes and how blocks move between tiers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from kvstore.enums import TierKind
from kvstore.errors import InvalidRequest
from kvstore.eviction import POLICIES
from kvstore.layer_codec import COMPRESSIONS as SSD_COMPRESSIONS
from kvstore.units import human_bytes

MiB = 1 << 20
GiB = 1 << 30
WRITE_POLICIES = ("write-back", "write-through")


@dataclass(frozen=True, kw_only=True)
class TenantQuota:
    """One tenant's hard limits (`[quotas."TENANT"]`); None: no limit of that kind.

    - `dram_bytes` / `hbm_bytes` / `ssd_bytes`: the tier's footprint (whole pages, as
      the tier counts `used_bytes`) the tenant owns, its put reservations included. Its
      blocks leave the tier only to make room for its own allocations (kvstore.pool).
    - `pinned_bytes`: block bytes the tenant may hold under leases at once.
    - `max_lease_s`: its longest lease (shorter than the store's `max_lease_s`).
    - `max_transfers`: puts and gets it may run at once (kvstore.server.transfer).
    - `max_data_connections`: data-plane connections it may hold open at once, counted
      by the tenant its credential proves (kvstore.server.dataplane); without
      authentication no connection has a tenant, and only the daemon-wide limit holds.
    """

    dram_bytes: int | None = None
    hbm_bytes: int | None = None
    ssd_bytes: int | None = None
    pinned_bytes: int | None = None
    max_lease_s: float | None = None
    max_transfers: int | None = None
    max_data_connections: int | None = None

    def __post_init__(self) -> None:
        for name in (
            "dram_bytes",
            "hbm_bytes",
            "ssd_bytes",
            "pinned_bytes",
            "max_transfers",
            "max_data_connections",
        ):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise InvalidRequest(f"quota {name} must be >= 0, got {value}")
        if self.max_lease_s is not None and not self.max_lease_s > 0:
            raise InvalidRequest(f"quota max_lease_s must be > 0, got {self.max_lease_s}")

    def tier_bytes(self, kind: TierKind) -> int | None:
        """The quota on `kind`'s tier, None when the tenant has none there."""
        if kind is TierKind.DRAM:
            return self.dram_bytes
        if kind is TierKind.HBM:
            return self.hbm_bytes
        return self.ssd_bytes


@dataclass(frozen=True, kw_only=True)
class StoreConfig:
    """Tier capacities and movement policy.

    - `write_policy`: "write-back" demotes DRAM blocks to SSD when DRAM passes its high
      watermark; "write-through" writes every admitted block to SSD when it is put.
    - `ssd_admit_after_seen`: a block earns SSD only once seen this many times (its put
      counts once, every lookup or get hit once more); 1 admits every block.
    - `promote_on_hit`: a get of an SSD-only block copies it back into DRAM.
    - `ssd_compression`: "lz4" stores each SSD layer byte-shuffled and lz4-compressed
      where that saves at least `ssd_compress_min_saving` of it (kvstore.layer_codec);
      "off" (the default) writes layers as they are.
    - `hbm_promote_after_seen`: blocks seen this often are copied into HBM on a get.
    - `high_watermark` / `low_watermark`: when a tier fills past high, a background
      task makes room down to low, so puts rarely wait for eviction.
    - `max_put_reserved_bytes`: DRAM one put may hold for blocks it has started sending
      but not completed (0: half of `dram_bytes`). Room is reserved as a block's first
      bytes arrive, so this bounds what one stream can take from everyone else.
    - `max_namespaces`: namespaces that may hold blocks or puts at once; a namespace
      is freed when its last block and put are gone.
    - `quotas`: per tenant, its hard limits (TenantQuota). Tenants without a quota on a
      tier share what the quotas leave of it.
    - `read_bytes_per_s`: per tier name ("hbm", "dram", "ssd"), the bytes per second
      gets may read from it, all gets together (kvstore.server.throttle): emulates a
      slower tier or network. A tier not named is not throttled.
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
    ssd_compression: str = "off"
    ssd_compress_min_saving: float = 0.1
    max_put_reserved_bytes: int = 0
    max_namespaces: int = 65536
    quotas: Mapping[str, TenantQuota] = field(default_factory=dict)
    read_bytes_per_s: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.eviction_policy not in POLICIES:
            raise InvalidRequest(
                f"unknown eviction policy {self.eviction_policy!r}; choose from {sorted(POLICIES)}"
            )
        if not self.max_lease_s > 0:  # NaN too: it would cap no lease
            raise InvalidRequest(f"max_lease_s must be > 0, got {self.max_lease_s}")
        if self.ssd_bytes < 0:
            raise InvalidRequest(f"ssd_bytes must be >= 0, got {self.ssd_bytes}")
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
        if self.ssd_compression not in SSD_COMPRESSIONS:
            raise InvalidRequest(
                f"ssd_compression must be one of {SSD_COMPRESSIONS}, got {self.ssd_compression!r}"
            )
        if not 0.0 <= self.ssd_compress_min_saving < 1.0:
            raise InvalidRequest(
                f"ssd_compress_min_saving must be in [0, 1), got {self.ssd_compress_min_saving}"
            )
        if self.max_put_reserved_bytes < 0:
            raise InvalidRequest(
                f"max_put_reserved_bytes must be >= 0 (0: half of dram_bytes), "
                f"got {self.max_put_reserved_bytes}"
            )
        if self.max_namespaces < 1:
            raise InvalidRequest(f"max_namespaces must be >= 1, got {self.max_namespaces}")
        self._check_quotas()
        self._check_read_rates()

    def tier_capacity_bytes(self, kind: TierKind) -> int:
        """The configured size of `kind`'s tier; 0 when the store has no such tier."""
        if kind is TierKind.DRAM:
            return self.dram_bytes
        if kind is TierKind.HBM:
            return self.hbm_bytes
        return self.ssd_bytes if self.ssd_dir is not None else 0

    def _check_quotas(self) -> None:
        for kind in TierKind:
            capacity = self.tier_capacity_bytes(kind)
            quoted = {
                tenant: quota.tier_bytes(kind)
                for tenant, quota in self.quotas.items()
                if quota.tier_bytes(kind) is not None
            }
            name = kind.name.lower()
            if quoted and not capacity:
                raise InvalidRequest(
                    f"quotas for {sorted(quoted)} set {name}_bytes, but the store has no "
                    f"{kind.name} tier; remove the quota or configure the tier"
                )
            total = sum(nbytes or 0 for nbytes in quoted.values())
            if total > capacity:
                raise InvalidRequest(
                    f"the {name}_bytes quotas of {sorted(quoted)} add up to "
                    f"{human_bytes(total)}, more than the {kind.name} tier's "
                    f"{human_bytes(capacity)}; shrink the quotas or grow the tier"
                )

    def _check_read_rates(self) -> None:
        names = {kind.name.lower(): kind for kind in TierKind}
        for name, rate in self.read_bytes_per_s.items():
            kind = names.get(name)
            if kind is None:
                raise InvalidRequest(
                    f"read_bytes_per_s names an unknown tier {name!r}; tiers are {sorted(names)}"
                )
            if isinstance(rate, bool) or not isinstance(rate, int) or rate <= 0:
                raise InvalidRequest(
                    f"read_bytes_per_s.{name} must be a positive rate in bytes/s "
                    f"(e.g. 200MB), got {rate!r}"
                )
            if not self.tier_capacity_bytes(kind):
                raise InvalidRequest(
                    f"read_bytes_per_s throttles {name}, but the store has no {kind.name} "
                    f"tier; remove the throttle or configure the tier"
                )

    def read_rate(self, kind: TierKind) -> int:
        """Bytes/s gets may read from `kind`'s tier; 0: not throttled."""
        return self.read_bytes_per_s.get(kind.name.lower(), 0)

    @property
    def put_reserved_limit_bytes(self) -> int:
        """`max_put_reserved_bytes`, with 0 resolved to half of DRAM."""
        return self.max_put_reserved_bytes or self.dram_bytes // 2
