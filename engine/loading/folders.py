"""Diffusers folders: a pipeline's parts with its family's classes, a bare `unet/`, a fine-tune's tokenizers."""

from __future__ import annotations

import json
from pathlib import Path

from ..families import Family, detect_family
from .files import check_weight_files, optional_config


def load_folder_parts(folder: Path, allow_pickle: bool, parts: tuple[str, ...], family: Family) -> dict:
    """Load the named parts ("unet", "text_encoder", "text_encoder_2", "vae", "tokenizer", "tokenizer_2")
    of a pipeline folder, with the family's classes."""
    # heavy: diffusers takes seconds to import; loaded when a model is built
    from diffusers import AutoencoderKL, UNet2DConditionModel

    loaded = {}
    for part in parts:
        sub = folder / part
        if part.startswith("tokenizer"):
            loaded[part] = family.tokenizer_class_object().from_pretrained(str(sub))
            continue
        use_safetensors = check_weight_files(sub, allow_pickle)
        if part.startswith("text_encoder"):
            cls = family.text_encoder_class(family.text_encoders.index(part))
        else:
            cls = {"unet": UNet2DConditionModel, "vae": AutoencoderKL}[part]
        loaded[part] = cls.from_pretrained(str(sub), use_safetensors=use_safetensors).eval()
    return loaded


def folder_family(folder: Path, where: str) -> tuple[Family, dict]:
    """The family of a diffusers folder (a pipeline, or a bare `unet/` with or without text encoders),
    and its `model_index.json` (empty when it has none), from configs only.

    Raises:
        UnknownFamilyError: see `finextract.engine.families.detect_family`.
    """
    index = json.loads((folder / "model_index.json").read_text()) if (folder / "model_index.json").is_file() else {}
    unet_dir = folder / "unet" if (folder / "unet").is_dir() else folder
    family = detect_family(
        optional_config(unet_dir),
        optional_config(folder / "text_encoder"),
        text_encoder_2_config=optional_config(folder / "text_encoder_2"),
        pipeline_class=index.get("_class_name"),
        requires_aesthetics_score=bool(index.get("requires_aesthetics_score")),
        where=where,
    )
    return family, index


def family_parts(family: Family, *names: str) -> tuple[str, ...]:
    """The pipeline parts to load for a family: `names` with the family's text encoders and tokenizers."""
    parts = []
    for name in names:
        parts += list(
            family.text_encoders if name == "text_encoders" else family.tokenizers if name == "tokenizers" else [name]
        )
    return tuple(parts)


def load_unet_dir(folder: Path, allow_pickle: bool):
    """The `UNet2DConditionModel` of a UNet folder (config.json and weights), in eval mode."""
    from diffusers import UNet2DConditionModel

    use_safetensors = check_weight_files(folder, allow_pickle)
    return UNet2DConditionModel.from_pretrained(str(folder), use_safetensors=use_safetensors).eval()


def finetuned_tokenizer(ft_path: Path, base_tokenizer, family: Family, name: str = "tokenizer"):
    """The fine-tune's own tokenizer (its `tokenizer/` or `tokenizer_2/` folder), else the base's; and which it is."""
    folder = ft_path / name
    if ft_path.is_dir() and (folder / "tokenizer_config.json").is_file():
        return family.tokenizer_class_object().from_pretrained(str(folder)), "finetuned"
    return base_tokenizer, "base"
