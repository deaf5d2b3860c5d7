"""BFL's original FLUX.1 transformer file (`flux1-dev.safetensors`, `flux1-schnell.safetensors` and the full
fine-tunes published the same way), converted offline to diffusers' `FluxTransformer2DModel`.

The file holds the transformer alone under the `flux` package's names (`double_blocks.<i>.img_attn.qkv`,
`single_blocks.<i>.linear1`, `img_in`, `txt_in`, `time_in`, `vector_in`, `guidance_in` (dev only),
`final_layer`), bare or under `model.diffusion_model.`. It is renamed with diffusers' own converter
(`single_file_utils.convert_flux_transformer_checkpoint_to_diffusers`, what `FluxTransformer2DModel.from_single_file`
runs) and loaded into a model built from a local config (a `base_config` folder's `transformer/`): nothing is
downloaded. That converter splits a single block's fused `linear1` at FLUX.1's widths (3072 x 3 for q, k, v,
12288 for the MLP input); for a model of another width (the tiny zoo's), the rows are placed at those offsets
in a zero-padded copy before conversion and cut back to the config's widths after it, so every name still
comes from diffusers' converter.
"""

from __future__ import annotations

import torch

from ..families import check_family, checkpoint_evidence, get_family
from ..formats import load_state_dict
from .checks import check_finite
from .files import read_config, read_scheduler_config
from .folders import family_parts, load_folder_parts
from .single_file import _load_part

BFL_PREFIX = "model.diffusion_model."
#: a key only BFL's FLUX.1 transformer has (diffusers' `CHECKPOINT_KEY_NAMES["flux"]`)
FLUX_MARKER_KEY = "double_blocks.0.img_attn.norm.key_norm.scale"
_RELEASED_INNER, _MLP_RATIO = 3072, 4.0  # diffusers' converter's fixed FLUX.1 widths


def is_flux_transformer_file(keys) -> bool:
    """True when `keys` (a file's tensor names) are BFL's FLUX.1 transformer's."""
    return any(key.removeprefix(BFL_PREFIX) == FLUX_MARKER_KEY for key in keys)


def _released_layout(state: dict, inner: int) -> dict:
    """`state` with each single block's `linear1` rows (q, k, v of `inner` rows, the MLP input of 4 x `inner`)
    moved to diffusers' fixed offsets in a zero-padded tensor (nothing to do at FLUX.1's width)."""
    if inner == _RELEASED_INNER:
        return state
    sizes = (inner, inner, inner, int(inner * _MLP_RATIO))
    released = (_RELEASED_INNER,) * 3 + (int(_RELEASED_INNER * _MLP_RATIO),)
    out = dict(state)
    for key, value in state.items():
        if not (key.startswith("single_blocks.") and ".linear1." in key):
            continue
        if value.shape[0] != sum(sizes):
            raise ValueError(f"{key}: {value.shape[0]} rows, expected {sum(sizes)} for width {inner}")
        padded = value.new_zeros((sum(released), *value.shape[1:]))
        offset = 0
        for part, width in zip(value.split(sizes), released):
            padded[offset : offset + part.shape[0]] = part
            offset += width
        out[key] = padded
    return out


def convert_flux_transformer(state: dict, config: dict, what: str):
    """The `FluxTransformer2DModel` of BFL's FLUX.1 transformer tensors.

    Args:
        state: the file's tensors (BFL names, bare or under `model.diffusion_model.`); not modified.
        config: the transformer's `config.json` (a `base_config` folder's `transformer/`).
        what: how to name the file in messages.

    Returns:
        FluxTransformer2DModel in eval mode, its weights the file's (float32 as stored, or the file's dtype).

    Raises:
        ValueError: no FLUX.1 transformer tensors; a tensor missing (naming it) or left over after conversion;
            names or shapes of another architecture than `config` (see `single_file._check`).
    """
    # heavy: diffusers takes seconds to import; loaded when a model is built
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    state = {key.removeprefix(BFL_PREFIX): value for key, value in state.items() if isinstance(value, torch.Tensor)}
    if FLUX_MARKER_KEY not in state:
        raise ValueError(f"{what} holds no FLUX.1 transformer ({FLUX_MARKER_KEY} and the rest of BFL's names)")
    model = FluxTransformer2DModel.from_config(config)
    inner = model.config.num_attention_heads * model.config.attention_head_dim
    checkpoint = _released_layout(state, inner)
    try:
        converted = convert_flux_transformer_checkpoint_to_diffusers(checkpoint)
    except KeyError as error:
        raise ValueError(
            f"{what} is partial: the FLUX.1 transformer tensor {error.args[0]!r} is missing (BFL names): the file is "
            "truncated, pruned or of another architecture; get the complete file"
        ) from None
    except RuntimeError as error:  # a linear1 whose rows do not split as the config's widths
        raise ValueError(f"{what}: not a FLUX.1 transformer of this config's widths ({error})") from None
    if checkpoint:  # the converter pops what it converts
        raise ValueError(
            f"{what}: {len(checkpoint)} tensors no FLUX.1 transformer has, e.g. {sorted(checkpoint)[:5]}: another "
            "architecture (FLUX.1 Fill / Depth / Redux, FLUX.2?) or a file bundling other models"
        )
    if inner != _RELEASED_INNER:  # the padded linear1 parts cut back to the config's widths
        rows = {"attn.to_q": inner, "attn.to_k": inner, "attn.to_v": inner, "proj_mlp": int(inner * _MLP_RATIO)}
        for key, value in converted.items():
            module = key.split(".", 2)[-1].rsplit(".", 1)[0]  # single_transformer_blocks.<i>.<module>.<kind>
            if key.startswith("single_transformer_blocks.") and module in rows:
                converted[key] = value[: rows[module]]
    return _load_part(model, converted, what + " (FLUX.1 transformer)")


def load_flux_transformer_file(
    path, config: dict, *, family="flux", allow_pickle: bool = False, what: str = "checkpoint", fix: str = ""
):
    """The transformer of a BFL FLUX.1 file at `path` on `config`, after checking the file's keys say FLUX.1.

    Raises:
        FamilyMismatchError: the file is of another family than `family` (e.g. an SD checkpoint on a FLUX.1 base).
        ValueError: see `convert_flux_transformer`. CheckpointFormatError / PickleRefusedError: see
            `formats.load_state_dict`.
    """
    state = load_state_dict(path, allow_pickle=allow_pickle)
    evidence = checkpoint_evidence({key: tuple(value.shape) for key, value in state.items()})
    fix = fix or "pass the base model the checkpoint belongs to"
    check_family(get_family(family), None, evidence, f"the {what} {path}", fix, relation="is")
    return convert_flux_transformer(state, config, f"{what} {path}")


def flux_base_parts(path, config, family, index: dict, allow_pickle: bool) -> dict:
    """A FLUX.1 base from BFL's transformer file at `path`: the transformer converted on the `base_config` folder
    `config`'s `transformer/config.json`; the text encoders, tokenizers, VAE and scheduler config from that folder
    (BFL publishes the transformer alone). Returns `loading.base.base_parts`' parts."""
    parts = load_folder_parts(config, allow_pickle, family_parts(family, "text_encoders", "vae", "tokenizers"), family)
    parts["unet"] = load_flux_transformer_file(
        path,
        read_config(config / family.denoiser),
        family=family,
        allow_pickle=allow_pickle,
        what="base",
        fix=f"pass a --base-config folder of the checkpoint's family (this one, {config}, is {family.label})",
    )
    check_finite({"unet": parts["unet"]}, f"base {path}")
    parts.update(
        scheduler_config=read_scheduler_config(config),
        family=family,
        force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt"),
    )
    return parts
