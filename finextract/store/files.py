"""Files written whole: JSON records and PNG images, each written atomically (readers never see half a
file), and JSON values compared leaf by leaf. The atomic write itself is `finextract.engine.formats.
atomic_write` (engine writes its TensorRT plans with it too): one implementation."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from finextract.engine.formats import atomic_write


def write_json(path: str | Path, value, *, indent: int = 2, newline: bool = False, default=None) -> Path:
    """Write `value` as JSON to `path` atomically (a temporary file renamed over it).

    Args:
        path: the file; its folder must exist.
        value: anything `json.dumps` takes (with `default` for other objects).
        indent: JSON indentation. newline: end the file with a newline.
        default: `json.dumps`'s fallback for objects JSON does not know (e.g. `str`), or None.

    Returns:
        `path` as a Path.
    """
    return atomic_write(path, json.dumps(value, indent=indent, default=default) + ("\n" if newline else ""))


def load_json(path: str | Path, fix: str):
    """The JSON value in `path`, or None when there is no such file.

    Args:
        path: the file. fix: what the user should do about a broken file (ends the error message).

    Raises:
        ValueError: it exists but is not valid JSON (the message names it, the error and `fix`).
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); {fix}") from None


def read_json(path: str | Path) -> dict:
    """`path` as a dict; {} when it is missing, unreadable, not JSON or not a JSON object (a lenient
    read of a marker file)."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def png_bytes(image) -> bytes:
    """One image encoded as PNG (Pillow, default settings).

    Args:
        image: uint8 (H, W, 3) ndarray or CPU tensor (anything `np.asarray` takes).
    """
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(image, path: str | Path) -> str:
    """Write one uint8 (H, W, 3) image (ndarray or tensor, any device) as a PNG file, atomically; its
    folder is created.

    Returns:
        The sha256 (64 hex digits) of the bytes written, so a record can name the file without reading
        it back.
    """
    array = image.cpu().numpy() if hasattr(image, "cpu") else image
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = png_bytes(array)
    atomic_write(path, data)
    return hashlib.sha256(data).hexdigest()


def differences(old, new, prefix: str = "") -> list[str]:
    """`key.path[i]: old -> new` for every differing leaf of two JSON values (added/removed keys too)."""
    if isinstance(old, dict) and isinstance(new, dict):
        lines = []
        for key in sorted(set(old) | set(new), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                lines.append(f"{path}: (absent) -> {new[key]!r}")
            elif key not in new:
                lines.append(f"{path}: {old[key]!r} -> (absent)")
            else:
                lines += differences(old[key], new[key], path)
        return lines
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [line for i, (a, b) in enumerate(zip(old, new)) for line in differences(a, b, f"{prefix}[{i}]")]
    if old == new:
        return []
    show = lambda value: value if isinstance(value, (int, float, bool)) or value is None else repr(value)  # noqa: E731
    if isinstance(old, str) and isinstance(new, str) and len(old) < 80 and len(new) < 80:
        show = str  # plain words for short strings: "kind: dreambooth -> lora"
    if isinstance(old, list) and isinstance(new, list) and len(old) + len(new) > 16:
        return [f"{prefix}: {len(old)} entries -> {len(new)} entries"]
    return [f"{prefix}: {show(old)} -> {show(new)}"]


def shown(lines: list[str], limit: int = 8) -> list[str]:
    """The first `limit` lines, and "and N more" for the rest (for error messages)."""
    return lines[:limit] + ([f"and {len(lines) - limit} more"] if len(lines) > limit else [])
