"""Build multi-path SFT data (JSONL, see :mod:`training.data`).

    python -m training.make_data convert --source qwen25math_maj8_samples.jsonl --output maj8.jsonl
    python -m training.make_data sample --source gsm8k_train.jsonl --output gsm8k_paths.jsonl \\
        --teacher deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --num-paths 8 --max-new-tokens 8192

``sample`` draws P independent paths per problem from a teacher with the engine's
``independent`` mode, grades each path's final answer (``scoring.extract_answer`` /
``is_equiv``) and keeps problems with at least ``--min-correct`` correct paths (their correct
paths only). It appends and flushes one line per problem and records every processed id in
``OUTPUT.progress.jsonl``, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .data import (
    DataError,
    clean_path_text,
    control_token_in,
    convert,
    iter_json_lines,
    run_cli,
    write_jsonl_atomic,
)

DEFAULT_TEACHER = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
# The teacher is a plain reasoning model: asked the evaluated question in its own chat format.
TEACHER_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.make_data", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="convert qwen25math_maj8_samples / parallel_r1_gsm8k_sft rows")
    c.add_argument("--source", required=True)
    c.add_argument("--output", required=True)
    s = sub.add_parser("sample", help="sample paths from a teacher and keep the correct ones")
    s.add_argument("--source", required=True, help="JSONL with problem and gold (final, else answer)")
    s.add_argument("--output", required=True)
    s.add_argument("--teacher", default=DEFAULT_TEACHER, help="hub id or local dir")
    s.add_argument("--num-paths", type=int, default=8)
    s.add_argument("--max-new-tokens", type=int, default=8192, help="per-path token budget")
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-p", type=float, default=0.95)
    s.add_argument("--min-correct", type=int, default=2)
    s.add_argument("--limit", type=int, default=None, help="first N problems of the source")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    s.add_argument("--dtype", default="auto", help="torch dtype for the teacher (auto, bfloat16, float32)")
    args = p.parse_args(argv)
    if args.command == "sample":
        for name in ("num_paths", "max_new_tokens", "min_correct"):
            if getattr(args, name) < 1:
                p.error(f"--{name.replace('_', '-')} must be at least 1")
        if args.min_correct > args.num_paths:
            p.error("--min-correct cannot exceed --num-paths")
    return args


def run_convert(args: argparse.Namespace) -> None:
    records, dropped = convert(args.source)
    if not records:
        raise DataError(f"{args.source}: no row has 2 or more usable paths")
    write_jsonl_atomic(records, args.output)
    print(f"wrote {len(records)} records to {args.output} ({dropped} rows dropped: fewer than 2 paths)")


def read_problems(path: str, limit: int | None) -> list[dict]:
    """id, problem and gold answer of each source row (gsm8k: ``final``; MATH: ``answer``)."""
    problems = []
    for lineno, obj in iter_json_lines(path):
        where = f"{path}:{lineno}"
        gold = obj.get("final", obj.get("answer"))
        if not isinstance(obj.get("problem"), str) or not obj["problem"].strip():
            raise DataError(f"{where}: field 'problem' must be a non-empty string")
        if gold in (None, ""):
            raise DataError(f"{where}: field 'final' or 'answer' (the gold answer) is missing")
        problems.append({"id": str(obj.get("id", f"line-{lineno}")), "problem": obj["problem"], "gold": str(gold)})
    if not problems:
        raise DataError(f"{path}: no problems")
    return problems[:limit]


def done_ids(output: Path, progress: Path) -> set[str]:
    """Ids already processed (kept in the output, or listed in the progress file)."""
    ids: set[str] = set()
    for path in (output, progress):
        if path.is_file():
            ids |= {str(obj.get("id")) for _, obj in iter_json_lines(path)}
    return ids


def teacher_prompt(problem: str, tokenizer) -> str:
    content = f"{problem}\n{TEACHER_INSTRUCTION}"
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    return content + "\n"


def grade(texts: list[str], gold: str) -> list[bool]:
    from lm_eval_parathinker.scoring import extract_answer, is_equiv

    return [control_token_in(t) is None and is_equiv(extract_answer(t), gold) for t in texts]


def load_teacher(name: str, device: str | None, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(name)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype).to(device).eval()
    return model, tokenizer


def run_sample(args: argparse.Namespace) -> None:
    from lm_eval_parathinker.engine import ParaThinkerEngine

    problems = read_problems(args.source, args.limit)  # validated before anything is written
    output = Path(args.output)
    progress = output.with_name(output.name + ".progress.jsonl")
    skip = done_ids(output, progress)
    todo = [(i, p) for i, p in enumerate(problems) if p["id"] not in skip]  # i: stable seed offset
    model, tokenizer = load_teacher(args.teacher, args.device, args.dtype)
    engine = ParaThinkerEngine(model, tokenizer)
    settings = {
        "teacher": args.teacher,
        "mode": "independent",
        "num_paths": args.num_paths,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "source": str(args.source),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    kept = dropped = 0
    with open(output, "a", encoding="utf-8") as out_f, open(progress, "a", encoding="utf-8") as prog_f:
        for i, prob in todo:
            gen = engine.generate(
                [teacher_prompt(prob["problem"], tokenizer)],
                mode="independent",
                num_paths=args.num_paths,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                seed=args.seed + i,
            )[0]
            texts = [clean_path_text(t) for t in gen.path_texts]
            correct = grade(texts, prob["gold"])
            paths = [t for t, ok in zip(texts, correct) if ok]
            if len(paths) >= max(args.min_correct, 2):
                record = {"id": prob["id"], "problem": prob["problem"], "answer": prob["gold"], "paths": paths, "provenance": settings}
                out_f.write(json.dumps(record, ensure_ascii=False) + "\n")
                out_f.flush()
                kept += 1
            else:
                dropped += 1
            prog_f.write(json.dumps({"id": prob["id"], "correct": sum(correct), "sampled": len(texts)}) + "\n")
            prog_f.flush()
    print(f"kept {kept}, dropped {dropped}, skipped {len(problems) - len(todo)} already done -> {output}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: run_convert(args) if args.command == "convert" else run_sample(args))


if __name__ == "__main__":
    sys.exit(main())
