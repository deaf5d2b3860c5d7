"""The family hooks of the denoiser: one forward of a UNet or a flow transformer, the latent shape, the
image's token count. Everything else (the loop, the step table, the backends, the CUDA kernel) is the same
for every family, so a family with another denoiser adds its entries here and nowhere else.

    output = denoiser_output(family, model, x, t, conditioning)   # (B, C, h, w) in, (B, C, h, w) out
    shape = latent_shape(pair)                                     # (C, h, w) of one start latent

The loop's latents are always the unpacked (B, C, h, w) layout of the VAE; a denoiser that reads
another layout (FLUX's 2 x 2 packed tokens, its RoPE position ids) converts inside its call, so the
packing exports with the graph and the step table's rows act on the same tensor as the pipelines'.

Hooks per family name (`finextract.engine.families`):
- `DENOISER_CALLS`: `(model, sample, t, conditioning) -> output`, model inputs from the conditioning
  dict (keys `Family.conditioning_keys`); the default is the UNet's.
- `LATENT_SHAPES`: `(pair) -> (C, h, w)`; the default reads the denoiser's `sample_size`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .families import ADDED_CONDITIONING_KEYS, get_family
from .flux import flux_latent_shape, flux_output

__all__ = ["DENOISER_CALLS", "LATENT_SHAPES", "denoiser_output", "image_tokens", "latent_shape"]


def _unet_output(unet: nn.Module, sample: torch.Tensor, t: torch.Tensor, conditioning: dict) -> torch.Tensor:
    """One diffusers UNet forward: its output tensor (noise, v or x0 prediction).

    `conditioning` holds `encoder_hidden_states` and, for SDXL, the added conditioning
    (`text_embeds`, `time_ids`), which diffusers' UNet takes as `added_cond_kwargs`.
    """
    added = {key: conditioning[key] for key in ADDED_CONDITIONING_KEYS if key in conditioning}
    return unet(
        sample,
        t,
        encoder_hidden_states=conditioning["encoder_hidden_states"],
        added_cond_kwargs=added or None,
        return_dict=False,
    )[0]


def _sd3_output(transformer: nn.Module, sample: torch.Tensor, t: torch.Tensor, conditioning: dict) -> torch.Tensor:
    """One `SD3Transformer2DModel` forward on (B, C, h, w) latents: the velocity v, (B, C, h, w).

    As `StableDiffusion3Pipeline` calls it: the scheduler's float32 timestep (sigma x 1000) expanded to the
    batch, the joint text tokens (`encoder_hidden_states`) and the pooled projection.
    """
    return transformer(
        hidden_states=sample,
        timestep=t.reshape(-1)[:1].expand(sample.shape[0]),
        encoder_hidden_states=conditioning["encoder_hidden_states"],
        pooled_projections=conditioning["pooled_projections"],
        return_dict=False,
    )[0]


#: family name -> the denoiser's forward on unpacked latents; families not listed run `_unet_output`.
DENOISER_CALLS: dict[str, Callable[[nn.Module, torch.Tensor, torch.Tensor, dict], torch.Tensor]] = {
    "sd3": _sd3_output,
    "flux": flux_output,
}


def denoiser_output(family, model: nn.Module, sample: torch.Tensor, t: torch.Tensor, conditioning: dict):
    """The family's denoiser `model` on `sample` (B, C, h, w) at timestep `t` ((1,) float32, a step-table
    row), with `conditioning` (key -> (B, ...) tensors): its output (B, C, h, w) in the model's
    parameterisation (epsilon / v / x0 for UNets, the velocity for flow transformers).
    """
    return DENOISER_CALLS.get(get_family(family).name, _unet_output)(model, sample, t, conditioning)


def _sample_size_shape(pair) -> tuple[int, int, int]:
    """(C, h, w) from the denoiser's config: `sample_size` (an int or (h, w)) in latent pixels, and the UNet's
    `in_channels` or, for a transformer, the VAE's `latent_channels` (a transformer's input may be patches)."""
    config = pair.base_unet.config
    size = config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    channels = config.in_channels if pair.family.denoiser == "unet" else pair.vae.config.latent_channels
    return int(channels), int(h), int(w)


#: family name -> (pair) -> (C, h, w) of one latent, the pipeline's default size; default `_sample_size_shape`.
LATENT_SHAPES: dict[str, Callable] = {"flux": flux_latent_shape}


def latent_shape(pair) -> tuple[int, int, int]:
    """(C, h, w) of one start latent of `pair` (unpacked, the VAE's layout), at the family pipeline's default
    image size: SD 1.x (4, 64, 64), SD3 (16, 128, 128), the tiny zoo's (4 or 16, 16, 16).
    """
    return LATENT_SHAPES.get(pair.family.name, _sample_size_shape)(pair)


def image_tokens(pair) -> int:
    """The transformer's image sequence length at `latent_shape`: (h / 2) x (w / 2), SD3's patch 2 and FLUX's
    2 x 2 packing alike (the dynamic shift's input, `finextract.engine.solvers.calculate_shift`)."""
    _, h, w = latent_shape(pair)
    patch = getattr(pair.base_unet.config, "patch_size", 1) if pair.family.name == "sd3" else 2
    return (h // patch) * (w // patch)
