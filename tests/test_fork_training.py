"""``training.sft --format``: Parallel-R1's, Multiverse's and NPR's training layouts.

Each layout is checked against an independent reference (``reference_layouts``): the corrected
(``paper``) layout against the rules of the engine's paper layout, and against the engine itself
(same tokens, same labels as the engine's own insertions, same logits); the authors' layouts
(``official``) against line-by-line ports of their SFT code and, for Parallel-R1, the fixture of two
rows of the shipped file. The training forward (the trainer's mask, the collated positions) equals
a forward of each query over just the tokens it may see.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import DATA_DIR
from make_parallel_r1_fixture import FIXTURE, allowed_from_rectangles
from reference_layouts import (
    corrected_layout,
    dense_logits,
    faithful_multiverse,
    faithful_npr,
    format_tag_ids,
    visible_subsequence_logits,
)
from test_forks import PAPER_CASES, PR1_CASES, models, paper_text, run  # noqa: F401 (models: the fixture)
from tiny import save_tiny_checkpoint, tiny_format_model

from lm_eval_parathinker import formats
from lm_eval_parathinker.data import iter_json_lines
from lm_eval_parathinker.engine import forks
from lm_eval_parathinker.harness.options import RunOptions
from lm_eval_parathinker.protocol import PAPER
from training.arguments import parse_args
from training.data import DataError
from training.fork_layouts import ForkBuilder, ForkCollator, ForkItem, ForkReader, ParseError, allowed_mask
from training.sources import Form, open_source, read_items
from training.trainer import forward_logits

R1_FILE = DATA_DIR / "train" / "parallel_r1_gsm8k_sft.jsonl"
R1 = formats.PARALLEL_R1
# a Multiverse response with a nested fork, and an NPR one, written as their training data is
MV_RESPONSE = ("Let me plan.\n<Parallel>\n<Goal>\n<Outline>1: add</Outline>\n<Outline>2: check</Outline>\n</Goal>\n"
               "<Path>\n1: two plus two\n<Parallel>\n<Goal>\n<Outline>1.1: a</Outline>\n<Outline>1.2: b</Outline>\n"
               "</Goal>\n<Path>\n1.1: x is 2</Path>\n<Path>\n1.2: y is 2</Path>\n<Conclusion>\nz is 4</Conclusion>\n"
               "</Parallel>\n so four</Path>\n<Path>\n2: four again</Path>\n<Conclusion>\nBoth say 4.</Conclusion>\n"
               "</Parallel>\nAnswer: 4")
NPR_RESPONSE = ("<guideline>\n<plan>1: add</plan>\n<plan>2: multiply</plan>\n</guideline>\n<step>\n1: 2+2 is 4</step>\n"
                "<step>\n2: 2*2 is 4</step>\n<takeaway>\nBoth give 4.</takeaway>\nSo \\boxed{4}")
RESPONSES = {"multiverse": MV_RESPONSE, "npr": NPR_RESPONSE}
IM_END_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|im_end|>{% endfor %}"
                   "{% if add_generation_prompt %}assistant: {% endif %}")


def shipped_rows(*ids: int) -> list[dict]:
    wanted = {f"parallel-r1-gsm8k-v2-{i}" for i in ids}
    return [row for _, row in iter_json_lines(R1_FILE) if row["id"] in wanted]


@pytest.fixture(scope="module")
def tiny():
    """A tiny model and tokenizer per format; the chat template ends each turn with <|im_end|> (NPR's
    code reads the response after the first one)."""
    built = {}
    for name in formats.FORMATS:
        model, tok = tiny_format_model(name)
        tok.add_tokens(["<|im_end|>"], special_tokens=True)
        tok.chat_template = IM_END_TEMPLATE
        built[name] = (model, tok)
    return built


def item(name: str, tok, layout: str, row: dict | None = None) -> ForkItem:
    row = row or {"problem": "What is 2 + 2?", "response": RESPONSES[name]}
    return ForkReader(formats.get_format(name), tok, layout)(row, Form.RESPONSES)


def layout_of(ex) -> tuple[list[int], torch.Tensor]:
    """The positions and boolean mask of a training row, as the trainer builds the mask."""
    batch = ForkCollator(0)([(ex,)])
    return batch["position_ids"][0].tolist(), allowed_mask(batch["fork_ids"], batch["path_ids"], batch["document_ids"])[0, 0]


# -- the authors' layouts (compat=official) ----------------------------------------------------


def test_official_parallel_r1_matches_the_fixture_of_two_shipped_rows(tiny):
    """Rows 1 and 164 as Parallel-R1's SFT dataset lays them out (tests/fixtures, derived from its
    code): the same tokens, positions (the newlines inside a block at 0) and mask."""
    _, tok = tiny["parallel-r1"]
    _, fixture_tok = tiny_format_model("parallel-r1")  # the fixture's tokenizer: the plain tiny template
    fixture = {row["id"]: row for row in json.loads(FIXTURE.read_text())}
    for row in shipped_rows(1, 164):
        ex = ForkBuilder(fixture_tok, R1, "official").build(item("parallel-r1", fixture_tok, "official", row))
        expected = fixture[row["id"]]
        positions, allowed = layout_of(ex)
        assert ex.input_ids.tolist() == expected["input_ids"]
        assert positions == expected["position_ids"]
        assert torch.equal(allowed, allowed_from_rectangles(len(positions), expected["masked"]))
        newlines = [i for i, t in enumerate(expected["tokens"]) if t == "Ċ" and ex.forks[i].sum() == 0
                    and i > expected["prompt_len"] and positions[i] == 0]
        assert newlines  # the quirk is there
        response = ex.labels != -100  # every response token is trained, EOS included; no prompt token
        assert response.tolist() == [False] * expected["prompt_len"] + [True] * (len(positions) - expected["prompt_len"])


@pytest.mark.parametrize("name", ["multiverse", "npr"])
def test_official_layouts_match_ports_of_the_authors_code(tiny, name):
    _, tok = tiny[name]
    fmt = formats.get_format(name)
    ex = ForkBuilder(tok, fmt, "official").build(item(name, tok, "official"))
    ids, tags = ex.input_ids.tolist(), format_tag_ids(fmt, tok)
    if name == "multiverse":
        expected = faithful_multiverse(ids, tags)
    else:
        expected = faithful_npr(ids, tags, tok.convert_tokens_to_ids("<|im_end|>"))
    positions, allowed = layout_of(ex)
    assert positions == expected[0]
    assert torch.equal(allowed, expected[1])
    assert not torch.equal(allowed, torch.ones_like(allowed).tril())  # some paths hide from each other


# -- the corrected layout (compat=paper) -------------------------------------------------------


@pytest.mark.parametrize("name, row", [("parallel-r1", 1), ("parallel-r1", 164), ("parallel-r1", 93),
                                       ("multiverse", None), ("npr", None)])
def test_paper_layout_matches_the_rules(tiny, name, row):
    """Paths isolated and sharing their start, the join after the longest (a nested Multiverse fork
    too); the engine's insertions (path openings, separator and join) are not trained; a row
    without a block is a plain causal response."""
    _, tok = tiny[name]
    fmt = formats.get_format(name)
    data = shipped_rows(row)[0] if row else None
    it = item(name, tok, "paper", data)
    ex = ForkBuilder(tok, fmt, "paper").build(it)
    prompt_len = len(PAPER.prompt_ids(it.prompt, tok))
    positions, allowed = layout_of(ex)
    expected = corrected_layout(fmt, ex.input_ids.tolist(), prompt_len, tok)
    assert positions == expected[0]
    assert torch.equal(allowed, expected[1])
    assert torch.equal(allowed, torch.ones_like(allowed).tril()) == (row == 93)
    lead = tok(fmt.start_text("1:" if fmt.counted else ""), add_special_tokens=False)["input_ids"]
    first = ex.input_ids.tolist().index(tok.convert_tokens_to_ids(fmt.trigger), prompt_len) + 1 if row != 93 else None
    if first is not None:  # the first path's opening, as the engine writes it, untrained
        assert ex.input_ids[first:first + len(lead)].tolist() == lead
        assert (ex.labels[first:first + len(lead)] == -100).all()


# the engine's paper cases, every path closed by the model (a path's EOS becomes </Path>, written by the engine)
ENGINE_CASES = {"parallel-r1": PR1_CASES["two blocks"][0],
                "multiverse": dict(PAPER_CASES["multiverse"][0], **{"root/1.2#0": "y </Path>"}),
                "npr": PAPER_CASES["npr"][0]}


@pytest.mark.parametrize("name", ENGINE_CASES)
def test_paper_layout_is_what_the_engine_decodes(models, monkeypatch, name):  # noqa: F811
    """The engine's compat=paper response, read back as training data, is the same row: the same
    tokens, trained exactly where the engine sampled, and the same logits at every draw."""
    model, tok = models[name]
    _, out = run(models, monkeypatch, name, ENGINE_CASES[name], "paper", output_logits=True, max_new_tokens=3000)
    prompt = PAPER.prompt_ids("Find the number of ways.", tok)
    response, inserted = forks.transcript(out.root)  # the response (the prompt is not shown)
    shown_eos = response[-1] == tok.eos_token_id  # Parallel-R1's loop shows the EOS that ended it
    ex = ForkBuilder(tok, formats.get_format(name), "paper").build(
        ForkItem("Find the number of ways.", tok.decode(response[:-1] if shown_eos else response)))
    assert ex.input_ids.tolist() == prompt + response + ([] if shown_eos else [tok.eos_token_id])
    trained = (ex.labels != -100).tolist()[len(prompt):len(prompt) + len(response)]
    assert trained == [not mark for mark in inserted]
    rows, queries = [], []
    offset = 0

    def walk(thread):  # the engine's recorded logits, at their place in the transcript
        nonlocal offset
        for part in thread.parts:
            if isinstance(part, forks.Segment):
                rows.extend(part.logits[i] for i in sorted(part.logits))
                queries.extend(offset + i for i in sorted(part.logits))
                offset += len(part.tokens)
            else:
                for path in part.paths:
                    walk(path)

    walk(out.root)
    batch = ForkCollator(tok.pad_token_id)([(ex,)])
    with torch.no_grad():
        logits = forward_logits(model, batch)[0]
    assert len(queries) >= 6
    torch.testing.assert_close(logits[queries], torch.stack(rows), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name, layout", [("parallel-r1", "paper"), ("parallel-r1", "official"),
                                          ("multiverse", "paper"), ("multiverse", "official"),
                                          ("npr", "paper"), ("npr", "official")])
def test_training_forward_equals_a_forward_of_what_each_query_sees(tiny, name, layout):
    """The trainer's forward (collated positions, its mask from the fork and path ids) against the
    reference layout's: paper, each query run alone over the tokens it may see, at their reference
    positions; official, one dense forward with the port's mask (a query alone would differ there:
    the separators between paths saw the earlier paths, which later paths do not see)."""
    model, tok = tiny[name]
    fmt = formats.get_format(name)
    data = shipped_rows(164)[0] if name == "parallel-r1" else None
    it = item(name, tok, layout, data)
    if name == "parallel-r1" and layout == "paper":  # a short prompt: the forward cost is the sequence's
        it = ForkItem("Problem: 2 + 2\n", it.response)
    ex = ForkBuilder(tok, fmt, layout).build(it)
    ids = ex.input_ids.tolist()
    if layout == "paper":
        positions, allowed = corrected_layout(fmt, ids, len(PAPER.prompt_ids(it.prompt, tok)), tok)
    elif name == "parallel-r1":
        from reference_layouts import faithful_parallel_r1

        positions, allowed = faithful_parallel_r1(ids, format_tag_ids(fmt, tok), tok.pad_token_id)
    elif name == "multiverse":
        positions, allowed = faithful_multiverse(ids, format_tag_ids(fmt, tok))
    else:
        positions, allowed = faithful_npr(ids, format_tag_ids(fmt, tok), tok.convert_tokens_to_ids("<|im_end|>"))
    in_paths = (ex.forks[:, 0] > 0).nonzero().flatten().tolist()
    after = [i for i in range(len(ids)) if i > max(in_paths)]
    queries = sorted({*in_paths[:: max(1, len(in_paths) // 8)], in_paths[-1], *after[:3], len(ids) - 1})
    batch = ForkCollator(tok.pad_token_id)([(ex,)])
    with torch.no_grad():
        logits = forward_logits(model, batch)[0]
        if layout == "paper":
            reference = visible_subsequence_logits(model, ids, positions, allowed, queries)
        else:
            reference = dense_logits(model, ids, positions, allowed)[queries]
    torch.testing.assert_close(logits[queries], reference, atol=1e-5, rtol=0)


# -- data -----------------------------------------------------------------------------------------


def test_shipped_file_bad_rows(tiny):
    """The paper layout refuses row 475 (an unclosed summary), 127 (text between paths) and 178
    (text between </Parallel> and <Summary>), naming row and defect; --skip-bad-rows skips them.
    The authors' layout keeps 127's and 178's text and refuses only 475."""
    _, tok = tiny["parallel-r1"]
    source = open_source(str(R1_FILE), split="train")
    assert source.form is Form.RESPONSES and len(source.rows) == 341
    with pytest.raises(DataError, match=r"parallel_r1_gsm8k_sft.jsonl:\d+ \(id parallel-r1-gsm8k-v2-127\): block 1: "
                                        r"text 'First,' between <Parallel> and <Path>"):
        read_items(source, tok, model="m", skip_bad_rows=False, fork_reader=ForkReader(R1, tok, "paper"))
    items, bad = read_items(source, tok, model="m", skip_bad_rows=True, fork_reader=ForkReader(R1, tok, "paper"))
    assert (len(items), bad) == (338, 3)
    with pytest.raises(DataError, match=r"v2-475\): the last <Summary> is not closed by </Summary>"):
        read_items(source, tok, model="m", skip_bad_rows=False, fork_reader=ForkReader(R1, tok, "official"))
    for layout in ("official", "sequential"):
        items, bad = read_items(source, tok, model="m", skip_bad_rows=True, fork_reader=ForkReader(R1, tok, layout))
        assert (len(items), bad) == (340, 1)
    assert sum(R1.trigger not in it.response for it in items) == 3  # trained as sequential responses


def test_the_default_run_reports_the_rows_it_trains_on(tiny, caplog):
    from training.sft import build_dataset

    _, tok = tiny["parallel-r1"]
    args, _ = parse_args(["--model", "m", "--data", str(R1_FILE), "--output", "o", "--format", "parallel-r1",
                          "--skip-bad-rows"])
    with caplog.at_level("INFO", logger="training.sft"):
        dataset = build_dataset(str(R1_FILE), args, tok, split="train", extrapolate=True, seed=0)
    assert len(dataset) == 338
    assert "3 of 341 rows are malformed and skipped" in caplog.text
    assert ("training on 338 of 341 rows (3 malformed, 0 longer than --max-length; 3 of the rows read have no "
            "fork: trained as sequential responses)") in caplog.text


def test_messages_and_text_forms_give_the_same_rows(tiny):
    _, tok = tiny["parallel-r1"]
    row = shipped_rows(1)[0]
    reader, builder = ForkReader(R1, tok, "paper"), ForkBuilder(tok, R1, "paper")
    expected = builder.build(reader(row, Form.RESPONSES))
    chat = [{"role": "user", "content": row["instruction_prompt"]}, {"role": "assistant", "content": row["response"]}]
    text = R1.chat_prompt(row["instruction_prompt"], tok) + row["response"]
    for got in (reader({"messages": chat}, Form.MESSAGES), reader({"text": text}, Form.TEXT)):
        assert torch.equal(builder.build(got).input_ids, expected.input_ids)
        assert torch.equal(builder.build(got).position_ids, expected.position_ids)
    with pytest.raises(ParseError, match="generation prompt"):
        reader({"text": row["response"]}, Form.TEXT)


@pytest.mark.parametrize("text, defect", [
    ("A <Parallel>\n<Path> x </Path>\n</Parallel>\n<Summary> s", "not closed by </Summary>"),
    ("A <Parallel>\n<Path> x \n", "not closed by </Path>"),
    ("A <Path> x </Path>", "<Path> where the engine does not write it"),
    ("A <Parallel>\n<Path> x </Path> y <Path> z </Path>\n</Parallel>\n<Summary>s</Summary>", "text 'y' between </Path>"),
])
def test_malformed_responses_are_refused_by_name(text, defect):
    with pytest.raises(ParseError, match=defect):
        ForkReader(R1, None, "paper")({"instruction_prompt": "Q", "response": text}, Form.RESPONSES)


def test_multiverse_paths_must_match_the_outline(tiny):
    _, tok = tiny["multiverse"]
    with pytest.raises(ParseError, match="2 paths, but its outline names 3"):
        item("multiverse", tok, "paper", {"problem": "Q", "response": MV_RESPONSE.replace(
            "<Outline>2: check</Outline>\n", "<Outline>2: check</Outline>\n<Outline>3: again</Outline>\n", 1)})


@pytest.mark.parametrize("flags, message", [
    (["--extrapolate-prob", "0.1"], "--extrapolate-prob applies to ParaThinker's records"),
    (["--recipe", "official"], "--recipe official is ParaThinker's authors' recipe"),
    (["--attn-implementation", "flex_attention"], "dense mask"),
    (["--save-adapter"], "save merged weights"),
    (["--layout", "sequential", "--compat", "official"], "--compat official applies to --layout parathinker only"),
])
def test_flags_that_do_not_apply_to_a_format_are_refused(capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--model", "m", "--data", "d", "--output", "o", "--format", "npr", *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# -- the loop: a checkpoint evaluates as it was trained ---------------------------------------------


def test_a_trained_checkpoint_is_run_with_its_format_layout_and_prompt(tiny, tmp_path):
    """training.sft --format records the format, the layout and the data's user turn in the
    checkpoint; lm_eval's options read them, and its prompt for a problem is the training row's,
    byte for byte (the shipped file's v2 instruction, not the format's v3 one)."""
    _, tok = tiny["parallel-r1"]
    row = shipped_rows(1)[0]
    it = ForkReader(R1, tok, "paper")(row, Form.RESPONSES)
    assert it.instruction is not None and it.instruction.count("{Problem}") == 1
    tok.save_pretrained(tmp_path)
    formats.TrainedFormat("parallel-r1", "paper", it.instruction).save(tmp_path)
    from transformers import AutoTokenizer

    options = RunOptions.parse().resolve(AutoTokenizer.from_pretrained(tmp_path))
    assert options.engine.format == "parallel-r1" and not options.engine.fork_official
    assert options.fork_format.build_prompt(row["problem"], tok) == it.prompt
    assert R1.build_prompt(row["problem"], tok) != it.prompt  # the format's own (v3) prompt differs
    given = RunOptions.parse(compat="official").resolve(AutoTokenizer.from_pretrained(tmp_path))
    assert given.engine.fork_official  # a model arg given wins


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread_offline")
@pytest.mark.parametrize("name", formats.FORMATS)
def test_train_then_lm_eval(name, tmp_path):
    """python -m training.sft --format NAME (LoRA, two steps) on a tiny base, then lm_eval on the
    result with no format model arg: the checkpoint names its format and layout, its tags' rows
    were trained (peft trainable_token_indices), and the fork statistics are in the results."""
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager
    from safetensors.torch import load_file

    from training.sft import main

    base = save_tiny_checkpoint(tmp_path / "base", parathinker=False)
    data = tmp_path / "data.jsonl"
    rows = shipped_rows(1, 164) if name == "parallel-r1" else [{"problem": "What is 2 + 2?", "response": RESPONSES[name]}] * 2
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert main(["--model", str(base), "--data", str(data), "--output", str(out), "--format", name, "--max-steps", "2",
                 "--lora-rank", "4", "--learning-rate", "0.01"]) == 0
    trained = formats.TrainedFormat.load(out)
    assert (trained.format, trained.compat) == (name, "paper")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    weights = load_file(out / "model.safetensors")
    embed = next(v for k, v in weights.items() if k.endswith("embed_tokens.weight"))
    base_tok = AutoTokenizer.from_pretrained(base)
    tag = tok.convert_tokens_to_ids(formats.get_format(name).trigger)
    pieces = base_tok(formats.get_format(name).trigger.strip("<>"), add_special_tokens=False)["input_ids"]
    base_embed = next(v for k, v in load_file(base / "model.safetensors").items() if k.endswith("embed_tokens.weight"))
    assert not torch.allclose(embed[tag], base_embed[pieces].mean(0))  # the tag's row moved from its initialisation
    res = simple_evaluate(
        model="parathinker", model_args={"pretrained": str(out), "dtype": "float32", "journal_dir": str(tmp_path / "j")},
        tasks=["aime24"], limit=1, gen_kwargs="max_gen_toks=24", device="cpu", batch_size=1,
        task_manager=TaskManager(include_defaults=False, metadata={"repeats": 1}))
    info = res["config"]["parathinker"]
    assert info["format"] == name and info["compat"] == "paper"
    assert "forks,all" in res["results"]["aime24"]
