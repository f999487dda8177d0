"""lm-eval internals on the model side: HFLM's, behind :class:`HFLMShim`, and the CLI's call of
``simple_evaluate`` that the experiments runner mirrors. (The start-up hook's task loading is in
:mod:`.lm_eval_tasks`, which must not import lm-eval.) Guarded by tests/test_upstream.py."""

from __future__ import annotations

import inspect
from collections import Counter
from typing import Any

from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM


class HFLMShim(HFLM):
    """``HFLM`` with the internals the ``parathinker`` model needs as public names. HFLM's
    sanctioned override points (``_create_model``, ``_model_generate``) are overridden directly;
    every other internal is one override or accessor here."""

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
        self.padded_requests: list[Instance] = []

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
        self.padded_requests = [request for request in unique if copies[id(request)] > (request.repeats or 1)]

    def barrier(self) -> None:
        """lm-eval's barrier after each request type's responses are in: drop the padding's responses
        (see :meth:`note_padding`), so a sample holds its ``repeats`` responses as on one process."""
        for request in self.padded_requests:
            del request.resps[request.repeats or 1:]
        self.padded_requests = []
        super().barrier()

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list:
        """HFLM's, with the padding noted."""
        self.note_padding(requests)
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list:
        """HFLM's, with the padding noted."""
        self.note_padding(requests)
        return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

    def _create_tokenizer(self, *args: Any, **kwargs: Any) -> None:
        self.create_tokenizer(*args, **kwargs)

    def create_tokenizer(self, pretrained, tokenizer, *args: Any, **kwargs: Any) -> None:
        """Load the tokenizer (HFLM's ``_create_tokenizer``, which it calls before loading the
        model, with ``revision`` among its keywords): override to choose another one."""
        HFLM._create_tokenizer(self, pretrained, tokenizer, *args, **kwargs)

    def set_model(self, model) -> None:
        """Replace the model HFLM holds (its ``_model``), e.g. by the model wrapped in an adapter
        after loading; read it back with HFLM's ``model``."""
        self._model = model


def cli_evaluate_source() -> str:
    """The source of lm-eval's CLI function that calls ``simple_evaluate`` (``Run._execute``):
    lm-eval has no public function that runs a config on a model object, so the experiments
    runner mirrors that call, and a test compares their keywords."""
    from lm_eval._cli.run import Run

    return inspect.getsource(Run._execute)
