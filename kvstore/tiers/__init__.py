"""Storage tiers. Each tier lives in its own module and satisfies `Tier` (base.py);
the memory tiers (DRAM, HBM) also satisfy `MemoryTier`."""
