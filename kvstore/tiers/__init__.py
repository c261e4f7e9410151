"""Storage tiers. Each tier lives in its own module and satisfies `Tier` (base.py)."""
