"""FLUX.1's family hooks (`finextract.engine.denoisers`): the transformer's forward on the loop's unpacked
latents, the start latent's shape, and the distilled guidance setting.

`FluxPipeline` packs each 2 x 2 patch of the (B, 16, h, w) latents into one token of 64 values, gives every
image token its RoPE position ids (0, row, column) and every text token (0, 0, 0), passes the timestep as
sigma (the scheduler's `t / 1000`) and, for the guidance-distilled FLUX.1-dev, the distilled guidance value
as an input embedding. `flux_output` does the same inside the call, so the packing exports with the graph and
the step table's rows act on the unpacked latents, as for every family.

FLUX.1-dev's distilled guidance g is one more conditioning input ("guidance", (1, 1) per term): the same
value for both guidance terms of a rule, so Eq. 13 combines two velocities that were each predicted at the
distilled guidance g (see docs/models.md). It is a recorded setting: `pair.sources["distilled_guidance"]`,
default `FluxPipeline`'s own 3.5; FLUX.1-schnell's transformer has no guidance embedding and ignores it.
"""

from __future__ import annotations

import torch
from torch import nn

#: `FluxPipeline.__call__`'s default `guidance_scale`: the distilled guidance FLUX.1-dev samples with
FLUX_DEFAULT_DISTILLED_GUIDANCE = 3.5


def distilled_guidance(pair) -> float | None:
    """The distilled guidance value `pair` samples with: `pair.sources["distilled_guidance"]` when set, else
    `FLUX_DEFAULT_DISTILLED_GUIDANCE`; None for a transformer without the guidance embedding (FLUX.1-schnell)."""
    if not getattr(pair.base_unet.config, "guidance_embeds", False):
        return None
    value = pair.sources.get("distilled_guidance")
    return FLUX_DEFAULT_DISTILLED_GUIDANCE if value is None else float(value)


def record_distilled_guidance(pair, value: float | None) -> None:
    """Record the distilled guidance `pair` samples with in `pair.sources["distilled_guidance"]`: `value`, or the
    pipeline's default for a transformer with the guidance embedding (FLUX.1-dev); None otherwise.

    Raises:
        ValueError: `value` given for a model without the guidance embedding (FLUX.1-schnell, other families),
            or not a finite number.
    """
    embeds = pair.family.name == "flux" and bool(getattr(pair.base_unet.config, "guidance_embeds", False))
    if value is not None and not embeds:
        raise ValueError(
            f"distilled_guidance {value} (--distilled-guidance): the model ({pair.family.label}) has no distilled "
            "guidance embedding (only FLUX.1-dev's transformer has one); leave it out"
        )
    if value is not None and not torch.isfinite(torch.tensor(float(value))):
        raise ValueError(f"distilled_guidance {value} (--distilled-guidance): expected a finite number, e.g. 3.5")
    if embeds:
        pair.sources["distilled_guidance"] = FLUX_DEFAULT_DISTILLED_GUIDANCE if value is None else float(value)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 x w/2, 4C): each 2 x 2 patch one token (`FluxPipeline._pack_latents`)."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h/2 x w/2, 4C) -> (B, C, h, w), the inverse of `pack_latents` (`FluxPipeline._unpack_latents`)."""
    b, _, channels = tokens.shape
    patches = tokens.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, channels // 4, h, w)


def image_ids(rows: int, columns: int, device, dtype) -> torch.Tensor:
    """(rows x columns, 3) RoPE position ids of the packed image tokens: (0, row, column)
    (`FluxPipeline._prepare_latent_image_ids`)."""
    ids = torch.zeros(rows, columns, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(rows)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(columns)[None, :]
    return ids.reshape(rows * columns, 3).to(device=device, dtype=dtype)


def flux_output(transformer: nn.Module, sample: torch.Tensor, t: torch.Tensor, conditioning: dict) -> torch.Tensor:
    """One `FluxTransformer2DModel` forward on (B, 16, h, w) latents: the velocity v, (B, 16, h, w).

    As `FluxPipeline` calls it: packed latents, the timestep t / 1000 (t = sigma x 1000, the step table's
    float32 row) in the latents' dtype, T5 states (`encoder_hidden_states`, (B, L, 4096)), the pooled CLIP
    embedding, `guidance` ((B, 1): the distilled guidance; ignored without the guidance embedding), image and
    text RoPE ids.
    """
    b, _, h, w = sample.shape
    states = conditioning["encoder_hidden_states"]
    guidance = conditioning["guidance"].reshape(-1) if transformer.config.guidance_embeds else None
    output = transformer(
        hidden_states=pack_latents(sample),
        timestep=t.reshape(-1)[:1].expand(b).to(sample.dtype) / 1000,
        guidance=guidance,
        pooled_projections=conditioning["pooled_projections"],
        encoder_hidden_states=states,
        txt_ids=torch.zeros(states.shape[1], 3, device=states.device, dtype=states.dtype),
        img_ids=image_ids(h // 2, w // 2, sample.device, states.dtype),
        return_dict=False,
    )[0]
    return unpack_latents(output, h, w)


def flux_latent_shape(pair) -> tuple[int, int, int]:
    """(16, h, w) of one start latent at `FluxPipeline`'s default size: its `default_sample_size` (128) times
    the VAE factor is 1024 px, the FLUX.1 VAE's `sample_size`; the VAE's `sample_size` is read here, so the
    tiny zoo's 32 px VAE gives 16 x 16 latents. h and w are even (the 2 x 2 packing)."""
    vae = pair.vae.config
    factor = 2 ** (len(vae.block_out_channels) - 1)
    side = 2 * (int(vae.sample_size) // (factor * 2))
    return int(vae.latent_channels), side, side
