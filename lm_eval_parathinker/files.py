"""Where the package keeps its files (:func:`cache_root`), and writing files so that a reader never
sees half of one: the one atomic write of the package."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

CACHE_ENV = "PARATHINKER_CACHE_DIR"


def cache_root() -> Path:
    """``$PARATHINKER_CACHE_DIR`` or ``~/.cache/lm_eval_parathinker``: the package's cache (the embedded
    model's checkpoint, the response journal, inductor's compiled kernels)."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "lm_eval_parathinker"


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8) to a temporary file beside ``path``, then rename it into place;
    on any error the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
