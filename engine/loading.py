"""Load a pretrained model and its fine-tune, in any format users download, into a `ModelPair`.

Order of work: resolve both paths, detect the fine-tune's format, compare configs and state-dict
keys/shapes (cheap: JSON files and safetensors headers), and only then load weights. Nothing is
downloaded: hub ids resolve from the local Hugging Face cache only. Pickles are refused unless
`allow_pickle=True` (see `formats`).
"""

from __future__ import annotations

import copy
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from .families import Family, adapter_evidence, check_family, checkpoint_evidence, detect_family
from .formats import PickleRefusedError, file_sha256, read_safetensors_header, sniff, state_dict_keys
from .pair import ModelPair
from .quiet import logged_load

logger = logging.getLogger(__name__)

FINETUNED_FORMATS = (
    "auto",
    "pipeline",
    "unet_folder",
    "unet_file",
    "checkpoint",
    "lora",
    "lora_diffusers",
    "lora_peft",
    "lora_kohya",
    "lora_cloneofsimo",
    "lora_embedding",
)
# UNet config entries that change the architecture (sample_size and the like do not)
_UNET_ARCH_KEYS = (
    "in_channels",
    "out_channels",
    "cross_attention_dim",
    "block_out_channels",
    "layers_per_block",
    "down_block_types",
    "up_block_types",
    "mid_block_type",
    "attention_head_dim",
    "num_attention_heads",
    "transformer_layers_per_block",
    "use_linear_projection",
    "norm_num_groups",
    "addition_embed_type",
    "class_embed_type",
    "time_cond_proj_dim",
)
# vocab_size may differ: a fine-tune may add tokens (its tokenizer is then checked against it)
_TEXT_ARCH_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "projection_dim",
    "project_dim",
)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class PredictionTypeMismatchError(ValueError):
    """Base and fine-tune predict different quantities (epsilon / v / x0), so their outputs cannot be mixed."""


# detected full fine-tune formats in plain words, for "this is not a LoRA" messages
_FULL_FINETUNE_WORDS = {
    "pipeline": "a full fine-tuned (DreamBooth) pipeline folder",
    "unet_folder": "a full fine-tuned (DreamBooth) UNet folder",
    "unet_file": "a full fine-tuned (DreamBooth) UNet state dict",
    "checkpoint": "a full fine-tuned (DreamBooth) single-file Stable Diffusion checkpoint",
}


# --- paths ---


def _resolve_path(spec: str | Path, what: str) -> Path:
    """A local path, or a hub id ("org/name") resolved from the local Hugging Face cache only."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    text = str(spec)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not text.startswith((".", "/")) and not path.suffix:
        from huggingface_hub import snapshot_download
        from huggingface_hub.constants import HF_HUB_CACHE

        try:
            return Path(snapshot_download(text, local_files_only=True))
        except Exception as error:  # LocalEntryNotFoundError, or a cache entry without a snapshot
            raise FileNotFoundError(
                f"{what} {text!r}: no such local path, and as a hub id: offline: not in the local Hugging Face cache "
                f"({HF_HUB_CACHE}) and nothing is downloaded here ({type(error).__name__}); pass a local folder or file"
            ) from None
    raise FileNotFoundError(f"{what} {text!r}: no such file or folder")


def _check_weight_files(folder: Path, allow_pickle: bool) -> bool:
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
            from .formats import _not_weights_message

            raise ValueError(_not_weights_message(file, sniff(file)))
    return False


def _read_config(folder: Path) -> dict:
    file = folder / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected a diffusers/transformers model folder)")
    return json.loads(file.read_text())


# --- compatibility ---


def _norm(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def check_unet_configs(base: dict, finetuned: dict, where: str = "fine-tuned UNet") -> None:
    """Compare the architecture entries of two UNet configs.

    Args:
        base, finetuned: `config.json` contents (diffusers `UNet2DConditionModel`).
        where: how to name the fine-tuned side in the message.

    Raises:
        FamilyMismatchError: the two configs are of different families (names both, with their
            cross-attention widths).
        ValueError: another entry differs; the message names every differing entry.
    """
    base_family, ft_family = detect_family(base, where="the base"), detect_family(finetuned, where=where)
    check_family(
        base_family,
        base.get("cross_attention_dim"),
        _config_evidence(ft_family, finetuned),
        f"the {where}",
        "pass the base model the fine-tune was trained from",
        relation="is",
    )
    problems = []
    for key in _UNET_ARCH_KEYS:
        a, b = _norm(base.get(key)), _norm(finetuned.get(key))
        if a != b:
            problems.append(f"{where} has {key} {b}, base has {a}")
    if problems:
        raise ValueError("incompatible base and fine-tune: " + "; ".join(problems))


def _config_evidence(family: Family, unet_config: dict):
    from .families import Evidence

    return Evidence(family, unet_config.get("cross_attention_dim"), "its configs")


def check_text_configs(base: dict, finetuned: dict, where: str = "fine-tuned text encoder") -> None:
    """Like `check_unet_configs` for CLIP text-encoder configs. `vocab_size` is not compared: a
    fine-tune may add tokens, and `load_model_pair` checks it against the fine-tune's tokenizer."""
    problems = [
        f"{where} has {key} {finetuned.get(key)}, base has {base.get(key)}"
        for key in _TEXT_ARCH_KEYS
        if base.get(key) != finetuned.get(key)
    ]
    if problems:
        raise ValueError("incompatible base and fine-tune: " + "; ".join(problems))


def check_state_dict(expected: dict, found: dict, where: str) -> None:
    """Compare tensor names and shapes (name -> shape tuples).

    Raises:
        ValueError: naming the count and first few missing, unexpected and mis-shaped tensors.
    """
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [
        f"{k} {tuple(found[k])} vs base {tuple(expected[k])}"
        for k in sorted(set(expected) & set(found))
        if tuple(found[k]) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} base tensor(s) missing, e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[:3]}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es), e.g. {shapes[:3]}")
    if problems:
        raise ValueError(f"{where} does not match the base UNet: " + "; ".join(problems))


# --- format detection ---


def detect_finetuned_format(path: Path) -> str:
    """The fine-tune's format from its folder listing or file header (no weights loaded).

    Returns one of "pipeline", "unet_folder", "unet_file", "checkpoint" (a single-file SD
    checkpoint in the original LDM layout), "lora_diffusers", "lora_peft", "lora_kohya".

    Raises:
        ValueError: nothing recognisable, with what was expected.
    """
    from .formats import CheckpointFormatError, _not_weights_message
    from .lora_formats import detect_lora_format

    if path.is_file():  # sniff first: an HTML page or text file under a weights name is named as such
        kind = sniff(path)
        if kind not in ("safetensors", "pickle", "pickle-zip"):
            raise CheckpointFormatError(_not_weights_message(path, kind))
    lora = detect_lora_format(path)
    if lora:
        return f"lora_{lora}"
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return "pipeline"
        if (path / "unet" / "config.json").is_file():
            return "unet_folder"
        if (path / "config.json").is_file() and "UNet" in _read_config(path).get("_class_name", ""):
            return "unet_folder"
        raise ValueError(
            f"{path}: not a recognised fine-tune folder (expected model_index.json, unet/config.json, "
            "adapter_config.json or pytorch_lora_weights.safetensors)"
        )
    keys = state_dict_keys(path) if sniff(path) == "safetensors" else None
    if keys is None:  # a pickle: its format is known only after loading, which allow_pickle governs
        return "unet_file"
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "checkpoint"
    if "conv_in.weight" in keys or "unet.conv_in.weight" in keys:
        return "unet_file"
    raise ValueError(
        f"{path}: a safetensors file of neither a UNet, an SD checkpoint nor a LoRA (e.g. key {next(iter(keys), None)!r})"
    )


# --- loading parts ---


def _load_folder_parts(folder: Path, allow_pickle: bool, parts: tuple[str, ...], family: Family) -> dict:
    """Load the named parts ("unet", "text_encoder", "text_encoder_2", "vae", "tokenizer", "tokenizer_2")
    of a pipeline folder, with the family's classes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    loaded = {}
    for part in parts:
        sub = folder / part
        if part.startswith("tokenizer"):
            loaded[part] = family.tokenizer_class_object().from_pretrained(str(sub))
            continue
        use_safetensors = _check_weight_files(sub, allow_pickle)
        if part.startswith("text_encoder"):
            cls = family.text_encoder_class(family.text_encoders.index(part))
        else:
            cls = {"unet": UNet2DConditionModel, "vae": AutoencoderKL}[part]
        loaded[part] = cls.from_pretrained(str(sub), use_safetensors=use_safetensors).eval()
    return loaded


def _optional_config(folder: Path) -> dict | None:
    return _read_config(folder) if (folder / "config.json").is_file() else None


def folder_family(folder: Path, where: str) -> tuple[Family, dict]:
    """The family of a diffusers folder (a pipeline, or a bare `unet/` with or without text encoders),
    and its `model_index.json` (empty when it has none), from configs only.

    Raises:
        UnknownFamilyError: see `finextract.engine.families.detect_family`.
    """
    index = json.loads((folder / "model_index.json").read_text()) if (folder / "model_index.json").is_file() else {}
    unet_dir = folder / "unet" if (folder / "unet").is_dir() else folder
    family = detect_family(
        _optional_config(unet_dir),
        _optional_config(folder / "text_encoder"),
        text_encoder_2_config=_optional_config(folder / "text_encoder_2"),
        pipeline_class=index.get("_class_name"),
        requires_aesthetics_score=bool(index.get("requires_aesthetics_score")),
        where=where,
    )
    return family, index


def _family_parts(family: Family, *names: str) -> tuple[str, ...]:
    """The pipeline parts to load for a family: `names` with the family's text encoders and tokenizers."""
    parts = []
    for name in names:
        parts += list(
            family.text_encoders if name == "text_encoders" else family.tokenizers if name == "tokenizers" else [name]
        )
    return tuple(parts)


def _to_dtype(dtype):
    from finextract.engine.config import torch_dtype

    return None if dtype is None else torch_dtype(dtype)


def _scheduler_config(folder: Path) -> dict:
    file = folder / "scheduler" / "scheduler_config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{folder}: no scheduler/scheduler_config.json (a diffusers pipeline folder has one)")
    return json.loads(file.read_text())


def _apply_markers(scheduler_config: dict, evidence, path: Path) -> dict:
    """The scheduler config a single-file checkpoint's marker tensors call for (`v_pred`, `ztsnr`)."""
    config = dict(scheduler_config)
    if evidence.prediction_type and config.get("prediction_type", "epsilon") != evidence.prediction_type:
        logger.info(
            "%s carries a v_pred marker: sampling with prediction_type v_prediction (its config said %s)",
            path,
            config.get("prediction_type", "epsilon"),
        )
        config["prediction_type"] = evidence.prediction_type
    if evidence.zero_terminal_snr and not config.get("rescale_betas_zero_snr"):
        logger.info(
            "%s carries a ztsnr marker: rescaled zero-terminal-SNR betas and trailing timesteps (Lin et al.)", path
        )
        config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return config


@dataclass(frozen=True, eq=False)
class LoadedBase:
    """A pretrained model loaded once (`load_base`), to pair with many fine-tunes without reading it again.

    `load_model_pair(loaded_base, finetuned or lora=...)` uses its models as they are: a DreamBooth
    pair shares them (a pair changes no model), and a LoRA pair with UNet adapters gets its own copy
    of the base UNet's module tree holding the same weight tensors (`copy_sharing_weights`: the
    adapters are hooks on that UNet's modules, and a UNet serves one pair; a full `copy.deepcopy` of
    an SD 1.x UNet took 5x longer than loading it again from the page cache). The pair's `sources`
    and fingerprint are the same as when the base is loaded from disk.

    Attributes:
        spec: the base as given (path or hub id); `str()` and `os.fspath()` give its resolved path.
        parts: unet, text_encoder(s), vae, tokenizer(s), scheduler_config, family (as `load_model_pair`
            loads them).
        sources: where the base came from (`base`, `base_format`, ...).
    """

    spec: str
    parts: dict
    sources: dict

    def __fspath__(self) -> str:
        return self.sources["base"]

    def __str__(self) -> str:
        return self.spec


def copy_sharing_weights(module):
    """A copy of `module`'s module tree (its own submodules, hooks and attributes) whose parameters and
    buffers are the very tensors of `module`: no weight is copied, so it costs milliseconds at SD size.

    Hooks added to the copy (a LoRA pair's gated adapters) leave `module` untouched; an in-place change
    to a weight changes both.
    """
    import itertools

    memo = {id(tensor): tensor for tensor in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo)


@logged_load("base")
def load_base(
    base: str | Path,
    *,
    base_config: str | Path | None = None,
    allow_pickle: bool = False,
    device: str = "cpu",
    dtype=None,
) -> LoadedBase:
    """Load a pretrained model once, for `load_model_pair(LoadedBase, ...)` with many fine-tunes.

    Args:
        base, base_config, allow_pickle: as `load_model_pair`.
        device: where the UNet, text encoder and VAE go. dtype: the UNet and text-encoder precision
            (None keeps float32); the VAE keeps float32 (`ModelPair.place` sets the run's VAE precision).

    Returns:
        LoadedBase.

    Raises:
        FileNotFoundError / ValueError / RuntimeError: as `load_model_pair` for its base.
    """
    parts, sources = _load_base(base, base_config, allow_pickle)
    torch_dtype = _to_dtype(dtype)
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        if parts.get(name) is None:  # text_encoder_2: SDXL only
            continue
        parts[name].to(device)
        if name != "vae" and torch_dtype is not None and parts[name].dtype != torch_dtype:
            parts[name].to(dtype=torch_dtype)
    return LoadedBase(spec=str(base), parts=parts, sources=sources)


def _load_base(base, base_config, allow_pickle: bool) -> tuple[dict, dict]:
    """Base parts (unet, text_encoder(s), vae, tokenizer(s), scheduler_config, family,
    force_zeros_for_empty_prompt) and their sources.

    A folder is a diffusers pipeline; a single file (sniffed before any library parses it) an
    original-layout checkpoint converted on `base_config`'s configs, whose family it must share.
    """
    if isinstance(base, LoadedBase):  # loaded already: its models, shared (see LoadedBase)
        return dict(base.parts), dict(base.sources)
    from .formats import check_weights_file
    from .single_file import load_ldm_parts

    path = _resolve_path(base, "base")
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"base {path}: not a diffusers pipeline folder (no model_index.json)")
        family, index = folder_family(path, f"base {path}")
        parts = _load_folder_parts(
            path, allow_pickle, _family_parts(family, "unet", "text_encoders", "vae", "tokenizers"), family
        )
        parts.update(
            scheduler_config=_scheduler_config(path),
            family=family,
            force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt"),
        )
        fmt = "pipeline" if Path(base).expanduser().exists() else "hub-cache"
        return parts, {"base": str(path), "base_format": fmt}
    check_weights_file(path, "base")
    if base_config is None:
        raise ValueError(
            f"base {path} is a single-file checkpoint: pass base_config=<a local diffusers pipeline folder of the same "
            "architecture> (CLI --base-config) for its configs, tokenizer and scheduler (nothing is downloaded)"
        )
    config = _resolve_path(base_config, "base_config")
    if not (config / "model_index.json").is_file():
        raise ValueError(f"base_config {config}: not a diffusers pipeline folder (no model_index.json)")
    family, index = folder_family(config, f"base_config {config}")
    template = _load_folder_parts(config, allow_pickle, _family_parts(family, "text_encoders", "tokenizers"), family)
    converted = load_ldm_parts(
        path,
        {
            "unet": _read_config(config / "unet"),
            **{name: template[name] for name in family.text_encoders},
            "vae": _read_config(config / "vae"),
        },
        family=family,
        allow_pickle=allow_pickle,
        what="base",
        fix=f"pass a --base-config folder of the checkpoint's family (this one, {config}, is {family.label})",
    )
    evidence = converted.pop("evidence")
    missing = [part for part in (*family.text_encoders, "vae") if converted[part] is None]
    if missing:
        raise ValueError(f"base {path} lacks its {' and '.join(missing)}: a base checkpoint must be complete")
    parts = dict(
        converted,
        **{name: template[name] for name in family.tokenizers},
        scheduler_config=_apply_markers(_scheduler_config(config), evidence, path),
        family=family,
        force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt"),
    )
    return parts, {"base": str(path), "base_format": "single-file", "base_config": str(config)}


def _check_tokenizer(tokenizer, text_encoder, where: str) -> None:
    """The tokenizer must have one entry per token-embedding row of the text encoder it feeds."""
    rows = text_encoder.get_input_embeddings().num_embeddings
    if len(tokenizer) != rows:
        raise ValueError(
            f"{where}: the text encoder has {rows} token-embedding rows but the tokenizer has {len(tokenizer)} entries; "
            "a fine-tune that adds tokens (e.g. a DreamBooth identifier) must ship its tokenizer/ and text_encoder/ "
            "folders together"
        )


def _finetuned_tokenizer(ft_path: Path, base_tokenizer, family: Family, name: str = "tokenizer"):
    """The fine-tune's own tokenizer (its `tokenizer/` or `tokenizer_2/` folder), else the base's; and which it is."""
    folder = ft_path / name
    if ft_path.is_dir() and (folder / "tokenizer_config.json").is_file():
        return family.tokenizer_class_object().from_pretrained(str(folder)), "finetuned"
    return base_tokenizer, "base"


def _adapter_unet(base_unet, adapters: dict, sources: dict):
    """(unet_lora, finetuned_unet): LoRA / LoCon stay a per-sample low-rank branch; any other type
    (or DoRA) is merged, with the low-rank ones, into a copy of the base UNet."""
    import copy

    from .adapters import as_low_rank, merge_adapters

    if not adapters:
        return None, None
    modules = dict(base_unet.named_modules())
    low_rank = {path: as_low_rank(adapter, modules[path]) for path, adapter in adapters.items()}
    if all(layer is not None for layer in low_rank.values()):
        sources["unet_adapters"] = "low-rank branch (per sample, on the base UNet)"
        return low_rank, None
    sources["unet_adapters"] = "merged into a copy of the base UNet"
    return None, merge_adapters(copy.deepcopy(base_unet), adapters)


@logged_load("model pair")
def load_model_pair(
    base: str | Path,
    finetuned: str | Path | None = None,
    *,
    lora: str | Path | None = None,
    embeddings: list[str | Path] | tuple = (),
    finetuned_format: str = "auto",
    allow_pickle: bool = False,
    dtype=None,
    device: str = "cpu",
    base_config: str | Path | None = None,
    prediction_type: str | None = None,
) -> ModelPair:
    """Load a pretrained model (theta) and a checkpoint fine-tuned from it (theta'), of any family
    (SD 1.x, SD 2.x, SDXL, AltDiffusion: `finextract.engine.families`).

    Args:
        base: a diffusers pipeline folder, a single-file checkpoint in the original layout
            (`.safetensors`; `.ckpt` with `allow_pickle`) with `base_config`, or a hub id found in
            the local Hugging Face cache, or a `LoadedBase` (`load_base`: loaded once for many
            fine-tunes; `base_config` is then not read).
        finetuned: the fine-tune: a full pipeline folder (its own tokenizers when it ships them), a
            bare `unet/` folder (with or without text encoders), a single-file UNet state dict, a
            single-file original-layout checkpoint (its missing text encoders / VAE taken from the
            base), or any adapter `lora` accepts. None when `lora` is given.
        lora: an adapter checkpoint: LoRA / LoCon / DoRA, LoHa, LoKr, OFT, OFTv2, BOFT, GLoRA, full
            diff (kohya / LyCORIS, diffusers, PEFT, cloneofsimo layouts; SDXL's `lora_te1_` /
            `lora_te2_` / `text_encoder_2.` too), or a textual-inversion embedding file (see
            `lora_formats`).
        embeddings: textual-inversion embedding files added to the fine-tune's tokenizer and text
            encoder (`.safetensors`; pickles with `allow_pickle`; not for SDXL).
        finetuned_format: "auto" or one of `FINETUNED_FORMATS` ("lora" = any adapter layout).
        allow_pickle: allow pickle weights, read with `torch.load(weights_only=True)`.
        dtype: torch dtype (or "fp32"/"fp16"/"bf16") to cast every model to; None keeps float32.
        device: where the models go ("cpu", "cuda", "cuda:N").
        base_config: a local diffusers pipeline folder whose configs, tokenizer and scheduler
            describe a single-file base (of the same family).
        prediction_type: "epsilon", "v_prediction" or "sample" to sample with, overriding what the
            base's and the fine-tune's scheduler configs (and `v_pred` markers) say, e.g. when one
            of them is wrong. None: they must agree.

    Returns:
        ModelPair: `family` detected from the base's configs; kind "dreambooth" (two UNets; the
        checkpoint's text encoders and tokenizers when it ships them) or "lora" (an adapter: LoRA /
        LoCon as `unet_lora` low-rank adapters on the base UNet; any other type merged into
        `finetuned_unet`, a copy of the base UNet; text-encoder adapters and embeddings in copies of
        the base text encoders, embeddings' tokens in `finetuned_tokenizer`). `sources` records
        paths, formats, `family`, `prediction_type` (what each side said and what is used),
        `lora_counts` (per component and adapter type), `lora_alpha_assumed`, `unet_adapters` (how
        they run), `embedding_tokens` and the adapter file's sha256.

    Raises:
        FileNotFoundError: a path does not exist; a hub id is not in the local cache ("offline").
        UnknownFamilyError: a base (or fine-tune) of no supported family (a DiT, an inpainting or
            refiner UNet...), naming what it is.
        FamilyMismatchError: a fine-tune or adapter of another family than the base (names both).
        PredictionTypeMismatchError: base and fine-tune predict different quantities (names which
            side says what, and `prediction_type` as the deliberate override).
        ValueError: incompatible base and fine-tune (names what differs), a tokenizer without one
            entry per text-encoder row (naming both numbers), unknown format or prediction type, an
            adapter key that matches no module (`LoRAKeyError`), a file that is not weights
            (`CheckpointFormatError`: HTML, git-lfs pointer, text, truncated, a misnamed pickle), a
            refused pickle (`PickleRefusedError`), a partial single-file UNet (naming the missing tensors).
    """
    if finetuned is not None and lora is not None:
        raise ValueError("pass the fine-tune as `finetuned` or as `lora`, not both")
    if finetuned is None and lora is None:
        raise ValueError("no fine-tuned checkpoint: pass `finetuned` (a DreamBooth folder/file or a LoRA) or `lora`")
    if finetuned_format not in FINETUNED_FORMATS:
        raise ValueError(f"finetuned_format {finetuned_format!r}: expected one of {', '.join(FINETUNED_FORMATS)}")
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type {prediction_type!r} (--prediction-type): expected one of {', '.join(PREDICTION_TYPES)}"
        )
    torch_dtype = _to_dtype(dtype)
    ft_path = _resolve_path(finetuned if finetuned is not None else lora, "fine-tuned checkpoint")
    embedding_paths = [_resolve_path(path, "embedding") for path in embeddings]
    fmt = _finetuned_format(ft_path, finetuned_format, lora is not None)
    # 1. cheap checks on configs and headers before loading weights
    base_path = _resolve_path(base, "base")
    if base_path.is_file():
        from .formats import check_weights_file

        check_weights_file(base_path, "base")
    if base_path.is_dir() and (base_path / "unet" / "config.json").is_file():
        family, _ = folder_family(base_path, f"base {base_path}")
        _check_folder_configs(base_path, ft_path, fmt, family)
        if fmt.startswith("lora_"):
            _check_adapter_family(ft_path, family, _read_config(base_path / "unet"))
    # 2. the base
    parts, sources = _load_base(base, base_config, allow_pickle)
    family: Family = parts["family"]
    sources.update(finetuned=str(ft_path), finetuned_format=fmt, family=family.name)
    base_unet, vae = parts["unet"], parts["vae"]
    base_texts = {name: parts[name] for name in family.text_encoders}  # text_encoder(, text_encoder_2)
    base_tokenizers = {name: parts[name] for name in family.tokenizers}
    ft_texts, ft_tokenizers = dict(base_texts), dict(base_tokenizers)
    finetuned_unet, unet_lora, ft_scheduler, found_embeddings = None, None, None, []
    # 3. the fine-tune
    if fmt.startswith("lora_"):
        from .adapters import merge_adapters
        from .lora_formats import read_adapters

        _check_adapter_family(ft_path, family, dict(base_unet.config))
        weights = read_adapters(
            ft_path,
            {"unet": base_unet, **base_texts},
            format=fmt.removeprefix("lora_"),
            allow_pickle=allow_pickle,
            family=family,
        )
        unet_lora, finetuned_unet = _adapter_unet(base_unet, weights.unet, sources)
        if unet_lora and isinstance(base, LoadedBase):  # the hooks go on this pair's own UNet modules
            base_unet = copy_sharing_weights(base_unet)
        for name in family.text_encoders:
            if weights.adapters.get(name):
                ft_texts[name] = merge_adapters(copy.deepcopy(base_texts[name]), weights.adapters[name])
        found_embeddings = weights.embeddings
        sources.update(
            finetuned_format=f"lora_{weights.format}",
            lora_format=weights.format,
            lora_counts=weights.counts,
            lora_alpha_assumed=weights.alpha_assumed,
        )
        if ft_path.is_file():
            sources["lora_sha256"] = file_sha256(ft_path)
        kind = "lora"
    else:
        kind = "dreambooth"
        if fmt in ("pipeline", "unet_folder"):
            unet_dir = ft_path / "unet" if (ft_path / "unet").is_dir() else ft_path
            finetuned_unet = _load_unet_dir(unet_dir, allow_pickle)
            check_unet_configs(dict(base_unet.config), dict(finetuned_unet.config))
            for name, tokenizer_name in zip(family.text_encoders, family.tokenizers):
                if unet_dir != ft_path and (ft_path / name).is_dir():
                    ft_texts[name] = _load_folder_parts(ft_path, allow_pickle, (name,), family)[name]
                    check_text_configs(
                        base_texts[name].config.to_dict(), ft_texts[name].config.to_dict(), f"fine-tuned {name}"
                    )
                ft_tokenizers[tokenizer_name], sources[tokenizer_name] = _finetuned_tokenizer(
                    ft_path, base_tokenizers[tokenizer_name], family, tokenizer_name
                )
                _check_tokenizer(ft_tokenizers[tokenizer_name], ft_texts[name], f"fine-tune {ft_path} ({name})")
            if fmt == "pipeline" and (ft_path / "vae").is_dir():
                vae = _load_folder_parts(ft_path, allow_pickle, ("vae",), family)["vae"]
            if (ft_path / "scheduler" / "scheduler_config.json").is_file():
                ft_scheduler = (_scheduler_config(ft_path), ft_path / "scheduler" / "scheduler_config.json")
        elif fmt == "unet_file":
            finetuned_unet, converted = _load_unet_file(ft_path, base_unet, base_texts, vae, allow_pickle, family)
            if converted is not None:  # a pickle that held an original-layout checkpoint
                sources["finetuned_format"] = "checkpoint"
                ft_texts, vae, ft_scheduler = _reuse_missing(converted, base_texts, vae, ft_path, sources)
        else:  # "checkpoint": original layout, converted on the base's configs
            from .single_file import load_ldm_parts

            converted = load_ldm_parts(
                ft_path,
                {"unet": dict(base_unet.config), **base_texts, "vae": dict(vae.config)},
                family=family,
                allow_pickle=allow_pickle,
                what="fine-tuned checkpoint",
                fix="pass the base model the fine-tune was trained from",
            )
            finetuned_unet = converted["unet"]
            ft_texts, vae, ft_scheduler = _reuse_missing(converted, base_texts, vae, ft_path, sources)
        sources["text_encoder"] = "finetuned" if ft_texts["text_encoder"] is not base_texts["text_encoder"] else "base"
        if "text_encoder_2" in ft_texts:
            sources["text_encoder_2"] = (
                "finetuned" if ft_texts["text_encoder_2"] is not base_texts["text_encoder_2"] else "base"
            )
    scheduler_config = _agreed_scheduler(parts["scheduler_config"], ft_scheduler, prediction_type, sources)
    # 4. textual-inversion embeddings: the adapter file's and the ones passed
    if embedding_paths:
        from .embeddings import read_embedding_file

        for path in embedding_paths:
            found_embeddings = found_embeddings + read_embedding_file(path, allow_pickle=allow_pickle)
        sources["embedding_files"] = [str(path) for path in embedding_paths]
    if found_embeddings:
        from .embeddings import EmbeddingError, add_embeddings

        if family.name == "sdxl":
            raise EmbeddingError(
                f"textual-inversion embeddings ({found_embeddings[0].source}) on an SDXL base: SDXL embeddings "
                "(clip_l + clip_g) are not supported here; leave them out"
            )
        ft_tokenizers["tokenizer"], ft_texts["text_encoder"] = add_embeddings(
            ft_tokenizers["tokenizer"], ft_texts["text_encoder"], found_embeddings
        )
        sources["embedding_tokens"] = [e.token for e in found_embeddings]
        sources["tokenizer"] = "finetuned"
    pair = ModelPair(
        kind=kind,
        base_unet=base_unet,
        finetuned_unet=finetuned_unet,
        unet_lora=unet_lora,
        base_text_encoder=base_texts["text_encoder"],
        finetuned_text_encoder=ft_texts["text_encoder"],
        base_tokenizer=base_tokenizers["tokenizer"],
        finetuned_tokenizer=ft_tokenizers["tokenizer"],
        vae=vae,
        scheduler_config=scheduler_config,
        sources=sources,
        family=family,
        base_text_encoder_2=base_texts.get("text_encoder_2"),
        finetuned_text_encoder_2=ft_texts.get("text_encoder_2"),
        base_tokenizer_2=base_tokenizers.get("tokenizer_2"),
        finetuned_tokenizer_2=ft_tokenizers.get("tokenizer_2"),
        force_zeros_for_empty_prompt=parts["force_zeros_for_empty_prompt"],
    )
    if torch_dtype is None and str(device) == "cpu":
        return pair  # loaded on the CPU in float32 already
    return pair.to(device, torch_dtype)


def _adapter_headers(path: Path) -> tuple[dict, dict]:
    """(tensor name -> shape, metadata) of an adapter's safetensors files, from headers only: the file, a
    diffusers folder's `pytorch_lora_weights.safetensors`, or a PEFT folder's `adapter_model.safetensors`
    files (their keys prefixed by the component folder, e.g. `text_encoder_2.`); empty for pickles."""
    files = []
    if path.is_file():
        files = [("", path)]
    elif path.is_dir():
        files = [("", path / "pytorch_lora_weights.safetensors")]
        files += [
            (f"{sub}." if sub else "", path / sub / "adapter_model.safetensors")
            for sub in ("", "unet", "text_encoder", "text_encoder_2")
        ]
    shapes, metadata = {}, {}
    for prefix, file in files:
        if file.is_file() and sniff(file) == "safetensors":
            header, meta = read_safetensors_header(file)
            shapes.update({prefix + key: tuple(info["shape"]) for key, info in header.items()})
            metadata.update(meta)
    return shapes, metadata


def _check_adapter_family(path: Path, family: Family, unet_config: dict) -> None:
    """Refuse an adapter whose metadata, components or shapes say another family (headers only)."""
    evidence = adapter_evidence(*_adapter_headers(path))
    check_family(
        family,
        unet_config.get("cross_attention_dim"),
        evidence,
        f"the LoRA {path}",
        f"pass the {evidence.family.label if evidence.family else 'matching'} base model it was trained on",
    )


def _agreed_scheduler(base: dict, finetuned, override: str | None, sources: dict) -> dict:
    """The scheduler config the pair samples with: the base's, with one prediction type both sides
    agree on (or `override`).

    Args:
        base: the base's scheduler config (markers applied).
        finetuned: (config, where it came from) of the fine-tune, or None when it ships none.
        override: the deliberate `prediction_type`, or None.
        sources: `sources["prediction_type"]` records {"base", "finetuned", "used", "override"}.

    Raises:
        PredictionTypeMismatchError: the two sides differ and there is no override.
    """
    said_base = base.get("prediction_type", "epsilon")
    said_ft = finetuned[0].get("prediction_type", "epsilon") if finetuned else None
    record = {"base": said_base, "finetuned": said_ft, "used": override or said_base, "override": override is not None}
    sources["prediction_type"] = record
    if override is None and said_ft is not None and said_ft != said_base:
        raise PredictionTypeMismatchError(
            f"prediction-type mismatch: the base's scheduler says {said_base!r} ({sources.get('base')}) but the "
            f"fine-tune's says {said_ft!r} ({finetuned[1]}); the guidance rule mixes their outputs, so both must predict "
            f"the same quantity. If one of them is wrong, pass --prediction-type {said_ft} (or {said_base}) "
            "(prediction_type=...) to sample both with that one"
        )
    if (override is not None and override != said_base) or (override and said_ft and override != said_ft):
        logger.warning(
            "sampling with prediction_type %s (--prediction-type): the base says %s%s",
            override,
            said_base,
            f", the fine-tune says {said_ft}" if said_ft else "",
        )
    return dict(base, prediction_type=override or said_base)


def _finetuned_format(ft_path: Path, finetuned_format: str, as_lora: bool) -> str:
    """The fine-tune's format: `finetuned_format` checked against what the files are, or detected."""
    fmt = finetuned_format
    if as_lora and fmt == "auto":
        fmt = "lora"
    if fmt in ("auto", "lora"):
        if fmt == "lora" and ft_path.is_file() and sniff(ft_path) in ("pickle", "pickle-zip"):
            return "lora_auto"  # a pickle's keys are known only after loading, which allow_pickle governs
        detected = detect_finetuned_format(ft_path)
        if fmt == "lora" and not detected.startswith("lora_"):
            raise ValueError(
                f"{ft_path} is {_FULL_FINETUNE_WORDS[detected]}, not a LoRA checkpoint: pass it as --finetuned "
                "(finetuned=...) instead of --lora"
            )
        return detected
    if not fmt.startswith("lora"):
        from .lora_formats import detect_lora_format

        if detect_lora_format(ft_path):
            raise ValueError(
                f"{ft_path} is a LoRA checkpoint, not a full fine-tune ({fmt}): pass it as --lora (lora=...), "
                "or leave finetuned_format='auto'"
            )
    return fmt


def _check_folder_configs(base_path: Path, ft_path: Path, fmt: str, family: Family) -> None:
    """Family, config and tokenizer checks of a folder fine-tune against a base folder, before any weights load."""
    base_unet_config = _read_config(base_path / "unet")
    ft_unet_dir = None
    if fmt == "pipeline" or (fmt == "unet_folder" and (ft_path / "unet").is_dir()):
        ft_unet_dir = ft_path / "unet"
    elif fmt == "unet_folder":
        ft_unet_dir = ft_path
    if ft_unet_dir is not None:
        if ft_path.is_dir() and ft_unet_dir != ft_path:
            ft_family, _ = folder_family(ft_path, f"fine-tune {ft_path}")
            check_family(
                family,
                base_unet_config.get("cross_attention_dim"),
                _config_evidence(ft_family, _read_config(ft_unet_dir)),
                f"the fine-tune {ft_path}",
                "pass the base model the fine-tune was trained from",
                relation="is",
            )
        check_unet_configs(base_unet_config, _read_config(ft_unet_dir))
    if fmt not in ("pipeline", "unet_folder"):
        return
    for name, tokenizer_name in zip(family.text_encoders, family.tokenizers):
        ft_text_dir = ft_path / name
        text_config = _read_config(ft_text_dir if ft_text_dir.is_dir() else base_path / name)
        base_text_config = _read_config(base_path / name)
        if ft_text_dir.is_dir():
            check_text_configs(base_text_config, text_config, f"fine-tuned {name}")
        folder = ft_path / tokenizer_name
        tokenizer_dir = folder if (folder / "tokenizer_config.json").is_file() else None
        if tokenizer_dir is None and text_config.get("vocab_size") == base_text_config.get("vocab_size"):
            continue
        tokenizer = family.tokenizer_class_object().from_pretrained(str(tokenizer_dir or base_path / tokenizer_name))
        if len(tokenizer) != text_config.get("vocab_size"):
            which = "its own" if tokenizer_dir else "the base's: the fine-tune ships none"
            raise ValueError(
                f"fine-tune {ft_path}: the {name} has {text_config.get('vocab_size')} token-embedding rows "
                f"but the {tokenizer_name} ({which}) has {len(tokenizer)} entries; a fine-tune that adds tokens (e.g. "
                f"a DreamBooth identifier) must ship its {tokenizer_name}/ and {name}/ folders together"
            )


def _reuse_missing(converted: dict, base_texts: dict, base_vae, ft_path: Path, sources: dict):
    """The converted text encoders and VAE of a single-file fine-tune, the base's where it has none, and
    its prediction type as its `v_pred` marker says ((config, where) or None)."""
    texts = {name: converted.get(name) for name in base_texts}
    vae = converted["vae"]
    for part, model in [*texts.items(), ("VAE", vae)]:
        if model is None:
            logger.info("%s holds no %s: using the base's", ft_path, part.replace("_", " "))
    sources["single_file_parts"] = ["unet"] + [name for name, m in (*texts.items(), ("vae", vae)) if m is not None]
    evidence = converted.get("evidence")
    scheduler = None
    if evidence is not None and evidence.prediction_type:
        scheduler = ({"prediction_type": evidence.prediction_type}, f"its v_pred marker tensor in {ft_path}")
    if evidence is not None and evidence.zero_terminal_snr:
        sources["finetuned_markers"] = ["ztsnr"]
    texts = {name: model if model is not None else base_texts[name] for name, model in texts.items()}
    return texts, vae if vae is not None else base_vae, scheduler


def _load_unet_dir(folder: Path, allow_pickle: bool):
    from diffusers import UNet2DConditionModel

    use_safetensors = _check_weight_files(folder, allow_pickle)
    return UNet2DConditionModel.from_pretrained(str(folder), use_safetensors=use_safetensors).eval()


def _load_unet_file(path: Path, base_unet, base_texts: dict, base_vae, allow_pickle: bool, family: Family):
    """A single-file UNet state dict (diffusers names, optionally prefixed `unet.`) on the base's
    config; (unet, None), or (unet, converted parts) for a pickle that held an original-layout
    checkpoint (its layout is known only once it is read)."""
    from diffusers import UNet2DConditionModel

    from .formats import load_state_dict

    expected = {k: tuple(v.shape) for k, v in base_unet.state_dict().items()}
    what = f"fine-tuned UNet file {path}"

    def check(found: dict) -> None:
        check_family(
            family,
            base_unet.config.cross_attention_dim,
            checkpoint_evidence(found),
            f"the {what}",
            "pass the base model the fine-tune was trained from",
            relation="is",
        )
        check_state_dict(expected, found, what)

    if sniff(path) == "safetensors":  # check names/shapes from the header before reading tensors
        check({k.removeprefix("unet."): v for k, v in state_dict_keys(path).items()})
    state = {k.removeprefix("unet."): v for k, v in load_state_dict(path, allow_pickle=allow_pickle).items()}
    if any(k.startswith("model.diffusion_model.") for k in state):
        from .single_file import load_ldm_parts

        converted = load_ldm_parts(
            path,
            {"unet": dict(base_unet.config), **base_texts, "vae": dict(base_vae.config)},
            family=family,
            allow_pickle=allow_pickle,
            what="fine-tuned checkpoint",
            fix="pass the base model the fine-tune was trained from",
        )
        return converted["unet"], converted
    check({k: tuple(v.shape) for k, v in state.items()})
    unet = UNet2DConditionModel.from_config(base_unet.config)
    unet.load_state_dict(state, strict=True)
    return unet.eval(), None
