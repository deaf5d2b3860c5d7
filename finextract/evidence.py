"""Evidence records: what exactly a result was computed from, so that anyone can re-check it.

    inputs = {"base": input_record("base", "models/sd15"), "lora": input_record("lora", "x.safetensors")}
    record = {"inputs": inputs, "environment": environment_record(), "command": command_record(call)}

- Every input file is named with its absolute path, size (bytes) and sha256. A model folder is recorded
  file by file (`MODEL_SUFFIXES`: weights, JSON configs, tokenizer text files).
- Hashing a multi-GB checkpoint once per run would cost seconds, so each file is hashed once and its
  digest cached by (real path, size, mtime_ns) in `<cache folder>/hashes.json` (`HashCache`). A cache
  is a speed-up for writing records only: `finextract verify` re-reads every byte.
- The environment: Python, the machine kind, and every installed distribution (importlib.metadata); when
  the lock files (`LOCK_FILES`, pip `name==version` lines) are found, their sha256 and only the
  versions that differ from them.
- The command: the process's command line and, for API use, the call (function and arguments, as JSON).

Records are data: nothing here executes or imports what a record names.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import os
import platform
import sys
from pathlib import Path

import numpy as np

from finextract.engine.formats import file_sha256
from finextract.records import installed_versions, locked_versions, version_differences
from finextract.store.files import write_json

logger = logging.getLogger(__name__)

#: Files of a model folder that are recorded: weights, configs and tokenizer vocabularies.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
MODEL_SUFFIXES = WEIGHT_SUFFIXES + (".json", ".txt", ".model")
#: The hash cache's file name under the cache folder, and its format tag.
CACHE_FILE = "hashes.json"
CACHE_FORMAT = "finextract-hashes/1"
#: Entries kept in the hash cache (the oldest are dropped beyond it).
CACHE_ENTRIES = 4096
#: The lock files the repository root holds (pip `name==version` lines; see docs/development.md).
LOCK_FILES = ("requirements.lock", "requirements-data.lock")


class HashCache:
    """sha256 of files, each computed once per (real path, size, mtime_ns) and kept in a JSON file.

    Args:
        folder: the cache folder (`RunConfig.cache_dir`; `finextract.engine.config.default_cache_dir()`
            is `$FINEXTRACT_CACHE` or ~/.cache/finextract); the cache is `folder/hashes.json`. None keeps
            nothing: every call hashes the file.

    A missing, unreadable or corrupt cache file counts as empty (with a debug message); the file is
    written atomically (`finextract.engine.formats.atomic_write`), so concurrent runs can lose each
    other's new entries (they are recomputed) but never corrupt it. A file rewritten in place within
    one mtime tick and with the same size would be missed: what the cache trusts is stated in every
    record, and `finextract verify` does not use the cache.
    """

    def __init__(self, folder: str | Path | None):
        self.path = Path(folder) / CACHE_FILE if folder is not None else None
        self._entries: dict | None = None
        self._dirty = False

    def _load(self) -> dict:
        if self._entries is None:
            self._entries = {}
            if self.path is not None and self.path.is_file():
                try:
                    data = json.loads(self.path.read_text())
                    if isinstance(data, dict) and data.get("format") == CACHE_FORMAT:
                        self._entries = {k: v for k, v in data.get("files", {}).items() if isinstance(v, dict)}
                except (OSError, ValueError) as error:
                    logger.debug("ignoring unreadable hash cache %s (%s)", self.path, error)
        return self._entries

    def sha256(self, path: str | Path) -> tuple[str, int]:
        """(sha256 hex, size in bytes) of `path`, from the cache when its real path, size and mtime_ns match.

        Raises:
            OSError: the file cannot be read (FileNotFoundError names it).
        """
        real = os.path.realpath(path)
        stat = os.stat(real)
        entries = self._load()
        entry = entries.get(real)
        if entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
            return entry["sha256"], stat.st_size
        digest = file_sha256(real)
        if self.path is not None:
            entries.pop(real, None)
            entries[real] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
            self._dirty = True
        return digest, stat.st_size

    def save(self) -> None:
        """Write new entries (merged with the file's current ones) atomically; a failure is logged, not raised."""
        if self.path is None or not self._dirty:
            return

        mine, self._entries = self._entries or {}, None
        merged = {**self._load(), **mine}
        merged = dict(list(merged.items())[-CACHE_ENTRIES:])
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json(self.path, {"format": CACHE_FORMAT, "files": merged}, indent=None)
            self._dirty = False
        except OSError as error:
            logger.warning("could not write the hash cache %s (%s); files will be hashed again", self.path, error)
        self._entries = merged


def model_files(path: str | Path) -> list[Path]:
    """The files that make up a model input: the file itself, or a folder's `MODEL_SUFFIXES` files.

    Args:
        path: a checkpoint file or a model folder (recursive; hidden files and folders skipped).

    Returns:
        Sorted paths (for a folder, in order of their path relative to it).

    Raises:
        FileNotFoundError: `path` does not exist.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"model input {path}: no such file or folder")
    found = []
    for root, folders, files in os.walk(path, followlinks=True):
        folders[:] = sorted(f for f in folders if not f.startswith("."))
        found += [Path(root) / f for f in files if not f.startswith(".") and f.lower().endswith(MODEL_SUFFIXES)]
    return sorted(found, key=lambda p: p.relative_to(path).as_posix())


def input_record(role: str, path: str | Path, cache: HashCache | None = None) -> dict:
    """The record of one model input (a checkpoint file or folder): where it was, and every file's hash.

    Args:
        role: what it was ("base", "base_config", "finetuned", "lora").
        path: the file or folder as loaded (its absolute path is recorded).
        cache: a `HashCache` (None: hash every file now).

    Returns:
        {"role", "path": absolute path, "kind": "file" | "folder", "files": [{"name": path relative to
        `path` (a file: its own name), "size": bytes, "sha256": hex}]}.

    Raises:
        FileNotFoundError / OSError: `path` or one of its files cannot be read.
    """
    path = Path(path).absolute()
    cache = cache or HashCache(None)
    files = []
    for file in model_files(path):
        digest, size = cache.sha256(file)
        name = file.name if file == path else file.relative_to(path).as_posix()
        files.append({"name": name, "size": size, "sha256": digest})
    return {"role": role, "path": str(path), "kind": "file" if path.is_file() else "folder", "files": files}


def pixels_sha256(image) -> str:
    """sha256 of a uint8 (H, W, C) array's shape and bytes: identifies decoded pixels, whatever the file format."""
    array = np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
    digest = hashlib.sha256(repr(array.shape).encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def train_record(images, paths, folder: str | Path | None, cache: HashCache | None = None) -> dict:
    """The record of the training images as read (`finextract.images.read_images`), before any resize.

    Args:
        images: the uint8 (H, W, 3) arrays. paths: the file each came from (or a name).
        folder: the folder they were read from, or None when they were passed as arrays.
        cache: a `HashCache` for the files.

    Returns:
        {"role": "train", "path": absolute folder or None, "kind": "images", "files": [{"name", "size",
        "sha256" (of the file; both None when it is no file), "pixels_sha256" (`pixels_sha256`)}]}.
    """
    cache = cache or HashCache(None)
    files = []
    for image, path in zip(images, paths):
        path = Path(path)
        digest, size = cache.sha256(path) if folder is not None and path.is_file() else (None, None)
        files.append({"name": path.name, "size": size, "sha256": digest, "pixels_sha256": pixels_sha256(image)})
    return {
        "role": "train",
        "path": None if folder is None else str(Path(folder).absolute()),
        "kind": "images",
        "files": files,
    }


# --- environment ---


def default_locks() -> list[Path]:
    """The lock files at the root of the checkout finextract runs from (`LOCK_FILES`; none outside one)."""
    root = Path(__file__).resolve().parent.parent
    return [root / name for name in LOCK_FILES if (root / name).is_file()]


def machine_record() -> dict:
    """The machine kind: OS, architecture, CPU model and, when torch is loaded with CUDA, the GPUs."""
    record = {"system": platform.system(), "arch": platform.machine(), "cpu": platform.processor() or None}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                record["cpu"] = line.split(":", 1)[1].strip()
                break
    torch = sys.modules.get("torch")  # never imported here just for this
    if torch is not None and torch.cuda.is_available():
        record["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return record


def environment_record(locks: list[str | Path] | None = None) -> dict:
    """Python, the machine and the installed versions.

    Args:
        locks: pip lock files (`finextract.records.locked_versions` reads them); None = `default_locks()`.

    Returns:
        {"python": version, "implementation", "machine": `machine_record()`, and either
        "distributions": {name: version} (every installed one, when no lock file exists) or "lock":
        {"files": [{"path", "sha256"}], "differs": `finextract.records.version_differences`}: the
        versions are then the locks', except those listed in "differs" (changed, missing, or installed
        but not locked).
    """
    record = {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "machine": machine_record(),
    }
    installed = installed_versions()
    locks = [Path(p) for p in (default_locks() if locks is None else locks) if Path(p).is_file()]
    if not locks:
        record["distributions"] = installed
        return record
    record["lock"] = {
        "files": [{"path": str(p), "sha256": file_sha256(p)} for p in locks],
        "differs": version_differences(locked_versions(*locks), installed),
    }
    return record


def recorded_versions(environment: dict) -> dict:
    """The {name: version} list an `environment_record` stands for (with a lock: as far as the record knows
    it, i.e. only the versions that differ from the lock; the lock's own lines are not stored)."""
    if "distributions" in environment:
        return dict(environment["distributions"])
    return {name: d["installed"] for name, d in environment.get("lock", {}).get("differs", {}).items()}


# --- the command ---

_COMMAND_LINE: contextvars.ContextVar[list | None] = contextvars.ContextVar("finextract_command_line", default=None)


@contextlib.contextmanager
def command_line(argv: list[str]):
    """Within the block, records name `argv` as the command that ran (the CLI's `main` sets it)."""
    token = _COMMAND_LINE.set([str(a) for a in argv])
    try:
        yield
    finally:
        _COMMAND_LINE.reset(token)


def jsonable(value, *, depth: int = 0):
    """A JSON-ready description of an argument: plain values as they are, paths as strings, arrays and
    tensors as "<ndarray uint8 (32, 32, 3)>", other objects as "<Type>" (or their `spec`/path)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike) and not hasattr(value, "parts"):  # e.g. a LoadedBase: its spec
        return str(value)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"<{type(value).__name__} {value.dtype} {tuple(value.shape)}>"
    if depth < 3 and isinstance(value, dict):
        return {str(k): jsonable(v, depth=depth + 1) for k, v in value.items()}
    if depth < 3 and isinstance(value, (list, tuple, range)):
        items = [jsonable(v, depth=depth + 1) for v in list(value)[:64]]
        return items + ([f"... {len(value) - 64} more"] if len(value) > 64 else [])
    return f"<{type(value).__name__}>"


def command_record(call: dict | None = None) -> dict:
    """The command behind a record.

    Args:
        call: the API call, {"function": dotted name, "arguments": `jsonable` arguments} (and more
            such calls under "then"), or None.

    Returns:
        {"argv": the CLI's arguments when `command_line` is active, else sys.argv; "source": "cli" |
        "process"; "call": `call` when given}.
    """
    argv = _COMMAND_LINE.get()
    record = {"argv": argv if argv is not None else list(sys.argv), "source": "cli" if argv is not None else "process"}
    if call is not None:
        record["call"] = call
    return record
