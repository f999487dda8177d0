"""Which sample a request is, and the random stream it gets: a pure function of its key.

lm-eval hands ``generate_until`` one list with every task's requests, each doc's ``Instance`` repeated
k times (``repeats``), and with data parallelism some extra copies of a rank's last request so that
every rank runs as many requests. A request's position in that list moves with the other tasks,
``--limit``, the rank and the order, so it must not pick the random stream. The key does:

* the task name;
* the doc's identity: the hash lm-eval logs as ``doc_hash`` (the same under ``--limit`` and
  ``--samples``, which renumbers ``doc_id``), or the prompt's hash for a request without a doc;
* ``Instance.idx`` (which request of the doc; 0 for ``generate_until``);
* the repeat index: the copies of one ``Instance`` counted in the order lm-eval hands them.

A copy with repeat index >= k is data-parallel padding (lm-eval discards its response).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from lm_eval.api.instance import Instance
from lm_eval.utils import handle_non_serializable, hash_string


@dataclass(frozen=True)
class SampleKey:
    """Who a response belongs to (see the module docstring)."""

    task: str | None
    doc_hash: str
    index: int
    repeat: int
    padding: bool = False  # a copy added by data-parallel padding: not a sample of its own

    def seed(self, run_seed: int) -> int:
        """The 62-bit seed of this sample's random stream: a hash of the run seed and the key."""
        payload = json.dumps([run_seed, self.task, self.doc_hash, self.index, self.repeat]).encode()
        return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "big") >> 2


def doc_hash(request: Instance) -> str:
    """lm-eval's ``doc_hash`` of the request's doc (as in ``--log_samples``), else of its prompt."""
    if isinstance(request.doc, dict) and request.doc:
        return hash_string(json.dumps(request.doc, indent=2, default=handle_non_serializable, ensure_ascii=False))
    return hash_string(str(request.args[0]))


def sample_keys(requests: Sequence[Instance]) -> list[SampleKey]:
    """The key of every request, in order (the copies of one Instance are its repeats)."""
    seen: Counter[int] = Counter()
    hashes: dict[int, str] = {}
    keys = []
    for request in requests:
        ident = id(request)  # lm-eval repeats a doc by handing the same Instance object again
        repeat = seen[ident]
        seen[ident] += 1
        if ident not in hashes:
            hashes[ident] = doc_hash(request)
        padding = request.repeats is not None and repeat >= request.repeats
        keys.append(SampleKey(request.task_name, hashes[ident], request.idx, repeat, padding))
    return keys


def run_seed(seed: int | None) -> int:
    """The run's seed: the generation kwarg ``seed``, else the seed lm-eval gave torch
    (``--seed``; ``torch.initial_seed()`` does not move as numbers are drawn)."""
    return int(seed) if seed is not None else torch.initial_seed()


__all__ = ["SampleKey", "doc_hash", "run_seed", "sample_keys"]
