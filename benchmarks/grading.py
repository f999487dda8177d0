"""Grading speed: responses judged per second by ``lm_eval_parathinker.scoring``, against a baseline.

    python -m benchmarks.grading                    # 600 responses, results/bench_grading.{csv,md,png}
    python -m benchmarks.grading --smoke            # 24 responses: checks that it runs

The responses are built deterministically from the golds of the offline benchmark data
(``--data-dir`` or ``$PARATHINKER_DATA_DIR``): sequential chain-of-thought text ending in a box or in
a "Final Answer: ..." sentence, ParaThinker transcripts with 2 to 8 paths and a summary, and
responses with no answer (cut off mid-sentence, or a transcript cut before its summary). About a third
state a wrong answer, so each response has a known verdict.

Each grader judges every response in the same run:

* ``scorer``: ``is_equiv(extract_answer(response), gold)``, what pass@1 does;
* ``scorer_process_results``: ``process_results`` on groups of 4 responses per problem (pass@1,
  pass@k and the majority vote, whose grouping judges the answers against each other);
* ``math_verify_whole_response``: plain math-verify, ``verify(parse("$gold$"), parse(response))``
  in-process with its default configs (the baseline of ``speed_vs_baseline``).

``agreement`` is the fraction of responses whose verdict matches the verdict they were built with.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lm_eval_parathinker import data, scoring
from lm_eval_parathinker.plotting import save_png
from lm_eval_parathinker.tables import markdown_table, write_table

BENCHMARKS = ("aime24", "aime25", "amc23", "math500")
KINDS = ("sequential_box", "sequential_sentence", "parathinker", "no_answer")
GRADERS = ("scorer", "scorer_process_results", "math_verify_whole_response")
COLUMNS = ["grader", "kind", "responses", "seconds", "responses_per_s", "speed_vs_baseline", "agreement"]
RESPONSES_PER_PROBLEM = 4  # k of process_results
SUMMARY_TEMPLATE = "By analyzing multiple reasoning processes above, I concluded that: The final answer is"

# Chain-of-thought sentences of the kind competition-math responses are made of.
STEPS = (
    "Let $x$ be the unknown, so that $x^2 - {a}x + {b} = 0$.",
    "Substituting $x = {a}$ gives $({a})^2 - {a} \\cdot {a} + {b} = {b}$.",
    "By AM-GM, $\\frac{{{a} + {b}}}{{2}} \\ge \\sqrt{{{a} \\cdot {b}}}$.",
    "We compute \\[\\sum_{{k=1}}^{{{a}}} k = \\frac{{{a}({a}+1)}}{{2}} = {c}.\\]",
    "Hence the remainder when ${c}$ is divided by ${a}$ is ${d}$.",
    "Wait, let me double-check the case $n = {a}$: it gives ${b}$ possibilities.",
    "So far there are ${a} + {b} = {c}$ ways, and the case analysis continues.",
    "The triangle has sides {a}, {b} and {c}, so its semi-perimeter is $s = \\frac{{{a}+{b}+{c}}}{{2}}$.",
)


@dataclass(frozen=True)
class Response:
    text: str
    gold: str
    kind: str
    correct: bool  # the verdict it was built with


def chain_of_thought(rng: random.Random, steps: int) -> str:
    def step() -> str:
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        return rng.choice(STEPS).format(a=a, b=b, c=a + b, d=a % 7)

    return " ".join(step() for _ in range(steps))


INTEGER = re.compile(r"-?\d+(?:\.0*)?")  # AIME's "025", AMC's "27.0"


def wrong_answer(gold: str, golds: Sequence[str], rng: random.Random) -> str:
    """An answer that is not the gold: the integer after it, else another problem's answer."""
    if INTEGER.fullmatch(gold):
        return str(int(float(gold)) + 1)
    return rng.choice([g for g in golds if g != gold])


def equal_form(gold: str, rng: random.Random) -> str:
    """The gold as a response may write it: verbatim, or in another form of the same value."""
    if rng.random() < 0.5:
        return gold
    if INTEGER.fullmatch(gold):
        return str(int(float(gold)))  # "025" -> "25", "27.0" -> "27"
    return gold.replace("\\frac", "\\dfrac") if "\\frac" in gold else f"{gold} "


def build_response(kind: str, gold: str, golds: Sequence[str], rng: random.Random) -> Response:
    correct = kind != "no_answer" and rng.random() < 0.65
    answer = equal_form(gold, rng) if correct else wrong_answer(gold, golds, rng)
    if kind == "sequential_box":
        text = f"{chain_of_thought(rng, rng.randint(8, 30))}\n\nTherefore, the answer is $\\boxed{{{answer}}}$."
    elif kind == "sequential_sentence":
        ending = f"Final Answer: The final answer is ${answer}$. I hope it is correct."
        text = f"{chain_of_thought(rng, rng.randint(8, 30))}\n{ending}"
    elif kind == "parathinker":
        paths = [
            f"<think{k}>{chain_of_thought(rng, rng.randint(4, 12))} "
            f"Solving gives $\\boxed{{{rng.choice([gold, answer])}}}$.</think{k}>"
            for k in range(1, rng.randint(2, 8) + 1)
        ]
        text = "".join(paths) + f"<summary>{SUMMARY_TEMPLATE} $\\boxed{{{answer}}}$.</summary>"
    elif rng.random() < 0.5:  # no answer: cut off mid-sentence ...
        cot = chain_of_thought(rng, rng.randint(8, 30))
        text = cot[: rng.randint(len(cot) // 2, len(cot) - 1)].rstrip(" .") + " and then we"
    else:  # ... or a transcript cut before its summary
        text = "".join(f"<think{k}>{chain_of_thought(rng, 6)} So $\\boxed{{{gold}}}$.</think{k}>" for k in (1, 2, 3))
    return Response(text, gold, kind, correct)


def build_responses(golds: Sequence[str], count: int, seed: int = 0) -> list[Response]:
    """``count`` responses, ``RESPONSES_PER_PROBLEM`` per gold in a row, kinds in rotation."""
    rng = random.Random(seed)
    problems = rng.sample(list(golds), k=min(len(golds), -(-count // RESPONSES_PER_PROBLEM)))
    return [
        build_response(KINDS[i % len(KINDS)], problems[i // RESPONSES_PER_PROBLEM % len(problems)], golds, rng)
        for i in range(count)
    ]


def scorer_verdict(response: Response) -> bool:
    return scoring.is_equiv(scoring.extract_answer(response.text), response.gold)


def math_verify_verdict(response: Response) -> bool:
    from math_verify import parse, verify

    return bool(verify(parse(f"${response.gold}$"), parse(response.text)))


def timed_verdicts(grade: Callable[[Response], bool], responses: Sequence[Response]) -> list[tuple[bool, float]]:
    out = []
    for r in responses:
        t0 = time.perf_counter()
        verdict = grade(r)
        out.append((verdict, time.perf_counter() - t0))
    return out


def process_results_seconds(responses: Sequence[Response]) -> float:
    """Wall time of ``process_results`` over the responses, grouped per problem, in a fresh worker
    (math-verify's caches warmed by the other graders would flatter it)."""
    scoring.get_verifier().close()
    scoring.is_equiv("0.5", "\\frac12")
    t0 = time.perf_counter()
    for i in range(0, len(responses), RESPONSES_PER_PROBLEM):
        group = responses[i : i + RESPONSES_PER_PROBLEM]
        scoring.process_results({"answer": group[0].gold}, [[r.text for r in group]])
    return time.perf_counter() - t0


def result_rows(responses: Sequence[Response]) -> list[dict]:
    """One row per grader and kind (plus ``all``); graders warmed up first (worker start, imports)."""
    t0 = time.perf_counter()
    scoring.is_equiv("0.5", "\\frac12")
    print(f"scorer: worker started in {time.perf_counter() - t0:.2f} s")
    math_verify_verdict(responses[0])
    per_response = {"scorer": timed_verdicts(scorer_verdict, responses),
                    "math_verify_whole_response": timed_verdicts(math_verify_verdict, responses)}
    rows = []
    for kind in (*KINDS, "all"):
        picked = [i for i, r in enumerate(responses) if kind in ("all", r.kind)]
        baseline_s = sum(per_response["math_verify_whole_response"][i][1] for i in picked)
        for grader, timings in per_response.items():
            seconds = sum(timings[i][1] for i in picked)
            agree = sum(timings[i][0] == responses[i].correct for i in picked) / len(picked)
            rows.append(_row(grader, kind, len(picked), seconds, baseline_s, agree))
    seconds = process_results_seconds(responses)
    rows.append(_row("scorer_process_results", "all", len(responses), seconds, baseline_s, None))
    return rows


def _row(grader: str, kind: str, n: int, seconds: float, baseline_s: float, agreement: float | None) -> dict:
    return {
        "grader": grader, "kind": kind, "responses": n, "seconds": round(seconds, 4),
        "responses_per_s": round(n / seconds, 2), "speed_vs_baseline": round(baseline_s / seconds, 3),
        "agreement": "" if agreement is None else round(agreement, 4),
    }  # fmt: skip


def write_png(rows: Sequence[dict], path: Path) -> None:
    """Responses judged per second (left) and agreement with the built verdicts (right), per kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [*KINDS, "all"]
    fig, (speed, agree) = plt.subplots(1, 2, figsize=(12, 4.2))
    for i, grader in enumerate(("scorer", "math_verify_whole_response")):
        by_kind = {r["kind"]: r for r in rows if r["grader"] == grader}
        xs = [k + (i - 0.5) * 0.4 for k in range(len(kinds))]
        speed.bar(xs, [by_kind[k]["responses_per_s"] for k in kinds], width=0.4, label=grader)
        agree.bar(xs, [by_kind[k]["agreement"] for k in kinds], width=0.4, label=grader)
    for ax, title in ((speed, "responses judged per second"), (agree, "agreement with the built verdicts")):
        ax.set_xticks(range(len(kinds)))
        ax.set_xticklabels(kinds, fontsize=8, rotation=15)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    speed.set_yscale("log")  # answerless responses are judged without math-verify: orders of magnitude faster
    agree.set_ylim(0, 1.05)
    total = next(r for r in rows if r["grader"] == "scorer" and r["kind"] == "all")
    fig.suptitle(f"grading {total['responses']} responses: scorer {total['seconds']:.1f} s", fontsize=10)
    fig.legend(*speed.get_legend_handles_labels(), loc="upper right", fontsize=8, ncol=2)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    save_png(fig, path)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.grading", description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="24 responses: checks that it runs")
    ap.add_argument("--responses", type=int, default=600, help="how many responses (default: %(default)s)")
    ap.add_argument("--data-dir", default=None, help="offline benchmark data (default: $PARATHINKER_DATA_DIR)")
    ap.add_argument("--output", type=Path, default=Path("results"), help="directory for the CSV/PNG files")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.responses < len(KINDS):
        ap.error(f"--responses must be at least {len(KINDS)}")
    return args


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    try:
        golds = [row["answer"] for name in BENCHMARKS for row in data.load_rows(name, args.data_dir)]
    except (data.DataUnavailableError, ValueError) as e:
        sys.exit(f"benchmarks.grading: {e}")
    responses = build_responses(golds, 24 if args.smoke else args.responses, args.seed)
    rows = result_rows(responses)
    args.output.mkdir(parents=True, exist_ok=True)
    csv_path = args.output / "bench_grading.csv"
    write_table(rows, csv_path, COLUMNS)  # and bench_grading.md beside it
    write_png(rows, csv_path.with_suffix(".png"))
    print(markdown_table(rows, COLUMNS))
    return csv_path


if __name__ == "__main__":
    main()
