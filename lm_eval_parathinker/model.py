"""``lm_eval --model parathinker``: ParaThinker and its fair baselines as an lm-eval model.

:class:`ParaThinkerLM` subclasses lm-eval's ``HFLM`` (tokenization, dtype, device, batch size,
PEFT adapters, ``accelerate launch`` data parallelism, loglikelihood) and implements
``generate_until`` with :class:`~lm_eval_parathinker.engine.ParaThinkerEngine`:

* ``method=parathinker``: P paths ``<think k> ... </think k>`` decoded in parallel after the
  ParaThinker prompt (:func:`protocol.build_prompt`), then one summary; the response is the whole
  transcript (paths, then summary), so ``--log_samples`` shows every path. ``compat`` picks the
  layout (:class:`protocol.Compat`): ``official`` reproduces the released vLLM engine (the
  template gets the doc's ``problem`` alone, prompt and paths padded to blocks of 16, ...),
  ``paper`` the method as trained, ``auto`` official when the tokenizer has ``<vllm_pad>``;
* ``method=sequential``: one plain sample of exactly the prompt lm-eval hands over (greedy
  decoding gives the same text as ``--model hf``);
* ``method=majority``: P plain samples sharing one prefill; the response is the sample whose
  answer (``scoring.extract_answer``) wins the vote (``scoring.majority_answer``, ties: earliest).

Every response is a :class:`ParaThinkerResponse` (a ``str``) whose ``.meta`` holds numeric
statistics that ``scoring.process_results`` turns into metrics of the results JSON.

A response is a pure function of its sample's key (:mod:`samples`: run seed, task, doc, repeat), so
it is journaled as it finishes (:mod:`journal`) and a rerun of the same command reuses it instead of
generating it again (``resume=true``, the default; ``journal_dir`` moves the journal).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  (registers the built-ins first: see the registry pitfall in the docs)
from lm_eval.api.instance import Instance
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import (
    Collator,
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)

from . import embedded, journal, protocol, samples, scoring
from .engine import EngineOptions, GenerationOutput, ParaThinkerEngine
from .engine.options import as_bool
from .progress import LiveProgress
from .thought_embedding import (
    add_control_tokens,
    attach_thought_embeddings,
    load_thought_embeddings,
    local_dir,
    quiet_unexpected_tables,
    read_thought_embeddings,
    thought_embedding_tables,
)

logger = logging.getLogger(__name__)
# A child of lm-eval's logger: the journal's reports appear with lm-eval's own messages (--verbosity).
report = logging.getLogger("lm_eval.parathinker")

METHODS = ("parathinker", "sequential", "majority")
_ENGINE_MODE = {"parathinker": "parathinker", "sequential": "sequential", "majority": "independent"}
_SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k", "seed", "min_new_tokens")
#: file of a PEFT adapter directory that holds the trained thought embeddings (official key names)
ADAPTER_TABLES_FILE = "thought_embeddings.safetensors"
#: model args that never change a response, left out of the journal's fingerprint (``token`` is a credential)
_NOT_OUTPUT_ARGS = frozenset({
    "batch_size", "max_batch_size", "device", "parallelize", "max_memory_per_gpu", "max_cpu_memory",
    "offload_folder", "logits_cache", "softmax_dtype", "token",
})


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")
    return value


@dataclass(frozen=True)
class ParaThinkerOptions:
    """The ParaThinker model args (validated; see the README, "Model args"): the method, whether
    to compile the decode step, and the engine's options (:class:`EngineOptions`, whose field
    names are the model args of the same name)."""

    method: str = "parathinker"
    compile: bool = False  # torch.compile the decode step (CUDA graphs on GPU)
    engine: EngineOptions = field(default_factory=EngineOptions)

    @classmethod
    def parse(cls, method: str = "parathinker", compile: Any = False, **engine_args: Any) -> ParaThinkerOptions:
        method = _choice("method", method, METHODS)
        if engine_args.get("compat") == "official" and method != "parathinker":
            raise ValueError(f"compat=official applies to method=parathinker only, not method={method}")
        num_paths = engine_args.pop("num_paths", None)
        if method == "sequential":
            if num_paths not in (None, 1, "1"):
                raise ValueError(f"num_paths={num_paths!r} has no meaning for method=sequential (one path); omit it")
            num_paths = 1
        engine = EngineOptions.parse(num_paths=8 if num_paths is None else num_paths, **engine_args)
        # parathinker paths are named by the <think k> control tokens, of which the protocol has 8
        upper = protocol.DEFAULT_NUM_CONTROL_PATHS if method == "parathinker" else None
        if upper is not None and engine.num_paths > upper:
            raise ValueError(f"num_paths={engine.num_paths} is out of range for method={method}: must be between 1 "
                             f"and {upper}")
        return cls(method=method, compile=as_bool("compile", compile), engine=engine)

    def info(self) -> dict:
        """Flat, as the results JSON records them."""
        return {"method": self.method, "compile": self.compile, **asdict(self.engine)}

    def check_layout(self, layout: protocol.Compat) -> None:
        """Refuse what the layout (a resolved ``compat``) cannot run."""
        if layout.pad_to_multiple_of and self.engine.positions == "flattened":
            raise ValueError("positions=flattened has no equivalent in the released engine (compat=official)")

    def layout(self, tokenizer) -> protocol.Compat | None:
        """The layout a ``parathinker`` run uses with ``tokenizer`` (``compat=auto`` resolved), checked;
        None for the baselines, which have no layout."""
        if self.method != "parathinker":
            return None
        layout = protocol.resolve_compat(self.engine.compat, tokenizer)
        self.check_layout(layout)
        return layout

    def check_budget(self, max_gen_toks: int, layout: protocol.Compat | None) -> None:
        """Refuse a per-path budget the layout does not allow."""
        block = layout.pad_to_multiple_of if layout is not None else None
        if block and max_gen_toks % block:
            raise ValueError(
                f"max_gen_toks={max_gen_toks} (the per-path budget) must be a multiple of {block} with "
                "compat=official (the released engine asserts it)"
            )


class ParaThinkerResponse(str):
    """Generated text plus per-request statistics in ``.meta`` (read by ``scoring.process_results``).

    ``meta`` defaults to None so that pickling (data-parallel gathering) can rebuild the object.
    """

    meta: dict

    def __new__(cls, text: str, meta: dict | None = None) -> ParaThinkerResponse:
        obj = super().__new__(cls, text)
        obj.meta = dict(meta or {})
        return obj


def _looks_like_local_path(name: str) -> bool:
    """Paths (not hub ids): absolute, relative with ./ ../ ~, or more than one '/'."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


def _check_checkpoint_arg(arg: str, value: str | None) -> None:
    """Fail early, naming the model arg, when a local checkpoint path does not exist."""
    if value is None or Path(value).expanduser().exists() or not _looks_like_local_path(value):
        return
    raise ValueError(f"{arg}={value}: no such checkpoint directory")


def adapter_tokenizer(peft: str | None, revision: str | None) -> str | None:
    """The folder of an adapter that carries its own tokenizer (a trained one has the control tokens)."""
    adapter = local_dir(peft, revision, ["*.json", "*.txt", "*.model"]) if peft is not None else None
    return str(adapter) if adapter is not None and (adapter / "tokenizer_config.json").is_file() else None


def _has_control_tokens(tokenizer) -> bool:
    vocab = tokenizer.get_vocab()
    return all(t in vocab for t in protocol.control_tokens())


def _fit_embeddings(model, tokenizer) -> None:
    """Grow the embeddings when the tokenizer (e.g. an adapter's) has more tokens than rows."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))


def _sampling(kwargs: dict) -> dict:
    """Engine sampling arguments from lm-eval's normalized gen_kwargs (until/max_gen_toks removed)."""
    unknown = sorted(set(kwargs) - set(_SAMPLING_KEYS))
    if unknown:
        raise ValueError(
            f"generation kwargs {unknown} are not supported by --model parathinker "
            f"(supported: until, max_gen_toks, {', '.join(_SAMPLING_KEYS)})"
        )
    sample = bool(kwargs.get("do_sample"))
    return {
        "temperature": float(kwargs.get("temperature") or 0.0) if sample else 0.0,
        "top_p": float(kwargs.get("top_p") or 1.0),
        "top_k": int(kwargs.get("top_k") or 0),
        "seed": None if kwargs.get("seed") is None else int(kwargs["seed"]),
        "min_new_tokens": int(kwargs.get("min_new_tokens") or 0),
    }


@dataclass(frozen=True)
class GenerationSettings:
    """One gen_kwargs group as the engine runs it (validated before any generation)."""

    until: list[str]
    max_gen_toks: int  # per path
    sampling: dict  # temperature, top_p, top_k, min_new_tokens
    run_seed: int  # gen_kwargs ``seed``, else torch's initial seed (see samples.run_seed)

    def journal_settings(self) -> dict:
        return {"until": self.until, "max_gen_toks": self.max_gen_toks, **self.sampling}


@dataclass
class _Job:
    """The requests of one gen_kwargs group: engine prompts, seeds and journal keys, by request position."""

    gen_kwargs: dict
    settings: GenerationSettings
    indices: list[int]
    prompts: list[str]
    seeds: list[int]
    journal_keys: list[str]


#: numeric ``.meta`` keys of every response: scoring.process_results turns them into metrics, and
#: the tasks' metric_list declares each one's aggregation
META_METRICS = ("gen_tokens", "think_tokens", "summary_tokens", "num_paths", "paths_finished", "cut_paths", "latency_s",
                "think_s")


def _meta(out: GenerationOutput) -> dict:
    """Numeric statistics of one request (process_results averages them), plus the reason string."""
    s = out.stats
    return {
        "gen_tokens": s["gen_tokens"],
        "think_tokens": s["think_tokens"],
        "summary_tokens": s["summary_tokens"],
        "num_paths": s["num_paths"],
        "paths_finished": s["paths_finished"],
        "cut_paths": s["num_paths"] - s["paths_finished"],
        "latency_s": s["latency_s"],  # wall time from the request's admission to its end
        "think_s": s["think_s"],  # wall time of the think stage (of the samples, for the baselines)
        "termination": s["termination"],  # a string: kept out of the metrics by process_results
    }


def _slots(batch_size: Any) -> int:
    """``batch_size`` as the engine's number of slots (a number of prompts)."""
    if str(batch_size).startswith("auto"):
        raise ValueError("batch_size=auto is not supported by --model parathinker: pass a number of prompts")
    try:
        slots = int(batch_size)
    except (TypeError, ValueError):
        raise ValueError(f"batch_size={batch_size!r} is not a number of prompts") from None
    if slots < 1:
        raise ValueError(f"batch_size={slots} must be at least 1")
    return slots


@dataclass(frozen=True)
class _RunArgs:
    """The model args that ``configure`` can switch, validated (the journal folder proven writable)."""

    options: ParaThinkerOptions
    resume: bool
    journal_root: Path

    @classmethod
    def parse(cls, method: Any, compile: Any, journal_dir: str | None, resume: Any, engine_args: dict) -> _RunArgs:
        unknown = sorted(set(engine_args) - set(EngineOptions.names()))
        if unknown:
            raise ValueError(f"{unknown} cannot be switched without loading a new model (configure takes method, "
                             f"compile, journal_dir, resume, batch_size and the engine options)")
        run = cls(ParaThinkerOptions.parse(method, compile, **engine_args), as_bool("resume", resume),
                  (Path(journal_dir).expanduser() if journal_dir else journal.default_dir()).absolute())
        if run.resume:
            journal.check_writable(run.journal_root)  # fail before the weights load
        return run


@register_model("parathinker")
class ParaThinkerLM(HFLM):
    """lm-eval model ``parathinker`` (see the module docstring and the README, "Usage")."""

    def __init__(
        self,
        pretrained: str | None = embedded.EMBEDDED_NAME,
        method: str = "parathinker",
        compile: bool = False,
        journal_dir: str | None = None,
        resume: bool = True,
        **kwargs: Any,
    ) -> None:
        # Everything is validated before any loading; HFLM forwards unknown kwargs to from_pretrained.
        # The engine's options (num_paths, termination, ...: EngineOptions) are model args of their names.
        engine_args = {name: kwargs.pop(name) for name in EngineOptions.names() if name in kwargs}
        self._use(_RunArgs.parse(method, compile, journal_dir, resume, engine_args))
        _slots(kwargs.get("batch_size", 1))
        if isinstance(kwargs.get("think_end_token"), int) or str(kwargs.get("think_end_token", "")).isdigit():
            raise ValueError("think_end_token must be given as a string (not a token id) for --model parathinker")
        if not isinstance(pretrained, str) and pretrained is not None:
            raise ValueError("pretrained must be a checkpoint path, a hub id or 'embedded'")
        _check_checkpoint_arg("pretrained", pretrained if not embedded.is_embedded(pretrained) else None)
        _check_checkpoint_arg("peft", kwargs.get("peft"))
        self._peft_arg = kwargs.get("peft")
        self._output_args = {k: v for k, v in kwargs.items() if k not in _NOT_OUTPUT_ARGS}
        self.control_tokens_added: list[str] = []
        self.baseline_banned: list[int] = []  # see _create_model
        self.tables_source: str | None = None
        self.compat: protocol.Compat | None = None  # resolved with the tokenizer (method=parathinker)
        self._pretrained_name = embedded.resolve_pretrained(pretrained)
        super().__init__(pretrained=self._pretrained_name, **kwargs)
        self._engine: ParaThinkerEngine | None = None
        self._files_identity: dict | None = None  # checkpoint, adapter, tokenizer, versions: computed once
        self.reset_run_state()
        if self.resume:
            report.info("response journal: %s (a rerun of the same command generates only the missing "
                        "responses; journal_dir=... moves it, resume=false turns it off)", self.journal_root)

    def _use(self, run: _RunArgs) -> None:
        self.options, self.resume, self.journal_root = run.options, run.resume, run.journal_root

    def configure(self, method: str = "parathinker", compile: Any = False, journal_dir: str | None = None,
                  resume: Any = True, batch_size: Any = 1, **engine_args: Any) -> None:
        """Switch to another run's ParaThinker args without reloading the weights.

        Takes the args a new model would (``method``, ``compile``, ``journal_dir``, ``resume``,
        ``batch_size`` and the engine options: ``num_paths``, ``termination``, ...); those not given
        take their defaults, so the model then runs as one constructed with these args. Everything
        is validated before anything changes. The layout (``compat``) is resolved again, the per-run
        state reset, and the engine kept (its compiled step and KV pool) unless ``compile`` changes.

        ``method=parathinker`` needs the control tokens and thought embeddings: construct the model
        with ``method=parathinker`` (or from a ParaThinker checkpoint). Its baselines then never
        sample the token rows that adding the control tokens created, so they give what a model
        constructed for them alone gives (``baseline_banned``).
        """
        run = _RunArgs.parse(method, compile, journal_dir, resume, engine_args)
        slots = _slots(batch_size)
        if run.options.method == "parathinker" and not (
            _has_control_tokens(self.tokenizer) and thought_embedding_tables(self.model)
        ):
            raise ValueError("method=parathinker needs the control tokens and thought embeddings, which this model "
                             "was loaded without: construct it with method=parathinker")
        layout = run.options.layout(self.tokenizer)
        if run.options.compile != self.options.compile:
            self._engine = None  # the compiled step belongs to the engine
        self._use(run)
        self.compat = layout
        self.batch_size_per_gpu = slots
        self.reset_run_state()

    def reset_run_state(self) -> None:
        """Forget the counters of the runs so far (termination reasons, journal reuse, the engine
        report, warnings given), e.g. between runs that share this model (see :meth:`configure`)."""
        self._warned_no_problem = False
        self.termination_reasons: Counter = Counter()
        self.journal_report = {"dir": None, "reused": 0, "generated": 0}
        self.engine_report: dict = {}  # the KV pool over the run's engine calls (see _note_engine_stats)

    # -- loading ---------------------------------------------------------------------------

    def _create_tokenizer(self, pretrained, tokenizer, *args, **kwargs) -> None:
        """A trained adapter directory carries the tokenizer with the control tokens: prefer it."""
        if tokenizer is None:
            tokenizer = adapter_tokenizer(self._peft_arg, kwargs.get("revision"))
        super()._create_tokenizer(pretrained, tokenizer, *args, **kwargs)
        self.compat = self.options.layout(self.tokenizer)  # HFLM loads the tokenizer before the model: fail early

    def _create_model(self, pretrained, *args, peft=None, revision="main", **kwargs) -> None:
        """HFLM's loading without its PEFT step, then control tokens, thought embeddings, adapter.

        Control tokens are added (and the embeddings resized, only if needed) before the adapter
        is applied, so the adapter's trained token rows land on the ids it was trained with.
        """
        with quiet_unexpected_tables():  # official checkpoints hold seg_embeddings: read below
            super()._create_model(pretrained, *args, peft=None, revision=revision, **kwargs)
        model = self._model
        _fit_embeddings(model, self.tokenizer)  # the tokenizer's own tokens first, as for the checkpoint alone
        rows = model.get_input_embeddings().weight.shape[0]
        if self.options.method == "parathinker" or _has_control_tokens(self.tokenizer):
            self.control_tokens_added = add_control_tokens(model, self.tokenizer)
        # Rows created for the added control tokens: the checkpoint alone has no such tokens, so the
        # baselines never sample them (their other rows' logits are untouched).
        self.baseline_banned = [i for i in self.tokenizer.convert_tokens_to_ids(self.control_tokens_added) if i >= rows]
        self._load_tables(model, pretrained, revision, peft)
        if peft:
            from peft import PeftModel

            self._model = PeftModel.from_pretrained(model, peft, revision=revision)

    def _tables_dir(self, pretrained: str, revision: str, peft: str | None) -> Path | None:
        """The adapter dir when it holds thought embeddings, else the checkpoint dir."""
        adapter = local_dir(peft, revision, [ADAPTER_TABLES_FILE]) if peft else None
        if adapter is not None and (adapter / ADAPTER_TABLES_FILE).is_file():
            return adapter
        return local_dir(pretrained, revision, ["*.json", "*.safetensors"])

    def _load_tables(self, model, pretrained: str, revision: str, peft: str | None) -> None:
        source = self._tables_dir(pretrained, revision, peft)
        has_tables = source is not None and bool(read_thought_embeddings(source))
        if has_tables:
            load_thought_embeddings(model, source)
            self.tables_source = str(source)
        elif self.options.method == "parathinker":
            attach_thought_embeddings(model, getattr(model.config, "max_segments", protocol.DEFAULT_MAX_SEGMENTS))
        if self.options.method == "parathinker" and (self.control_tokens_added or not has_tables):
            missing = (["control tokens"] if self.control_tokens_added else []) + ([] if has_tables else ["thought embeddings"])
            logger.warning(
                "%s has no trained ParaThinker %s: running training-free ParaThinker (control tokens "
                "added, zero thought embeddings). Results are NOT those of a trained ParaThinker model.",
                peft or pretrained,
                " or ".join(missing),
            )

    @property
    def training_free(self) -> bool:
        return bool(self.control_tokens_added) or self.tables_source is None

    @property
    def engine(self) -> ParaThinkerEngine:
        if self._engine is None:
            self._engine = ParaThinkerEngine(self.model, self.tokenizer, compile=self.options.compile)
        return self._engine

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """``--apply_chat_template``: the baselines get the model's chat template as with ``--model hf``;
        parathinker gets the messages' plain text, because :func:`protocol.build_prompt` wraps it in
        the chat template itself (together with the ParaThinker instruction)."""
        if self.options.method != "parathinker":
            return super().apply_chat_template(chat_history, add_generation_prompt)
        return "\n".join(message["content"] for message in chat_history)

    # -- generation ------------------------------------------------------------------------

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Requests with identical gen_kwargs go to the engine together: ``batch_size`` of them
        run at a time, and a finished one's slot is refilled at once (continuous batching). Each
        response samples from the random stream of its key (:mod:`samples`), so it does not depend on
        the batching, the other tasks, ``--limit`` or the rank; it is journaled as it finishes, and a
        response already in the journal is reused instead of generated."""
        if not requests:
            return []
        keys = samples.sample_keys(requests)
        collator = Collator(
            [(*req.args[:2], self._question(req), i) for i, req in enumerate(requests) if not keys[i].padding],
            sort_fn=lambda args: (-len(self.tok_encode(args[0])), args[0]),  # longest first: the last slots free up sooner
            group_by="gen_kwargs",
            group_fn=lambda args: args[1],
        )
        jobs = [self._job(group, keys) for group in collator.get_batched(n=0)]  # n=0: each gen_kwargs group whole
        responses: list[ParaThinkerResponse | None] = [None] * len(requests)
        opened = journal.ResponseJournal.open(self.journal_root, self.journal_fingerprint(), self._process_index()) \
            if self.resume else nullcontext()
        with opened as store:
            reused = self._reuse(jobs, requests, responses, store) if store is not None else []
            total = sum(len(job.indices) for job in jobs)
            if store is not None:
                report.info("response journal %s: reusing %d of %d responses (files: %s), generating %d",
                            store.folder, len(reused), total, ", ".join(p.name for p in store.files_read) or "none",
                            total - len(reused))
            bar = LiveProgress(total, len(reused), f"parathinker {self.options.method}",
                               disable=disable_tqdm or self.rank != 0)
            try:
                for i in reused:
                    bar.add(responses[i], requests[i].doc, generated=False)
                for job in jobs:
                    self._run_job(job, requests, keys, responses, store, bar)
            finally:
                bar.close()
        self._fill_padding(requests, keys, responses)
        self.journal_report = {
            "dir": str(store.folder) if store is not None else None,
            "reused": self.journal_report["reused"] + len(reused),
            "generated": self.journal_report["generated"] + total - len(reused),
        }
        return responses

    def _reuse(self, jobs: list[_Job], requests: list[Instance], responses: list,
               store: journal.ResponseJournal) -> list[int]:
        """Fill in the responses the journal holds; returns their positions."""
        reused = []
        for job in jobs:
            for i, key in zip(job.indices, job.journal_keys):
                if (record := store.get(key)) is not None:
                    response = ParaThinkerResponse(record["response"], record["meta"])
                    responses[i] = self._respond(requests[i], job, response)
                    reused.append(i)
        return reused

    def _job(self, group, keys: list[samples.SampleKey]) -> _Job:
        """Settings, engine prompts, seeds and journal keys of one gen_kwargs group (validated)."""
        _, all_kwargs, questions, indices = zip(*group)
        settings = self._settings(all_kwargs[0])
        parathinker = self.options.method == "parathinker"
        prompts = [protocol.build_prompt(q, self.tokenizer) for q in questions] if parathinker else list(questions)
        sample_keys = [keys[i] for i in indices]
        return _Job(
            gen_kwargs=all_kwargs[0],
            settings=settings,
            indices=list(indices),
            prompts=prompts,
            seeds=[key.seed(settings.run_seed) for key in sample_keys],
            journal_keys=[
                journal.entry_key(settings.journal_settings(), prompt, {**asdict(key), "run_seed": settings.run_seed})
                for prompt, key in zip(prompts, sample_keys)
            ],
        )

    def _run_job(self, job: _Job, requests: list[Instance], keys: list[samples.SampleKey],
                 responses: list, store: journal.ResponseJournal | None, bar: LiveProgress) -> None:
        """Generate the job's responses that are not in the journal, journaling each as it finishes."""
        missing = [j for j, i in enumerate(job.indices) if responses[i] is None]
        if not missing:
            return

        def finished(m: int, response: ParaThinkerResponse) -> None:
            j = missing[m]
            i = job.indices[j]
            if store is not None:
                key = keys[i]
                store.append(job.journal_keys[j], {
                    "task": key.task, "doc_hash": key.doc_hash, "repeat": key.repeat, "seed": job.seeds[j],
                    "response": str(response), "meta": response.meta,
                })
            responses[i] = self._respond(requests[i], job, response)
            bar.add(response, requests[i].doc)

        self._generate([job.prompts[j] for j in missing], [job.seeds[j] for j in missing], job.settings, finished)

    def _respond(self, request: Instance, job: _Job, response: ParaThinkerResponse) -> ParaThinkerResponse:
        """Count a finished (or reused) response and hand it to lm-eval's cache hook."""
        self.termination_reasons[response.meta["termination"]] += 1
        self.cache_hook.add_partial("generate_until", (request.args[0], job.gen_kwargs), response)
        return response

    @staticmethod
    def _fill_padding(requests: list[Instance], keys: list[samples.SampleKey], responses: list) -> None:
        """Data-parallel padding copies (discarded by lm-eval) get the response of the sample they copy."""
        position = {(id(requests[i]), key.repeat): i for i, key in enumerate(keys) if not key.padding}
        for i, key in enumerate(keys):
            if key.padding:
                responses[i] = responses[position[(id(requests[i]), key.repeat % requests[i].repeats)]]

    def _process_index(self) -> int:
        """This process's global rank, which names its journal file (HFLM's ``rank`` is the node-local one)."""
        accelerator = getattr(self, "accelerator", None)
        return accelerator.process_index if accelerator is not None else self.rank

    def journal_fingerprint(self) -> dict:
        """Everything that changes a response other than its generation settings and prompt (which
        key each journal entry): the journal's folder is named by its hash."""
        if self._files_identity is None:
            revision = self._output_args.get("revision", "main")
            self._files_identity = {
                "checkpoint": self._checkpoint_identity(self._pretrained_name, revision),
                "adapter": self._checkpoint_identity(self._peft_arg, revision) if self._peft_arg else None,
                "commit": getattr(self.config, "_commit_hash", None),
                "tokenizer": journal.tokenizer_identity(self.tokenizer),
                "versions": journal.versions(),
            }
        return {
            **self._files_identity,
            "model_args": self._output_args,
            "parathinker": {**{k: v for k, v in self.options.info().items() if k not in EngineOptions.POOL_SIZE},
                            "compat": self.compat.name if self.compat is not None else None},
            "max_length": self.max_length,
            "add_bos_token": self.add_bos_token,
            "truncation": self.truncation,
            "think_end_token": self.think_end_token,
            "dtype": str(self._model.dtype),
            "device": self.device.type,
        }

    @staticmethod
    def _checkpoint_identity(name: str, revision: str) -> dict:
        folder = local_dir(name, revision, ["*.json", "*.safetensors"])
        is_path = Path(name).expanduser().is_dir()
        return {
            "name": str(Path(name).expanduser().resolve()) if is_path else name,
            "revision": None if is_path else revision,
            "files": journal.checkpoint_files(folder),
        }

    def _question(self, request: Instance) -> str:
        """What the prompt is built from: the context lm-eval hands over, except that the released
        engine's template takes the doc's ``problem`` alone (compat=official)."""
        context = request.args[0]
        if self.compat is None or not self.compat.question_alone:
            return context
        problem = request.doc.get("problem") if isinstance(request.doc, dict) else None
        if isinstance(problem, str):
            return self.compat.question(problem)
        if not self._warned_no_problem:
            logger.warning("compat=official: the task's docs have no 'problem' field; the template gets the "
                           "task prompt instead of the problem alone")
            self._warned_no_problem = True
        return context

    def _settings(self, gen_kwargs: dict) -> GenerationSettings:
        """lm-eval's gen_kwargs as the engine runs them (unknown kwargs and bad budgets raise)."""
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
        budget = kwargs.pop("max_gen_toks")
        sampling = _sampling(kwargs)
        self.options.check_budget(budget, self.compat)
        return GenerationSettings(until, budget, sampling, samples.run_seed(sampling.pop("seed")))

    def _generate(self, prompts: list[str], seeds: list[int], settings: GenerationSettings,
                  on_response: Callable[[int, ParaThinkerResponse], None]) -> None:
        """One engine call for ``prompts`` (built prompts), prompt i sampling from ``seeds[i]``."""
        opts = self.options
        until = settings.until
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        parathinker = opts.method == "parathinker"

        def respond(i: int, out: GenerationOutput) -> None:
            text = self._transcript(out, until) if parathinker else self._plain_response(out, until)
            on_response(i, ParaThinkerResponse(text, _meta(out)))

        self.engine.generate(
            self._encode(prompts, settings.max_gen_toks),
            opts.engine.replace(compat=self.compat.name if parathinker else "paper"),  # compat as resolved
            mode=_ENGINE_MODE[opts.method],
            max_new_tokens=settings.max_gen_toks,
            stop_strings=[s for s in until if s and s != eos],  # EOS is handled by token id
            seed=seeds,
            banned_tokens=() if parathinker else self.baseline_banned,
            num_slots=self.batch_size,
            on_output=respond,
            **settings.sampling,
        )
        self._note_engine_stats(self.engine.last_stats)

    def _note_engine_stats(self, stats: dict) -> None:
        """The KV pool's use over the run: the largest pool and peak, every preemption."""
        report = self.engine_report
        report["attention"] = stats["attention"]
        for key in ("kv_page_size", "kv_pool_pages", "kv_pool_bytes", "kv_peak_pages", "kv_peak_bytes"):
            report[key] = max(report.get(key, 0), stats[key])
        report["preemptions"] = report.get("preemptions", 0) + stats["preemptions"]

    def _encode(self, prompts: list[str], budget: int) -> list[list[int]]:
        """Token ids as HFLM encodes them, left-truncated to leave room for the generation."""
        method, opts = self.options.method, self.options.engine
        reserve = budget * (opts.num_paths if opts.positions == "flattened" and method == "parathinker" else 1)
        if method == "parathinker":
            template = self.tokenizer(protocol.SUMMARY_TEMPLATE, add_special_tokens=False)["input_ids"]
            reserve += len(template) + opts.summary_max_tokens
        room = self.max_length - reserve
        if room <= 0:
            raise ValueError(
                f"max_gen_toks={budget} (per path) leaves no room for the prompt within the model's "
                f"max_length={self.max_length}"
            )
        if self.compat is not None and self.compat.pad_to_multiple_of:  # the released engine's ids, never truncated
            return [self.compat.prompt_ids(p, self.tokenizer) for p in prompts]
        ids, mask = self.tok_batch_encode(prompts, left_truncate_len=room, truncation=self.truncation)
        return [row[m.bool()].tolist() for row, m in zip(ids, mask)]

    def _sample_text(self, token_ids: list[int], until: list[str]) -> str:
        """One plain sample as HFLM returns it: special tokens skipped, cut at the first stop string."""
        think_end = self.think_end_token if isinstance(self.think_end_token, str) else None
        return postprocess_generated_text(self.tok_decode(token_ids), until, think_end)

    def _plain_response(self, out: GenerationOutput, until: list[str]) -> str:
        texts = [self._sample_text(ids, until) for ids in out.path_ids]
        if len(texts) == 1:
            return texts[0]
        winner = scoring.majority_answer([scoring.extract_answer(t) for t in texts])
        return texts[0 if winner is None else winner]

    @staticmethod
    def _transcript(out: GenerationOutput, until: list[str]) -> str:
        """Every path (with its control tokens), then the summary cut at the first stop string."""
        return "".join(out.path_texts) + postprocess_generated_text(out.summary_text, until, None)

    # -- reporting -------------------------------------------------------------------------

    def get_model_info(self) -> dict:
        """HFLM's info plus the ParaThinker settings (merged into ``config`` of the results JSON)."""
        info = super().get_model_info()
        info["parathinker"] = {
            **self.options.info(),
            "compat": self.compat.name if self.compat is not None else None,  # as resolved (auto -> paper/official)
            "training_free": self.training_free if self.options.method == "parathinker" else None,
            "thought_embeddings_from": self.tables_source,
            "control_tokens_added": len(self.control_tokens_added),
            "banned_tokens": 0 if self.options.method == "parathinker" else len(self.baseline_banned),
            "termination_reasons": dict(self.termination_reasons),
            "resume": self.resume,
            "journal": dict(self.journal_report),
            "engine": dict(self.engine_report),
        }
        return info


__all__ = ["META_METRICS", "METHODS", "ParaThinkerLM", "ParaThinkerOptions", "ParaThinkerResponse", "adapter_tokenizer"]
