"""Forks the model triggers (Parallel-R1, Multiverse, NPR): the engine's control flow against
transcripts derived by hand from each released engine's code, tree by tree.

Every case forces each thread's tokens (a :class:`ForkScript`, keyed by the thread's place in
the tree: ``root#0`` the main line until its first join, ``root#1`` after it, ``root/1.2#0``
path 2 of the main line's first fork...). Each scripted word is one token, as in the derivations;
``[[...]]`` marks what the engine wrote. The code each expectation follows is cited in
``shared/reference/parallel-formats.md`` (files and lines of the three repositories):

* Parallel-R1: ``parallel_thinking_loop_v3.py`` (LOOP), its rollout loop;
* Multiverse: the SGLang fork's ``schedule_batch.py`` (SB) ``check_finished`` and
  ``filter_batch``, and ``scheduler.py`` (SCH) ``merge``;
* NPR: the same files of its vendored SGLang.
"""

from __future__ import annotations

import dataclasses
import re

from pathlib import Path

import pytest
import torch
import yaml

from lm_eval_parathinker import formats
from lm_eval_parathinker.engine import forks, sampling
from lm_eval_parathinker.engine.generate import ParaThinkerEngine
from tiny import save_tiny_format_checkpoint, tiny_format_model, tiny_model, tiny_tokenizer

WORDS = ["A", "B", "a", "b", "c", "p", "q", "r", "s", "t", "u", "v", "w", "x", "y", "z", "foo", "Final", "Answer",
         ":", ".", "1", "2", "3", "5", "6", "7", "\\boxed{5}", *(f"x{i}" for i in range(1, 80)),
         *(f"z{i}" for i in range(1, 600)), *(f"p{i}" for i in range(1, 13)), *(f"t{i}" for i in range(1, 5))]
NL = "\n"


class ForkScript:
    """Stands in for ``engine.sampling.sample``: thread ``key`` (after ``joins`` joins, "root#1")
    draws its scripted tokens in order; a draw nobody scripted is an error naming its stream."""

    def __init__(self, tokenizer, scripts: dict[str, str]):
        self.by_stream = {}
        for name, text in scripts.items():
            key, joins = name.rsplit("#", 1)
            self.by_stream[forks.stream(key, int(joins))] = (name, [token_id(tokenizer, w) for w in words(text)])

    def __call__(self, logits: torch.Tensor, params, draw: sampling.Draw) -> torch.Tensor:
        out = []
        for stream, index in zip(draw.path[:, 0].tolist(), draw.index[:, 0].tolist()):
            name, tokens = self.by_stream.get(stream, ("?", []))
            assert index < len(tokens), f"unscripted draw {index} of {name} (stream {stream})"
            out.append([tokens[index]])
        return torch.tensor(out)


def words(text: str) -> list[str]:
    return [NL if w == "\\n" else w for w in text.split()]


def token_id(tokenizer, word: str) -> int:
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, f"{word!r} is {len(ids)} tokens"
    return ids[0]


@pytest.fixture(scope="module")
def models():
    """A tiny model and tokenizer per format: the format's tags special tokens, each scripted word one token."""
    built = {}
    for fmt in formats.FORMATS.values():
        tok = tiny_tokenizer()
        tok.add_special_tokens({"additional_special_tokens": list(fmt.tokens)})
        tok.add_tokens(WORDS)
        built[fmt.name] = (tiny_model(vocab_size=len(tok)), tok)
    return built


def run(models, monkeypatch, name: str, scripts: dict[str, str], compat: str = "official", **settings):
    model, tok = models[name]
    monkeypatch.setattr(sampling, "sample", ForkScript(tok, scripts))
    engine = ParaThinkerEngine(model, tok, compile=False)
    settings = {"max_new_tokens": 200, **settings}
    out = engine.generate(["Find the number of ways."], format=name, compat=compat, attention="sdpa", **settings)[0]
    return render(tok, out.path_ids[0], out.engine_written), out


def render(tok, ids: list[int], written: list[bool]) -> str:
    """The response, engine-written runs in [[...]]."""
    text, inside = "", False
    for token, mark in zip(ids, written):
        if mark != inside:
            text += "[[" if mark else "]]"
            inside = mark
        text += tok.decode([token])
    return text + ("]]" if inside else "")


# -- Parallel-R1: LOOP, both layouts (they differ in positions and KV, not in control flow) ------

PR1_BLOCK = {"root#0": "A <Parallel>", "root/1.1#0": "x </Path>", "root/1.2#0": "y </Path>"}
PR1_DONE = "A<Parallel>[[<Path>]]x</Path>[[<Path>]]y</Path>[[</Parallel>\n<Summary>]]"
PR1_CASES = {
    # L256-262 stop main#0 at <Parallel>; L263 lets it fork; L334-355 open each path with <Path>
    # (the model writes </Path>); L386-397 write </Parallel>\n<Summary>; the summary ends at the
    # model's </Summary>; the main line resumes and ends at EOS, which stays (L263).
    "simple fork": (dict(PR1_BLOCK, **{"root#1": "s </Summary> Final Answer : 3 <eos>"}), {},
                    PR1_DONE + "s</Summary>FinalAnswer:3<eos>"),
    # the same twice (L275-279: it=2 < 4)
    "two blocks": (dict(PR1_BLOCK, **{"root#1": "s </Summary> B <Parallel>", "root/2.1#0": "u </Path>",
                                      "root/2.2#0": "v </Path>", "root#2": "t </Summary> Final Answer : 3 <eos>"}), {},
                   PR1_DONE + "s</Summary>B<Parallel>[[<Path>]]u</Path>[[<Path>]]v</Path>"
                   "[[</Parallel>\n<Summary>]]t</Summary>FinalAnswer:3<eos>"),
    # L278: the fourth block's </Summary> ends the rollout (max_iterations_for_parallel_thinking=4)
    "fork limit": ({"root#0": "A <Parallel>", **{f"root/{i}.{k}#0": "x </Path>" for i in range(1, 5) for k in (1, 2)},
                    **{f"root#{i}": "s </Summary> A <Parallel>" for i in range(1, 4)},
                    "root#4": "s </Summary> Final Answer : 3 <eos>"}, {},
                   ("A<Parallel>[[<Path>]]x</Path>[[<Path>]]x</Path>[[</Parallel>\n<Summary>]]s</Summary>" * 4)),
    # L263: should_stop() (10 >= R) before check_parallel: a <Parallel> on the budget's last token
    "refused at the budget": ({"root#0": "a b c p q r s t u <Parallel>"}, {"max_new_tokens": 10},
                              "abcpqrstu<Parallel>"),
    # L336: a path stops at </Path> or EOS only; <Parallel> inside it is text (no nesting)
    "trigger inside a path": (dict(PR1_BLOCK, **{"root/1.1#0": "x <Parallel> z </Path>",
                                                 "root#1": "s </Summary> Final Answer : 3 <eos>"}), {},
                              "A<Parallel>[[<Path>]]x<Parallel>z</Path>[[<Path>]]y</Path>[[</Parallel>\n<Summary>]]"
                              "s</Summary>FinalAnswer:3<eos>"),
    # the response (paths included) is cut to R (L290-299): path 1 runs past it, nothing after shows
    "budget ends inside a path": ({"root#0": "A <Parallel>", "root/1.1#0": " ".join(f"p{i}" for i in range(1, 13)),
                                   "root/1.2#0": "q </Path>"}, {"max_new_tokens": 10},
                                  "A<Parallel>[[<Path>]]p1p2p3p4p5p6p7",
                                  "A<Parallel>[[\n<Path>]]p1p2p3p4p5p6"),  # paper: the lead newline is a token
    # L349-351: a path's EOS becomes </Path>; L410-413: the summary's becomes </Summary> and the
    # main loop goes on (L278 does not stop it)
    "EOS in a path and in the summary": (dict(PR1_BLOCK, **{"root/1.1#0": "x <eos>",
                                                            "root#1": "s <eos> Final Answer : 3 <eos>"}), {},
                                         "A<Parallel>[[<Path>]]x[[</Path><Path>]]y</Path>[[</Parallel>\n<Summary>]]"
                                         "s[[</Summary>]]FinalAnswer:3<eos>"),
}



def paper_text(official: str) -> str:
    """A rollout's text as the paper layout writes it: each path opened by a newline and <Path>,
    the join after a newline (the training data's separators), where the rollout writes the tags
    back to back."""
    return (official.replace("[[<Path>]]", "[[\n<Path>]]").replace("[[</Path><Path>]]", "[[</Path>\n<Path>]]")
            .replace("[[</Parallel>\n<Summary>]]", "[[\n</Parallel>\n<Summary>]]"))


@pytest.mark.parametrize("compat", ["official", "paper"])
@pytest.mark.parametrize("case", PR1_CASES)
def test_parallel_r1_scripted(models, monkeypatch, case, compat):
    scripts, settings, expected, *paper = PR1_CASES[case]
    if compat == "paper":
        expected = paper[0] if paper else paper_text(expected)
    text, out = run(models, monkeypatch, "parallel-r1", scripts, compat, **settings)
    assert text == expected
    assert out.stats["forks"] == expected.count("<Parallel>[[")  # each fork opens its first path at once


def test_parallel_r1_path_cap(models, monkeypatch):
    """L346-347 truncate a path at max_path_response_length and L352-353 append </Path> (a cap of 3 here)."""
    capped = dataclasses.replace(formats.PARALLEL_R1, path_token_cap=3)
    monkeypatch.setitem(formats.FORMATS, "parallel-r1", capped)
    text, _ = run(models, monkeypatch, "parallel-r1", dict(PR1_BLOCK, **{
        "root/1.1#0": "p1 p2 p3 p4 </Path>", "root#1": "s </Summary> Final Answer : 3 <eos>"}))
    assert text == ("A<Parallel>[[<Path>]]p1p2p3[[</Path><Path>]]y</Path>[[</Parallel>\n<Summary>]]"
                    "s</Summary>FinalAnswer:3<eos>")


# -- Multiverse: SB check_finished / filter_batch, SCH merge ---------------------------------

MV_B2 = "<Parallel> \\n <Goal> \\n <Outline> 1 : a </Outline> \\n <Outline> 2 : b </Outline> \\n </Goal>"
MV_B2_TEXT = "<Parallel>\n<Goal>\n<Outline>1:a</Outline>\n<Outline>2:b</Outline>\n</Goal>"
MV_END = "z </Conclusion> \\n </Parallel> \\n Answer : 5 <eos>"
MV_ONE = {"root#0": MV_B2 + " \\n", "root/1.1#0": "x </Path> \\n <Path>", "root/1.2#0": "y </Path> \\n <Conclusion>",
          "root#1": MV_END}
MV_ONE_TEXT = MV_B2_TEXT + "[[\n<Path>\n1:]]x</Path>\n[[<Path>\n2:]]y</Path>\n[[<Conclusion>\n]]z</Conclusion>\n</Parallel>\nAnswer:5"
MV_CASES = {
    # SB:697-708: </Goal> and one lookahead (\n, dropped) finish GOAL; SB:1558-1571 count the
    # outlines after the last <Goal>: 2 paths, each "\n<Path>\n{N}:" at the parent's position; a
    # path's </Path> plus two lookaheads (SB:709-713) ends it, the first kept, the second dropped;
    # the merge (SCH:1536-1577) drops path 2's leading \n and writes "<Conclusion>\n"; the final
    # EOS is trimmed from the text (DET:110-131, no_stop_trim unset in the example).
    "simple fork": (MV_ONE, {}, MV_ONE_TEXT),
    # SB:1560 rfind picks the second block's <Goal>
    "two blocks": (dict(MV_ONE, **{"root#1": "z </Conclusion> \\n </Parallel> \\n <Parallel> \\n <Goal> \\n <Outline> 1 : c "
                                             "</Outline> \\n </Goal> \\n",
                                   "root/2.1#0": "w </Path> \\n <Conclusion>",
                                   "root#2": "v </Conclusion> \\n </Parallel> \\n Answer : 5 <eos>"}), {},
                   MV_B2_TEXT + "[[\n<Path>\n1:]]x</Path>\n[[<Path>\n2:]]y</Path>\n[[<Conclusion>\n]]z</Conclusion>\n"
                   "</Parallel>\n<Parallel>\n<Goal>\n<Outline>1:c</Outline>\n</Goal>[[\n<Path>\n1:]]w</Path>\n"
                   "[[<Conclusion>\n]]v</Conclusion>\n</Parallel>\nAnswer:5"),
    # SB:1540-1541: depth 1 <= 5 forks again inside path 1; its paths merge into path 1
    # (SCH:1579-1601), which then ends with </Path> + 2 and merges into the root
    "nested fork": (dict(MV_ONE, **{
        "root/1.1#0": "x \\n <Parallel> \\n <Goal> \\n <Outline> 1 . 1 : p </Outline> \\n <Outline> 1 . 2 : q </Outline> "
                      "\\n </Goal> \\n",
        "root/1.1/1.1#0": "u </Path> \\n <Path>", "root/1.1/1.2#0": "v </Path> \\n <Conclusion>",
        "root/1.1#1": "r </Conclusion> \\n </Parallel> \\n </Path> \\n <Path>"}), {},
        MV_B2_TEXT + "[[\n<Path>\n1:]]x\n<Parallel>\n<Goal>\n<Outline>1.1:p</Outline>\n<Outline>1.2:q</Outline>\n"
        "</Goal>[[\n<Path>\n1.1:]]u</Path>\n[[<Path>\n1.2:]]v</Path>\n[[<Conclusion>\n]]r</Conclusion>\n</Parallel>\n"
        "</Path>\n[[<Path>\n2:]]y</Path>\n[[<Conclusion>\n]]z</Conclusion>\n</Parallel>\nAnswer:5"),
    # SB:1568-1569 keep every match as written: labels are copied, not renumbered (3 paths)
    "repeated labels": ({"root#0": "<Parallel> \\n <Goal> <Outline> 1 : a </Outline> <Outline> 1 : b </Outline> "
                                   "<Outline> 7 : c </Outline> </Goal> \\n",
                         "root/1.1#0": "x </Path> \\n <Path>", "root/1.2#0": "y </Path> \\n <Path>",
                         "root/1.3#0": "w </Path> \\n <Conclusion>", "root#1": "z <eos>"}, {},
                        "<Parallel>\n<Goal><Outline>1:a</Outline><Outline>1:b</Outline><Outline>7:c</Outline></Goal>"
                        "[[\n<Path>\n1:]]x</Path>\n[[<Path>\n1:]]y</Path>\n[[<Path>\n7:]]w</Path>\n[[<Conclusion>\n]]z"),
    # A count of 0: the released scheduler crashes (SB:1605 zombie with no children, SCH:1330-1397
    # UnboundLocalError). Here the fork is refused as SB:1543-1552 refuses one: the lookahead
    # stays and decoding goes on.
    "no outline": ({"root#0": "<Parallel> \\n <Goal> \\n foo \\n </Goal> \\n A <eos>"}, {},
                   "<Parallel>\n<Goal>\nfoo\n</Goal>\nA"),
    # Past max_paths (3 outlines, max_paths=2): refused the same way
    "more paths than max_paths": ({"root#0": "<Parallel> \\n <Goal> <Outline> 1 : a </Outline> <Outline> 2 : b </Outline> "
                                             "<Outline> 3 : c </Outline> </Goal> \\n A <eos>"}, {"max_paths": 2},
                                  "<Parallel>\n<Goal><Outline>1:a</Outline><Outline>2:b</Outline><Outline>3:c</Outline>"
                                  "</Goal>\nA"),
    # SB:1540: 17 >= 40 - 30 refuses the fork (lookahead kept); the root's </Path> + 2 lookaheads
    # finish PATH (SB:712-713), the second trimmed from the text
    "refused at the budget": ({"root#0": MV_B2 + " \\n <Path> \\n 1 : x </Path> \\n <Path>"}, {"max_new_tokens": 40},
                              MV_B2_TEXT + "\n<Path>\n1:x</Path>\n"),
    # SB:685-689: rmp - init >= 60 - 1 at x38 (22 + 37 = 59): path 1 ends, x38 dropped at the merge;
    # <Conclusion>\n at 59-60, then t1 at 61 ends the root (LENGTH: kept in the text)
    "budget ends inside a path": ({"root#0": MV_B2 + " \\n", "root/1.1#0": " ".join(f"x{i}" for i in range(1, 60)),
                                   "root/1.2#0": "y </Path> \\n <Conclusion>", "root#1": "t1 t2 t3"},
                                  {"max_new_tokens": 60},
                                  MV_B2_TEXT + "[[\n<Path>\n1:]]" + "".join(f"x{i}" for i in range(1, 38))
                                  + "[[<Path>\n2:]]y</Path>\n[[<Conclusion>\n]]t1"),
    # SB:720-730: EOS ends path 1 (dropped at the merge, no </Path>); path 2's EOS right after its
    # </Path> is a lookahead (SB:703-719 return before the EOS check): kept in the text
    "EOS in a path": (dict(MV_ONE, **{"root/1.1#0": "x <eos>", "root/1.2#0": "y </Path> <eos> <Conclusion>"}), {},
                      MV_B2_TEXT + "[[\n<Path>\n1:]]x[[<Path>\n2:]]y</Path><eos>[[<Conclusion>\n]]z</Conclusion>\n"
                      "</Parallel>\nAnswer:5"),
}


@pytest.mark.parametrize("case", MV_CASES)
def test_multiverse_scripted(models, monkeypatch, case):
    scripts, settings, expected = MV_CASES[case]
    text, _ = run(models, monkeypatch, "multiverse", scripts, **settings)
    assert text == expected


# -- NPR: its vendored SGLang (SB, SCH as for Multiverse, with NPR's changes) ----------------

NPR_G2 = "<guideline> \\n <plan> 1 : a </plan> \\n <plan> 2 : b </plan> \\n </guideline>"
NPR_G2_TEXT = "<guideline>\n<plan>1:a</plan>\n<plan>2:b</plan>\n</guideline>"
NPR_ONE = {"root#0": NPR_G2 + " \\n", "root/1.1#0": "x </step> \\n <step>", "root/1.2#0": "y </step> \\n <takeaway>",
           "root#1": "z </takeaway> \\n \\boxed{5} <eos>"}
NPR_ONE_TEXT = NPR_G2_TEXT + "[[\n<step>\n1:]]x</step>\n[[<step>\n2:]]y</step>\n[[<takeaway>\n]]z</takeaway>\n\\boxed{5}<eos>"
NPR_CASES = {
    # SB:709-741: </guideline> + one lookahead, <guideline> in the request's own output and no
    # </step>: 2 plans fork; paths end as Multiverse's; SCH:1609 writes "<takeaway>\n"; nothing
    # is trimmed (no_stop_trim=True in the rollout and the evaluation): the EOS stays
    "simple fork": (NPR_ONE, {}, NPR_ONE_TEXT),
    # the merged request's output starts empty (SCH:1614-1636), so a second block forks again
    "two blocks": (dict(NPR_ONE, **{"root#1": "z </takeaway> \\n <guideline> \\n <plan> 1 : c </plan> \\n </guideline> \\n",
                                    "root/2.1#0": "w </step> \\n <takeaway>", "root#2": "v </takeaway> \\n \\boxed{5} <eos>"}),
                   {}, NPR_G2_TEXT + "[[\n<step>\n1:]]x</step>\n[[<step>\n2:]]y</step>\n[[<takeaway>\n]]z</takeaway>\n"
                   "<guideline>\n<plan>1:c</plan>\n</guideline>[[\n<step>\n1:]]w</step>\n[[<takeaway>\n]]v</takeaway>\n"
                   "\\boxed{5}<eos>"),
    # SB:735-739: 6 plans (over 5) finish MATCHED_TOKEN: the response ends, lookahead kept
    "six plans": ({"root#0": "<guideline> " + " ".join(f"<plan> {k} : a </plan>" for k in (1, 2, 3, 5, 6, 7))
                   + " </guideline> \\n"}, {},
                  "<guideline>" + "".join(f"<plan>{k}:a</plan>" for k in (1, 2, 3, 5, 6, 7)) + "</guideline>\n"),
    # 0 plans: the same
    "no plan": ({"root#0": "<guideline> \\n foo \\n </guideline> \\n"}, {}, "<guideline>\nfoo\n</guideline>\n"),
    # SB:1586: 15 >= 1030 - 1024 refuses the fork; the later </step> + 1 lookahead ends the
    # response (SB:745-747: </guideline> is in its output)
    "refused at the budget": ({"root#0": NPR_G2 + " \\n <step> \\n 1 : x </step> \\n"}, {"max_new_tokens": 1030},
                              NPR_G2_TEXT + "\n<step>\n1:x</step>\n"),
    # SB:693-697: (15 + 5) + 2 j >= 1200 - 128 at j = 526 ends path 1 (x526 dropped); the merged
    # request holds 15 + 530 + 7 + 2 = 554 response tokens and ends 518 tokens later (z518 kept)
    "budget ends inside a step": ({"root#0": NPR_G2 + " \\n", "root/1.1#0": " ".join(f"z{i}" for i in range(1, 560)),
                                   "root/1.2#0": "y </step> \\n <takeaway>",
                                   "root#1": " ".join(f"z{i}" for i in range(1, 560))}, {"max_new_tokens": 1200},
                                  NPR_G2_TEXT + "[[\n<step>\n1:]]" + "".join(f"z{i}" for i in range(1, 526))
                                  + "[[<step>\n2:]]y</step>\n[[<takeaway>\n]]" + "".join(f"z{i}" for i in range(1, 519))),
    # SB:761-771: EOS ends step 1 (dropped at the merge, no </step>)
    "EOS in a step": (dict(NPR_ONE, **{"root/1.1#0": "x <eos>"}), {},
                      NPR_G2_TEXT + "[[\n<step>\n1:]]x[[<step>\n2:]]y</step>\n[[<takeaway>\n]]z</takeaway>\n\\boxed{5}<eos>"),
    # the engine nests (depth 1 <= 5; training does not): path 1 forks on its own <guideline>
    "nested": (dict(NPR_ONE, **{"root/1.1#0": "x \\n <guideline> \\n <plan> 1 : p </plan> \\n </guideline> \\n",
                                "root/1.1/1.1#0": "u </step> \\n <takeaway>",
                                "root/1.1#1": "r </takeaway> \\n </step> \\n <step>"}), {},
               NPR_G2_TEXT + "[[\n<step>\n1:]]x\n<guideline>\n<plan>1:p</plan>\n</guideline>[[\n<step>\n1:]]u</step>\n"
               "[[<takeaway>\n]]r</takeaway>\n</step>\n[[<step>\n2:]]y</step>\n[[<takeaway>\n]]z</takeaway>\n\\boxed{5}<eos>"),
}


@pytest.mark.parametrize("case", NPR_CASES)
def test_npr_scripted(models, monkeypatch, case):
    scripts, settings, expected = NPR_CASES[case]
    # NPR forks only with more than 1024 positions left (SB:1586): its released budget is 30000
    text, _ = run(models, monkeypatch, "npr", scripts, **{"max_new_tokens": 3000, **settings})
    assert text == expected


# -- paper layouts: the fork right after the trigger, paths closed by their tag, the engine's separator

PAPER_CASES = {
    "multiverse": ({"root#0": MV_B2, "root/1.1#0": "x </Path>", "root/1.2#0": "y <eos>", "root#1": MV_END},
                   MV_B2_TEXT + "[[\n<Path>\n1:]]x</Path>[[\n<Path>\n2:]]y[[</Path>\n<Conclusion>\n]]z</Conclusion>\n"
                   "</Parallel>\nAnswer:5"),
    "npr": ({"root#0": NPR_G2, "root/1.1#0": "x </step>", "root/1.2#0": "y </step>",
             "root#1": "z </takeaway> \\n \\boxed{5} <eos>"},
            NPR_G2_TEXT + "[[\n<step>\n1:]]x</step>[[\n<step>\n2:]]y</step>[[\n<takeaway>\n]]z</takeaway>\n\\boxed{5}"),
}


@pytest.mark.parametrize("name", PAPER_CASES)
def test_paper_layout_scripted(models, monkeypatch, name):
    """compat=paper writes the training text: each path opened by its separator and tag, closed by
    its own closing tag (EOS becomes it), the join after a separator; no lookahead is read."""
    scripts, expected = PAPER_CASES[name]
    text, out = run(models, monkeypatch, name, scripts, "paper", max_new_tokens=3000)
    assert text == expected
    assert out.stats["forks"] == 1 and out.stats["paths_per_fork"] == [2]


def test_nesting_limit(models, monkeypatch):
    """A fork deeper than the format's limit is refused as the released engine refuses one (SB:1540:
    decoding goes on, the lookahead kept): with the limit at 0, path 1's nested block is text."""
    monkeypatch.setitem(formats.FORMATS, "multiverse", dataclasses.replace(formats.MULTIVERSE, max_depth=0))
    nested = MV_CASES["nested fork"][0]
    text, out = run(models, monkeypatch, "multiverse", dict(nested, **{
        "root/1.1#0": nested["root/1.1#0"] + " r </Path> \\n <Path>"}))
    assert out.stats["forks"] == 1
    assert "</Goal>\nr</Path>\n[[<Path>\n2:]]" in text


# -- the engine's logits against a dense forward built from the format's rules -----------------


def reference_logits(model, out, official: bool, reencode: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(engine, reference) logits of every drawn token of ``out``. The reference is one forward
    over the whole tree (prompt, every path, every re-encoded copy) with positions and a mask
    derived here from the rules: a path starts where its parent stopped and sees its context and
    itself; after a join, every path is seen and positions go on after the longest path; with
    ``official``, an SGLang merge hides the first token of paths 2.. and ``reencode`` (Parallel-R1)
    replaces the paths by a copy at sequential positions from the fork's. Only the tokens and the
    tree's shape are read from the engine."""
    tokens, positions, scopes, hidden, recorded = [], [], [], [], []
    forks_seen = [0]

    def walk(thread, position: int, scope: tuple) -> int:
        reencoded_at = None
        for part in thread.parts:
            if isinstance(part, forks.Segment):
                first = True
                for i, token in enumerate(part.tokens):
                    if reencoded_at is not None and first:
                        position = reencoded_at  # the copy and what follows restart at the fork's position
                        reencoded_at, first = None, False
                    tokens.append(token)
                    positions.append(position)
                    scopes.append(scope)
                    hidden.append(official and not reencode and len(scope) > 0 and scope[-1][1] > 0
                                  and part is thread.parts[0] and i == 0)
                    if i in part.logits:
                        recorded.append((len(tokens) - 1, part.logits[i]))
                    position += 1
            else:
                fork = forks_seen[0]
                forks_seen[0] += 1
                ends = [walk(path, position, scope + ((fork, k, reencode),)) for k, path in enumerate(part.paths)]
                if reencode:
                    reencoded_at = position
                else:
                    position = max(ends)
        return position

    walk(out.root, 0, ())
    n = len(tokens)

    def sees(a: int, b: int) -> bool:
        inside = {f: k for f, k, _ in scopes[a]}
        for f, k, gone in scopes[b]:
            if f in inside:
                if inside[f] != k:
                    return False
            elif gone or (hidden[b] and scopes[b][-1][0] == f):
                return False
        return True

    allowed = torch.tensor([[b <= a and sees(a, b) for b in range(n)] for a in range(n)])
    mask = torch.zeros(n, n).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        logits = model(torch.tensor([tokens]), position_ids=torch.tensor([positions]),
                       attention_mask=mask[None, None]).logits[0]
    index = torch.tensor([i for i, _ in recorded])
    return torch.stack([row for _, row in recorded]), logits[index]


LOGIT_CASES = [
    ("parallel-r1", "official", PR1_CASES["two blocks"][0], {}),
    ("parallel-r1", "paper", PR1_CASES["two blocks"][0], {}),
    ("multiverse", "official", MV_CASES["nested fork"][0], {}),
    ("multiverse", "paper", PAPER_CASES["multiverse"][0], {}),
    ("npr", "official", NPR_CASES["nested"][0], {"max_new_tokens": 3000}),
    ("npr", "paper", PAPER_CASES["npr"][0], {"max_new_tokens": 3000}),
]


@pytest.mark.parametrize("name, compat, scripts, settings", LOGIT_CASES, ids=[f"{c[0]}-{c[1]}" for c in LOGIT_CASES])
def test_logits_equal_a_reference_forward(models, monkeypatch, name, compat, scripts, settings):
    """Every drawn token's logits equal the dense reference forward's: the paths read the prefix's
    pages in place, the join reads the paths' (or, Parallel-R1 official, their re-encoded copy), at
    the format's positions; pages of 4 tokens so that partial pages are read."""
    model, _ = models[name]
    _, out = run(models, monkeypatch, name, scripts, compat, output_logits=True, block_size=4, **settings)
    engine, reference = reference_logits(model, out, official=compat == "official",
                                         reencode=name == "parallel-r1" and compat == "official")
    assert len(engine) >= 10
    torch.testing.assert_close(engine, reference, atol=1e-4, rtol=0)


# -- pages: the prefix shared at a fork, preemption where a tree has no bounded size -----------

LONG_PROMPT = "Find the number of ways. Let x be the answer, so x = 3 + 4 and \\boxed{7}. " * 4


def test_prefix_pages_are_shared_at_a_fork(models, monkeypatch):
    """Pages in use at the peak are within one page per segment of the tokens the tree holds: the
    paths read the prompt's pages, they do not copy them (three copies would not fit the bound)."""
    model, tok = models["multiverse"]
    monkeypatch.setattr(sampling, "sample", ForkScript(tok, MV_CASES["repeated labels"][0]))
    engine = ParaThinkerEngine(model, tok, compile=False)
    (out,) = engine.generate([LONG_PROMPT], format="multiverse", attention="sdpa", block_size=4, max_new_tokens=200)
    segments, held = 0, 0

    def walk(thread):  # every segment the tree holds at its end, the peak (nothing is freed before it)
        nonlocal segments, held
        for part in thread.parts:
            if isinstance(part, forks.Segment):
                segments, held = segments + 1, held + len(part.tokens)
            else:
                for path in part.paths:
                    walk(path)

    walk(out.root)
    peak = engine.last_stats["kv_peak_pages"]
    assert peak <= held / 4 + segments
    prompt_pages = len(out.prompt_ids) // 4
    assert peak + 2 * prompt_pages > held / 4 + segments  # two more copies of the prompt would not fit
    assert out.stats["paths_per_fork"] == [3]


def test_preemption_restarts_a_tree_that_outgrows_the_pool(models, monkeypatch):
    """Multiverse has no bounded worst case: requests are admitted with their prompt's pages and
    preempted when their trees outgrow a small pool; a restarted request ends as it would have,
    every drawn token's logits included."""
    model, tok = models["multiverse"]
    monkeypatch.setattr(sampling, "sample", ForkScript(tok, MV_CASES["nested fork"][0]))
    engine = ParaThinkerEngine(model, tok, compile=False)
    prompts = [LONG_PROMPT[: 40 * k] for k in (1, 2, 3)]
    settings = dict(format="multiverse", attention="sdpa", block_size=4, max_new_tokens=200, output_logits=True)
    roomy = engine.generate(prompts, **settings)
    assert engine.last_stats["preemptions"] == 0
    tight = engine.generate(prompts, num_blocks=60, **settings)
    assert engine.last_stats["preemptions"] > 0
    assert engine.last_stats["kv_peak_pages"] <= 59
    for a, b in zip(roomy, tight):
        assert a.path_ids == b.path_ids
        logits_a, logits_b = (reference_rows(o.root) for o in (a, b))
        torch.testing.assert_close(logits_a, logits_b, atol=1e-5, rtol=0)
    assert sum(o.stats["preemptions"] for o in tight) == engine.last_stats["preemptions"]


def reference_rows(root) -> torch.Tensor:
    """Every recorded logits row of a tree, in tree order."""
    rows = []

    def walk(thread):
        for part in thread.parts:
            if isinstance(part, forks.Segment):
                rows.extend(part.logits[i] for i in sorted(part.logits))
            else:
                for path in part.paths:
                    walk(path)

    walk(root)
    return torch.stack(rows)


# -- lm_eval --model parathinker on a forking format's checkpoint -----------------------------

MATH_TASKS = ["aime24", "aime25", "amc23", "math500"]


@pytest.mark.usefixtures("one_thread_offline")
@pytest.mark.parametrize("name", formats.FORMATS)
def test_lm_eval_runs_a_format_checkpoint_on_the_math_tasks(name, tmp_path):
    """``format=...``: the checkpoint loaded as it is (no <think k>, no thought embeddings), its forks
    in the metrics of all four tasks and in the run's model info; a tiny model made to write the
    format's tags."""
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager

    ckpt = save_tiny_format_checkpoint(tmp_path / name, name, eager=30.0)
    res = simple_evaluate(
        model="parathinker", model_args={"pretrained": str(ckpt), "format": name, "dtype": "float32",
                                         "compat": "paper", "journal_dir": str(tmp_path / "journal")},
        tasks=MATH_TASKS, limit=1, gen_kwargs="max_gen_toks=48,do_sample=True,temperature=0.6", device="cpu",
        batch_size=4, log_samples=True, task_manager=TaskManager(include_defaults=False, metadata={"repeats": 2}),
    )  # fmt: skip
    info = res["config"]["parathinker"]
    assert info["format"] == name and info["compat"] == "paper" and info["control_tokens_added"] == 0
    assert info["thought_embeddings_from"] is None
    assert info["forks"]["format"] == name and info["forks"]["responses"] == 2 * len(MATH_TASKS)
    # the run's means (what lm-eval's own tasks get) agree with the tasks' metrics (2 responses each)
    for key, metric in (("forks_per_response", "forks"), ("critical_tokens", "critical_tokens"),
                        ("total_tokens", "gen_tokens")):
        mean = sum(res["results"][t][f"{metric},all"] for t in MATH_TASKS) / len(MATH_TASKS)
        assert info["forks"][key] == pytest.approx(mean)
    for task in MATH_TASKS:
        metrics = res["results"][task]
        # the budget bounds the longest chain (Multiverse, NPR) or every token (Parallel-R1)
        assert metrics["critical_tokens,all"] <= min(metrics["gen_tokens,all"], 48)
        assert name != "parallel-r1" or metrics["gen_tokens,all"] <= 48
        assert (metrics["forks,all"] > 0) == (metrics["paths_per_fork,all"] > 0)
    if name == "parallel-r1":  # this one forks at once: its tree reaches the metrics
        assert all(res["results"][t]["forks,all"] > 0 and res["results"][t]["paths_per_fork,all"] == 2 for t in MATH_TASKS)


def test_prompts_are_the_formats_own():
    """Each format's user turn, byte for byte: Parallel-R1's v3 template (its released models';
    recovered from its committed test parquets) with the problem in place, Multiverse's training
    suffix (data/tokenization_multiverse.py), NPR's evaluation instruction after the question
    (evals/evaluate.py); the tokenizer's chat template around it, with the generation prompt."""
    problem = "What is 1 + 1?"
    r1 = formats.PARALLEL_R1.user_message(problem)
    assert r1.startswith("Solve the following problem step by step.\nDuring the reasoning process, whenever")
    assert r1.endswith("End your response with a line starting with Final Answer: followed by the final result.\n\n"
                       f"Problem: {problem}")
    assert "parallel thinking\u2014just insert" in r1
    assert formats.MULTIVERSE.user_message(problem) == problem + " Think step by step and in parallel before answering."
    npr = formats.NPR.user_message(problem)
    assert npr.startswith(problem + "\n\nYou must write your answer strictly following the XML-like format")
    assert npr.endswith("Include definitive answers in \\\\boxed{...} format.]")
    tok = tiny_tokenizer()
    assert formats.NPR.build_prompt(problem, tok) == f"user: {npr} assistant: "


def formats_grid(r1: Path, mv: Path) -> dict:
    """An experiment: sequential, majority and Parallel-R1 on one checkpoint, Multiverse on another."""
    sdpa = {"dtype": "float32", "compat": "paper", "attention": "sdpa"}
    runs = [{"checkpoint": "r1", "method": "sequential"}, {"checkpoint": "r1", "method": "majority", "num_paths": 2},
            {"checkpoint": "r1", "format": "parallel-r1"}, {"checkpoint": "mv", "format": "multiverse"}]
    return {"checkpoints": {"r1": {"pretrained": str(r1), **sdpa}, "mv": {"pretrained": str(mv), **sdpa}},
            "tasks": ["aime24"], "limit": 2, "metadata": {"repeats": 2}, "device": "cpu", "batch_size": 2,
            "gen_kwargs": {"do_sample": True, "temperature": 0.6, "seed": 3},
            "sweeps": {"formats": {"kind": "ablations", "runs": [{**run, "max_gen_toks": 24} for run in runs]}}}


@pytest.mark.usefixtures("one_thread_offline")
def test_experiments_compare_two_formats_with_sequential_and_majority(tmp_path):
    """One config: a format is a method of the sweep (its label, its row in the table); every point is
    compared with the first on the same problems."""
    import csv
    import json

    from lm_eval_parathinker import leaderboard
    from lm_eval_parathinker.experiments import config, figures, runner

    path = tmp_path / "formats.yaml"
    path.write_text(yaml.safe_dump(formats_grid(save_tiny_format_checkpoint(tmp_path / "r1", "parallel-r1", eager=30.0),
                                                save_tiny_format_checkpoint(tmp_path / "mv", "multiverse", eager=30.0))))
    experiment = config.load(path, tmp_path / "out")
    runner.run(experiment, report=lambda line: None)
    figures.write(experiment)
    out = experiment.output_path
    assert [p.label for p in experiment.points] == ["sequential", "majority", "parallel-r1", "multiverse"]
    rows = list(csv.DictReader((out / "formats.csv").open()))
    assert [r["method"] for r in rows] == ["sequential", "majority", "parallel-r1", "multiverse"]
    (results,) = leaderboard.find_result_files(experiment.points[2].output_dir)
    assert json.loads(results.read_text())["results"]["aime24"]["forks,all"] > 0
    compared = list(csv.DictReader((out / "formats_comparisons.csv").open()))
    assert [(r["run_a"], r["run_b"], r["problems"]) for r in compared] == [
        (label, "sequential", "2") for label in ("majority", "parallel-r1", "multiverse")]
    table = (out / "formats.md").read_text()
    assert "| parallel-r1 | parallel-r1 |  | 24 |" in table or "| parallel-r1 | parallel-r1 | 2 | 24 |" in table
    assert "| multiverse | multiverse |  | 24 |" in table


# -- bad input ---------------------------------------------------------------------------------


def test_a_format_the_tokenizer_lacks_fails_before_the_weights_load(tmp_path, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    from lm_eval_parathinker.harness.model import ParaThinkerLM

    def no_loading(*args, **kwargs):
        raise AssertionError("the weights were loaded before the missing tokens were reported")

    monkeypatch.setattr(HFLM, "_create_model", no_loading)
    ckpt = save_tiny_format_checkpoint(tmp_path / "r1", "parallel-r1")
    with pytest.raises(ValueError, match=r"format=npr needs the tokens \['<guideline>', '</guideline>', '<plan>'"):
        ParaThinkerLM(pretrained=str(ckpt), device="cpu", dtype="float32", format="npr", resume=False)


@pytest.mark.parametrize("args, message", [
    ({"format": "multiverse", "num_paths": 3}, "num_paths=3 has no meaning with format=multiverse"),
    ({"format": "npr", "method": "majority"}, "format=npr is a way of decoding of its own: it takes no method=majority"),
    ({"format": "parallel-r1", "termination": "last"}, "termination apply to ParaThinker's decoding, not to format=parallel-r1"),
    ({"format": "npr", "summary_kv": "reprefill", "positions": "flattened"}, "summary_kv, positions apply"),
    ({"format": "multiverse", "max_paths": 0}, "max_paths=0 must be at least 1"),
    ({"format": "threadweaver"}, "format='threadweaver' is not one of parathinker, parallel-r1, multiverse, npr"),
])
def test_combinations_that_mean_nothing_are_refused(args, message):
    from lm_eval_parathinker.harness.options import RunOptions

    with pytest.raises(ValueError, match=re.escape(message)):
        RunOptions.parse(**args)


def test_the_lm_eval_model_reads_the_format_from_the_tokenizer():
    """Without a format model arg, method=parathinker decodes in the format the tokenizer's tags name;
    a named format wins; the baselines stay plain."""
    from lm_eval_parathinker.harness.options import RunOptions

    _, npr_tokenizer = tiny_format_model("npr")
    assert RunOptions.parse().resolve(npr_tokenizer).engine.format == "npr"
    assert RunOptions.parse(compat="paper").resolve(npr_tokenizer).fork_format is formats.NPR
    assert RunOptions.parse(method="sequential").resolve(npr_tokenizer).fork_format is None
    with pytest.raises(ValueError, match=r"format=multiverse needs the tokens \['<Think>'"):
        RunOptions.parse(format="multiverse").resolve(npr_tokenizer)
    assert RunOptions.parse().resolve(tiny_tokenizer()).engine.format == "parathinker"


def test_detection_needs_every_token_of_exactly_one_format():
    assert formats.detect_format(set(formats.NPR.tokens)) == "npr"
    assert formats.detect_format(set(formats.PARALLEL_R1.tokens)) == "parallel-r1"
    assert formats.detect_format(set(formats.MULTIVERSE.tokens)) == "multiverse"  # holds <Parallel> and <Path> too
    assert formats.detect_format(set(formats.MULTIVERSE.tokens) | {"<Summary>", "</Summary>"}) == "parathinker"
    assert formats.detect_format(set(formats.NPR.tokens[:-1])) == "parathinker"


def test_stop_strings_end_the_main_line_only(models, monkeypatch):
    """A stop string ends the response where the main line writes it, never inside a path; the lm-eval
    model then cuts the text before it."""
    from lm_eval_parathinker.harness.generator import _without_stop

    scripts = dict(PR1_BLOCK, **{"root/1.1#0": "x Answer y </Path>", "root#1": "s </Summary> z Answer 3 <eos>"})
    text, out = run(models, monkeypatch, "parallel-r1", scripts, stop_strings=["Answer"])
    assert text == "A<Parallel>[[<Path>]]xAnswery</Path>[[<Path>]]y</Path>[[</Parallel>\n<Summary>]]s</Summary>zAnswer"
    assert out.stats["termination"] == forks.STOP
    assert _without_stop(out.transcript, ["Answer"]).endswith("</Summary>z")


def test_a_bounded_format_is_admitted_by_its_worst_case(models, monkeypatch):
    """Parallel-R1's budget bounds every token of a response: a request is admitted only when the pool
    holds its worst case, so a pool for one at a time runs them one after the other, never preempting."""
    model, tok = models["parallel-r1"]
    monkeypatch.setattr(sampling, "sample", ForkScript(tok, PR1_CASES["two blocks"][0]))
    engine = ParaThinkerEngine(model, tok, compile=False)
    prompts = [LONG_PROMPT[:60], LONG_PROMPT[:70]]
    settings = dict(format="parallel-r1", attention="sdpa", block_size=4, max_new_tokens=40)
    roomy = engine.generate(prompts, **settings)
    config = forks.ForkConfig(formats.PARALLEL_R1, True, 40, 8, None, sampling.SamplingParams(), (), None, 2)
    worst = forks.admission_pages(config, max(len(o.prompt_ids) for o in roomy), 4)
    running_at_admission = []
    prefill = forks.ForkScheduler._prefill

    def admit(self, request):
        running_at_admission.append(len(self.running))
        return prefill(self, request)

    monkeypatch.setattr(forks.ForkScheduler, "_prefill", admit)
    one_at_a_time = engine.generate(prompts, num_blocks=worst + 2, **settings)
    assert running_at_admission == [0, 0]  # the second waited for the first to end
    assert engine.last_stats["preemptions"] == 0 and engine.last_stats["kv_peak_pages"] <= worst
    engine.generate(prompts, num_blocks=2 * worst + 1, **settings)
    assert running_at_admission[2:] == [0, 1]  # room for both worst cases: both at once
    assert [o.path_ids for o in one_at_a_time] == [o.path_ids for o in roomy]
    assert all(o.stats["forks"] == 2 for o in roomy)


@pytest.mark.parametrize("name, cases, case, expected", [
    ("parallel-r1", PR1_CASES, "two blocks", 2), ("parallel-r1", PR1_CASES, "budget ends inside a path", 0),
    ("multiverse", MV_CASES, "nested fork", 2), ("multiverse", MV_CASES, "EOS in a path", 0)])
def test_well_formed_forks_count_joined_forks_whose_paths_closed_themselves(models, monkeypatch, name, cases, case,
                                                                             expected):
    """The fraction of responses with a well-formed fork (a metric): every path closed by its own tag
    (not cut by the budget, not ended by EOS where the format keeps it) and the join written."""
    scripts, settings, *_ = cases[case]
    _, out = run(models, monkeypatch, name, scripts, "official", **settings)
    assert forks.well_formed_forks(out.root) == expected
