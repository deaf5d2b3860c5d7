"""The training record: what the trainers' keys say about a fine-tune, each value with its key."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

from .files import FINETUNE_RECORD, MAX_VALUE_CHARS

#: Counts (images, steps, ranks, repeats) above this are not believed.
MAX_COUNT = 10**9
# kohya keys read into the record (everything else ss_* is listed raw)
_KOHYA_SETTINGS = {
    "steps": ("ss_steps", "int"),
    "max_train_steps": ("ss_max_train_steps", "int"),
    "epochs": ("ss_num_epochs", "int"),
    "resolution": ("ss_resolution", "resolution"),
    "learning_rate": ("ss_learning_rate", "float"),
    "unet_lr": ("ss_unet_lr", "float"),
    "text_encoder_lr": ("ss_text_encoder_lr", "float"),
    "batch_size": ("ss_batch_size_per_device", "int"),
    "network_module": ("ss_network_module", "str"),
    "network_dim": ("ss_network_dim", "int"),
    "network_alpha": ("ss_network_alpha", "float"),
    "network_args": ("ss_network_args", "json"),
    "seed": ("ss_seed", "int"),
    "mixed_precision": ("ss_mixed_precision", "str"),
    "optimizer": ("ss_optimizer", "str"),
    "num_train_images_with_repeats": ("ss_num_train_images", "int"),
    "num_reg_images": ("ss_num_reg_images", "int"),
}
_KOHYA_PARENT = {
    "name": "ss_sd_model_name",
    "hash": "ss_sd_model_hash",
    "sha256": "ss_new_sd_model_hash",
    "version": "ss_base_model_version",
    "v2": "ss_v2",
    "vae_name": "ss_vae_name",
}
# kohya keys that are read (dataset) or are the file's own (not the parent's), so not "unknown"
_KOHYA_KNOWN = {"ss_dataset_dirs", "ss_tag_frequency", "sshs_model_hash", "sshs_legacy_hash"}
_FINETUNE_SETTINGS = {"steps": "steps", "learning_rate": "lr", "batch_size": "batch_size", "seed": "seed"}
_FINETUNE_SETTINGS |= {"resolution": "resolution", "network_dim": "rank", "network_alpha": "rank", "method": "method"}
_PEFT_SETTINGS = {
    "network_dim": ("r", "int"),
    "network_alpha": ("lora_alpha", "float"),
    "peft_type": ("peft_type", "str"),
}
_PEFT_SETTINGS |= {"target_modules": ("target_modules", "any"), "use_dora": ("use_dora", "any")}


@dataclass(frozen=True)
class Field:
    """One value of the training record and where it came from.

    Attributes:
        value: the value (int, float, str, list or dict).
        source: the metadata key it was read from, prefixed by its file when it is not the weights
            file's own metadata ("ss_dataset_dirs", "finetune.json:caption", "unet/adapter_config.json:r").
    """

    value: object
    source: str

    def to_dict(self) -> dict:
        return {"value": self.value, "source": self.source}


@dataclass
class TrainingRecord:
    """What the trainer's metadata says about the training, each value a `Field`.

    Attributes:
        producers: which producers' keys were found ("kohya", "modelspec", "peft", "diffusers", "finextract").
        n0: the number of distinct training images, or None when no metadata gives it.
        caption: the best caption candidate, or None.
        caption_candidates: every candidate, best first: {"caption", "source", "why", "kind"}.
        tags: the training captions' tags by frequency, most frequent first: {"tag", "count"}
            (kohya's `ss_tag_frequency`, summed over folders).
        trigger_words: words from kohya folder names ("16_smf girl" -> "smf girl"), each a `Field`.
        dataset: kohya's training folders: {name: {"n_repeats", "img_count"}}.
        parent: the parent model: "name", "hash", "sha256", "version", "architecture", ... -> `Field`.
        settings: training settings: "steps", "resolution" ([w, h]), "learning_rate", "network_dim",
            "network_alpha", ... -> `Field`.
        unknown: keys not read into the record (no producer above defines them, or descriptive ones such
            as `modelspec.title`), raw: source -> value, cut to 200 characters.
        warnings: malformed metadata, in words (the key and what was wrong).
    """

    producers: list[str] = field(default_factory=list)
    n0: Field | None = None
    caption: Field | None = None
    caption_candidates: list[dict] = field(default_factory=list)
    tags: list[dict] = field(default_factory=list)
    trigger_words: list[Field] = field(default_factory=list)
    dataset: Field | None = None
    parent: dict[str, Field] = field(default_factory=dict)
    settings: dict[str, Field] = field(default_factory=dict)
    unknown: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready: each `Field` as {"value", "source"}."""

        def plain(value):
            return value.to_dict() if isinstance(value, Field) else value

        return {
            "producers": list(self.producers),
            "n0": plain(self.n0),
            "caption": plain(self.caption),
            "caption_candidates": list(self.caption_candidates),
            "tags": list(self.tags),
            "trigger_words": [plain(w) for w in self.trigger_words],
            "dataset": plain(self.dataset),
            "parent": {k: plain(v) for k, v in self.parent.items()},
            "settings": {k: plain(v) for k, v in self.settings.items()},
            "unknown": dict(self.unknown),
            "warnings": list(self.warnings),
        }


def trigger_words(folder: str) -> str | None:
    """The trigger words of a kohya DreamBooth folder name "<repeats>_<words>" ("16_smf girl" -> "smf
    girl"); None when the name has no repeats prefix. kohya uses them as the caption of every image
    without a caption file (and as class tokens)."""
    found = re.fullmatch(r"\s*(\d+)_(.+?)\s*", folder)
    return found.group(2) if found else None


class _Reader:
    """Typed access to one source's values, with warnings for what is malformed."""

    def __init__(self, values: dict, prefix: str, warnings: list):
        self.values, self.prefix, self.warnings = values, prefix, warnings

    def source(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def raw(self, key: str):
        value = self.values.get(key)
        if isinstance(value, str) and len(value) > MAX_VALUE_CHARS:
            self.warnings.append(f"{self.source(key)}: {len(value)} characters, more than {MAX_VALUE_CHARS}: ignored")
            return None
        return value

    def get(self, key: str, kind: str):
        """The value of `key` as `kind` ("int", "float", "str", "json", "resolution", "any"), or None."""
        value = self.raw(key)
        if value is None or (isinstance(value, str) and value.strip() in ("", "None", "null")):
            return None
        try:
            return _convert(value, kind)
        except (ValueError, TypeError, OverflowError) as error:
            self.warnings.append(f"{self.source(key)}={_cut(value)!r}: {error}; ignored")
            return None

    def field(self, key: str, kind: str) -> Field | None:
        value = self.get(key, kind)
        return None if value is None else Field(value, self.source(key))


def _convert(value, kind: str):
    if kind == "any":
        return value
    if kind == "str":
        if not isinstance(value, (str, int, float)):
            raise TypeError(f"a {type(value).__name__}, expected text")
        return str(value)
    if kind == "json":
        return json.loads(value) if isinstance(value, str) else value
    if kind == "int":
        number = float(value) if isinstance(value, str) else value
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
            raise ValueError("not a number")
        if number != int(number) or not 0 <= number <= MAX_COUNT:
            raise ValueError(f"not a count in 0..{MAX_COUNT}")
        return int(number)
    if kind == "float":
        number = float(value) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else None
        if number is None or not math.isfinite(number):
            raise ValueError("not a finite number")
        return number
    if kind == "resolution":  # kohya "(512, 512)" / "512,512" / "512"; modelspec "512x512"; ours 32
        numbers = [int(n) for n in re.findall(r"\d+", str(value))]
        if len(numbers) == 1:
            numbers *= 2
        if len(numbers) != 2 or not all(0 < n <= 1 << 16 for n in numbers):
            raise ValueError("not a resolution (width, height)")
        return numbers
    raise ValueError(f"unknown kind {kind!r}")


def _cut(value, limit: int = 200) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def training_record(metadata: dict) -> TrainingRecord:
    """The training record of what `read_metadata` returned (see the module docstring).

    Caption candidates, best first: finextract's `caption`; `modelspec.trigger_phrase`; the tags
    every image of a kohya folder carries (count = the folder's `img_count`), joined by ", " in
    frequency order; each folder's trigger words. `caption` is the first.

    Args:
        metadata: `read_metadata`'s dict ({"sources": {...}, "warnings": [...]}).

    Returns:
        `TrainingRecord`; never raises on malformed values (they become warnings).
    """
    record = TrainingRecord(warnings=list(metadata.get("warnings", [])))
    sources = metadata.get("sources", {})
    for source in sorted(sources, key=lambda s: (s != "", s)):  # the weights file's own metadata first
        values = sources[source]
        prefix = f"{source}:" if source else ""
        reader = _Reader(values, prefix, record.warnings)
        name = source.rsplit("/", 1)[-1]
        if name == FINETUNE_RECORD:
            _read_finetune(reader, record)
            continue
        if name == "adapter_config.json":
            _read_peft(reader, record, "peft")
            continue
        known = set()
        if any(k.startswith(("ss_", "sshs_")) for k in values):
            known |= _read_kohya(reader, record)
        if any(k.startswith("modelspec.") for k in values):
            known |= _read_modelspec(reader, record)
        if "lora_adapter_metadata" in values:
            known.add("lora_adapter_metadata")
            _read_diffusers(reader, record)
        for key, value in values.items():
            if key not in known:
                record.unknown[reader.source(key)] = _cut(value)
    record.caption_candidates = _ranked(record.caption_candidates)
    record.caption = (
        Field(record.caption_candidates[0]["caption"], record.caption_candidates[0]["source"])
        if record.caption_candidates
        else None
    )
    return record


def _add_producer(record: TrainingRecord, name: str) -> None:
    if name not in record.producers:
        record.producers.append(name)


def _set(target: dict, name: str, value: Field | None) -> None:
    if value is not None and name not in target:  # the first source read wins (the weights file's own first)
        target[name] = value


# caption candidates, most exact first: finextract's own caption, the model spec's trigger phrase (exact
# case), the tags every image carries (kohya lower-cases them), a folder's trigger words
_CANDIDATE_ORDER = ("finetune", "trigger phrase", "tags", "trigger words")


def _candidate(record: TrainingRecord, caption, source: str, why: str, kind: str) -> None:
    if isinstance(caption, str) and caption.strip():
        record.caption_candidates.append({"caption": caption, "source": source, "why": why, "kind": kind})


def _ranked(candidates: list[dict]) -> list[dict]:
    """Candidates by `_CANDIDATE_ORDER` (stable), each text once (the best source kept)."""
    ranked, seen = [], set()
    for candidate in sorted(candidates, key=lambda c: _CANDIDATE_ORDER.index(c["kind"])):
        if candidate["caption"] not in seen:
            seen.add(candidate["caption"])
            ranked.append(candidate)
    return ranked


def _read_kohya(reader: _Reader, record: TrainingRecord) -> set:
    _add_producer(record, "kohya")
    for name, (key, kind) in _KOHYA_SETTINGS.items():
        _set(record.settings, name, reader.field(key, kind))
    for name, key in _KOHYA_PARENT.items():
        _set(record.parent, name, reader.field(key, "str"))
    dirs = reader.get("ss_dataset_dirs", "json")
    counts: dict[str, int] = {}
    if dirs is not None:
        if not isinstance(dirs, dict):
            record.warnings.append(f"{reader.source('ss_dataset_dirs')}: a {type(dirs).__name__}, expected an object")
        else:
            for folder, info in dirs.items():
                count = info.get("img_count") if isinstance(info, dict) else None
                try:
                    counts[folder] = _convert(count, "int")
                except (ValueError, TypeError) as error:
                    record.warnings.append(
                        f"{reader.source('ss_dataset_dirs')}[{folder!r}].img_count={count!r}: {error}"
                    )
            if counts and record.n0 is None:
                record.n0 = Field(sum(counts.values()), reader.source("ss_dataset_dirs"))
                record.dataset = Field(dirs, reader.source("ss_dataset_dirs"))
    frequency = reader.get("ss_tag_frequency", "json")
    if frequency is not None and not isinstance(frequency, dict):
        record.warnings.append(f"{reader.source('ss_tag_frequency')}: a {type(frequency).__name__}, expected an object")
        frequency = None
    totals: dict[str, int] = {}
    for folder, tags in (frequency or {}).items():
        if not isinstance(tags, dict):
            record.warnings.append(f"{reader.source('ss_tag_frequency')}[{folder!r}]: not an object of tag counts")
            continue
        valid = {str(t): c for t, c in tags.items() if isinstance(c, int) and not isinstance(c, bool) and c > 0}
        for tag, count in valid.items():
            totals[tag] = totals.get(tag, 0) + count
        if folder in counts and counts[folder] > 0:  # the tags every image of the folder carries
            common = [t for t, c in sorted(valid.items(), key=lambda item: -item[1]) if c >= counts[folder]]
            if common:
                source = reader.source("ss_tag_frequency")
                _candidate(record, ", ".join(common), source, f"tags of every image in {folder!r}", "tags")
    record.tags = [{"tag": t, "count": c} for t, c in sorted(totals.items(), key=lambda item: (-item[1], item[0]))]
    for folder in list(counts) or list(frequency or {}):
        words = trigger_words(folder)
        if words:
            source = reader.source("ss_dataset_dirs" if counts else "ss_tag_frequency")
            record.trigger_words.append(Field(words, source))
            _candidate(record, words, source, f"trigger words of the folder {folder!r}", "trigger words")
    return {k for k, _ in _KOHYA_SETTINGS.values()} | set(_KOHYA_PARENT.values()) | _KOHYA_KNOWN


def _read_modelspec(reader: _Reader, record: TrainingRecord) -> set:
    _add_producer(record, "modelspec")
    _set(record.parent, "architecture", reader.field("modelspec.architecture", "str"))
    _set(record.settings, "resolution", reader.field("modelspec.resolution", "resolution"))
    _set(record.settings, "prediction_type", reader.field("modelspec.prediction_type", "str"))
    trigger = reader.field("modelspec.trigger_phrase", "str")
    if trigger is not None:
        _candidate(record, trigger.value, trigger.source, "the model spec's trigger phrase", "trigger phrase")
    read = {"modelspec.architecture", "modelspec.resolution", "modelspec.prediction_type", "modelspec.trigger_phrase"}
    # the spec's descriptive fields (title, author, date, ...) are known, not training facts: listed raw
    return read


def _read_peft(reader: _Reader, record: TrainingRecord, producer: str) -> None:
    _add_producer(record, producer)
    for name, (key, kind) in _PEFT_SETTINGS.items():
        _set(record.settings, name, reader.field(key, kind))
    _set(record.parent, "name", reader.field("base_model_name_or_path", "str"))
    for key in ("rank_pattern", "alpha_pattern", "use_rslora", "lora_dropout", "bias", "init_lora_weights"):
        if reader.values.get(key) not in (None, {}, []):
            _set(record.settings, key, Field(reader.values[key], reader.source(key)))


def _read_diffusers(reader: _Reader, record: TrainingRecord) -> None:
    packed = reader.get("lora_adapter_metadata", "json")
    if packed is None:
        return
    if not isinstance(packed, dict):
        record.warnings.append(
            f"{reader.source('lora_adapter_metadata')}: a {type(packed).__name__}, expected an object"
        )
        return
    # "<component>.<field>" -> one reader per component, its keys named "lora_adapter_metadata[<key>]"
    for component in sorted({k.split(".", 1)[0] for k in packed if "." in k}):
        values = {k.split(".", 1)[1]: v for k, v in packed.items() if k.startswith(component + ".")}
        sub = _Reader(values, f"{reader.prefix}lora_adapter_metadata[{component}.", record.warnings)
        sub.source = lambda key, s=sub: f"{s.prefix}{key}]"  # type: ignore[method-assign]
        _read_peft(sub, record, "diffusers")


def _read_finetune(reader: _Reader, record: TrainingRecord) -> None:
    _add_producer(record, "finextract")
    caption = reader.field("caption", "str")
    if caption is not None:
        _candidate(record, caption.value, caption.source, "the caption finextract finetune trained with", "finetune")
    n0 = reader.field("num_images", "int")
    if n0 is not None:
        record.n0 = n0  # finextract records the distinct images it trained on: preferred
    lora = reader.values.get("method") == "lora"  # a DreamBooth's recorded rank is the unused default
    for name, key in _FINETUNE_SETTINGS.items():
        kind = {"resolution": "resolution", "learning_rate": "float", "network_alpha": "float", "method": "str"}.get(
            name, "int"
        )
        if lora or not name.startswith("network_"):
            _set(record.settings, name, reader.field(key, kind))
    _set(record.parent, "name", reader.field("base_name", "str"))
    _set(record.parent, "sha256", reader.field("base_unet_sha256", "str"))
    _set(record.parent, "hash", reader.field("base_unet_hash", "str"))
    _set(record.parent, "version", reader.field("base_family", "str"))
