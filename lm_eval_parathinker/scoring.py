"""Answer extraction and math-verify scoring for the ParaThinker math tasks.

* ``extract_answer(text)``: the content of the LAST balanced ``\\boxed{...}`` / ``\\fbox{...}`` of a response
  (in a ParaThinker transcript that is the summary's); only when there is no box, a light parse of the
  response's tail ("the answer is ...", the last ``$...$``, the last number).
* ``is_equiv(pred, gold, timeout=...)``: normalises both sides where math-verify is weak (``\\text{}`` units,
  ``x=`` prefixes, leading zeros, degrees, ``\\%``, ``\\$``, thousands separators) and then runs math-verify
  ``verify(parse("$gold$"), parse("$pred$"))`` in a persistent *spawned* worker process. math-verify's own
  SIGALRM timeouts cannot interrupt sympy's C code, so the worker is killed (and restarted lazily) when an
  answer takes longer than ``timeout`` seconds: the answer scores 0 and the timeout is counted.
* ``majority_answer(answers)``: index of the majority answer (answers grouped by ``is_equiv``; ties go to
  the earliest group).
* ``process_results(doc, results)``: per-problem metrics for lm-eval (see ``METRICS``).

Only the standard library is imported at module import time; math-verify lives in the worker.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import re
import select
import subprocess
import sys
import threading
import time
from typing import Any, Sequence

DEFAULT_TIMEOUT = float(os.environ.get("PARATHINKER_VERIFY_TIMEOUT", "10"))
_STARTUP_TIMEOUT = 120.0

#: metric keys returned by process_results (plus one key per numeric ``.meta`` entry of the responses)
METRICS = ("pass_at_1", "pass_at_k", "maj_at_k", "no_answer", "verify_timeouts")

# ============================================================================ extraction
_BOX_RE = re.compile(r"\\(?:boxed|fbox)\b")


def _balanced(text: str, open_pos: int) -> int | None:
    """Index of the ``}`` matching the ``{`` at ``open_pos`` (escaped braces ``\\{`` ignored), else None."""
    depth = 0
    i = open_pos
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last balanced, non-empty ``\\boxed{...}``/``\\fbox{...}`` (or ``\\boxed 5``) in ``text``."""
    if not text:
        return None
    for m in reversed(list(_BOX_RE.finditer(text))):
        j = m.end()
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            end = _balanced(text, j)
            if end is None:
                continue  # truncated box: try an earlier one
            content = text[j + 1 : end].strip()
        elif m.end() < len(text) and text[m.end()] == " ":
            tail = re.match(r"[^\s$.,;]+", text[j:])
            content = tail.group(0) if tail else ""
        else:
            continue
        if content:
            return content
    return None


_ANSWER_IS_RE = re.compile(
    r"(?:final answer|the answer|answer)\s*(?:is|:|=)?\s*[:\s]*(.+?)(?:\.\s|\.$|\n|$)", re.IGNORECASE
)
_DOLLAR_RE = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def _tail_answer(text: str, tail_chars: int = 400) -> str | None:
    tail = text[-tail_chars:]
    found = None
    for m in _ANSWER_IS_RE.finditer(tail):
        found = m.group(1)
    if found:
        found = found.strip().strip("$").strip()
        dm = _DOLLAR_RE.search(found)
        if dm:
            found = next(g for g in dm.groups() if g is not None).strip()
        if found:
            return found.rstrip(".").strip() or None
    maths = [next(g for g in m.groups() if g is not None) for m in _DOLLAR_RE.finditer(tail)]
    if maths and maths[-1].strip():
        return maths[-1].strip()
    nums = _NUMBER_RE.findall(tail)
    if nums:
        return nums[-1].rstrip(",")
    return None


def extract_answer(text: str | None) -> str | None:
    """The final answer of a response: last balanced ``\\boxed{}``/``\\fbox{}``; tail parse only if no box."""
    if not text:
        return None
    text = str(text)
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    if _BOX_RE.search(text):
        # There were boxes but none usable (empty / truncated): don't guess from the tail.
        return None
    return _tail_answer(text)


# ============================================================================ normalisation
_TEXT_CMD = r"\\(?:text|textbf|textit|mbox|mathrm|operatorname)"


def _unwrap_cmd(s: str, cmd_re: str) -> str:
    """Replace ``\\cmd{X}`` by ``X`` (balanced braces)."""
    out = []
    i = 0
    pat = re.compile(cmd_re + r"\s*\{")
    while True:
        m = pat.search(s, i)
        if not m:
            out.append(s[i:])
            break
        end = _balanced(s, m.end() - 1)
        if end is None:
            out.append(s[i:])
            break
        out.append(s[i : m.start()])
        out.append(s[m.end() : end])
        i = end + 1
    return "".join(out)


def normalize_answer(s: str | None) -> str | None:
    """Light normalisation before math-verify (what a careful human grader ignores)."""
    if s is None:
        return None
    s = str(s).strip()
    if not s:
        return None
    s = s.strip("$").strip()
    s = re.sub(r"^\\\(|\\\)$|^\\\[|\\\]$", "", s).strip()
    # nested \boxed inside a box, e.g. \boxed{\boxed{5}}
    inner = last_boxed(s) if _BOX_RE.match(s) else None
    if inner:
        s = inner
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = re.sub(r"\\[,!;: ]", "", s)  # thin spaces
    s = s.replace("\\displaystyle", "")
    # degrees, percent, dollars
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|°", "", s)
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace("\\$", "")
    # a whole-answer \text{...} is unwrapped; a \text{...} after a value is a unit and dropped
    m = re.fullmatch(_TEXT_CMD + r"\s*\{(.*)\}", s, re.DOTALL)
    if m and _balanced(s, s.index("{")) == len(s) - 1:
        s = m.group(1).strip()
    else:
        s = re.sub(
            r"(?<=[0-9}).)])\s*" + _TEXT_CMD + r"\s*\{\s*[A-Za-z][A-Za-z .^0-9/]*\}(\^\{?\d\}?)?",
            "",
            s,
        )
        s = _unwrap_cmd(s, _TEXT_CMD)
    # trailing plain-word units, e.g. "12 cm", "5 degrees", "30 units^2"
    s = re.sub(
        r"^(-?[\d.,/\\{}a-z]*\d[\d.}]*)\s+(?:cm|m|km|mm|inches|inch|in|feet|ft|meters|units?|degrees?|"
        r"dollars|cents|sq\.?\s*units|square\s+units|miles|hours|minutes|seconds|days)(\^\{?\d\}?)?\.?$",
        r"\1",
        s,
    )
    # "x = 5" -> "5" (single variable prefix; not for equations like "y = 2x + 1" on both sides alike)
    m = re.fullmatch(r"\s*[A-Za-z](?:_\{?\w+\}?)?\s*=\s*([^=]+)", s)
    if m and "," not in s:
        s = m.group(1).strip()
    s = s.strip().rstrip(".").strip()
    # integers: leading zeros and "27.0"
    m = re.fullmatch(r"([+-]?)0*(\d+)(?:\.0+)?", s)
    if m:
        s = (m.group(1) if m.group(1) == "-" else "") + m.group(2)
        if s in ("-0",):
            s = "0"
    return s or None


def _strip_thousands(s: str) -> str:
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        return s.replace(",", "")
    if re.fullmatch(r"-?\d{1,3}(?:\{,\}\d{3})+(?:\.\d+)?", s):
        return s.replace("{,}", "")
    return s


def _canon(s: str) -> str:
    return re.sub(r"\s+", "", s)


# ============================================================================ verification worker
def _worker_stdio() -> None:  # pragma: no cover - runs in the child process
    """Child process: reads JSON ``[gold, pred]`` lines on stdin, writes JSON verdict lines."""
    out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)  # anything math-verify/sympy prints goes to stderr, never into our protocol
    try:
        from math_verify import parse, verify
        from math_verify.parser import ExprExtractionConfig, LatexExtractionConfig
    except Exception as e:
        out.write(json.dumps(["error", repr(e)]) + "\n")
        return
    configs = [LatexExtractionConfig(), ExprExtractionConfig()]
    out.write(json.dumps(["ready", None]) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        gold, pred = json.loads(line)
        try:
            g = parse(f"${gold}$", extraction_config=configs)
            p = parse(f"${pred}$", extraction_config=configs)
            ok = bool(g) and bool(p) and bool(verify(g, p))
        except BaseException:  # math-verify's TimeoutException is a BaseException
            ok = False
        out.write(json.dumps(["ok", ok]) + "\n")


class Verifier:
    """A persistent worker process that runs math-verify with a hard, killable per-answer timeout.

    The worker is a plain ``python -c`` child (not ``multiprocessing``, whose spawn mode re-imports the
    caller's ``__main__``); it is started lazily, reused for every answer, and killed + restarted when an
    answer takes longer than the timeout.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._buf = b""
        self.timeouts = 0  # total since creation
        self.restarts = 0

    def _start(self) -> None:
        env = dict(os.environ)
        pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["LM_EVAL_PARATHINKER_NO_AUTOLOAD"] = "1"
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from lm_eval_parathinker.scoring import _worker_stdio; _worker_stdio()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self._buf = b""
        msg = self._read(_STARTUP_TIMEOUT)
        if msg is None or msg[0] != "ready":
            self._kill()
            raise RuntimeError(f"math-verify worker failed to start: {msg!r}")

    def _read(self, timeout: float):
        """Next JSON message from the worker, or None on timeout / EOF."""
        deadline = time.monotonic() + timeout
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None  # EOF: the worker died
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        self._buf = b""
        if proc is not None:
            try:
                proc.kill()
                proc.wait(5)
            except Exception:
                pass
            for f in (proc.stdin, proc.stdout):
                try:
                    f.close()
                except Exception:
                    pass

    def close(self) -> None:
        with self._lock:
            self._kill()

    def check(self, gold: str, pred: str, timeout: float | None = None) -> tuple[bool, bool]:
        """``(equivalent, timed_out)``; a timeout kills the worker and counts as not equivalent."""
        timeout = DEFAULT_TIMEOUT if timeout is None else float(timeout)
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                if self._proc is not None:
                    self._kill()
                    self.restarts += 1
                self._start()
            try:
                self._proc.stdin.write((json.dumps([gold, pred]) + "\n").encode())
                self._proc.stdin.flush()
            except (OSError, ValueError):
                self._kill()
                return False, False
            msg = self._read(timeout)
            if msg is not None:
                return (bool(msg[1]) if msg[0] == "ok" else False), False
            timed_out = self._proc.poll() is None  # still running: a real timeout; else it crashed
            self._kill()
            self.restarts += 1
            self.timeouts += timed_out
            return False, timed_out


_VERIFIER: Verifier | None = None


def get_verifier() -> Verifier:
    global _VERIFIER
    if _VERIFIER is None:
        _VERIFIER = Verifier()
        atexit.register(_VERIFIER.close)
    return _VERIFIER


def _judge(pred: str | None, gold: str | None, timeout: float | None = None) -> tuple[bool, bool]:
    """``(equivalent, timed_out)`` for a predicted and a gold answer (both un-normalised strings)."""
    if pred is None or gold is None:
        return False, False
    p, g = normalize_answer(pred), normalize_answer(gold)
    if p is None or g is None:
        return False, False
    if "," not in g:
        p = _strip_thousands(p)
    g = _strip_thousands(g)
    if _canon(p) == _canon(g):
        return True, False
    if _canon(p).lower() == _canon(g).lower() and not re.search(r"[A-Za-z]", g.replace("\\", "")):
        return True, False
    return get_verifier().check(g, p, timeout)


def is_equiv(pred: str | None, gold: str | None, timeout: float | None = None) -> bool:
    """Whether ``pred`` is mathematically equivalent to ``gold`` (math-verify, hard ``timeout`` seconds)."""
    return _judge(pred, gold, timeout)[0]


# ============================================================================ voting and metrics
def _cluster(answers: Sequence[str | None], timeout: float | None = None) -> tuple[list[list[int]], int]:
    """Groups of indices of equivalent answers (first member = representative), and the timeout count."""
    groups: list[list[int]] = []
    timeouts = 0
    for i, a in enumerate(answers):
        if a is None:
            continue
        for grp in groups:
            same, to = _judge(a, answers[grp[0]], timeout)
            timeouts += to
            if same:
                grp.append(i)
                break
        else:
            groups.append([i])
    return groups, timeouts


def majority_answer(answers: Sequence[str | None], timeout: float | None = None) -> int | None:
    """Index of the majority answer: answers are grouped by ``is_equiv``; the biggest group wins, ties go to
    the group seen first; the index returned is that group's first member. ``None`` if no answer at all."""
    groups, _ = _cluster(answers, timeout)
    if not groups:
        return None
    best = max(groups, key=lambda g: (len(g), -g[0]))
    return best[0]


def _numeric_meta(resp: Any) -> dict[str, float]:
    meta = getattr(resp, "meta", None)
    if not isinstance(meta, dict):
        return {}
    out = {}
    for k, v in meta.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            continue
        out[str(k)] = float(v)
    return out


def score_responses(responses: Sequence[Any], gold: str, timeout: float | None = None) -> dict[str, float]:
    """Metrics of the k responses to one problem (see ``METRICS``), plus the means of numeric ``.meta``."""
    responses = list(responses)
    k = len(responses)
    answers = [extract_answer(r) for r in responses]
    correct = []
    timeouts = 0
    for a in answers:
        ok, to = _judge(a, gold, timeout)
        correct.append(ok)
        timeouts += to
    groups, to_c = _cluster(answers, timeout)
    timeouts += to_c
    if groups:
        best = max(groups, key=lambda g: (len(g), -g[0]))
        maj = bool(correct[best[0]])
    else:
        maj = False
    out: dict[str, float] = {
        "pass_at_1": (sum(correct) / k) if k else 0.0,
        "pass_at_k": float(any(correct)),
        "maj_at_k": float(maj),
        "no_answer": (sum(a is None for a in answers) / k) if k else 1.0,
        "verify_timeouts": float(timeouts),
    }
    sums: dict[str, list[float]] = {}
    for r in responses:
        for key, v in _numeric_meta(r).items():
            sums.setdefault(key, []).append(v)
    for key, vals in sums.items():
        if key not in out:
            out[key] = sum(vals) / len(vals)
    return out


def process_results(doc: dict, results: list) -> dict[str, float]:
    """lm-eval ``process_results``: ``results[0]`` is the list of k responses (filter ``take_first_k``)."""
    first = results[0] if results else []
    responses = list(first) if isinstance(first, (list, tuple)) else [first]
    return score_responses(responses, str(doc["answer"]))
