"""Original-SD-layout ("LDM", CompVis) single-file checkpoints, converted offline.

A `.safetensors` / `.ckpt` of the original Stable Diffusion code holds `model.diffusion_model.*`
(the UNet), and optionally `cond_stage_model.transformer.*` (the CLIP text encoder, SD 1.x) and
`first_stage_model.*` (the VAE). Each part is renamed to diffusers' layout with diffusers' own
single-file conversion functions (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
`convert_ldm_clip_checkpoint`), on the configs of a model already known (the base, or a
`base_config` folder), and loaded into a model built from that config. Nothing is downloaded:
diffusers' `from_single_file` is not used, since it looks its configs up online.
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_CLIP_PREFIX = "cond_stage_model.transformer."
LDM_OPENCLIP_PREFIX = "cond_stage_model.model."
LDM_VAE_PREFIX = "first_stage_model."


def _expected(model) -> dict[str, tuple]:
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def _check(expected: dict, found: dict, what: str) -> None:
    """Names and shapes of a converted part against its model's; ValueError naming what differs."""
    from .loading import check_state_dict

    missing = sorted(set(expected) - set(found))
    if missing and len(missing) < len(expected):
        raise ValueError(
            f"{what} is partial: {len(missing)} of {len(expected)} tensors are missing after conversion, e.g. "
            f"{missing[:5]} (diffusers names): the file is truncated, pruned or of another architecture; "
            "get the complete checkpoint"
        )
    check_state_dict(expected, found, what)


def _load_part(model, state: dict, what: str):
    """Load a converted state dict into `model` (strict) after checking names and shapes."""
    import torch

    state = {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}
    _check(_expected(model), {key: tuple(value.shape) for key, value in state.items()}, what)
    model.load_state_dict(state, strict=True)
    return model.eval()


def convert_unet(state: dict, config: dict, what: str):
    """The `UNet2DConditionModel` of an LDM checkpoint's `model.diffusion_model.*` tensors.

    Raises:
        ValueError: no UNet tensors, a partial UNet (naming the missing tensors) or one of another
            architecture (names and shapes that differ).
    """
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    if not any(key.startswith(LDM_UNET_PREFIX) for key in state):
        raise ValueError(f"{what} holds no UNet ({LDM_UNET_PREFIX}* tensors): not an SD checkpoint")
    converted = convert_ldm_unet_checkpoint(state, dict(config))
    return _load_part(UNet2DConditionModel.from_config(config), converted, what + " (UNet)")


def convert_text_encoder(state: dict, template, what: str):
    """The CLIP text encoder of `cond_stage_model.transformer.*`, in a copy of `template`'s architecture;
    None when the checkpoint has none.

    Raises:
        ValueError: an OpenCLIP (SD 2.x) text encoder, or tensors that do not fit `template`.
    """
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextModel

    if any(key.startswith(LDM_OPENCLIP_PREFIX) for key in state):
        raise ValueError(
            f"{what} holds an OpenCLIP text encoder ({LDM_OPENCLIP_PREFIX}*, SD 2.x): its single-file conversion "
            "is not supported here; convert the checkpoint to a diffusers folder"
        )
    if not any(key.startswith(LDM_CLIP_PREFIX) for key in state):
        return None
    converted = convert_ldm_clip_checkpoint({k: v for k, v in state.items() if k.startswith(LDM_CLIP_PREFIX)})
    model = CLIPTextModel(template.config)
    names = set(model.state_dict())
    renamed = {}
    for key, value in converted.items():  # transformers 5 dropped CLIP's `text_model.` module prefix
        for candidate in (key, key.removeprefix("text_model."), "text_model." + key):
            if candidate in names:
                renamed[candidate] = value
                break
        else:
            if not key.endswith("position_ids"):  # a buffer older transformers saved
                renamed[key] = value
    return _load_part(model, renamed, what + " (text encoder)")


def convert_vae(state: dict, config: dict, what: str):
    """The `AutoencoderKL` of `first_stage_model.*`; None when the checkpoint has none."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    if not any(key.startswith(LDM_VAE_PREFIX) for key in state):
        return None
    vae_state = {key: value for key, value in state.items() if key.startswith(LDM_VAE_PREFIX)}
    converted = convert_ldm_vae_checkpoint(vae_state, dict(config))
    return _load_part(AutoencoderKL.from_config(config), converted, what + " (VAE)")


def read_ldm_checkpoint(path: str | Path, *, allow_pickle: bool = False) -> dict:
    """The tensors of an LDM single-file checkpoint (`formats.load_state_dict`)."""
    from .formats import load_state_dict

    return load_state_dict(path, allow_pickle=allow_pickle)


def load_ldm_parts(path: str | Path, base: dict, *, allow_pickle: bool = False, what: str = "checkpoint") -> dict:
    """The UNet, text encoder and VAE of an LDM checkpoint, on the architectures of `base`.

    Args:
        path: the checkpoint file.
        base: {"unet": config dict, "text_encoder": a CLIPTextModel (its config is used),
            "vae": config dict}.
        allow_pickle: allow a `.ckpt` pickle.
        what: how to name the file in messages ("fine-tuned checkpoint", "base").

    Returns:
        {"unet": model, "text_encoder": model or None, "vae": model or None} (None: absent from the file).

    Raises:
        ValueError: no or a partial UNet, parts of another architecture (see the converters).
        CheckpointFormatError / PickleRefusedError: see `formats.load_state_dict`.
    """
    what = f"{what} {path}"
    state = read_ldm_checkpoint(path, allow_pickle=allow_pickle)
    return {
        "unet": convert_unet(state, base["unet"], what),
        "text_encoder": convert_text_encoder(state, base["text_encoder"], what),
        "vae": convert_vae(state, base["vae"], what),
    }
