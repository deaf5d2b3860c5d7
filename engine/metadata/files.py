"""Reading trainer metadata from files (never executing or following it), and the model hashes trainers write."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..formats import file_sha256

#: A metadata value longer than this is not parsed (a warning): a real `ss_tag_frequency` of thousands
#: of tags is a few hundred kB.
MAX_VALUE_CHARS = 4_000_000
#: finextract's own record of a fine-tune, beside its weights.
FINETUNE_RECORD = "finetune.json"

_JSON_FILES = ("adapter_config.json", FINETUNE_RECORD)
_ADAPTER_FOLDERS = ("", "unet", "text_encoder", "text_encoder_2")


def read_metadata(path: str | Path) -> dict:
    """Every piece of trainer metadata a checkpoint, adapter file or folder carries, unparsed.

    Read: a `.safetensors` file's header metadata (`safetensors.safe_open(...).metadata()`, no tensor
    loaded); in a folder, `finetune.json`, `adapter_config.json` (at the top, in `unet/`,
    `text_encoder/`, `text_encoder_2/`) and the metadata of the adapter or UNet safetensors files
    there; for a `unet/` folder, its parent's `finetune.json` too. A pickle is never opened.

    Args:
        path: a file or folder.

    Returns:
        {"path": str, "sources": {source: {key: value}}, "warnings": [str]}: source "" is the weights
        file's own safetensors metadata (string values), others are file names relative to `path`
        ("finetune.json", "unet/adapter_config.json", "unet/diffusion_pytorch_model.safetensors").
        A file that cannot be read or parsed is left out with a warning.

    Raises:
        FileNotFoundError: `path` does not exist.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    sources: dict[str, dict] = {}
    warnings: list[str] = []
    if path.is_file():
        if path.suffix == ".safetensors":
            _read_header_metadata(path, "", sources, warnings)
        elif path.suffix == ".json":
            _read_json(path, path.name, sources, warnings)
        else:
            warnings.append(f"{path.name}: not a safetensors file; no metadata read (a pickle is never opened)")
        return {"path": str(path), "sources": sources, "warnings": warnings}
    for sub in _ADAPTER_FOLDERS:
        folder = path / sub if sub else path
        for name in _JSON_FILES:
            file = folder / name
            if file.is_file():
                _read_json(file, file.relative_to(path).as_posix(), sources, warnings)
        if folder.is_dir():
            for file in sorted(folder.glob("*.safetensors")):
                _read_header_metadata(file, file.relative_to(path).as_posix(), sources, warnings)
    if path.name == "unet" and (path.parent / FINETUNE_RECORD).is_file():
        _read_json(path.parent / FINETUNE_RECORD, f"../{FINETUNE_RECORD}", sources, warnings)
    return {"path": str(path), "sources": sources, "warnings": warnings}


def header_keys(metadata: dict) -> dict[str, str]:
    """The safetensors header keys of `read_metadata`'s dict merged into one (kohya's `ss_*`,
    `modelspec.*`, ...): the weights file's own first, then the folder's safetensors files by name;
    the first file to give a key wins. JSON files (`finetune.json`, `adapter_config.json`) are left out.

    Returns:
        {key: str value}; empty when no safetensors file carries metadata.
    """
    merged: dict[str, str] = {}
    sources = metadata.get("sources", {})
    for source in sorted(sources, key=lambda s: (s != "", s)):
        if source == "" or source.endswith(".safetensors"):
            for key, value in sources[source].items():
                merged.setdefault(key, str(value))
    return merged


def _read_header_metadata(file: Path, source: str, sources: dict, warnings: list) -> None:
    from safetensors import safe_open  # the format's own reader; opens the header only

    try:
        with safe_open(str(file), framework="numpy") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:  # SafetensorError, OSError: a truncated or foreign file
        warnings.append(f"{file.name}: its safetensors header cannot be read ({error}); no metadata from it")
        return
    metadata = {k: v for k, v in metadata.items() if k != "format"}  # "pt" / "np": the writer, not the training
    if metadata:
        sources[source] = metadata


def _read_json(file: Path, source: str, sources: dict, warnings: list) -> None:
    if file.stat().st_size > MAX_VALUE_CHARS:
        warnings.append(f"{source}: {file.stat().st_size} bytes, more than {MAX_VALUE_CHARS}: not read")
        return
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        warnings.append(f"{source}: not JSON ({error}); not read")
        return
    if not isinstance(value, dict):
        warnings.append(f"{source}: a JSON {type(value).__name__}, not an object; not read")
        return
    sources[source] = value


#: kohya sd-scripts' `model_hash` (the old stable-diffusion-webui hash): sha256 of the bytes at
#: [LEGACY_HASH_OFFSET, LEGACY_HASH_OFFSET + LEGACY_HASH_BYTES) of the file, first 8 hex digits.
LEGACY_HASH_OFFSET = 0x100000
LEGACY_HASH_BYTES = 0x10000


def kohya_model_hashes(file: str | Path) -> dict[str, str]:
    """The parent-model hashes kohya-ss sd-scripts records for a model file (`train_util.model_hash`
    and `calculate_sha256`, the ones stable-diffusion-webui shows).

    Returns:
        {"ss_sd_model_hash": sha256 of the 64 KiB at offset 1 MiB, first 8 hex digits (of what there
        is: a file under 1 MiB hashes no bytes), "ss_new_sd_model_hash": sha256 of the whole file}.

    Raises:
        OSError: the file cannot be read (a folder: kohya records "IsADirectory" for one).
    """
    with open(file, "rb") as handle:
        handle.seek(LEGACY_HASH_OFFSET)
        legacy = hashlib.sha256(handle.read(LEGACY_HASH_BYTES)).hexdigest()[:8]
    return {"ss_sd_model_hash": legacy, "ss_new_sd_model_hash": file_sha256(file)}
