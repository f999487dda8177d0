"""KV pages: what each query reads, what the pool holds, preemption, and the pool's limits."""

from __future__ import annotations

import math

import pytest
import torch
from torch.torch_version import TorchVersion
from helpers import CPU_KERNELS, eager_engine
from tiny import tiny_parathinker

import lm_eval_parathinker.engine.scheduler as scheduler_mod
from lm_eval_parathinker.engine import EngineOptions, step
from lm_eval_parathinker.engine.pages import SCRATCH_PAGE
from lm_eval_parathinker.upstream import torch as upstream_torch

PROMPTS = ["Find x.", "Let x be the answer.", "x = 3 + 4", "Find the number of ways to do it.", "so x = 7"]
PAGE = 4  # small pages: long paths span many of them


@pytest.fixture(scope="module")
def tiny():
    return tiny_parathinker("qwen2")


def _eos_sometimes(model, tok):
    eos = tok.eos_token_id

    def likelier_eos(module, args, logits):  # paths end at different steps
        logits[..., eos] += 3.0
        return logits

    return model.lm_head.register_forward_hook(likelier_eos)


def _tokens(outs):
    return [(o.path_ids, o.summary_ids) for o in outs]


class Recorder:
    """Every decode forward's per-query reads, next to the pool's page lists at that moment."""

    def __init__(self, monkeypatch):
        self.steps = []
        self.schedulers = []
        run, forward, page_reads = scheduler_mod.Scheduler.run, step.decode_forward, step.page_reads
        made = []  # the PageReads of the forward in flight

        def recording_run(scheduler, *args):
            self.schedulers.append(scheduler)
            return run(scheduler, *args)

        def recording_page_reads(*args, **kwargs):
            made.append(page_reads(*args, **kwargs))
            return made[-1]

        def recording_forward(model, cache, batch):
            logits = forward(model, cache, batch)
            held = [[list(seg) for seg in slot_pages] for slot_pages in self.schedulers[-1].pool.held]
            q = batch.queries
            self.steps.append((made.pop(), cache.fill.clone(), held, batch.lengths.clone(), batch.slot.flatten().clone(),
                               q.blocks.flatten().clone(), q.real.flatten().clone()))
            return logits

        monkeypatch.setattr(scheduler_mod.Scheduler, "run", recording_run)
        monkeypatch.setattr(step, "page_reads", recording_page_reads)
        monkeypatch.setattr(step, "decode_forward", recording_forward)


@pytest.mark.parametrize("attention", CPU_KERNELS)
def test_each_query_reads_exactly_the_pages_it_may_see(tiny, monkeypatch, attention):
    model, tok = tiny
    recorder = Recorder(monkeypatch)
    hook = _eos_sometimes(model, tok)
    try:
        outs = eager_engine(model, tok).generate(
            PROMPTS, num_paths=3, max_new_tokens=24, termination="last", summary_max_tokens=6, temperature=1.0,
            seed=1, num_slots=2, block_size=PAGE, attention=attention)
    finally:
        hook.remove()
    assert max(len(p) for o in outs for p in o.path_ids) > 3 * PAGE  # paths span several pages
    P, summaries = 3, 0
    for reads, fill, held, lengths, slots, blocks, real in recorder.steps:
        for i in range(slots.numel()):
            full = set(reads.full[i, : reads.full_count[i]].tolist())
            partial = set(reads.partial[i, : reads.partial_count[i]].tolist())
            s, block = int(slots[i]), int(blocks[i])
            if not real[i]:
                assert not full and not partial  # padding reads nothing
                continue
            segments = range(P + 2) if block == -1 else (0, block)  # the summary: everything
            summaries += block == -1
            expected = {page for g in segments for page in held[s][g]}
            assert full | partial == expected and not full & partial
            assert SCRATCH_PAGE not in expected
            # the keys it sees: every token of those segments, no more
            seen = PAGE * len(full) + sum(int(fill[p]) for p in partial)
            assert seen == sum(int(lengths[s, g]) for g in segments)
            assert all(0 < int(fill[p]) < PAGE for p in partial)
    assert summaries > 0


def _check_released(scheduler) -> None:
    pool = scheduler.pool
    assert pool.num_used == 0
    assert sorted(pool.free_pages) == list(range(1, pool.stats.num_pages))  # every page back, once
    assert all(not seg for slot in pool.held for seg in slot)


def test_preempted_requests_give_the_large_pool_results_and_no_page_leaks(tiny, monkeypatch):
    model, tok = tiny
    recorder = Recorder(monkeypatch)
    engine = eager_engine(model, tok)
    template = len(tok("<summary>By analyzing multiple reasoning processes above, I concluded that: The final answer is",
                       add_special_tokens=False)["input_ids"])
    kwargs = dict(num_paths=3, max_new_tokens=16, summary_max_tokens=5, termination="last", output_logits=True,
                  num_slots=5, block_size=PAGE, temperature=1.0, seed=4)
    large = engine.generate(PROMPTS, **kwargs)
    assert engine.last_stats["preemptions"] == 0
    worst = max(math.ceil(len(o.prompt_ids) / PAGE) for o in large) + 3 * math.ceil(16 / PAGE) \
        + math.ceil((template + 5) / PAGE)
    pages = 5 * worst // 4  # the slots' worst cases add up to 4x the pool (one request fits)
    small = engine.generate(PROMPTS, num_blocks=pages + 1, **kwargs)
    assert engine.last_stats["preemptions"] > 0 and engine.last_stats["kv_pool_pages"] == pages + 1
    assert sum(o.stats["preemptions"] for o in small) == engine.last_stats["preemptions"]
    assert _tokens(small) == _tokens(large)
    for a, b in zip(small, large):
        for x, y in zip(a.path_logits, b.path_logits):
            torch.testing.assert_close(x, y, atol=1e-4, rtol=0)
        torch.testing.assert_close(a.summary_logits, b.summary_logits, atol=1e-4, rtol=0)
    for scheduler in recorder.schedulers:
        _check_released(scheduler)


def test_a_failed_run_leaves_no_page_held(tiny, monkeypatch):
    model, tok = tiny
    recorder = Recorder(monkeypatch)

    def fail(i, output):
        raise RuntimeError("the caller failed")

    with pytest.raises(RuntimeError, match="the caller failed"):
        eager_engine(model, tok).generate(PROMPTS, num_paths=2, max_new_tokens=8, num_slots=2, block_size=PAGE,
                                               on_output=fail)
    assert recorder.schedulers[0].pool.stats.peak_pages > 0  # it held pages when it failed
    _check_released(recorder.schedulers[0])


def test_peak_pages_hold_the_tokens_within_a_page_per_segment(tiny):
    model, tok = tiny
    engine = eager_engine(model, tok)
    engine.generate(PROMPTS, num_paths=3, max_new_tokens=20, termination="last", num_slots=2, block_size=PAGE)
    stats = engine.last_stats
    segments = 2 * (3 + 2)  # two slots of prompt + 3 paths + summary
    assert stats["kv_peak_tokens"] <= stats["kv_peak_pages"] * PAGE < stats["kv_peak_tokens"] + segments * PAGE
    assert stats["kv_peak_bytes"] == stats["kv_peak_pages"] * PAGE * engine.pool.bytes_per_token


def test_a_request_larger_than_the_pool_is_refused_before_decoding(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match=r"needs up to \d+ KV pages of 4 tokens .* the pool holds 5 \(num_blocks=6\)"):
        eager_engine(model, tok).generate(PROMPTS, num_paths=3, max_new_tokens=16, block_size=PAGE, num_blocks=6)


def test_the_pool_is_kept_across_calls_until_released(tiny):
    model, tok = tiny
    engine = eager_engine(model, tok)
    kwargs = dict(num_paths=2, max_new_tokens=8, block_size=PAGE, temperature=1.0, seed=3)
    first = engine.generate(PROMPTS[:2], **kwargs)
    pool = engine.pool
    assert engine.generate(PROMPTS[:2], **kwargs) and engine.pool is pool  # reused
    engine.release_pool()
    assert engine.pool is None
    again = engine.generate(PROMPTS[:2], **kwargs)  # a fresh pool, the same outputs
    assert engine.pool is not None and engine.pool is not pool
    assert _tokens(again) == _tokens(first)


def test_the_steps_static_inputs_keep_their_addresses_across_calls(tiny, monkeypatch):
    """A compiled step's CUDA graphs are recorded for the addresses of its static inputs (the KV
    pages, their fill counts, the page table): a call that allocated new ones would re-record
    every graph, inside whatever is being timed. Each call's scheduler is kept alive here, so a
    freed table's memory cannot be handed out again at the same address."""
    model, tok = tiny
    recorder = Recorder(monkeypatch)
    engine = eager_engine(model, tok)
    kwargs = dict(num_paths=2, max_new_tokens=8, block_size=PAGE, temperature=1.0, seed=3)
    first = engine.generate(PROMPTS[:2], **kwargs)
    second = engine.generate(PROMPTS[:2], **kwargs)

    def addresses(scheduler) -> list[int]:
        cache = scheduler.cache
        return [t.data_ptr() for t in (scheduler.pool.table, cache.fill, *cache.keys, *cache.values)]

    assert len(recorder.schedulers) == 2
    assert addresses(recorder.schedulers[0]) == addresses(recorder.schedulers[1])
    assert _tokens(second) == _tokens(first)


def test_engine_options_parse_model_arg_strings():
    opts = EngineOptions.parse(num_paths="4", thought_embedding="false", block_size="16", num_blocks="none",
                               max_memory_percent="0.5", attention="sdpa")
    assert opts == EngineOptions(num_paths=4, thought_embedding=False, block_size=16, max_memory_percent=0.5,
                                 attention="sdpa")
    for values, message in [
        (dict(num_paths="x"), "num_paths='x' is not an integer"),
        (dict(attention="paged"), "attention='paged' is not one of auto, flex, sdpa"),
        (dict(thought_embedding="maybe"), "thought_embedding='maybe' is not a boolean"),
        (dict(num_blocks=1), "num_blocks=1 must be at least 2"),
        (dict(max_memory_percent=1.5), r"max_memory_percent=1.5 must be in \(0, 1\]"),
        (dict(beams=2), r"unknown engine option\(s\) \['beams'\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            EngineOptions.parse(**values)


@pytest.mark.parametrize("kernel", CPU_KERNELS)
def test_kernels_attend_to_exactly_the_tokens_of_the_listed_segments(kernel):
    """Both kernels against attention written out over the keys each query may see."""
    from lm_eval_parathinker.engine.attention import FLEX, SDPA, page_reads

    KERNELS = {"flex": FLEX, "sdpa": SDPA}

    g = torch.Generator().manual_seed(0)
    slots, segments, max_pages, kv_heads, groups, dim = 2, 4, 5, 2, 3, 16
    num_pages = 1 + slots * segments * max_pages
    table = (1 + torch.randperm(num_pages - 1, generator=g)).view(slots, segments, max_pages)
    lengths = torch.randint(1, max_pages * PAGE + 1, (slots, segments), generator=g)
    fill = torch.zeros(num_pages, dtype=torch.long)
    for s in range(slots):
        for seg in range(segments):
            n = int(lengths[s, seg])
            for j in range(math.ceil(n / PAGE)):
                fill[table[s, seg, j]] = min(PAGE, n - j * PAGE)
    slot = torch.tensor([0, 0, 1, 1, 1])
    reads = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 0, 1], [1, 0, 0, 1]], dtype=torch.bool)
    keys = torch.randn(1, kv_heads, num_pages * PAGE, dim, generator=g)
    values = torch.randn(1, kv_heads, num_pages * PAGE, dim, generator=g)
    query = torch.randn(1, kv_heads * groups, len(slot), dim, generator=g)
    plan = page_reads(table, lengths, slot, reads, fill, PAGE, KERNELS[kernel], groups)
    out = plan.attend(query, keys, values, scale=None)[0]  # [B, H, D]
    for b in range(len(slot)):
        s = int(slot[b])
        columns = torch.cat([table[s, seg, torch.arange(int(lengths[s, seg])) // PAGE] * PAGE
                             + torch.arange(int(lengths[s, seg])) % PAGE for seg in range(segments) if reads[b, seg]])
        k = keys[0][:, columns].repeat_interleave(groups, 0)  # [H, n, D]
        v = values[0][:, columns].repeat_interleave(groups, 0)
        weights = (query[0, :, b : b + 1] @ k.transpose(1, 2) / math.sqrt(dim)).softmax(-1)
        torch.testing.assert_close(out[b], (weights @ v)[:, 0], atol=1e-5, rtol=1e-5)


def test_flex_on_cuda_reads_every_page_as_a_partial_block(monkeypatch):
    """On CUDA no page is a full block (torch's flex decoding kernel then splits its work over the
    pages a query reads, not over the pool): the same attention as the CPU's blocks, where the
    complete pages are full blocks. The CUDA rule is applied on the CPU here."""
    from lm_eval_parathinker.engine import attention

    g = torch.Generator().manual_seed(1)
    slots, segments, max_pages, kv_heads, groups, dim = 2, 3, 4, 2, 2, 16
    num_pages = 1 + slots * segments * max_pages
    table = (1 + torch.randperm(num_pages - 1, generator=g)).view(slots, segments, max_pages)
    lengths = torch.randint(1, max_pages * PAGE + 1, (slots, segments), generator=g)
    fill = torch.full((num_pages,), PAGE)
    fill[table.flatten(0, 1)[torch.arange(slots * segments), (lengths.flatten() - 1) // PAGE]] = \
        (lengths.flatten() - 1) % PAGE + 1  # each segment's last page holds what remains
    slot, reads = torch.tensor([0, 1, 1]), torch.tensor([[1, 1, 0], [1, 0, 1], [1, 1, 1]], dtype=torch.bool)
    keys, values = (torch.randn(1, kv_heads, num_pages * PAGE, dim, generator=g) for _ in range(2))
    query = torch.randn(1, kv_heads * groups, len(slot), dim, generator=g)
    cpu = attention.page_reads(table, lengths, slot, reads, fill, PAGE, attention.FLEX, groups)
    monkeypatch.setattr(attention, "flex_full_tiles", lambda device: False)
    cuda = attention.page_reads(table, lengths, slot, reads, fill, PAGE, attention.FLEX, groups)
    assert cpu.block_mask.full_kv_num_blocks is not None and cuda.block_mask.full_kv_num_blocks is None
    assert cuda.block_mask.kv_num_blocks.flatten().tolist() == (cpu.full_count + cpu.partial_count).tolist()
    torch.testing.assert_close(cuda.attend(query, keys, values, scale=None), cpu.attend(query, keys, values, scale=None),
                               atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_flex_past_its_recompile_limit_fails_rather_than_running_uncompiled(monkeypatch):
    """Uncompiled, flex applies its mask to the whole pool and ignores which pages a query lists
    (wrong attention). An eager step's flex calls compile once per batch size: past the limit (one
    more than flex's compilations so far in this process) they fail instead of running uncompiled."""
    from lm_eval_parathinker.engine import attention

    limit = upstream_torch.compilations(attention._paged_flex) + 1
    monkeypatch.setattr(attention, "flex_kernel", torch.compile(attention._paged_flex, backend="eager", dynamic=True))
    monkeypatch.setattr(attention, "RECOMPILE_LIMIT", limit)
    table, lengths, fill = torch.arange(1, 5).view(2, 2, 1), torch.full((2, 2), PAGE), torch.full((5,), PAGE)
    keys = torch.randn(1, 2, 5 * PAGE, 16)

    def attend(queries: int) -> torch.Tensor:
        slot, reads = torch.arange(queries) % 2, torch.ones(queries, 2, dtype=torch.bool)
        plan = attention.page_reads(table, lengths, slot, reads, fill, PAGE, attention.FLEX, 2, static_batch=True)
        return plan.attend(torch.randn(1, 4, queries, 16), keys, keys, scale=None)

    with upstream_torch.dynamo_config(recompile_limit=limit):
        attend(2)
        with pytest.raises(upstream_torch.recompile_limit_hit()):
            attend(3)


def test_flex_on_cuda_takes_pages_that_fit_torchs_kv_blocks(monkeypatch):
    """torch's flex configs on an H200 (compute capability 9.0, read from torch with CUDA's calls
    stood in for): bf16 with head_dim 128 has one forward config, BLOCK_N 64; head_dim 64 has
    BLOCK_N 128. Other pages: ``auto`` uses sdpa, ``flex`` names the page size and the fix."""
    import contextlib

    from lm_eval_parathinker.engine import attention

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    cuda, sizes = torch.device("cuda"), (16, 32, 48, 64, 96, 128, 192, 256)

    def fitting(head_dim: int) -> list[int]:
        forward, decoding = attention.cuda_flex_tiles(cuda, head_dim, torch.bfloat16)
        return [size for size in sizes if attention.flex_reads_pages(size, forward, decoding)]

    if TorchVersion(torch.__version__) < "2.14":  # the configs read in torch 2.11 (the GPU image) and 2.13
        assert attention.cuda_flex_tiles(cuda, 128, torch.bfloat16)[0] == [(128, 64)]
        assert fitting(128) == [64, 128, 192, 256]
        assert fitting(64) == [128, 256]
    assert {128, 256} <= set(fitting(128)) & set(fitting(64)) and 16 not in fitting(128)  # multiples of 128 fit
    pages = dict(head_dim=128, dtype=torch.bfloat16)
    assert attention.resolve_kernel("auto", cuda, page_size=128, **pages) is attention.FLEX
    with pytest.warns(UserWarning, match=r"block_size=16 does not fit .* KV tiles of \[[0-9, ]+\] tokens: attention='auto' uses"):
        assert attention.resolve_kernel("auto", cuda, page_size=16, **pages) is attention.SDPA
    with pytest.raises(ValueError, match=r"attention='flex': block_size=16 .* use a block_size that is a multiple of \d+"):
        attention.resolve_kernel("flex", cuda, page_size=16, **pages)


def test_flex_keeps_one_cpu_thread_count_per_process(monkeypatch):
    """inductor's CPU flex kernels are built for one thread count: after a change, auto falls back
    to sdpa (with a warning) and an explicit flex is refused."""
    from lm_eval_parathinker.engine import attention

    cpu = torch.device("cpu")
    monkeypatch.setattr(attention, "flex_available", lambda device: True)  # the rule where flex runs
    threads = upstream_torch.CPU_FLEX_THREADS
    monkeypatch.setattr(threads, "threads", torch.get_num_threads() + 1)
    with pytest.warns(UserWarning, match="built for one thread count: attention='auto' uses 'sdpa'"):
        assert attention.resolve_kernel("auto", cpu) is attention.SDPA
    with pytest.raises(ValueError, match="attention='flex': compiled FlexAttention ran with"):
        attention.resolve_kernel("flex", cpu)
    monkeypatch.setattr(threads, "threads", None)
    assert attention.resolve_kernel("auto", cpu) is attention.FLEX and threads.threads == torch.get_num_threads()


def test_compiled_cpu_flex_needs_torch_2_13(monkeypatch):
    """Below torch 2.13 (whose CPU flex kernels corrupted the heap here), auto uses sdpa with a
    warning that says why, and an explicit flex is refused naming the version."""
    from lm_eval_parathinker.engine import attention

    cpu = torch.device("cpu")
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    assert not attention.flex_available(cpu) and attention.flex_available(torch.device("cuda"))
    with pytest.warns(UserWarning, match=r"compiled CPU FlexAttention needs torch >= 2.13 \(this is 2.11.0\+cu130\)"):
        assert attention.resolve_kernel("auto", cpu) is attention.SDPA
    with pytest.raises(ValueError, match=r"attention='flex' does not run on cpu with torch 2.11.0\+cu130 "
                                         r"\(CUDA, or an x86 CPU with AVX2 and torch >= 2.13; not with TORCH_COMPILE_DISABLE\)"):
        attention.resolve_kernel("flex", cpu)
