"""Training: sequences agree with the engine, path isolation, labels, extrapolation, padding,
LoRA/full runs that lower the loss and load in lm_eval, resume, data errors, make_data."""

from __future__ import annotations

import csv
import json
import math
import os
import random
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import eager_engine, lm_eval_cmd  # noqa: E402
from tiny import DATA_DIR, save_tiny_checkpoint, tiny_parathinker, tiny_tokenizer  # noqa: E402

from lm_eval_parathinker import protocol  # noqa: E402
from training import make_data  # noqa: E402
from training.data import DataError, control_token_in, convert, load_records  # noqa: E402
from training.batching import Collator, SFTDataset  # noqa: E402
from training.arguments import parse_args  # noqa: E402
from training.sequence import IGNORE_INDEX, SequenceBuilder, SequentialBuilder, extrapolation_indices, pack  # noqa: E402
from training.sft import build_trainer, load_base, resume_checkpoint  # noqa: E402
from training.transcripts import record_from_text  # noqa: E402
from training.trainer import forward_logits, model_inputs  # noqa: E402
from lm_eval_parathinker.upstream.transformers import attn_implementation  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PARATHINKER_DATA_DIR": str(DATA_DIR), "OMP_NUM_THREADS": "1"}  # tiny models: one thread per process

RECORDS = [
    {"problem": f"What is {i} + 3?", "answer": str(i + 3),
     "paths": [f"Let x be {i} + 3 so x = {i + 3}.", f"The answer is {i + 3}, so \\boxed{{{i + 3}}}.", f"x = 3 + {i} = {i + 3}"]}
    for i in range(6)
]


def _batch(examples, tok, **kwargs):
    """A collated batch of one-record rows."""
    return Collator(tok.pad_token_id, **kwargs)([(ex,) for ex in examples])


def lm_loss(model, batch) -> torch.Tensor:
    """The training loss of a collated batch (the model's own: mean over the labelled tokens)."""
    return model(**model_inputs(batch, attn_implementation(model.config))).loss


@pytest.fixture(scope="module")
def tiny():
    return tiny_parathinker("qwen2")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


# ------------------------------------------------------------------ training == inference


@pytest.mark.parametrize("arch, compat", [("qwen2", protocol.PAPER), ("qwen3", protocol.PAPER),
                                          ("qwen2", protocol.OFFICIAL), ("qwen3", protocol.OFFICIAL)])
def test_training_forward_matches_engine_logits(arch, compat):
    official = compat is protocol.OFFICIAL
    model, tok = tiny_parathinker(arch, official=official)
    template = len(tok(protocol.SUMMARY_TEMPLATE, add_special_tokens=False)["input_ids"])
    out = eager_engine(model, tok).generate(
        ["What is 2+3?"], num_paths=3, max_new_tokens=16 if official else 7, termination="last",
        summary_max_tokens=template + 6 if official else 6, output_logits=True, temperature=1.0, seed=3,
        compat=compat.name,
    )[0]
    ex = pack(out.prompt_ids, out.path_ids, out.summary_ids, compat=compat)
    with torch.no_grad():
        logits = forward_logits(model, _batch([ex], tok))[0]
    start = len(out.prompt_ids)
    for path, expected in zip(out.path_ids, out.path_logits):
        torch.testing.assert_close(logits[start : start + len(path)], expected, atol=1e-4, rtol=0)
        start += len(path)
    n = out.summary_logits.shape[0]
    assert n >= len(out.summary_ids) - 1 > 0
    torch.testing.assert_close(logits[start : start + n], out.summary_logits, atol=1e-4, rtol=0)


def _reference_logits(model, ex) -> torch.Tensor:
    """Logits of one row computed without the protocol's mask code: every path as its own plain
    causal sequence (prompt + that path, at the row's positions and segment ids), and the prompt and
    summary from one forward under a mask written out here token by token."""
    blocks, pos, seg = ex.layout.block_ids, ex.layout.position_ids, ex.layout.segment_ids
    n = blocks.numel()
    q, kv = blocks[:, None], blocks[None, :]  # query i sees key j <= i of the prompt, its own block, or all (summary)
    allowed = torch.ones(n, n, dtype=torch.bool).tril() & ((kv == 0) | (kv == q) | (q == -1))
    with torch.no_grad():
        out = model(input_ids=ex.input_ids[None], position_ids=pos[None], segment_ids=seg[None],
                    attention_mask=allowed[None, None], use_cache=False).logits[0]
        for k in blocks[blocks > 0].unique().tolist():
            keep = (blocks == 0) | (blocks == k)
            alone = model(input_ids=ex.input_ids[keep][None], position_ids=pos[keep][None],
                          segment_ids=seg[keep][None], use_cache=False).logits[0]
            out[blocks == k] = alone[blocks[keep] == k]
    return out


@pytest.mark.parametrize("compat", [protocol.PAPER, protocol.OFFICIAL], ids=["paper", "official"])
@pytest.mark.parametrize("arch", ["qwen2", "llama", "qwen3"])
def test_training_forward_matches_full_sequence_reference(arch, compat):
    """Renamed paths (extrapolation) and right padding in a batch of two, through the collator and
    the trainer's inputs, against the reference of each row alone."""
    model, tok = tiny_parathinker(arch, official=compat is protocol.OFFICIAL)
    builder = SequenceBuilder(tok, compat=compat)
    long_record = {**RECORDS[2], "paths": [*RECORDS[2]["paths"], "a fourth path, longer than the others by far"]}
    rows = [builder.build(builder.encode(RECORDS[1]), [8, 2, 7]), builder.build(builder.encode(long_record), [1, 7, 3, 8])]
    with torch.no_grad():
        logits = forward_logits(model, _batch(rows, tok))
    assert rows[0].input_ids.numel() < logits.shape[1]  # the first row is padded
    for b, ex in enumerate(rows):
        torch.testing.assert_close(logits[b, : ex.input_ids.numel()], _reference_logits(model, ex), atol=1e-4, rtol=0)


def test_path_isolation_logits_and_gradients(tiny):
    model, tok = tiny
    builder = SequenceBuilder(tok)
    enc = builder.encode(RECORDS[1])
    ex = builder.build(enc)
    blocks = ex.layout.block_ids
    changed = ex.input_ids.clone()
    pos2 = (blocks == 2).nonzero().flatten()[3]  # a body token of path 2
    changed[pos2] = (changed[pos2] + 1) % 280

    def run(input_ids):
        inputs = model_inputs(_batch([ex], tok), "sdpa")
        embeds = model.get_input_embeddings()(input_ids[None]).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds, position_ids=inputs["position_ids"], attention_mask=inputs["attention_mask"],
                       segment_ids=inputs["segment_ids"], use_cache=False).logits[0]
        path1 = logits[blocks == 1]
        path1.log_softmax(-1).sum().backward()
        return logits.detach(), embeds.grad[0]

    logits_a, grad_a = run(ex.input_ids)
    logits_b, grad_b = run(changed)
    in1, in2, summ = blocks == 1, blocks == 2, blocks == protocol.SUMMARY_BLOCK
    assert torch.equal(logits_a[in1], logits_b[in1])
    assert torch.equal(grad_a[in1], grad_b[in1])
    assert grad_a[in2].abs().max() == 0 and grad_a[summ].abs().max() == 0  # path 1 never reads them
    assert (logits_a[summ] - logits_b[summ]).abs().max() > 1e-4  # the summary reads path 2


# ------------------------------------------------------------------ labels, truncation, extrapolation


def test_labels_cover_paths_closers_and_summary_only(tiny):
    _, tok = tiny
    builder = SequenceBuilder(tok)
    ids = builder.ids
    record = RECORDS[4]
    ex = builder.build(builder.encode(record))
    labelled = ex.labels != IGNORE_INDEX
    assert torch.equal(ex.labels[labelled], ex.input_ids[labelled])
    expected = "".join(p + protocol.think_close(k) for k, p in enumerate(record["paths"], 1))
    expected += f" \\boxed{{{record['answer']}}}" + protocol.SUMMARY_CLOSE
    assert tok.decode(ex.input_ids[labelled]) == expected
    prompt_len = int((ex.layout.block_ids == protocol.PROMPT_BLOCK).sum())
    untrained = ex.input_ids[prompt_len:][~labelled[prompt_len:]].tolist()
    assert untrained == [ids.think_open[0], ids.think_open[1], ids.think_open[2], *builder.template]
    prompt = protocol.build_prompt(protocol.TASK_QUESTION.format(problem=record["problem"]), tok)
    assert tok.decode(ex.input_ids[:prompt_len]) == prompt


def test_official_layout_is_the_released_engines():
    _, tok = tiny_parathinker("qwen2", official=True)
    builder = SequenceBuilder(tok, compat=protocol.OFFICIAL, max_path_tokens=32)
    pad = tok.convert_tokens_to_ids(protocol.PAD)
    record = {**RECORDS[3], "paths": [*RECORDS[3]["paths"][:2], "a long path " * 12]}
    ex = builder.build(builder.encode(record))
    blocks, labels = ex.layout.block_ids, ex.labels
    prompt = ex.input_ids[blocks == protocol.PROMPT_BLOCK].tolist()
    text = protocol.build_prompt(record["problem"], tok)  # the problem alone, official template
    assert prompt == protocol.OFFICIAL.prompt_ids(text, tok) and len(prompt) % 16 == 0
    lengths = []
    for k in (1, 2, 3):
        tokens = ex.input_ids[blocks == k].tolist()
        lengths.append(len(tokens))
        closer = tokens.index(builder.ids.think_close[k - 1])
        assert len(tokens) % 16 == 0 and tokens[closer + 1 :] == [pad] * (len(tokens) - closer - 1)
        assert (labels[blocks == k][closer + 1 :] == IGNORE_INDEX).all()  # pads are force-fed, not learned
    assert lengths[2] == 32  # cut to the budget: body, untrained closer, no pad
    summary_start = ex.layout.position_ids[blocks == protocol.SUMMARY_BLOCK][0]
    assert summary_start == 2 * len(prompt) + max(lengths)
    with pytest.raises(ValueError, match="max_path_tokens=20 must be a multiple of 16"):
        SequenceBuilder(tok, compat=protocol.OFFICIAL, max_path_tokens=20)


def test_question_template_is_the_tasks_doc_to_text():
    yaml_text = (REPO / "tasks" / "_parathinker_math_template_yaml").read_text()
    doc_to_text = json.loads(re.search(r"^doc_to_text: (\".*\")$", yaml_text, re.M).group(1))
    assert protocol.TASK_QUESTION.format(problem="P") == doc_to_text.replace("{{problem}}", "P")


def test_truncated_path_keeps_closer_without_label(tiny):
    _, tok = tiny
    builder = SequenceBuilder(tok, max_path_tokens=5)
    record = {**RECORDS[0], "paths": ["x", "a much longer path that cannot fit in five tokens"]}
    ex = builder.build(builder.encode(record))
    blocks = ex.layout.block_ids
    p1, p2 = ex.input_ids[blocks == 1], ex.input_ids[blocks == 2]
    assert len(p2) == 5 and p2[-1] == builder.ids.think_close[1]
    assert ex.labels[blocks == 2].tolist() == [IGNORE_INDEX, *p2[1:4].tolist(), IGNORE_INDEX]
    assert len(p1) == 3 and ex.labels[blocks == 1][-1] == builder.ids.think_close[0]


def test_max_length_drops_trailing_paths_then_skips(tiny):
    _, tok = tiny
    full = SequenceBuilder(tok).encode(RECORDS[0])
    two = SequenceBuilder(tok).length(full) - len(full.paths[2]) - 2
    assert len(SequenceBuilder(tok, max_length=two).encode(RECORDS[0]).paths) == 2
    assert SequenceBuilder(tok, max_length=two - 1).encode(RECORDS[0]) is None


def test_extrapolation_renames_tokens_labels_and_segments(tiny):
    _, tok = tiny
    builder = SequenceBuilder(tok)
    ids = builder.ids
    rng = random.Random(0)
    assert extrapolation_indices(4, 8, 0.0, rng) == [1, 2, 3, 4]
    assert extrapolation_indices(7, 8, 1.0, rng) == list(range(1, 8))  # would clash with 7
    seen = set()
    for _ in range(20):
        idx = extrapolation_indices(4, 8, 1.0, rng)
        assert sorted(idx) in ([1, 2, 7, 8], [1, 3, 7, 8], [1, 4, 7, 8], [2, 3, 7, 8], [2, 4, 7, 8], [3, 4, 7, 8])
        assert [k for k in idx if k < 7] == sorted(k for k in idx if k < 7)  # the others keep their index
        seen.add(tuple(idx))
    assert len(seen) > 3
    record = {**RECORDS[2], "paths": RECORDS[2]["paths"] + ["fourth path"]}
    enc = builder.encode(record)
    plain, renamed = builder.build(enc), builder.build(enc, [8, 2, 7, 4])
    seg = renamed.layout.segment_ids
    for k_new, k_old, body in zip([8, 2, 7, 4], [1, 2, 3, 4], enc.paths):
        in_path = renamed.layout.block_ids == k_new
        tokens = renamed.input_ids[in_path].tolist()
        assert tokens == [ids.think_open[k_new - 1], *body, ids.think_close[k_new - 1]]
        assert (seg[in_path] == k_new).all()
        assert renamed.labels[in_path].tolist() == [IGNORE_INDEX, *body, ids.think_close[k_new - 1]]
        assert plain.input_ids[plain.layout.block_ids == k_old].tolist()[1:-1] == body
    assert torch.equal(renamed.layout.position_ids, plain.layout.position_ids)
    assert torch.equal(renamed.layout.attention_mask(), plain.layout.attention_mask())


def test_sixteen_control_tokens_reach_the_readers_and_the_extrapolation():
    """A tokenizer with <think1>..<think16>: transcripts may open paths up to <think16> (the default
    reader stops at the released 8, naming the token), a path text spells no control token of any
    k, and extrapolation renames paths to the tokenizer's last two, <think15> and <think16>."""
    _, tok = tiny_parathinker("qwen2", num_control_paths=16)
    text = "Q" + "".join(f"<think{k}>p{k}</think{k}>" for k in range(1, 11)) + "<summary> \\boxed{1}</summary>"
    assert record_from_text(text, 16)["paths"] == [f"p{k}" for k in range(1, 11)]
    with pytest.raises(ValueError, match="<think9>: the tokenizer has <think1>..<think8>"):
        record_from_text(text)
    assert control_token_in("so <think12> then") == "<think12>" and control_token_in("<think> x </think>") is None
    builder = SequenceBuilder(tok, extrapolate_prob=1.0)
    ex = builder.sample(builder.encode(RECORDS[0]), random.Random(0))
    assert sorted(ex.path_indices)[1:] == [15, 16]  # two of the three paths renamed
    for k in ex.path_indices:
        assert ex.input_ids[ex.layout.block_ids == k][0] == builder.ids.think_open[k - 1] == tok.convert_tokens_to_ids(f"<think{k}>")


def test_num_control_tokens_flag(tmp_path, capsys, base, data_file):
    argv = ["--model", str(base), "--data", str(data_file), "--output", str(tmp_path / "out"), "--full"]
    assert parse_args(argv)[0].num_control_tokens == 8  # the released checkpoint's
    assert parse_args([*argv, "--num-control-tokens", "16"])[0].num_control_tokens == 16
    assert "--num-control-tokens must be between 2 and 31" in _parse_error(capsys, "--num-control-tokens", "32")
    assert "--num-control-tokens applies to --layout parathinker only" in _parse_error(
        capsys, "--layout", "sequential", "--num-control-tokens", "16")
    with pytest.raises(DataError, match="16 control paths, but compat=official decodes at most the released engine's 8"):
        build_trainer(*parse_args([*argv, "--num-control-tokens", "16", "--compat", "official"]))
    with pytest.raises(DataError, match="--max-paths 6 is more than the tokenizer's 4 control paths"):
        build_trainer(*parse_args([*argv, "--num-control-tokens", "4"]))
    assert not (tmp_path / "out").exists()


def test_collator_padding_changes_nothing(tiny):
    model, tok = tiny
    builder = SequenceBuilder(tok)
    short, long = (builder.build(builder.encode(r)) for r in (RECORDS[0], {**RECORDS[1], "paths": RECORDS[1]["paths"] * 2}))
    batch = _batch([short, long], tok)
    n = short.input_ids.numel()
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all() and (batch["input_ids"][0, n:] == tok.pad_token_id).all()
    assert (batch["document_ids"][0, n:] == protocol.PAD_DOCUMENT).all() and (batch["document_ids"][:, :n] == 0).all()
    mask = model_inputs(batch, "sdpa")["attention_mask"]
    assert mask.shape == (2, 1, long.input_ids.numel(), long.input_ids.numel())
    assert not mask[0, 0, :n, n:].any() and not mask[0, 0, n:, :n].any()  # pads and tokens never meet
    with torch.no_grad():
        padded = forward_logits(model, batch)
        alone = forward_logits(model, _batch([short], tok))
        loss = lm_loss(model, batch)
    assert torch.isfinite(padded).all()
    torch.testing.assert_close(padded[0, :n], alone[0], atol=1e-5, rtol=0)
    manual = torch.nn.functional.cross_entropy(
        torch.cat([padded[0, : n - 1], padded[1, :-1]]), torch.cat([short.labels[1:], long.labels[1:]]), ignore_index=IGNORE_INDEX
    )
    torch.testing.assert_close(loss, manual)


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of every labelled position (0 elsewhere)."""
    return torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX, reduction="none")


def test_packed_row_loss_per_record_equals_each_record_alone(tiny):
    model, tok = tiny
    builder = SequenceBuilder(tok, max_length=900, extrapolate_prob=1.0)
    dataset = SFTDataset(RECORDS[:4], builder, packing=True, seed=0)
    lengths = [builder.length(u) for u in dataset.units]
    assert len(dataset) < len(dataset.units)  # several records share a row
    assert sorted(u for row in dataset.rows for u in row) == list(range(4))
    assert all(sum(lengths[u] for u in row) <= 900 for row in dataset.rows)
    row = max((dataset[i] for i in range(len(dataset))), key=len)
    assert len(row) >= 2
    batch = Collator(tok.pad_token_id, pad_to_multiple_of=128)([row])
    assert batch["input_ids"].shape[1] % 128 == 0
    with torch.no_grad():
        packed = forward_logits(model, batch)[0]
        packed_loss = lm_loss(model, batch)
    losses, start, total, count = _token_losses(packed, batch["labels"][0]), 0, 0.0, 0
    for doc, ex in enumerate(row):
        n = ex.input_ids.numel()
        assert (batch["document_ids"][0, start : start + n] == doc).all()
        assert torch.equal(batch["position_ids"][0, start : start + n], ex.layout.position_ids)  # restart per record
        with torch.no_grad():
            alone = forward_logits(model, _batch([ex], tok))[0]
        torch.testing.assert_close(packed[start : start + n], alone, atol=1e-5, rtol=0)
        expected = _token_losses(alone, ex.labels)
        torch.testing.assert_close(losses[start : start + n - 1], expected, atol=1e-5, rtol=0)
        total, count = total + expected.sum(), count + int((ex.labels[1:] != IGNORE_INDEX).sum())
        start += n
    # the row's loss is the mean over all its records' labelled tokens (longer records weigh more)
    torch.testing.assert_close(packed_loss, total / count, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_flex_block_mask_forward_equals_sdpa():
    """The CUDA path (FlexAttention with the protocol's BlockMask, compiled) on the CPU in inference:
    same logits as SDPA with the dense mask, on a batch with a packed row and padding."""
    # Compile afresh for this batch's static shapes: after other lengths (the benchmarks' smoke run in
    # this process) the compiled kernels go dynamic, and inductor's CPU flex template fails to build
    # for dynamic shapes (torch 2.13; CUDA kernels are triton's).
    torch.compiler.reset()
    model, tok = tiny_parathinker("qwen2")
    builder = SequenceBuilder(tok)
    examples = [builder.build(builder.encode(r), idx) for r, idx in zip(RECORDS[:3], ([1, 2, 3], [8, 2, 7], None))]
    batch = Collator(tok.pad_token_id, pad_to_multiple_of=protocol.FLEX_TILE)([tuple(examples[:2]), (examples[2],)])
    block_mask = model_inputs(batch, "flex_attention")["attention_mask"]
    dense = protocol.two_phase_dense_mask(batch["block_ids"], batch["document_ids"])
    blocks = dense.unflatten(2, (-1, 128)).unflatten(4, (-1, 128)).any(dim=(3, 5))  # [B, 1, Lq/128, Lk/128]
    assert torch.equal(block_mask.to_dense().bool(), blocks) and not blocks.all()  # some blocks are skipped
    with torch.no_grad():
        sdpa = forward_logits(model, batch)
        model.set_attn_implementation("flex_attention")
        flex = forward_logits(model, batch)
    real = batch["document_ids"] != protocol.PAD_DOCUMENT
    torch.testing.assert_close(flex[real], sdpa[real], atol=1e-5, rtol=0)


# ------------------------------------------------------------------ data files


def test_malformed_data_gives_file_line_errors(tmp_path):
    good = json.dumps(RECORDS[0])
    cases = {
        "{not json": r":2: malformed JSON",
        json.dumps({**RECORDS[0], "paths": ["only one"]}): r":2: field 'paths' must be a list of at least 2",
        json.dumps({**RECORDS[0], "paths": ["a", ""]}): r":2: field 'paths' entry 2",
        json.dumps({**RECORDS[0], "answer": ""}): r":2: field 'answer'",
        json.dumps({**RECORDS[0], "paths": ["a", "b <think3> c"]}): r":2: field 'paths' entry 2 contains the control token",
    }
    for bad, message in cases.items():
        path = tmp_path / "bad.jsonl"
        path.write_text(good + "\n" + bad + "\n")
        with pytest.raises(DataError, match=re.escape(str(path)) + message):
            load_records(path)


@pytest.mark.slow
def test_sft_cli_rejects_bad_data_without_output(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"problem": "x", "answer": "1", "paths": "nope"}) + "\n")
    base = save_tiny_checkpoint(tmp_path / "base", parathinker=False)
    proc = subprocess.run([sys.executable, "-m", "training.sft", "--model", str(base), "--data", str(bad),
                           "--output", str(tmp_path / "out")], capture_output=True, text=True, env=ENV, cwd=REPO)
    assert proc.returncode == 2
    assert f"{bad}:2: field 'paths'" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_convert_shared_sources(tmp_path):
    maj8 = DATA_DIR / "train" / "qwen25math_maj8_samples.jsonl"
    records, dropped = convert(maj8)
    rows = [json.loads(line) for line in maj8.read_text().splitlines()]
    assert len(records) + dropped == len(rows)
    first = next(r for r in rows if r["id"] == records[0]["id"])
    assert len(records[0]["paths"]) == sum(first["scores"])
    assert records[0]["paths"][0] == next(t for t, ok in zip(first["responses"], first["scores"]) if ok).strip()

    out = tmp_path / "pr1.jsonl"
    src = DATA_DIR / "train" / "parallel_r1_gsm8k_sft.jsonl"
    assert make_data.main(["convert", "--source", str(src), "--output", str(out)]) == 0
    converted = load_records(out)
    row = json.loads(src.read_text().splitlines()[0])
    assert len(converted[0]["paths"]) == len(row["parallel_blocks"][0])
    assert converted[0]["paths"][1].endswith(row["parallel_blocks"][-1][1].strip())
    assert make_data.main(["convert", "--source", str(DATA_DIR / "train" / "gsm8k_test.jsonl"), "--output", str(tmp_path / "x.jsonl")]) == 2
    assert not (tmp_path / "x.jsonl").exists()


def test_sample_keeps_correct_paths_and_resumes(tmp_path, monkeypatch, capsys):
    teacher = save_tiny_checkpoint(tmp_path / "teacher", parathinker=False)
    out = tmp_path / "paths.jsonl"
    source = DATA_DIR / "train" / "gsm8k_train.jsonl"
    verdicts = iter([[True, False, True], [False, True, False], [True, True, True]])
    monkeypatch.setattr(make_data, "grade", lambda texts, gold: next(verdicts))
    args = ["sample", "--source", str(source), "--teacher", str(teacher), "--output", str(out),
            "--num-paths", "3", "--max-new-tokens", "4", "--min-correct", "2"]
    assert make_data.main([*args, "--limit", "2"]) == 0
    assert "kept 1, dropped 1" in capsys.readouterr().out
    (rec,) = load_records(out)
    assert rec["id"] == "gsm8k-train-0" and rec["answer"] == "72" and len(rec["paths"]) == 2
    assert rec["provenance"]["temperature"] == 0.8 and rec["provenance"]["teacher"] == str(teacher)
    assert make_data.main([*args, "--limit", "3"]) == 0  # only problem 3 is new
    assert "kept 1, dropped 0, skipped 2" in capsys.readouterr().out
    assert [r["id"] for r in load_records(out)] == ["gsm8k-train-0", "gsm8k-train-2"]


def test_grade_uses_boxed_answer_and_math_equivalence():
    assert make_data.grade(["so \\boxed{72}", "\\boxed{71}", "x \\boxed{\\frac{144}{2}}"], "72") == [True, False, True]


# ------------------------------------------------------------------ SFT runs


def _sft(tmp_path, base, out, *extra):
    cmd = [sys.executable, "-m", "training.sft", "--model", str(base), "--data", str(tmp_path / "train.jsonl"),
           "--output", str(out), "--seed", "0", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _dataset_loss(model, tok) -> float:
    builder = SequenceBuilder(tok)
    batch = _batch([builder.build(builder.encode(r)) for r in RECORDS], tok)
    with torch.no_grad():
        return lm_loss(model.eval(), batch).item()


def _initial_loss(base) -> float:
    from accelerate.utils import set_seed

    set_seed(0)  # the run's seed: same N(0, 0.02) tables
    return _dataset_loss(*load_base(str(base)))


def _lm_eval(model_args: str, tmp_path, max_gen_toks: int = 6, model: str = "parathinker", *extra: str) -> dict:
    cmd = [*lm_eval_cmd(), "--model", model, "--model_args", model_args,
           "--tasks", "aime24", "--limit", "1", "--gen_kwargs", f"max_gen_toks={max_gen_toks}",
           "--metadata", json.dumps({"repeats": 1, "data_dir": str(DATA_DIR)}),
           "--output_path", str(tmp_path / "eval"), "--log_samples", *extra]
    tmp_path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = (tmp_path / "eval").rglob("results_*.json")
    return json.loads(result.read_text())


@pytest.fixture(scope="module")
def base(tmp_path_factory, data_file):
    d = data_file.parent
    return save_tiny_checkpoint(d / "base", parathinker=False)


#: the one-shot training runs the tests below check: name -> the flags of its run (output: tmp/name)
SFT_RUNS = {
    "full": ["--full", "--learning-rate", "3e-3", "--epochs", "2", "--extrapolate-prob", "0.5"],
    "sixteen": ["--full", "--num-control-tokens", "16", "--max-steps", "1"],
    "official": ["--full", "--compat", "official", "--max-steps", "2", "--max-path-tokens", "32"],
    "lora": ["--lora-rank", "8", "--learning-rate", "1e-2", "--epochs", "2", "--save-adapter"],
    "sequential": ["--layout", "sequential", "--full", "--learning-rate", "1e-3", "--max-steps", "3", "--packing",
                   "--max-length", "256"],
}


@pytest.fixture(scope="module")
def trained(base, data_file) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """The runs of :data:`SFT_RUNS`, two at a time (a run is mostly start-up on one core): name ->
    (output folder, finished process)."""
    tmp = data_file.parent
    with ThreadPoolExecutor(2) as pool:
        runs = {name: pool.submit(_sft, tmp, base, tmp / name, *flags) for name, flags in SFT_RUNS.items()}
        return {name: (tmp / name, run.result()) for name, run in runs.items()}


@pytest.mark.slow
def test_full_sft_lowers_loss_and_loads_in_lm_eval(base, trained):
    from lm_eval_parathinker.thought_embedding import load_parathinker_model
    from transformers import AutoTokenizer

    out, _ = trained["full"]
    model = load_parathinker_model(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert protocol.control_tokens()[0] in tok.get_vocab() and model.config.max_segments == 32
    assert _dataset_loss(model, tok) < 0.8 * _initial_loss(base)
    res = _lm_eval(f"pretrained={out},num_paths=2", out.parent / "eval_full")
    assert "aime24" in res["results"]


@pytest.mark.slow
def test_sft_with_sixteen_control_tokens_makes_a_checkpoint_that_decodes_sixteen_paths(trained):
    from lm_eval_parathinker.thought_embedding import load_parathinker_model
    from transformers import AutoTokenizer

    out, _ = trained["sixteen"]
    tok = AutoTokenizer.from_pretrained(out)
    assert protocol.num_control_paths(tok) == 16
    (result,) = eager_engine(load_parathinker_model(out), tok).generate(["Find x."], num_paths=16, max_new_tokens=2)
    assert [path[0] for path in result.path_ids] == [tok.convert_tokens_to_ids(f"<think{k}>") for k in range(1, 17)]


@pytest.mark.slow
def test_official_layout_sft_makes_a_checkpoint_of_the_official_format(trained):
    """(lm_eval runs such a checkpoint as official: test_released_data's --recipe official run.)"""
    from transformers import AutoTokenizer

    out, proc = trained["official"]
    assert "compat=official" in proc.stderr
    assert protocol.PAD in AutoTokenizer.from_pretrained(out).get_vocab()


@pytest.mark.slow
def test_lora_adapter_lowers_loss_and_loads_with_peft(base, trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lm_eval_parathinker.thought_embedding import add_control_tokens, load_thought_embeddings, thought_embedding_tables

    out, _ = trained["lora"]
    assert {"adapter_config.json", "adapter_model.safetensors", "thought_embeddings.safetensors"} <= {p.name for p in out.iterdir()}
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(base)
    add_control_tokens(model, tok)
    base_rows = model.get_input_embeddings().weight[tok.convert_tokens_to_ids(["<think1>", "<summary>"])].clone()
    assert load_thought_embeddings(model, out)
    assert all(t.weight.abs().sum() > 0 for t in thought_embedding_tables(model))
    model = PeftModel.from_pretrained(model, out)
    trained_rows = model.get_input_embeddings()(torch.tensor(tok.convert_tokens_to_ids(["<think1>", "<summary>"])))
    assert not torch.allclose(trained_rows, base_rows)  # control-token rows were trained
    assert _dataset_loss(model, tok) < 0.95 * _initial_loss(base)  # deterministic: same records, no dropout
    res = _lm_eval(f"pretrained={base},peft={out},num_paths=2", out.parent / "eval_lora")
    assert "aime24" in res["results"]


@pytest.mark.slow
def test_resume_continues_from_saved_step(base, data_file):
    tmp = data_file.parent
    out = tmp / "resume"
    common = ["--lora-rank", "4", "--epochs", "2", "--save-steps", "4", "--learning-rate", "1e-3"]
    straight = tmp / "straight"
    with ThreadPoolExecutor(1) as beside:  # the uninterrupted run on the second core
        straight_run = beside.submit(_sft, tmp, base, straight, *common)
        _sft(tmp, base, out, *common, "--max-steps", "4")  # "interrupted" after step 4
        first = list(csv.DictReader(open(out / "loss.csv")))
        assert [int(r["step"]) for r in first] == [1, 2, 3, 4] and (out / "checkpoint-4" / "trainer_state.json").is_file()
        _sft(tmp, base, out, *common, "--resume")
        straight_run.result()
    rows = list(csv.DictReader(open(out / "loss.csv")))
    assert [int(r["step"]) for r in rows] == list(range(1, 13))
    assert rows[:4] == first
    reference = list(csv.DictReader(open(straight / "loss.csv")))
    for a, b in zip(rows, reference):  # same data order, RNG and optimizer state as an uninterrupted run
        assert abs(float(a["loss"]) - float(b["loss"])) < 1e-4, (a, b)
    assert (out / "config.json").is_file() and not list(out.glob(".*.tmp"))


def _loss_csv(out: Path) -> list[dict]:
    with open(out / "loss.csv", newline="") as f:
        return list(csv.DictReader(f))


EVAL_RECORDS = [
    {"problem": "What is 10 - 4?", "answer": "6", "paths": ["10 - 4 = 6", "Take 4 from 10 to get \\boxed{6}."]},
    {"problem": "What is 2 * 5?", "answer": "10", "paths": ["2 * 5 = 10", "Five twice is 10.", "x = 10"]},
]


@pytest.fixture(scope="module")
def scheduled_run(base, data_file):
    """One run for three checks: cosine schedule with warmup, tensorboard, an eval loss every 4 steps."""
    tmp = data_file.parent
    eval_file = tmp / "eval.jsonl"
    eval_file.write_text("".join(json.dumps(r) + "\n" for r in EVAL_RECORDS))
    out = tmp / "scheduled"
    _sft(tmp, base, out, "--full", "--learning-rate", "1e-3", "--epochs", "2", "--max-steps", "8",
         "--lr_scheduler_type", "cosine", "--warmup_ratio", "0.25", "--report_to", "tensorboard",
         "--eval-data", str(eval_file), "--eval_strategy", "steps", "--eval_steps", "4")
    return out, _loss_csv(out)


@pytest.mark.slow
def test_cosine_schedule_with_warmup_shows_in_logged_lr(scheduled_run):
    _, rows = scheduled_run
    total, warmup = 8, 2  # warmup_ratio 0.25 of 8 steps
    for row in rows:
        s = int(row["step"]) - 1  # the LR a step ran with: after s scheduler steps
        factor = s / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
        assert float(row["lr"]) == pytest.approx(1e-3 * factor, abs=1e-12), row
    assert [int(r["step"]) for r in rows] == list(range(1, 9))


@pytest.mark.slow
def test_report_to_tensorboard_writes_event_files(scheduled_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, rows = scheduled_run
    (events,) = out.rglob("events.out.tfevents.*")
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert logged == pytest.approx({int(r["step"]): float(r["loss"]) for r in rows}, rel=1e-6)
    assert [e.step for e in acc.Scalars("eval/loss")] == [4, 8]


@pytest.mark.slow
def test_eval_data_logs_eval_loss(scheduled_run):
    from transformers import AutoTokenizer

    from lm_eval_parathinker.thought_embedding import load_parathinker_model

    out, rows = scheduled_run
    evaluated = {int(r["step"]): float(r["eval_loss"]) for r in rows if r["eval_loss"]}
    assert sorted(evaluated) == [4, 8]
    model, tok = load_parathinker_model(out).eval(), AutoTokenizer.from_pretrained(out)
    builder = SequenceBuilder(tok)
    with torch.no_grad():  # the final model = the one evaluated after step 8: mean over the eval rows (batch 1)
        per_row = [lm_loss(model, _batch([builder.build(builder.encode(r))], tok)).item() for r in EVAL_RECORDS]
    assert evaluated[8] == pytest.approx(sum(per_row) / len(per_row), abs=1e-4)


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_equals_one_process_with_twice_the_batch(base, data_file):
    tmp = data_file.parent
    common = ["--model", str(base), "--data", str(data_file), "--full", "--learning-rate", "1e-3", "--max-steps", "3",
              "--seed", "0"]
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "-m", "training.sft"]
    env = {**ENV, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    with ThreadPoolExecutor(1) as beside:  # the one-process run meanwhile (start-up dominates both)
        single_run = beside.submit(_sft, tmp, base, tmp / "single", "--full", "--learning-rate", "1e-3", "--max-steps",
                                   "3", "--batch-size", "2")
        proc = subprocess.run([*torchrun, *common, "--output", str(tmp / "ddp")], capture_output=True, text=True,
                              env=env, cwd=REPO, timeout=300)
        single_run.result()
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp, single = _loss_csv(tmp / "ddp"), _loss_csv(tmp / "single")
    assert len(ddp) == 3 and float(ddp[-1]["epoch"]) == 1.0  # 6 rows, one per rank and step: one epoch
    for a, b in zip(ddp, single):  # rank r takes row r of each global batch: the same rows and gradients
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), abs=1e-5)
        assert float(a["grad_norm"]) == pytest.approx(float(b["grad_norm"]), rel=1e-4)
    assert (tmp / "ddp" / "config.json").is_file() and not list((tmp / "ddp").glob(".*.tmp"))


@pytest.mark.slow
def test_sequential_layout_checkpoint_is_evaluated_by_model_hf(trained):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    out, proc = trained["sequential"]
    tmp = out.parent
    assert "18 samples packed into" in proc.stderr  # 6 records x 3 paths
    tok = AutoTokenizer.from_pretrained(out)
    assert protocol.SUMMARY_OPEN not in tok.get_vocab()
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert not [k for k in f.keys() if "seg_embeddings" in k]
    res = _lm_eval(f"pretrained={out},dtype=float32", tmp / "eval_sequential", 6, "hf", "--apply_chat_template",
                   "--device", "cpu")
    assert "aime24" in res["results"]
    (samples,) = (tmp / "eval_sequential" / "eval").rglob("samples_aime24_*.jsonl")
    sample = json.loads(samples.read_text().splitlines()[0])
    # trained on exactly the prompt lm_eval --apply_chat_template evaluates
    assert sample["arguments"]["gen_args_0"]["arg_0"] == SequentialBuilder(tok).prompt_text(sample["doc"]["problem"])


# ------------------------------------------------------------------ command line


def _parse_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--model", "m", "--data", "d", "--output", "o", *argv])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_training_arguments_pass_through_with_the_project_defaults(tmp_path, capsys):
    args, ta = parse_args(["--model", "m", "--data", "d", "--output", str(tmp_path), "--full"])
    assert (ta.learning_rate, ta.weight_decay, ta.max_grad_norm, ta.num_train_epochs, ta.seed) == (1e-5, 0.05, 0.5, 3, 0)
    assert (ta.lr_scheduler_type.value, ta.max_steps, ta.save_steps, ta.save_total_limit, ta.logging_steps) == ("constant", -1, 0, 2, 1)
    assert ta.remove_unused_columns is False and args.resume is False
    config = tmp_path / "ta.yaml"
    config.write_text("lr_scheduler_type: cosine\nwarmup_ratio: 0.1\nlearning_rate: 2.0e-5\nreport_to: [tensorboard]\n")
    _, ta = parse_args(["--model", "m", "--data", "d", "--output", str(tmp_path), "--training-args", str(config),
                        "--lr_scheduler_type", "linear", "--resume_from_checkpoint", "x"])
    assert (ta.lr_scheduler_type.value, ta.warmup_steps, ta.learning_rate, ta.report_to) == ("linear", 0.1, 2e-5, ["tensorboard"])
    assert "set the same thing" in _parse_error(capsys, "--learning-rate", "1e-4", "--learning_rate", "1e-4")
    assert "--save-steps and --save_steps" in _parse_error(capsys, "--save-steps", "5", "--save_steps", "5")
    assert "--logging_steps must be 1" in _parse_error(capsys, "--logging_steps", "10")
    assert "unrecognized arguments: --no_such_field" in _parse_error(capsys, "--no_such_field", "1")
    assert "--eval_strategy steps needs --eval-data" in _parse_error(capsys, "--eval_strategy", "steps")
    config.write_text("{bad")
    assert f"--training-args {config}" in _parse_error(capsys, "--training-args", str(config))
    bad_keys = tmp_path / "ta.json"
    bad_keys.write_text(json.dumps({"learning_rate": 1e-5, "lernrate": 1}))
    assert "not TrainingArguments fields: lernrate" in _parse_error(capsys, "--training-args", str(bad_keys))


def test_resume_refuses_a_checkpoint_of_the_old_loop(tmp_path):
    old = tmp_path / "checkpoint-4"
    old.mkdir()
    (old / "trainer_state.json").write_text(json.dumps({"step": 4, "epoch": 0, "batches_done": 4}))
    with pytest.raises(DataError, match="before the Trainer rebuild"):
        resume_checkpoint(tmp_path, True)
    with pytest.raises(DataError, match="no checkpoint"):
        resume_checkpoint(tmp_path / "empty", True)


def test_sequential_samples_are_the_evaluated_prompt_and_one_path():
    plain = tiny_tokenizer()
    builder = SequentialBuilder(plain, max_path_tokens=20)
    record = {**RECORDS[1], "paths": ["so \\(\\boxed{4}\\).", "x is four",
                                      "a path far too long for the twenty-token budget of this test, so it is cut"]}
    boxed, bare, cut = builder.units(record)
    prompt = builder.prompt_text(record["problem"])
    assert prompt == plain.apply_chat_template([{"role": "user", "content": protocol.TASK_QUESTION.format(problem=record["problem"])}],
                                               tokenize=False, add_generation_prompt=True)
    n = len(plain(prompt)["input_ids"])
    for ex in (boxed, bare, cut):
        assert ex.input_ids[:n].tolist() == plain(prompt)["input_ids"] and (ex.labels[:n] == IGNORE_INDEX).all()
        assert torch.equal(ex.labels[n:], ex.input_ids[n:]) and (ex.layout.block_ids == 0).all()
        assert torch.equal(ex.layout.position_ids, torch.arange(ex.input_ids.numel()))
    eos = plain.eos_token_id
    assert plain.decode(boxed.input_ids[n:-1]) == record["paths"][0] and boxed.input_ids[-1] == eos  # already boxed
    assert plain.decode(bare.input_ids[n:-1]) == "x is four \\boxed{4}" and bare.input_ids[-1] == eos
    assert len(cut.input_ids) - n == 19 and eos not in cut.input_ids[n:].tolist()  # cut: no EOS to learn


@pytest.mark.slow
def test_an_interrupted_checkpoint_save_leaves_no_checkpoint(base, data_file, tmp_path, monkeypatch):
    from transformers.trainer_utils import get_last_checkpoint

    from training.sft import build_trainer
    from training.trainer import ParaThinkerTrainer

    out = tmp_path / "crash"
    args, training_args = parse_args(["--model", str(base), "--data", str(data_file), "--output", str(out), "--full",
                                      "--max-steps", "2", "--save-steps", "1", "--disable_tqdm", "true"])
    trainer, _ = build_trainer(args, training_args)
    save_rng_state = ParaThinkerTrainer._save_rng_state

    def crash_at_step_2(self, output_dir):
        if self.state.global_step == 2:
            raise OSError("disk full")
        save_rng_state(self, output_dir)

    monkeypatch.setattr(ParaThinkerTrainer, "_save_rng_state", crash_at_step_2)
    with pytest.raises(OSError, match="disk full"):
        trainer.train()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-1") == resume_checkpoint(out, True)
    assert (out / "checkpoint-1" / "trainer_state.json").is_file()  # the complete one, from before


@pytest.mark.slow
@pytest.mark.parametrize("mode", [["--full"], ["--lora", "--save-adapter"]], ids=["full", "lora"])
def test_fsdp_on_two_cpu_processes_equals_one_process_with_twice_the_batch(base, data_file, mode):
    """The official recipe shards with ZeRO-3; here FSDP full shard through accelerate
    (training/configs/fsdp.yaml) on 2 CPU processes (gloo): the same losses, gradient norms and,
    after two steps, the same trained weights as one process with the same global batch. Full
    fine-tuning trains every weight and the thought-embedding tables; LoRA its adapters and the tables."""
    from safetensors.torch import load_file

    tmp = data_file.parent
    name = mode[0].strip("-")
    common = ["--model", str(base), "--data", str(data_file), *mode, "--learning-rate", "1e-3", "--max-steps", "2",
              "--seed", "0"]
    launch = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", "training/configs/fsdp.yaml",
              "--num_processes", "2", "--mixed_precision", "no", "-m", "training.sft"]
    env = {**ENV, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    with ThreadPoolExecutor(1) as beside:  # the one-process run meanwhile (start-up dominates both)
        single_run = beside.submit(_sft, tmp, base, tmp / f"one_{name}", *mode, "--learning-rate", "1e-3", "--max-steps",
                                   "2", "--batch-size", "2")
        proc = subprocess.run([*launch, *common, "--output", str(tmp / f"fsdp_{name}")], capture_output=True,
                              text=True, env=env, cwd=REPO, timeout=600)
        single_run.result()
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded, single = _loss_csv(tmp / f"fsdp_{name}"), _loss_csv(tmp / f"one_{name}")
    assert len(sharded) == len(single) == 2
    for a, b in zip(sharded, single):  # rank r takes row r of each global batch
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), abs=1e-5)
        assert float(a["grad_norm"]) == pytest.approx(float(b["grad_norm"]), rel=1e-4)
    weights = "model.safetensors" if name == "full" else "adapter_model.safetensors"
    tables = [] if name == "full" else ["thought_embeddings.safetensors"]
    for file in [weights, *tables]:
        after_sharded, after_single = load_file(tmp / f"fsdp_{name}" / file), load_file(tmp / f"one_{name}" / file)
        assert after_sharded.keys() == after_single.keys() and after_sharded
        for key, value in after_single.items():
            torch.testing.assert_close(after_sharded[key], value, atol=1e-5, rtol=1e-4, msg=f"{file}: {key}")
    changed = load_file(tmp / f"one_{name}" / weights)
    # the trained tables (full) or adapters (LoRA) were among the weights compared
    assert any(k.endswith("seg_embeddings.weight") or "lora" in k for k in changed)
