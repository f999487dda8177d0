"""training.sft on the authors' released form (pre-tokenized rows) and on transcripts: the same
batches and first loss as the same records in JSONL, the official collator's positions, segments
and mask, row validation, the vocabulary check, the hub path, --recipe official end to end."""

from __future__ import annotations

import csv
import json
import logging
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import DATA_DIR, REPO_ROOT, offline_env, run_lm_eval  # noqa: E402
from tiny import tiny_model, tiny_official_tokenizer  # noqa: E402

from lm_eval_parathinker import protocol  # noqa: E402
from lm_eval_parathinker.protocol import OFFICIAL, PAPER, ControlTokenIds  # noqa: E402
from training.arguments import parse_args, recipe_accumulation, training_layout  # noqa: E402
from training.batching import Collator, SFTDataset  # noqa: E402
from training.data import DataError  # noqa: E402
from training.released import TokenizedBuilder, parse_row  # noqa: E402
from training.sequence import IGNORE_INDEX, SequenceBuilder  # noqa: E402
from training.sft import build_builder, load_base  # noqa: E402
from training.sources import Form, open_source, read_items  # noqa: E402

RECORDS = [
    {"problem": f"What is {i} + 3?", "answer": str(i + 3),
     "paths": [f"Let x be {i} + 3 so x = {i + 3}.", f"The answer is {i + 3}, so \\boxed{{{i + 3}}}.",
               f"x = 3 + {i} = {i + 3}", "Adding gives x"][: 2 + i % 3],
     "summary": f" \\boxed{{{i + 3}}}."}
    for i in range(6)
]
LAYOUTS = {"paper": PAPER, "official": OFFICIAL}
BATCH_KEYS = ("input_ids", "labels", "position_ids", "segment_ids", "block_ids", "document_ids")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A plain tiny model with a tokenizer shaped like DeepSeek-R1-Distill-Qwen's (BOS, role tokens)."""
    path = tmp_path_factory.mktemp("released") / "base"
    tiny_model("qwen2").save_pretrained(path)
    tiny_official_tokenizer().save_pretrained(path)
    return path


def _tokenizer(base: Path, compat):
    return load_base(str(base), pad=compat is OFFICIAL)[1]


def _prompt_text(record: dict, tok, compat) -> str:
    return protocol.build_prompt(compat.question(record["problem"]), tok)


def _transcript(record: dict) -> str:
    """The assistant side of the official transcript of a record (control tokens as text)."""
    paths = "".join(f"{protocol.think_open(k)}{p}{protocol.think_close(k)}" for k, p in enumerate(record["paths"], 1))
    return f"{paths}{protocol.SUMMARY_TEMPLATE}{record['summary']}{protocol.SUMMARY_CLOSE}"


def released_row(record: dict, tok, compat) -> dict:
    """One row built the way the released data is: the transcript tokenized with the control tokens
    as ids (official layout: <vllm_pad> after each closer to a multiple of 16), labels on path
    bodies, closers, the summary after its template and </summary>, and the official index-valued
    attention_mask (1 prompt, k + 1 path k, 10 summary)."""
    ids = ControlTokenIds.from_tokenizer(tok)
    prompt = compat.prompt_ids(_prompt_text(record, tok, compat), tok)
    input_ids, labels, mask = list(prompt), [IGNORE_INDEX] * len(prompt), [1] * len(prompt)
    for k, path in enumerate(record["paths"], 1):
        body = tok(path, add_special_tokens=False)["input_ids"]
        block = [ids.think_open[k - 1], *body, ids.think_close[k - 1]]
        pads = compat.padded(len(block)) - len(block)
        input_ids += block + [tok.convert_tokens_to_ids(protocol.PAD)] * pads
        labels += [IGNORE_INDEX, *body, ids.think_close[k - 1]] + [IGNORE_INDEX] * pads
        mask += [k + 1] * (len(block) + pads)
    template = tok(protocol.SUMMARY_TEMPLATE, add_special_tokens=False)["input_ids"]
    answer = tok(record["summary"], add_special_tokens=False)["input_ids"] + [ids.summary_close]
    input_ids += template + answer
    labels += [IGNORE_INDEX] * len(template) + answer
    mask += [10] * (len(template) + len(answer))
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def save_released(rows: list[dict], path: Path) -> Path:
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def _batches(dataset: SFTDataset, tok, epoch: int) -> list[dict]:
    dataset.set_epoch(epoch)
    collate = Collator(tok.pad_token_id)
    return [collate([dataset[i]]) for i in range(len(dataset))]


def _assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in BATCH_KEYS:
            assert torch.equal(x[key], y[key]), key


def _items(spec: str, tok, **kwargs):
    source = open_source(spec, split="train")
    return source, read_items(source, tok, model="base", skip_bad_rows=kwargs.get("skip", False))


# ------------------------------------------------------------------ equivalence of batches


@pytest.mark.parametrize("layout", ["paper", "official"])
def test_released_rows_give_the_jsonl_batches(base, tmp_path, layout):
    compat = LAYOUTS[layout]
    tok = _tokenizer(base, compat)
    folder = save_released([released_row(r, tok, compat) for r in RECORDS], tmp_path / "released")
    source, (rows, bad) = _items(str(folder), tok)
    assert source.form is Form.TOKENIZED and source.origin == "save_to_disk folder" and bad == 0
    released = SFTDataset(rows, TokenizedBuilder(tok, compat=compat, extrapolate_prob=0.5), seed=3)
    jsonl = SFTDataset(RECORDS, SequenceBuilder(tok, compat=compat, extrapolate_prob=0.5), seed=3)
    renamed = 0
    for epoch in range(3):
        _assert_same_batches(_batches(released, tok, epoch), _batches(jsonl, tok, epoch))
        renamed += sum(released[i][0].path_indices != tuple(range(1, len(RECORDS[i]["paths"]) + 1)) for i in range(6))
    assert renamed > 0  # the extrapolation renaming was exercised


def _official_collator_positions(input_ids: list[int], think_token_ids: list[int]) -> tuple[list[int], list[int]]:
    """The official ParallelCoTsDataCollator's intra_rope branch (train/custom_data_collator.py),
    transcribed: position_ids and seg_ids from the start hits (<think1..8>, <summary>)."""
    seq_len = len(input_ids)
    position_ids, seg_ids = list(range(seq_len)), [0] * seq_len
    starts = [i for i, t in enumerate(input_ids) if t in think_token_ids]
    tokens = [input_ids[i] for i in starts]
    summary_start_pos = 0
    for idx in range(1, len(starts) - 1):
        current, following = starts[idx], starts[idx + 1]
        for j in range(current, following):
            position_ids[j] += starts[1] - current
            seg_ids[j] = (tokens[idx] - think_token_ids[0]) // 2 + 1
        cot_end_pos = following - 1 + starts[1] - current
        if cot_end_pos > summary_start_pos:
            summary_start_pos = cot_end_pos + 1
        if idx == len(starts) - 2:
            for j in range(following, seq_len):
                position_ids[j] += summary_start_pos - following
                seg_ids[j] = 0
    return position_ids, seg_ids


def _official_mask(index_mask: list[int]) -> torch.Tensor:
    """The official prepare_4d_attention_mask (1 prompt, 10 summary), as a boolean 'may attend'."""
    m = torch.tensor(index_mask)[None, None, None, :].expand(1, 1, len(index_mask), len(index_mask))
    padding = m != 0
    same = (m == m.transpose(-1, -2)) & padding
    to_prompt = padding.transpose(-1, -2) & (m == 1)
    summary = (m.transpose(-1, -2) == 10) & padding
    return (same | to_prompt | summary) & torch.ones(len(index_mask), len(index_mask), dtype=torch.bool).tril()


def test_released_rows_get_the_official_collators_positions_segments_and_mask(base):
    """Paper layout = the official training collator: each path restarts at the prompt's end, the
    summary follows the longest path; extrapolated rows too (ids renamed before positions)."""
    tok = _tokenizer(base, OFFICIAL)  # <vllm_pad> in the rows, as in the released data
    ids = ControlTokenIds.from_tokenizer(tok)
    think_token_ids = [*ids.think_open, ids.summary_open]
    assert np.diff(think_token_ids).tolist() == [2] * 8  # the collator's arithmetic needs the official order
    builder = TokenizedBuilder(tok, compat=PAPER)
    for record in RECORDS:
        row = released_row(record, tok, OFFICIAL)
        parsed = parse_row(row, ids, len(tok))
        for indices in (None, [7, *range(2, len(record["paths"])), 8]):
            ex = builder.build(parsed, indices)
            positions, segments = _official_collator_positions(ex.input_ids.tolist(), think_token_ids)
            assert ex.layout.position_ids.tolist() == positions
            assert ex.layout.segment_ids.tolist() == segments
            block = ex.layout.block_ids[None]
            ours = protocol.two_phase_dense_mask(block, torch.zeros_like(block))[0, 0]
            assert torch.equal(ours, _official_mask(row["attention_mask"])[0, 0])
        if indices:  # opener and closer renamed, the closer's label with it; the opener's label untouched
            renamed = ex.input_ids.tolist()
            assert renamed.count(ids.think_open[6]) == renamed.count(ids.think_close[6]) == 1
            assert ids.think_close[7] in ex.labels.tolist() and ids.think_close[0] not in renamed


@pytest.mark.parametrize("form, layout", [("text", "paper"), ("text", "official"), ("messages", "paper"),
                                          ("messages", "official"), ("conversations", "official")])
def test_transcripts_give_the_jsonl_batches(base, tmp_path, form, layout):
    compat = LAYOUTS[layout]
    tok = _tokenizer(base, compat)
    rows = [transcript_row(r, tok, compat, form) for r in RECORDS]
    path = tmp_path / "transcripts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source, (records, _) = _items(str(path), tok)
    assert source.form.name == form.upper()
    transcripts = SFTDataset(records, SequenceBuilder(tok, compat=compat, extrapolate_prob=0.5), seed=1)
    jsonl = SFTDataset(RECORDS, SequenceBuilder(tok, compat=compat, extrapolate_prob=0.5), seed=1)
    _assert_same_batches(_batches(transcripts, tok, 0), _batches(jsonl, tok, 0))


def transcript_row(record: dict, tok, compat, form: str) -> dict:
    """A record as a ``text`` transcript, OpenAI ``messages`` or ShareGPT ``conversations``."""
    if form == "text":
        return {"text": _prompt_text(record, tok, compat) + _transcript(record)}
    if form == "messages":
        return {"messages": [{"role": "user", "content": record["problem"]},
                             {"role": "assistant", "content": _transcript(record)}]}
    return {"conversations": [{"from": "human", "value": record["problem"]},
                              {"from": "gpt", "value": protocol.THINK_OPEN + _transcript(record)}]}


# ------------------------------------------------------------------ bad rows, wrong vocabulary


def _defect(row: dict, tok) -> str:
    with pytest.raises(ValueError) as e:
        parse_row(row, ControlTokenIds.from_tokenizer(tok), len(tok))
    return str(e.value)


def test_bad_rows_name_the_defect(base):
    tok = _tokenizer(base, PAPER)
    ids = ControlTokenIds.from_tokenizer(tok)
    good = released_row(RECORDS[2], tok, PAPER)  # 4 paths

    def edited(**changes) -> dict:
        row = {k: list(v) for k, v in good.items()}
        for token, value in changes.get("ids", {}).items():  # the first such token, in ids and labels
            i = row["input_ids"].index(token)
            row["input_ids"][i] = value
            row["labels"][i] = value if row["labels"][i] != IGNORE_INDEX else IGNORE_INDEX
        row.update(changes.get("columns", {}))
        return row

    assert "must be closed by one </think2>" in _defect(edited(ids={ids.think_close[1]: 5}), tok)
    assert "path 2 opens with <think3>" in _defect(edited(ids={ids.think_open[1]: ids.think_open[2]}), tok)
    last = len(good["input_ids"]) - 1
    two_summaries = edited(columns={"input_ids": good["input_ids"][:last] + [ids.summary_open],
                                    "labels": good["labels"][:last] + [IGNORE_INDEX]})
    assert "2 <summary> after the paths" in _defect(two_summaries, tok)
    assert "</think1> in the prompt (before <think2>)" in _defect(edited(ids={ids.think_open[0]: 5}), tok)
    no_paths = [5 if t in ids.think_open else t for t in good["input_ids"]]
    assert "no <think1>" in _defect(edited(columns={"input_ids": no_paths, "labels": [IGNORE_INDEX] * len(no_paths)}), tok)
    labels = list(good["labels"])
    labels[0] = good["input_ids"][0]
    assert "labels[0] trains the prompt" in _defect(edited(columns={"labels": labels}), tok)
    outside = list(good["input_ids"])
    outside[3] = len(tok) + 7
    assert f"input_ids[3] = {len(tok) + 7} is outside the tokenizer's vocabulary" in _defect(
        edited(columns={"input_ids": outside}), tok)
    assert "labels has" in _defect(edited(columns={"labels": good["labels"][:-1]}), tok)
    mask = list(good["attention_mask"])
    mask[-1] = 2  # a summary token marked as path 1
    assert "attention_mask does not mark" in _defect(edited(columns={"attention_mask": mask}), tok)


def _sft(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training.sft", *argv], capture_output=True, text=True,
                          env=offline_env(OMP_NUM_THREADS="1"), cwd=REPO_ROOT, timeout=300)


@pytest.mark.slow
def test_a_bad_row_fails_naming_data_row_and_defect_or_is_skipped(base, tmp_path):
    tok = _tokenizer(base, PAPER)
    ids = ControlTokenIds.from_tokenizer(tok)
    rows = [released_row(r, tok, PAPER) for r in RECORDS]
    rows[2]["input_ids"] = [5 if t == ids.think_close[0] else t for t in rows[2]["input_ids"]]
    rows[2]["labels"] = [5 if t == ids.think_close[0] else t for t in rows[2]["labels"]]
    folder = save_released(rows, tmp_path / "bad")
    common = ["--model", str(base), "--data", str(folder), "--full", "--max-steps", "1", "--compat", "paper"]
    proc = _sft(*common, "--output", str(tmp_path / "out"))
    assert proc.returncode == 2 and not (tmp_path / "out").exists()
    assert f"error: {folder} (save_to_disk folder): row 2: <think1> must be closed by one </think1>" in proc.stderr
    proc = _sft(*common, "--output", str(tmp_path / "skipped"), "--skip-bad-rows")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 of 6 rows are malformed and skipped" in proc.stderr
    _, (kept, bad) = _items(str(folder), tok, skip=True)
    assert (len(kept), bad) == (5, 1)


@pytest.mark.slow
def test_data_tokenized_for_another_base_model_fails_before_training(base, tmp_path):
    """Rows holding the released ids (<think1> = 151665, DeepSeek-R1-Distill-Qwen's) against a
    model whose tokenizer numbers the control tokens otherwise."""
    tok = _tokenizer(base, PAPER)
    ids = ControlTokenIds.from_tokenizer(tok)
    ours = [*ids.think_open, *ids.think_close]
    official = {t: 151665 + 2 * (i % 8) + i // 8 for i, t in enumerate(ours)} | {ids.summary_open: 151681,
                                                                                 ids.summary_close: 151682}
    rows = [released_row(r, tok, PAPER) for r in RECORDS]
    for row in rows:
        row["input_ids"] = [official.get(t, t) for t in row["input_ids"]]
        row["labels"] = [official.get(t, t) for t in row["labels"]]
    folder = save_released(rows, tmp_path / "deepseek")
    proc = _sft("--model", str(base), "--data", str(folder), "--output", str(tmp_path / "out"), "--full")
    assert proc.returncode == 2 and not (tmp_path / "out").exists()
    assert f"the data's control-token ids do not match --model {base}" in proc.stderr
    assert f"<think1> = {ids.think_open[0]}" in proc.stderr and "151665, <think1> of DeepSeek-R1-Distill-Qwen" in proc.stderr


# ------------------------------------------------------------------ where the data comes from


def test_hub_ids_go_to_load_dataset_with_their_split(monkeypatch):
    import datasets

    calls = []

    def fake(repo, split=None, **_):
        calls.append((repo, split))
        return datasets.Dataset.from_dict({"input_ids": [[1]], "labels": [[IGNORE_INDEX]]})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert open_source("Leslie04/parathinker-math-6K", split="train").origin == \
        "hub dataset Leslie04/parathinker-math-6K, split train"
    assert open_source("Leslie04/parathinker-math-6K/test", split="train").form is Form.TOKENIZED
    assert calls == [("Leslie04/parathinker-math-6K", "train"), ("Leslie04/parathinker-math-6K", "test")]


def test_hub_id_offline_says_what_to_give_instead(monkeypatch):
    import datasets
    import huggingface_hub

    # offline as HF_HUB_OFFLINE=1 makes it (read at import: these libraries are imported already)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as e:
        open_source("Leslie04/parathinker-math-6K", split="train")
    message = str(e.value)
    assert "hub dataset Leslie04/parathinker-math-6K (split train) cannot be loaded" in message
    assert "save_to_disk folder" in message


def test_parquet_files_and_dataset_dict_splits(base, tmp_path):
    import datasets

    tok = _tokenizer(base, PAPER)
    rows = [released_row(r, tok, PAPER) for r in RECORDS]
    datasets.Dataset.from_list(rows[:3]).to_parquet(str(tmp_path / "part-0.parquet"))
    datasets.Dataset.from_list(rows[3:]).to_parquet(str(tmp_path / "part-1.parquet"))
    source = open_source(str(tmp_path / "part-*.parquet"), split="train")
    assert (source.origin, source.form, len(source.rows)) == ("2 .parquet file(s)", Form.TOKENIZED, 6)
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:4]),
                                   "test": datasets.Dataset.from_list(rows[4:])})
    splits.save_to_disk(str(tmp_path / "dict"))
    assert len(open_source(str(tmp_path / "dict"), split="test").rows) == 2
    assert len(open_source(str(tmp_path / "dict" / "train"), split="test").rows) == 4
    with pytest.raises(DataError, match="splits \\['test', 'train'\\], not 'validation'"):
        open_source(str(tmp_path / "dict"), split="validation")


# ------------------------------------------------------------------ --recipe official


def test_recipe_official_sets_the_official_values_and_yields_to_explicit_ones(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("WORLD_SIZE", raising=False)  # one process
    caplog.set_level(logging.INFO, logger="training.arguments")
    # use_cpu: bf16 TrainingArguments are refused on a machine without a bf16 GPU unless told to use the CPU
    args, ta = parse_args(["--model", "m", "--data", "d", "--output", "o", "--recipe", "official", "--use_cpu", "true"])
    assert (args.full, args.compat, args.max_length, args.extrapolate_prob) == (True, "official", 28672, 0.3)
    assert (ta.learning_rate, ta.lr_scheduler_type.value, ta.warmup_steps, ta.weight_decay, ta.max_grad_norm) == \
        (1e-5, "constant", 0.1, 0.05, 0.5)
    # the authors' 4 GPUs x batch 1 x accumulation 16 = 64 rows per step, here on one process
    assert (ta.num_train_epochs, ta.per_device_train_batch_size, ta.gradient_accumulation_steps, ta.bf16) == \
        (3, 1, 64, True)
    assert "gradient accumulation 64 = round(64 rows / (1 processes x batch 1)): 64 rows" in caplog.text
    assert getattr(ta, "activation_checkpointing", None) or ta.gradient_checkpointing
    file = tmp_path / "ta.json"
    file.write_text(json.dumps({"gradient_accumulation_steps": 4, "bf16": False}))
    args, ta = parse_args(["--model", "m", "--data", "d", "--output", "o", "--recipe", "official", "--lora",
                           "--learning-rate", "2e-5", "--compat", "paper", "--training-args", str(file)])
    assert (args.full, args.compat, ta.learning_rate, ta.gradient_accumulation_steps, ta.bf16) == \
        (False, "paper", 2e-5, 4, False)
    args, ta = parse_args(["--model", "m", "--data", "d", "--output", "o"])  # no recipe: the plain defaults
    assert (args.full, args.compat, args.max_length, ta.gradient_accumulation_steps) == (False, "auto", None, 1)


@pytest.mark.parametrize("world, batch, accumulation", [(1, 1, 64), (2, 1, 32), (4, 1, 16), (8, 1, 8), (8, 2, 4),
                                                        (3, 1, 21), (128, 1, 1)])
def test_recipe_official_keeps_64_rows_per_step_on_any_world(monkeypatch, caplog, world, batch, accumulation):
    """The accumulation for a world size (torchrun's WORLD_SIZE); where the world does not divide
    64 the nearest whole accumulation, with a warning naming the effective batch."""
    monkeypatch.setenv("WORLD_SIZE", str(world))
    caplog.set_level(logging.INFO, logger="training.arguments")
    argv = ["--model", "m", "--data", "d", "--output", "o", "--recipe", "official", "--no-bf16"]
    _, ta = parse_args([*argv, "--batch-size", str(batch)])
    assert ta.gradient_accumulation_steps == accumulation == recipe_accumulation(64, world, batch)
    effective = world * batch * accumulation
    assert f"gradient accumulation {accumulation} = round(64 rows / ({world} processes x batch {batch}))" in caplog.text
    assert (f"the effective batch is {effective} rows" in caplog.text) == (effective != 64)
    _, ta = parse_args([*argv, "--gradient-accumulation-steps", "3"])  # an explicit value wins
    assert ta.gradient_accumulation_steps == 3


@pytest.mark.slow
def test_recipe_official_on_two_cpu_processes_steps_on_64_rows(base, tmp_path):
    """accelerate launch, 2 CPU processes: accumulation 32 derived and logged, and the trainer's own
    world size times batch times accumulation is 64."""
    from torch.distributed.elastic.utils.distributed import get_free_port

    data = tmp_path / "records.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    launch = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
              "--main_process_port", str(get_free_port()), "--mixed_precision", "no", "--dynamo_backend", "no"]
    proc = subprocess.run([*launch, "-m", "training.sft", "--model", str(base), "--data", str(data), "--output",
                           str(tmp_path / "out"), "--recipe", "official", "--no-bf16", "--max-steps", "1"],
                          capture_output=True, text=True, env=offline_env(OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1"),
                          cwd=REPO_ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gradient accumulation 32 = round(64 rows / (2 processes x batch 1)): 64 rows" in proc.stderr
    assert "effective batch: 64 rows per optimizer step (2 processes x batch 1 x accumulation 32)" in proc.stderr


def test_recipe_official_without_bf16_names_no_bf16(capsys):
    argv = ["--model", "m", "--data", "d", "--output", "o", "--recipe", "official"]
    _, ta = parse_args([*argv, "--no-bf16", "--no-gradient-checkpointing"])
    assert not ta.bf16 and not (getattr(ta, "activation_checkpointing", None) or ta.gradient_checkpointing)
    try:
        bf16 = parse_args(argv)[1].bf16  # a machine with bf16 training takes the recipe as it is
    except SystemExit as e:
        assert e.code == 2 and "add --no-bf16" in capsys.readouterr().err
    else:
        assert bf16


def test_recipe_official_trains_at_the_official_collators_positions(base, tmp_path):
    """--recipe official on released rows and on JSONL records: the official tokens (pads, double
    BOS), and the positions and segments of the official collator (summary at Lp + max Lk, not the
    released engine's 2 Lp + max Lk)."""
    tok = _tokenizer(base, OFFICIAL)
    ids = ControlTokenIds.from_tokenizer(tok)
    think_token_ids = [*ids.think_open, ids.summary_open]
    args, _ = parse_args(["--model", "m", "--data", "d", "--output", "o", "--recipe", "official", "--no-bf16"])
    layout = training_layout(args, tok)
    assert layout.pad_to_multiple_of == 16 and layout.extra_bos and not layout.summary_after_prompt_twice
    for form, builder in ((Form.TOKENIZED, build_builder(args, tok, Form.TOKENIZED, extrapolate=False)),
                          (Form.RECORDS, build_builder(args, tok, Form.RECORDS, extrapolate=False))):
        for record in RECORDS:
            row = released_row(record, tok, OFFICIAL)
            unit = parse_row(row, ids, len(tok)) if form is Form.TOKENIZED else builder.encode(record)
            ex = builder.build(unit)
            assert ex.input_ids.tolist() == row["input_ids"]  # the official tokens
            positions, segments = _official_collator_positions(ex.input_ids.tolist(), think_token_ids)
            assert (ex.layout.position_ids.tolist(), ex.layout.segment_ids.tolist()) == (positions, segments)


def _first_loss(out: Path) -> float:
    with open(out / "loss.csv", newline="") as f:
        return float(next(csv.DictReader(f))["loss"])


@pytest.mark.slow
def test_recipe_official_trains_on_every_form_with_the_jsonl_loss_and_lm_eval_runs_it(base, tmp_path):
    """`--recipe official` (bf16 off: CPU) on the same records as JSONL, a save_to_disk folder of
    released rows, `text` transcripts and `messages`: the same first-step loss and trained weights;
    lm_eval runs the result."""
    tok = _tokenizer(base, OFFICIAL)
    forms = {"jsonl": tmp_path / "records.jsonl", "released": tmp_path / "released",
             "text": tmp_path / "text.jsonl", "messages": tmp_path / "messages.parquet"}
    forms["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    save_released([released_row(r, tok, OFFICIAL) for r in RECORDS], forms["released"])
    forms["text"].write_text("".join(json.dumps(transcript_row(r, tok, OFFICIAL, "text")) + "\n" for r in RECORDS))
    import datasets

    datasets.Dataset.from_list([transcript_row(r, tok, OFFICIAL, "messages") for r in RECORDS]).to_parquet(
        str(forms["messages"]))
    overrides = tmp_path / "cpu.json"
    overrides.write_text(json.dumps({"bf16": False}))
    with ThreadPoolExecutor(2) as pool:  # two at a time: a run is mostly start-up on one core
        procs = {name: pool.submit(_sft, "--model", str(base), "--data", str(data), "--output", str(tmp_path / f"out_{name}"),
                                   "--recipe", "official", "--training-args", str(overrides), "--max-steps", "1", "--seed",
                                   "0") for name, data in forms.items()}
    losses = {}
    for name, run in procs.items():
        proc = run.result()
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert '"gradient_accumulation_steps": 64' in proc.stderr and '"learning_rate": 1e-05' in proc.stderr
        assert "effective batch: 64 rows per optimizer step (1 processes x batch 1 x accumulation 64)" in proc.stderr
        losses[name] = _first_loss(tmp_path / f"out_{name}")
    assert all(loss == pytest.approx(losses["jsonl"], abs=1e-6) for loss in losses.values()), losses
    # every form trains the same weights, so lm_eval's run of one checkpoint stands for all four
    from safetensors.torch import load_file

    reference = load_file(tmp_path / "out_jsonl" / "model.safetensors")
    for name in forms:
        trained = load_file(tmp_path / f"out_{name}" / "model.safetensors")
        assert trained.keys() == reference.keys()
        for key, value in reference.items():
            torch.testing.assert_close(trained[key], value, atol=1e-6, rtol=1e-5, msg=f"{name}: {key}")
    _, res = run_lm_eval(["--model", "parathinker", "--model_args",
                          f"pretrained={tmp_path / 'out_released'},num_paths=2,summary_max_tokens=70",
                          "--tasks", "aime24", "--limit", "1", "--gen_kwargs", "max_gen_toks=16",
                          "--metadata", json.dumps({"repeats": 1, "data_dir": str(DATA_DIR)})],
                         tmp_path / "eval_released", OMP_NUM_THREADS="1")
    assert "aime24" in res["results"]
    assert res["config"]["parathinker"]["compat"] == "official"  # auto: the checkpoint has <vllm_pad>


@pytest.mark.slow
def test_released_first_step_loss_equals_jsonl_in_the_paper_layout(base, tmp_path):
    tok = _tokenizer(base, PAPER)
    jsonl = tmp_path / "records.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    folder = save_released([released_row(r, tok, PAPER) for r in RECORDS], tmp_path / "released")
    losses = []
    for name, data in (("jsonl", jsonl), ("released", folder)):
        proc = _sft("--model", str(base), "--data", str(data), "--output", str(tmp_path / name), "--full",
                    "--compat", "paper", "--max-steps", "1", "--batch-size", "2", "--seed", "0")
        assert proc.returncode == 0, proc.stderr[-3000:]
        losses.append(_first_loss(tmp_path / name))
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
