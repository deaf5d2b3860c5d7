"""What a checkpoint file really is, and reading it safely.

Checkpoints come from the internet, and a failed download often leaves something that is not
weights under a weights name: an HTML login/error page, a git-lfs pointer, a truncated file. The
first bytes say which, so every file is sniffed before it is parsed, and the error names the file,
what it is and the fix. Pickles (`.ckpt`, `.bin`, `.pt`, `.pth`) can run code when loaded: they are
refused unless the user passes `allow_pickle=True` (CLI `--allow-pickle`), and then read with
torch's restricted unpickler (`torch.load(weights_only=True)`), old checkpoints' training-state
classes (`TRAINING_STATE_CLASSES`) as inert stand-ins.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import tempfile
from pathlib import Path

from safetensors import SafetensorError

logger = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
# safetensors headers are JSON, a few MB at most for the largest models; larger means not safetensors
_MAX_HEADER_BYTES = 100 * 2**20


#: Bytes per read when hashing (4 MiB: large enough that the syscall count is negligible).
HASH_READ_BYTES = 4 << 20


def file_sha256(path: str | Path) -> str:
    """sha256 (64 hex digits) of a file's bytes, read in `HASH_READ_BYTES` blocks into one reused buffer
    (checkpoints can be GBs; `python bench/bench_hash.py` measures it at SD 1.x size).

    Raises:
        FileNotFoundError / IsADirectoryError / PermissionError (OSError): the file cannot be read.
    """
    digest = hashlib.sha256()
    buffer = bytearray(HASH_READ_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


def atomic_write(path: str | Path, data: bytes | bytearray | memoryview | str) -> Path:
    """Write `data` to `path` through a temporary file in the same folder and `os.replace`.

    Readers see the old file or the new one, never a half-written one; a failed write removes its
    temporary file instead of leaving it beside `path`.

    Args:
        path: destination file; its folder must exist.
        data: bytes-like, or str (written as UTF-8).

    Returns:
        `path` as a `Path`.
    """
    path = Path(path)
    if isinstance(data, str):
        data = data.encode()
    handle, temporary = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


class CheckpointFormatError(ValueError):
    """A file is not the weights it claims to be (HTML, git-lfs pointer, truncated, corrupt)."""


class PickleRefusedError(ValueError):
    """A pickle checkpoint was given without `allow_pickle=True`."""


def sniff(path: str | Path) -> str:
    """Say what a file is from its first bytes (and, for safetensors, its header).

    Args:
        path: any file.

    Returns:
        One of "safetensors", "pickle-zip" (`torch.save` since torch 1.6), "pickle" (legacy
        protocol 2-5 stream), "git-lfs" (pointer text), "html", "json", "text" (other UTF-8 text),
        "empty", "unknown".

    Raises:
        FileNotFoundError: `path` does not exist or is a folder.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with path.open("rb") as handle:
        head = handle.read(512)
    if not head:
        return "empty"
    if head.startswith(b"version https://git-lfs"):
        return "git-lfs"
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml", b"<body")):
        return "html"
    if text.startswith((b"{", b"[")):
        return "json"
    if head.startswith(b"PK\x03\x04"):
        return "pickle-zip"
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if 0 < header_len <= _MAX_HEADER_BYTES and head[8:9] == b"{":
            return "safetensors"
    return "text" if _is_text(head) else "unknown"


def _is_text(head: bytes) -> bool:
    """True when `head` (a file's first bytes) is printable UTF-8; a character cut by the read is allowed."""
    try:
        decoded = head.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(head) - 3:  # invalid before the last (possibly cut) character
            return False
        decoded = head[: error.start].decode("utf-8")
    return all(char.isprintable() or char in "\t\n\r" for char in decoded)


def not_weights_message(path: Path, kind: str) -> str:
    size = path.stat().st_size
    if kind == "git-lfs":
        pointer = path.read_text(errors="replace")
        expected = next((line.split()[1] for line in pointer.splitlines() if line.startswith("size ")), "?")
        return (
            f"{path} is a git-lfs pointer ({size} bytes), not weights (the real file is {expected} bytes): "
            "run `git lfs pull` in the clone, or download the file itself"
        )
    if kind == "html":
        return (
            f"{path} is an HTML page ({size} bytes), not weights: the download saved a web page (a login, "
            "error or 'blob' page); download the raw file (e.g. the 'resolve'/'download' link) and check its size"
        )
    if kind == "json":
        return f"{path} is a JSON document ({size} bytes), not weights (an API error or a config file?): download the weights file"
    if kind == "empty":
        return f"{path} is empty (0 bytes): the download failed; download it again"
    if kind == "text":
        first_line = path.read_text(errors="replace").splitlines()[0][:60] if size else ""
        return (
            f"{path} is a text file ({size} bytes, first line {first_line!r}), not weights: the download "
            "saved a message or a list instead of the file; download the weights file itself"
        )
    return (
        f"{path}: unrecognised file format ({size} bytes, first bytes {path.read_bytes()[:16]!r}); expected safetensors"
    )


def read_safetensors_header(path: str | Path) -> tuple[dict[str, dict], dict[str, str]]:
    """Read and validate a safetensors header without loading any tensor.

    Args:
        path: a `.safetensors` file.

    Returns:
        (tensors, metadata): tensor name -> {"dtype": str, "shape": list[int], "data_offsets": [begin, end]},
        and the file's `__metadata__` (str -> str, empty when absent).

    Raises:
        CheckpointFormatError: the file is not safetensors (says what it is), its header is corrupt,
            or it is truncated (the header promises more data than the file holds).
        FileNotFoundError: no such file.
    """
    path = Path(path)
    kind = sniff(path)
    if kind != "safetensors":
        if kind in ("pickle", "pickle-zip"):
            raise CheckpointFormatError(_misnamed_pickle_message(path))
        raise CheckpointFormatError(not_weights_message(path, kind))
    size = path.stat().st_size
    with path.open("rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        raw = handle.read(header_len)
    if len(raw) < header_len:
        raise CheckpointFormatError(
            f"{path} is truncated: its safetensors header needs {header_len} bytes, the file has {size}; download it again"
        )
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointFormatError(f"{path}: corrupt safetensors header ({error}); download it again") from None
    metadata = header.pop("__metadata__", None) or {}
    data_bytes = size - 8 - header_len
    try:
        end = max((int(info["data_offsets"][1]) for info in header.values()), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise CheckpointFormatError(
            f"{path}: corrupt safetensors header (bad tensor entries); download it again"
        ) from None
    if end > data_bytes:
        raise CheckpointFormatError(
            f"{path} is truncated: its header describes {end} bytes of tensor data but the file holds {data_bytes} "
            f"({size} bytes in all); download it again"
        )
    return header, metadata


def _misnamed_pickle_message(path: Path) -> str:
    return (
        f"{path} is a misnamed pickle: a PyTorch pickle (torch.save) under a .safetensors name, which can run code "
        "when loaded; it was refused. Get the real .safetensors file, or rename this one to .ckpt and pass "
        "allow_pickle=True (--allow-pickle) only if you trust its source"
    )


#: Classes of training state (not weights) that old checkpoints pickle beside their tensors, e.g. the
#: original Stable Diffusion `.ckpt` files' `callbacks: {ModelCheckpoint: {...}}`. Unpickled as inert
#: `TrainingState` stand-ins (their state kept as data, none of their code imported or run).
TRAINING_STATE_CLASSES = tuple(
    f"{package}.callbacks.{module}.{name}"
    for package in ("pytorch_lightning", "lightning.pytorch")
    for module, name in (
        ("model_checkpoint", "ModelCheckpoint"),
        ("early_stopping", "EarlyStopping"),
        ("lr_monitor", "LearningRateMonitor"),
    )
)
_GLOBAL_IN_ERROR = re.compile(r"GLOBAL ([\w.]+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class TrainingState:
    """An inert stand-in for a training-state class named in `TRAINING_STATE_CLASSES`.

    Attributes:
        path: the class path the checkpoint names (class attribute of each stand-in).
        state: what the checkpoint stored for the object (`__setstate__`'s argument), as data; absent
            when the checkpoint names only the class (e.g. as a dict key).
    """

    path = ""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs) -> None:
        self.args = args

    def __setstate__(self, state) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.path} (inert stand-in)>"


def _safe_globals() -> list:
    """What `torch.load(weights_only=True)` may build beyond its defaults: the training-state stand-ins,
    and numpy scalars and dtypes (training loops store step counts and scores as numpy scalars)."""
    import numpy as np

    stubs = [(type(path.rsplit(".", 1)[1], (TrainingState,), {"path": path}), path) for path in TRAINING_STATE_CLASSES]
    scalar = np._core.multiarray.scalar
    dtypes = [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]
    return [*stubs, scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype, *dtypes]


def read_pickle(path: str | Path, *, allow_pickle: bool = False):
    """Unpickle a checkpoint with torch's restricted unpickler (`torch.load(weights_only=True)`), which
    builds tensors, storages, plain containers and numpy scalars, and executes nothing else.

    The training-state classes of `TRAINING_STATE_CLASSES` become inert `TrainingState` stand-ins (the
    library need not be installed); any other global (a class or function the pickle names, e.g.
    `posix.system`) is refused by name before anything runs.

    Args:
        path: a pickle file (`.ckpt`, `.bin`, `.pt`, `.pth`; `torch.save`'s zip or legacy format).
        allow_pickle: must be True: pickles are refused otherwise.

    Returns:
        The unpickled object (usually a dict), tensors on the CPU.

    Raises:
        PickleRefusedError: `allow_pickle` is False (a `.safetensors` name is called a misnamed pickle).
        CheckpointFormatError: a global that is not allowed (named), or the file is corrupt.
    """
    import pickle

    import torch  # heavy: torch; formats.py stays torch-free (the run-folder store imports it)

    path = Path(path)
    if not allow_pickle:
        if path.suffix == ".safetensors":
            raise PickleRefusedError(_misnamed_pickle_message(path))
        raise PickleRefusedError(
            f"{path} is a pickle checkpoint, which can run code when loaded: refused. Use a .safetensors "
            "version of it, or pass allow_pickle=True (CLI --allow-pickle) if you trust its source"
        )
    logger.warning("loading pickle %s with torch.load(weights_only=True) (allow_pickle=True)", path)
    try:
        with path.open("rb") as handle, torch.serialization.safe_globals(_safe_globals()):
            # a file object: torch.load dispatches on a `.safetensors` name otherwise
            return torch.load(handle, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        message = _ANSI.sub("", str(error))
        names = sorted(set(_GLOBAL_IN_ERROR.findall(message)))
        if names:
            raise CheckpointFormatError(
                f"{path} names {', '.join(names)}, which is neither weights nor a known training-state class: "
                "refused, nothing was run (torch.load(weights_only=True)). Get a .safetensors version of it, "
                "or convert it in a sandbox"
            ) from None
        raise CheckpointFormatError(
            f"{path}: torch.load(weights_only=True) failed ({message.strip().splitlines()[-1]}); the file is "
            "corrupt or holds more than tensors (convert it to safetensors in a sandbox)"
        ) from None
    except Exception as error:  # torch raises RuntimeError, EOFError... on a corrupt file
        raise CheckpointFormatError(
            f"{path}: torch.load(weights_only=True) failed ({type(error).__name__}: "
            f"{_ANSI.sub('', str(error)).strip()[:300]}); the file is corrupt or truncated: download it again"
        ) from None


def check_weights_file(path: str | Path, what: str) -> str:
    """Sniff a file given as weights before any library parses it; return its kind
    ("safetensors", "pickle" or "pickle-zip").

    Raises:
        CheckpointFormatError: an HTML page, git-lfs pointer, JSON, text, empty or unknown file,
            named as such with `what` ("base", "fine-tuned checkpoint") in front.
        FileNotFoundError: no such file.
    """
    path = Path(path)
    kind = sniff(path)
    if kind not in ("safetensors", "pickle", "pickle-zip"):
        raise CheckpointFormatError(f"{what}: {not_weights_message(path, kind)}")
    if kind == "safetensors":
        read_safetensors_header(path)
    return kind


def load_state_dict(path: str | Path, *, allow_pickle: bool = False) -> dict:
    """Load a single-file state dict (tensors on the CPU), refusing pickles unless allowed.

    Args:
        path: a `.safetensors` file, or a `.ckpt` / `.bin` / `.pt` / `.pth` pickle.
        allow_pickle: read pickles with `torch.load(weights_only=True)` (tensors and plain
            containers only; no arbitrary code). Off by default: pickles are refused.

    Returns:
        dict[str, torch.Tensor]; a checkpoint nesting its weights under "state_dict" is unwrapped.

    Raises:
        PickleRefusedError: a pickle and `allow_pickle` is False.
        CheckpointFormatError: not weights (HTML, git-lfs pointer, JSON, empty), truncated or corrupt.
        FileNotFoundError: no such file.
    """
    import torch

    path = Path(path)
    kind = sniff(path)
    if kind == "safetensors":
        from safetensors.torch import load_file

        read_safetensors_header(path)  # truncation and header checks with a clear message
        try:
            return load_file(str(path), device="cpu")
        except SafetensorError as error:
            raise CheckpointFormatError(f"{path}: corrupt safetensors file ({error}); download it again") from None
    if kind in ("pickle", "pickle-zip"):
        state = read_pickle(path, allow_pickle=allow_pickle)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise CheckpointFormatError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
        return {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}
    raise CheckpointFormatError(not_weights_message(path, kind))


def state_dict_keys(path: str | Path, *, allow_pickle: bool = False) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from a safetensors header when possible (no tensor is loaded).

    Raises the errors of `load_state_dict`.
    """
    path = Path(path)
    if sniff(path) == "safetensors":
        header, _ = read_safetensors_header(path)
        return {key: tuple(info["shape"]) for key, info in header.items()}
    return {key: tuple(value.shape) for key, value in load_state_dict(path, allow_pickle=allow_pickle).items()}
