"""Data parallelism on CPU processes (gloo): ``accelerate launch`` with 2 processes, and 2 loopback
"nodes" of one process each, give the one-process samples and metrics; a killed run resumes with
another number of processes; a dead rank ends the launch; concurrent runs share a journal.

Every run is the same command (tiny random model, one thread per process, sampled with a seed) through
``tests/lm_eval_our_tasks.py``: lm-eval's command line without indexing its thousands of built-in tasks.
"""

from __future__ import annotations

import contextlib
import glob
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from torch.distributed.elastic.utils.distributed import get_free_port

from helpers import OUR_TASKS_LM_EVAL, TIMED_METRICS, journal_entries, offline_env, samples_by_doc
from tiny import save_tiny_checkpoint

from lm_eval_parathinker.harness import ranks

LIMIT, REPEATS = 3, 2  # 3 docs on 2 ranks: rank 1 gets a padding copy
TOTAL = LIMIT * REPEATS
# Every response runs to 24 tokens, so that a kill lands between responses.
GEN = "max_gen_toks=24,min_new_tokens=24,do_sample=true,temperature=5.0,seed=7"
ENV = {"OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
TIMEOUT = 240  # seconds any one launch may take


def _launch(processes: int, port: int, machines: int = 1, machine_rank: int = 0) -> list[str]:
    """``accelerate launch`` of ``processes`` CPU processes in all, over ``machines`` loopback nodes."""
    if processes == 1 and machines == 1:
        return [sys.executable]
    nodes = ["--num_machines", str(machines), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]
    if machines > 1:
        nodes += ["--machine_rank", str(machine_rank)]
    return [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(processes),
            *nodes, "--mixed_precision", "no", "--dynamo_backend", "no"]


def _eval_args(ckpt: Path, journal_dir: Path, out: Path) -> list[str]:
    model_args = (f"pretrained={ckpt},num_paths=2,summary_max_tokens=4,dtype=float32,attention=sdpa,"
                  f"journal_dir={journal_dir}")
    return [
        str(OUR_TASKS_LM_EVAL), "--model", "parathinker", "--model_args", model_args, "--tasks", "amc23", "--limit", str(LIMIT),
        "--gen_kwargs", GEN, "--metadata", json.dumps({"repeats": REPEATS}), "--batch_size", "1", "--log_samples",
        "--output_path", str(out),
    ]  # fmt: skip


class Run:
    """One launch whose output goes to ``<out>.log``."""

    def __init__(self, cmd: list[str], out: Path, **env: str) -> None:
        self.out, self.log_path = out, out.with_suffix(".log")
        self.log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, env=offline_env(**ENV, **env), stdout=self.log_file, stderr=subprocess.STDOUT)
        self.started = time.monotonic()

    def wait(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the launch and every process under it (torchrun starts its workers in sessions of their own)."""
        try:
            launch = psutil.Process(self.proc.pid)
            tree = [launch, *launch.children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for process in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        self.proc.wait()
        self.log_file.close()

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker(self, rank: int) -> psutil.Process:
        """The worker process of global rank ``rank`` (torchrun gives it ``RANK``)."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                try:
                    if child.environ().get("RANK") == str(rank):
                        return child
                except psutil.Error:
                    continue
            time.sleep(0.05)
        raise AssertionError(f"no worker of rank {rank} under {self.proc.args}")


def _launches(ckpt: Path, journal_dir: Path, out: Path, processes: int, machines: int = 1, **env: str) -> list[Run]:
    port = get_free_port()
    return [Run(_launch(processes, port, machines, node) + _eval_args(ckpt, journal_dir, out),
                out.with_name(f"{out.name}_node{node}"), **env) for node in range(machines)]


def _finish(runs: list[Run]) -> None:
    for run in runs:
        code = run.wait()
        assert code == 0, f"{run.proc.args[:4]} exited {code}:\n{run.log[-4000:]}"


def _results(out: Path) -> tuple[list[str], dict]:
    files = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    assert files, f"no results under {out}"
    return files, json.loads(Path(files[0]).read_text())


def _metrics(res: dict) -> dict:
    return {task: {k: v for k, v in m.items() if not k.startswith(TIMED_METRICS)} for task, m in res["results"].items()}


def _rank_lines(journal_dir: Path) -> dict[str, int]:
    """Lines per rank file of the journal."""
    return {Path(p).name: len(Path(p).read_bytes().splitlines())
            for p in glob.glob(str(journal_dir / "*" / "rank*.jsonl"))}


def _kill_when(runs: list[Run], ready, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not ready():
        assert all(r.proc.poll() is None for r in runs), f"a launch ended before {what}:\n{runs[0].log[-3000:]}"
        assert time.monotonic() < deadline, f"not {what} within {TIMEOUT} s"
        time.sleep(0.005)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny_pt", "qwen2")


@pytest.fixture(scope="module")
def one_process(ckpt, tmp_path_factory) -> dict:
    """The reference: one process (plain ``python``), nothing journaled before."""
    root = tmp_path_factory.mktemp("one")
    _finish(_launches(ckpt, root / "journal", root / "out", processes=1))
    return {"samples": samples_by_doc(root / "out"), "results": _results(root / "out")[1]}


@pytest.mark.slow
def test_two_processes_split_the_requests_and_give_the_one_process_result(ckpt, one_process, tmp_path):
    (run,) = _launches(ckpt, tmp_path / "journal", tmp_path / "out", processes=2)
    _finish([run])
    files, res = _results(tmp_path / "out")
    assert len(files) == 1 and len(glob.glob(str(tmp_path / "out" / "**" / "samples_*.jsonl"), recursive=True)) == 1
    assert samples_by_doc(tmp_path / "out") == one_process["samples"]
    assert _metrics(res) == _metrics(one_process["results"])
    # each rank generated its share: 2 docs and 1 doc (its padding copy is not generated)
    assert _rank_lines(tmp_path / "journal") == {"rank0.jsonl": 2 * REPEATS, "rank1.jsonl": REPEATS}
    info, reference = res["config"]["parathinker"], one_process["results"]["config"]["parathinker"]
    assert info["journal"]["generated"] == TOTAL and info["termination_reasons"] == reference["termination_reasons"]
    # one bar, on rank 0, counting rank 1's responses too, and grading them
    bars = re.findall(r"parathinker parathinker:\s+\d+%\|[^|]*\| (\d+)/(\d+) \[", run.log)
    assert {total for _, total in bars} == {str(TOTAL)} and bars[-1][0] == str(TOTAL)  # no bar of one rank's share
    assert f"pass@1 0.000 ({TOTAL} graded)" in run.log


@pytest.mark.slow
def test_two_loopback_nodes_evaluate_every_request_once(ckpt, one_process, tmp_path):
    """Two launches of one process each (``--num_machines 2``); the journal sits under $HOME, which
    is node-local on a real cluster: each launch warns."""
    runs = _launches(ckpt, tmp_path / "journal", tmp_path / "out", processes=2, machines=2, HOME=str(tmp_path))
    _finish(runs)
    assert samples_by_doc(tmp_path / "out") == one_process["samples"]
    assert _metrics(_results(tmp_path / "out")[1]) == _metrics(one_process["results"])
    assert _rank_lines(tmp_path / "journal") == {"rank0.jsonl": 2 * REPEATS, "rank1.jsonl": REPEATS}
    assert all("is under the home directory, and this run spans several nodes" in run.log for run in runs)


@pytest.mark.slow
def test_killed_two_process_run_resumes_with_one_process(ckpt, one_process, tmp_path):
    journal_dir = tmp_path / "journal"
    (run,) = _launches(ckpt, journal_dir, tmp_path / "killed", processes=2)
    _kill_when([run], lambda: journal_entries(journal_dir), "journaling a response")
    run.kill()  # SIGKILL to the launch and its workers, as a scheduler ends a job
    journaled = len(journal_entries(journal_dir))
    assert 1 <= journaled < TOTAL, f"the kill came too late: {journaled} of {TOTAL}"
    _finish(_launches(ckpt, journal_dir, tmp_path / "resumed", processes=1))
    assert samples_by_doc(tmp_path / "resumed") == one_process["samples"]
    report = _results(tmp_path / "resumed")[1]["config"]["parathinker"]["journal"]
    assert (report["reused"], report["generated"]) == (journaled, TOTAL - journaled)


@pytest.mark.slow
@pytest.mark.parametrize("machines", [1, 2], ids=["2_processes", "2_loopback_nodes"])
def test_a_dead_rank_ends_the_launch_and_is_named(ckpt, tmp_path, machines):
    """SIGKILL of rank 1's worker once it has journaled a response: every launch ends within 60 s,
    non-zero, naming rank 1 (one launch: torchrun's report; rank 0's node: the heartbeat's)."""
    journal_dir = tmp_path / "journal"
    runs = _launches(ckpt, journal_dir, tmp_path / "out", processes=2, machines=machines)
    try:
        rank1 = runs[-1].worker(1)
        _kill_when(runs, lambda: _rank_lines(journal_dir).get("rank1.jsonl"), "rank 1 journaling a response")
        rank1.kill()
        killed = time.monotonic()
        codes = []
        for run in runs:
            with contextlib.suppress(subprocess.TimeoutExpired):  # still running: None
                run.proc.wait(timeout=max(0.0, killed + 60 - time.monotonic()))
            codes.append(run.proc.returncode)
    finally:
        for run in runs:
            run.kill()
    assert all(code not in (0, None) for code in codes), (codes, [run.log[-3000:] for run in runs])
    named = re.compile(r"rank 1 stopped answering|rank\s*:\s*1 \(local_rank")
    assert all(named.search(run.log) for run in runs), [run.log[-2000:] for run in runs]


@pytest.mark.slow
def test_concurrent_runs_share_a_journal(ckpt, one_process, tmp_path):
    """Two one-process runs started together on one journal: both finish with the right samples,
    and every journal line is whole."""
    journal_dir = tmp_path / "journal"
    runs = [Run(_launch(1, 0) + _eval_args(ckpt, journal_dir, tmp_path / f"out{i}"), tmp_path / f"out{i}")
            for i in (0, 1)]
    _finish(runs)
    for i in (0, 1):
        assert samples_by_doc(tmp_path / f"out{i}") == one_process["samples"]
    (rank0,) = glob.glob(str(journal_dir / "*" / "rank0.jsonl"))
    lines = Path(rank0).read_bytes().splitlines()
    assert TOTAL <= len(lines) <= 2 * TOTAL and all(json.loads(line)["key"] for line in lines)


def test_the_journal_warning_needs_several_nodes_and_a_home_journal(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HOME", str(tmp_path))
    for local, under_home, warned in ((1, True, True), (2, True, False), (1, False, False)):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local))
        caplog.clear()
        folder = tmp_path / "journal" if under_home else Path("/tmp/elsewhere/journal")
        ranks.warn_node_local_journal(folder, world_size=2)
        assert ("spans several nodes" in caplog.text) == warned, (local, under_home)
