"""Shared test helpers: the offline data folder and a tiny random checkpoint builder (no hub access)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
#: offline benchmark JSONL folder (aime24/aime25/amc23/math500.jsonl); never copied into the repo
DATA_DIR = REPO_ROOT.parent / "shared" / "data"
VENV_BIN = Path(sys.executable).parent

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>", "<think>", "</think>"]

_CORPUS = [
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "Find the value of $x$ such that $x^2 + 2x + 1 = 0$. The answer is \\boxed{-1}.",
    "Let $a$ and $b$ be real numbers with \\frac{1}{2} + \\sqrt{3} = 0.5 and (1, 2) in [0, 1).",
    "0123456789 + - * / = ^ _ { } ( ) [ ] $ \\ , . ; : ! ? ' \" < > | & % # @ ~",
    "The quick brown fox jumps over the lazy dog. Therefore the final answer is 42.",
]


def make_tokenizer(path: str | os.PathLike | None = None):
    """A byte-level BPE fast tokenizer (any text encodes) with eos/pad tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>", "<think>", "</think>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    if path is not None:
        fast.save_pretrained(str(path))
    return fast


def make_tiny_checkpoint(path: str | os.PathLike, arch: str = "llama", seed: int = 0) -> Path:
    """Save a tiny random causal LM (2 layers, hidden 64) and its fast tokenizer to ``path``.

    ``arch``: ``"llama"``, ``"qwen2"`` or ``"qwen3"``. Returns ``Path(path)``. CPU only, a second or two.
    """
    import torch
    import transformers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(path)
    common = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    if arch == "llama":
        cfg, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    elif arch == "qwen2":
        cfg, cls = transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    elif arch == "qwen3":
        cfg, cls = transformers.Qwen3Config(head_dim=16, **common), transformers.Qwen3ForCausalLM
    else:
        raise ValueError(f"unknown arch {arch!r}; expected llama, qwen2 or qwen3")
    torch.manual_seed(seed)
    model = cls(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(path))
    return path


def lm_eval_cmd() -> list[str]:
    """The ``lm_eval`` console script of this environment (falls back to ``python -m lm_eval``)."""
    exe = VENV_BIN / "lm_eval"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "lm_eval"]


def offline_env(**extra: str) -> dict:
    """Environment for subprocess runs: offline hub, our data folder, no tokenizer threads."""
    env = dict(os.environ)
    env.update(
        PARATHINKER_DATA_DIR=str(DATA_DIR),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(extra)
    return env


_RUN_CACHE: dict = {}


def run_lm_eval(args: list[str], out_dir: str | os.PathLike, timeout: float = 300, **env: str):
    """Run ``lm_eval`` in a subprocess with ``offline_env``; returns (CompletedProcess, results dict)."""
    import glob
    import json
    import subprocess

    cmd = lm_eval_cmd() + list(args) + ["--output_path", str(out_dir)]
    proc = subprocess.run(cmd, env=offline_env(**env), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"lm_eval failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    files = sorted(glob.glob(os.path.join(str(out_dir), "**", "results_*.json"), recursive=True))
    assert files, f"no results JSON under {out_dir}"
    with open(files[-1], encoding="utf-8") as f:
        return proc, json.load(f)


def tiny_hf_aime24_run(tmp_root: str | os.PathLike):
    """Once per test process: a real ``lm_eval --model hf --tasks aime24 --limit 2`` run on a tiny Llama.

    Returns (output dir, results dict). Shared by test_tasks and test_leaderboard to keep the suite fast.
    """
    if "hf" not in _RUN_CACHE:
        root = Path(tmp_root)
        ckpt = make_tiny_checkpoint(root / "tiny_llama", "llama")
        out = root / "runs"
        _, res = run_lm_eval(
            [
                "--model", "hf",
                "--model_args", f"pretrained={ckpt},dtype=float32",
                "--tasks", "aime24",
                "--limit", "2",
                "--gen_kwargs", "max_gen_toks=8",
                "--metadata", '{"repeats": 2}',
                "--device", "cpu",
                "--log_samples",
            ],
            out,
        )
        _RUN_CACHE["hf"] = (out, res)
    return _RUN_CACHE["hf"]
