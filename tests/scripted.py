"""Scripted sampling for engine tests: force chosen tokens, let the model choose the rest."""

from __future__ import annotations

import torch

from lm_eval_parathinker.engine import sampling

MODEL_SAMPLE = sampling.sample  # the engine's own sampler (Scripts replace it, never wrap each other)


class Script:
    """Stands in for ``engine.sampling.sample``.

    ``paths[i][k]`` forces token i (its position in the path, ``<think k>`` being 0) of path k
    (0-based); ``summary[i]`` forces generated summary token i. ``path_default`` /
    ``summary_default`` force every other token of that kind; otherwise the model's own sampler
    chooses. ``by_request[r]`` replaces ``paths`` for request r.
    """

    def __init__(self, paths=None, summary=(), path_default=None, summary_default=None, by_request=None):
        self.paths, self.summary = paths or {}, list(summary)
        self.path_default, self.summary_default = path_default, summary_default
        self.by_request = by_request or {}

    def install(self, monkeypatch) -> Script:
        monkeypatch.setattr(sampling, "sample", self)
        return self

    def forced(self, request: int, path: int, index: int):
        if path == sampling.SUMMARY_STREAM:
            return self.summary[index] if index < len(self.summary) else self.summary_default
        return self.by_request.get(request, self.paths).get(index, {}).get(path, self.path_default)

    def __call__(self, logits: torch.Tensor, params, draw: sampling.Draw) -> torch.Tensor:
        tokens = MODEL_SAMPLE(logits, params, draw).clone()
        requests, paths, indices = draw.request.tolist(), draw.path.tolist(), draw.index.tolist()
        for r, request in enumerate(requests):
            for q, (path, index) in enumerate(zip(paths[r], indices[r])):
                token = self.forced(request, path, index)
                if token is not None:
                    tokens[r, q] = token
        return tokens
