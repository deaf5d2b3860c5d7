"""Original-layout ("LDM" / CompVis, "SGM" for SDXL) single-file checkpoints, converted offline.

A `.safetensors` / `.ckpt` of the original Stable Diffusion code holds `model.diffusion_model.*`
(the UNet), `first_stage_model.*` (the VAE) and the text encoder(s), per family:
- SD 1.x: `cond_stage_model.transformer.*` (CLIP);
- SD 2.x: `cond_stage_model.model.*` (OpenCLIP ViT-H);
- SDXL: `conditioner.embedders.0.transformer.*` (CLIP) and `conditioner.embedders.1.model.*`
  (OpenCLIP bigG with its `text_projection`);
- SD3 / 3.5 (Stability AI's files): `model.diffusion_model.*` is the MMDiT (`joint_blocks.*`, converted with
  `convert_sd3_transformer_checkpoint_to_diffusers`), and the text encoders, when the file has them, are
  `text_encoders.clip_l.transformer.*`, `text_encoders.clip_g.transformer.*`, `text_encoders.t5xxl.transformer.*`
  in transformers' own names.
Each part is renamed to diffusers' layout with diffusers' own single-file conversion functions
(`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`,
`convert_open_clip_checkpoint`), on the configs of a model already known (the base, or a
`base_config` folder), and loaded into a model built from that config. The checkpoint's family
(its keys, `finextract.engine.families.checkpoint_evidence`) must be the base's. Nothing is
downloaded: diffusers' `from_single_file` is not used, since it looks its configs up online.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..families import check_family, checkpoint_evidence, get_family
from ..formats import load_state_dict
from .checks import check_state_dict

logger = logging.getLogger(__name__)

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_CLIP_PREFIX = "cond_stage_model.transformer."
LDM_OPENCLIP_PREFIX = "cond_stage_model.model."
SGM_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SGM_OPENCLIP_PREFIX = "conditioner.embedders.1.model."
LDM_VAE_PREFIX = "first_stage_model."
#: SD3 single files: pipeline component -> the prefix of its tensors
SD3_TEXT_PREFIXES = {
    "text_encoder": "text_encoders.clip_l.transformer.",
    "text_encoder_2": "text_encoders.clip_g.transformer.",
    "text_encoder_3": "text_encoders.t5xxl.transformer.",
}


def _expected(model) -> dict[str, tuple]:
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def _check(expected: dict, found: dict, what: str) -> None:
    """Names and shapes of a converted part against its model's; ValueError naming what differs."""
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
    from diffusers import UNet2DConditionModel  # heavy: diffusers takes seconds to import; loaded when a model is built
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    if not any(key.startswith(LDM_UNET_PREFIX) for key in state):
        raise ValueError(f"{what} holds no UNet ({LDM_UNET_PREFIX}* tensors): not an SD checkpoint")
    converted = convert_ldm_unet_checkpoint(state, dict(config))
    return _load_part(UNet2DConditionModel.from_config(config), converted, what + " (UNet)")


def convert_sd3_transformer(state: dict, config: dict, what: str):
    """The `SD3Transformer2DModel` of an SD3 single file's `model.diffusion_model.*` (MMDiT) tensors.

    Raises:
        ValueError: no MMDiT tensors, a partial one (naming what is missing) or one of another architecture.
    """
    from diffusers import SD3Transformer2DModel  # heavy: diffusers takes seconds to import
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    part = {key: value for key, value in state.items() if key.startswith(LDM_UNET_PREFIX)}
    if not part:
        raise ValueError(f"{what} holds no transformer ({LDM_UNET_PREFIX}* tensors): not an SD3 checkpoint")
    try:
        converted = convert_sd3_transformer_checkpoint_to_diffusers(part)  # pops from `part`, a copy
    except KeyError as error:
        raise ValueError(
            f"{what} is partial: its MMDiT lacks {error} (SAI's name); get the complete checkpoint"
        ) from None
    return _load_part(SD3Transformer2DModel.from_config(config), converted, what + " (transformer)")


def _sd3_text_encoder(state: dict, name: str, template, what: str):
    """One SD3 text encoder of a single file (transformers' names under `SD3_TEXT_PREFIXES[name]`), in a copy
    of `template`'s architecture; None when the file has none (or the base runs without it)."""
    prefix = SD3_TEXT_PREFIXES[name]
    part = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    if not part or template is None:
        if part:
            logger.info("%s holds a %s but the base has none: not used", what, name.replace("_", " "))
        return None
    model = type(template)(template.config)
    if "shared.weight" in part:  # T5's input embedding, tied to `encoder.embed_tokens` (files keep one)
        part.setdefault("encoder.embed_tokens.weight", part["shared.weight"])
    return _load_part(model, _renamed(part, model), what + f" (text encoder {prefix}*)")


def _renamed(converted: dict, model) -> dict:
    """diffusers' converted CLIP names onto `model`'s own (transformers 5 dropped `CLIPTextModel`'s
    `text_model.` module prefix; `CLIPTextModelWithProjection` keeps it)."""
    names = set(model.state_dict())
    renamed = {}
    for key, value in converted.items():
        for candidate in (key, key.removeprefix("text_model."), "text_model." + key):
            if candidate in names:
                renamed[candidate] = value
                break
        else:
            if not key.endswith("position_ids"):  # a buffer older transformers saved
                renamed[key] = value
    return renamed


def convert_text_encoder(state: dict, template, what: str, *, layout: str = "clip", prefix: str | None = None):
    """A text encoder of an original-layout checkpoint, in a copy of `template`'s architecture; None when
    the checkpoint has none.

    Args:
        state: the checkpoint's tensors.
        template: a text encoder whose class and config the converted one takes.
        what: how to name the file in messages.
        layout: "clip" (CLIP's own names under `prefix`, diffusers' `convert_ldm_clip_checkpoint`) or
            "openclip" (OpenCLIP's names, `convert_open_clip_checkpoint`).
        prefix: where the encoder's tensors are (default: SD 1.x's `cond_stage_model.transformer.` /
            SD 2.x's `cond_stage_model.model.`).

    Raises:
        ValueError: tensors that do not fit `template` (names and shapes that differ).
    """
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    prefix = prefix or (LDM_OPENCLIP_PREFIX if layout == "openclip" else LDM_CLIP_PREFIX)
    if not any(key.startswith(prefix) for key in state):
        return None
    model = type(template)(template.config)
    if layout == "openclip":
        converted = convert_open_clip_checkpoint(model, state, prefix=prefix)
    else:
        converted = convert_ldm_clip_checkpoint({k: v for k, v in state.items() if k.startswith(prefix)}, prefix)
    return _load_part(model, _renamed(converted, model), what + f" (text encoder {prefix}*)")


def _text_encoders(state: dict, base: dict, family, what: str) -> dict:
    """The family's text encoders of a checkpoint: name -> model or None (absent)."""
    if family.name == "sd3":
        return {name: _sd3_text_encoder(state, name, base.get(name), what) for name in family.text_encoders}
    if family.name == "sdxl":
        return {
            "text_encoder": convert_text_encoder(state, base["text_encoder"], what, prefix=SGM_CLIP_PREFIX),
            "text_encoder_2": convert_text_encoder(
                state, base["text_encoder_2"], what, layout="openclip", prefix=SGM_OPENCLIP_PREFIX
            ),
        }
    if family.name == "altdiffusion":
        if any(key.startswith("cond_stage_model.") for key in state):
            raise ValueError(
                f"{what} holds a text encoder (cond_stage_model.*): converting AltDiffusion's XLM-R encoder from the "
                "original layout is not supported here; pass the UNet alone, or convert the checkpoint to a "
                "diffusers folder"
            )
        return {"text_encoder": None}
    layout = "openclip" if family.name == "sd2" else "clip"
    return {"text_encoder": convert_text_encoder(state, base["text_encoder"], what, layout=layout)}


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
    return load_state_dict(path, allow_pickle=allow_pickle)


def load_ldm_parts(
    path: str | Path,
    base: dict,
    *,
    family="sd1",
    allow_pickle: bool = False,
    what: str = "checkpoint",
    fix: str = "pass the base model the checkpoint belongs to",
) -> dict:
    """The UNet, text encoder(s) and VAE of an original-layout checkpoint, on the architectures of `base`.

    Args:
        path: the checkpoint file.
        base: {"unet": config dict, "text_encoder": a text encoder (its class and config are used),
            SDXL also "text_encoder_2", "vae": config dict}.
        family: the base's family (a `finextract.engine.families.Family` or its name).
        allow_pickle: allow a `.ckpt` pickle.
        what: how to name the file in messages ("fine-tuned checkpoint", "base").
        fix: what a family mismatch should be fixed with (appended to its message).

    Returns:
        {"unet": model, "text_encoder": model or None, SDXL also "text_encoder_2", "vae": model or
        None, "evidence": `Evidence`} (None: absent from the file; `evidence` carries the `v_pred` /
        `ztsnr` markers).

    Raises:
        FamilyMismatchError: the checkpoint's keys say another family than `family` (names both).
        ValueError: no or a partial UNet, parts of another architecture (see the converters).
        CheckpointFormatError / PickleRefusedError: see `formats.load_state_dict`.
    """
    family = get_family(family)
    where = f"{what} {path}"
    state = read_ldm_checkpoint(path, allow_pickle=allow_pickle)
    evidence = checkpoint_evidence({key: tuple(value.shape) for key, value in state.items()})
    check_family(family, base["unet"].get("cross_attention_dim"), evidence, f"the {where}", fix, relation="is")
    convert = convert_sd3_transformer if family.name == "sd3" else convert_unet
    return {
        "unet": convert(state, base["unet"], where),
        **_text_encoders(state, base, family, where),
        "vae": convert_vae(state, base["vae"], where),
        "evidence": evidence,
    }


def apply_markers(scheduler_config: dict, evidence, path: Path) -> dict:
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
