"""Attention over KV pages: every query reads the keys it may see, and no others.

A decode step's queries each read whole pages (:class:`PageReads`): a path query the prompt's
pages and its own path's, a summary query the prompt's, every path's and the summary's. A page
is *full* (every token visible) or the *partial* last page of a block, whose first ``fill``
tokens are visible (``fill`` counts the tokens written into each page). Two kernels read them:

* ``flex``: PyTorch FlexAttention with a ``BlockMask`` whose KV tiles are the pages
  (``BlockMask.from_kv_blocks``, as torch's own paged attention builds them): the kernel reads
  the listed pages of the pool in place, skips the rest, and applies the ``fill`` mask to
  partial pages only (on CUDA to every page: :func:`flex_full_tiles`). Compiled (inference
  runs on CPUs with AVX2 and on CUDA, there with pages that fit its KV tiles:
  :func:`flex_reads_pages`); static shapes, so the compiled step can be captured in a CUDA graph.
* ``sdpa``: the pages a query reads gathered into one tensor, then SDPA (GQA folded into the
  query axis, no ``repeat_kv`` copy): eager everywhere, the fallback and the reference.

Each is a :class:`Kernel` object (:data:`FLEX`, :data:`SDPA`) with one interface: it prepares a
step's page reads and attends over them. ``auto`` picks ``flex`` where it runs
(:func:`resolve_kernel`). Multi-token forwards (a
prompt's prefill, a summary template, ``reprefill``) attend with :class:`FreshReads`: causally to
this forward's own keys, after context pages they see in full, or (``reprefill``) under the
two-phase rule, run of blocks by run in chunks of queries, never through an [n, n] mask.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.torch_version import TorchVersion
from transformers import AttentionInterface

from ..protocol import additive_mask, may_attend
from ..upstream import torch as upstream_torch
from ..upstream import transformers as upstream_transformers

PAGED_ATTENTION = "parathinker_paged"
KERNELS = ("auto", "flex", "sdpa")
FLEX_Q_TILE = 128  # flex's query tile: a query's heads fit one


# Compiled CPU FlexAttention from the torch release the tests pass on: torch 2.11's CPU flex
# kernels corrupted the heap in an lm_eval run (the official layout after SFT, tests/test_training.py)
CPU_FLEX_MIN_TORCH = "2.13"
FLEX_RUNS_ON = f"CUDA, or an x86 CPU with AVX2 and torch >= {CPU_FLEX_MIN_TORCH}; not with TORCH_COMPILE_DISABLE"


def flex_available(device: torch.device) -> bool:
    """Compiled FlexAttention runs on CUDA, and on x86 CPUs with AVX2 (inference only) from
    torch :data:`CPU_FLEX_MIN_TORCH`, in a process where torch.compile compiles."""
    if not upstream_torch.compile_enabled():
        return False
    if device.type == "cuda":
        return True
    if device.type != "cpu" or TorchVersion(torch.__version__) < CPU_FLEX_MIN_TORCH:
        return False
    return upstream_torch.cpu_flex_supported()


def resolve_kernel(kernel: str, device: torch.device, *, page_size: int | None = None, head_dim: int = 0,
                   dtype: torch.dtype = torch.float32) -> Kernel:
    """``auto``: flex where it runs, else sdpa; an explicit choice (one of :data:`KERNELS`, as
    :class:`options.EngineOptions` validates it) is checked. On the CPU, flex runs at one thread count
    per process (:class:`~..upstream.torch.CpuFlexThreads`: choosing it claims this one); on CUDA, with
    pages of ``page_size`` tokens that fit torch's KV tiles for ``head_dim`` and ``dtype``
    (:func:`flex_reads_pages`; None: not checked). Where flex cannot run, ``auto`` falls back to
    sdpa with a warning, and ``flex`` is an error that says why."""
    if kernel == "sdpa":
        return SDPA
    if not flex_available(device):
        if kernel == "flex":
            raise ValueError(f"attention='flex' does not run on {device} with torch {torch.__version__} "
                             f"({FLEX_RUNS_ON}): use 'sdpa'")
        if device.type == "cpu" and TorchVersion(torch.__version__) < CPU_FLEX_MIN_TORCH:
            warnings.warn(f"compiled CPU FlexAttention needs torch >= {CPU_FLEX_MIN_TORCH} (this is "
                          f"{torch.__version__}): attention='auto' uses 'sdpa'", stacklevel=3)
        return SDPA
    problem, fix = _flex_problem(device, page_size, head_dim, dtype)
    if problem is None:
        if device.type == "cpu":
            upstream_torch.CPU_FLEX_THREADS.claim()
        _flex()  # made here, on the host: a compiled step then inlines it as it traces
        return FLEX
    if kernel == "flex":
        raise ValueError(f"attention='flex': {problem}; {fix}")
    warnings.warn(f"{problem}: attention='auto' uses 'sdpa'", stacklevel=3)
    return SDPA


def _flex_problem(device: torch.device, page_size: int | None, head_dim: int,
                  dtype: torch.dtype) -> tuple[str | None, str]:
    """Why flex cannot run here (None: it can), and the fix."""
    if device.type == "cpu":
        ran_with = upstream_torch.CPU_FLEX_THREADS.conflict()
        if ran_with is not None:
            return (f"compiled FlexAttention ran with {ran_with} CPU threads in this process, and now "
                    f"torch uses {torch.get_num_threads()}: inductor's CPU flex kernels are built for one thread count",
                    "use attention='sdpa' or keep the thread count")
    elif page_size is not None:
        forward, decoding = cuda_flex_tiles(device, head_dim, dtype)
        if not flex_reads_pages(page_size, forward, decoding):
            tiles = sorted({n for _, n in forward} | set(decoding))
            return (f"block_size={page_size} does not fit torch's flex kernels on {device} ({dtype}, head_dim "
                    f"{head_dim}), which read KV tiles of {tiles} tokens",
                    f"use a block_size that is a multiple of {max(tiles)} (a multiple of 128 always fits), or "
                    "attention='sdpa'")
    return None, ""


def flex_reads_pages(page_size: int, forward: list[tuple[int, int]], decoding: list[int]) -> bool:
    """Whether torch's flex kernels take KV tiles of ``page_size`` tokens, given the (BLOCK_M,
    BLOCK_N) of the forward kernel's configs and the BLOCK_N of the decoding kernel's: each
    kernel needs a config that fits (``kernel/flex/flex_attention.py``: the KV tile a multiple
    of BLOCK_N and the query tile of BLOCK_M, an error when the only config does not fit;
    ``flex_decoding.py``: a multiple of BLOCK_N, cut down to a smaller page). A multiple of 128
    fits every CUDA config torch has."""
    main = any(page_size % n == 0 and FLEX_Q_TILE % m == 0 for m, n in forward)
    return main and any(page_size % min(n, page_size) == 0 for n in decoding)


def cuda_flex_tiles(device: torch.device, head_dim: int, dtype: torch.dtype) -> tuple[list[tuple[int, int]], list[int]]:
    """The tiles (BLOCK_* sizes) of torch's flex configs on CUDA ``device`` for ``head_dim`` and ``dtype``, as
    inductor's template heuristics choose them (by compute capability; more with max_autotune):
    the forward kernel's (BLOCK_M, BLOCK_N), the decoding kernel's BLOCK_N."""
    with torch.cuda.device(device):  # the heuristics read the current device's capability
        forward, decoding = upstream_torch.cuda_flex_configs(head_dim, dtype)
    return [(c.block_m, c.block_n) for c in forward], [c.block_n for c in decoding]


def _paged_flex(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, block_mask: BlockMask,
                scale: float | None) -> torch.Tensor:
    """flex_attention from a function of the engine's own: dynamo counts (and, past its limit,
    stops) compilations per function, so other flex calls in the process (training's) neither
    share nor use up this one's."""
    return flex_attention(query, key, value, block_mask=block_mask, scale=scale)


# FlexAttention compiled per process (``dynamic``: any pool size, and any number of queries for
# ragged steps; a rectangle's batch is static, one compilation per size: PageReads.attend). Made
# when resolve_kernel picks flex, or at an eager first use (:func:`_flex`), never while a compiled
# step traces: torch.compile imports inductor, seconds of every process's start.
flex_kernel = None


def _flex():
    """The compiled FlexAttention (made once per process, at its first use)."""
    global flex_kernel
    if flex_kernel is None:
        flex_kernel = torch.compile(_paged_flex, dynamic=True)
    return flex_kernel

# Uncompiled, flex applies the mask_mod to the whole pool and ignores which pages a query lists:
# wrong attention, not just slow. Dynamo runs a function uncompiled once it has compiled it
# `recompile_limit` times (8), and from then on for every new shape; flex's kernel and the
# compiled step compile once per batch size (rectangles), page size and KV pool. So their calls
# run under a higher limit, and fail past it (compile_limits).
RECOMPILE_LIMIT = 64


def compile_limits() -> contextlib.AbstractContextManager[None]:
    """Dynamo's recompile limit at least ``RECOMPILE_LIMIT``, and an error past it (instead of
    running uncompiled) while the block runs (nested blocks change nothing)."""
    return upstream_torch.recompile_limit(RECOMPILE_LIMIT)


@dataclass
class PageReads:
    """The pages every query of a decode step reads (``B`` queries, in the forward's order), as
    the kernel takes them; built once per step (:func:`page_reads`), read by every layer."""

    full: torch.Tensor  # [B, W] ids of the pages read in full (the first full_count of each row)
    full_count: torch.Tensor  # [B]
    partial: torch.Tensor  # [B, W] ids of partial last pages (the first partial_count of each row)
    partial_count: torch.Tensor  # [B]
    fill: torch.Tensor  # [num_pages] tokens written in each page
    page_size: int
    kernel: Kernel
    static_batch: bool  # B is the same at every step (see attend)
    block_mask: BlockMask | None = None  # flex: the pages as KV tiles
    gathered: torch.Tensor | None = None  # sdpa: [B, Wb] the pages to gather
    visible: torch.Tensor | None = None  # sdpa: [B, 1, 1, Wb * page_size] additive mask of their tokens

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None) -> torch.Tensor:
        """``query`` [B0, H, Q, D] (B0 * Q = B queries), ``key``/``value`` the pool [1, Hkv, N, D]
        (read in place); returns [B0, Q, H, D]."""
        B0, H, Q, D = query.shape
        kv_heads = key.shape[1]
        # one row per query, the query heads that share a KV head folded into its query axis: each
        # KV page is read once per group, and no K/V is copied to every head
        q = query.transpose(1, 2).reshape(B0 * Q, kv_heads, H // kv_heads, D)
        return self.kernel.attend(self, q, key, value, scale).reshape(B0, Q, H, D)


class Kernel:
    """A decode step's attention over pages: ``prepare`` adds to a step's :class:`PageReads`
    what this kernel reads them with (once per step), ``attend`` runs it (every layer)."""

    name: str  # as the ``attention`` option names it

    def prepare(self, reads: PageReads, full: torch.Tensor, partial: torch.Tensor, pages: torch.Tensor,
                groups: int) -> None:
        """``full``/``partial`` [B, G * M]: which of ``pages`` (each query's slot's page ids) it reads
        in full / partly; ``groups`` query heads share a KV head."""
        raise NotImplementedError

    def attend(self, reads: PageReads, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scale: float | None) -> torch.Tensor:
        """``q`` [B, Hkv, groups, D] (one row per query), ``key``/``value`` the pool [1, Hkv, N, D]."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


class FlexKernel(Kernel):
    """FlexAttention over the pages as KV tiles, read in place (see the module docstring)."""

    name = "flex"

    def prepare(self, reads: PageReads, full: torch.Tensor, partial: torch.Tensor, pages: torch.Tensor,
                groups: int) -> None:
        fill, ps = reads.fill, reads.page_size
        width = fill.shape[0]
        masked, unmasked = ((_compact(partial, pages, width), _compact(full, pages, width))
                            if flex_full_tiles(fill.device) else (_compact(full | partial, pages, width), None))
        reads.block_mask = _block_mask(masked, unmasked, fill, ps, groups, width * ps)

    def attend(self, reads: PageReads, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scale: float | None) -> torch.Tensor:
        if torch.compiler.is_compiling():  # inlined into the compiled step (its inputs are marked static)
            return flex_kernel(q, key, value, block_mask=reads.block_mask, scale=scale)
        if reads.static_batch:
            # torch's flex decoding kernel (one query tile per KV head, work split over the
            # pages read) needs an integer batch; with a symbolic one flex_kernel (dynamic)
            # runs its main kernel, a 128-row query tile for `groups` rows
            upstream_torch.mark_static(q, 0)
        with compile_limits():
            return _flex()(q, key, value, block_mask=reads.block_mask, scale=scale)


class SdpaKernel(Kernel):
    """The pages each query reads gathered into one tensor, then SDPA (eager; the reference)."""

    name = "sdpa"

    def prepare(self, reads: PageReads, full: torch.Tensor, partial: torch.Tensor, pages: torch.Tensor,
                groups: int) -> None:
        reads.gathered, reads.visible = _gathered(reads)

    def attend(self, reads: PageReads, q: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scale: float | None) -> torch.Tensor:
        B, kv_heads, groups, D = q.shape
        N = key.shape[2]
        ps = reads.page_size

        def gather(pool: torch.Tensor) -> torch.Tensor:  # [B, Hkv, Wb * ps, D]
            by_page = pool[0].view(kv_heads, N // ps, ps, D).index_select(1, reads.gathered.flatten())
            return by_page.view(kv_heads, B, -1, D).transpose(0, 1)

        return F.scaled_dot_product_attention(q, gather(key), gather(value), attn_mask=reads.visible.to(q.dtype),
                                              scale=scale)


FLEX, SDPA = FlexKernel(), SdpaKernel()


def page_reads(table: torch.Tensor, lengths: torch.Tensor, slot: torch.Tensor, reads: torch.Tensor,
               fill: torch.Tensor, page_size: int, kernel: Kernel, groups: int, static_batch: bool = False) -> PageReads:
    """The pages of each query: ``slot`` [B] its slot, ``reads`` [B, G] which of the slot's
    blocks it reads, ``lengths`` [S, G] the tokens in every block (this step's included),
    ``table`` [S, G, M] the slots' page ids; ``groups`` query heads share a KV head;
    ``static_batch``: B is the same at every step. Tensor operations only (static shapes) for
    flex; the sdpa kernel reads how many pages the busiest query reads (eager only)."""
    n = torch.where(reads, lengths[slot], 0)  # [B, G]
    index = torch.arange(table.shape[-1], device=table.device)
    complete = (n // page_size)[..., None]
    full = index < complete  # [B, G, M]
    partial = (index == complete) & (n % page_size > 0)[..., None]
    pages = table[slot].flatten(1)  # [B, G * M]
    full, partial = full.flatten(1), partial.flatten(1)
    width = fill.shape[0]
    result = PageReads(*_compact(full, pages, width), *_compact(partial, pages, width), fill, page_size, kernel,
                       static_batch)
    kernel.prepare(result, full, partial, pages, groups)
    return result


def _compact(mask: torch.Tensor, pages: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``pages`` [B, G * M] that ``mask`` selects, first in each row, in ``width`` columns (the
    BlockMask convention: one per page of the pool), and how many each row has."""
    at = torch.where(mask, mask.cumsum(1) - 1, width)  # unselected entries go to a dropped column
    out = torch.zeros(pages.shape[0], width + 1, dtype=pages.dtype, device=pages.device).scatter_(1, at, pages)
    return out[:, :width], mask.sum(1)


def flex_full_tiles(device: torch.device) -> bool:
    """Whether flex reads a query's complete pages as full tiles (no fill mask). Not on CUDA:
    with full tiles torch's flex decoding kernel splits the work over the pool's length
    (``flex_decode.py.jinja``, ``HAS_FULL_BLOCKS``), so most splits find no page; with partial
    tiles only, over the pages read. The CPU kernel is faster with them (25-35% on 2 x86 cores)."""
    return device.type != "cuda"


def _block_mask(masked: tuple[torch.Tensor, torch.Tensor], unmasked: tuple[torch.Tensor, torch.Tensor] | None,
                fill: torch.Tensor, ps: int, groups: int, kv_len: int) -> BlockMask:
    """Pages as FlexAttention KV tiles, one batch row per query (its ``groups`` heads as the
    query axis): ``masked`` ones ((pages [B, W], count [B])) show their first ``fill`` tokens,
    ``unmasked`` ones (None: none) all of theirs."""

    def within_fill(b, h, q_idx, kv_idx):
        return kv_idx % ps < fill[kv_idx // ps]

    def rows(x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.int32)[:, None, None]

    full_count, full = (None, None) if unmasked is None else (rows(unmasked[1]), rows(unmasked[0]))
    return BlockMask.from_kv_blocks(
        rows(masked[1]), rows(masked[0]), full_count, full,
        BLOCK_SIZE=(FLEX_Q_TILE, ps), mask_mod=within_fill, seq_lengths=(groups, kv_len), compute_q_blocks=False,
    )


def _gathered(reads: PageReads) -> tuple[torch.Tensor, torch.Tensor]:
    """The pages to gather per query (as many as the busiest query reads) and the additive mask
    of their visible tokens."""
    ps = reads.page_size
    n_full, n_partial = int(reads.full_count.max()), int(reads.partial_count.max())  # host reads
    pages = torch.cat([reads.full[:, :n_full], reads.partial[:, :n_partial]], 1)  # [B, Wb]
    slot = torch.arange(pages.shape[1], device=pages.device)
    listed = torch.where(slot < n_full, slot < reads.full_count[:, None], slot - n_full < reads.partial_count[:, None])
    offset = torch.arange(ps, device=pages.device)
    visible = listed[..., None] & (offset < torch.where(slot < n_full, ps, reads.fill[pages])[..., None])
    visible = visible.flatten(1)
    visible[:, 0] |= ~visible.any(1)  # a padding query sees one key: a finite softmax (its output is unused)
    return pages, additive_mask(visible, torch.float32)[:, None, None]


# Queries x keys per attention call of a fresh forward by runs of blocks (reprefill): its masks and the
# scores SDPA's math kernel materialises (the two-phase mask rules flash attention out) stay
# this small whatever the forward's length.
FRESH_CHUNK_ELEMENTS = 2**22


@dataclass
class FreshReads:
    """A multi-token forward of one request, whose tokens were written into the pool's
    ``columns`` ([n], in order): its queries attend to every token of ``context`` (pages [C],
    their first ``fill`` tokens) and causally to this forward's own keys; with ``runs``
    ((protocol block, length) of each run of its tokens, in order: a reprefill's prompt and
    paths), a query sees only the runs :func:`protocol.may_attend` lets its block see, attended
    run by run, in chunks of queries: no [n, n] mask or scores."""

    columns: torch.Tensor
    runs: list[tuple[int, int]] | None = None
    context: torch.Tensor | None = None
    fill: torch.Tensor | None = None
    page_size: int = 1

    def _read(self, pool: torch.Tensor) -> torch.Tensor:
        """The context pages' tokens, then this forward's own, gathered from the pool [1, Hkv, N, D]."""
        columns = self.columns
        if self.context is not None:
            offset = torch.arange(self.page_size, device=columns.device)
            columns = torch.cat([(self.context[:, None] * self.page_size + offset).flatten(), columns])
        return pool.index_select(2, columns)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None) -> torch.Tensor:
        """``query`` [1, H, n, D], ``key``/``value`` the pool [1, Hkv, N, D]; returns [1, n, H, D]."""
        n = query.shape[2]
        key, value = self._read(key).to(query.dtype), self._read(value).to(query.dtype)
        if self.runs is not None:
            out = torch.cat(list(_run_attention(query, key, value, scale, self.runs)), dim=2)
        elif self.context is None:
            out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale, enable_gqa=True)
        else:
            offset = torch.arange(self.page_size, device=query.device)
            seen = (offset < self.fill[self.context][:, None]).flatten()
            own = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()
            allowed = torch.cat([seen.expand(n, -1), own], dim=1)
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=additive_mask(allowed, query.dtype),
                                                 scale=scale, enable_gqa=True)
        return out.transpose(1, 2)


def _run_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None,
                   runs: list[tuple[int, int]]) -> Iterator[torch.Tensor]:
    """The two-phase rule over consecutive runs of blocks, chunk by chunk of queries ([1, H, rows, D]
    each, in order): a run's queries attend to the earlier runs their block may see, in full, and
    causally to their own (keys gathered once per run)."""
    starts = [sum(n for _, n in runs[:s]) for s in range(len(runs))]
    for (block, length), start in zip(runs, starts):
        seen = [slice(other_start, other_start + n) for (other, n), other_start in zip(runs, starts)
                if other_start < start and may_attend(block, other)]
        before = sum(part.stop - part.start for part in seen)
        keys, values = (torch.cat([x[:, :, part] for part in [*seen, slice(start, start + length)]], dim=2)
                        for x in (key, value))
        rows = max(1, FRESH_CHUNK_ELEMENTS // (before + length))
        for first in range(0, length, rows):
            last = min(first + rows, length)
            visible = before + last  # the chunk's last query sees every key up to itself
            # key j is visible to the query at offset i of the run when j <= before + i
            allowed = (torch.arange(visible, device=query.device)[None, :]
                       <= before + torch.arange(first, last, device=query.device)[:, None])
            yield F.scaled_dot_product_attention(
                query[:, :, start + first : start + last], keys[:, :, :visible], values[:, :, :visible],
                attn_mask=additive_mask(allowed, query.dtype), scale=scale, enable_gqa=True)


def paged_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, reads=None, **kwargs):
    """The engine's attention function (registered with transformers as ``PAGED_ATTENTION``):
    ``key``/``value`` are the layer's pool, as :meth:`kv_cache.PoolWrite.update` returns it, and
    ``reads`` (a model kwarg) says which of its tokens each query reads."""
    return reads.attend(query, key, value, scaling), None


AttentionInterface.register(PAGED_ATTENTION, paged_attention)


def paged_attention_for(model) -> contextlib.AbstractContextManager[None]:
    """Run ``model`` with :func:`paged_attention`, whatever its attention implementation."""
    return upstream_transformers.attention_implementation(model.config, PAGED_ATTENTION)
