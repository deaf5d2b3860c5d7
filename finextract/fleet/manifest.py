"""The audit manifest: one row per checkpoint, read from CSV or JSON and checked before any model loads.

    id,base,lora,caption,n0,train
    style_a,models/sd15,loras/style_a.safetensors,a painting in the style of sks,5,photos/style_a

`base` may be `auto` with `bases`, a folder of candidate bases: the row's base is then chosen when the
manifest is read (`finextract.engine.loading.parents.choose_base`), before any model loads.

A manifest that cannot be parsed at all raises `ManifestError` naming the line. Everything wrong with
one row (a missing field, a file that does not exist, an id used twice) becomes a `RowError` for that
row only: the other rows still run.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from finextract.spec import ExtractionSpec

#: Every column a manifest may have, in the order the summary lists them.
FIELDS = (
    "id",
    "base",
    "bases",
    "finetuned",
    "lora",
    "caption",
    "n0",
    "train",
    "method",
    "w",
    "k",
    "num_images",
    "steps",
    "seed",
    "selection",
    "adaptive",
)
#: Columns every row needs (and one of finetuned / lora). An empty caption means FineXtract Eq. 6.
REQUIRED = ("id", "base", "caption", "n0")
#: The `base` value that chooses the base among the candidates of the row's `bases` folder.
AUTO_BASE = "auto"
#: Names an id may not take: the audit's own files in the output folder.
RESERVED_IDS = ("index.html", "summary.csv", "summary.json")
_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# what the loader accepts as a hub id (resolved from the local Hugging Face cache only)
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


class ManifestError(ValueError):
    """The manifest cannot be read at all (not CSV / JSON, an unknown column, a broken quote); the message
    names the file and the line."""


@dataclass(frozen=True)
class Row:
    """One checkpoint to audit, checked: paths absolute (relative ones are read from the manifest's folder).

    Attributes:
        line: the manifest line the row ends on (CSV) or starts on (JSON).
        id: names the output folder `OUT/<id>/`: letters, digits, ".", "_", "-" (at most 100).
        base: the pretrained model (absolute path, or a hub id in the local Hugging Face cache); with
            `base: auto`, the candidate of `bases` that `choose_base` chose.
        finetuned / lora: the checkpoint (exactly one is set).
        caption: the training caption c; "" means FineXtract Eq. 6 (method "finextract-uncond").
        n0: N0 >= 1. train: folder of the real training images (adds AS / A-ESR), or None.
        method: the guidance rule (`finextract.rules.METHODS`). w, k: guidance scale and correction,
            None = the default preset's w (FineXtract) and the paper's defaults. num_images: N (None = the
            default preset's 20 x N0). steps, seed: None = the audit's.
        selection: which N0 images are extracted (`finextract.clustering.selection.SELECTIONS`; the
            default preset's when the column is empty or absent).
        adaptive: generate in rounds and stop once the N0 extracted images are stable
            (`finextract.adaptive`; `--adaptive`); true / false, yes / no or 1 / 0, empty: false.
        bases: the folder of candidate bases `base: auto` chose from, or None.
        base_ranking: with `bases`, the candidates ranked (`BaseCandidate.to_dict()`, best first): why
            that base.
    """

    line: int
    id: str
    base: str
    finetuned: str | None
    lora: str | None
    caption: str
    n0: int
    train: str | None = None
    method: str = "finextract"
    w: float | None = None
    k: float | None = None
    num_images: int | None = None
    steps: int | None = None
    seed: int | None = None
    selection: str = "size"
    adaptive: bool = False
    bases: str | None = None
    base_ranking: tuple = field(default=(), compare=False, hash=False)

    @property
    def checkpoint(self) -> str:
        return self.finetuned or self.lora

    @property
    def spec(self) -> ExtractionSpec:
        """The row's extraction (`read_manifest` checked it already)."""
        return ExtractionSpec.from_attributes(self)

    def fields(self) -> dict:
        """The manifest fields (no line number): what the row asks for; with `bases`, the ranking that
        chose its base (left out without: the fields of audits made before `base: auto`)."""
        record = asdict(self)
        record.pop("line")
        if self.selection == "size":  # left out: the fields of audits made before the column, which resume
            del record["selection"]
        if not self.adaptive:  # likewise
            del record["adaptive"]
        if self.bases is None:
            del record["bases"], record["base_ranking"]
        else:
            record["base_ranking"] = list(self.base_ranking)
        return record


@dataclass(frozen=True)
class RowError:
    """A manifest row that cannot run: `error` says why and how to fix it."""

    line: int
    id: str | None
    error: str


def read_manifest(path: str | Path) -> list[Row | RowError]:
    """Read and check a CSV or JSON manifest; one entry per row, in manifest order.

    CSV: a header of `FIELDS` names, then one row per line (quoted values may hold commas). JSON: a list
    of objects with those keys. Empty values mean "not given"; the caption column must be present (an
    empty caption selects Eq. 6). Relative paths are read from the manifest's folder.

    Args:
        path: the manifest file (`.csv`, or `.json`; other suffixes are sniffed: `[` starts JSON).

    Returns:
        A `Row` per runnable row and a `RowError` per row that is not (missing or invalid field, a file
        that does not exist, an id used by more than one row: each of those rows).

    Raises:
        FileNotFoundError: no such file.
        ManifestError: not parseable (the message names the line), an unknown CSV column, no rows.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path}: no such file")
    text = path.read_text(encoding="utf-8-sig")
    is_json = path.suffix.lower() == ".json" or (path.suffix.lower() != ".csv" and text.lstrip().startswith("["))
    raw = _read_json(path, text) if is_json else _read_csv(path, text)
    if not raw:
        raise ManifestError(f"manifest {path}: no rows; add one row per checkpoint (columns: {', '.join(FIELDS)})")
    folder = path.resolve().parent
    entries = [_check_row(line, values, folder) for line, values in raw]
    return _mark_duplicates(entries)


def _read_csv(path: Path, text: str) -> list[tuple[int, dict]]:
    reader = csv.reader(text.splitlines(keepends=True), strict=True, skipinitialspace=True)
    rows = []
    try:
        header = next(reader, None)
        if not header or not any(name.strip() for name in header):
            raise ManifestError(
                f"manifest {path}, line 1: no header; the first line names the columns ({', '.join(FIELDS)})"
            )
        header = [name.strip() for name in header]
        unknown = [name for name in header if name not in FIELDS]
        if unknown:
            raise ManifestError(
                f"manifest {path}, line 1: unknown column(s) {', '.join(map(repr, unknown))}; the columns are {', '.join(FIELDS)}"
            )
        repeated = sorted({name for name in header if header.count(name) > 1})
        if repeated:
            raise ManifestError(f"manifest {path}, line 1: column(s) {', '.join(repeated)} appear more than once")
        for values in reader:
            if not any(value.strip() for value in values):
                continue  # a blank line
            if len(values) != len(header):
                rows.append(
                    (
                        reader.line_num,
                        {"__error__": f"{len(values)} values for {len(header)} columns ({', '.join(header)})"},
                    )
                )
                continue
            rows.append((reader.line_num, dict(zip(header, values))))
    except csv.Error as error:
        raise ManifestError(f"manifest {path}, line {reader.line_num}: not valid CSV ({error})") from None
    return rows


def _read_json(path: Path, text: str) -> list[tuple[int, dict]]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ManifestError(f"manifest {path}, line {error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(value, list):
        raise ManifestError(f'manifest {path}, line 1: expected a JSON list of row objects ([{{"id": ..., ...}}, ...])')
    lines = _json_element_lines(text)
    rows = []
    for line, element in zip(lines, value):
        if not isinstance(element, dict):
            rows.append((line, {"__error__": f"a row must be a JSON object, not {type(element).__name__}"}))
        else:
            rows.append((line, element))
    return rows


def _json_element_lines(text: str) -> list[int]:
    """The line each element of a top-level JSON list starts on (the text parsed already)."""
    decoder, lines = json.JSONDecoder(), []
    index = text.index("[") + 1
    while True:
        while text[index] in " \t\r\n,":
            index += 1
        if text[index] == "]":
            return lines
        lines.append(text.count("\n", 0, index) + 1)
        _, index = decoder.raw_decode(text, index)


def _check_row(line: int, values: dict, folder: Path) -> Row | RowError:
    """One raw row (strings from CSV, JSON values) -> a checked Row, or a RowError naming every problem."""
    raw_id = values.get("id")
    row_id = str(raw_id).strip() if raw_id not in (None, "") else None
    if "__error__" in values:
        return RowError(line, row_id, values["__error__"])
    problems = []
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        problems.append(f"unknown field(s) {', '.join(map(repr, unknown))} (the fields are {', '.join(FIELDS)})")
    given = {key: _text(value) for key, value in values.items() if key in FIELDS}
    for name in REQUIRED:
        if name not in values or (given.get(name) is None and name != "caption"):
            problems.append(f"missing field {name!r}")
    if row_id is not None and (not _ID_PATTERN.fullmatch(row_id) or row_id in RESERVED_IDS):
        problems.append(
            f"id {row_id!r} cannot name a folder: use letters, digits, '.', '_' and '-' (at most 100, not "
            f"{', '.join(RESERVED_IDS)})"
        )
    if (given.get("finetuned") is None) == (given.get("lora") is None):
        problems.append("give exactly one of 'finetuned' (a full fine-tune) and 'lora' (an adapter)")
    paths = {}
    auto_base = (given.get("base") or "").lower() == AUTO_BASE
    if auto_base and given.get("bases") is None:
        problems.append("base 'auto' needs 'bases': a folder of candidate bases to choose the parent from")
    if given.get("bases") is not None and not auto_base:
        problems.append(f"bases {given['bases']!r} is read only with base 'auto': set base to 'auto', or drop bases")
    for name in ("base", "bases", "finetuned", "lora", "train"):
        if given.get(name) is not None and not (name == "base" and auto_base):
            paths[name], problem = _path(name, given[name], folder)
            if problem:
                problems.append(problem)
    numbers = {}
    for name, kind in (("n0", int), ("num_images", int), ("steps", int), ("seed", int), ("w", float), ("k", float)):
        if given.get(name) is not None:
            numbers[name], problem = _number(name, values[name], kind)
            if problem:
                problems.append(problem)
    if numbers.get("steps") is not None and numbers["steps"] < 1:
        problems.append(f"steps {numbers['steps']}: must be >= 1")
    adaptive, problem = _flag("adaptive", values.get("adaptive"))
    if problem:
        problems.append(problem)
    caption = given.get("caption") or ""  # empty: no caption, FineXtract Eq. 6
    spec = None
    if "n0" in numbers and not any(p.startswith(("n0 ", "num_images ", "w ", "k ")) for p in problems):
        try:
            spec = ExtractionSpec.resolve(
                caption,
                numbers["n0"],
                num_images=numbers.get("num_images"),
                method=given.get("method"),
                w=numbers.get("w"),
                k=numbers.get("k"),
                train=paths.get("train"),
                selection=given.get("selection") or None,
                adaptive=bool(adaptive),
            )
        except ValueError as error:
            problems.append(str(error))
    ranking = ()
    if auto_base and not problems:
        paths["base"], ranking, problem = _choose_base(paths, given.get("lora") is not None)
        if problem:
            problems.append(problem)
    if problems or spec is None:
        return RowError(line, row_id, "; ".join(problems))
    return Row(
        line=line,
        id=row_id,
        base=paths["base"],
        bases=paths.get("bases"),
        base_ranking=ranking,
        finetuned=paths.get("finetuned"),
        lora=paths.get("lora"),
        caption=caption,
        n0=numbers["n0"],
        train=paths.get("train"),
        method=spec.method,
        w=numbers.get("w"),
        k=numbers.get("k"),
        num_images=numbers.get("num_images"),
        steps=numbers.get("steps"),
        seed=numbers.get("seed"),
        selection=spec.selection,
        adaptive=spec.adaptive,
    )


def _choose_base(paths: dict, adapter: bool) -> tuple[str | None, tuple, str | None]:
    """`base: auto`: (the chosen base, the ranking as dicts, None) or (None, (), the problem)."""
    from finextract.engine.loading.parents import choose_base

    checkpoint = Path(paths.get("finetuned") or paths["lora"])
    if not checkpoint.exists():
        return None, (), f"base 'auto': the checkpoint {checkpoint} is not a local file or folder to rank bases for"
    try:
        chosen, ranked = choose_base(checkpoint, paths["bases"], adapter=adapter)
    except (ValueError, OSError) as error:  # none fits, a tie, no candidate, an unreadable checkpoint
        return None, (), f"base 'auto': {error}"
    return str(chosen), tuple(candidate.to_dict() for candidate in ranked), None


def _text(value) -> str | None:
    """A field's value as stripped text; None for an empty or absent value (JSON null)."""
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _path(name: str, value: str, folder: Path) -> tuple[str, str | None]:
    """(absolute path or hub id, problem or None). A relative path is read from the manifest's folder."""
    path = (folder / Path(value).expanduser()).resolve()
    if path.exists():
        if name in ("train", "bases") and not path.is_dir():
            what = "the real training images" if name == "train" else "candidate bases"
            return str(path), f"{name} {value!r}: not a folder (give the folder of {what})"
        return str(path), None
    if name in ("base", "finetuned", "lora") and _HUB_ID.fullmatch(value) and not value.startswith((".", "/")):
        return value, None  # a hub id: the loader resolves it from the local cache, offline, or says why not
    return str(path), f"{name} {value!r}: no such file or folder ({path}; relative paths are read from {folder})"


def _flag(name: str, value) -> tuple[bool | None, str | None]:
    """(the value as a bool, problem or None): JSON true / false, or the text true / false, yes / no, 1 / 0
    in any case; empty or absent: False."""
    if isinstance(value, bool) or value is None:
        return bool(value), None
    text = str(value).strip().lower()
    if text in ("", "false", "no", "0"):
        return False, None
    if text in ("true", "yes", "1"):
        return True, None
    return None, f"{name} {value!r}: expected true or false"


def _number(name: str, value, kind) -> tuple[int | float | None, str | None]:
    if isinstance(value, bool):
        return None, f"{name} {value!r}: expected a number"
    try:
        number = kind(value) if kind is float else _integer(value)
    except (TypeError, ValueError):
        expected = "an integer" if kind is int else "a number"
        return None, f"{name} {value!r}: expected {expected}"
    if kind is float and not math.isfinite(number):
        return None, f"{name} {value!r}: expected a finite number"
    return number, None


def _integer(value) -> int:
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(value)
        return int(value)
    return int(str(value).strip())


def _mark_duplicates(entries: list[Row | RowError]) -> list[Row | RowError]:
    """Every row whose id another row uses too becomes a RowError naming all their lines."""
    lines_of: dict[str, list[int]] = {}
    for entry in entries:
        if entry.id is not None:
            lines_of.setdefault(entry.id, []).append(entry.line)
    marked = []
    for entry in entries:
        lines = lines_of.get(entry.id, [])
        if len(lines) > 1:
            problem = (
                f"id {entry.id!r} is used by the rows on lines {', '.join(map(str, lines))}: ids name the output "
                "folders OUT/<id>/, make them unique"
            )
            previous = f"{entry.error}; " if isinstance(entry, RowError) else ""
            entry = RowError(entry.line, entry.id, previous + problem)
        marked.append(entry)
    return marked
