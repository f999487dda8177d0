"""The progress bar of a long evaluation: responses done / total, generated tokens per second, time
left, and the running pass@1 where the doc has a gold answer.

Responses are graded as they finish by a background thread that feeds the scoring worker, so the
engine's ``on_output`` callback (inside its decode loop) never waits for math-verify. A run whose
accuracy is 0 after the first few dozen problems shows it at once.

Under data parallelism the bar shows on rank 0 only, and counts every rank's responses: it follows
the other ranks' journal files (``others``), never a collective, so no rank waits for the display.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from tqdm.auto import tqdm

from ..scoring import extract_answer, judge

logger = logging.getLogger(__name__)

#: seconds between two reads of the other ranks' journal files
FOLLOW_PERIOD = 1.0


def gold_answer(doc) -> str | None:
    """The gold answer of a math doc (``problem`` and ``answer`` fields, as in our math tasks), else None."""
    if isinstance(doc, dict) and isinstance(doc.get("problem"), str) and isinstance(doc.get("answer"), str):
        return doc["answer"]
    return None


class LiveProgress:
    """A tqdm bar over ``total`` responses, ``reused`` of them already done (from the journal).

    ``add(response, doc, generated)`` counts one response (``generated``: in this run, so its
    ``.meta["gen_tokens"]`` count towards tokens per second); ``close()`` waits for the last grades.
    ``others()``, if given, returns the journal records the other ranks have added since its last
    call: they are counted too (every :data:`FOLLOW_PERIOD` seconds), and ``close()`` follows them
    until ``finished()`` (called once this rank is done) says every rank is.
    """

    def __init__(self, total: int, reused: int, desc: str, disable: bool = False,
                 others: Callable[[], list[dict]] | None = None, finished: Callable[[], bool] | None = None) -> None:
        # initial=reused: tqdm's rate and time left count only the responses generated in this run
        self.bar = tqdm(total=total, initial=reused, desc=desc, unit="resp", disable=disable)
        self.start = self.last = time.monotonic()
        self.tokens = 0  # generated in this run, by the time of the last generated response (``last``)
        self.graded = 0
        self.correct = 0
        self._lock = threading.Lock()
        self._counting = threading.Lock()  # this rank's responses and the other ranks' arrive on two threads
        self._queue: queue.Queue = queue.Queue()
        self._grader: threading.Thread | None = None
        self._others, self._finished = others, finished
        self._closing = threading.Event()
        self._follower: threading.Thread | None = None
        if others is not None:
            self._follower = threading.Thread(target=self._follow, name="parathinker-progress-follower", daemon=True)
            self._follower.start()

    def add(self, response: str, doc, generated: bool = True) -> None:
        gen_tokens = int(getattr(response, "meta", {}).get("gen_tokens", 0)) if generated else 0
        self._count(str(response), gold_answer(doc), generated, gen_tokens)

    def _follow(self) -> None:
        """Count the other ranks' journaled responses until ``close()``, and then until every rank is done."""
        while True:
            time.sleep(FOLLOW_PERIOD)
            done = self._closing.is_set() and self._finished()  # read once more after the last rank's end
            for record in self._others():
                self._count(record["response"], record.get("gold"), True, int(record["meta"].get("gen_tokens", 0)))
            if done:
                return

    def _count(self, text: str, gold: str | None, generated: bool, gen_tokens: int) -> None:
        with self._counting:
            if generated:
                self.tokens += gen_tokens
                self.last = time.monotonic()
                self.bar.update(1)
            self._grade_later(text, gold)
            self._show()

    def _grade_later(self, text: str, gold: str | None) -> None:
        if gold is not None and not self.bar.disable:
            if self._grader is None:
                self._grader = threading.Thread(target=self._grade, name="parathinker-live-grading", daemon=True)
                self._grader.start()
            self._queue.put((text, gold))

    def _grade(self) -> None:
        while (item := self._queue.get()) is not None:
            text, gold = item
            try:
                correct, _ = judge(extract_answer(text), gold)
            except Exception as e:  # the live figure is a display: never fail the run for it
                logger.warning("live pass@1 turned off: grading failed (%s)", e)
                return
            with self._lock:
                self.graded += 1
                self.correct += correct
            self._show()

    def postfix(self) -> str:
        text = f"{self.tokens / max(self.last - self.start, 1e-9):.0f} tok/s"
        with self._lock:
            if self.graded:
                text += f", pass@1 {self.correct / self.graded:.3f} ({self.graded} graded)"
        return text

    def _show(self) -> None:
        self.bar.set_postfix_str(self.postfix())

    def close(self) -> None:
        if self._follower is not None:
            self._closing.set()
            self._follower.join()
        if self._grader is not None:
            self._queue.put(None)
            self._grader.join()
        self._show()
        self.bar.close()


__all__ = ["LiveProgress", "gold_answer"]
