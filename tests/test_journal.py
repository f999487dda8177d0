"""Long evaluations: a sample is a function of its key, the response journal (kill -9 and resume,
changed settings, torn lines, data-parallel ranks, disk full), live progress, a dying grading worker."""

from __future__ import annotations

import errno
import glob
import json
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from lm_eval.api.model import LM

from helpers import TIMED_METRICS, by_doc, journal_entries, kill_when, lm_eval_cmd, run_lm_eval, samples_by_doc
from tiny import save_tiny_checkpoint

from lm_eval_parathinker import scoring
from lm_eval_parathinker.harness import journal, progress, samples
from lm_eval_parathinker.harness.generator import ParaThinkerResponse
from lm_eval_parathinker.harness.model import ParaThinkerLM

# Near-uniform sampling over the tiny vocabulary: every repeat of a doc differs.
SAMPLED = "max_gen_toks=16,do_sample=true,temperature=5.0"
REPEATS = 2
# The CLI runs force long paths (min_new_tokens) so that a kill lands between responses.
CLI_GEN = "max_gen_toks=48,min_new_tokens=48,do_sample=true,temperature=5.0,seed=7"
CLI_TOTAL = 2 * 2 * REPEATS  # two tasks, --limit 2
ENV = {"OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread_offline")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny_pt", "qwen2")


def _lm(ckpt: Path, **kwargs) -> ParaThinkerLM:
    args = {"num_paths": 2, "summary_max_tokens": 4, "batch_size": 3, **kwargs}
    return ParaThinkerLM(pretrained=str(ckpt), device="cpu", dtype="float32", **args)


def _evaluate(lm, tasks, gen=SAMPLED, **kwargs) -> dict:
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(
        model=lm, tasks=tasks, gen_kwargs=gen, log_samples=True,
        task_manager=TaskManager(include_defaults=False, metadata={"repeats": REPEATS}), **kwargs,
    )  # fmt: skip


def _metrics(res: dict) -> dict:
    return {task: {k: v for k, v in m.items() if not k.startswith(TIMED_METRICS)} for task, m in res["results"].items()}


# --------------------------------------------------------------------------- sample keys


def test_sample_keys_count_repeats_in_order_and_mark_padding():
    from lm_eval.api.instance import Instance

    a = Instance("generate_until", {"problem": "p", "answer": "1"}, ("p", {}), 0, ("aime24", 0, 2))
    b = Instance("generate_until", {"problem": "q", "answer": "2"}, ("q", {}), 0, ("aime24", 1, 2))
    keys = samples.sample_keys([a, b, a, b, b, b])  # the last two: data-parallel padding of b
    assert [(k.doc_hash == keys[0].doc_hash, k.repeat, k.padding) for k in keys] == [
        (True, 0, False), (False, 0, False), (True, 1, False), (False, 1, False), (False, 2, True), (False, 3, True),
    ]
    seeds = {k.seed(7) for k in keys[:4]}
    assert len(seeds) == 4 and keys[0].seed(7) == samples.sample_keys([b, a])[1].seed(7)  # position-free
    assert keys[0].seed(7) != keys[0].seed(8) and all(0 <= s < 2**62 for s in seeds)
    torch.manual_seed(1234)
    assert samples.run_seed(None) == 1234 and samples.run_seed(5) == 5


# --------------------------------------------------------------------------- a sample is a function of its key


@pytest.fixture(scope="module")
def key_runs(ckpt, tmp_path_factory):
    """Sampled runs (lm-eval's default seed) with the journal off, so every sample is generated."""
    unused = tmp_path_factory.mktemp("journal_off") / "journal"
    one_slot, three_slots = (_lm(ckpt, batch_size=b, resume=False, journal_dir=str(unused)) for b in (1, 3))
    runs = {
        "bs1": _evaluate(one_slot, ["amc23", "aime24"], limit=2),
        "bs3": _evaluate(three_slots, ["amc23", "aime24"], limit=2),
        "limit4": _evaluate(three_slots, ["amc23", "aime24"], limit=4),
        "alone": _evaluate(three_slots, ["aime24"], limit=2),
        "samples": _evaluate(three_slots, ["aime24"], samples={"aime24": [3, 1]}),
    }
    assert not unused.exists()  # resume=false: no journal is read or written
    return {name: {task: by_doc(s) for task, s in res["samples"].items()} for name, res in runs.items()}


def test_same_samples_whatever_else_runs(key_runs):
    """--batch_size 1 vs 3, --limit 2 vs 4 with two tasks, aime24 alone vs in a task list, --samples."""
    runs = key_runs
    assert runs["bs1"] == runs["bs3"]
    for task in ("amc23", "aime24"):
        limit4 = runs["limit4"][task]
        assert len(limit4) == 4 and all(limit4[h] == doc for h, doc in runs["bs3"][task].items())
    assert runs["alone"]["aime24"] == runs["bs3"]["aime24"]
    picked = runs["samples"]["aime24"]  # docs 3 and 1, renumbered 0 and 1 by lm-eval
    assert len(picked) == 2 and all(runs["limit4"]["aime24"][h] == doc for h, doc in picked.items())
    # not trivially equal: every doc's repeats differ, and so do the docs
    responses = [r for task in runs["limit4"].values() for doc in task.values() for rs in doc["resps"] for r in rs]
    assert len(set(responses)) == len(responses) == 2 * 4 * REPEATS


# --------------------------------------------------------------------------- kill -9, then resume


def _cli_args(ckpt: Path, journal_dir: Path, out: Path, gen: str = CLI_GEN) -> list[str]:
    model_args = f"pretrained={ckpt},num_paths=2,summary_max_tokens=4,dtype=float32,journal_dir={journal_dir}"
    return [
        "--model", "parathinker", "--model_args", model_args, "--tasks", "amc23,aime24", "--limit", "2",
        "--gen_kwargs", gen, "--metadata", json.dumps({"repeats": REPEATS}), "--device", "cpu",
        "--batch_size", "1", "--log_samples", "--output_path", str(out),
    ]  # fmt: skip


def _kill_after_first_response(args: list[str], journal_dir: Path) -> int:
    """Start lm_eval, SIGKILL it once its first response is journaled; returns the responses journaled."""
    kill_when(lm_eval_cmd() + args, lambda: journal_entries(journal_dir), "journaling a response")
    return len(journal_entries(journal_dir))


@pytest.fixture(scope="module")
def cli_runs(ckpt, tmp_path_factory):
    """An uninterrupted lm_eval run, and a run killed with SIGKILL mid-run whose journal then gets a
    torn line (a kill mid-write) and is resumed by rerunning the same command."""
    root = tmp_path_factory.mktemp("cli")
    with ThreadPoolExecutor(1) as beside:  # the uninterrupted run on the second core
        whole_run = beside.submit(run_lm_eval, _cli_args(ckpt, root / "journal_whole", root / "whole"), root / "whole",
                                  **ENV)
        killed_journal = root / "journal_killed"
        journaled = _kill_after_first_response(_cli_args(ckpt, killed_journal, root / "killed"), killed_journal)
        (rank0,) = glob.glob(str(killed_journal / "*" / "rank0.jsonl"))
        with open(rank0, "ab") as f:
            f.write(b'{"key": "0123", "response": "<think1>cut off by a ki')
        resume_proc, resumed = run_lm_eval(_cli_args(ckpt, killed_journal, root / "resumed"), root / "resumed", **ENV)
        whole_proc, whole = whole_run.result()
    return {
        "root": root, "whole": whole, "whole_log": whole_proc.stderr, "journaled": journaled,
        "resumed": resumed, "resume_log": resume_proc.stderr, "killed_journal": killed_journal,
    }  # fmt: skip


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(cli_runs):
    runs = cli_runs
    journaled = runs["journaled"]
    assert 1 <= journaled < CLI_TOTAL, f"the kill came too late: {journaled} of {CLI_TOTAL} responses done"
    report, whole_report = (runs[r]["config"]["parathinker"]["journal"] for r in ("resumed", "whole"))
    assert (report["reused"], report["generated"]) == (journaled, CLI_TOTAL - journaled)  # only the missing ones
    assert (whole_report["reused"], whole_report["generated"]) == (0, CLI_TOTAL)
    assert f"reusing {journaled} of {CLI_TOTAL} responses" in runs["resume_log"] and report["dir"] in runs["resume_log"]
    assert samples_by_doc(runs["root"] / "resumed") == samples_by_doc(runs["root"] / "whole")
    assert _metrics(runs["resumed"]) == _metrics(runs["whole"])
    whole_info, resumed_info = runs["whole"]["config"]["parathinker"], runs["resumed"]["config"]["parathinker"]
    assert resumed_info["termination_reasons"] == whole_info["termination_reasons"]  # rebuilt from the journal
    assert sum(whole_info["termination_reasons"].values()) == CLI_TOTAL


@pytest.mark.slow
def test_torn_journal_line_is_skipped_with_a_warning_and_cut(cli_runs):
    assert "skipped a torn last line" in cli_runs["resume_log"]
    (rank0,) = glob.glob(str(cli_runs["killed_journal"] / "*" / "rank0.jsonl"))
    lines = Path(rank0).read_bytes().splitlines()
    assert len(lines) == CLI_TOTAL and all(json.loads(line)["key"] for line in lines)  # every line whole


@pytest.mark.slow
def test_journal_doc_hashes_are_lm_evals(cli_runs):
    entries = journal_entries(cli_runs["killed_journal"])
    logged = {task: set(docs) for task, docs in samples_by_doc(cli_runs["root"] / "whole").items()}
    assert {(e["task"], e["doc_hash"]) for e in entries} == {(t, h) for t, hs in logged.items() for h in hs}


@pytest.mark.slow
def test_progress_bar_shows_rate_time_left_and_running_pass_at_1(cli_runs):
    log = cli_runs["whole_log"]
    assert f"{CLI_TOTAL}/{CLI_TOTAL} [" in log and "resp/s" in log and " tok/s" in log
    assert f"pass@1 0.000 ({CLI_TOTAL} graded)" in log  # the tiny model answers nothing right


@pytest.mark.slow
def test_changed_temperature_reuses_nothing(ckpt, cli_runs):
    """In-process runs on the resumed run's journal: the same settings reuse every response (and give
    the same samples); another temperature reuses none."""
    lm = _lm(ckpt, batch_size=1, journal_dir=str(cli_runs["killed_journal"]))
    same = _evaluate(lm, ["amc23", "aime24"], gen=CLI_GEN, limit=2)
    assert same["config"]["parathinker"]["journal"]["reused"] == CLI_TOTAL
    assert {t: by_doc(s) for t, s in same["samples"].items()} == samples_by_doc(cli_runs["root"] / "whole")
    lm.reset_run_state()
    hotter = _evaluate(lm, ["amc23", "aime24"], gen=CLI_GEN.replace("temperature=5.0", "temperature=6.0"), limit=2)
    report = hotter["config"]["parathinker"]["journal"]
    assert (report["reused"], report["generated"]) == (0, CLI_TOTAL)
    assert {t: by_doc(s) for t, s in hotter["samples"].items()} != samples_by_doc(cli_runs["root"] / "whole")


# --------------------------------------------------------------------------- data-parallel ranks


def test_resume_with_one_rank_reuses_what_two_ranks_wrote(ckpt, tmp_path, key_runs):
    """Two ranks simulated on the CPU through lm-eval's own sharding (``build_all_requests(rank,
    world_size)``) and padding (the evaluator's extra copies of a rank's last request), each writing
    its own journal file; then one rank resumes."""
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import simple_parse_args_string

    lm = _lm(ckpt, batch_size=2, journal_dir=str(tmp_path / "dp"))
    task = TaskManager(include_defaults=False, metadata={"repeats": REPEATS}).load(["aime24"])["tasks"]["aime24"]
    task.set_config(key="generation_kwargs", value=simple_parse_args_string(SAMPLED), update=True)
    shares = []
    for rank in (0, 1):
        task.build_all_requests(limit=3, rank=rank, world_size=2)
        shares.append(list(task.instances))
    torch.manual_seed(1234)  # the seed lm-eval gives torch by default
    for rank, share in enumerate(shares):
        lm._rank = rank  # names the journal file (a world of 2 would need a process group)
        padding = max(map(len, shares)) - len(share)
        requests = [req for req in share for _ in range(req.repeats)] + [share[-1]] * (padding * share[-1].repeats)
        out = lm.generate_until(requests)
        assert len(out) == len(requests) and all(isinstance(r, ParaThinkerResponse) for r in out)
    folder = Path(lm.journal_report["dir"])
    lines = {name: (folder / name).read_text().splitlines() for name in ("rank0.jsonl", "rank1.jsonl")}
    assert (len(lines["rank0.jsonl"]), len(lines["rank1.jsonl"])) == (2 * REPEATS, REPEATS)  # padding not journaled

    lm._rank = 0
    lm.reset_run_state()
    res = _evaluate(lm, ["aime24"], limit=3)
    assert res["config"]["parathinker"]["journal"] == {"dir": str(folder), "reused": 3 * REPEATS, "generated": 0}
    resumed = by_doc(res["samples"]["aime24"])
    assert len(resumed) == 3 and all(key_runs["limit4"]["aime24"][h] == doc for h, doc in resumed.items())


# --------------------------------------------------------------------------- faults: the journal's storage


def test_unwritable_or_full_journal_fails_before_loading(ckpt, tmp_path, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    def no_loading(*a, **k):
        raise AssertionError("the journal must be checked before the model loads")

    monkeypatch.setattr(HFLM, "__init__", no_loading)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(journal.JournalError, match=f"response journal {blocker / 'j'}: cannot write there"):
        _lm(ckpt, journal_dir=str(blocker / "j"))

    def disk_full(fd, data):
        os.write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(journal, "_write_all", disk_full)
    with pytest.raises(journal.JournalError, match="the disk is full"):
        _lm(ckpt, journal_dir=str(tmp_path / "full"))
    assert list((tmp_path / "full").iterdir()) == []  # the probe left nothing behind


def test_failed_write_leaves_no_partial_line(tmp_path, monkeypatch):
    with journal.ResponseJournal.open(tmp_path, {"model": "m"}, rank=0) as store:
        store.append("k1", {"response": "first"})
        before = store.writer.read_bytes()

        def disk_full(fd, data):
            os.write(fd, bytes(data[:7]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(journal, "_write_all", disk_full)
        with pytest.raises(journal.JournalError, match=r"rank0.jsonl: cannot write a response \(1 written so far"):
            store.append("k2", {"response": "second"})
        assert store.writer.read_bytes() == before
    monkeypatch.undo()
    with journal.ResponseJournal.open(tmp_path, {"model": "m"}, rank=1) as again:
        assert set(again.entries) == {"k1"} and [p.name for p in again.files_read] == ["rank0.jsonl"]
    with journal.ResponseJournal.open(tmp_path, {"model": "other"}, rank=0) as other:
        assert other.entries == {} and other.folder != again.folder


# --------------------------------------------------------------------------- faults: the grading worker

# Rigged responses: for a doc with answer a, repeat r is right (written as a decimal, so the worker
# must judge it) when (a + r) % 3 == 0, else wrong by one: pass@1 = 1/3, pass@k = 1, maj@k = 0.
RIGGED_REPEATS = 3


class RiggedLM(LM):
    """An lm-eval model whose responses are known to be right or wrong."""

    def generate_until(self, requests, disable_tqdm=False):
        out = []
        for request, key in zip(requests, samples.sample_keys(requests)):
            answer = int(request.doc["answer"])
            right = (answer + key.repeat) % RIGGED_REPEATS == 0
            out.append(f"So the answer is \\boxed{{{answer}.0}}." if right else f"\\boxed{{{answer + 1}}}")
        return out

    def loglikelihood(self, requests):
        raise NotImplementedError

    loglikelihood_rolling = loglikelihood


def _rigged_run() -> dict:
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager

    res = simple_evaluate(model=RiggedLM(), tasks=["aime24"], limit=3, log_samples=False,
                          task_manager=TaskManager(include_defaults=False, metadata={"repeats": RIGGED_REPEATS}))
    return res["results"]["aime24"]


def test_killing_the_grading_worker_mid_run_changes_no_result(monkeypatch):
    verifier = scoring.get_verifier()
    clean = _rigged_run()
    assert (clean["pass_at_1,all"], clean["pass_at_k,all"], clean["maj_at_k,all"]) == pytest.approx((1 / 3, 1.0, 0.0))
    assert clean["verify_timeouts,all"] == 0.0

    sends, kills = [0], []
    send = type(verifier)._send

    def send_then_die(self, request):
        """Answers 1, 3 and 5: the worker dies while checking it (stopped, asked, then killed)."""
        sends[0] += 1
        if sends[0] in (1, 3, 5):
            os.kill(self._proc.pid, signal.SIGSTOP)
            send(self, request)
            os.kill(self._proc.pid, signal.SIGKILL)
            kills.append(sends[0])
        else:
            send(self, request)

    monkeypatch.setattr(type(verifier), "_send", send_then_die)
    timeouts = verifier.timeouts
    assert _rigged_run() == clean
    assert kills == [1, 3, 5] and verifier.timeouts == timeouts  # a killed worker is no timeout


def test_a_worker_that_dies_twice_scores_zero_without_a_timeout(monkeypatch, caplog):
    verifier = scoring.Verifier()
    send = scoring.Verifier._send

    def always_die(self, request):
        os.kill(self._proc.pid, signal.SIGSTOP)
        send(self, request)
        os.kill(self._proc.pid, signal.SIGKILL)

    monkeypatch.setattr(scoring.Verifier, "_send", always_die)
    try:
        with caplog.at_level("WARNING"):
            assert verifier.check(scoring.FinalAnswer("0.5"), scoring.FinalAnswer(r"\frac12")) == (False, False)
        assert "died twice" in caplog.text and verifier.timeouts == 0
    finally:
        verifier.close()


# --------------------------------------------------------------------------- live progress


def test_live_progress_grades_off_the_callers_thread(monkeypatch):
    """``add`` returns while the grader is still busy (it runs in its own thread), and the running
    pass@1 is the share of right answers among the math docs' responses."""
    release, graders = threading.Event(), set()
    judge = progress.judge

    def blocked_judge(pred, gold):
        graders.add(threading.get_ident())
        assert release.wait(60)
        return judge(pred, gold)

    monkeypatch.setattr(progress, "judge", blocked_judge)
    doc = {"problem": "Find x.", "answer": "204"}
    responses = [
        ParaThinkerResponse("so \\boxed{204.0}", {"gen_tokens": 5}),
        ParaThinkerResponse("\\boxed{205}", {"gen_tokens": 7}),
        ParaThinkerResponse("The answer is 204.", {"gen_tokens": 11}),
        ParaThinkerResponse("no idea", {"gen_tokens": 13}),
    ]
    bar = progress.LiveProgress(total=5, reused=1, desc="test")
    bar.add(responses[0], doc, generated=False)
    for response in responses[1:]:
        bar.add(response, doc)
    bar.add(ParaThinkerResponse("text", {"gen_tokens": 1}), {"question": "no gold here"})
    assert bar.graded == 0  # all four wait for the grader: add() did not grade
    release.set()
    bar.close()
    expected = scoring.score_responses(responses, "204")["pass_at_1"]
    assert (bar.graded, bar.correct / bar.graded) == (4, expected) and expected == 0.5
    assert bar.tokens == 7 + 11 + 13 + 1 and bar.bar.n == 5
    assert graders and threading.get_ident() not in graders
    assert "pass@1 0.500 (4 graded)" in bar.postfix()
