"""lm-eval's ``generate_until`` requests as engine calls: grouped, journaled, reused, answered.

Requests with identical gen_kwargs go to the engine together (one :class:`Job` each, longest
prompt first, so the last slots free up sooner). Each response samples from the random stream of
its sample's key (:mod:`.samples`), so it does not depend on the batching, the other tasks,
``--limit`` or the rank; it is journaled as it finishes (:mod:`.journal`), and a response already
in the journal is reused instead of generated.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass

from lm_eval.api.instance import Instance
from lm_eval.models.utils import Collator

from . import journal, samples
from .generator import GenerationSettings, Generator, ParaThinkerResponse
from .progress import LiveProgress, gold_answer

# A child of lm-eval's logger: the journal's reports appear with lm-eval's own messages (--verbosity).
report = logging.getLogger("lm_eval.parathinker")


@dataclass
class Job:
    """The requests of one gen_kwargs group: engine prompts, seeds and journal keys, by request position."""

    gen_kwargs: dict
    settings: GenerationSettings
    indices: list[int]  # positions in the request list
    prompts: list[str]
    seeds: list[int]
    journal_keys: list[str]


@dataclass(frozen=True)
class Outcome:
    """How a list of requests was answered."""

    responses: list[ParaThinkerResponse]
    reused: int  # from the journal
    generated: int


class RequestRunner:
    """Answers a list of requests (see the module docstring) with ``generator``.

    ``length(text)`` is a text's token count (for the order); ``respond(request, gen_kwargs,
    response)`` is told of every response, generated or reused, and returns it as lm-eval gets it.
    """

    def __init__(self, generator: Generator, length: Callable[[str], int],
                 respond: Callable[[Instance, dict, ParaThinkerResponse], ParaThinkerResponse]) -> None:
        self.generator, self.length, self.respond = generator, length, respond

    def run(self, requests: list[Instance], store: journal.ResponseJournal | None,
            progress: Callable[[int, int], LiveProgress]) -> Outcome:
        """Every request's response; ``progress(total, reused)`` makes the bar."""
        keys = samples.sample_keys(requests)
        jobs = self._jobs(requests, keys)
        responses: list[ParaThinkerResponse | None] = [None] * len(requests)
        reused = self._reuse(jobs, requests, responses, store) if store is not None else []
        total = sum(len(job.indices) for job in jobs)
        if store is not None:
            report.info("response journal %s: reusing %d of %d responses (files: %s), generating %d",
                        store.folder, len(reused), total, ", ".join(p.name for p in store.files_read) or "none",
                        total - len(reused))
        bar = progress(total, len(reused))
        try:
            for i in reused:
                bar.add(responses[i], requests[i].doc, generated=False)
            for job in jobs:
                self._run_job(job, requests, keys, responses, store, bar)
        finally:
            bar.close()
        _fill_padding(requests, keys, responses)
        return Outcome(responses, len(reused), total - len(reused))

    def _jobs(self, requests: list[Instance], keys: list[samples.SampleKey]) -> list[Job]:
        collator = Collator(
            [(*req.args[:2], self.generator.question(req), i) for i, req in enumerate(requests) if not keys[i].padding],
            sort_fn=lambda args: (-self.length(args[0]), args[0]),  # longest first: the last slots free up sooner
            group_by="gen_kwargs",
            group_fn=lambda args: args[1],
        )
        return [self._job(group, keys) for group in collator.get_batched(n=0)]  # n=0: each gen_kwargs group whole

    def _job(self, group, keys: list[samples.SampleKey]) -> Job:
        """Settings, engine prompts, seeds and journal keys of one gen_kwargs group (validated)."""
        _, all_kwargs, questions, indices = zip(*group)
        settings = self.generator.settings(all_kwargs[0])
        prompts = [self.generator.prompt(q) for q in questions]
        sample_keys = [keys[i] for i in indices]
        return Job(
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

    def _reuse(self, jobs: list[Job], requests: list[Instance], responses: list,
               store: journal.ResponseJournal) -> list[int]:
        """Fill in the responses the journal holds; returns their positions."""
        reused = []
        for job in jobs:
            for i, key in zip(job.indices, job.journal_keys):
                if (record := store.get(key)) is not None:
                    responses[i] = self.respond(requests[i], job.gen_kwargs,
                                                ParaThinkerResponse(record["response"], record["meta"]))
                    reused.append(i)
        return reused

    def _run_job(self, job: Job, requests: list[Instance], keys: list[samples.SampleKey],
                 responses: list, store: journal.ResponseJournal | None, bar: LiveProgress) -> None:
        """Generate the job's responses that are not in the journal, journaling each as it finishes."""
        missing = [j for j, i in enumerate(job.indices) if responses[i] is None]  # positions in the job
        if not missing:
            return

        def finished(m: int, response: ParaThinkerResponse) -> None:  # m: position in `missing`
            j = missing[m]
            i = job.indices[j]
            if store is not None:
                key = keys[i]
                store.append(job.journal_keys[j], {
                    "task": key.task, "doc_hash": key.doc_hash, "repeat": key.repeat, "seed": job.seeds[j],
                    "response": str(response), "meta": response.meta,
                    "gold": gold_answer(requests[i].doc),  # rank 0's running pass@1 grades other ranks' lines
                })
            responses[i] = self.respond(requests[i], job.gen_kwargs, response)
            bar.add(response, requests[i].doc)

        self.generator.generate([job.prompts[j] for j in missing], [job.seeds[j] for j in missing], job.settings,
                                finished)


def _fill_padding(requests: list[Instance], keys: list[samples.SampleKey], responses: list) -> None:
    """Data-parallel padding copies (discarded by lm-eval) get the response of the sample they copy."""
    position = {(id(requests[i]), key.repeat): i for i, key in enumerate(keys) if not key.padding}
    for i, key in enumerate(keys):
        if key.padding:
            responses[i] = responses[position[(id(requests[i]), key.repeat % requests[i].repeats)]]
