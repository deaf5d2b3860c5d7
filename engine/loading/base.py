"""The pretrained model: a diffusers pipeline folder or a single-file checkpoint on a `base_config`
folder's configs, loaded once (`load_base`) or for one pair."""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from pathlib import Path

from ..config import torch_dtype
from ..formats import check_weights_file
from ..quiet import logged_load
from .checks import check_finite
from .files import read_config, read_scheduler_config, resolve_path
from .folders import family_parts, folder_family, load_folder_parts
from .single_file import apply_markers, load_ldm_parts


def to_dtype(dtype):
    """The torch dtype of a precision name (`config.torch_dtype`); None keeps float32."""
    return None if dtype is None else torch_dtype(dtype)


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
    parts, sources = base_parts(base, base_config, allow_pickle)
    torch_dtype = to_dtype(dtype)
    for name in ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        if parts.get(name) is None:  # text_encoder_2: SDXL, FLUX.1, SD3; text_encoder_3: SD3
            continue
        parts[name].to(device)
        if name != "vae" and torch_dtype is not None and parts[name].dtype != torch_dtype:
            parts[name].to(dtype=torch_dtype)
    return LoadedBase(spec=str(base), parts=parts, sources=sources)


def base_parts(base, base_config, allow_pickle: bool) -> tuple[dict, dict]:
    """Base parts (unet, text_encoder(s), vae, tokenizer(s), scheduler_config, family,
    force_zeros_for_empty_prompt) and their sources.

    A folder is a diffusers pipeline; a single file (sniffed before any library parses it) an
    original-layout checkpoint converted on `base_config`'s configs, whose family it must share.
    """
    if isinstance(base, LoadedBase):  # loaded already: its models, shared (see LoadedBase)
        return dict(base.parts), dict(base.sources)
    path = resolve_path(base, "base")
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"base {path}: not a diffusers pipeline folder (no model_index.json)")
        family, index = folder_family(path, f"base {path}")
        parts = load_folder_parts(
            path, allow_pickle, family_parts(family, "unet", "text_encoders", "vae", "tokenizers"), family
        )
        parts.update(
            scheduler_config=read_scheduler_config(path),
            family=family,
            force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt"),
        )
        fmt = "pipeline" if Path(base).expanduser().exists() else "hub-cache"
        check_finite({name: parts[name] for name in ("unet", *family.text_encoders, "vae")}, f"base {path}")
        return parts, {"base": str(path), "base_format": fmt}
    check_weights_file(path, "base")
    if base_config is None:
        raise ValueError(
            f"base {path} is a single-file checkpoint: pass base_config=<a local diffusers pipeline folder of the same "
            "architecture> (CLI --base-config) for its configs, tokenizer and scheduler (nothing is downloaded)"
        )
    config = resolve_path(base_config, "base_config")
    if not (config / "model_index.json").is_file():
        raise ValueError(f"base_config {config}: not a diffusers pipeline folder (no model_index.json)")
    family, index = folder_family(config, f"base_config {config}")
    if family.name == "flux":  # BFL's file holds the transformer alone: the rest comes from base_config
        from .flux_file import flux_base_parts

        parts = flux_base_parts(path, config, family, index, allow_pickle)
        return parts, {"base": str(path), "base_format": "single-file", "base_config": str(config)}
    template = load_folder_parts(config, allow_pickle, family_parts(family, "text_encoders", "tokenizers"), family)
    converted = load_ldm_parts(
        path,
        {
            "unet": read_config(config / family.denoiser),
            **{name: template[name] for name in family.text_encoders},
            "vae": read_config(config / "vae"),
        },
        family=family,
        allow_pickle=allow_pickle,
        what="base",
        fix=f"pass a --base-config folder of the checkpoint's family (this one, {config}, is {family.label})",
    )
    evidence = converted.pop("evidence")
    if family.flow_matching:  # SD3's released files ship without their text encoders: the config folder's
        for name in family.text_encoders:
            converted[name] = converted[name] if converted[name] is not None else template[name]
    optional = family.optional_text_encoders
    missing = [part for part in (*family.text_encoders, "vae") if converted[part] is None and part not in optional]
    if missing:
        raise ValueError(f"base {path} lacks its {' and '.join(missing)}: a base checkpoint must be complete")
    check_finite({name: converted[name] for name in ("unet", *family.text_encoders, "vae")}, f"base {path}")
    parts = dict(
        converted,
        **{name: template[name] for name in family.tokenizers},
        scheduler_config=apply_markers(read_scheduler_config(config), evidence, path),
        family=family,
        force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt"),
    )
    return parts, {"base": str(path), "base_format": "single-file", "base_config": str(config)}
