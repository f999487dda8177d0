"""Response journals of the tests go to temporary folders, never to the user's cache: one per test
(a shared one would let a test reuse another's responses), and one per session for module-scoped
fixtures, which run before any test's own. lm_eval subprocesses inherit the variable."""

from __future__ import annotations

import json
import os

import pytest
import torch

from helpers import offline_env

from lm_eval_parathinker.harness.journal import JOURNAL_ENV


@pytest.fixture(scope="session", autouse=True)
def _session_journal(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(JOURNAL_ENV, str(tmp_path_factory.mktemp("journal")))
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
