"""The README's `lm_eval` commands run as written, and `leaderboard --compare` reads their outputs.

The commands are parsed out of README.md: the ```bash block that ends with
`python -m lm_eval_parathinker.leaderboard ... --compare` (its `lm_eval` lines, continuation lines
joined). Each runs with these substitutions, and only these, so that it finishes in seconds on the CPU:

* `pretrained=...` -> `pretrained=embedded` (the embedded SmolLM2-135M-Instruct: no hub), and
  `summary_max_tokens=8` added to the model args;
* `max_gen_toks=...` -> `max_gen_toks=8` in `--gen_kwargs` (the other gen kwargs kept);
* `--tasks parathinker_math` -> `--tasks aime24` (one task of the group: the other three add start-up
  and grading time, not coverage; `tests/test_tasks.py` runs the group), and `--limit 1` and
  `--metadata '{"repeats": 1}'` added: one problem, one sample (the task's default repeats are 16).

Everything else (method, `num_paths`, `--apply_chat_template`, `--batch_size`, `--output_path`,
`--log_samples`) is the README's. The runs go to a temporary folder (the commands' relative output
path under it), each with its own response journal there, all three at once (start-up dominates
their time), and the block's `--compare` line then runs there as
written: the test checks that it compares every pair of the block's runs, on `pass_at_1`.
The model card's `compat=official` command is left out: it needs the released tokenizer.
"""

from __future__ import annotations

import csv
import re
import shlex
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import pytest
from helpers import lm_eval_cmd, offline_env

README = Path(__file__).resolve().parents[1] / "README.md"
TASK = "aime24"  # the one task of the group run here


def bash_blocks(text: str) -> list[list[list[str]]]:
    """Every ```bash block as its commands (continuation lines joined, comments dropped), shlex-split."""
    blocks = re.findall(r"^```bash\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    commands = []
    for block in blocks:
        joined = re.sub(r"\\\n", " ", block)
        lines = (line.split(" #")[0].strip() for line in joined.splitlines())
        commands.append([shlex.split(line) for line in lines if line and not line.startswith("#")])
    return commands


def compared_block() -> list[list[str]]:
    """The README block whose last command is `leaderboard ... --compare`."""
    found = [b for b in bash_blocks(README.read_text()) if b and "--compare" in b[-1]]
    assert len(found) == 1, "README.md: expected one ```bash block ending with a leaderboard --compare command"
    return found[0]


def substituted(argv: list[str]) -> list[str]:
    """A README `lm_eval` command with the substitutions of the module docstring."""
    out = []
    for arg, previous in zip(argv, [None, *argv]):
        if previous == "--model_args":
            arg = re.sub(r"(^|,)pretrained=[^,]*", r"\1pretrained=embedded", arg) + ",summary_max_tokens=8"
        elif previous == "--gen_kwargs":
            arg = re.sub(r"max_gen_toks=\d+", "max_gen_toks=8", arg)
        elif previous == "--tasks":
            assert arg == "parathinker_math", f"README.md: --tasks {arg} (the test substitutes one task of the group)"
            arg = TASK
        out.append(arg)
    return [*out, "--limit", "1", "--metadata", '{"repeats": 1}']


def model_arg(argv: list[str], name: str) -> str | None:
    args = argv[argv.index("--model_args") + 1]
    return dict(kv.split("=", 1) for kv in args.split(",")).get(name)


def test_the_substitutions_keep_the_readme_command():
    readme = ["lm_eval", "--model_args", "pretrained=org/m,method=majority,num_paths=8", "--tasks", "parathinker_math",
              "--gen_kwargs", "temperature=0.5,max_gen_toks=16384", "--batch_size", "4", "--log_samples"]
    assert substituted(readme) == [
        "lm_eval", "--model_args", "pretrained=embedded,method=majority,num_paths=8,summary_max_tokens=8",
        "--tasks", "aime24", "--gen_kwargs", "temperature=0.5,max_gen_toks=8", "--batch_size", "4", "--log_samples",
        "--limit", "1", "--metadata", '{"repeats": 1}']  # fmt: skip


@pytest.mark.slow
def test_readme_lm_eval_commands_run_and_compare(tmp_path):
    block = compared_block()
    runs = [argv for argv in block if argv[0] == "lm_eval"]
    assert len(runs) >= 2, "README.md: the --compare block should hold the lm_eval runs it compares"
    for argv in runs:
        assert "--log_samples" in argv and "--batch_size" in argv, f"README.md: {shlex.join(argv)}"
    # the runs at once (start-up dominates: imports, lm-eval's task index, the grading worker), each
    # with its own response journal
    procs, logs = [], [tmp_path / f"run{i}.log" for i in range(len(runs))]
    try:
        for i, argv in enumerate(runs):
            env = offline_env(OMP_NUM_THREADS="1", PARATHINKER_JOURNAL_DIR=str(tmp_path / "journal" / str(i)))
            with logs[i].open("w") as log:
                procs.append(subprocess.Popen([*lm_eval_cmd(builtin_tasks=True), *substituted(argv)[1:]], cwd=tmp_path, env=env,
                                              stdout=log, stderr=subprocess.STDOUT))
        for argv, proc, log in zip(runs, procs, logs):
            assert proc.wait(timeout=600) == 0, f"README.md: {shlex.join(argv)}\n{log.read_text()[-3000:]}"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    compare = block[-1]
    assert compare[:3] == ["python", "-m", "lm_eval_parathinker.leaderboard"]
    proc = subprocess.run([sys.executable, *compare[1:]], cwd=tmp_path, env=offline_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = tmp_path / compare[3]
    with (folder / "comparisons.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert (folder / "comparisons.png").is_file()

    def method(label: str) -> str:  # "embedded majority P=8 (...)" -> majority
        return label.split()[1]

    methods = [model_arg(argv, "method") for argv in runs]
    expected = {(TASK, frozenset(pair)) for pair in combinations(methods, 2)}
    got = [(r["task"], frozenset((method(r["run_a"]), method(r["run_b"])))) for r in rows]
    # as sets: the text of a frozenset depends on its insertion order where two hashes collide
    assert len(got) == len(set(got)) and set(got) == expected
    assert {r["metric"] for r in rows} == {"pass_at_1"}
    assert {r["problems"] for r in rows} == {"1"}
