"""Native-parallel formats whose model decides when to fork: Parallel-R1, Multiverse and NPR.

ParaThinker (:mod:`protocol`) forks once, right after the prompt, into a fixed number of paths.
The formats here let the model write a trigger anywhere in its response, possibly several times
and (Multiverse) nested; the engine then runs the paths as a batch, each seeing the context and
itself, all from the same position, and joins them: the text after the join sees every path, and
its positions follow the longest one. Each :class:`Format` below says, declaratively, what its
released engine does at each of those points (``shared/reference/parallel-formats.md`` names the
code each fact comes from); :mod:`engine.forks` runs them and training reads the same objects.

Two layouts of each, as for ParaThinker (``compat``):

* ``paper``: the training layout. Paths isolated from each other, sharing their start position;
  the join reads them in place; the engine writes the format's tags and separators itself.
* ``official``: what the released engine does, quirks included (:class:`ReleasedEngine`):
  Parallel-R1's rollout re-encodes its paths one after the other with sequential positions before
  the summary; the SGLang forks of Multiverse and NPR read a token past every trigger and path end
  (a lookahead, dropped or kept as their code does), drop the leading newline of every path but
  the first at the join, and leave budget slack.

Nothing here imports torch: the grader reads the answer regions too.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

FORMAT_CHOICES = ("parathinker", "parallel-r1", "multiverse", "npr")
DEFAULT_MAX_PATHS = 8  # Multiverse's forks have no cap of their own: the model arg max_paths sets one


@dataclass(frozen=True)
class ReleasedEngine:
    """What ``compat=official`` reproduces of a format's released engine, beyond the format itself."""

    reencode_join: bool = False  # Parallel-R1: the summary re-encodes the paths in sequence (sequential positions)
    lookahead: bool = False  # SGLang forks: one token read past a trigger (dropped at a fork), two past a path end
    hide_later_leads: bool = False  # SGLang merge: paths after the first lose their inserted leading token
    length_slack: int = 0  # a request ends at response position budget - slack (Multiverse 1, NPR 128)
    fork_slack: int = 0  # no fork with fewer positions left (Multiverse 30, NPR 1024)
    degree_limit: bool = False  # NPR: context + own tokens x sibling count also ends a request at budget - 128
    trim_last: bool = False  # Multiverse's example: the detokenizer drops the final stop token from the text
    path_start: str | None = None  # what it opens a path with, where the training text differs (None: the same)
    separator: str | None = None  # what it writes before the join, where the training text differs (None: the same)


@dataclass(frozen=True)
class Format:
    """One native-parallel format: its tokens, when it forks, what the engine writes, its limits,
    its prompt and where its answer is."""

    name: str
    tokens: tuple[str, ...]  # the special tokens a checkpoint of this format has, in its tokenizer's order
    trigger: str  # the token after which the model forks
    path_start: str  # written at the start of each path ({label}: the outline's number, with its colon)
    path_close: str  # the token a path ends with
    join: str  # written when every path of a fork has ended
    separator: str  # paper layout: written before the join (the newline the training text has after a path)
    outline_open: str | None  # paths are counted in the text after the last one of these
    outline_pattern: str | None  # one match per path, the label in group 1 (None: a fixed number of paths)
    fixed_paths: int | None  # paths per fork when the model does not count them
    max_count: int | None  # the format's own cap on counted paths (None: the max_paths model arg)
    out_of_range_ends: bool  # a count out of range ends the request (or that path); else the fork is refused
    own_outline_only: bool  # the outline must be in the text this request generated since its last join
    summary_close: str | None  # Parallel-R1: the join opens a summary that ends with this token
    max_forks: int | None  # forks per response (None: no limit)
    max_depth: int  # paths inside paths (0: a trigger inside a path is text)
    path_token_cap: int | None  # tokens a path may generate (None: no cap)
    budget: str  # "total": max_gen_toks counts every response token; "critical": the longest chain
    path_temperature: float | None  # sampling temperature inside paths (None: the request's)
    released: ReleasedEngine
    answer_after: str  # the grader reads the text after the last one of these
    prompt_file: str | None  # the instruction the format's models were trained with (lm_eval_parathinker/prompts)
    prompt_before: str  # the user turn: "{question}" and "{instruction}" placeholders (an instruction file
    # with a "{Problem}" placeholder, Parallel-R1's, takes the question there)
    chat_template_kwargs: tuple[tuple[str, object], ...] = ()  # what its pipeline passes the chat template
    instruction_text: str | None = None  # a checkpoint's whole user turn ("{Problem}": the question), in place of prompt_file

    @property
    def counted(self) -> bool:
        return self.outline_pattern is not None

    def instruction(self) -> str:
        """The instruction the user turn is built from (``instruction_text``, else ``prompt_file``'s)."""
        if self.instruction_text is not None:
            return self.instruction_text
        if self.prompt_file is None:
            return ""
        return resources.files("lm_eval_parathinker").joinpath("prompts", self.prompt_file).read_text(encoding="utf-8").strip()

    def user_message(self, question: str) -> str:
        """The user turn the format's models were trained on, around ``question``."""
        instruction = self.instruction().replace("{Problem}", question)
        return self.prompt_before.format(question=question, instruction=instruction)

    def build_prompt(self, question: str, tokenizer=None) -> str:
        """The prompt for ``question``: the user turn through the tokenizer's chat template with the
        generation prompt (as each format's own pipeline renders it), plain text without one."""
        return self.chat_prompt(self.user_message(question), tokenizer)

    def chat_prompt(self, content: str, tokenizer=None) -> str:
        """The prompt of a user turn ``content`` (:meth:`build_prompt`'s, for a turn given whole)."""
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                 add_generation_prompt=True, **dict(self.chat_template_kwargs))
        return content + "\n"

    def labels(self, text: str) -> list[str]:
        """The labels of the paths that ``text`` asks for: one per match of the outline pattern after
        the last ``outline_open`` (a format that counts its paths)."""
        start = text.rfind(self.outline_open)
        if start < 0:
            return []
        return [m.group(1) + ":" for m in re.finditer(self.outline_pattern, text[start:])]

    def start_text(self, label: str) -> str:
        return self.path_start.format(label=label)

    def as_run(self, official: bool) -> Format:
        """The format as a layout writes it: ``official`` with its released engine's own path
        openings and separator (Parallel-R1's rollout writes ``<Path>`` tags back to back)."""
        released = self.released if official else ReleasedEngine()
        return replace(self, path_start=self.path_start if released.path_start is None else released.path_start,
                       separator=self.separator if released.separator is None else released.separator)

    def missing_tokens(self, vocab) -> list[str]:
        """The format's tokens that ``vocab`` (a tokenizer's vocabulary) lacks."""
        return [t for t in self.tokens if t not in vocab]

    def answer_region(self, text: str) -> str | None:
        """The part of a response the grader reads: after the last ``answer_after`` (Parallel-R1's
        last ``</Summary>``, Multiverse's last ``</Parallel>``, NPR's last ``<takeaway>``); None
        when the response has none (it was cut off inside its parallel reasoning)."""
        at = text.rfind(self.answer_after)
        return None if at < 0 else text[at + len(self.answer_after):]


PARALLEL_R1 = Format(
    name="parallel-r1",
    tokens=("<Parallel>", "</Parallel>", "<Path>", "</Path>", "<Summary>", "</Summary>"),
    trigger="<Parallel>", path_start="\n<Path>", path_close="</Path>", join="</Parallel>\n<Summary>", separator="\n",
    outline_open=None, outline_pattern=None, fixed_paths=2, max_count=None, out_of_range_ends=False,
    own_outline_only=False, summary_close="</Summary>", max_forks=4, max_depth=0, path_token_cap=4096,
    budget="total", path_temperature=1.0,
    released=ReleasedEngine(reencode_join=True, path_start="<Path>", separator=""),
    answer_after="</Summary>", prompt_file="parallel_r1_v3.txt", prompt_before="{instruction}",
)
MULTIVERSE = Format(
    name="multiverse",
    tokens=("<Think>", "</Think>", "<Parallel>", "</Parallel>", "<Goal>", "</Goal>", "<Outline>", "</Outline>",
            "<Path>", "</Path>", "<Conclusion>", "</Conclusion>"),
    trigger="</Goal>", path_start="\n<Path>\n{label}", path_close="</Path>", join="<Conclusion>\n", separator="\n",
    outline_open="<Goal>", outline_pattern=r"<Outline>\s*([0-9]+(?:\.[0-9]+)*)\s*:", fixed_paths=None,
    max_count=None, out_of_range_ends=False, own_outline_only=False, summary_close=None, max_forks=None,
    max_depth=5, path_token_cap=None, budget="critical", path_temperature=None,
    released=ReleasedEngine(lookahead=True, hide_later_leads=True, length_slack=1, fork_slack=30, trim_last=True),
    answer_after="</Parallel>", prompt_file=None, prompt_before="{question} Think step by step and in parallel before answering.",
)
NPR = Format(
    name="npr",
    tokens=("<guideline>", "</guideline>", "<plan>", "</plan>", "<step>", "</step>", "<takeaway>", "</takeaway>"),
    trigger="</guideline>", path_start="\n<step>\n{label}", path_close="</step>", join="<takeaway>\n", separator="\n",
    outline_open="<guideline>", outline_pattern=r"<plan>\s*([0-9]+(?:\.[0-9]+)*)\s*:", fixed_paths=None,
    max_count=5, out_of_range_ends=True, own_outline_only=True, summary_close=None, max_forks=None,
    max_depth=5, path_token_cap=None, budget="critical", path_temperature=None,
    released=ReleasedEngine(lookahead=True, hide_later_leads=True, length_slack=128, fork_slack=1024,
                            degree_limit=True),
    answer_after="<takeaway>", prompt_file="npr.txt", prompt_before="{question}\n\n{instruction}",
    chat_template_kwargs=(("enable_thinking", False),),  # evals/evaluate.py
)
FORMATS = {f.name: f for f in (PARALLEL_R1, MULTIVERSE, NPR)}


#: what ``python -m training.sft --format`` records in a checkpoint: the format, the layout it was
#: trained in and the instruction its data used, so ``lm_eval`` runs it as it was trained
CHECKPOINT_FILE = "parallel_format.json"


@dataclass(frozen=True)
class TrainedFormat:
    """A checkpoint's :data:`CHECKPOINT_FILE`."""

    format: str
    compat: str  # "paper" or "official": the layout its training rows were built in
    instruction: str | None  # the data's user turn, "{Problem}" where the problem goes (None: the format's own)

    def save(self, folder: str | Path) -> None:
        text = json.dumps({"format": self.format, "compat": self.compat, "instruction": self.instruction}, indent=1)
        (Path(folder) / CHECKPOINT_FILE).write_text(text + "\n", encoding="utf-8")

    @classmethod
    def load(cls, folder: str | Path) -> TrainedFormat | None:
        """The record of a checkpoint folder (None: it has none, or ``folder`` is not a folder)."""
        path = Path(folder) / CHECKPOINT_FILE
        if not path.is_file():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        get_format(data["format"])
        return cls(data["format"], data["compat"], data.get("instruction"))

    def apply(self, fmt: Format) -> Format:
        """``fmt`` with the trained user turn (the data's, byte for byte)."""
        return fmt if self.instruction is None else replace(fmt, instruction_text=self.instruction,
                                                            prompt_before="{instruction}")


def format_of_text(text: str) -> Format | None:
    """The forking format whose tags a response holds (None: none of them). NPR's tags are its own;
    a ``<Summary>`` is Parallel-R1's; Multiverse's include Parallel-R1's other tags, so a Parallel-R1
    response without a summary reads as Multiverse's, whose region (after ``</Parallel>``) it lacks
    as well: cut off inside its paths, it has no answer either way."""
    for fmt, tags in ((NPR, NPR.tokens), (PARALLEL_R1, ("<Summary>", "</Summary>")), (MULTIVERSE, MULTIVERSE.tokens)):
        if any(tag in text for tag in tags):
            return fmt
    return None


def get_format(name: str) -> Format:
    """The format ``name`` (one of :data:`FORMATS`)."""
    if name not in FORMATS:
        raise ValueError(f"format={name!r} is not one of {', '.join(FORMAT_CHOICES)}")
    return FORMATS[name]


def detect_format(vocab) -> str:
    """The format a tokenizer's vocabulary is unambiguously built for: ``parathinker`` unless it has
    every token of exactly one of the forking formats (Multiverse's tokens include Parallel-R1's
    ``<Parallel> <Path>`` but not its ``<Summary>``)."""
    matches = [f.name for f in FORMATS.values() if not f.missing_tokens(vocab)]
    return matches[0] if len(matches) == 1 else "parathinker"


def check_tokens(fmt: Format, vocab) -> None:
    """Refuse a format whose tokens the tokenizer lacks, naming them."""
    missing = fmt.missing_tokens(vocab)
    if missing:
        raise ValueError(f"format={fmt.name} needs the tokens {missing}, which the checkpoint's tokenizer lacks: "
                         f"use a {fmt.name} checkpoint (its tokenizer adds them as special tokens)")
