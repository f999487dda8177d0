"""One gen_kwargs group through the engine: its settings, its prompts as the engine takes them, and
the responses lm-eval gets back.

:class:`Generator` holds what a call needs (the engine, the run's resolved options, the model's
tokenization as HFLM does it) and nothing of lm-eval's requests: the request runner
(:mod:`.requests`) decides what to generate, the generator how.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from lm_eval.api.instance import Instance
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from .. import protocol, scoring
from ..engine import GenerationOutput, ParaThinkerEngine
from ..engine import forks as forks_module
from . import samples
from .options import RunOptions

logger = logging.getLogger(__name__)

SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k", "seed", "min_new_tokens")

#: numeric ``.meta`` keys of every response: scoring.process_results turns them into metrics, and
#: the tasks' metric_list declares each one's aggregation
META_METRICS = ("gen_tokens", "think_tokens", "summary_tokens", "num_paths", "paths_finished", "cut_paths", "latency_s",
                "think_s", "forks", "paths_per_fork", "critical_tokens", "well_formed_fork")


class ParaThinkerResponse(str):
    """Generated text plus per-request statistics in ``.meta`` (read by ``scoring.process_results``).

    ``meta`` defaults to None so that pickling (data-parallel gathering) can rebuild the object.
    """

    meta: dict

    def __new__(cls, text: str, meta: dict | None = None) -> ParaThinkerResponse:
        obj = super().__new__(cls, text)
        obj.meta = dict(meta or {})
        return obj


class Tokenization(Protocol):
    """What the generator uses of the lm-eval model: HFLM's tokenization and limits."""

    tokenizer: object
    max_length: int
    truncation: bool
    think_end_token: str | int | None
    eot_token_id: int
    max_gen_toks: int

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str: ...

    def tok_batch_encode(self, strings: list[str], padding_side: str = "left", left_truncate_len: int | None = None,
                         truncation: bool = False): ...


@dataclass(frozen=True)
class GenerationSettings:
    """One gen_kwargs group as the engine runs it (validated before any generation)."""

    until: list[str]
    max_gen_toks: int  # per path
    sampling: dict  # temperature, top_p, top_k, min_new_tokens
    run_seed: int  # gen_kwargs ``seed``, else torch's initial seed (see samples.run_seed)

    def journal_settings(self) -> dict:
        return {"until": self.until, "max_gen_toks": self.max_gen_toks, **self.sampling}


def _sampling(kwargs: dict) -> dict:
    """Engine sampling arguments from lm-eval's normalized gen_kwargs (until/max_gen_toks removed)."""
    unknown = sorted(set(kwargs) - set(SAMPLING_KEYS))
    if unknown:
        raise ValueError(
            f"generation kwargs {unknown} are not supported by --model parathinker "
            f"(supported: until, max_gen_toks, {', '.join(SAMPLING_KEYS)})"
        )
    sample = bool(kwargs.get("do_sample"))
    return {
        "temperature": float(kwargs.get("temperature") or 0.0) if sample else 0.0,
        "top_p": float(kwargs.get("top_p") or 1.0),
        "top_k": int(kwargs.get("top_k") or 0),
        "seed": None if kwargs.get("seed") is None else int(kwargs["seed"]),
        "min_new_tokens": int(kwargs.get("min_new_tokens") or 0),
    }


def _meta(out: GenerationOutput) -> dict:
    """Numeric statistics of one request (process_results averages them), plus the reason string.
    Every method reports its forks, paths per fork and critical path (the longest chain of tokens:
    the latency proxy these papers report, against ``gen_tokens``, the total): ParaThinker one fork
    of P paths before its summary, majority one of P samples, sequential none; ``well_formed_fork``:
    1 when a fork's paths all ended by themselves (closed by their tag, not cut) and were joined."""
    s = out.stats
    if out.root is not None:
        return _fork_meta(out)
    forks = 1 if s["num_paths"] > 1 or s["summary_tokens"] else 0
    return {
        "gen_tokens": s["gen_tokens"],
        "think_tokens": s["think_tokens"],
        "summary_tokens": s["summary_tokens"],
        "num_paths": s["num_paths"],
        "paths_finished": s["paths_finished"],
        "cut_paths": s["num_paths"] - s["paths_finished"],
        # wall times (compilation apart: the engine's compile_s), from the request's admission to its end
        "latency_s": s["latency_s"],
        "think_s": s["think_s"],  # of the think stage (of the samples, for the baselines)
        "forks": forks,
        "paths_per_fork": s["num_paths"] if forks else 0,
        "critical_tokens": max(map(len, out.path_ids)) + s["summary_tokens"],
        "well_formed_fork": int(forks == 1 and s["paths_finished"] == s["num_paths"]),  # every path ended by itself
        "termination": s["termination"],  # a string: kept out of the metrics by process_results
    }


def _fork_meta(out: GenerationOutput) -> dict:
    """:func:`_meta` of a forking format's response: the tokens inside its paths are its thinking."""
    s = out.stats
    paths = forks_module.paths_of(out.root)
    in_paths = sum(forks_module.response_tokens_of(p) for p in paths)
    return {
        "gen_tokens": s["total_tokens"], "think_tokens": in_paths, "summary_tokens": 0, "num_paths": len(paths),
        "paths_finished": sum(p.ended == forks_module.PATH_END for p in paths),
        "cut_paths": sum(p.ended != forks_module.PATH_END for p in paths),
        "latency_s": s["latency_s"], "think_s": s["latency_s"], "forks": s["forks"],
        "paths_per_fork": len(paths) / s["forks"] if s["forks"] else 0, "critical_tokens": s["critical_tokens"],
        "well_formed_fork": int(forks_module.well_formed_forks(out.root) > 0), "termination": s["termination"],
    }


class Generator:
    """Runs engine calls for the lm-eval model (see the module docstring). ``options`` are resolved
    (their layout known); ``banned`` token ids are never sampled by the baselines."""

    def __init__(self, engine: ParaThinkerEngine, lm: Tokenization, options: RunOptions, slots: int,
                 banned: list[int]) -> None:
        self.engine, self.lm, self.options, self.slots, self.banned = engine, lm, options, slots, banned
        self.fork_format = options.fork_format  # a format whose model forks itself (None: ParaThinker, baselines)
        self.parathinker = options.parathinker
        self.report: dict = {}  # the KV pool over the run's engine calls (see _note_engine_stats)
        self._warned_no_problem = False

    @property
    def _eos(self) -> str:
        return self.lm.tok_decode(self.lm.eot_token_id, skip_special_tokens=False)

    def settings(self, gen_kwargs: dict) -> GenerationSettings:
        """lm-eval's gen_kwargs as the engine runs them (unknown kwargs and bad budgets raise)."""
        kwargs = normalize_gen_kwargs(gen_kwargs, self.lm.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=self._eos)
        budget = kwargs.pop("max_gen_toks")
        sampling = _sampling(kwargs)
        self.options.engine.layout.check_budget(budget, "max_gen_toks")
        return GenerationSettings(until, budget, sampling, samples.run_seed(sampling.pop("seed")))

    def question(self, request: Instance) -> str:
        """What the prompt is built from: the context lm-eval hands over, except that the released
        engine's template (compat=official) and a forking format's prompt, which hold their own
        instruction, take the doc's ``problem`` alone."""
        context, layout = request.args[0], self.options.engine.layout
        problem = request.doc.get("problem") if isinstance(request.doc, dict) else None
        if self.fork_format is not None:
            return problem if isinstance(problem, str) else context
        if not (self.parathinker and layout.question_alone):
            return context
        if isinstance(problem, str):
            return layout.question(problem)
        if not self._warned_no_problem:
            logger.warning("compat=official: the task's docs have no 'problem' field; the template gets the task "
                           "prompt instead of the problem alone")
            self._warned_no_problem = True
        return context

    def prompt(self, question: str) -> str:
        """The engine prompt of a question: the ParaThinker prompt, a forking format's, or the question as it is."""
        if self.fork_format is not None:
            return self.fork_format.build_prompt(question, self.lm.tokenizer)
        return protocol.build_prompt(question, self.lm.tokenizer) if self.parathinker else question

    def generate(self, prompts: list[str], seeds: list[int], settings: GenerationSettings,
                 on_response: Callable[[int, ParaThinkerResponse], None]) -> None:
        """One engine call for ``prompts`` (engine prompts), prompt i sampling from ``seeds[i]``."""
        until = settings.until

        def respond(i: int, out: GenerationOutput) -> None:
            if self.fork_format is not None:
                text = _without_stop(out.transcript, until) if out.stats["termination"] == forks_module.STOP else out.transcript
            elif self.parathinker:
                text = self._transcript(out, until)
            else:
                text = self._plain_response(out, until)
            on_response(i, ParaThinkerResponse(text, _meta(out)))

        self.engine.generate(
            self._encode(prompts, settings.max_gen_toks),
            self.options.engine,
            max_new_tokens=settings.max_gen_toks,
            stop_strings=[s for s in until if s and s != self._eos],  # EOS is handled by token id
            seed=seeds,
            banned_tokens=self.banned if self.options.method != "parathinker" else (),
            num_slots=self.slots,
            on_output=respond,
            **settings.sampling,
        )
        self._note_engine_stats(self.engine.last_stats)

    def _note_engine_stats(self, stats: dict) -> None:
        """The KV pool's use over the run (the largest pool and peak, every preemption) and the
        compiled step's (whether it ran compiled, the seconds and graphs compiled, a failure)."""
        report = self.report
        report["attention"] = stats["attention"]
        for key in ("kv_page_size", "kv_pool_pages", "kv_pool_bytes", "kv_peak_pages", "kv_peak_bytes"):
            report[key] = max(report.get(key, 0), stats[key])
        report["preemptions"] = report.get("preemptions", 0) + stats["preemptions"]
        if "compiled" not in stats:  # a forking format decodes eager
            return
        report["compiled"], report["compile_failure"] = stats["compiled"], stats["compile_failure"]
        for key in ("compile_s", "compilations"):  # this process's: compiled once, reused by later calls
            report[key] = report.get(key, 0) + stats[key]

    def _encode(self, prompts: list[str], budget: int) -> list[list[int]]:
        """Token ids as HFLM encodes them, left-truncated to leave room for the generation."""
        opts, layout = self.options.engine, self.options.engine.layout
        reserve = budget * (opts.num_paths if opts.positions == "flattened" and self.parathinker else 1)
        if self.parathinker:
            template = self.lm.tokenizer(protocol.SUMMARY_TEMPLATE, add_special_tokens=False)["input_ids"]
            reserve += len(template) + opts.summary_max_tokens
        room = self.lm.max_length - reserve
        if room <= 0:
            raise ValueError(
                f"max_gen_toks={budget} (per path) leaves no room for the prompt within the model's "
                f"max_length={self.lm.max_length}"
            )
        if layout.pad_to_multiple_of:  # the released engine's ids, never truncated
            return [layout.prompt_ids(p, self.lm.tokenizer) for p in prompts]
        ids, mask = self.lm.tok_batch_encode(prompts, left_truncate_len=room, truncation=self.lm.truncation)
        return [row[m.bool()].tolist() for row, m in zip(ids, mask)]

    def _sample_text(self, token_ids: list[int], until: list[str]) -> str:
        """One plain sample as HFLM returns it: special tokens skipped, cut at the first stop string."""
        think_end = self.lm.think_end_token if isinstance(self.lm.think_end_token, str) else None
        return postprocess_generated_text(self.lm.tok_decode(token_ids), until, think_end)

    def _plain_response(self, out: GenerationOutput, until: list[str]) -> str:
        """A sample, or with several the one whose answer wins the vote (ties: the earliest)."""
        texts = [self._sample_text(ids, until) for ids in out.path_ids]
        if len(texts) == 1:
            return texts[0]
        winner = scoring.majority_answer([scoring.extract_answer(t) for t in texts])
        return texts[0 if winner is None else winner]

    @staticmethod
    def _transcript(out: GenerationOutput, until: list[str]) -> str:
        """Every path (with its control tokens), then the summary cut at the first stop string."""
        return "".join(out.path_texts) + postprocess_generated_text(out.summary_text, until, None)


def _without_stop(text: str, until: list[str]) -> str:
    """A forking format's response that a stop string ended (on its main line): cut before it."""
    found = [text.rfind(s) for s in until if s and s in text]
    return text[: max(found)] if found else text
