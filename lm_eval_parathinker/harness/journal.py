"""A durable journal of finished responses: a rerun of a killed evaluation generates only what is missing.

Layout: ``<journal_dir>/<fingerprint hash>/`` holds ``fingerprint.json`` (everything that changes an
output: the checkpoint's identity, adapter, tokenizer and chat template, output-changing model args,
dtype, device type, package versions) and one JSONL file per data-parallel rank (``rank0.jsonl``,
...), so ranks never write the same file. Every file of the folder is read on resume, whatever the
number of ranks was; rank 0's progress bar follows the others' files
(:meth:`ResponseJournal.others_new`). A line is one response, keyed by :func:`entry_key` (the
generation settings, the prompt and the sample's key); each is written with one ``write`` and made
durable (``fsync``) before the next one starts.

Faults: a torn last line (a kill mid-write) is skipped with a warning and cut off by the next writer
of that file; a failed write is cut back off, so the file never holds a partial line of ours; a
folder that cannot take a large probe record (disk full, read-only, not a directory) fails with one
error before generation starts.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..files import cache_root
from ..files import atomic_write

logger = logging.getLogger(__name__)

JOURNAL_ENV = "PARATHINKER_JOURNAL_DIR"
FINGERPRINT_FILE = "fingerprint.json"
#: the probe written (and removed) before generation: about the size of a long ParaThinker response
PROBE_BYTES = 1 << 20
_MAX_SAFETENSORS_HEADER = 100 << 20
_CONFIG_FILES = ("config.json", "generation_config.json", "adapter_config.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


class JournalError(RuntimeError):
    """The journal cannot be written; the message names the folder or file and the cause."""


def default_dir() -> Path:
    """``$PARATHINKER_JOURNAL_DIR``, else ``journal/`` under the package cache
    (``$PARATHINKER_CACHE_DIR``, default ``~/.cache/lm_eval_parathinker``)."""
    root = os.environ.get(JOURNAL_ENV)
    return Path(root).expanduser() if root else cache_root() / "journal"


# -- identity of what produced a response ----------------------------------------------------


def _sha256(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def _safetensors_header(path: Path) -> bytes:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes, offsets): no weights are read."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 0 < size <= _MAX_SAFETENSORS_HEADER:
            raise JournalError(f"{path}: not a safetensors file (header length {size})")
        return f.read(size)


def checkpoint_files(folder: Path | None) -> dict[str, Any]:
    """Identity of a checkpoint or adapter folder without reading its weights: the content hash of its
    configs, and per weight file its header hash (safetensors), size and modification time (so a
    checkpoint overwritten in place with new weights of the same shapes is a new checkpoint)."""
    if folder is None or not folder.is_dir():
        return {}
    files: dict[str, Any] = {}
    for path in sorted(folder.iterdir()):
        if path.name in _CONFIG_FILES:
            files[path.name] = _sha256(path.read_bytes())
        elif path.suffix in _WEIGHT_SUFFIXES and path.is_file():
            stat = path.stat()
            header = _sha256(_safetensors_header(path)) if path.suffix == ".safetensors" else None
            files[path.name] = {"header": header, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return files


def tokenizer_identity(tokenizer) -> str:
    """Hash of the tokenizer's full definition (vocabulary, merges, added and special tokens,
    normalization, post-processing) and its chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = [type(tokenizer).__name__, tokenizer.chat_template, tokenizer.special_tokens_map]
    return _sha256(body + json.dumps(extra, sort_keys=True, default=str))


def versions() -> dict[str, str]:
    import torch
    import transformers

    return {
        "lm_eval_parathinker": importlib.metadata.version("lm-eval-parathinker"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str, ensure_ascii=False)


def fingerprint_hash(fingerprint: dict) -> str:
    return _sha256(_canonical(fingerprint))


def entry_key(settings: dict, prompt: str, sample: dict) -> str:
    """The key of one response within a fingerprint's folder: its generation settings, the prompt
    the engine reads and the sample's key (run seed, task, doc, repeat)."""
    return _sha256(_canonical([settings, prompt, sample]))


# -- durable writes ------------------------------------------------------------------------------


def _fail(path: Path, action: str, error: OSError) -> JournalError:
    full = " (the disk is full)" if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else ""
    return JournalError(
        f"response journal {path}: cannot {action}: {error.strerror or error}{full}. Free space, pass "
        f"journal_dir=<another folder> (or set ${JOURNAL_ENV}), or turn the journal off with resume=false"
    )


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


@contextmanager
def _locked(fd: int) -> Iterator[None]:
    """An exclusive lock on the file for one write (another process may append to the same rank file)."""
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _append_durably(fd: int, data: bytes) -> None:
    """Append ``data`` and fsync; on failure cut the file back to where it was, then re-raise."""
    size = os.fstat(fd).st_size
    try:
        _write_all(fd, data)
        os.fsync(fd)
    except OSError:
        os.ftruncate(fd, size)
        raise


def _probe(folder: Path) -> None:
    """Write and sync a probe record of ``PROBE_BYTES`` in its own file of ``folder``, then remove it:
    disk-full and read-only storage fail here, before any generation, and a kill leaves the journal
    files untouched."""
    probe = folder / f".probe-{os.getpid()}"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, b"{" + b" " * (PROBE_BYTES - 3) + b"}\n")
        os.fsync(fd)
    finally:
        os.close(fd)
        probe.unlink()


def check_writable(folder: Path) -> None:
    """Create ``folder`` and prove it takes a probe record (raises :class:`JournalError`)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _probe(folder)
    except OSError as e:
        raise _fail(folder, "write there", e) from None


def _read_from(path: Path, start: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read()


def _records(path: Path, data: bytes) -> Iterator[tuple[int, dict]]:
    """(line number, record) of a journal file's ``data``; unreadable lines are skipped with a warning."""
    lines = data.split(b"\n")
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            torn = lineno == len(lines)  # no newline after it: a write that was cut off
            logger.warning("response journal %s:%d: skipped a %s line (%d bytes)", path, lineno,
                           "torn last" if torn else "malformed", len(line))
            continue
        if isinstance(record, dict) and "key" in record:
            yield lineno, record


class ResponseJournal:
    """The journaled responses of one fingerprint, and this process's file for new ones.

    ``with ResponseJournal.open(root, fingerprint, rank) as journal:`` reads every rank's file, opens
    this rank's file for appending, proves the folder takes a probe record, and closes the file at the end.
    """

    def __init__(self, folder: Path, writer: Path, entries: dict[str, dict], read_up_to: dict[Path, int]) -> None:
        self.folder = folder
        self.writer = writer
        self.entries = entries
        self.files_read = list(read_up_to)
        self.written = 0
        self._fd: int | None = None
        self._read_up_to = read_up_to  # per file, the end of its last whole line read

    @classmethod
    def open(cls, root: Path, fingerprint: dict, rank: int) -> ResponseJournal:
        folder = root / fingerprint_hash(fingerprint)[:20]
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if not (folder / FINGERPRINT_FILE).exists():
                atomic_write(folder / FINGERPRINT_FILE, json.dumps(fingerprint, indent=2, sort_keys=True, default=str))
        except OSError as e:
            raise _fail(folder, "create the journal folder", e) from None
        entries: dict[str, dict] = {}
        read_up_to = {}
        for path in sorted(folder.glob("rank*.jsonl")):
            data = _read_from(path, 0)
            for _, record in _records(path, data):
                entries[record["key"]] = record
            read_up_to[path] = data.rfind(b"\n") + 1  # a torn last line is cut by its writer
        journal = cls(folder, folder / f"rank{rank}.jsonl", entries, read_up_to)
        journal._open_writer()
        return journal

    def _open_writer(self) -> None:
        try:
            self._fd = os.open(self.writer, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            with _locked(self._fd):
                self._cut_torn_tail()
            _probe(self.folder)
            dir_fd = os.open(self.folder, os.O_RDONLY)  # make the file's creation durable too
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as e:
            self.close()
            raise _fail(self.writer, "write", e) from None

    def _cut_torn_tail(self) -> None:
        """Cut an incomplete last line (left by a killed writer) so the next record starts a line."""
        size = os.fstat(self._fd).st_size
        keep, pos = 0, size
        with open(self.writer, "rb") as f:
            while pos > 0:  # back from the end, a window at a time, to the last newline
                start = max(0, pos - (1 << 16))
                f.seek(start)
                newline = f.read(pos - start).rfind(b"\n")
                if newline >= 0:
                    keep = start + newline + 1
                    break
                pos = start
        if keep < size:
            os.ftruncate(self._fd, keep)
            os.fsync(self._fd)

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def others_new(self) -> list[dict]:
        """The records the other ranks' files gained since the last call (or since :meth:`open` read
        them): whole lines only, a line being written is read at the next call."""
        found = []
        for path in sorted(self.folder.glob("rank*.jsonl")):
            if path == self.writer:
                continue
            start = self._read_up_to.get(path, 0)
            data = _read_from(path, start)
            end = data.rfind(b"\n") + 1
            self._read_up_to[path] = start + end
            found += [record for _, record in _records(path, data[:end])]
        return found

    def append(self, key: str, record: dict) -> None:
        """Journal one finished response durably (one line, one write, fsync)."""
        record = {"key": key, **record}
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        try:
            with _locked(self._fd):
                _append_durably(self._fd, line)
        except OSError as e:
            raise _fail(self.writer, f"write a response ({self.written} written so far are kept)", e) from None
        self.entries[key] = record
        self.written += 1

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> ResponseJournal:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = [
    "JOURNAL_ENV",
    "JournalError",
    "ResponseJournal",
    "check_writable",
    "checkpoint_files",
    "default_dir",
    "entry_key",
    "fingerprint_hash",
    "tokenizer_identity",
    "versions",
]
