"""Independent reference layouts (position ids + attention masks) of the three native-parallel formats,
for testing the training code. Nothing here imports ``training/``.

Two kinds:

* ``faithful_*``: line-by-line ports of the authors' SFT code, quirks included, over the whole sequence
  as their code sees it (file:line cited at each step):

  - Parallel-R1, zhengkid/Parallel-R1 @7c3a8f3, ``verl/verl/utils/dataset/parallel_thinking_sft_dataset.py``
    (SFTDS): mask 125-175, positions 297-367, padding/pad masking in ``__getitem__`` 405-430;
  - Multiverse, Infini-AI-Lab/Multiverse @4cbc487, ``train/utils.py`` (TU): mask 59-179, positions 182-253;
  - NPR, bigai-nlco/Native-Parallel-Reasoner @e148ad5, ``npr-beta/train/utils.py`` (NTU): mask 79-311,
    positions 314-396.

* :func:`corrected_layout`: the corrected ("paper"/engine) layout, from the format's fields only.

Every function returns ``(positions: list[int], allowed: torch.BoolTensor [L, L])`` with
``allowed[q, k]`` True when query ``q`` may attend key ``k``. The authors return float masks
(0 / -inf); ``allowed`` is their ``mask == 0``.

:func:`dense_logits` and :func:`visible_subsequence_logits` run a model on such a layout, the second one
query by query on only the tokens that query may see (an independent check of the first).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from lm_eval_parathinker.formats import Format


def _causal(n: int) -> torch.Tensor:
    return torch.tril(torch.ones(n, n, dtype=torch.bool))


def _mask_spans_pairwise(mask: torch.Tensor, spans: list[tuple[int, int]]) -> None:
    """Multiverse TU:127-156 / NPR NTU:239-282: for every pair a<b of half-open spans [start, end),
    mask both directions (``mask[A, B] = mask[B, A] = False``); empty spans are skipped (TU:134,140)."""
    for a in range(len(spans)):
        s_a, e_a = spans[a]
        if s_a >= e_a:
            continue
        for b in range(a + 1, len(spans)):
            s_b, e_b = spans[b]
            if s_b >= e_b:
                continue
            mask[s_a:e_a, s_b:e_b] = False
            mask[s_b:e_b, s_a:e_a] = False


def _shift_suffix(pos: list[int], at: int, value: int) -> None:
    """TU:203-241 / NTU:351-383: ``position_ids[i:] -= position_ids[i] - value``."""
    delta = pos[at] - value
    for j in range(at, len(pos)):
        pos[j] -= delta


def format_tag_ids(fmt: Format, tokenizer) -> dict[str, int]:
    """``{tag: id}`` for every token of ``fmt`` (the ``tag_ids`` argument of the ``faithful_*`` ports), as
    the authors look them up (``convert_tokens_to_ids``, TU:66-69, NTU:107-116; SFTDS:70-75 ``encode(tag)[0]``,
    the same for a special token)."""
    return {tag: tokenizer.convert_tokens_to_ids(tag) for tag in fmt.tokens}


# ----------------------------------------------------------------------------------------------- Parallel-R1
def faithful_parallel_r1(ids: Sequence[int], tag_ids: Mapping[str, int], pad_id: int,
                         sequence_length: int | None = None) -> tuple[list[int], torch.Tensor]:
    """Parallel-R1's SFT layout of a whole (prompt + response [+ pad]) sequence, as ``__getitem__``
    builds it (SFTDS:425-438).

    Mask (``generate_parallel_thinking_reasponse_mask``, SFTDS:125-175): causal; ``<Parallel>`` opens a block
    and forgets the paths collected so far; inside a block a ``<Path>`` scans forward to the first
    ``</Path>`` (or the end) and records the inclusive span; ``</Parallel>`` (not gated on being in a block)
    masks every ordered pair of different recorded spans. Tokens between paths stay causal.

    Positions (``compute_structured_position_ids``, SFTDS:297-367): pad tokens (by id, anywhere) get 0 and
    do not advance the counter; a ``<Parallel>`` takes ``curr`` and scans to the next ``</Parallel>``: each
    ``<Path>``..``</Path>`` gets ``curr+1, curr+2, ...``, every other token of the scan is never written
    (stays 0); ``</Parallel>`` gets ``curr + longest + 1`` with longest = pos(``</Path>``) - curr, and
    ``curr`` jumps by ``longest + 2``. A ``<Path>`` without ``</Path>`` raises IndexError (SFTDS:349,
    ``pos_ids[seq_len]``).

    Padding (SFTDS:405-411, 428-430): rows and columns of the pad tail (indices ``sequence_length`` ..
    end) are set False. ``sequence_length`` is the unpadded length (SFTDS:406); by default ``len(ids)``
    minus the trailing run of ``pad_id`` (pass it explicitly when pad == eos, as the response's EOS would
    otherwise count as padding; its position is 0 either way, SFTDS:311,316).
    """
    seq_len = len(ids)
    p_open, p_close = tag_ids["<Parallel>"], tag_ids["</Parallel>"]
    path_open, path_close = tag_ids["<Path>"], tag_ids["</Path>"]

    # ---- mask, SFTDS:143-175
    mask = _causal(seq_len)  # L144
    path_ranges: list[tuple[int, int]] = []  # L146
    in_parallel = False  # L147
    i = 0
    while i < seq_len:  # L149
        tok = ids[i]  # L150
        if tok == p_open:  # L152-154
            in_parallel = True
            path_ranges = []
        elif in_parallel and tok == path_open:  # L156-163: scan to the first </Path> (or the end)
            path_start = i
            while i < seq_len:
                if ids[i] == path_close:
                    break
                i += 1
            path_ranges.append((path_start, i))  # inclusive span (i == seq_len when unclosed)
        elif tok == p_close:  # L165-171, not gated on in_parallel
            in_parallel = False
            for idx1, (s1, e1) in enumerate(path_ranges):
                for idx2, (s2, e2) in enumerate(path_ranges):
                    if idx1 != idx2:
                        mask[s1:e1 + 1, s2:e2 + 1] = False  # L170
            path_ranges = []
        i += 1  # L173

    # ---- pad tail, SFTDS:406-411 (right padding to max_length) and 428-430
    if sequence_length is None:
        sequence_length = seq_len
        while sequence_length > 0 and ids[sequence_length - 1] == pad_id:
            sequence_length -= 1
    if sequence_length < seq_len:
        mask[:, sequence_length:] = False  # L429
        mask[sequence_length:, :] = False  # L430

    # ---- positions, SFTDS:308-367
    pos = [0] * seq_len  # L310: zero-initialised; tokens never written keep 0
    nonpad = [t != pad_id for t in ids]  # L311
    curr = 0  # L313
    i = 0
    while i < seq_len:  # L315
        if not nonpad[i]:  # L316-318
            i += 1
            continue
        tok = ids[i]
        if tok == p_open:  # L322
            pos[i] = curr  # L323
            i += 1  # L324 (curr not advanced, L325 commented out)
            path_lengths: list[int] = []
            t = i  # L329
            while t < seq_len:  # L332
                if not nonpad[t]:  # L333-335
                    t += 1
                    continue
                if ids[t] == path_open:  # L336
                    local = curr + 1  # L338
                    while t < seq_len:  # L339-347
                        if not nonpad[t]:
                            t += 1
                            continue
                        pos[t] = local
                        if ids[t] == path_close:
                            break
                        local += 1
                        t += 1
                    if t >= seq_len:  # L349: pos_ids[path_end] with path_end == seq_len
                        raise IndexError(f"<Path> at {t} without </Path>: SFTDS:349 indexes pos_ids[{seq_len}]")
                    path_lengths.append(pos[t] - curr)  # L349-350
                elif ids[t] == p_close:  # L353-354
                    break
                t += 1  # L355
            i = t  # L357
            max_path_len = max(path_lengths) if path_lengths else 0  # L358
            if i < seq_len and nonpad[i]:  # L359-361: the </Parallel>
                pos[i] = curr + max_path_len + 1
                curr += max_path_len + 1 + 1
        else:  # L362-364
            pos[i] = curr
            curr += 1
        i += 1  # L365
    return pos, mask


# ----------------------------------------------------------------------------------------------- Multiverse
def faithful_multiverse(ids: Sequence[int], tag_ids: Mapping[str, int]) -> tuple[list[int], torch.Tensor]:
    """Multiverse's SFT layout of a whole sequence (the collator calls both on every example, TU:274-275).

    Mask (``generate_multiverse_attention_mask``, TU:59-179): a stack; ``<Parallel>`` pushes a block,
    ``<Path>`` pushes a path (anywhere), ``</Path>`` pops a path (ValueError if the top is not one, TU:93-94)
    and records ``[<Path>, </Path>]`` in the nearest enclosing block (ValueError if none, TU:105-106);
    ``</Parallel>`` pops a block (ValueError if the top is not one, TU:120-121) and masks its paths pairwise;
    anything left open raises ValueError (TU:169-173).

    Positions (``generate_multiverse_position_ids``, TU:182-253): ``arange``; per ``<Parallel>`` block (a
    stack): ``</Goal>`` after ``<Goal>`` records g = its position; each ``<Path>`` (once g is known) shifts the
    whole suffix so that it sits at g+1; ``</Path>`` keeps longest = max(pos - g); ``<Conclusion>`` shifts
    the suffix to g + longest + 1; ``</Parallel>`` pops. Unclosed blocks only print a warning (TU:244-247).
    """
    seq_len = len(ids)
    par_open, par_close = tag_ids["<Parallel>"], tag_ids["</Parallel>"]
    path_open, path_close = tag_ids["<Path>"], tag_ids["</Path>"]
    goal_open, goal_close = tag_ids["<Goal>"], tag_ids["</Goal>"]
    concl_open, concl_close = tag_ids["<Conclusion>"], tag_ids["</Conclusion>"]

    # ---- mask, TU:60-173
    mask = _causal(seq_len)  # TU:62
    stack: list[dict] = []
    i = 0
    while i < seq_len:  # TU:74
        tok = ids[i]
        if tok == par_open:  # TU:78-81
            stack.append({"type": "parallel", "start": i, "spans": []})
            i += 1
        elif tok == path_open:  # TU:84-87 (no check that a block is open)
            stack.append({"type": "path", "start": i})
            i += 1
        elif tok == path_close:  # TU:90-114
            end = i + 1
            if not stack or stack[-1]["type"] != "path":
                raise ValueError(f"</Path> found at index {i} without a matching <Path> block on stack.")
            path = stack.pop()
            enclosing = next((b for b in reversed(stack) if b["type"] == "parallel"), None)  # TU:99-103
            if enclosing is None:
                raise ValueError(f"Path block ending at {i} is not enclosed within any <Parallel> block.")
            if path["start"] < end:  # TU:110-111
                enclosing["spans"].append((path["start"], end))
            i = end
        elif tok == par_close:  # TU:117-162
            if not stack or stack[-1]["type"] != "parallel":
                raise ValueError(f"</Parallel> found at index {i} without a matching <Parallel> block on stack.")
            _mask_spans_pairwise(mask, stack.pop()["spans"])  # TU:127-156 (no-op for <= 1 path)
            i += 1
        else:
            i += 1  # TU:165
    if stack:  # TU:169-173
        raise ValueError(f"Input sequence ended with unclosed blocks: {[b['type'] for b in stack]}")

    # ---- positions, TU:190-241
    pos = list(range(seq_len))  # TU:190

    blocks: list[dict] = []
    for i, tok in enumerate(ids):  # TU:194-241
        cur = blocks[-1] if blocks else None  # TU:196
        if tok == par_open:  # TU:198-206
            blocks.append({"goal_end": -1, "max_path_len": 0, "in_goal": False, "in_path": False, "in_concl": False})
        elif tok == goal_open and cur:  # TU:208-210
            cur["in_goal"] = True
        elif tok == goal_close and cur and cur["in_goal"]:  # TU:212-215
            cur["goal_end"] = pos[i]
            cur["in_goal"] = False
        elif tok == path_open and cur and cur["goal_end"] != -1:  # TU:217-219
            cur["in_path"] = True
            _shift_suffix(pos, i, cur["goal_end"] + 1)
        elif tok == path_close and cur and cur["in_path"]:  # TU:221-228
            cur["max_path_len"] = max(cur["max_path_len"], pos[i] - cur["goal_end"])
            cur["in_path"] = False
        elif tok == concl_open and cur and cur["goal_end"] != -1:  # TU:230-233
            cur["in_concl"] = True
            _shift_suffix(pos, i, cur["goal_end"] + cur["max_path_len"] + 1)
        elif tok == concl_close and cur and cur["in_concl"]:  # TU:235-236
            cur["in_concl"] = False
        elif tok == par_close and blocks:  # TU:238-239
            blocks.pop()
    # TU:244-247: unclosed blocks only warn (the mask above already raised for them)
    return pos, mask


# ----------------------------------------------------------------------------------------------- NPR
def faithful_npr(ids: Sequence[int], tag_ids: Mapping[str, int], im_end_id: int) -> tuple[list[int], torch.Tensor]:
    """NPR's SFT layout (``construct_parallel_attention_mask`` NTU:79-311, ``construct_parallel_position_ids``
    NTU:314-396); both parse only after the first ``im_end_id`` (NTU:119, 326: ``list.index`` raises
    ValueError when it is absent); tokens up to it are causal with positions ``arange``.

    Mask: ``<guideline>`` opens a block (ValueError when one is open: no nesting, NTU:125-129); ``<plan>`` /
    ``<step>`` must be directly inside a block (ValueError, NTU:143-146); ``</plan>`` / ``</step>`` must close
    the top (ValueError, NTU:162-165, 196-199) and record ``[open, close]`` in the enclosing block; ``<takeaway>``
    must close a block (ValueError, NTU:229-232) and masks its steps pairwise (plans are recorded but unused);
    ``</guideline>`` and ``</takeaway>`` are ordinary tokens; anything left open raises ValueError (NTU:296-301;
    the authors also write ``logs/error-unclosed.log`` there, left out here).

    Positions: ``arange``; ``</guideline>`` of the top block records g; each ``<step>`` (once g is known)
    shifts the suffix to g+1; ``</step>`` keeps longest = max(pos - g); ``<takeaway>`` (once g is known)
    shifts the suffix to g + longest + 1 and pops; a block left on the stack raises ValueError (NTU:388-390).
    """
    seq_len = len(ids)
    ids = list(ids)
    g_open, g_close = tag_ids["<guideline>"], tag_ids["</guideline>"]
    plan_open, plan_close = tag_ids["<plan>"], tag_ids["</plan>"]
    step_open, step_close = tag_ids["<step>"], tag_ids["</step>"]
    take_open = tag_ids["<takeaway>"]
    begin = ids.index(im_end_id) + 1  # NTU:119 and 326 (ValueError when absent)

    # ---- mask, NTU:100-301
    mask = _causal(seq_len)  # NTU:100-102
    stack: list[dict] = []
    i = begin
    while i < seq_len:  # NTU:121
        tok = ids[i]
        if tok == g_open:  # NTU:125-139
            if stack:
                raise ValueError(f"<guideline> found at index {i} while already in a block: {stack[-1]}")
            stack.append({"type": "parallel", "start": i, "steps": [], "plans": []})
            i += 1
        elif tok in (plan_open, step_open):  # NTU:141-155
            if not stack or stack[-1]["type"] != "parallel":
                raise ValueError(f"Found <guideline>, <plan>, or <step> outside of a <takeaway> block at index {i}")
            stack.append({"type": "plan" if tok == plan_open else "step", "start": i})
            i += 1
        elif tok in (plan_close, step_close):  # NTU:158-189 (</plan>), 192-224 (</step>)
            kind = "plan" if tok == plan_close else "step"
            end = i + 1
            if not stack or stack[-1]["type"] != kind:
                raise ValueError(f"</{kind}> found at index {i} without a matching <{kind}> block on stack.")
            block = stack.pop()
            enclosing = next((b for b in reversed(stack) if b["type"] == "parallel"), None)
            if enclosing is None:
                raise ValueError(f"{kind} block ending at {i} is not enclosed within any parallel block.")
            if block["start"] < end:
                enclosing["plans" if kind == "plan" else "steps"].append((block["start"], end))
            i = end
        elif tok == take_open:  # NTU:226-288
            if not stack or stack[-1]["type"] != "parallel":
                raise ValueError(f"Parallel block found at index {i} without a matching parallel block.")
            _mask_spans_pairwise(mask, stack.pop()["steps"])  # NTU:239-282 (no-op for <= 1 step)
            i += 1
        else:  # NTU:289-294 (</guideline> and everything else)
            i += 1
    if stack:  # NTU:296-301
        raise ValueError(f"Input sequence ended with unclosed blocks: {[b['type'] for b in stack]}")

    # ---- positions, NTU:323-390
    pos = list(range(seq_len))  # NTU:323

    blocks: list[dict] = []
    i = begin  # NTU:326
    while i < seq_len:  # NTU:327
        tok = ids[i]
        cur = blocks[-1] if blocks else {}  # NTU:329
        if tok == g_open:  # NTU:331-343
            blocks.append({"g_end": -1, "max_step_len": 0, "in_guideline": True, "in_step": False})
        elif tok == g_close and cur and cur["in_guideline"]:  # NTU:344-350
            cur["g_end"] = pos[i]
            cur["in_guideline"] = False
        elif tok == step_open and cur and cur["g_end"] != -1:  # NTU:351-359
            cur["in_step"] = True
            _shift_suffix(pos, i, cur["g_end"] + 1)
        elif tok == step_close and cur and cur["in_step"]:  # NTU:360-371
            cur["max_step_len"] = max(cur["max_step_len"], pos[i] - cur["g_end"])
            cur["in_step"] = False
        elif tok == take_open and cur and cur["g_end"] != -1:  # NTU:373-383
            _shift_suffix(pos, i, cur["g_end"] + cur["max_step_len"] + 1)
            blocks.pop()
        i += 1
    if blocks:  # NTU:388-390
        raise ValueError("Input sequence ended with unclosed execution blocks.")
    return pos, mask


# ----------------------------------------------------------------------------------------------- corrected
def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def corrected_layout(fmt: Format, ids: Sequence[int], prompt_len: int, tokenizer,
                     check_join: bool = True) -> tuple[list[int], torch.Tensor]:
    """The corrected (paper / engine) layout of ``prompt + response``, from the format's fields only.

    * The prompt (``ids[:prompt_len]``): positions ``0..prompt_len-1``, causal, never parsed.
    * The response is scanned left to right with an explicit stack of open forks. The format's trigger
      (``fmt.trigger``) written by the main line, or by a path nested less than ``fmt.max_depth`` forks deep
      (the engine's ``thread.depth <= max_depth``; Parallel-R1: 0, so a trigger in a path is text), opens a
      fork: path 1 starts right after the trigger; a path ends at its own ``fmt.path_close`` (inclusive);
      when the next format tag after that close is the path-opening tag (``fmt.path_start``'s tag) another
      path of the same fork starts right after the close, else the fork ends and the join
      (``tokenizer(fmt.separator + fmt.join)``, checked when ``check_join``) and what follows belong to the
      enclosing line again.
    * Positions: trigger at t; each path starts at t+1 and runs consecutively (a nested fork inside it
      follows the same rules, the path continuing after the nested join); the join starts at 1 + the
      largest position of any token inside the fork (nested forks included); then consecutive.
    * Mask: ``allowed[q, k]`` iff ``k <= q`` and no fork has q and k in different paths.

    A response cut off inside a fork keeps the layout of the tokens it has.
    """
    ids = list(ids)
    n = len(ids)
    trigger = tokenizer.convert_tokens_to_ids(fmt.trigger)
    close = tokenizer.convert_tokens_to_ids(fmt.path_close)
    opener_tags = [t for t in fmt.tokens if t in fmt.path_start]
    if len(opener_tags) != 1:
        raise ValueError(f"{fmt.name}: path_start {fmt.path_start!r} names {opener_tags}, not one tag")
    opener = tokenizer.convert_tokens_to_ids(opener_tags[0])
    tag_set = {tokenizer.convert_tokens_to_ids(t) for t in fmt.tokens}
    join_ids = _encode(tokenizer, fmt.separator + fmt.join)

    pos = list(range(n))
    # per token, the (fork, path) pairs it lies in, outermost first
    where: list[tuple[tuple[int, int], ...]] = [()] * n
    stack: list[dict] = []  # open forks: {"id", "t" (trigger position), "path" (1-based), "top" (largest position)}
    n_forks = 0
    nxt = prompt_len  # the position of the next token
    i = prompt_len
    while i < n:
        tok = ids[i]
        pos[i] = nxt
        where[i] = tuple((f["id"], f["path"]) for f in stack)
        for f in stack:
            f["top"] = max(f["top"], nxt)
        nxt += 1
        if tok == trigger and len(stack) <= fmt.max_depth:
            stack.append({"id": n_forks, "t": pos[i], "path": 1, "top": pos[i]})
            n_forks += 1
            nxt = pos[i] + 1
        elif tok == close and stack:
            fork = stack[-1]
            following = next((ids[j] for j in range(i + 1, n) if ids[j] in tag_set), None)
            if following == opener:  # another path of the same fork, from the token after this close
                fork["path"] += 1
                nxt = fork["t"] + 1
            else:  # the join: back on the enclosing line
                stack.pop()
                nxt = fork["top"] + 1
                got = ids[i + 1:i + 1 + len(join_ids)]
                if check_join and got != join_ids[:len(got)]:
                    raise ValueError(f"{fmt.name}: after the last path's close at {i}, expected the join "
                                     f"{join_ids} ({fmt.separator + fmt.join!r}), got {got}")
        i += 1

    # mask: causal, minus (q, k) in different paths of a fork they both lie in
    allowed = _causal(n)
    for fork_id in range(n_forks):
        path_of = torch.tensor([dict(w).get(fork_id, 0) for w in where])
        both = (path_of[:, None] > 0) & (path_of[None, :] > 0)
        allowed &= ~(both & (path_of[:, None] != path_of[None, :]))
    return pos, allowed


# ----------------------------------------------------------------------------------------------- forwards
@torch.no_grad()
def dense_logits(model, ids: Sequence[int], positions: Sequence[int], allowed: torch.Tensor) -> torch.Tensor:
    """Logits [L, V] of one forward of the whole sequence with explicit position ids and the 4-D boolean mask
    ``allowed[None, None]`` (True = attend; sdpa takes it as is)."""
    out = model(input_ids=torch.tensor([list(ids)]), position_ids=torch.tensor([list(positions)]),
                attention_mask=allowed[None, None], use_cache=False)
    return out.logits[0].float()


@torch.no_grad()
def visible_subsequence_logits(model, ids: Sequence[int], positions: Sequence[int], allowed: torch.Tensor,
                               queries: Sequence[int]) -> torch.Tensor:
    """Logits [len(queries), V]: for each query q, a separate forward of only the tokens q may attend
    (``allowed[q]``, in order, with their own positions), under ``allowed`` restricted to them (visible
    tokens of sibling paths still may not see each other), and the last row (q itself)."""
    ids_t, pos_t = torch.tensor(list(ids)), torch.tensor(list(positions))
    rows = []
    for q in queries:
        keep = allowed[q].nonzero().flatten()
        if len(keep) == 0 or keep[-1].item() != q:
            raise ValueError(f"query {q} does not attend itself")
        sub = allowed[keep][:, keep]
        out = model(input_ids=ids_t[keep][None], position_ids=pos_t[keep][None], attention_mask=sub[None, None],
                    use_cache=False)
        rows.append(out.logits[0, -1].float())
    return torch.stack(rows)
