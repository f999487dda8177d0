"""The independent reference layouts (tests/reference_layouts.py) and the Parallel-R1 SFT fixture
(tests/fixtures/parallel_r1_sft_rows.json, written by tests/make_parallel_r1_fixture.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from make_parallel_r1_fixture import FIXTURE, SOURCE, allowed_from_rectangles, build
from reference_layouts import (
    corrected_layout,
    dense_logits,
    faithful_multiverse,
    faithful_npr,
    faithful_parallel_r1,
    format_tag_ids,
    visible_subsequence_logits,
)
from tiny import tiny_format_model

from lm_eval_parathinker.formats import MULTIVERSE, NPR, PARALLEL_R1

# Parallel-R1 as specified for training: every path's lead and the join preceded by a newline
PARALLEL_R1_SPEC = dataclasses.replace(PARALLEL_R1, path_start="\n<Path>", separator="\n")


@pytest.fixture(scope="module")
def tiny():
    return {name: tiny_format_model(name) for name in ("parallel-r1", "multiverse", "npr")}


def one_token_ids(tok, pieces: list[str]) -> list[int]:
    """One token per piece (tags, a newline, a letter or digit of the tiny vocabulary)."""
    ids = []
    for piece in pieces:
        enc = tok(piece, add_special_tokens=False)["input_ids"]
        assert len(enc) == 1, (piece, enc)
        ids += enc
    return ids


def forbidden_pairs(allowed: torch.Tensor) -> set[tuple[int, int]]:
    """The (query, key) pairs with key <= query that ``allowed`` forbids."""
    causal = torch.tril(torch.ones_like(allowed))
    return {tuple(p) for p in (causal & ~allowed).nonzero().tolist()}


def rect(queries: range, keys: range) -> set[tuple[int, int]]:
    return {(q, k) for q in queries for k in keys}


# ------------------------------------------------------------------------------------------ fixture
def load_fixture() -> list[dict]:
    return json.loads(Path(FIXTURE).read_text(encoding="utf-8"))


@pytest.mark.skipif(not SOURCE.exists(), reason=f"{SOURCE} (the shipped SFT data) is absent")
def test_fixture_matches_a_fresh_port_run(tiny):
    fresh = build(tiny["parallel-r1"][1])
    assert fresh == load_fixture()


def test_fixture_mask_rectangles_are_the_sibling_paths():
    rows = {r["id"]: r for r in load_fixture()}
    # v2-1: one block, paths 1216-1461 and 1463-1717; v2-164: paths 1141-1224, 1226-1369, 1371-1511, then
    # 1649-1724, 1726-1857 (the prompt's one-path "block" masks nothing)
    assert rows["parallel-r1-gsm8k-v2-1"]["masked"] == [[1463, 1717, 1216, 1461]]
    assert rows["parallel-r1-gsm8k-v2-164"]["masked"] == [
        [1226, 1369, 1141, 1224], [1371, 1511, 1141, 1224], [1371, 1511, 1226, 1369], [1726, 1857, 1649, 1724]]
    for r in rows.values():
        allowed = allowed_from_rectangles(len(r["input_ids"]), r["masked"])
        # the separator after path 1 sees path 1 and is seen by path 2 (the leak)
        sep, p1, p2 = (1462, 1216, 1463) if r["id"].endswith("-1") else (1225, 1141, 1226)
        assert allowed[sep, p1] and allowed[p2, sep] and not allowed[p2, p1]


def response_blocks(row: dict) -> list[dict]:
    """The response's blocks: <Parallel> index, [<Path>, </Path>] spans, </Parallel> index."""
    toks, blocks = row["tokens"], []
    for i in range(row["prompt_len"], len(toks)):
        if toks[i] == "<Parallel>":
            blocks.append({"open": i, "paths": [], "close": None})
        elif toks[i] == "<Path>":
            blocks[-1]["paths"].append([i, None])
        elif toks[i] == "</Path>":
            blocks[-1]["paths"][-1][1] = i
        elif toks[i] == "</Parallel>":
            blocks[-1]["close"] = i
    return blocks


def test_fixture_newline_at_position_zero_quirk():
    """SFTDS:310,332-355: tokens inside a block but outside every path are never written (position 0)."""
    rows = {r["id"]: r for r in load_fixture()}
    for row in rows.values():
        pos, toks = row["position_ids"], row["tokens"]
        for block in response_blocks(row):
            inside = set(range(block["open"] + 1, block["close"]))
            in_paths = {i for s, e in block["paths"] for i in range(s, e + 1)}
            between = sorted(inside - in_paths)
            # the "\n" after <Parallel>, between the paths and before </Parallel>
            assert between and all(toks[i] == "Ċ" for i in between)
            assert [pos[i] for i in between] == [0] * len(between)
            # each path: consecutive from pos(<Parallel>-scan start) + 1; </Parallel> = longest </Path> + 1
            starts = {pos[s] for s, _ in block["paths"]}
            assert len(starts) == 1
            assert pos[block["close"]] == max(pos[e] for _, e in block["paths"]) + 1
    # explicitly: v2-1 "\n" at 1215 (after <Parallel>), 1462 (between the paths), 1718 (before </Parallel>)
    r1 = rows["parallel-r1-gsm8k-v2-1"]
    assert [(r1["tokens"][i], r1["position_ids"][i]) for i in (1215, 1462, 1718)] == [("Ċ", 0)] * 3
    assert [r1["position_ids"][i] for i in (1216, 1461, 1463, 1717, 1719)] == [379, 624, 379, 633, 634]
    r164 = rows["parallel-r1-gsm8k-v2-164"]
    assert [r164["position_ids"][i] for i in (1140, 1225, 1370, 1512, 1648, 1725, 1858)] == [0] * 7
    assert [r164["position_ids"][i] for i in (1513, 1647, 1649, 1859)] == [523, 657, 658, 790]


def test_fixture_v2_prompt_quirk():
    """The v2 instruction's last literal <Parallel> opens a scan (SFTDS:322-357) that runs to the response's
    first </Parallel>: the prompt after it and the response before its first <Path> (its own <Parallel>
    included) stay at position 0, and the response's first paths count from that prompt tag."""
    for row in load_fixture():
        P, pos, toks = row["prompt_len"], row["position_ids"], row["tokens"]
        last_prompt_open = max(i for i in range(P) if toks[i] == "<Parallel>")
        assert last_prompt_open == 620 and pos[620] == 378
        first_path = response_blocks(row)[0]["paths"][0][0]
        assert set(pos[621:first_path]) == {0}  # the rest of the prompt, the response's opening, its <Parallel>
        assert pos[first_path] == 379
        assert pos[P - 1] == 0 and pos[P] == 0


# ------------------------------------------------------------------------------------------ faithful ports
def test_faithful_parallel_r1_small(tiny):
    _, tok = tiny["parallel-r1"]
    ids = one_token_ids(tok, ["p", "<Parallel>", "q",  # prompt: its tag is parsed too
                              "a", "<Parallel>", "\n", "<Path>", "x", "y", "</Path>", "\n", "<Path>", "<Parallel>",
                              "</Path>", "\n", "</Parallel>", "\n", "<Summary>", "s", "</Summary>", "<eos>"])
    pos, allowed = faithful_parallel_r1(ids, format_tag_ids(PARALLEL_R1, tok), tok.pad_token_id)
    assert pos == [0, 1, 0, 0, 0, 0, 2, 3, 4, 5, 0, 2, 3, 4, 0, 6, 7, 8, 9, 10, 11]
    assert forbidden_pairs(allowed) == rect(range(11, 14), range(6, 10))
    # right padding (SFTDS:407-411, 428-430): pads at position 0, their rows and columns masked
    padded = ids + [tok.pad_token_id] * 2
    pos_p, allowed_p = faithful_parallel_r1(padded, format_tag_ids(PARALLEL_R1, tok), tok.pad_token_id)
    assert pos_p == pos + [0, 0]
    assert torch.equal(allowed_p[:-2, :-2], allowed) and not allowed_p[-2:].any() and not allowed_p[:, -2:].any()
    with pytest.raises(IndexError):  # SFTDS:349: a <Path> without </Path>
        faithful_parallel_r1(one_token_ids(tok, ["<Parallel>", "<Path>", "x"]), format_tag_ids(PARALLEL_R1, tok), -1)


def mv_nested_ids(tok) -> list[int]:
    """A Multiverse transcript (prompt of 2 tokens) with a fork nested in the first path."""
    return one_token_ids(tok, [
        "Q", "</Goal>",  # 0-1 prompt (a trigger there is text)
        "<Parallel>", "<Goal>", "<Outline>", "1", ":", "</Outline>", "</Goal>",  # 2-8, trigger at 8
        "\n", "<Path>", "\n", "1", ":", "<Parallel>", "<Goal>", "</Goal>",  # 9-16 path A, nested trigger at 16
        "\n", "<Path>", "b", "</Path>",  # 17-20 path A1
        "\n", "<Path>", "c", "c", "</Path>",  # 21-25 path A2
        "\n", "<Conclusion>", "\n", "d", "</Conclusion>", "</Parallel>", "</Path>",  # 26-32 nested join, A ends
        "\n", "<Path>", "\n", "2", ":", "e", "</Path>",  # 33-39 path B
        "\n", "<Conclusion>", "\n", "f", "</Conclusion>", "</Parallel>", "<eos>",  # 40-46 join
    ])


def test_faithful_multiverse_nested(tiny):
    _, tok = tiny["multiverse"]
    pos, allowed = faithful_multiverse(mv_nested_ids(tok), format_tag_ids(MULTIVERSE, tok))
    # TU:217-219 each <Path> shifts the suffix to pos(</Goal>)+1 (the "\n" before it keeps the previous
    # position + 1); TU:230-233 <Conclusion> = g + longest + 1
    assert pos == [0, 1, 2, 3, 4, 5, 6, 7, 8,
                   9, 9, 10, 11, 12, 13, 14, 15,
                   16, 16, 17, 18,
                   19, 16, 17, 18, 19,
                   20, 20, 21, 22, 23, 24, 25,
                   26, 9, 10, 11, 12, 13, 14,
                   15, 26, 27, 28, 29, 30, 31]
    # the spans are <Path>..</Path>: the "\n" leads before them are not isolated
    assert forbidden_pairs(allowed) == rect(range(22, 26), range(18, 21)) | rect(range(34, 40), range(10, 33))
    with pytest.raises(ValueError):  # TU:169-173
        faithful_multiverse(mv_nested_ids(tok)[:-3], format_tag_ids(MULTIVERSE, tok))


def npr_ids(tok) -> list[int]:
    """An NPR transcript; ``<eos>`` (index 2) stands for the ``<|im_end|>`` that ends the user turn."""
    return one_token_ids(tok, [
        "u", "<guideline>", "<eos>",  # 0-2 the user turn (parsing starts after the first end marker)
        "<guideline>", "<plan>", "1", ":", "</plan>", "</guideline>",  # 3-8, trigger at 8
        "\n", "<step>", "\n", "1", ":", "a", "</step>",  # 9-15
        "\n", "<step>", "b", "b", "b", "</step>",  # 16-21
        "\n", "<takeaway>", "\n", "t", "</takeaway>", "<eos>",  # 22-27
    ])


def test_faithful_npr(tiny):
    _, tok = tiny["npr"]
    ids, tags = npr_ids(tok), format_tag_ids(NPR, tok)
    pos, allowed = faithful_npr(ids, tags, tok.eos_token_id)
    assert pos == list(range(10)) + list(range(9, 16)) + list(range(9, 20))
    assert forbidden_pairs(allowed) == rect(range(17, 22), range(10, 16))
    with pytest.raises(ValueError):  # no end-of-user-turn marker (NTU:119, list.index)
        faithful_npr(ids[3:-1], tags, tok.eos_token_id)
    nested = ids[:14] + one_token_ids(tok, ["<guideline>"]) + ids[14:]
    with pytest.raises(ValueError):  # NTU:125-129: no nesting
        faithful_npr(nested, tags, tok.eos_token_id)


# ------------------------------------------------------------------------------------------ corrected layout
def test_corrected_parallel_r1(tiny):
    _, tok = tiny["parallel-r1"]
    ids = one_token_ids(tok, ["p", "<Parallel>", "q",  # 0-2 prompt (its tag is text)
                              "a", "<Parallel>",  # 3-4, trigger at 4
                              "\n", "<Path>", "x", "y", "</Path>",  # 5-9 path 1
                              "\n", "<Path>", "<Parallel>", "</Path>",  # 10-13 path 2 (a trigger in a path is text)
                              "\n", "</Parallel>", "\n", "<Summary>", "s", "</Summary>", "<eos>"])  # 14-20 join
    pos, allowed = corrected_layout(PARALLEL_R1_SPEC, ids, 3, tok)
    assert pos == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 5, 6, 7, 8, 10, 11, 12, 13, 14, 15, 16]
    assert forbidden_pairs(allowed) == rect(range(10, 14), range(5, 10))


def test_corrected_parallel_r1_reads_the_format(tiny):
    """The same shape from the live format's fields (whatever its lead and separator are now)."""
    _, tok = tiny["parallel-r1"]
    fmt = PARALLEL_R1

    def enc(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    prompt, head = enc("p q"), enc("a") + enc(fmt.trigger)
    path1 = enc(fmt.start_text("")) + enc("x y") + enc(fmt.path_close)
    path2 = enc(fmt.start_text("")) + enc("z") + enc(fmt.path_close)
    join = enc(fmt.separator + fmt.join) + enc("s") + [tok.eos_token_id]
    ids = prompt + head + path1 + path2 + join
    pos, allowed = corrected_layout(fmt, ids, len(prompt), tok)
    t = len(prompt) + len(head) - 1
    assert pos[:t + 1] == list(range(t + 1))
    assert pos[t + 1:t + 1 + len(path1)] == list(range(t + 1, t + 1 + len(path1)))
    at = t + 1 + len(path1)
    assert pos[at:at + len(path2)] == list(range(t + 1, t + 1 + len(path2)))
    at += len(path2)
    assert pos[at:] == list(range(t + 1 + len(path1), t + 1 + len(path1) + len(join)))
    assert forbidden_pairs(allowed) == rect(range(t + 1 + len(path1), at), range(t + 1, t + 1 + len(path1)))
    with pytest.raises(ValueError):  # no join after the last path
        corrected_layout(fmt, prompt + head + path1 + enc("s"), len(prompt), tok)


def test_corrected_multiverse_nested(tiny):
    _, tok = tiny["multiverse"]
    pos, allowed = corrected_layout(MULTIVERSE, mv_nested_ids(tok), 2, tok)
    assert pos == [0, 1, 2, 3, 4, 5, 6, 7, 8,  # trigger </Goal> at 8
                   9, 10, 11, 12, 13, 14, 15, 16,  # path A from 9; nested trigger at 16
                   17, 18, 19, 20,  # A1 from 17
                   17, 18, 19, 20, 21,  # A2 from 17 (the longer one)
                   22, 23, 24, 25, 26, 27, 28,  # nested join at 21 + 1, path A goes on, its </Path> at 28
                   9, 10, 11, 12, 13, 14, 15,  # path B from 9
                   29, 30, 31, 32, 33, 34, 35]  # join at 28 + 1
    assert forbidden_pairs(allowed) == rect(range(21, 26), range(17, 21)) | rect(range(33, 40), range(9, 33))


def test_corrected_npr(tiny):
    _, tok = tiny["npr"]
    pos, allowed = corrected_layout(NPR, npr_ids(tok), 3, tok)
    assert pos == list(range(16)) + list(range(9, 15)) + list(range(16, 22))
    assert forbidden_pairs(allowed) == rect(range(16, 22), range(9, 16))


# ------------------------------------------------------------------------------------------ forwards
def test_dense_logits_match_visible_subsequences(tiny):
    model, tok = tiny["multiverse"]
    ids = mv_nested_ids(tok)
    pos, allowed = corrected_layout(MULTIVERSE, ids, 2, tok)
    dense = dense_logits(model, ids, pos, allowed)
    queries = list(range(len(ids)))
    alone = visible_subsequence_logits(model, ids, pos, allowed, queries)
    assert torch.allclose(dense[queries], alone, atol=1e-5, rtol=0)
    # and the layout matters: the same tokens under a plain causal mask give other logits in path B
    causal = dense_logits(model, ids, list(range(len(ids))), torch.tril(torch.ones_like(allowed)))
    assert not torch.allclose(dense[33:40], causal[33:40], atol=1e-3)
