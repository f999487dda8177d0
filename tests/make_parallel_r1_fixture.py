"""Writes tests/fixtures/parallel_r1_sft_rows.json: Parallel-R1's SFT layout of two shipped rows.

Provenance: zhengkid/Parallel-R1 @7c3a8f3, verl/verl/utils/dataset/parallel_thinking_sft_dataset.py (SFTDS).
The rows ``parallel-r1-gsm8k-v2-1`` and ``parallel-r1-gsm8k-v2-164`` of
shared/data/train/parallel_r1_gsm8k_sft.jsonl are tokenized as ``__getitem__`` does (SFTDS:372-403):
prompt = chat template of one user turn (``instruction_prompt``) with the generation prompt, response =
``response + eos_token``, each tokenized separately without special tokens, ids = prompt + response, here
without padding (max_length = the exact length, so SFTDS:407-430 pad nothing). The tokenizer is the tiny
test one (``tiny_format_model("parallel-r1")``: byte-level BPE, the six tags as special tokens, eos
``<eos>``, pad ``<pad>``, template ``user: {content} assistant: ``), not Qwen3's. Positions and mask come
from ``reference_layouts.faithful_parallel_r1``, the port of SFTDS:125-175 (mask) and 297-367 (positions)
over the whole sequence, prompt included.

Per row: id, prompt_len, input_ids, tokens (strings, for people), position_ids, and ``masked``: the
(query, key) pairs with key <= query that may NOT attend, as inclusive rectangles [q0, q1, k0, k1]
(every other pair with key <= query is allowed; key > query never is).

Run: .venv/bin/python tests/make_parallel_r1_fixture.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ (as pytest's rootdir conftest has it)

from reference_layouts import faithful_parallel_r1, format_tag_ids  # noqa: E402
from tiny import DATA_DIR, tiny_format_model  # noqa: E402

from lm_eval_parathinker.formats import PARALLEL_R1  # noqa: E402

ROWS = ("parallel-r1-gsm8k-v2-1", "parallel-r1-gsm8k-v2-164")
SOURCE = DATA_DIR / "train" / "parallel_r1_gsm8k_sft.jsonl"
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "parallel_r1_sft_rows.json"


def load_rows(ids=ROWS) -> list[dict]:
    rows = {}
    with open(SOURCE, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["id"] in ids:
                rows[row["id"]] = row
    return [rows[i] for i in ids]


def sft_ids(tok, instruction_prompt: str, response: str) -> tuple[list[int], int]:
    """(input_ids, prompt_len) as SFTDS:379-403 builds them (no padding)."""
    prompt = tok.apply_chat_template([{"role": "user", "content": instruction_prompt}],
                                     add_generation_prompt=True, tokenize=False)  # SFTDS:379-382
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]  # SFTDS:386-387
    response_ids = tok(response + tok.eos_token, add_special_tokens=False)["input_ids"]  # SFTDS:383, 390-391
    return list(prompt_ids) + list(response_ids), len(prompt_ids)  # SFTDS:403


def masked_rectangles(allowed: torch.Tensor) -> list[list[int]]:
    """The causal pairs (key <= query) that ``allowed`` forbids, as inclusive rectangles [q0, q1, k0, k1]:
    runs of forbidden keys per query row, then consecutive rows with the same runs merged."""
    n = allowed.shape[0]
    forbidden = torch.tril(torch.ones(n, n, dtype=torch.bool)) & ~allowed
    rects: list[list[int]] = []
    open_runs: dict[tuple[int, int], int] = {}  # (k0, k1) -> q0 of the rectangle still growing
    for q in range(n + 1):
        runs = set()
        if q < n:
            cols = forbidden[q].nonzero().flatten().tolist()
            start = None
            for a, k in enumerate(cols):
                if start is None:
                    start = k
                if a + 1 == len(cols) or cols[a + 1] != k + 1:
                    runs.add((start, k))
                    start = None
        for run, q0 in list(open_runs.items()):
            if run not in runs:
                rects.append([q0, q - 1, *run])
                del open_runs[run]
        for run in runs:
            open_runs.setdefault(run, q)
    return sorted(rects)


def allowed_from_rectangles(n: int, rects: list[list[int]]) -> torch.Tensor:
    allowed = torch.tril(torch.ones(n, n, dtype=torch.bool))
    for q0, q1, k0, k1 in rects:
        allowed[q0:q1 + 1, k0:k1 + 1] = False
    return allowed


def build(tok=None) -> list[dict]:
    if tok is None:
        _, tok = tiny_format_model("parallel-r1")
    tag_ids = format_tag_ids(PARALLEL_R1, tok)
    out = []
    for row in load_rows():
        ids, prompt_len = sft_ids(tok, row["instruction_prompt"], row["response"])
        positions, allowed = faithful_parallel_r1(ids, tag_ids, tok.pad_token_id)
        rects = masked_rectangles(allowed)
        assert torch.equal(allowed_from_rectangles(len(ids), rects), allowed)
        out.append({"id": row["id"], "prompt_len": prompt_len, "input_ids": ids,
                    "tokens": tok.convert_ids_to_tokens(ids), "position_ids": positions, "masked": rects})
    return out


def main() -> None:
    rows = build()
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    text = "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n]\n"
    FIXTURE.write_text(text, encoding="utf-8")
    print(f"wrote {FIXTURE} ({len(text.encode())} bytes): " + ", ".join(
        f"{r['id']}: {len(r['input_ids'])} tokens, {len(r['masked'])} masked rectangles" for r in rows))


if __name__ == "__main__":
    main()
