"""One run per output folder: what kind of run a folder holds, re-runs checked, outputs replaced whole.

Every command that writes an output folder (`--out`, `out=`) calls `prepare` before any heavy work
(once: the `RunFolder` it returns is passed on, and not checked again):

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
from dataclasses import dataclass
from pathlib import Path

from . import chunks
from .files import differences, load_json, read_json, shown, write_json

logger = logging.getLogger(__name__)

#: The record of an `extract` / `cluster` run.
RECORD = "result.json"
#: Written from the record, removed with it.
REPORT = "report.html"
#: The record file that marks a folder as the output of each other command.
MARKERS = {
    "generate": chunks.MANIFEST,
    "sweep": "sweep.json",
    "audit": "summary.json",
    "demo": "demo.json",
    "finetune": "finetune.json",
}
#: The `format` those markers with a common name must hold to count (a user's own manifest.json does not).
FORMATS = {"generate": chunks.FORMAT.rpartition("/")[0] + "/", "audit": "finextract-audit/"}
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
    record = load_json(Path(folder) / RECORD, "move the folder away or choose another output folder (--out, out=)")
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
            if fmt is None or str(read_json(folder / marker).get("format", "")).startswith(fmt):
                return command, marker
    return None


def run_entry(command: str, settings: dict | None) -> dict:
    """The `run_folder` entry of result.json: {"command", "settings"} (settings as JSON reads them back)."""
    return {"command": command, "settings": json.loads(json.dumps(settings, default=str))}


@dataclass(frozen=True)
class RunFolder:
    """An output folder `prepare` checked for one run. Pass it on as `out=` (it is an `os.PathLike`) and
    `prepare` does not check it again: the CLI checks `--out` before loading any model, and the
    extraction it then runs (`Extractor.extract`, `generate`) skips its own check.

    Attributes:
        path: the folder (need not exist yet).
        command: the command it was checked for ("extract", "generate", ...).
        settings: the run's settings as checked (as JSON reads them back), or None (only the kind).
        overwrite: whether a run there with other settings may be replaced.
    """

    path: Path
    command: str
    settings: dict | None = None
    overwrite: bool = False

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def part(self, name: str, command: str) -> RunFolder:
        """Subfolder `name` of this run, written by `command` as part of it (an extraction's generation/
        by `generate`): checked with this folder, and replaced (`overwrite`) with it."""
        return RunFolder(self.path / name, command, None, self.overwrite)


def prepare(
    out: str | Path | RunFolder, command: str, settings: dict | None = None, *, overwrite: bool = False
) -> RunFolder:
    """Check, before any heavy work, that `command` may write its run into `out`; changes nothing.

    Args:
        out: the output folder (need not exist); a `RunFolder` already prepared for this command and
            this `overwrite` is not checked again: returned as it is for its own settings (or
            settings=None), else only the settings are compared (e.g. `cluster` checks --out before
            reading the images that define its settings).
        command: the writing command: "extract", "cluster", "generate", "sweep", "audit", "demo" or
            "finetune".
        settings: what defines the run (JSON-ready dict, recorded as `run_folder` by `run_entry`): an
            existing run in `out` whose record names other settings is refused unless `overwrite` (a
            record without them, from an older finextract, is replaced). None: only the kind is
            checked (generate compares its manifest itself).
        overwrite: allow replacing a run of the same kind with other settings (`--overwrite`).

    Returns:
        The checked `RunFolder` (`.path`: `out` as a Path).

    Raises:
        ValueError: `out` is not a writable folder (`check_out_folder`); it holds another command's
            output; it holds a run of `command` with other settings and `overwrite` is False; for a
            command that replaces its whole folder (finetune), it holds files of no finextract run.
            The message names the folder, what differs and the fix (`--overwrite`, or another `--out`).
    """
    wanted = None if settings is None else run_entry(command, settings)["settings"]
    checked = isinstance(out, RunFolder) and (out.command, out.overwrite) == (command, overwrite)
    if checked and (wanted is None or wanted == out.settings):
        return out
    if checked and overwrite:  # replaces a run with any settings: nothing left to check
        return RunFolder(out.path, command, wanted, overwrite)
    path = out.path if checked else check_out_folder(out)
    _check_run(path, command, wanted, overwrite)
    return RunFolder(path, command, wanted, overwrite)


def _check_run(out: Path, command: str, settings: dict | None, overwrite: bool) -> None:
    """`prepare`'s checks of what an existing folder holds (`settings` as JSON reads them back)."""
    if not out.is_dir():
        return
    found = folder_kind(out)
    if found is None:
        if command in WHOLE and any(out.iterdir()):
            raise ValueError(
                f"output folder {out} (--out, out=) is not empty and holds no `finextract {command}` output; "
                f"`{command}` replaces its whole folder: choose a new or empty one"
            )
        return
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
        else:
            logger.info("%s: this run replaces the %s run there when it finishes (--overwrite)", out, kind)
        return
    if kind != command:
        listed = f"`finextract {kind}` -> `finextract {command}`"
    else:
        old = read_json(out / marker).get("run_folder")
        if settings is None or not isinstance(old, dict):
            return
        changed = differences(old.get("settings"), settings)
        listed = "; ".join(shown(changed))
        if not listed:
            return
        if command == "extract" and all(line.startswith(("n0:", "num_images:")) for line in changed):
            # N0 alone: the images generated already can be clustered again in seconds
            listed += f"; to pick another N0 from its images: finextract cluster --images {out} --n0 K --out NEW"
    raise ValueError(
        f"output folder {out} (--out, out=) holds another run (there -> now: {listed}); rerun with its settings, "
        "pass --overwrite (overwrite=True) to replace it, or choose another output folder"
    )


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
    return write_json(Path(out) / RECORD, record)


def extracted_present(run: str | Path) -> set[str]:
    """The image files a run folder's `extracted/` holds, as the record names them ("extracted/<file>"),
    staging and other hidden files left out: what `recorded_extracted` and `finextract verify` hold
    against the record's `extracted_files`."""
    folder = Path(run) / "extracted"
    return {f"extracted/{p.name}" for p in folder.glob("*") if p.is_file() and not p.name.startswith(".")}


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
    present = {run / name for name in extracted_present(run)}
    extra = sorted(p.name for p in present - set(named))
    missing = sorted(p.name for p in set(named) - present)
    if extra or missing:
        parts = ([f"{len(extra)} not in its record: {', '.join(shown(extra))}"] if extra else []) + (
            [f"{len(missing)} recorded but missing: {', '.join(shown(missing))}"] if missing else []
        )
        raise ValueError(
            f"{run / 'extracted'} disagrees with {run / RECORD} ({'; '.join(parts)}): the folder mixes runs or was "
            f"edited. Rerun the extraction into a new output folder (or with --overwrite), or remove the extra "
            f"files; to score a folder of images as it is, copy them to a folder without {RECORD}"
        )
    return named
