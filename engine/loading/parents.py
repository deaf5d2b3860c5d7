"""Which of several candidate bases a fine-tune or adapter was trained from (its parent).

FineXtract guides from the exact parent model, and community fine-tunes are trained on derivatives
(anime SD 1.x bases, Pony / Illustrious for SDXL), so an auditor may hold a folder of candidates.
`rank_bases` orders them, from headers and streamed tensors only (no model is built):

1. compatibility: the candidate's family and denoiser shapes fit the fine-tune (`families.check_family`
   on an adapter's evidence; for a full fine-tune, its family (`Family.compatible`) and the denoiser's
   tensor names and shapes: the UNet, or the flow families' transformer);
2. the trainer's record: the parent's hashes (`ss_new_sd_model_hash`, `ss_sd_model_hash`, as kohya
   sd-scripts computes them: `trainer_hashes`; of a single-file candidate, or of a folder candidate's
   denoiser weights file, which `finextract finetune` hashes) or its file name (`ss_sd_model_name`);
3. for a full fine-tune, the relative L2 distance of the denoiser weights (a fine-tune stays nearest the
   weights it started from): ||theta' - theta|| / ||theta|| over the tensors both share (by name; an
   SD3 or FLUX.1 single file facing a folder of the other side is first converted to diffusers' names by
   the converter the model pair loads it with, against that folder's transformer config).

Metadata is data: its values are compared as strings, never opened as paths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from ..families import Family, FamilyMismatchError, adapter_evidence, check_family, checkpoint_evidence
from ..formats import load_state_dict, read_safetensors_header, sniff
from ..metadata import kohya_model_hashes
from .files import read_config
from .flux_file import convert_flux_transformer, is_flux_transformer_file
from .folders import folder_family
from .single_file import LDM_UNET_PREFIX, convert_sd3_transformer

_DENOISER_PREFIXES = ("unet.", "transformer.", "model.diffusion_model.")
_DENOISER_FOLDERS = ("unet", "transformer")  # `Family.denoiser` of each family


def trainer_hashes(path: str | Path) -> dict[str, str]:
    """The parent-model hashes trainers record, computed for a candidate base file: `kohya_model_hashes`,
    or {} for a folder (kohya records "IsADirectory")."""
    path = Path(path)
    return kohya_model_hashes(path) if path.is_file() else {}


def is_bases_folder(path: str | Path) -> bool:
    """True for a folder that is not a model itself but holds candidate bases (`candidate_bases`)."""
    from ..lora_formats import detect_lora_format

    path = Path(path)
    if not path.is_dir() or any(
        (path / name).exists() for name in ("model_index.json", *_DENOISER_FOLDERS, "config.json")
    ):
        return False  # a pipeline, a denoiser folder
    return not detect_lora_format(path) and bool(candidate_bases(path))


def candidate_bases(folder: str | Path) -> list[Path]:
    """The candidate bases in a folder, sorted by name: pipeline folders (with `model_index.json`) and
    weight files (`.safetensors`, `.ckpt`)."""
    folder = Path(folder)
    return sorted(
        entry
        for entry in folder.iterdir()
        if (entry.is_dir() and (entry / "model_index.json").is_file())
        or (entry.is_file() and entry.suffix in (".safetensors", ".ckpt"))
    )


@dataclass
class BaseCandidate:
    """One candidate base, as `rank_bases` judged it.

    Attributes:
        path: the candidate (a pipeline folder or a single file).
        compatible: its family and shapes fit the fine-tune; False with `notes` saying why.
        match: what of the fine-tune's metadata names it: the metadata key ("ss_new_sd_model_hash",
            "ss_sd_model_hash", "ss_sd_model_name"), or None.
        distance: relative L2 distance of the denoiser weights (full fine-tunes; >= 0, 0 = identical), or
            None when not measured (an adapter, a pickle, different tensor layouts).
        notes: why it is incompatible or unmeasured.
        denoiser: what `distance` measured: "UNet", or "transformer" (the flow families').
    """

    path: Path
    compatible: bool = True
    match: str | None = None
    distance: float | None = None
    notes: list[str] = field(default_factory=list)
    denoiser: str = "UNet"

    def to_dict(self) -> dict:
        return {**self.__dict__, "path": str(self.path)}

    @classmethod
    def from_dict(cls, record: dict) -> BaseCandidate:
        """The candidate a `to_dict()` record describes (e.g. an audit manifest row's `base_ranking`)."""
        return cls(**{**record, "path": Path(record["path"]), "notes": list(record.get("notes", []))})

    def reason(self) -> str:
        """Why this candidate ranks where it does, in words (said of the one `choose_base` chose)."""
        if self.match:
            return f"its trainer metadata {self.match} names it"
        if self.distance is not None:
            return f"nearest {self.denoiser} weights, relative L2 distance {self.distance:.4g}"
        return "the only compatible one"


_MATCH_ORDER = ("ss_new_sd_model_hash", "ss_sd_model_hash", "ss_sd_model_name", None)


def _sort_key(candidate: BaseCandidate) -> tuple:
    distance = candidate.distance if candidate.distance is not None else math.inf
    return (not candidate.compatible, _MATCH_ORDER.index(candidate.match), distance, str(candidate.path))


def rank_bases(
    finetuned: str | Path, bases: str | Path | list, *, metadata: dict | None = None, adapter: bool | None = None
) -> list[BaseCandidate]:
    """Rank candidate bases for a fine-tune, the likeliest parent first.

    Order: compatible before incompatible; then a metadata hash match, a name match, no match; then
    the denoiser weight distance (smallest first; unmeasured last); then the path.

    Args:
        finetuned: the fine-tune (a pipeline, `unet/` or `transformer/` folder, a denoiser or
            original-layout single file, or an adapter file / folder).
        bases: a folder of candidates (`candidate_bases`) or a list of candidate paths.
        metadata: the fine-tune's trainer metadata (str -> str, e.g. kohya's `ss_*` keys); None reads
            the safetensors metadata of the file, or of the folder's weights files
            (`engine.metadata.header_keys`).
        adapter: whether `finetuned` is an adapter; None detects it (`detect.detect_finetuned_format`).

    Returns:
        list[BaseCandidate], best first.

    Raises:
        FileNotFoundError: no candidate in `bases`.
        ValueError / CheckpointFormatError: `finetuned` is not a recognised fine-tune.
    """
    from .detect import detect_finetuned_format

    finetuned = Path(finetuned)
    paths = candidate_bases(bases) if isinstance(bases, (str, Path)) else [Path(p) for p in bases]
    if not paths:
        raise FileNotFoundError(f"{bases}: no candidate base (pipeline folders, .safetensors or .ckpt files) in it")
    if adapter is None:
        adapter = detect_finetuned_format(finetuned).startswith("lora_")
    if metadata is None:
        from ..metadata import header_keys, read_metadata

        metadata = header_keys(read_metadata(finetuned))
    metadata = {key: str(value) for key, value in (metadata or {}).items()}
    if adapter:
        from .checks import adapter_headers

        evidence = adapter_evidence(*adapter_headers(finetuned))
    else:
        ft_family, _, ft_tensors = _description(finetuned, [], "the fine-tune")
        converted = {}  # single files converted by `_same_layout`, per (file, folder's transformer config)
    ranked = []
    for path in paths:
        candidate = BaseCandidate(path)
        family, width, base_tensors = _description(path, candidate.notes, "candidate base")
        if family is not None and family.flow_matching:
            candidate.denoiser = "transformer"
        if adapter:
            if family is not None:
                try:
                    check_family(family, width, evidence, "the adapter", "", relation="is for")
                except FamilyMismatchError as error:
                    candidate.compatible = False
                    candidate.notes.append(str(error).rstrip(": "))
        elif family and ft_family and not family.compatible(ft_family):
            candidate.compatible = False
            candidate.notes.append(f"the fine-tune is {ft_family.label}; the base is {family.label}")
        elif ft_tensors and base_tensors:
            try:
                pair = _same_layout(finetuned, ft_tensors, path, base_tensors, family, converted)
            except ValueError as error:  # the converter refuses another architecture
                candidate.compatible = False
                candidate.notes.append(str(error))
            else:
                _compare_denoisers(*pair, candidate)
        candidate.match = _metadata_match(path, metadata)
        ranked.append(candidate)
    return sorted(ranked, key=_sort_key)


def _metadata_match(path: Path, metadata: dict) -> str | None:
    """The metadata key that names `path`: a hash (of the file, or of a folder's denoiser weights file), else
    the file or folder name."""
    if not metadata:
        return None
    wanted = {key: metadata[key].strip().lower() for key in _MATCH_ORDER[:2] if metadata.get(key)}
    for file in _hashed_files(path) if wanted else ():
        hashes = trainer_hashes(file)
        for key, value in wanted.items():
            # stable-diffusion-webui / Civitai quote sha256 prefixes ("AutoV2": 10 digits)
            if value == hashes[key] or (
                key == "ss_new_sd_model_hash" and len(value) >= 10 and hashes[key].startswith(value)
            ):
                return key
    name = metadata.get("ss_sd_model_name", "").strip()
    if name:
        name = name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]  # a string: never opened
        stem = name.rsplit(".", 1)[0] if name.lower().endswith((".safetensors", ".ckpt")) else name
        if stem and stem.lower() in (path.name.lower(), path.stem.lower()):
            return "ss_sd_model_name"
    return None


def _hashed_files(path: Path) -> list[Path]:
    """The files whose hashes a trainer may have recorded for a candidate: the file itself; a folder's
    denoiser weights file (`unet/` or `transformer/diffusion_pytorch_model.safetensors`, what `finextract
    finetune` hashes)."""
    if path.is_file():
        return [path]
    files = [path / name / "diffusion_pytorch_model.safetensors" for name in _DENOISER_FOLDERS]
    return [file for file in files if file.is_file()]


def _description(path: Path, notes: list, what: str) -> tuple[Family | None, int | None, dict]:
    """(family, cross-attention width, denoiser tensors `denoiser_tensors`) of a model; unknowns as None / {}."""
    try:
        if path.is_dir():
            family, _ = folder_family(path, f"{what} {path}")
            folder = path / family.denoiser if (path / family.denoiser).is_dir() else path
            return family, read_config(folder).get("cross_attention_dim"), denoiser_tensors(path)
        shapes = {key: tuple(info["shape"]) for key, info in read_safetensors_header(path)[0].items()}
        evidence = checkpoint_evidence(shapes)
        return evidence.family, evidence.cross_attention_dim, denoiser_tensors(path)
    except (OSError, ValueError) as error:  # a pickle (its header needs unpickling), an unknown family...
        notes.append(f"not read: {error}")
        return None, None, {}


def denoiser_tensors(path: str | Path) -> dict[str, tuple[Path, str, tuple]]:
    """The denoiser tensors of a model (the UNet, or the flow families' transformer), from safetensors
    headers: name without its `unet.` / `transformer.` / `model.diffusion_model.` prefix -> (file, key in
    the file, shape).

    A folder's `unet/` or `transformer/` safetensors (the library's file name preferred over variants such
    as `.fp16`), or the folder's own for a bare denoiser folder; a single file's denoiser keys (all keys of a
    diffusers state dict or of BFL's bare FLUX.1 transformer file). Names are as stored: a single file in
    the original layout shares none with a diffusers folder. Empty for pickles and folders without
    safetensors denoiser weights.
    """
    path = Path(path)
    if path.is_dir():
        folder = next((path / name for name in _DENOISER_FOLDERS if (path / name).is_dir()), path)
        files = sorted(folder.glob("*.safetensors"))
        files = [f for f in files if f.name == "diffusion_pytorch_model.safetensors"] or files
    else:
        files = [path] if sniff(path) == "safetensors" else []
    tensors = {}
    for file in files:
        header = read_safetensors_header(file)[0]
        prefixed = any(key.startswith(_DENOISER_PREFIXES) for key in header)
        for key, info in header.items():
            prefix = next((p for p in _DENOISER_PREFIXES if key.startswith(p)), "")
            if prefixed and not prefix:
                continue  # a single file's VAE / text encoders
            tensors[key[len(prefix) :]] = (file, key, tuple(info["shape"]))
    return tensors


def _same_layout(finetuned: Path, ft: dict, base: Path, base_tensors: dict, family, cache: dict) -> tuple[dict, dict]:
    """The fine-tune's and the candidate's denoiser tensors under the same names: when an SD3 / FLUX.1
    single file (original layout) faces a folder, the file converted by the pair's loader
    (`convert_sd3_transformer` / `flux_file.convert_flux_transformer`, the folder's transformer config);
    otherwise as read. Raises ValueError when the converter refuses the file."""
    if family is None or not family.flow_matching or finetuned.is_file() == base.is_file():
        return ft, base_tensors
    file, folder = (finetuned, base) if finetuned.is_file() else (base, finetuned)
    keys = [key for _, key, _ in (ft if file == finetuned else base_tensors).values()]
    # BFL's names (bare or under the prefix) or Stability AI's (`model.diffusion_model.joint_blocks...`)
    if not (is_flux_transformer_file(keys) or any(key.startswith(LDM_UNET_PREFIX) for key in keys)):
        return ft, base_tensors  # a diffusers state dict: the folder's names already
    config_folder = folder / "transformer" if (folder / "transformer").is_dir() else folder
    key = (file, (config_folder / "config.json").read_text())
    if key not in cache:
        convert = convert_flux_transformer if family.name == "flux" else convert_sd3_transformer
        state = convert(load_state_dict(file), read_config(config_folder), str(file)).state_dict()
        cache[key] = {name: (state, name, tuple(value.shape)) for name, value in state.items()}
    return (cache[key], base_tensors) if file == finetuned else (ft, cache[key])


def _compare_denoisers(finetuned: dict, base: dict, candidate: BaseCandidate) -> None:
    """Set `candidate.compatible` (names and shapes) and `.distance` (relative L2, streamed per tensor).
    The tensors are `denoiser_tensors` entries, or (a converted state dict, key, shape) entries."""
    import torch
    from safetensors import safe_open

    shared = sorted(set(finetuned) & set(base))
    if not shared:
        candidate.notes.append(
            f"no {candidate.denoiser} tensor name in common (one is in the original layout, the other in diffusers'): distance "
            "not measured"
        )
        return
    mismatched = [name for name in shared if finetuned[name][2] != base[name][2]]
    if mismatched:
        candidate.compatible = False
        candidate.notes.append(f"{len(mismatched)} {candidate.denoiser} tensor shape(s) differ, e.g. {mismatched[0]}")
        return
    difference = reference = 0.0
    handles = {}
    try:
        for name in shared:
            pair = []
            for file, key, _ in (finetuned[name], base[name]):
                if isinstance(file, dict):  # converted in memory (`_same_layout`)
                    pair.append(file[key].float())
                    continue
                if file not in handles:
                    handles[file] = safe_open(str(file), framework="pt", device="cpu")
                pair.append(handles[file].get_tensor(key).float())
            difference += float(torch.sum((pair[0] - pair[1]) ** 2, dtype=torch.float64))
            reference += float(torch.sum(pair[1] ** 2, dtype=torch.float64))
    finally:
        handles.clear()
    candidate.distance = math.sqrt(difference / reference) if reference else math.inf
    if len(shared) < len(finetuned):
        candidate.notes.append(
            f"distance over {len(shared)} of the fine-tune's {len(finetuned)} {candidate.denoiser} tensors"
        )


def choice_sources(folder: str | Path, ranking: list[BaseCandidate]) -> dict:
    """A model pair's `sources` entries for a base chosen among the candidates of `folder` (its first
    of `ranking`): "base_folder", "base_reason" (`BaseCandidate.reason`) and "base_candidates" (the
    ranking as dicts, best first); `Extractor.extract` turns them into result.json's `base_choice`."""
    return {
        "base_folder": str(folder),
        "base_reason": ranking[0].reason(),
        "base_candidates": [candidate.to_dict() for candidate in ranking],
    }


def choose_base(finetuned: str | Path, folder: str | Path, *, adapter: bool | None = None):
    """The parent of `finetuned` among the candidate bases of `folder` (`rank_bases`' first), and the ranking.

    Returns:
        (the chosen base's path, list[BaseCandidate] best first).

    Raises:
        ValueError: no candidate fits, or several fit and nothing tells them apart (`decided_base`).
    """
    ranked = rank_bases(finetuned, folder, adapter=adapter)
    return decided_base(ranked, folder, finetuned), ranked


def decided_base(ranked: list[BaseCandidate], folder, finetuned) -> Path:
    """The first of a `rank_bases` ranking, when it decides.

    Raises:
        ValueError: no candidate fits (naming why each does not), or several fit and nothing tells
            them apart (no metadata names one, no weight distance separates them): naming them and the fix.
    """
    best = ranked[0]
    if not best.compatible:
        reasons = "; ".join(f"{c.path.name}: {' '.join(c.notes)}" for c in ranked)
        raise ValueError(f"none of the {len(ranked)} candidate bases in {folder} fits {finetuned}: {reasons}")
    tied = [c for c in ranked if _sort_key(c)[:3] == _sort_key(best)[:3]]
    if len(tied) > 1:
        raise ValueError(
            f"{len(tied)} candidate bases in {folder} fit {finetuned} equally ({', '.join(c.path.name for c in tied)}): "
            "no trainer metadata names one and no weight distance tells them apart; pass the base it was trained "
            "from as --base"
        )
    return best.path
