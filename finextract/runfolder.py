"""One run per output folder: what kind of run a folder holds, re-runs checked, outputs replaced whole.

Every command that writes an output folder (`--out`, `out=`) calls `prepare` before any heavy work:

- a folder holding another command's output (`finextract generate`'s manifest.json, an `extract` or
  `cluster` result.json, a sweep / audit / demo / finetune record) is refused: choose another folder;
  `--overwrite` replaces only a run of the same kind (extract and cluster, which write the same
  outputs, count as one);
- a folder holding a run of the same kind with other settings (`settings`, recorded in result.json
  as `run_folder`) is refused unless `overwrite`; the message lists what differs;
- a refusal deletes nothing.

An extract / cluster run then writes its image folders into hidden staging folders beside them and
`commit`s them: the old record (result.json, report.html) is removed, each staged folder replaces its
namesake whole (so a re-run with fewer images leaves none of the old ones) and folders the run does not
write are removed; result.json is then written atomically (`write_record`). At every moment the folder
holds either one complete record or none. A fine-tune replaces its whole folder the same way
(`stage` + `replace_folder`). `recorded_extracted` lets `evaluate` score exactly the images a
record names.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

#: The record of an `extract` / `cluster` run.
RECORD = "result.json"
#: Written from the record, removed with it.
REPORT = "report.html"
#: The record file that marks a folder as the output of each other command.
MARKERS = {
    "generate": "manifest.json",
    "sweep": "sweep.json",
    "audit": "summary.json",
    "demo": "demo.json",
    "finetune": "finetune.json",
}
#: The `format` those markers with a common name must hold to count (a user's own manifest.json does not).
FORMATS = {"generate": "finextract-generate/", "audit": "finextract-audit/"}
#: Commands whose runs are recorded in result.json; each may --overwrite the other's run.
RECORDED = ("extract", "cluster")
#: Commands that replace their whole output folder (`stage` + `replace_folder` on it).
WHOLE = ("finetune",)
_STAGING = ".new-"
_RETIRED = ".old-"


def check_out_folder(out: str | Path) -> Path:
    """Check, before heavy work, that `out` can be written as a folder: it (or its nearest existing
    parent) is a folder this process may write into.

    Returns:
        `out` as a Path.

    Raises:
        ValueError: `out` or one of its parents is an existing file, or that folder is not writable; the
            message names it.
    """
    out = Path(out)
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                where = "" if path == out else f" (its parent {path} is a file)"
                raise ValueError(
                    f"output folder {out} (--out, out=): not a folder{where}; give a folder path (it is created if missing)"
                )
            if not os.access(path, os.W_OK | os.X_OK):
                where = "" if path == out else f" (its nearest existing parent {path})"
                raise ValueError(
                    f"output folder {out} (--out, out=): the folder{where} is not writable; choose another"
                )
            break
    return out


def read_record(folder: str | Path) -> dict | None:
    """`folder/result.json` as a dict, or None when there is none (or it is not a JSON object).

    Raises:
        ValueError: it exists but is not valid JSON (the message names it and the fix).
    """
    path = Path(folder) / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{path} is not valid JSON ({error}); move the folder away or choose another output folder (--out, out=)"
        ) from None
    return record if isinstance(record, dict) else None


def folder_kind(folder: str | Path) -> tuple[str, str] | None:
    """Which command's output `folder` holds, and the file that says so; None for a new or foreign folder.

    result.json names its command (`run_folder.command`); a record written before that field existed
    is a cluster run when its method is "cluster", else an extract run.
    """
    folder = Path(folder)
    record = read_record(folder)
    if record is not None:
        command = (record.get("run_folder") or {}).get("command")
        if command is None:
            command = "cluster" if record.get("method") == "cluster" else "extract"
        return command, RECORD
    for command, marker in MARKERS.items():
        if (folder / marker).is_file():
            fmt = FORMATS.get(command)
            if fmt is None or str(_read_json(folder / marker).get("format", "")).startswith(fmt):
                return command, marker
    return None


def run_entry(command: str, settings: dict | None) -> dict:
    """The `run_folder` entry of result.json: {"command", "settings"} (settings as JSON reads them back)."""
    return {"command": command, "settings": json.loads(json.dumps(settings, default=str))}


def prepare(out: str | Path, command: str, settings: dict | None = None, *, overwrite: bool = False) -> Path:
    """Check, before any heavy work, that `command` may write its run into `out`; changes nothing.

    Args:
        out: the output folder (need not exist).
        command: the writing command: "extract", "cluster", "generate", "sweep", "audit", "demo" or
            "finetune".
        settings: what defines the run (JSON-ready dict, recorded as `run_folder` by `run_entry`): an
            existing run in `out` whose record names other settings is refused unless `overwrite` (a
            record without them, from an older finextract, is replaced). None: only the kind is
            checked (generate compares its manifest itself).
        overwrite: allow replacing a run of the same kind with other settings (`--overwrite`).

    Returns:
        `out` as a Path.

    Raises:
        ValueError: `out` is not a writable folder (`check_out_folder`); it holds another command's
            output; it holds a run of `command` with other settings and `overwrite` is False; for a
            command that replaces its whole folder (finetune), it holds files of no finextract run.
            The message names the folder, what differs and the fix (`--overwrite`, or another `--out`).
    """
    out = check_out_folder(out)
    if not out.is_dir():
        return out
    found = folder_kind(out)
    if found is None:
        if command in WHOLE and any(out.iterdir()):
            raise ValueError(
                f"output folder {out} (--out, out=) is not empty and holds no `finextract {command}` output; "
                f"`{command}` replaces its whole folder: choose a new or empty one"
            )
        return out
    kind, marker = found
    if not (kind == command or (kind in RECORDED and command in RECORDED)):
        raise ValueError(
            f"output folder {out} (--out, out=) holds the output of `finextract {kind}` ({out / marker}); "
            f"a `{command}` run cannot share it (--overwrite replaces only a run of the same kind): choose "
            "another output folder, or remove that one"
        )
    if overwrite:
        if kind != command:
            logger.warning("%s: replacing the %s run there with this %s run (--overwrite)", out, kind, command)
        return out
    if kind != command:
        shown = f"`finextract {kind}` -> `finextract {command}`"
    else:
        old = _read_json(out / marker).get("run_folder")
        if settings is None or not isinstance(old, dict):
            return out
        shown = "; ".join(_shown(differences(old.get("settings"), run_entry(command, settings)["settings"])))
        if not shown:
            return out
    raise ValueError(
        f"output folder {out} (--out, out=) holds another run (there -> now: {shown}); rerun with its settings, "
        "pass --overwrite (overwrite=True) to replace it, or choose another output folder"
    )


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _shown(lines: list[str], limit: int = 8) -> list[str]:
    return lines[:limit] + ([f"and {len(lines) - limit} more"] if len(lines) > limit else [])


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


def stage(final: str | Path) -> Path:
    """An empty hidden folder beside `final` (`.extracted.new-<pid>` for `run/extracted`) to write into,
    then `commit`; leftovers of an interrupted earlier write are removed first."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(final)
    staging = final.parent / f".{final.name}{_STAGING}{os.getpid()}"
    staging.mkdir()
    return staging


def commit(out: str | Path, folders: dict[str, Path | None]) -> None:
    """Replace a run's outputs in `out` by staged ones, leaving no file of the previous run.

    First result.json and report.html go (from here until `write_record`, the folder holds no
    record); then each `folders` entry: name -> a folder from `stage` replaces `out/name` whole (the
    old one renamed aside, the staged one renamed in, the old one deleted), name -> None removes
    `out/name` (an output this run does not write, e.g. generated/ without --save-generated).

    Args:
        out: the run folder.
        folders: subfolder name -> staged folder or None.
    """
    out = Path(out)
    for name in (RECORD, REPORT):
        (out / name).unlink(missing_ok=True)
    for name, staged in folders.items():
        replace_folder(out / name, staged)


def replace_folder(final: str | Path, staged: Path | None) -> None:
    """Put the folder `staged` (from `stage(final)`) in place of `final`, or remove `final` when
    `staged` is None: the old one is renamed aside, the new one renamed in, then the old one deleted."""
    final = Path(final)
    retired = final.parent / f".{final.name}{_RETIRED}{os.getpid()}"
    if final.exists() or final.is_symlink():
        os.replace(final, retired)
    if staged is not None:
        os.replace(staged, final)
    _remove(retired)
    _remove_leftovers(final)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _remove_leftovers(final: Path) -> None:
    """Staging / retired folders of `final` that an interrupted write left behind."""
    for path in final.parent.glob(f".{final.name}.*"):
        if _STAGING in path.name or _RETIRED in path.name:
            _remove(path)


def write_record(out: str | Path, record: dict) -> Path:
    """Write `out/result.json` atomically (a temporary file renamed over it); returns its path."""
    from finextract.engine.formats import atomic_write

    return atomic_write(Path(out) / RECORD, json.dumps(record, indent=2))


def recorded_extracted(folder: str | Path) -> list[Path] | None:
    """The extracted images an extract / cluster run's record names, checked against its extracted/.

    Args:
        folder: a run folder (holding result.json) or its `extracted/` subfolder; anything else is a
            plain folder of images.

    Returns:
        The files of the record's `extracted_files`, in its order (clique rank), or None when
        `folder` is not a run folder (read it as a plain folder).

    Raises:
        ValueError: extracted/ disagrees with the record: an image file the record does not name
            (e.g. left by another run) or a named one missing. The message names the files and the
            fix.
    """
    folder = Path(folder)
    if (folder / RECORD).is_file():
        run = folder
    elif folder.name == "extracted" and (folder.parent / RECORD).is_file():
        run = folder.parent
    else:
        return None
    record = read_record(run)
    if record is None or not isinstance(record.get("extracted_files"), list):
        return None
    named = [run / name for name in record["extracted_files"]]
    present = {path for path in (run / "extracted").glob("*") if path.is_file() and not path.name.startswith(".")}
    extra = sorted(p.name for p in present - set(named))
    missing = sorted(p.name for p in set(named) - present)
    if extra or missing:
        parts = ([f"{len(extra)} not in its record: {', '.join(_shown(extra))}"] if extra else []) + (
            [f"{len(missing)} recorded but missing: {', '.join(_shown(missing))}"] if missing else []
        )
        raise ValueError(
            f"{run / 'extracted'} disagrees with {run / RECORD} ({'; '.join(parts)}): the folder mixes runs or was "
            f"edited. Rerun the extraction into a new output folder (or with --overwrite), or remove the extra "
            f"files; to score a folder of images as it is, copy them to a folder without {RECORD}"
        )
    return named
