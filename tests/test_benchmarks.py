"""The benchmark suite runs end to end on a tiny shape and writes its tables (speed is not tested)."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import CPU_KERNELS, REPO_ROOT

from benchmarks import batching, harness, workload_worker
from benchmarks import engine as bench
from lm_eval_parathinker import protocol
from lm_eval_parathinker.engine import ParaThinkerEngine, compilation
from lm_eval_parathinker.upstream import torch as upstream_torch

TEXT_COLUMNS = {"mode", "timed", "variant", "default", "step", "run", "shape", "same_outputs"}
RESULTS = REPO_ROOT / "results"
#: columns a benchmark writes only on CUDA (measured peaks: the CPU has no allocator statistics)
CUDA_ONLY = {"engine_extra_mb", "hf_extra_mb"}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    paths = bench.main(["--smoke", "--output", str(out)])
    return out, paths


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def header(path) -> list[str]:
    with open(path, newline="") as f:
        return next(csv.reader(f))


@pytest.mark.slow
@pytest.mark.parametrize("name", bench.BENCHMARKS)
def test_smoke_writes_csv_and_png(smoke_run, name):
    out, paths = smoke_run
    csv_path = out / f"bench_{name}.csv"
    assert csv_path in paths
    rows = read(csv_path)
    columns = header(csv_path)  # the committed CSV's too (test_committed_csv_header_is_what_the_benchmark_writes)
    assert (out / f"bench_{name}.png").read_bytes()[:4] == b"\x89PNG"
    table = (out / f"bench_{name}.md").read_text().splitlines()  # the same rows, for the docs
    assert table[0] == "| " + " | ".join(columns) + " |" and len(table) == 2 + len(rows)
    numbers = [float(v) for r in rows for k, v in r.items() if k not in TEXT_COLUMNS and v != ""]
    assert all(v >= 0 for v in numbers) and all(v == v for v in numbers)  # no negatives, no NaN


@pytest.mark.slow
def test_smoke_grids_and_forced_lengths(smoke_run):
    out, _ = smoke_run
    smoke = harness.PRESETS["smoke"]
    width = read(out / "bench_width.csv")
    assert [int(r["paths"]) for r in width] == list(smoke.width_paths)
    assert float(width[0]["ratio_to_p1"]) == 1.0
    vs_hf = read(out / "bench_vs_hf.csv")
    assert [(r["mode"], int(r["tokens_per_path"])) for r in vs_hf] == [
        *(("independent", n) for n in smoke.path_lengths), ("sequential", smoke.path_lengths[0]),
        ("parathinker", smoke.path_lengths[0])]
    for r in vs_hf:  # short paths whole, long ones a window of their middle
        length = int(r["tokens_per_path"])
        whole = length <= smoke.vs_hf_whole
        start, tokens = (0, length) if whole else harness.window(length, smoke.window)
        assert (r["timed"] == "whole run") == whole and whole == (length == smoke.path_lengths[0])
        assert (int(r["window_start"]), int(r["window_tokens"])) == (start, tokens)
        assert float(r["speedup"]) == pytest.approx(float(r["hf_s"]) / float(r["engine_s"]))
    tok = harness.build_tokenizer()
    tok.add_tokens(protocol.control_tokens(harness.NUM_CONTROL_PATHS), special_tokens=True)
    template = len(tok(protocol.SUMMARY_TEMPLATE, add_special_tokens=False)["input_ids"])
    # EOS and </summary> are banned, so the summary runs to its budget after the template
    assert int(vs_hf[-1]["summary_tokens"]) == template + smoke.e2e_summary
    memory = read(out / "bench_memory.csv")
    assert memory[-1]["same_outputs"] == "True" and int(memory[-1]["preemptions"]) > 0  # the pool was too small
    for r in memory:  # the pages held at peak hold the tokens, within a page per segment
        held, tokens, page = float(r["kv_peak_mb"]), float(r["kv_peak_tokens_mb"]), float(r["page_mb"])
        assert tokens <= held < tokens + int(r["segments"]) * page
    summary = read(out / "bench_summary.csv")
    assert [(int(r["paths"]), int(r["tokens_per_path"])) for r in summary] == [
        (p, n) for p in smoke.summary_paths for n in smoke.summary_lens
    ]
    assert [int(r["context"]) for r in read(out / "bench_length.csv")] == list(smoke.length_contexts)


def preset_free(columns: list[str]) -> list[str]:
    """``columns`` with the preset's largest path count in a name (path_length's ``_p8`` on the CPU,
    ``_p2`` in the smoke run) written ``_pP``."""
    return [re.sub(r"_p(\d+)(?=_|$)", lambda m: m.group(0) if m.group(1) == "1" else "_pP", c) for c in columns]


def check_committed_header(name: str, written: list[str]) -> None:
    """results/bench_<name>[_cuda].csv, where committed, has the header the benchmark writes today
    (a benchmark whose columns changed must be rerun)."""
    for path in (RESULTS / f"bench_{name}.csv", RESULTS / f"bench_{name}_cuda.csv"):
        if not path.exists():
            continue
        expected = [c for c in header(path) if not (path.stem.endswith("_cuda") and c in CUDA_ONLY)]
        if name == "attention" and "flex" not in CPU_KERNELS:  # CPU torch < 2.13: sdpa alone
            expected = [c for c in expected if "flex" not in c]
        assert preset_free(written) == preset_free(expected), \
            f"{path.name} has other columns than the benchmark writes today: rerun it"


@pytest.mark.slow
@pytest.mark.parametrize("name", bench.BENCHMARKS)
def test_committed_csv_header_is_what_the_benchmark_writes(smoke_run, name):
    out, _ = smoke_run
    check_committed_header(name, header(out / f"bench_{name}.csv"))


def test_committed_compile_verdicts_header_is_the_writer_s():
    if compilation.VERDICTS_CSV.exists():
        assert header(compilation.VERDICTS_CSV) == list(compilation.VERDICT_COLUMNS)


def test_only_a_real_run_into_results_writes_the_package_s_verdicts(tmp_path):
    def where(preset, output):
        return batching.verdicts_path(SimpleNamespace(preset=harness.PRESETS[preset], output=output))

    assert where("cpu", RESULTS) == compilation.VERDICTS_CSV
    assert where("smoke", RESULTS) == RESULTS / "compile_verdicts.csv"
    assert where("cpu", tmp_path) == tmp_path / "compile_verdicts.csv"


@pytest.mark.slow
def test_eval_workload_runs_each_variant_in_its_process_and_writes_a_verdict(smoke_run):
    out, _ = smoke_run
    (workload,) = harness.PRESETS["smoke"].workloads
    rows = read(out / "bench_eval_workload.csv")
    assert [r["variant"] for r in rows] == list(workload_worker.VARIANTS)
    lengths = batching.workload_lengths(workload)  # every run asserted that every request thought exactly this long
    assert float(rows[0]["mean_think_len"]) == pytest.approx(sum(lengths) / len(lengths))
    assert len(set(lengths)) > 2 and max(lengths) <= workload.budget
    big = batching.workload_lengths(harness.CPU_WORKLOADS[0])
    assert max(big) > 3 * sorted(big)[len(big) // 2]  # a long tail: the longest is several medians
    assert float(rows[0]["speedup_vs_original"]) == 1.0
    assert [r["compile_s_cold"] != "" for r in rows] == [False, False, True]  # the compiled variant's alone
    (verdict,) = compilation.read_verdicts(out / "compile_verdicts.csv")  # beside the outputs, not the package's
    assert (verdict["device"], verdict["shape"], verdict["size_bucket"]) == ("cpu", "tiny", "<10M")
    assert verdict["speedup"] == pytest.approx(verdict["eager_s"] / verdict["compiled_s"])
    default = "compiled" if verdict["compile"] == "true" else "eager"
    assert [r["variant"] for r in rows if r["default"] == "True"] == [default]


def gpu_script_benchmarks() -> list[str]:
    """The benchmarks gpu.sh runs (its ONLY list)."""
    (line,) = [line for line in (REPO_ROOT / "benchmarks" / "gpu.sh").read_text().splitlines() if line.startswith("ONLY=")]
    return line.removeprefix("ONLY=").split(",")


@pytest.mark.slow
def test_gpu_script_runs_in_smoke_mode_on_cpu(tmp_path):
    """gpu.sh's checks and its command line, with the cheapest of its benchmarks (the others, in
    smoke mode as the script runs them: test_timed_calls_compile_nothing)."""
    assert set(gpu_script_benchmarks()) <= set(bench.BENCHMARKS)
    proc = subprocess.run(["bash", "benchmarks/gpu.sh", "--smoke", "--output", str(tmp_path), "--only", "vs_hf"],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=600,
                          env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]  # one thread: the tests' count, so its cached graphs fit theirs
    assert "benchmarks/gpu.sh: python" in proc.stderr  # the import check ran
    rows = read(tmp_path / "bench_vs_hf.csv")
    assert rows and (tmp_path / "bench_vs_hf.png").is_file()


@pytest.mark.slow
def test_timed_calls_compile_nothing(tmp_path, monkeypatch):
    """Every timed engine call of gpu.sh's benchmarks runs at shapes its warm-up has met: nothing
    compiles inside a measured call (here the compiled step and flex's kernel, per batch size; on
    CUDA the graphs are also recorded per shape and per KV pool)."""
    counters = upstream_torch.compile_counters()

    warming, compiled = [], []  # compiled: frames compiled by each engine call outside a warm-up
    warm_up, generate = harness.Bench.warm_up, ParaThinkerEngine.generate

    def marked_warm_up(self, fn):
        warming.append(fn)
        try:
            return warm_up(self, fn)
        finally:
            warming.pop()

    def counted_generate(self, *args, **kwargs):
        before = counters["frames"]["ok"]
        outputs = generate(self, *args, **kwargs)
        if not warming:
            compiled.append(counters["frames"]["ok"] - before)
        return outputs

    monkeypatch.setattr(harness.Bench, "warm_up", marked_warm_up)
    monkeypatch.setattr(ParaThinkerEngine, "generate", counted_generate)
    only = ",".join(name for name in gpu_script_benchmarks() if name != "eval_workload")  # as gpu.sh --smoke
    bench.main(["--smoke", "--compile", "--only", only, "--output", str(tmp_path)])
    steps = read(tmp_path / "bench_decode_step.csv")
    assert [r["step"] for r in steps] == ["eager", "compiled"]
    assert (tmp_path / "bench_path_length.png").is_file()
    assert compiled and not any(compiled), compiled


@pytest.mark.slow
def test_memory_theory_is_the_kv_of_prompt_plus_paths(smoke_run):
    out, _ = smoke_run
    smoke = harness.PRESETS["smoke"]
    _, shape = harness.SHAPES[smoke.shape]
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    for r in read(out / "bench_memory.csv")[:-1]:  # the P rows (the last: the oversubscribed run)
        tokens = smoke.prompt_len + int(r["paths"]) * int(r["tokens_per_path"])
        per_token = 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * head_dim * 4  # K and V, float32
        assert float(r["kv_theory_mb"]) == pytest.approx(tokens * per_token / 2**20)
        copies = int(r["paths"]) * (smoke.prompt_len + int(r["tokens_per_path"]))  # generate: P prompt copies
        assert float(r["hf_kv_mb"]) == pytest.approx(copies * per_token / 2**20)
        assert float(r["kv_pool_mb"]) >= float(r["kv_peak_mb"])


def test_banned_tokens_are_never_generated():
    model = harness.build_model("tiny", "cpu", torch.float32)
    harness.ban_tokens(model, [1, 5])
    logits = model(torch.tensor([[7, 8, 9]])).logits
    assert torch.isinf(logits[..., [1, 5]]).all() and torch.isfinite(logits[..., 6]).all()


def test_bad_arguments_exit_with_a_clear_message(capsys):
    with pytest.raises(SystemExit) as err:
        bench.parse_args(["--only", "width,nope"])
    assert err.value.code != 0
    assert "--only" in capsys.readouterr().err


# ------------------------------------------------------------------ training benchmarks

TRAINING_COLUMNS = {
    "training_attention": ["length", "paths", "path_len", "summary_len", "dense_bool_mib", "dense_fp32_mib",
                           "block_mask_mib", "blocks_computed", "of_causal_blocks", "dense_build_s", "block_build_s",
                           "block_first_call_s"],
    "training_throughput": ["packing", "attention", "records", "rows", "optimizer_steps", "tokens", "seconds",
                            "tokens_per_s", "runs", "ratio_to_unpacked"],
    "training_step": ["check", "length", "paths", "attention", "pass", "seconds", "peak_gib", "max_rel_diff"],
}


@pytest.fixture(scope="module")
def training_smoke(tmp_path_factory):
    from benchmarks import training

    out = tmp_path_factory.mktemp("training_bench")
    paths = training.main(["--smoke", "--output", str(out)])
    return out, paths


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAINING_COLUMNS)
def test_training_smoke_writes_csv_and_png(training_smoke, name):
    out, paths = training_smoke
    assert out / f"bench_{name}.csv" in paths
    assert list(read(out / f"bench_{name}.csv")[0]) == TRAINING_COLUMNS[name]
    assert (out / f"bench_{name}.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAINING_COLUMNS)
def test_committed_training_csv_header_is_what_the_benchmark_writes(training_smoke, name):
    out, _ = training_smoke
    check_committed_header(name, header(out / f"bench_{name}.csv"))


@pytest.mark.slow
def test_training_attention_counts_the_blocks_of_the_two_phase_mask(training_smoke):
    from benchmarks import training

    out, _ = training_smoke
    smoke = training.PRESETS["smoke"]
    rows = read(out / "bench_training_attention.csv")
    assert [int(r["paths"]) for r in rows] == list(smoke.attention_paths)
    n = smoke.attention_length // 128
    for r in rows:
        assert float(r["dense_fp32_mib"]) == 4 * float(r["dense_bool_mib"]) == 4 * smoke.attention_length**2 / 2**20
        assert float(r["block_mask_mib"]) < float(r["dense_bool_mib"]) / 100
        # causal alone computes the lower-triangle blocks; the two-phase rule skips some of them
        assert 0 < float(r["blocks_computed"]) < (n + 1) / (2 * n)
        assert float(r["of_causal_blocks"]) == pytest.approx(float(r["blocks_computed"]) * n * n / (n * (n + 1) / 2))
    assert float(rows[1]["blocks_computed"]) < float(rows[0]["blocks_computed"])  # more paths, more skipped blocks


@pytest.mark.slow
def test_training_step_and_throughput_smoke(training_smoke):
    out, _ = training_smoke
    step = read(out / "bench_training_step.csv")
    check = step[-1]
    assert check["check"] == "flex_vs_sdpa" and check["pass"] == "logits (CPU)" and float(check["max_rel_diff"]) < 1e-4
    assert {r["attention"] for r in step[:-1]} == {"sdpa", "flex_attention"}
    unpacked, packed = read(out / "bench_training_throughput.csv")
    assert unpacked["packing"] == "False" and packed["packing"] == "True"
    assert unpacked["tokens"] == packed["tokens"] and int(packed["rows"]) < int(unpacked["rows"]) == int(unpacked["records"])
    assert float(packed["ratio_to_unpacked"]) == pytest.approx(float(packed["tokens_per_s"]) / float(unpacked["tokens_per_s"]))


@pytest.mark.slow
def test_test_times_smoke_counts_each_file_and_tier(tmp_path):
    """benchmarks.test_times --smoke: one row per tier for tests/test_layers.py (all fast) plus the
    wall-clock rows, and the per-file seconds no more than the tier's wall clock."""
    import csv
    import subprocess
    import sys

    from helpers import offline_env

    proc = subprocess.run([sys.executable, "-m", "benchmarks.test_times", "--smoke", "--output", str(tmp_path)],
                          cwd=REPO_ROOT, env=offline_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "test_times.csv")))
    files = [r for r in rows if r["file"] != "(wall clock)"]
    assert [(r["file"], r["tier"]) for r in files] == [("tests/test_layers.py", "fast")]
    wall = {r["tier"]: float(r["seconds"]) for r in rows if r["file"] == "(wall clock)"}
    assert set(wall) == {"fast", "slow"} and 0 < float(files[0]["seconds"]) <= wall["fast"]
    tests = (REPO_ROOT / "tests/test_layers.py").read_text().count("\ndef test_")  # none parametrized
    assert int(files[0]["tests"]) == tests
    assert (tmp_path / "test_times.md").read_text().startswith("| file")

