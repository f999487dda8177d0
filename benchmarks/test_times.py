"""How long the test suite takes, by file and tier: what docs/development.md quotes.

    python -m benchmarks.test_times            # both tiers: results/test_times.{csv,md}
    python -m benchmarks.test_times --smoke    # one small file (into a temp folder): checks that it runs

Runs the fast tier (``pytest -m "not slow"``, what ``make test-fast`` runs) and then the slow tier in
separate pytest processes, each timed on the wall clock, and sums every test's phases (setup, call,
teardown, as ``tests/conftest.py`` records them) by file. The per-file seconds leave out pytest's
start-up and collection; the ``(wall clock)`` rows include them. Run it on an idle machine: a busy one
stretches every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from lm_eval_parathinker.tables import write_table

COLUMNS = ["file", "tier", "tests", "seconds", "minutes"]
TIERS = {"fast": "not slow", "slow": "slow"}
WALL = "(wall clock)"


def run_tier(marker: str, targets: list[str], times: Path) -> float:
    """Run the tests selected by ``marker``; returns the wall-clock seconds. A failure stops here."""
    start = time.perf_counter()
    # its own pytest: not a worker of a pytest-xdist run that may have started it (the hook skips workers)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")} | {"PARATHINKER_TEST_TIMES": str(times)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marker, *targets],
                          env=env)
    if proc.returncode not in (0, 5):  # 5: this tier selected no test
        raise SystemExit(f"pytest -m {marker!r} failed (exit {proc.returncode}): no times written")
    return time.perf_counter() - start


def rows_by_file(records: list[dict], tier: str) -> list[dict]:
    """One row per test file: its tests and their summed seconds."""
    seconds: dict[str, float] = defaultdict(float)
    tests: dict[str, set] = defaultdict(set)
    for r in records:
        seconds[r["file"]] += r["seconds"]
        tests[r["file"]].add(r["test"])
    return [{"file": f, "tier": tier, "tests": len(tests[f]), "seconds": round(seconds[f], 1),
             "minutes": round(seconds[f] / 60, 2)} for f in sorted(seconds, key=seconds.get, reverse=True)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", help="folder for test_times.csv and .md (default: results/; --smoke: a temp folder)")
    parser.add_argument("--smoke", action="store_true", help="time tests/test_layers.py only (a few quick tests)")
    args = parser.parse_args(argv)
    targets = ["tests/test_layers.py"] if args.smoke else ["tests"]
    output = Path(args.output or (tempfile.mkdtemp() if args.smoke else "results"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for tier, marker in TIERS.items():
            times = Path(tmp) / f"{tier}.jsonl"
            wall = run_tier(marker, targets, times)
            records = [json.loads(line) for line in times.read_text().splitlines()] if times.exists() else []
            file_rows = rows_by_file(records, tier)
            rows += file_rows
            rows.append({"file": WALL, "tier": tier, "tests": sum(r["tests"] for r in file_rows),
                         "seconds": round(wall, 1), "minutes": round(wall / 60, 2)})
    output.mkdir(parents=True, exist_ok=True)
    write_table(rows, output / "test_times.csv", COLUMNS)
    print(f"wrote {output / 'test_times.csv'}")


if __name__ == "__main__":
    main()
