"""Continuous batching: results identical to decoding each prompt alone, no slot idle while work
waits, no host round trip inside a step, the compiled step's flex call with a static batch, and sampling
that depends on the request only."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import eager_engine
from scripted import Script
from tiny import tiny_parathinker
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

import lm_eval_parathinker.engine.scheduler as scheduler_mod

from lm_eval_parathinker.engine import ParaThinkerEngine, Scheduler, StaticScheduler, step
from lm_eval_parathinker.engine import attention
from lm_eval_parathinker.engine.sampling import Draw, SamplingParams, request_seeds, sample
from lm_eval_parathinker import protocol
from lm_eval_parathinker.protocol import ControlTokenIds

PROMPTS = ["Find x.", "Let x be the answer.", "x = 3 + 4", "Find the number of ways to do it.", "so x = 7"]
CLOSE_AT = [3, 9, 5, 12, 7]  # path 2 of request i closes as token CLOSE_AT[i]: think stages of different lengths


@pytest.fixture(scope="module")
def tiny():
    return tiny_parathinker("qwen2")


def _closing(ids: ControlTokenIds, i: int) -> dict:
    return {CLOSE_AT[i]: {1: ids.think_close[1]}}


def _tokens(outs):
    return [(o.path_ids, o.summary_ids) for o in outs]


def test_greedy_continuous_batching_equals_each_prompt_alone(tiny, monkeypatch):
    model, tok = tiny
    ids = ControlTokenIds.from_tokenizer(tok)
    engine = eager_engine(model, tok)
    kwargs = dict(num_paths=3, max_new_tokens=16, summary_max_tokens=5, output_logits=True)
    Script(by_request={i: _closing(ids, i) for i in range(len(PROMPTS))}).install(monkeypatch)
    batch = engine.generate(PROMPTS, num_slots=2, **kwargs)
    assert len({len(o.path_ids[0]) for o in batch}) >= 3  # requests end at different steps: slots refill mid-run
    for i, prompt in enumerate(PROMPTS):
        Script(_closing(ids, i)).install(monkeypatch)
        alone = engine.generate([prompt], **kwargs)[0]
        assert _tokens([batch[i]]) == _tokens([alone])
        for a, b in zip(batch[i].path_logits, alone.path_logits):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
        torch.testing.assert_close(batch[i].summary_logits, alone.summary_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", ["parathinker", "independent", "sequential"])
def test_sampled_tokens_depend_on_the_request_only(tiny, mode):
    model, tok = tiny
    eos = tok.eos_token_id

    def likelier_eos(module, args, logits):  # paths end now and then, at different steps
        logits[..., eos] += 4.0
        return logits

    hook = model.lm_head.register_forward_hook(likelier_eos)
    try:
        _check_sampling_is_per_request(eager_engine(model, tok), mode)
    finally:
        hook.remove()


def _check_sampling_is_per_request(engine: ParaThinkerEngine, mode: str) -> None:
    paths = {} if mode == "sequential" else {"num_paths": 3}  # sequential: one path
    kwargs = dict(mode=mode, **paths, max_new_tokens=16, summary_max_tokens=5, temperature=1.5, top_p=0.9, seed=7)
    runs = [_tokens(engine.generate(PROMPTS, num_slots=n, **kwargs)) for n in (1, 2, 5)]
    assert runs[0] == runs[1] == runs[2]  # any number of slots, any neighbours
    assert len({len(p) for paths, _ in runs[1] for p in paths}) > 2  # paths of varied lengths
    seeds = request_seeds(7, len(PROMPTS))
    for i, prompt in enumerate(PROMPTS):  # alone, with its own seed
        assert _tokens(engine.generate([prompt], **{**kwargs, "seed": [seeds[i]]})) == [runs[1][i]]
    assert _tokens(engine.generate(PROMPTS, **{**kwargs, "seed": 8})) != runs[0]


def _record_steps(monkeypatch):
    """Phases of the slots at every step, and the step count at every admission."""
    phases, admitted = [], []
    advance, prefill = scheduler_mod.advance, scheduler_mod.Scheduler.prefill

    def recording_advance(state, *args, **kwargs):
        phases.append(state.phase.tolist())
        return advance(state, *args, **kwargs)

    def recording_prefill(self, slot, request):
        admitted.append(self.steps)
        return prefill(self, slot, request)

    monkeypatch.setattr(scheduler_mod, "advance", recording_advance)
    monkeypatch.setattr(scheduler_mod.Scheduler, "prefill", recording_prefill)
    return phases, admitted


@pytest.mark.parametrize("mode", ["parathinker", "independent"])
def test_no_slot_idles_while_requests_wait(tiny, monkeypatch, mode):
    model, tok = tiny
    ids = ControlTokenIds.from_tokenizer(tok)
    eos = tok.eos_token_id
    by_request = {i: {CLOSE_AT[i]: {k: (ids.think_close[1] if mode == "parathinker" else eos) for k in range(3)}}
                  for i in range(len(PROMPTS))}
    Script(by_request=by_request).install(monkeypatch)
    kwargs = dict(mode=mode, num_paths=3, max_new_tokens=16, summary_max_tokens=5, num_slots=2)
    counts = {}
    for scheduling, scheduler_class in (("continuous", Scheduler), ("static", StaticScheduler)):
        phases, admitted = _record_steps(monkeypatch)
        outs = eager_engine(model, tok, scheduler_class=scheduler_class).generate(PROMPTS, **kwargs)
        counts[scheduling] = (len(phases), _tokens(outs))
        if scheduling == "continuous":
            # until the last request is admitted every slot computes a token it keeps
            assert all(set(p) <= {step.THINK, step.SUMMARY} for p in phases[: admitted[-1]])
        else:
            assert any(step.IDLE in p or step.DONE in p for p in phases[: admitted[-1]])
    assert counts["continuous"][1] == counts["static"][1]  # same results
    assert counts["continuous"][0] < counts["static"][0]  # in fewer steps


def test_a_step_never_waits_for_the_host(tiny, monkeypatch):
    """A step's forward (the rectangle of every slot's queries, flex reads of the pages) and its
    bookkeeping run under FakeTensorMode, where any read of a tensor's values by the host
    (.item(), .tolist(), bool(), ...) raises."""
    model, tok = tiny
    captured = {}
    run = scheduler_mod.Scheduler.run
    monkeypatch.setattr(scheduler_mod.Scheduler, "run", lambda self, *args: captured.setdefault("s", self) and run(self, *args))
    eager_engine(model, tok).generate(PROMPTS[:2], num_paths=3, max_new_tokens=6, temperature=1.0, seed=0)
    scheduler = captured["s"]
    state, plan, cache = scheduler.state, scheduler.plan, scheduler.cache
    with torch.inference_mode():  # one slot thinking, one in its summary
        state.phase.copy_(torch.tensor([step.THINK, step.SUMMARY]))
        state.summary_len.fill_(1)
    # the kernel the compiled step inlines (compiled or not, the same operator)
    monkeypatch.setattr(attention, "flex_kernel", attention.flex_attention)
    with torch.inference_mode(), attention.paged_attention_for(model), FakeTensorMode(allow_non_fake_inputs=True):
        inputs = step.step_inputs(state, plan)
        logits, _ = step.step_forward(model, cache, scheduler.pool.table, state, plan, inputs, attention.FLEX,
                                      ragged=False)
        step.advance(state, plan, logits, inputs)
        with pytest.raises(DataDependentOutputException):
            state.phase.tolist()  # the check itself: a host read fails here


def test_ragged_steps_give_the_rectangles_results(tiny, monkeypatch):
    """Steps on the real tokens only (eager CPU) against [slots, P] rectangles with padding."""
    model, tok = tiny
    kwargs = dict(num_paths=3, max_new_tokens=10, summary_max_tokens=4, termination="half", temperature=1.0, seed=2,
                  output_logits=True, num_slots=2)
    ragged = eager_engine(model, tok).generate(PROMPTS, **kwargs)
    monkeypatch.setattr(ParaThinkerEngine, "_ragged_steps", lambda self, compiled: False)
    padded = eager_engine(model, tok).generate(PROMPTS, **kwargs)
    assert _tokens(ragged) == _tokens(padded)
    assert any(len({len(p) for p in o.path_ids}) > 1 for o in ragged)  # done paths left padding in their rows
    for a, b in zip(ragged, padded):
        for x, y in zip(a.path_logits, b.path_logits):
            torch.testing.assert_close(x, y, atol=1e-4, rtol=0)
        torch.testing.assert_close(a.summary_logits, b.summary_logits, atol=1e-4, rtol=0)


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    n = 40000
    logits = probs.log().expand(n, 1, 5)
    draw = Draw(seed=torch.full((n,), 11), request=torch.zeros(n, dtype=torch.long),
                path=torch.zeros(n, 1, dtype=torch.long), index=torch.arange(n)[:, None])

    def frequencies(params):
        return torch.bincount(sample(logits, params, draw).flatten(), minlength=5).float() / n

    torch.testing.assert_close(frequencies(SamplingParams(temperature=1.0)), probs, atol=0.01, rtol=0)
    torch.testing.assert_close(frequencies(SamplingParams(temperature=1.0, top_k=2)),
                               torch.tensor([0.625, 0.375, 0, 0, 0]), atol=0.01, rtol=0)
    torch.testing.assert_close(frequencies(SamplingParams(temperature=1.0, top_p=0.7)),
                               torch.tensor([0.625, 0.375, 0, 0, 0]), atol=0.01, rtol=0)
    assert torch.equal(draw.uniform(), draw.uniform())  # a function of the coordinates
    other = Draw(torch.full((n,), 12), draw.request, draw.path, draw.index)
    assert (other.uniform() != draw.uniform()).float().mean() > 0.99  # another seed, another stream


class LatePhaseView(scheduler_mod.PhaseView):
    """The phases as a CUDA host may see them: each step's snapshot two steps after the step."""

    LAG = 2

    def pull(self):
        newest = self.landed[-1][0] if self.landed else 0
        ready = [snapshot for snapshot in self.landed if snapshot[0] <= newest - self.LAG]
        self.landed = self.landed[len(ready):]
        return ready


def _run_checking_page_tables(monkeypatch, engine, late: bool, **kwargs):
    """``engine.generate(**kwargs)``, asserting at every flush that no page goes beyond a table."""
    flush = scheduler_mod.PagePool.flush

    def checked_flush(pool):
        beyond = [entry for entry in pool._pending if entry[2] >= pool.table.shape[-1]]
        assert not beyond, f"(slot, segment, index, page) beyond a page table of {pool.table.shape[-1]}: {beyond}"
        flush(pool)

    with monkeypatch.context() as patch:
        patch.setattr(scheduler_mod.PagePool, "flush", checked_flush)
        if late:
            patch.setattr(scheduler_mod, "PhaseView", LatePhaseView)
        return engine.generate(**kwargs)


@pytest.mark.parametrize("layout", ["paper", "official"])
def test_late_phase_reads_reserve_no_page_beyond_a_limit(monkeypatch, layout):
    """The host reads the phases two steps late: it goes on growing a finished summary's segment
    for two steps. The official layout's default summary (template + generated = 128 tokens) is
    exactly one page of 128; the paper layout's here is a whole number of pages of 4."""
    model, tok = tiny_parathinker("qwen2", official=layout == "official")
    ids = ControlTokenIds.from_tokenizer(tok)
    w = tok.convert_tokens_to_ids("x")
    template = len(tok(protocol.SUMMARY_TEMPLATE, add_special_tokens=False)["input_ids"])
    # path 2 of each request closes at a different step; the summary never ends before its limit
    Script(by_request={i: _closing(ids, i) for i in range(2)}, path_default=w, summary_default=w).install(monkeypatch)
    if layout == "official":
        summary_len = 128
        kwargs = dict(compat="official", max_new_tokens=16, block_size=128)
    else:
        summary_len = 4 * (template // 4 + 2)  # template + generated tokens: whole pages
        kwargs = dict(max_new_tokens=16, block_size=4, summary_max_tokens=summary_len - template)
    kwargs.update(prompts=PROMPTS[:2], num_paths=3, output_logits=True, num_slots=2)
    engine = eager_engine(model, tok)
    on_time = _run_checking_page_tables(monkeypatch, engine, late=False, **kwargs)
    late = _run_checking_page_tables(monkeypatch, engine, late=True, **kwargs)
    assert all(len(o.summary_ids) == summary_len for o in on_time)  # every summary ran to its limit
    assert _tokens(late) == _tokens(on_time)
    for a, b in zip(late, on_time):
        for x, y in zip(a.path_logits, b.path_logits):
            torch.testing.assert_close(x, y, atol=1e-4, rtol=0)
        torch.testing.assert_close(a.summary_logits, b.summary_logits, atol=1e-4, rtol=0)


def test_phase_snapshots_are_timed_on_the_models_device(monkeypatch):
    """On CUDA the host reads a snapshot once an event recorded after its copy has passed: the
    event must follow the copy on the model's device (cuda:1 here), whichever device is current.
    CUDA's calls are stood in for: the CPU has no events and no pinned memory."""
    recorded = []

    class Event:
        def record(self, stream=None):
            recorded.append(stream)

        def query(self):
            return True

    empty = torch.empty
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: f"the stream of {device or 'the current device'}")
    monkeypatch.setattr(torch, "empty", lambda *args, pin_memory=False, **kwargs: empty(*args, **kwargs))
    view = scheduler_mod.PhaseView(torch.device("cuda", 1), (2, 3))
    state = SimpleNamespace(phase=torch.tensor([step.THINK, step.DONE]), done=torch.tensor([[False], [True]]),
                            lengths=torch.tensor([[3], [4]]))
    view.push(1, state)
    assert recorded == ["the stream of cuda:1"]
    assert view.pull() == [(1, [[step.THINK, 0, 3], [step.DONE, 1, 4]])]


@pytest.mark.slow
@pytest.mark.parametrize("prompts, paths", [(1, 1), (2, 3)])
def test_the_compiled_steps_flex_call_has_a_static_batch(tiny, monkeypatch, prompts, paths):
    """torch's flex decoding kernel (one query block per KV head, work split over the pages read)
    needs the query's batch dimension as an integer; a symbolic one gets the main kernel, its
    query block 95% padding. The engine's step compiled with a recording backend, for B = 1 and
    B = 2 x 3 queries."""
    model, tok = tiny
    batches = []

    def record(graph, example_inputs):
        for node in graph.graph.nodes:
            if node.target is torch.ops.higher_order.flex_attention:
                batches.append(node.args[0].meta["example_value"].shape[0])
        return graph.forward

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None, **kwargs: compile_(fn, backend=record, **kwargs))
    eager_engine(model, tok, compile=True).generate(PROMPTS[:prompts], mode="independent", num_paths=paths,
                                                         max_new_tokens=3, attention="flex")
    assert batches and all(type(b) is int for b in batches), batches
    assert set(batches) == {prompts * paths}
