"""The data-parallel ranks of an evaluation: what they tell each other, and how a dead one ends the run.

Under ``accelerate launch`` (or ``torchrun``) each process is a rank with its share of the requests
(:class:`~lm_eval_parathinker.upstream.lm_eval.HFLMShim`). The ranks never exchange responses
during generation: rank 0's progress bar reads the other ranks' journal files. They do share a
small side process group (gloo, on the CPU, whatever the main backend is) for two things:

* before generating, each rank's response count and reuse count (:meth:`Ranks.gather`), so rank 0's
  bar counts the whole run;
* while generating, a heartbeat through rank 0 (:meth:`Ranks.watched`). HFLM's process group waits
  52 weeks in a collective, so a rank that dies would leave the others generating their share and
  then waiting in lm-eval's barrier for a year (NCCL) or until their own share is done (gloo). With
  the heartbeat, the survivors learn within seconds that rank k stopped answering (its connection
  closed, or no answer in :data:`HEARTBEAT_TIMEOUT`), log which rank it was and exit, which ends the
  launch; a rerun of the command resumes from the journal.

The heartbeat runs until every rank has finished generating, so no rank leaves a collective of
lm-eval's while another still generates.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)
report = logging.getLogger("lm_eval.parathinker")  # lm-eval's messages (--verbosity)

#: seconds between heartbeats, and without an answer before a rank counts as dead
HEARTBEAT_PERIOD = 1.0
HEARTBEAT_TIMEOUT = 30.0
# A heartbeat: a rank's state to rank 0, then rank 0's verdict back (a dead rank's number, or one of these).
_GENERATING, _FINISHED = -1, -2  # a rank's state
_GO_ON, _ALL_FINISHED = -1, -2  # rank 0's verdict


class RankDied(RuntimeError):
    """Another rank stopped answering; the message names it."""


def spans_several_nodes(world_size: int) -> bool:
    """Whether the launch's processes run on more than one machine (torchrun's ``LOCAL_WORLD_SIZE``)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) < world_size


def warn_node_local_journal(journal_dir: Path, world_size: int) -> None:
    """On several nodes, a journal under the home directory is usually node-local: warn."""
    if spans_several_nodes(world_size) and journal_dir.resolve().is_relative_to(Path.home().resolve()):
        report.warning("response journal %s is under the home directory, and this run spans several nodes: unless "
                       "the home directory is shared storage, each node keeps its own journal and a rerun with "
                       "another layout of processes does not find the responses. Pass journal_dir=<shared folder> "
                       "(and --output_path on shared storage); see docs/scale-out.md", journal_dir)


class Ranks:
    """This process's rank among ``world_size``, and the side groups the ranks talk through (one for
    :meth:`gather` on the caller's thread, one for the heartbeat's thread)."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        self.group = self.heartbeat_group = None
        if world_size > 1:  # every rank constructs the model, so every rank joins the groups here
            timeout = timedelta(seconds=HEARTBEAT_TIMEOUT)
            self.group = torch.distributed.new_group(backend="gloo", timeout=timeout)
            self.heartbeat_group = torch.distributed.new_group(backend="gloo", timeout=timeout)

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (a collective: every rank calls it at the same point)."""
        if self.group is None:
            return [value]
        values: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(values, value, group=self.group)
        return values

    @contextmanager
    def watched(self) -> Iterator[Heartbeat | None]:
        """Generation under the heartbeat (None on one rank): leaving the block waits until every
        rank has finished (an error leaves at once: this process is ending, and the others then learn it)."""
        if self.heartbeat_group is None:
            yield None
            return
        heartbeat = Heartbeat(self.rank, self.world_size, self.heartbeat_group)
        heartbeat.start()
        yield heartbeat
        heartbeat.finish_here()
        heartbeat.join()


class Heartbeat(threading.Thread):
    """A thread exchanging a state with rank 0 every :data:`HEARTBEAT_PERIOD` seconds until every
    rank has finished; when a rank stops answering, this process logs it and exits (status 1)."""

    def __init__(self, rank: int, world_size: int, group) -> None:
        super().__init__(name="parathinker-heartbeat", daemon=True)
        self.rank, self.world_size, self.group = rank, world_size, group
        self.state = _GENERATING
        self.stopped = threading.Event()  # every rank has finished

    def finish_here(self) -> bool:
        """This rank has finished generating; returns whether every rank has."""
        self.state = _FINISHED
        return self.stopped.is_set()

    def run(self) -> None:
        beat = self._beat_hub if self.rank == 0 else self._beat_spoke
        while not self.stopped.wait(HEARTBEAT_PERIOD):
            try:
                beat()
            except RankDied as e:
                _exit(str(e))

    def _beat_hub(self) -> None:
        """Rank 0: every other rank's state in, the verdict out."""
        others = range(1, self.world_size)
        states = {r: torch.tensor([0]) for r in others}
        dead, cause = None, ""
        for r in others:
            try:  # gloo raises on posting the receive when the peer's connection has closed, else in the wait
                torch.distributed.irecv(states[r], src=r, group=self.group).wait(timedelta(seconds=HEARTBEAT_TIMEOUT))
            except RuntimeError as e:
                dead, cause = r, _first_line(e)
                break
        finished = dead is None and self.state == _FINISHED and all(s.item() == _FINISHED for s in states.values())
        verdict = dead if dead is not None else _ALL_FINISHED if finished else _GO_ON
        for r in others:
            if r != dead:
                try:
                    torch.distributed.send(torch.tensor([verdict]), dst=r, group=self.group)
                except RuntimeError:
                    pass  # that one is gone too: it is told by its own connection
        if dead is not None:
            raise RankDied(_died(dead, cause))
        if finished:
            self.stopped.set()

    def _beat_spoke(self) -> None:
        """Any other rank: its state to rank 0, rank 0's verdict back."""
        verdict = torch.tensor([0])
        try:
            torch.distributed.send(torch.tensor([self.state]), dst=0, group=self.group)
            torch.distributed.recv(verdict, src=0, group=self.group)
        except RuntimeError as e:
            raise RankDied(_died(0, _first_line(e))) from None
        if verdict.item() >= 0:
            raise RankDied(_died(verdict.item(), "reported by rank 0"))
        if verdict.item() == _ALL_FINISHED:
            self.stopped.set()


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _died(rank: int, cause: str) -> str:
    return (f"rank {rank} stopped answering during generation ({cause}): ending this rank too, rather than "
            f"wait in a collective. Rerun the same command to resume: the journal keeps every finished response")


def _exit(message: str) -> None:
    """Log ``message`` and end the process at once (the main thread may be inside a collective)."""
    report.error(message)
    for handler in logging.getLogger().handlers + report.handlers:
        handler.flush()
    sys.stderr.flush()
    os._exit(1)


__all__ = ["HEARTBEAT_PERIOD", "HEARTBEAT_TIMEOUT", "Heartbeat", "RankDied", "Ranks", "spans_several_nodes",
           "warn_node_local_journal"]
