"""``lm_eval --model parathinker``: ParaThinker and its fair baselines as an lm-eval model.

:class:`ParaThinkerLM` subclasses lm-eval's ``HFLM`` (through
:class:`~lm_eval_parathinker.upstream.lm_eval.HFLMShim`, which names its internals; tokenization,
dtype, device, batch size, PEFT adapters, ``accelerate launch`` data parallelism, loglikelihood) and answers
``generate_until`` with :class:`~lm_eval_parathinker.engine.ParaThinkerEngine`:

* ``method=parathinker``: P paths ``<think k> ... </think k>`` decoded in parallel after the
  ParaThinker prompt, then one summary; the response is the whole transcript (paths, then
  summary), so ``--log_samples`` shows every path. ``compat`` picks the layout
  (:class:`~lm_eval_parathinker.protocol.Compat`: ``official`` reproduces the released vLLM engine,
  ``paper`` the method as trained, ``auto`` official when the tokenizer has ``<vllm_pad>``);
  ``format`` (``parallel-r1``, ``multiverse``, ``npr``; detected from a checkpoint's tokenizer)
  decodes a model that forks itself instead (:mod:`lm_eval_parathinker.formats`), loaded as it is;
* ``method=sequential``: one plain sample of exactly the prompt lm-eval hands over;
* ``method=majority``: P plain samples sharing one prefill; the response is the sample whose
  answer wins the vote (ties: earliest).

Its model args are declared by :class:`~.options.RunOptions` and
:class:`~lm_eval_parathinker.engine.EngineOptions` (their fields); the rest are HFLM's. The work is
delegated: checkpoint loading to :mod:`lm_eval_parathinker.checkpoint`, requests to
:mod:`.requests`, engine calls to :mod:`.generator`, resume to :mod:`.journal`.
"""

from __future__ import annotations

import logging
from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  (registers the built-ins first: see the registry pitfall in the docs)
from lm_eval.api.instance import Instance
from lm_eval.api.registry import register_model

from .. import embedded, protocol
from ..checkpoint import ParaThinkerParts, adapter_tokenizer, add_parathinker_parts, has_control_tokens
from ..engine import ParaThinkerEngine
from ..thought_embedding import local_dir, quiet_unexpected_tables, thought_embedding_tables
from ..upstream.lm_eval import HFLMShim
from . import journal
from .generator import Generator, ParaThinkerResponse
from .options import RunOptions, check_hflm_args, slots
from .progress import LiveProgress
from .ranks import Ranks, warn_node_local_journal
from .requests import RequestRunner

logger = logging.getLogger(__name__)
report = logging.getLogger("lm_eval.parathinker")  # lm-eval's messages (--verbosity)

#: model args that never change a response, left out of the journal's fingerprint (``token`` is a credential)
_NOT_OUTPUT_ARGS = frozenset({
    "batch_size", "max_batch_size", "device", "parallelize", "max_memory_per_gpu", "max_cpu_memory",
    "offload_folder", "logits_cache", "softmax_dtype", "token",
})


@register_model("parathinker")
class ParaThinkerLM(HFLMShim):
    """lm-eval model ``parathinker`` (see the module docstring and docs/model-args.md)."""

    def __init__(self, pretrained: str | None = embedded.EMBEDDED_NAME, **kwargs: Any) -> None:
        # Every model arg is validated before any loading; HFLM forwards unknown kwargs to from_pretrained.
        self.options = RunOptions.pop(kwargs)
        self.options.check_journal()
        check_hflm_args(pretrained, kwargs)
        self._peft_arg = kwargs.get("peft")
        self._output_args = {k: v for k, v in kwargs.items() if k not in _NOT_OUTPUT_ARGS}
        self.parts = ParaThinkerParts([], [], None)
        self._pretrained_name = embedded.resolve_pretrained(pretrained)
        super().__init__(pretrained=self._pretrained_name, **kwargs)
        self.ranks = Ranks(self.rank, self.world_size)
        if self.options.resume:
            warn_node_local_journal(self.options.journal_dir, self.world_size)
        self._engine: ParaThinkerEngine | None = None
        self._files_identity: dict | None = None  # checkpoint, adapter, tokenizer, versions: computed once
        self.reset_run_state()
        if self.options.resume:
            report.info("response journal: %s (a rerun of the same command generates only the missing "
                        "responses; journal_dir=... moves it, resume=false turns it off)", self.options.journal_dir)

    def configure(self, batch_size: Any = 1, **model_args: Any) -> None:
        """Switch to another run's ParaThinker args without reloading the weights.

        Takes the args a new model would (``batch_size`` and :meth:`RunOptions.names`); those not
        given take their defaults, so the model then runs as one constructed with these args.
        Everything is validated before anything changes; the engine is kept (its compiled step and
        KV pool) unless ``compile`` changes.

        ``method=parathinker`` needs the control tokens and thought embeddings: construct the model
        with ``method=parathinker`` (or from a ParaThinker checkpoint). Its baselines then never
        sample the token rows that adding the control tokens created (``baseline_banned``).
        """
        unknown = sorted(set(model_args) - set(RunOptions.names()))
        if unknown:
            raise ValueError(f"{unknown} cannot be switched without loading a new model (configure takes batch_size "
                             f"and {', '.join(RunOptions.names())})")
        options = RunOptions.parse(**model_args)
        options.check_journal()
        count = slots(batch_size)
        options = options.resolve(self.tokenizer)
        if options.parathinker and not (
            has_control_tokens(self.tokenizer) and thought_embedding_tables(self.model)
        ):
            raise ValueError("method=parathinker needs the control tokens and thought embeddings, which this model "
                             "was loaded without: construct it with method=parathinker")
        if options.compile != self.options.compile:
            self._engine = None  # the compiled step belongs to the engine
        self.options, self.batch_size_per_gpu = options, count
        self.reset_run_state()

    def reset_run_state(self) -> None:
        """Forget the counters of the runs so far (termination reasons, journal reuse, the engine
        report, warnings given), e.g. between runs that share this model (see :meth:`configure`)."""
        self._warned_generation_only = False
        self.termination_reasons: Counter = Counter()
        self.fork_totals: Counter = Counter()  # a forking format's responses: forks, paths, token counts (summed)
        self.journal_report = {"dir": None, "reused": 0, "generated": 0}
        self._generator: Generator | None = None

    # -- loading ---------------------------------------------------------------------------

    def create_tokenizer(self, pretrained, tokenizer, *args, **kwargs) -> None:
        """A trained adapter directory carries the tokenizer with the control tokens: prefer it."""
        if tokenizer is None:
            tokenizer = adapter_tokenizer(self._peft_arg, kwargs.get("revision"))
        super().create_tokenizer(pretrained, tokenizer, *args, **kwargs)
        self.options = self.options.resolve(self.tokenizer)  # HFLM loads the tokenizer before the model: fail early

    def _create_model(self, pretrained, *args, peft=None, revision="main", **kwargs) -> None:
        """HFLM's loading without its PEFT step, then the ParaThinker parts, then the adapter."""
        with quiet_unexpected_tables():  # official checkpoints hold seg_embeddings: read by add_parathinker_parts
            super()._create_model(pretrained, *args, peft=None, revision=revision, **kwargs)
        # a forking format's checkpoint is loaded as it is: no <think k> tokens, no thought embeddings
        self.parts = add_parathinker_parts(self.model, self.tokenizer, pretrained, revision, peft,
                                           parathinker=self.options.parathinker)
        if peft:
            from peft import PeftModel

            self.set_model(PeftModel.from_pretrained(self.model, peft, revision=revision))

    @property
    def compat(self) -> protocol.Compat | None:
        """The layout ParaThinker decodes with (``compat`` resolved); None for the baselines and the
        forking formats (:attr:`compat_name`)."""
        return self.options.engine.layout if self.options.parathinker else None

    @property
    def compat_name(self) -> str | None:
        """The layout's name as the results record it (auto resolved to paper or official; a forking
        format's: :attr:`EngineOptions.fork_official`); None for the baselines."""
        if self.options.fork_format is not None:
            return "official" if self.options.engine.fork_official else "paper"
        return self.compat.name if self.compat is not None else None

    @property
    def engine(self) -> ParaThinkerEngine:
        if self._engine is None:
            self._engine = ParaThinkerEngine(self.model, self.tokenizer, compile=self.options.compile)
        return self._engine

    @property
    def generator(self) -> Generator:
        if self._generator is None or self._generator.engine is not self.engine:
            self._generator = Generator(self.engine, self, self.options, self.batch_size, self.parts.baseline_banned)
        return self._generator

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """``--apply_chat_template``: the baselines get the model's chat template as with ``--model hf``;
        parathinker gets the messages' plain text, because :func:`protocol.build_prompt` wraps it in
        the chat template itself (together with the ParaThinker instruction)."""
        if self.options.method != "parathinker":
            return super().apply_chat_template(chat_history, add_generation_prompt)
        return "\n".join(message["content"] for message in chat_history)  # a forking format's prompt too

    # -- requests --------------------------------------------------------------------------

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """See :mod:`.requests`: ``batch_size`` prompts decode at a time, a finished one's slot is
        refilled at once, and every response is journaled as it finishes and reused by a rerun."""
        if not requests:
            return []
        self.note_padding(requests)
        opened = journal.ResponseJournal.open(self.options.journal_dir, self.journal_fingerprint(),
                                              self.rank) if self.options.resume else nullcontext()
        runner = RequestRunner(self.generator, lambda text: len(self.tok_encode(text)), self._respond)
        before, forks_before = self.termination_reasons.copy(), self.fork_totals.copy()
        with opened as store, self.ranks.watched() as heartbeat:

            def progress(total: int, reused: int) -> LiveProgress:
                """Rank 0's bar; with the journal it counts every rank's responses (see :mod:`.ranks`)."""
                follow = store is not None and heartbeat is not None
                if follow:
                    total, reused = map(sum, zip(*self.ranks.gather((total, reused))))
                fork_format = self.options.fork_format
                label = f"parathinker {fork_format.name if fork_format is not None else self.options.method}"
                return LiveProgress(total, reused, label,
                                    disable=disable_tqdm or self.rank != 0,
                                    others=store.others_new if follow and self.rank == 0 else None,
                                    finished=heartbeat.finish_here if heartbeat is not None else None)

            outcome = runner.run(requests, store, progress)
        # the results file (written by rank 0) reports the whole run: every rank's counts
        counts = self.ranks.gather((outcome.reused, outcome.generated, self.termination_reasons - before,
                                    self.fork_totals - forks_before))
        self.termination_reasons = before + sum((reasons for _, _, reasons, _ in counts), Counter())
        self.fork_totals = forks_before + sum((totals for _, _, _, totals in counts), Counter())
        self.journal_report = {
            "dir": str(store.folder) if store is not None else None,
            "reused": self.journal_report["reused"] + sum(reused for reused, *_ in counts),
            "generated": self.journal_report["generated"] + sum(generated for _, generated, *_ in counts),
        }
        return outcome.responses

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        self._warn_generation_only()
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        self._warn_generation_only()
        return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

    def _warn_generation_only(self) -> None:
        """Loglikelihood requests score the base model whatever the method: say so, once."""
        if self.options.method != "sequential" and not self._warned_generation_only:
            self._warned_generation_only = True
            logger.warning("method=%s: loglikelihood tasks (multiple choice, perplexity) score the base model, as "
                           "method=sequential does: parallel decoding applies to generation tasks only",
                           self.options.method)

    def _respond(self, request: Instance, gen_kwargs: dict, response: ParaThinkerResponse) -> ParaThinkerResponse:
        """Count a finished (or reused) response and hand it to lm-eval's cache hook."""
        meta = response.meta
        self.termination_reasons[meta["termination"]] += 1
        if self.options.fork_format is not None:
            self.fork_totals.update(responses=1, forks=meta["forks"], paths=meta["num_paths"],
                                    critical_tokens=meta["critical_tokens"], total_tokens=meta["gen_tokens"],
                                    well_formed=meta.get("well_formed_fork", 0))  # (journaled before the metric: 0)
        self.cache_hook.add_partial("generate_until", (request.args[0], gen_kwargs), response)
        return response

    # -- identity and reporting ------------------------------------------------------------

    def journal_fingerprint(self) -> dict:
        """Everything that changes a response other than its generation settings and prompt (which
        key each journal entry): the journal's folder is named by its hash."""
        if self._files_identity is None:
            revision = self._output_args.get("revision", "main")
            self._files_identity = {
                "checkpoint": _checkpoint_identity(self._pretrained_name, revision),
                "adapter": _checkpoint_identity(self._peft_arg, revision) if self._peft_arg else None,
                # transformers 5 no longer records the hub commit on the config (``_commit_hash``, always
                # None here); the checkpoint's files stand for it. The key keeps existing journals' names.
                "commit": None,
                "tokenizer": journal.tokenizer_identity(self.tokenizer),
                "versions": journal.versions(),
            }
        info = self.options.info()
        return {
            **self._files_identity,
            "model_args": self._output_args,
            "parathinker": {**{k: v for k, v in info.items() if k not in self.options.engine.POOL_SIZE},
                            "compat": self.compat_name},
            "max_length": self.max_length,
            "add_bos_token": self.add_bos_token,
            "truncation": self.truncation,
            "think_end_token": self.think_end_token,
            "dtype": str(self.model.dtype),
            "device": self.device.type,
        }

    def get_model_info(self) -> dict:
        """HFLM's info plus the ParaThinker settings (merged into ``config`` of the results JSON)."""
        info = super().get_model_info()
        info["parathinker"] = {
            **self.options.info(),
            "compat": self.compat_name,  # as resolved (auto -> paper/official)
            "training_free": self.parts.training_free if self.options.parathinker else None,
            "thought_embeddings_from": self.parts.tables_source,
            "control_tokens_added": len(self.parts.control_tokens_added),
            "banned_tokens": 0 if self.options.method == "parathinker" else len(self.parts.baseline_banned),
            "termination_reasons": dict(self.termination_reasons),
            "resume": self.options.resume,
            "journal": dict(self.journal_report),
            "engine": dict(self._generator.report if self._generator is not None else {}),
            "forks": self._fork_summary(),
        }
        return info

    def _fork_summary(self) -> dict | None:
        """A forking format's run, journaled responses included (lm-eval's own tasks take no new
        metrics): forks per response, paths per fork, and the critical path against the total (means)."""
        if self.options.fork_format is None:
            return None
        totals = self.fork_totals
        n = totals["responses"] or 1
        return {"format": self.options.fork_format.name, "responses": totals["responses"],
                "forks_per_response": totals["forks"] / n,
                "paths_per_fork": totals["paths"] / totals["forks"] if totals["forks"] else 0.0,
                "critical_tokens": totals["critical_tokens"] / n, "total_tokens": totals["total_tokens"] / n,
                "well_formed_fork": totals["well_formed"] / n}


def _checkpoint_identity(name: str, revision: str) -> dict:
    folder = local_dir(name, revision, ["*.json", "*.safetensors"])
    is_path = Path(name).expanduser().is_dir()
    return {
        "name": str(Path(name).expanduser().resolve()) if is_path else name,
        "revision": None if is_path else revision,
        "files": journal.checkpoint_files(folder),
    }


__all__ = ["ParaThinkerLM"]
