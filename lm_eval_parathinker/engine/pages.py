"""The KV pages of the engine: a pool of fixed-size pages, and which pages each request holds.

A request is a few :mod:`protocol` *blocks*: its prompt (block 0), its paths (block k for path k)
and its summary (``protocol.SUMMARY_BLOCK``, -1: the last of a slot's page lists, as Python and
torch index). Every block owns a list of pages,
allocated as it grows: the prompt's pages when the request is admitted, a path's next page when
its next token crosses a page boundary, the summary's when it starts and as it grows. The P paths
of a request read the prompt's pages in place (written once, shared read-only), and the summary
reads the prompt's and every path's pages as they are, plus its own: nothing is copied or
recomputed. Everything a request holds is freed when it ends, or when it is preempted.

:class:`PagePool` is the host side (a free list, nano-vllm's block manager): it decides. The
device mirror of every slot's page lists (``table``), which the step reads, is written by the
scheduler from the pool's decisions (:meth:`PagePool.flush`), a few entries at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCRATCH_PAGE = 0  # never allocated: padding queries write here, nothing reads it


def pages_for(tokens: int, page_size: int) -> int:
    """Pages that hold ``tokens`` tokens."""
    return -(-tokens // page_size)


def request_pages(prompt_len: int, num_paths: int, budget: int, summary_len: int, page_size: int) -> int:
    """Pages a request holds at most: its prompt's, ``num_paths`` paths of ``budget`` tokens, and
    its summary's (``summary_len`` tokens, template included; 0: none)."""
    return pages_for(prompt_len, page_size) + num_paths * pages_for(budget, page_size) + pages_for(summary_len, page_size)


@dataclass
class PoolStats:
    """What the pool did during one engine call (reported in the run's statistics)."""

    num_pages: int
    page_size: int
    peak_pages: int = 0  # most pages held at once
    peak_tokens: int = 0  # tokens those pages held at that moment... (see PagePool.note_tokens)
    preemptions: int = 0

    def as_dict(self, bytes_per_token: int) -> dict:
        return {
            "kv_pool_pages": self.num_pages,
            "kv_page_size": self.page_size,
            "kv_pool_bytes": self.num_pages * self.page_size * bytes_per_token,
            "kv_peak_pages": self.peak_pages,
            "kv_peak_bytes": self.peak_pages * self.page_size * bytes_per_token,
            "kv_peak_tokens": self.peak_tokens,
            "preemptions": self.preemptions,
        }


class PagePool:
    """Fixed-size pages with a free list, and each slot's page lists per block.

    ``num_pages`` counts the scratch page; ``table`` ([slots, P + 2 blocks, max_pages], on the device,
    every entry the scratch page: see :meth:`kv_cache.PagedKVCache.page_table`) mirrors the page
    lists once :meth:`flush` has copied the latest changes.
    """

    def __init__(self, num_pages: int, page_size: int, table: torch.Tensor):
        if num_pages < 2:
            raise ValueError(f"a KV pool needs at least 2 pages (one is scratch), not {num_pages}")
        slots, blocks, _ = table.shape
        self.page_size = page_size
        self.free_pages = list(range(num_pages - 1, SCRATCH_PAGE, -1))  # pop() hands out low ids first
        self.held: list[list[list[int]]] = [[[] for _ in range(blocks)] for _ in range(slots)]
        self.table = table
        self.stats = PoolStats(num_pages=num_pages, page_size=page_size)
        self._pending: list[tuple[int, int, int, int]] = []  # (slot, block, index, page) not yet in `table`

    @property
    def num_free(self) -> int:
        return len(self.free_pages)

    @property
    def num_used(self) -> int:
        return self.stats.num_pages - 1 - len(self.free_pages)

    def pages(self, slot: int, block: int) -> list[int]:
        return self.held[slot][block]

    def grow(self, slot: int, block: int, tokens: int) -> bool:
        """Give ``block`` of ``slot`` pages for ``tokens`` tokens in all; False (nothing taken)
        when the pool has too few free pages."""
        have = self.held[slot][block]
        missing = pages_for(tokens, self.page_size) - len(have)
        if missing <= 0:
            return True
        if missing > len(self.free_pages):
            return False
        for _ in range(missing):
            page = self.free_pages.pop()
            self._pending.append((slot, block, len(have), page))
            have.append(page)
        self.stats.peak_pages = max(self.stats.peak_pages, self.num_used)
        return True

    def shrink(self, slot: int, block: int, tokens: int) -> None:
        """Free the pages of ``block`` beyond ``tokens`` tokens (pages taken ahead of a path
        that turned out to have ended)."""
        have = self.held[slot][block]
        keep = pages_for(tokens, self.page_size)
        self.free_pages.extend(reversed(have[keep:]))
        del have[keep:]

    def release(self, slot: int) -> None:
        """Free every page the slot holds (its request ended or was preempted)."""
        for pages in self.held[slot]:
            self.free_pages.extend(reversed(pages))
            pages.clear()
        self._pending = [p for p in self._pending if p[0] != slot]

    def note_tokens(self, tokens: int) -> None:
        """Record the tokens held now, when as many pages as ever are held (for the memory report)."""
        if self.num_used == self.stats.peak_pages:
            self.stats.peak_tokens = max(self.stats.peak_tokens, tokens)

    def flush(self) -> None:
        """Copy the page lists' changes since the last flush into ``table`` (one write)."""
        if not self._pending:
            return
        slot, block, index, page = (torch.tensor(c, device=self.table.device) for c in zip(*self._pending))
        self.table[slot, block, index] = page
        self._pending.clear()
