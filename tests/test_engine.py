"""The engine against independent computations: plain model forwards with explicit positions,
segment ids and masks, and a hand-written attention layer."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from safetensors import safe_open
from helpers import CPU_KERNELS, eager_engine
from scripted import Script
from tiny import save_tiny_checkpoint, tiny_model, tiny_parathinker, tiny_tokenizer

import lm_eval_parathinker.engine.generate as generate_mod
from lm_eval_parathinker import protocol
from lm_eval_parathinker.engine import ParaThinkerEngine
from lm_eval_parathinker.engine.attention import PageReads
from lm_eval_parathinker.protocol import ControlTokenIds
from lm_eval_parathinker.thought_embedding import (
    add_control_tokens,
    attach_thought_embeddings,
    load_parathinker_model,
    thought_embedding_tables,
)

ARCHS = ["qwen2", "llama", "qwen3"]
PROMPTS = ["Find x.", "Let x be the answer, so x = 3 + 4."]  # different lengths: left padding


def additive(mask: torch.Tensor) -> torch.Tensor:
    return torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)


@pytest.fixture(scope="module", params=ARCHS)
def parathinker(request):
    return tiny_parathinker(request.param)


@pytest.mark.parametrize("attention", CPU_KERNELS)
def test_path_logits_equal_each_path_decoded_alone(parathinker, attention):
    model, tok = parathinker
    outs = eager_engine(model, tok).generate(
        PROMPTS, num_paths=3, max_new_tokens=10, termination="last", temperature=1.0, seed=0, output_logits=True,
        attention=attention, block_size=4,  # paths of several pages
    )
    for out in outs:
        assert_paths_decode_alone(model, out)


def assert_paths_decode_alone(model, out) -> None:
    """Each path's logits are those of the prompt and that path alone, path k at segment k."""
    lp = len(out.prompt_ids)
    for k, path in enumerate(out.path_ids, start=1):
        ids = torch.tensor([out.prompt_ids + path])
        positions = torch.arange(ids.shape[1])[None]  # prompt 0..Lp-1, path token j at Lp+j
        segments = torch.tensor([[0] * lp + [k] * len(path)])
        with torch.no_grad():
            alone = model(ids, position_ids=positions, segment_ids=segments).logits[0, lp:]
        torch.testing.assert_close(out.path_logits[k - 1], alone, atol=1e-4, rtol=0)


def test_sixteen_paths_on_a_checkpoint_with_sixteen_control_tokens():
    """The limit is the tokenizer's <think k> tokens: P = 16 (the paper's widest) on a tokenizer with
    <think1>..<think16>, each path opened by its own token and decoded under its own thought embedding."""
    model, tok = tiny_parathinker("qwen2", num_control_paths=16)
    ids = ControlTokenIds.from_tokenizer(tok)
    assert protocol.num_control_paths(tok) == ids.num_control_paths == 16
    (out,) = eager_engine(model, tok).generate(
        PROMPTS[:1], num_paths=16, max_new_tokens=4, termination="last", temperature=1.0, seed=0, output_logits=True,
    )
    assert [path[0] for path in out.path_ids] == [tok.convert_tokens_to_ids(f"<think{k}>") for k in range(1, 17)]
    assert [text.startswith(f"<think{k}>") for k, text in enumerate(out.path_texts, 1)] == [True] * 16
    assert out.stats["num_paths"] == 16
    assert_paths_decode_alone(model, out)


def full_sequence_summary_logits(model, out, **layout_kwargs) -> torch.Tensor:
    """One forward over prompt + paths + summary with the explicit two-phase mask."""
    lens = [len(p) for p in out.path_ids]
    layout = protocol.sequence_layout(len(out.prompt_ids), lens, len(out.summary_ids), **layout_kwargs)
    ids = torch.tensor([out.prompt_ids + sum(out.path_ids, []) + out.summary_ids])
    with torch.no_grad():
        logits = model(
            ids,
            position_ids=layout.position_ids[None],
            attention_mask=additive(layout.attention_mask())[None, None],
            segment_ids=layout.segment_ids[None],
        ).logits[0]
    return logits[-len(out.summary_ids) :]


@pytest.mark.parametrize("termination, attention",
                         list(dict.fromkeys([("half", CPU_KERNELS[0]), ("last", CPU_KERNELS[0]), ("half", "sdpa")])))
def test_summary_with_kv_reuse_equals_full_sequence_and_reprefill(parathinker, termination, attention, monkeypatch):
    model, tok = parathinker
    Script({3: {0: tok.eos_token_id}}).install(monkeypatch)  # path 1 ends early: its pages stop, the rest go on
    kwargs = dict(num_paths=3, max_new_tokens=12, termination=termination, summary_max_tokens=6,
                  temperature=1.0, seed=3, output_logits=True, attention=attention, block_size=4)
    reuse = eager_engine(model, tok).generate(PROMPTS, **kwargs)
    reprefill = eager_engine(model, tok).generate(PROMPTS, summary_kv="reprefill", **kwargs)
    for a, b in zip(reuse, reprefill):
        assert a.path_ids == b.path_ids
        n = len(a.summary_logits)
        torch.testing.assert_close(a.summary_logits, full_sequence_summary_logits(model, a)[:n], atol=1e-4, rtol=0)
        m = min(n, len(b.summary_logits))
        torch.testing.assert_close(a.summary_logits[:m], b.summary_logits[:m], atol=1e-4, rtol=0)
    # The case is meaningful: some path of some prompt ended early, so padding had to be masked.
    assert any(len({len(p) for p in o.path_ids}) > 1 for o in reuse)


def test_reprefill_attends_in_linear_memory(monkeypatch):
    """summary_kv=reprefill recomputes the prompt's and the paths' KV in one forward of n tokens,
    8 paths of 1,024 here: no tensor of that forward holds n^2 elements (a dense two-phase mask,
    the scores of SDPA's math kernel), and the summary's logits are those of the KV reused in place.
    Chunks of 256 queries (as a path of 16K tokens gets by default)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    import lm_eval_parathinker.engine.scheduler as scheduler_mod
    from lm_eval_parathinker.engine import attention

    class Largest(TorchDispatchMode):
        """The most elements of any tensor an operator returns while active."""

        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            self.numel = max([self.numel, *sizes])
            return out

    largest = Largest()
    recompute = scheduler_mod.Scheduler._recompute_paths

    def watched(self, *args):
        with largest:
            recompute(self, *args)

    monkeypatch.setattr(scheduler_mod.Scheduler, "_recompute_paths", watched)
    monkeypatch.setattr(attention, "FRESH_CHUNK_ELEMENTS", 256 * 1024)
    model, tok = tiny_parathinker("qwen2")
    enders = torch.tensor(ControlTokenIds.from_tokenizer(tok).path_enders([tok.eos_token_id]))
    model.lm_head.register_forward_hook(lambda m, a, logits: logits.index_fill(-1, enders, float("-inf")))
    engine = eager_engine(model, tok)
    kwargs = dict(num_paths=8, max_new_tokens=1024, termination="last", summary_max_tokens=3, temperature=1.0, seed=0,
                  output_logits=True, attention="sdpa")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2,048 steps of a tiny model: more threads only spin (sdpa: flex's count is untouched)
    try:
        reuse = engine.generate(PROMPTS[:1], **kwargs)[0]
        reprefill = engine.generate(PROMPTS[:1], summary_kv="reprefill", **kwargs)[0]
    finally:
        torch.set_num_threads(threads)
    assert [len(p) for p in reuse.path_ids] == [1024] * 8  # every path ran to its budget
    n = len(reuse.prompt_ids) + 8 * 1024
    assert 0 < largest.numel < n * n
    assert reprefill.path_ids == reuse.path_ids
    torch.testing.assert_close(reprefill.summary_logits, reuse.summary_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("thought_embedding", [True, False])
def test_flattened_positions_ablation_matches_full_sequence(thought_embedding):
    model, tok = tiny_parathinker("llama")
    out = eager_engine(model, tok).generate(
        PROMPTS[:1], num_paths=3, max_new_tokens=6, termination="last", summary_max_tokens=4, temperature=1.0,
        seed=1, positions="flattened", thought_embedding=thought_embedding, output_logits=True,
    )[0]
    expected = full_sequence_summary_logits(
        model, out, flattened=True, path_stride=6, thought_embedding=thought_embedding
    )
    torch.testing.assert_close(out.summary_logits, expected[: len(out.summary_logits)], atol=1e-4, rtol=0)


def test_sequence_layout_matches_hand_written_rule():
    layout = protocol.sequence_layout(2, [2, 1], 2)
    assert layout.block_ids.tolist() == [0, 0, 1, 1, 2, -1, -1]
    assert layout.segment_ids.tolist() == [0, 0, 1, 1, 2, 0, 0]
    assert layout.position_ids.tolist() == [0, 1, 2, 3, 2, 4, 5]
    P, A, B, S = "P", "A", "B", "S"
    owner = [P, P, A, A, B, S, S]
    expected = [
        [j <= i and (owner[j] in (P, owner[i]) or owner[i] == S) for j in range(7)] for i in range(7)
    ]
    assert layout.attention_mask().tolist() == expected
    flat = protocol.sequence_layout(2, [2, 1], 2, flattened=True, thought_embedding=False)
    assert flat.position_ids.tolist() == [0, 1, 2, 3, 4, 5, 6]
    strided = protocol.sequence_layout(2, [2, 1], 2, flattened=True, path_stride=4)
    assert strided.position_ids.tolist() == [0, 1, 2, 3, 6, 10, 11]
    assert flat.segment_ids.tolist() == [0] * 7


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    ang = positions[:, None].float() * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    rotated = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * cos + rotated * sin


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_thought_embedding_is_added_to_k_and_v_before_rope(arch):
    model, _ = tiny_parathinker(arch)
    attn = model.model.layers[0].self_attn
    table = attn.seg_embeddings.weight
    torch.manual_seed(0)
    h = torch.randn(1, 5, model.config.hidden_size)
    positions = torch.tensor([0, 1, 2, 2, 3])
    segments = torch.tensor([0, 1, 1, 2, 0])
    D, Hkv = attn.head_dim, model.config.num_key_value_heads
    with torch.no_grad():  # .forward: the stock projections, without our hooks
        q = attn.q_proj.forward(h).view(5, -1, D)
        k = attn.k_proj.forward(h).view(5, Hkv, D)
        v = attn.v_proj.forward(h).view(5, Hkv, D)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm.forward(q), attn.k_norm.forward(k)
        k = k + table[segments][:, None]  # same vector for every KV head, queries untouched
        v = v + table[segments][:, None]
        theta = model.config.rope_parameters["rope_theta"]
        q, k = rope(q.transpose(0, 1), positions, theta), rope(k.transpose(0, 1), positions, theta)
        v = v.transpose(0, 1)
        rep = q.shape[0] // Hkv
        k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        scores = q @ k.transpose(-1, -2) / math.sqrt(D)
        scores = scores.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
        expected = attn.o_proj((scores.softmax(-1) @ v).transpose(0, 1).reshape(1, 5, -1))
        cos_sin = model.model.rotary_emb(h, positions[None])
        mask = additive(torch.ones(5, 5, dtype=torch.bool).tril())[None, None]
        actual, _ = attn(h, position_embeddings=cos_sin, attention_mask=mask, segment_ids=segments[None])
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_zero_tables_leave_the_model_unchanged():
    model = tiny_model("qwen3")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = model(ids).logits
        attach_thought_embeddings(model)
        after = model(ids, segment_ids=torch.tensor([[0, 1, 2, 3]])).logits
    torch.testing.assert_close(before, after, atol=0, rtol=0)


@pytest.fixture
def scripted_engine(monkeypatch):
    """Runs one prompt with P = 3 under a Script (words by default, summaries end at once)."""
    model, tok = tiny_parathinker("qwen2")
    ids = ControlTokenIds.from_tokenizer(tok)
    w = tok.convert_tokens_to_ids("x")

    def run(paths=None, **kwargs):
        Script(paths, path_default=w, summary_default=ids.summary_close).install(monkeypatch)
        return eager_engine(model, tok).generate(["Find x."], num_paths=3, **kwargs)[0]

    return run, ids, tok, w


def test_first_finish_and_stop_token_rewriting(scripted_engine):
    run, ids, tok, w = scripted_engine
    # token 1 of path 2 is EOS -> rewritten to its own </think2>; it ends the stage (first finish)
    out = run({1: {1: tok.eos_token_id}}, max_new_tokens=8, termination="first")
    assert out.path_ids[1] == [ids.think_open[1], ids.think_close[1]]
    assert [len(p) for p in out.path_ids] == [2, 2, 2]
    assert out.path_finished == [False, True, False]
    assert out.stats["termination"] == "first_finished"
    assert out.summary_ids[-1] == ids.summary_close
    assert out.transcript.startswith("<think1>") and "<summary>" in out.transcript


def test_half_and_last_termination_and_stray_tokens(scripted_engine):
    run, ids, tok, w = scripted_engine
    end = ids.think_close[0]  # another path's closer also ends a path, as its own closer
    script = {1: {0: ids.think_open[2], 2: ids.summary_open}, 2: {0: end}, 4: {2: tok.eos_token_id}}
    half = run(script, max_new_tokens=8, termination="half")
    # stray <think3> / <summary> inside a path become the base model's <think>
    assert half.path_ids[0][1] == ids.think and half.path_ids[2][1] == ids.think
    assert half.path_ids[0][2] == ids.think_close[0]
    assert half.path_finished == [True, False, True] and half.stats["termination"] == "half_finished"
    last = run(script, max_new_tokens=8, termination="last")
    assert last.stats["termination"] == "budget"
    assert [len(p) for p in last.path_ids] == [3, 8, 5]  # path 2 cut by the budget
    assert last.path_ids[2][-1] == ids.think_close[2]


def test_budget_cuts_every_path(scripted_engine):
    run, ids, tok, w = scripted_engine
    out = run(max_new_tokens=5, termination="first")
    assert [len(p) for p in out.path_ids] == [5, 5, 5]
    assert out.path_finished == [False] * 3 and out.stats["termination"] == "budget"


@pytest.mark.parametrize("ragged", [False, True])
def test_one_prefill_per_prompt_one_forward_per_step_one_cache(monkeypatch, ragged):
    model, tok = tiny_parathinker("llama")
    monkeypatch.setattr(ParaThinkerEngine, "_ragged_steps", lambda self, compiled: ragged)
    forwards, caches = [], []  # (input shape, a decode step?)
    model.register_forward_pre_hook(
        lambda m, a, kw: forwards.append((tuple(kw["input_ids"].shape), isinstance(kw["reads"], PageReads))),
        with_kwargs=True)
    real_cache = generate_mod.PagedKVCache
    monkeypatch.setattr(generate_mod, "PagedKVCache", lambda *a, **k: caches.append(1) or real_cache(*a, **k))
    out = eager_engine(model, tok).generate(PROMPTS, num_paths=4, max_new_tokens=6, termination="last",
                                                 summary_max_tokens=3, temperature=1.0, seed=0)
    template = len(tok(protocol.SUMMARY_TEMPLATE, add_special_tokens=False)["input_ids"])
    assert len(caches) == 1
    others = [shape for shape, is_step in forwards if not is_step]
    assert others[:2] == [(1, len(o.prompt_ids)) for o in out]  # each prompt prefilled once, not once per path
    assert others[2:] == [(1, template)] * 2  # each summary template force-fed in one forward
    steps = [shape for shape, is_step in forwards if is_step]
    # no idle step: both requests start together, and the run ends with the longer one
    generated = [max(map(len, o.path_ids)) + len(o.summary_ids) - template - 1 for o in out]
    assert len(steps) == max(generated)
    if ragged:  # only the tokens that are kept: every path token, every summary token but the last
        kept = sum(sum(map(len, o.path_ids)) + len(o.summary_ids) - template - 1 for o in out)
        assert all(shape[0] == 1 for shape in steps) and sum(shape[1] for shape in steps) == kept
    else:  # all slots x P paths in one forward per step
        assert set(steps) == {(2, 4)}


def test_independent_and_sequential_modes(parathinker):
    model, tok = parathinker
    engine = eager_engine(model, tok)
    seq = engine.generate(PROMPTS, mode="sequential", max_new_tokens=6)
    assert all(len(o.path_ids) == 1 and o.summary_ids == [] for o in seq)
    ind = engine.generate(PROMPTS, mode="independent", num_paths=4, max_new_tokens=6, temperature=1.0, seed=0)
    assert all(len(o.path_ids) == 4 for o in ind)
    # sequential greedy equals transformers' greedy generate on the same prompt
    ids = tok(PROMPTS[1], return_tensors="pt")
    with torch.no_grad():
        ref = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    ref_new = ref[0, ids["input_ids"].shape[1] :].tolist()
    assert seq[1].path_ids[0] == ref_new[: len(seq[1].path_ids[0])]


def test_official_format_round_trip(tmp_path, caplog):
    path = save_tiny_checkpoint(tmp_path / "ckpt", "qwen2")
    original, tok = tiny_parathinker("qwen2")
    config = json.loads((path / "config.json").read_text())
    assert config["max_segments"] == 32
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert "model.layers.1.self_attn.seg_embeddings.weight" in set(f.keys())
    loaded = load_parathinker_model(path)
    for a, b in zip(thought_embedding_tables(original), thought_embedding_tables(loaded)):
        torch.testing.assert_close(a.weight, b.weight, atol=0, rtol=0)
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(path)
    assert ControlTokenIds.from_tokenizer(reloaded) == ControlTokenIds.from_tokenizer(tok)
    # A checkpoint without tables: zero tables and one warning.
    plain = save_tiny_checkpoint(tmp_path / "plain", "llama", parathinker=False)
    with caplog.at_level(logging.WARNING):
        model = load_parathinker_model(plain)
    assert all(t.weight.abs().sum() == 0 for t in thought_embedding_tables(model))
    assert sum("training-free" in r.message for r in caplog.records) == 1


def test_control_tokens_get_the_official_ids():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(151665)}  # DeepSeek-R1-Distill-Qwen's base vocabulary size
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")))
    embedding = torch.nn.Module()
    embedding.get_input_embeddings = lambda: torch.nn.Embedding(151936, 1)  # Qwen's padded rows
    added = add_control_tokens(embedding, tok)
    assert added == protocol.control_tokens()
    assert tok.convert_tokens_to_ids(added) == list(range(151665, 151683))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_paths=0), "num_paths=0"),
        (dict(num_paths=9), "num_paths=9 needs <think9>, but the tokenizer has <think1>..<think8>"),
        (dict(termination="sometimes"), "termination='sometimes'"),
        (dict(mode="beam"), "mode='beam'"),
        (dict(summary_kv="copy"), "summary_kv='copy'"),
        (dict(positions="random"), "positions='random'"),
        (dict(max_new_tokens=5000), "max_position_embeddings=4096"),
        (dict(max_new_tokens=0), "max_new_tokens=0"),
    ],
)
def test_bad_arguments_name_the_argument_and_limit(kwargs, message):
    model, tok = tiny_parathinker("qwen2")
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        eager_engine(model, tok).generate(["Find x."], **kwargs)


def test_bad_prompts_and_segment_limit():
    model, tok = tiny_parathinker("qwen2")
    engine = eager_engine(model, tok)
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        engine.generate(["Find x.", ""])
    small, tok2 = tiny_model("qwen2"), tiny_tokenizer()
    add_control_tokens(small, tok2)
    attach_thought_embeddings(small, max_segments=4)
    with pytest.raises(ValueError, match="max_segments=4"):
        eager_engine(small, tok2).generate(["Find x."], num_paths=4)
    with pytest.raises(ValueError, match="lacks the ParaThinker control tokens"):
        eager_engine(tiny_model("qwen2"), tiny_tokenizer()).generate(["Find x."])



def test_summary_stop_tokens_become_summary_close_and_strays_are_rewritten(monkeypatch):
    model, tok = tiny_parathinker("qwen2")
    ids = ControlTokenIds.from_tokenizer(tok)
    w = tok.convert_tokens_to_ids("x")
    # every path ends at once; the summary: a stray <think1>, a word, then a path's closer
    Script(path_default=tok.eos_token_id, summary=[ids.think_open[0], w, ids.think_close[2]]).install(monkeypatch)
    out = eager_engine(model, tok).generate(["Find x."], num_paths=2, max_new_tokens=4)[0]
    template = tok(protocol.SUMMARY_TEMPLATE, add_special_tokens=False)["input_ids"]
    assert out.summary_ids == template + [ids.think, w, ids.summary_close]
    assert out.transcript.count("<summary>") == 1


@pytest.mark.parametrize("mode", ["parathinker", "independent"])
def test_min_new_tokens_keeps_paths_from_ending_early(mode):
    model, tok = tiny_parathinker("qwen2")
    eos = tok.eos_token_id

    def prefer_eos(module, args, logits):
        logits[..., eos] += 100.0
        return logits

    model.lm_head.register_forward_hook(prefer_eos)
    engine = eager_engine(model, tok)
    kwargs = dict(mode=mode, num_paths=3, max_new_tokens=8, termination="last")
    eager = engine.generate(["Find x."], **kwargs)[0]
    patient = engine.generate(["Find x."], min_new_tokens=4, **kwargs)[0]
    start = 1 if mode == "parathinker" else 0  # the forced <think k>
    assert [len(p) for p in eager.path_ids] == [start + 1] * 3
    assert [len(p) for p in patient.path_ids] == [5] * 3  # 4 tokens, then the (rewritten) EOS
    assert all(patient.path_finished)


# The official vLLM example's template, as written there (line continuations inside a
# triple-quoted string, braces escaped for str.format).
OFFICIAL_EXAMPLE_TEMPLATE = """<｜User｜>{question} You FIRST think about the reasoning process as an internal monologue \
    and then summarize the reasoning process to get the final answer. The summary process MUST BE enclosed \
    within <summary> </summary> tags. The final answer MUST BE put in \\\\boxed{{}}.<｜Assistant｜><think>"""


def test_official_prompt_is_byte_for_byte_the_released_template():
    question = "Find $x$ such that {x} = 2."
    assert protocol.build_prompt(question) == OFFICIAL_EXAMPLE_TEMPLATE.format(question=question)
    official_tokenizer = type("Tok", (), {"get_vocab": lambda self: {"<｜User｜>": 0, "<｜Assistant｜>": 1}})()
    assert protocol.build_prompt(question, official_tokenizer) == OFFICIAL_EXAMPLE_TEMPLATE.format(question=question)
    chat = protocol.build_prompt(question, tiny_tokenizer())
    assert chat == f"user: {question} {protocol.INSTRUCTION} assistant: "  # the model's own chat template
