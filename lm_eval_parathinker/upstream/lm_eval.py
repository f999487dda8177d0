"""Every lm-eval internal the package touches, in one module: an lm-eval upgrade is checked here.

:class:`HFLMShim` is ``HFLM`` with the overrides of its internals that the package needs;
``ParaThinkerLM`` subclasses it.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM


class HFLMShim(HFLM):
    """``HFLM`` with the package's overrides of its internals (each documented where it is)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Data parallelism on every device and node layout.

        HFLM shards the requests only when it sees more than one GPU on its node, and then by
        ``accelerator.local_process_index``: CPU processes (gloo) and one GPU per node never shard,
        and on several nodes the second node's ranks repeat the first node's shards. Here every
        process launched by ``accelerate launch`` (or ``torchrun``) is a rank: the rank is the global
        ``process_index`` and the world counts every process (``num_processes``).
        """
        super().__init__(*args, **kwargs)
        accelerator = getattr(self, "accelerator", None)  # HFLM keeps it only when there are several processes
        if accelerator is not None:
            self._rank = accelerator.process_index
            self._world_size = accelerator.num_processes
        self._padded: list[Instance] = []

    def note_padding(self, requests: list[Instance]) -> None:
        """Remember the requests that data-parallel padding repeated (for :meth:`barrier`).

        lm-eval evens out the ranks' request counts with extra copies of a rank's last request and
        appends their responses to that request's ``resps``: its sample would log (and score) more
        responses than its ``repeats``. The request methods call this with their requests.
        """
        if self.world_size == 1:  # no padding
            return
        copies = Counter(id(request) for request in requests)
        unique = {id(request): request for request in requests}.values()
        self._padded = [request for request in unique if copies[id(request)] > (request.repeats or 1)]

    def barrier(self) -> None:
        """lm-eval's barrier after each request type's responses are in: drop the padding's responses
        (see :meth:`note_padding`), so a sample holds its ``repeats`` responses as on one process."""
        for request in self._padded:
            del request.resps[request.repeats or 1:]
        self._padded = []
        super().barrier()

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list:
        """HFLM's, with the padding noted."""
        self.note_padding(requests)
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list:
        """HFLM's, with the padding noted."""
        self.note_padding(requests)
        return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)


__all__ = ["HFLMShim"]
