"""Rebuilding the block index from the SSD tier's directory at start-up."""

from __future__ import annotations

import logging
from collections import defaultdict

from kvstore.enums import TierKind
from kvstore.index import BlockEntry
from kvstore.pool import BlockPool
from kvstore.tiers.ssd import RecoveredBlock

logger = logging.getLogger("kvstore.recovery")


def recover_index(pool: BlockPool) -> int:
    """Rebuild the index from the SSD directory; returns the number of blocks restored.

    Every file is verified (kvstore.tiers.ssd.SsdTier.recover). A block comes back only
    if its parent did, so a lookup can never find a child whose parent is gone.
    """
    ssd = pool.ssd
    if ssd is None:
        return 0
    recovered = ssd.recover()
    children: dict[tuple[object, bytes], list[RecoveredBlock]] = defaultdict(list)
    for block in recovered:
        children[(block.header.namespace, block.header.parent_key)].append(block)
    # Breadth-first from chain heads: a block comes back only if its parent did.
    frontier: list[tuple[RecoveredBlock, BlockEntry | None]] = []
    for (_, parent_key), blocks in list(children.items()):
        if parent_key == b"":
            frontier.extend((block, None) for block in blocks)
    restored = 0
    while frontier:
        block, parent = frontier.pop()
        entry = _restore(pool, block, parent)
        restored += 1
        header = block.header
        frontier.extend(
            (child, entry) for child in children.pop((header.namespace, header.key), [])
        )
    orphans = [
        block for (_, parent_key), blocks in children.items() if parent_key for block in blocks
    ]
    for block in orphans:
        ssd.discard(block.location.path, "deleting an orphaned block file")
    if orphans:
        logger.warning(
            "dropped %d block files whose parent block did not survive (write-back keeps "
            "recent blocks in DRAM only, and write-through answers before it writes)",
            len(orphans),
        )
    logger.info("recovered %d blocks (%d B) from %s", restored, ssd.used_bytes, ssd.directory)
    return restored


def _restore(pool: BlockPool, block: RecoveredBlock, parent: BlockEntry | None) -> BlockEntry:
    header = block.header
    state = pool.namespace_state(header.namespace)
    entry = BlockEntry(
        namespace=state,
        key=header.key,
        parent=parent,
        layer_checksums=list(header.layer_checksums),
        checksum_kind_value=header.checksum_kind.value,
        copies={TierKind.SSD: block.location},
    )
    pool.restore(entry)
    return entry
