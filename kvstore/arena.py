"""A preallocated byte arena carved into fixed-size pages.

A block occupies a list of pages that need not be adjacent, so any freed page can
serve any block size and the arena never fragments. Nothing is allocated per block
on the hot path: allocation pops page numbers off a free list. On the CPU, reads and
writes are memoryview slices of the one backing buffer; on an accelerator (the HBM
tier) they are tensor copies to and from host memory.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from kvstore.errors import InvalidRequest


class PageArena:
    """`capacity_bytes` of memory in pages of `page_bytes`."""

    def __init__(
        self,
        capacity_bytes: int,
        page_bytes: int,
        *,
        pin_memory: bool = False,
        device: torch.device | None = None,
        tensor_copies: bool = False,
    ) -> None:
        if page_bytes < 512 or page_bytes & (page_bytes - 1):
            raise InvalidRequest(f"page_bytes must be a power of two >= 512, got {page_bytes}")
        if capacity_bytes < page_bytes:
            raise InvalidRequest(
                f"arena capacity {capacity_bytes} B is smaller than one page ({page_bytes} B)"
            )
        self.page_bytes = page_bytes
        self.num_pages = capacity_bytes // page_bytes
        self.capacity_bytes = self.num_pages * page_bytes
        self.device = device or torch.device("cpu")
        # The HBM tier asks for tensor copies even on the CPU, so the code path a GPU
        # runs is the one its emulation tests.
        if self.device.type == "cpu" and not tensor_copies:
            # Pinned host memory lets CUDA copies run asynchronously; plain memory otherwise.
            self._tensor = torch.empty(
                self.capacity_bytes, dtype=torch.uint8, pin_memory=pin_memory
            )
            self._view: memoryview | None = self._tensor.numpy().data
        else:
            self._tensor = torch.empty(self.capacity_bytes, dtype=torch.uint8, device=self.device)
            self._view = None
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
        for start, length in self._spans(pages, offset, len(source)):
            part = source[done : done + length]
            if self._view is not None:
                self._view[start : start + length] = part
            else:
                array = np.frombuffer(part, dtype=np.uint8)
                if not array.flags.writeable:
                    array = array.copy()
                self._tensor[start : start + length].copy_(torch.from_numpy(array))
            done += length

    def write_slices(
        self, blocks: list[list[int]], offset: int, data: memoryview, nbytes: int
    ) -> None:
        """Copy slice i (`nbytes` long) of `data` into `blocks[i]` at byte `offset`.

        One vectorised copy when every slice lands inside one page at a multiple of its
        size (a layer of a small block: the common case); a write per block otherwise.
        """
        page, within = divmod(offset, self.page_bytes)
        if (
            self._view is not None
            and self.page_bytes % nbytes == 0
            and within % nbytes == 0
            and len(data) == len(blocks) * nbytes
        ):
            rows_per_page = self.page_bytes // nbytes
            rows = self._tensor.numpy().reshape(-1, nbytes)  # a view: no copy
            index = np.fromiter((pages[page] for pages in blocks), np.int64, len(blocks))
            index *= rows_per_page
            index += within // nbytes
            rows[index] = np.frombuffer(data, dtype=np.uint8).reshape(len(blocks), nbytes)
            return
        for number, pages in enumerate(blocks):
            self.write(pages, offset, data[number * nbytes : (number + 1) * nbytes])

    def read_slices(self, blocks: list[list[int]], offset: int, nbytes: int) -> list[memoryview]:
        """`read(pages, offset, nbytes)` of each block, concatenated: one view per block
        when the bytes sit inside one page (a layer of a small block, usually)."""
        page, within = divmod(offset, self.page_bytes)
        if self._view is not None and within + nbytes <= self.page_bytes:
            view, page_bytes = self._view, self.page_bytes
            starts = [pages[page] * page_bytes + within for pages in blocks]
            return [view[start : start + nbytes] for start in starts]
        return [part for pages in blocks for part in self.read(pages, offset, nbytes)]

    def landing_slices(
        self, blocks: list[list[int]], offset: int, nbytes: int
    ) -> list[memoryview] | None:
        """Writable views of bytes `[offset, offset + nbytes)` of each block, one per
        block, for a caller that receives the bytes in place; None where they cannot be
        had (an accelerator's arena, or a slice that crosses a page)."""
        if self._view is None or offset % self.page_bytes + nbytes > self.page_bytes:
            return None
        return self.read_slices(blocks, offset, nbytes)

    def read(self, pages: list[int], offset: int, nbytes: int) -> list[memoryview]:
        """The bytes `[offset, offset + nbytes)` of the block, in order.

        On the CPU these are views, valid until the pages are freed; on an accelerator
        they are host copies.
        """
        if self._view is not None:
            view = self._view
            return [
                view[start : start + length] for start, length in self._spans(pages, offset, nbytes)
            ]
        return [
            self._tensor[start : start + length].cpu().numpy().data
            for start, length in self._spans(pages, offset, nbytes)
        ]

    def block_tensor(self, pages: list[int], nbytes: int) -> torch.Tensor | None:
        """The block as one uint8 tensor view when its pages are adjacent, else None."""
        first = pages[0]
        if pages[-1] - first != len(pages) - 1 or any(
            page != first + i for i, page in enumerate(pages)
        ):
            return None
        start = first * self.page_bytes
        return self._tensor[start : start + nbytes]

    def _spans(self, pages: list[int], offset: int, nbytes: int) -> Iterator[tuple[int, int]]:
        """(start, length) runs of the arena holding the block's bytes [offset, offset+nbytes)."""
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
            yield pages[first] * page_bytes + within, span_end - offset
            offset = span_end
