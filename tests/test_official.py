"""compat=official: the released vLLM engine's semantics (method notes section 8.1), checked
against hand-written expectations, the released example's prompt pipeline, explicit full-sequence
forwards and vLLM's YaRN formulas."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import eager_engine, run_lm_evals
from scripted import Script
from tiny import save_tiny_checkpoint, tiny_parathinker
from transformers import Qwen2Config, Qwen2Model

from lm_eval_parathinker import protocol
from lm_eval_parathinker.protocol import OFFICIAL, PAPER, ControlTokenIds
from lm_eval_parathinker.engine.rope import rope_scaling

PROMPTS = ["Find x.", "Let x be the answer, so x = 3 + 4 and then put the final answer in a box."]


@pytest.fixture(scope="module")
def official():
    return tiny_parathinker("qwen2", official=True)


def additive(mask: torch.Tensor) -> torch.Tensor:
    return torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)


# ------------------------------------------------------------------------------ prompt ids


def test_prompt_ids_are_the_released_examples_pipeline(official):
    _, tok = official
    pad = tok.convert_tokens_to_ids(protocol.PAD)
    for question in PROMPTS:
        text = protocol.build_prompt(question, tok)
        assert text.startswith(protocol.OFFICIAL_USER)  # the official template
        # example.py: encode (with BOS), pad so that len + 1 is a multiple of 16, decode; vLLM
        # then encodes the decoded string again, with its own BOS.
        tokens = tok.encode(text)
        pads = -(len(tokens) + 1) % 16
        vllm_ids = tok.encode(tok.decode(tokens + [pad] * pads))
        ids = OFFICIAL.prompt_ids(text, tok)
        assert ids == vllm_ids
        assert ids[:2] == [tok.bos_token_id] * 2 and ids[2] != tok.bos_token_id
        assert len(ids) % 16 == 0 and ids[len(ids) - pads :] == [pad] * pads
        assert PAPER.prompt_ids(text, tok) == tokens  # the training layout: as HFLM encodes


def test_question_is_the_problem_alone():
    assert OFFICIAL.question("Find x.") == "Find x."
    assert PAPER.question("Find x.") == protocol.TASK_QUESTION.format(problem="Find x.")


def test_official_sequence_layout_puts_the_summary_at_twice_the_prompt():
    layout = protocol.sequence_layout(2, [3, 1], 2, compat=OFFICIAL)
    assert layout.position_ids.tolist() == [0, 1, 2, 3, 4, 2, 2 * 2 + 3, 2 * 2 + 3 + 1]
    assert layout.segment_ids.tolist() == [0, 0, 1, 1, 1, 2, 0, 0]
    assert protocol.sequence_layout(2, [3, 1], 2).position_ids.tolist()[-2:] == [2 + 3, 2 + 3 + 1]


# ------------------------------------------------------------------------------ token stream


def summary_forward_positions(model, template_first: int) -> list:
    """Records the positions of the forward that force-feeds the summary template."""
    seen = []

    def hook(module, args, kwargs):
        ids = kwargs["input_ids"]
        if ids.shape[1] > 1 and bool((ids[:, 0] == template_first).all()):
            seen.append(kwargs["position_ids"][:, 0].tolist())

    return seen, model.register_forward_pre_hook(hook, with_kwargs=True)


def test_token_stream_pads_after_the_closer_and_keeps_eos(official, monkeypatch):
    model, tok = official
    ids = ControlTokenIds.from_tokenizer(tok)
    pad, eos, w = tok.convert_tokens_to_ids(protocol.PAD), tok.eos_token_id, tok.convert_tokens_to_ids("x")
    # path 1 closes with the base model's </think> as token 4; path 2 writes EOS as token 2;
    # path 3 a stray <think2> as token 2
    script = {4: {0: ids.think_end}, 2: {1: eos, 2: ids.think_open[1]}}
    Script(script, [eos, ids.think_open[0], w, ids.think_close[1]], path_default=w).install(monkeypatch)
    template = tok(protocol.SUMMARY_TEMPLATE, add_special_tokens=False)["input_ids"]
    seen, handle = summary_forward_positions(model, template[0])
    out = eager_engine(model, tok).generate(["Find x."], num_paths=3, max_new_tokens=48, compat="official")[0]
    handle.remove()
    assert out.path_ids[0] == [ids.think_open[0], w, w, w, ids.think_close[0]] + [pad] * 11
    assert out.path_ids[1] == [ids.think_open[1], w, eos] + [w] * 13  # EOS is an ordinary token
    assert out.path_ids[2] == [ids.think_open[2], w, ids.think] + [w] * 13  # stray opener -> <think>
    assert out.path_finished == [True, False, False] and out.stats["termination"] == "first_finished"
    # the summary: appended as sampled (EOS and a stray opener kept), a path closer ends it as </summary>
    assert out.summary_ids == template + [eos, ids.think_open[0], w, ids.summary_close]
    lp = len(out.prompt_ids)
    assert lp % 16 == 0 and out.prompt_ids[:2] == [tok.bos_token_id] * 2
    assert seen == [[2 * lp + 16]]  # <summary> at 2 Lp + m


def test_closer_on_a_block_boundary_needs_no_pad(official, monkeypatch):
    model, tok = official
    ids = ControlTokenIds.from_tokenizer(tok)
    w = tok.convert_tokens_to_ids("x")
    # token 15 of path 2: length 16 with the closer
    Script({15: {1: ids.summary_close}}, [ids.summary_close], path_default=w).install(monkeypatch)
    out = eager_engine(model, tok).generate(["Find x."], num_paths=2, max_new_tokens=48, compat="official")[0]
    assert out.path_ids[1] == [ids.think_open[1]] + [w] * 14 + [ids.think_close[1]]
    assert [len(p) for p in out.path_ids] == [16, 16]


def test_half_and_last_termination_keep_block_aligned_paths(official, monkeypatch):
    """The fork's own ratio threshold (0.5, 1.0): done paths stop, the rest go on."""
    model, tok = official
    ids = ControlTokenIds.from_tokenizer(tok)
    w = tok.convert_tokens_to_ids("x")
    Script({3: {0: ids.think_close[0]}, 21: {1: ids.think_close[1]}}, [ids.summary_close], path_default=w).install(
        monkeypatch)
    template = tok(protocol.SUMMARY_TEMPLATE, add_special_tokens=False)["input_ids"]
    seen, handle = summary_forward_positions(model, template[0])
    out = eager_engine(model, tok).generate(["Find x."], num_paths=3, max_new_tokens=48, termination="last",
                                                 compat="official")[0]
    handle.remove()
    assert [len(p) for p in out.path_ids] == [16, 32, 48]  # closed at 3 and 21 tokens; path 3 at the budget
    assert out.path_finished == [True, True, False] and out.stats["termination"] == "budget"
    assert seen == [[2 * len(out.prompt_ids) + 48]]


def test_summary_cap_counts_the_template(official, monkeypatch):
    model, tok = official
    w = tok.convert_tokens_to_ids("x")
    template = tok(protocol.SUMMARY_TEMPLATE, add_special_tokens=False)["input_ids"]
    Script({1: {0: tok.convert_tokens_to_ids("</think1>")}}, summary_default=w).install(monkeypatch)
    kwargs = dict(num_paths=2, max_new_tokens=16, summary_max_tokens=len(template) + 3)
    official_out = eager_engine(model, tok).generate(["Find x."], compat="official", **kwargs)[0]
    paper_out = eager_engine(model, tok).generate(["Find x."], compat="paper", **kwargs)[0]
    assert len(official_out.summary_ids) == len(template) + 3
    assert len(paper_out.summary_ids) == len(template) + len(template) + 3


# ------------------------------------------------------------------------------ logits


def explicit_official_forward(model, out):
    """One forward over prompt + paths + summary with hand-written official positions (path token
    j at Lp + j, summary token s at 2 Lp + m + s), segments and the two-phase mask."""
    lp, lens, ns = len(out.prompt_ids), [len(p) for p in out.path_ids], len(out.summary_ids)
    owner = ["P"] * lp + [k for k, n in enumerate(lens, 1) for _ in range(n)] + ["S"] * ns
    positions = list(range(lp)) + [lp + j for n in lens for j in range(n)] + [2 * lp + max(lens) + s for s in range(ns)]
    segments = [0 if o in ("P", "S") else o for o in owner]
    n = len(owner)
    mask = torch.tensor([[j <= i and (owner[j] in ("P", owner[i]) or owner[i] == "S") for j in range(n)] for i in range(n)])
    with torch.no_grad():
        return model(
            torch.tensor([out.prompt_ids + sum(out.path_ids, []) + out.summary_ids]),
            position_ids=torch.tensor([positions]),
            attention_mask=additive(mask)[None, None],
            segment_ids=torch.tensor([segments]),
        ).logits[0]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_engine_logits_equal_an_explicit_full_sequence_forward(official, monkeypatch, temperature):
    model, tok = official
    ids = ControlTokenIds.from_tokenizer(tok)
    # path 2 closes as token 5 (then pads to 16), path 1 writes EOS as token 3
    Script({5: {1: ids.think_close[1]}, 3: {0: tok.eos_token_id}}).install(monkeypatch)
    outs = eager_engine(model, tok).generate(
        PROMPTS, num_paths=3, max_new_tokens=32, summary_max_tokens=70, compat="official",
        temperature=temperature, seed=5, output_logits=True,
    )
    assert len({len(o.prompt_ids) for o in outs}) == 2  # two prompt lengths: left padding in the batch
    for out in outs:
        assert {len(p) for p in out.path_ids} == {16}
        logits = explicit_official_forward(model, out)
        start = len(out.prompt_ids)
        for path, expected in zip(out.path_ids, out.path_logits):
            torch.testing.assert_close(expected, logits[start : start + len(path)], atol=1e-4, rtol=0)
            start += len(path)
        n = len(out.summary_logits)
        torch.testing.assert_close(out.summary_logits, logits[start : start + n], atol=1e-4, rtol=0)


def test_reprefill_agrees_in_official_mode(official):
    model, tok = official
    kwargs = dict(num_paths=2, max_new_tokens=16, summary_max_tokens=66, compat="official", temperature=1.0, seed=2,
                  output_logits=True)
    reuse = eager_engine(model, tok).generate(PROMPTS, **kwargs)
    again = eager_engine(model, tok).generate(PROMPTS, summary_kv="reprefill", **kwargs)
    for a, b in zip(reuse, again):
        assert a.path_ids == b.path_ids
        m = min(len(a.summary_logits), len(b.summary_logits))
        torch.testing.assert_close(a.summary_logits[:m], b.summary_logits[:m], atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------ YaRN


def vllm_yarn(head_dim, base, factor, original):
    """vLLM's YaRNScalingRotaryEmbedding, written out: (inv_freq, cos/sin scale). The frequencies
    ramp between the correction dims of beta_fast = 32 and beta_slow = 1 rotations; cos/sin are
    scaled by 0.1 ln(factor) + 1."""
    pos_freqs = base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)

    def correction_dim(rotations):
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(math.floor(correction_dim(32)), 0), min(math.ceil(correction_dim(1)), head_dim - 1)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (high frequencies), 0: interpolate
    return interpolation * (1 - keep) + extrapolation * keep, 0.1 * math.log(factor) + 1.0


@pytest.mark.parametrize("budget", [16384, 12288])
def test_yarn_matches_vllms_rotary_frequencies_and_scale(budget):
    config = Qwen2Config(hidden_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=128,
                         num_hidden_layers=1, intermediate_size=16, vocab_size=8, max_position_embeddings=131072)
    model = Qwen2Model(config).eval()
    positions = torch.tensor([0, 1, 31, 1000, 9279, 17000])
    x = torch.zeros(1, 6, 256)
    plain_cos, _ = model.rotary_emb(x, positions[None])
    params = OFFICIAL.rope_parameters(budget, 10000.0)
    assert params["factor"] == budget / 8192 and "attention_factor" not in params
    inv_freq, mscale = vllm_yarn(128, 10000.0, budget / 8192, 9280)
    with rope_scaling(model, params):
        torch.testing.assert_close(model.rotary_emb.inv_freq.double(), inv_freq, atol=0, rtol=1e-6)
        cos, sin = model.rotary_emb(x, positions[None])
    angles = positions[:, None].double() * inv_freq[None]
    emb = torch.cat([angles, angles], -1)
    # float32 angles are exact to ~1e-3 rad at position 17000, as in vLLM's own cos/sin cache
    torch.testing.assert_close(cos[0].double(), emb.cos() * mscale, atol=5e-3, rtol=0)
    torch.testing.assert_close(sin[0].double(), emb.sin() * mscale, atol=5e-3, rtol=0)
    assert cos[0, 0, 0].item() == pytest.approx(mscale)  # cos(0) * mscale
    torch.testing.assert_close(model.rotary_emb(x, positions[None])[0], plain_cos)  # restored afterwards


def test_yarn_only_in_official_mode_above_8192():
    assert OFFICIAL.rope_parameters(8192, 1e4) is None and PAPER.rope_parameters(16384, 1e4) is None


def test_engine_runs_long_official_budgets_with_yarn(monkeypatch):
    model, tok = tiny_parathinker("qwen2", official=True, max_position_embeddings=20000)
    ids = ControlTokenIds.from_tokenizer(tok)
    scales = []  # the largest |cos| of each forward: the scale, reached by the slowest frequencies
    model.model.rotary_emb.register_forward_hook(lambda m, a, out: scales.append(out[0].abs().amax().item()))
    for compat, scale in (("official", 0.1 * math.log(2.0) + 1), ("paper", 1.0)):  # vLLM's mscale at factor 2
        scales.clear()
        Script({3: {0: ids.think_close[0]}}, [ids.summary_close]).install(monkeypatch)
        eager_engine(model, tok).generate(["Find x."], num_paths=2, max_new_tokens=16384, compat=compat)
        assert len(scales) > 3 and all(s == pytest.approx(scale, rel=1e-3) for s in scales)  # every forward


# ------------------------------------------------------------------------------ options and errors


def test_auto_picks_official_when_the_tokenizer_has_the_pad(official):
    _, official_tok = official
    _, paper_tok = tiny_parathinker("qwen2")
    assert protocol.resolve_compat("auto", official_tok) is OFFICIAL
    assert protocol.resolve_compat("auto", paper_tok) is PAPER
    assert protocol.resolve_compat("paper", official_tok) is PAPER


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(compat="vllm"), "compat='vllm' is not one of auto, paper, official"),
        (dict(compat="official", max_new_tokens=40), "max_new_tokens=40 .*must be a multiple of 16"),
        (dict(compat="official", num_paths=9), "num_paths=9 is beyond the released engine's 8 paths"),
        (dict(compat="official", positions="flattened"), "flattened"),
        (dict(compat="official", mode="independent"), "compat='official' applies to parathinker decoding only"),
        (dict(compat="official", summary_max_tokens=5), "summary_max_tokens leaves no room"),
    ],
)
def test_bad_official_arguments(official, kwargs, message):
    model, tok = official
    with pytest.raises(ValueError, match=message):
        eager_engine(model, tok).generate(["Find x."], **{"max_new_tokens": 16, **kwargs})


def test_official_keeps_the_released_engines_eight_paths_whatever_the_tokenizer_has():
    model, tok = tiny_parathinker("qwen2", official=True, num_control_paths=16)
    engine = eager_engine(model, tok)
    for compat in ("official", "auto"):  # auto: the tokenizer has <vllm_pad>
        with pytest.raises(ValueError, match=r"num_paths=9 is beyond the released engine's 8 paths \(<think1>..<think8>\), "
                                             r"which compat=official reproduces: use compat=paper"):
            engine.generate(["Find x."], num_paths=9, max_new_tokens=16, compat=compat)
    out = engine.generate(["Find x."], num_paths=9, max_new_tokens=4, compat="paper")[0]
    assert [path[0] for path in out.path_ids] == list(ControlTokenIds.from_tokenizer(tok).think_open[:9])


def test_official_needs_the_released_tokenizer_and_aligned_ids(official):
    model, tok = tiny_parathinker("qwen2")
    with pytest.raises(ValueError, match=r"compat=official needs the released checkpoint's tokenizer.*<vllm_pad>"):
        eager_engine(model, tok).generate(["Find x."], max_new_tokens=16, compat="official")
    model, tok = official
    with pytest.raises(ValueError, match=r"prompts\[0\] has 5 token ids"):
        eager_engine(model, tok).generate([[1, 2, 3, 4, 5]], max_new_tokens=16, compat="official")


# ------------------------------------------------------------------------------ lm_eval


@pytest.fixture(scope="module")
def official_ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("official") / "ckpt", "qwen2", official=True)


COMPATS = ["auto", "paper"]


@pytest.fixture(scope="module")
def lm_eval_runs(official_ckpt, tmp_path_factory) -> dict[str, dict]:
    """``lm_eval`` on the official checkpoint with each ``compat``, both at once: compat -> results."""
    root = tmp_path_factory.mktemp("runs")
    runs = [(["--model", "parathinker", "--model_args",
              f"pretrained={official_ckpt},num_paths=2,dtype=float32,compat={compat},summary_max_tokens=66",
              "--tasks", "aime24", "--limit", "1", "--gen_kwargs", "max_gen_toks=16", "--metadata", '{"repeats": 1}',
              "--device", "cpu", "--log_samples"], root / compat) for compat in COMPATS]
    return {compat: res for compat, (_, res) in zip(COMPATS, run_lm_evals(runs, OMP_NUM_THREADS="1"))}


@pytest.mark.slow
@pytest.mark.parametrize("compat", COMPATS)
def test_lm_eval_runs_both_modes_and_records_the_one_used(lm_eval_runs, compat):
    res = lm_eval_runs[compat]
    info = res["config"]["parathinker"]
    assert info["compat"] == ("official" if compat == "auto" else "paper")
    think_tokens = res["results"]["aime24"]["think_tokens,all"]
    if compat == "auto":  # first-finish at a block boundary or the budget: both paths 16 tokens long
        assert think_tokens == 32
    else:
        assert 2 <= think_tokens <= 32


def test_model_builds_the_official_prompt_from_the_problem_alone(official_ckpt, monkeypatch):
    from lm_eval.api.instance import Instance

    from lm_eval_parathinker.harness.model import ParaThinkerLM

    lm = ParaThinkerLM(pretrained=str(official_ckpt), device="cpu", dtype="float32", num_paths=2)
    assert lm.compat is OFFICIAL
    seen = {}

    class Captured(Exception):
        pass

    def capture(prompts, options, **kwargs):
        seen.update(prompts=prompts, layout=options.layout, **kwargs)
        raise Captured

    monkeypatch.setattr(lm.engine, "generate", capture)
    context = protocol.TASK_QUESTION.format(problem="Find x.")
    request = Instance("generate_until", {"problem": "Find x."}, (context, {"max_gen_toks": 16, "until": []}), 0)
    with pytest.raises(Captured):
        lm.generate_until([request])
    expected = OFFICIAL.prompt_ids(protocol.build_prompt("Find x.", lm.tokenizer), lm.tokenizer)
    assert seen["prompts"] == [expected] and seen["layout"] is OFFICIAL  # the resolved layout travels as it is
    with pytest.raises(ValueError, match="max_gen_toks=20 .* must be a multiple of 16"):
        lm.generate_until([Instance("generate_until", {"problem": "x"}, (context, {"max_gen_toks": 20}), 0)])


def test_model_errors_come_before_any_weights_load(official_ckpt, tmp_path, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    from lm_eval_parathinker.harness.model import ParaThinkerLM

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad argument was reported")

    monkeypatch.setattr(HFLM, "_create_model", no_loading)
    plain = save_tiny_checkpoint(tmp_path / "paper_ckpt", "qwen2")
    cases = [
        (dict(pretrained=str(plain), compat="official"), "compat=official needs the released checkpoint's tokenizer"),
        (dict(pretrained=str(official_ckpt), compat="vllm"), "compat='vllm' is not one of"),
        (dict(pretrained=str(official_ckpt), num_paths=9), "num_paths=9 is beyond the released engine's 8 paths"),
        (dict(pretrained=str(official_ckpt), method="majority", compat="official"), "parathinker decoding only"),
        (dict(pretrained=str(official_ckpt), positions="flattened"), "flattened has no equivalent"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            ParaThinkerLM(device="cpu", **kwargs)
