"""Response journals of the tests go to temporary folders, never to the user's cache: one per test
(a shared one would let a test reuse another's responses), and one per session for module-scoped
fixtures, which run before any test's own. The decode step runs eager unless a test asks for
``compile`` (``$PARATHINKER_COMPILE=false``: the tiny models' verdict is to compile, which costs
every lm_eval process half a minute), inductor's cache is the session's own, and torch runs one
thread. lm_eval subprocesses inherit the variables."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import pytest
import torch

from helpers import offline_env

from lm_eval_parathinker.engine.compilation import COMPILE_ENV
from lm_eval_parathinker.harness.journal import JOURNAL_ENV


@pytest.fixture(scope="session", autouse=True)
def _session_journal(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(JOURNAL_ENV, str(tmp_path_factory.mktemp("journal")))
        patch.setenv(COMPILE_ENV, "false")
        # one inductor cache for the session's pytest-xdist workers (they share the session's base folder,
        # each its own basetemp in it): a kernel one worker compiled, the other reads (same thread count)
        shared = tmp_path_factory.getbasetemp()
        shared = (shared.parent if os.environ.get("PYTEST_XDIST_WORKER") else shared) / "inductor"
        shared.mkdir(exist_ok=True)
        patch.setenv("TORCHINDUCTOR_CACHE_DIR", str(shared))
        # one torch thread in every test process: compiled CPU flex kernels are built for one count
        # per process (attention.resolve_kernel refuses another), and tiny models gain nothing from more
        torch.set_num_threads(1)
        yield


@pytest.fixture(autouse=True)
def _own_journal(tmp_path, monkeypatch):
    monkeypatch.setenv(JOURNAL_ENV, str(tmp_path / "journal"))


@pytest.fixture(scope="module")
def one_thread_offline():
    """For a module's in-process runs (its module fixtures included; ask for it with
    ``pytestmark = pytest.mark.usefixtures("one_thread_offline")``): the offline data and no hub, and one
    torch thread (tiny models gain nothing from more, and on a busy shared box OpenMP spinning costs a lot)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        for key in ("PARATHINKER_DATA_DIR", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TOKENIZERS_PARALLELISM"):
            patch.setenv(key, offline_env()[key])
        yield
    torch.set_num_threads(before)


# -- test times by file and tier (benchmarks/test_times.py sets the variable) --------------------

TIMES_CSV = Path(__file__).resolve().parents[1] / "results" / "test_times.csv"


def pytest_collection_modifyitems(config, items):
    """The longest files first, by the committed test times (both tiers; a file not timed yet
    first of all): pytest-xdist's ``--dist loadfile`` hands files to its workers in this order, so
    long files start early instead of meeting at the tail."""
    seconds: dict[str, float] = {}
    if TIMES_CSV.exists():
        with open(TIMES_CSV, newline="") as f:
            for row in csv.DictReader(f):
                seconds[row["file"]] = seconds.get(row["file"], 0.0) + float(row["seconds"])
    items.sort(key=lambda item: -seconds.get(item.nodeid.split("::")[0], math.inf))


TIMES_ENV = "PARATHINKER_TEST_TIMES"


def pytest_runtest_logreport(report):
    """Append each test phase's duration, file and tier to the JSON-lines file named by
    ``$PARATHINKER_TEST_TIMES`` (unset: nothing)."""
    path = os.environ.get(TIMES_ENV)
    if path and "PYTEST_XDIST_WORKER" not in os.environ:  # under xdist the controller records its workers' reports
        record = {"file": report.nodeid.split("::")[0], "test": report.nodeid, "when": report.when,
                  "slow": "slow" in report.keywords, "seconds": report.duration, "outcome": report.outcome}
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
