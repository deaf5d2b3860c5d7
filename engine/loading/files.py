"""Paths and config files of the models to load: hub ids from the local cache, weight files sniffed
before any library reads them, `config.json` and scheduler configs."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..formats import PickleRefusedError, not_weights_message, read_safetensors_header, sniff


def resolve_path(spec: str | Path, what: str) -> Path:
    """A local path, or a hub id ("org/name") resolved from the local Hugging Face cache only."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    text = str(spec)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not text.startswith((".", "/")) and not path.suffix:
        from huggingface_hub import snapshot_download  # optional: huggingface_hub, needed only for hub ids
        from huggingface_hub.constants import HF_HUB_CACHE

        try:
            return Path(snapshot_download(text, local_files_only=True))
        except Exception as error:  # LocalEntryNotFoundError, or a cache entry without a snapshot
            raise FileNotFoundError(
                f"{what} {text!r}: no such local path, and as a hub id: offline: not in the local Hugging Face cache "
                f"({HF_HUB_CACHE}) and nothing is downloaded here ({type(error).__name__}); pass a local folder or file"
            ) from None
    raise FileNotFoundError(f"{what} {text!r}: no such file or folder")


def check_weight_files(folder: Path, allow_pickle: bool) -> bool:
    """Sniff the weight files of a model folder; return whether to load safetensors.

    Raises CheckpointFormatError for an HTML page / git-lfs pointer / truncated file saved as
    weights, PickleRefusedError when only pickles exist and `allow_pickle` is False.
    """
    safetensors = sorted(folder.glob("*.safetensors"))
    for file in safetensors:
        read_safetensors_header(file)
    if safetensors:
        return True
    pickles = sorted(p for p in folder.iterdir() if p.suffix in (".bin", ".ckpt", ".pt", ".pth"))
    if not pickles:
        raise FileNotFoundError(f"{folder}: no weights file (*.safetensors) in this model folder")
    if not allow_pickle:
        raise PickleRefusedError(
            f"{folder} holds only pickle weights ({pickles[0].name}), which can run code when loaded: refused. "
            "Use a safetensors version, or pass allow_pickle=True (CLI --allow-pickle) if you trust its source"
        )
    for file in pickles:
        if sniff(file) not in ("pickle", "pickle-zip"):
            raise ValueError(not_weights_message(file, sniff(file)))
    return False


def read_config(folder: Path) -> dict:
    """A model folder's `config.json`; FileNotFoundError when it has none."""
    file = folder / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected a diffusers/transformers model folder)")
    return json.loads(file.read_text())


def optional_config(folder: Path) -> dict | None:
    return read_config(folder) if (folder / "config.json").is_file() else None


def read_scheduler_config(folder: Path) -> dict:
    file = folder / "scheduler" / "scheduler_config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{folder}: no scheduler/scheduler_config.json (a diffusers pipeline folder has one)")
    return json.loads(file.read_text())
