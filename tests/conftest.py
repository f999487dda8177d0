"""Response journals of the tests go to temporary folders, never to the user's cache: one per test
(a shared one would let a test reuse another's responses), and one per session for module-scoped
fixtures, which run before any test's own. lm_eval subprocesses inherit the variable."""

from __future__ import annotations

import pytest

from lm_eval_parathinker.journal import JOURNAL_ENV


@pytest.fixture(scope="session", autouse=True)
def _session_journal(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(JOURNAL_ENV, str(tmp_path_factory.mktemp("journal")))
        yield


@pytest.fixture(autouse=True)
def _own_journal(tmp_path, monkeypatch):
    monkeypatch.setenv(JOURNAL_ENV, str(tmp_path / "journal"))
