"""The judge's process: math-verify in a persistent, killable worker with a hard per-answer timeout.

math-verify's own SIGALRM timeouts cannot interrupt sympy's C code, so the judge
(``lm_eval_parathinker.scoring.equivalence``) runs in a plain ``python -c`` child process that talks JSON
lines over stdin/stdout (not ``multiprocessing``, whose spawn mode re-imports the caller's
``__main__``). It is started lazily, reused for every answer, and killed (then restarted on the
next answer) when an answer takes longer than the timeout: that answer scores 0 and the timeout is
counted. A worker that dies (crashes, or is killed) while checking an answer is replaced and the
answer is checked once more in the fresh worker, so a lost worker changes no score and is no
timeout. math-verify and sympy are never imported by the evaluation process.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import select
import subprocess
import sys
import threading
import time

from .answer import FinalAnswer

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = float(os.environ.get("PARATHINKER_VERIFY_TIMEOUT", "10"))
_STARTUP_TIMEOUT = 120.0


def serve() -> None:  # pragma: no cover - runs in the child process
    """Child process: reads JSON ``[gold, gold_sentence, pred, pred_sentence]`` lines, writes verdicts."""
    out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)  # anything math-verify or sympy prints goes to stderr, never into the protocol
    try:
        from .equivalence import equivalent
    except Exception as e:
        out.write(json.dumps(["error", repr(e)]) + "\n")
        return
    out.write(json.dumps(["ready", None]) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            verdict = equivalent(*json.loads(line))
        except BaseException:  # math-verify's TimeoutException is a BaseException
            verdict = False
        out.write(json.dumps(["ok", verdict]) + "\n")


class _WorkerDied(Exception):
    """The worker process ended (crashed or was killed) before it answered."""


class Verifier:
    """A persistent worker process that judges answers with a hard, killable per-answer timeout."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._buf = b""
        self.timeouts = 0  # total since creation

    def _start(self) -> None:
        env = dict(os.environ)
        package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = package_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["LM_EVAL_PARATHINKER_NO_AUTOLOAD"] = "1"
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from lm_eval_parathinker.scoring.worker import serve; serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self._buf = b""
        try:
            msg = self._read(_STARTUP_TIMEOUT)
        except _WorkerDied:
            msg = None
        if msg is None or msg[0] != "ready":
            self._kill()
            raise RuntimeError(f"math-verify worker failed to start: {msg!r}")

    def _read(self, timeout: float):
        """Next JSON message from the worker, or None on timeout; raises _WorkerDied at EOF."""
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
                raise _WorkerDied
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

    def _send(self, request: bytes) -> None:
        try:
            self._proc.stdin.write(request)
            self._proc.stdin.flush()
        except (OSError, ValueError):
            raise _WorkerDied from None

    def _ask(self, request: bytes, timeout: float):
        """The worker's reply, or None on a real timeout (the worker, still busy, is killed);
        raises _WorkerDied when the worker ends before it answers."""
        if self._proc is None or self._proc.poll() is not None:
            self._kill()  # a worker that died since the last answer is replaced
            self._start()
        try:
            self._send(request)
            msg = self._read(timeout)
        except _WorkerDied:
            self._kill()
            raise
        if msg is None:
            self._kill()
        return msg

    def check(self, gold: FinalAnswer, pred: FinalAnswer, timeout: float | None = None) -> tuple[bool, bool]:
        """``(equivalent, timed_out)``; a timeout kills the worker and counts as not equivalent.
        A worker that dies while checking is replaced and the answer checked again, once."""
        timeout = DEFAULT_TIMEOUT if timeout is None else float(timeout)
        request = (json.dumps([str(gold), gold.sentence, str(pred), pred.sentence]) + "\n").encode()
        with self._lock:
            for _ in range(2):  # a worker that dies is replaced, and the answer asked once more
                try:
                    msg = self._ask(request, timeout)
                    break
                except _WorkerDied:
                    continue
            else:
                logger.warning("math-verify worker died twice on %r vs gold %r: scored as not equal", str(pred), str(gold))
                return False, False
            if msg is None:
                self.timeouts += 1
                return False, True
            return (bool(msg[1]) if msg[0] == "ok" else False), False


_VERIFIER: Verifier | None = None


def get_verifier() -> Verifier:
    """The process-wide worker (started on first use, closed at exit)."""
    global _VERIFIER
    if _VERIFIER is None:
        _VERIFIER = Verifier()
        atexit.register(_VERIFIER.close)
    return _VERIFIER


def _as_answer(answer: str) -> FinalAnswer:
    return answer if isinstance(answer, FinalAnswer) else FinalAnswer(str(answer))


def judge(pred: str | None, gold: str | None, timeout: float | None = None) -> tuple[bool, bool]:
    """``(equivalent, timed_out)`` of two answers (``FinalAnswer``s, or LaTeX strings such as a
    dataset's gold); identical answers are equal without asking the worker."""
    if pred is None or gold is None or not str(pred).strip() or not str(gold).strip():
        return False, False
    pred, gold = _as_answer(pred), _as_answer(gold)
    if str(pred) == str(gold) and pred.sentence == gold.sentence:
        return True, False
    return get_verifier().check(gold, pred, timeout)


def is_equiv(pred: str | None, gold: str | None, timeout: float | None = None) -> bool:
    """Whether ``pred`` states the value of ``gold`` (math-verify, hard ``timeout`` seconds)."""
    return judge(pred, gold, timeout)[0]
