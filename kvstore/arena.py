"""A preallocated byte arena carved into fixed-size pages.

A block occupies a list of pages that need not be adjacent, so any freed page can
serve any block size and the arena never fragments. Nothing is allocated per block
on the hot path: allocation pops page numbers off a free list, and reads and writes
are memoryview slices of the one backing buffer.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from kvstore.errors import InvalidRequest


class PageArena:
    """`capacity_bytes` of memory in pages of `page_bytes`."""

    def __init__(self, capacity_bytes: int, page_bytes: int, *, pin_memory: bool = False) -> None:
        if page_bytes < 512 or page_bytes & (page_bytes - 1):
            raise InvalidRequest(f"page_bytes must be a power of two >= 512, got {page_bytes}")
        if capacity_bytes < page_bytes:
            raise InvalidRequest(
                f"arena capacity {capacity_bytes} B is smaller than one page ({page_bytes} B)"
            )
        self.page_bytes = page_bytes
        self.num_pages = capacity_bytes // page_bytes
        self.capacity_bytes = self.num_pages * page_bytes
        # Pinned host memory lets CUDA copies run asynchronously; plain memory otherwise.
        self._tensor = torch.empty(self.capacity_bytes, dtype=torch.uint8, pin_memory=pin_memory)
        self._view = memoryview(self._tensor.numpy())
        # Popped from the end: low page numbers are handed out first.
        self._free_pages = list(range(self.num_pages - 1, -1, -1))

    @property
    def free_bytes(self) -> int:
        return len(self._free_pages) * self.page_bytes

    @property
    def used_bytes(self) -> int:
        return self.capacity_bytes - self.free_bytes

    def pages_for(self, nbytes: int) -> int:
        return -(-nbytes // self.page_bytes)

    def allocate(self, nbytes: int) -> list[int] | None:
        """Pages for `nbytes`, or None when too few are free (nothing is taken then)."""
        count = self.pages_for(nbytes)
        if count > len(self._free_pages):
            return None
        taken = self._free_pages[-count:]
        del self._free_pages[-count:]
        taken.reverse()
        return taken

    def free(self, pages: list[int]) -> None:
        self._free_pages.extend(reversed(pages))

    def write(self, pages: list[int], offset: int, data: bytes | memoryview) -> None:
        """Copy `data` into the block made of `pages`, starting at byte `offset`."""
        source = memoryview(data).cast("B")
        done = 0
        for target in self._spans(pages, offset, len(source)):
            target[:] = source[done : done + len(target)]
            done += len(target)

    def read(self, pages: list[int], offset: int, nbytes: int) -> list[memoryview]:
        """Views of the bytes `[offset, offset + nbytes)` of the block; valid until freed."""
        return list(self._spans(pages, offset, nbytes))

    def block_tensor(self, pages: list[int], nbytes: int) -> torch.Tensor | None:
        """The block as one uint8 tensor view when its pages are adjacent, else None."""
        first = pages[0]
        if pages[-1] - first != len(pages) - 1 or any(
            page != first + i for i, page in enumerate(pages)
        ):
            return None
        start = first * self.page_bytes
        return self._tensor[start : start + nbytes]

    def _spans(self, pages: list[int], offset: int, nbytes: int) -> Iterator[memoryview]:
        page_bytes = self.page_bytes
        end = offset + nbytes
        last_index = (end - 1) // page_bytes
        while offset < end:
            first, within = divmod(offset, page_bytes)
            # Physically adjacent pages form one span, so a block in a freshly
            # filled arena reads and writes with a single memcpy.
            last = first
            while last < last_index and pages[last + 1] == pages[last] + 1:
                last += 1
            span_end = min(end, (last + 1) * page_bytes)
            start = pages[first] * page_bytes + within
            yield self._view[start : start + span_end - offset]
            offset = span_end
