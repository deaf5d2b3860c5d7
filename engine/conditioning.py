"""The conditioning a guidance rule's UNet terms read, encoded once per run, as each family's pipeline does.

Each term of a rule evaluates one UNet on one caption ("prompt" = the caption c, "empty" = "").
`eps_base` uses the pretrained text encoders and tokenizers, `eps_ft` the fine-tune's own (the same
objects when the checkpoint ships none). Per family (`finextract.engine.families`), mirroring the
`encode_prompt` of its diffusers pipeline:

- SD 1.x, SD 2.x (`StableDiffusionPipeline`) and AltDiffusion (`AltDiffusionPipeline`): tokens padded
  to the tokenizer's maximum length and truncated beyond it, the attention mask passed when the text
  encoder's config sets `use_attention_mask` (AltDiffusion's XLM-R does), the encoder's first output
  (CLIP: the last hidden state; AltDiffusion: its projected states) -> `encoder_hidden_states`.
- SDXL (`StableDiffusionXLPipeline`): each of the two encoders' penultimate hidden states,
  concatenated on the feature axis -> `encoder_hidden_states`; the second encoder's pooled projection
  -> `text_embeds`; `time_ids` = (original size, crop top-left, target size) = (H, W, 0, 0, H, W) with
  H, W the pipeline's default image size (the UNet's sample size times the VAE's scale factor). With
  the pipeline's `force_zeros_for_empty_prompt` (SDXL's default) the empty caption is zeros, as the
  pipeline makes its unconditional half.
"""

from __future__ import annotations

import logging

import torch

from .denoisers import latent_shape
from .families import get_family
from .flux import distilled_guidance

logger = logging.getLogger(__name__)


def conditioning_keys(family) -> tuple[str, ...]:
    """The denoiser inputs one term's conditioning holds, in order, for `family` (a name or `Family`):
    ("encoder_hidden_states",), for SDXL ("encoder_hidden_states", "text_embeds", "time_ids"), for the
    flow families ("encoder_hidden_states", "pooled_projections")."""
    return get_family(family).conditioning_keys


def _tokens(tokenizer, text: str, *, warn: bool):
    limit = tokenizer.model_max_length
    length = len(tokenizer(text, truncation=False).input_ids)
    if warn and length > limit:
        logger.warning(
            "the caption has %d tokens; the text encoder reads only the first %d (the rest is cut, as in "
            "diffusers' pipelines): %r",
            length,
            limit,
            text,
        )
    return tokenizer(text, padding="max_length", max_length=limit, truncation=True, return_tensors="pt")


def _device(module) -> torch.device:
    return next(module.parameters()).device


def _encode_single(encoder, tokenizer, text: str) -> dict[str, torch.Tensor]:
    tokens = _tokens(tokenizer, text, warn=True)
    device = _device(encoder)
    mask = None
    if getattr(encoder.config, "use_attention_mask", False):
        mask = tokens.attention_mask.to(device)
    return {"encoder_hidden_states": encoder(tokens.input_ids.to(device), attention_mask=mask)[0]}


def image_size(pair) -> tuple[int, int]:
    """(H, W) in pixels of the pair's images: the latent size (`denoisers.latent_shape`) times the VAE's scale
    factor (`2 ** (len(vae.config.block_out_channels) - 1)`), the default size of diffusers' pipelines."""
    _, h, w = latent_shape(pair)
    factor = 2 ** (len(pair.vae.config.block_out_channels) - 1)
    return int(h) * factor, int(w) * factor


def sdxl_time_ids(pair) -> torch.Tensor:
    """SDXL's added time ids (1, 6) float32: original size, crop top-left (0, 0), target size, as
    `StableDiffusionXLPipeline._get_add_time_ids` builds them at its default size.

    Raises:
        ValueError: the UNet's added embedding does not take 6 time ids plus the pooled embedding
            (the message names both widths, as the pipeline checks).
    """
    h, w = image_size(pair)
    time_ids = (h, w, 0, 0, h, w)
    config = pair.base_unet.config
    pooled = pair.base_text_encoder_2.config.projection_dim
    expected = pair.base_unet.add_embedding.linear_1.in_features
    passed = config.addition_time_embed_dim * len(time_ids) + pooled
    if expected != passed:
        raise ValueError(
            f"the SDXL UNet's added embedding takes {expected} values, but 6 time ids x {config.addition_time_embed_dim} "
            f"+ the pooled embedding ({pooled}) make {passed}: the UNet and text_encoder_2 configs do not fit together"
        )
    return torch.tensor([time_ids], dtype=torch.float32)


def _encode_sdxl(pair, model: str, text: str, empty: bool) -> dict[str, torch.Tensor]:
    states, pooled = [], None
    for index, (encoder, tokenizer) in enumerate(pair.text_encoders_for(model)):
        tokens = _tokens(tokenizer, text, warn=index == 0)
        output = encoder(tokens.input_ids.to(_device(encoder)), output_hidden_states=True)
        if pooled is None and output[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds first
            pooled = output[0]
        states.append(output.hidden_states[-2])
    hidden = torch.cat([s.to(states[-1].device) for s in states], dim=-1)
    if pooled is None:
        raise ValueError(
            "SDXL: no text encoder gave a pooled embedding; text_encoder_2 must be CLIPTextModelWithProjection"
        )
    if empty and pair.force_zeros_for_empty_prompt:
        hidden, pooled = torch.zeros_like(hidden), torch.zeros_like(pooled)
    return {"encoder_hidden_states": hidden, "text_embeds": pooled, "time_ids": sdxl_time_ids(pair)}


def _encode_sd3(pair, model: str, text: str, empty: bool) -> dict[str, torch.Tensor]:
    (clip_l, tokenizer_l), (clip_g, tokenizer_g), (t5, tokenizer_t5) = pair.text_encoders_for(model)
    states, pooled = [], []
    for index, (encoder, tokenizer) in enumerate(((clip_l, tokenizer_l), (clip_g, tokenizer_g))):
        tokens = _tokens(tokenizer, text, warn=index == 0)
        output = encoder(tokens.input_ids.to(_device(encoder)), output_hidden_states=True)
        states.append(output.hidden_states[-2])
        pooled.append(output[0])  # CLIPTextModelWithProjection: text_embeds
    length = pair.family.max_sequence_length
    if t5 is None:
        width = pair.base_unet.config.joint_attention_dim
        t5_states = torch.zeros((1, length, width), dtype=states[0].dtype, device=states[0].device)
    else:
        ids = tokenizer_t5(text, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        t5_states = t5(ids.input_ids.to(_device(t5)))[0].to(states[0].device)
    clip = torch.cat(states, dim=-1)
    clip = torch.nn.functional.pad(clip, (0, t5_states.shape[-1] - clip.shape[-1]))
    hidden = torch.cat([clip, t5_states.to(clip.dtype)], dim=-2)
    return {"encoder_hidden_states": hidden, "pooled_projections": torch.cat(pooled, dim=-1)}


def _encode_flux(pair, model: str, text: str, empty: bool) -> dict[str, torch.Tensor]:
    """As `FluxPipeline.encode_prompt`: CLIP's pooled output, T5's last states at `max_sequence_length` (512)
    tokens; and the run's distilled guidance (`flux.distilled_guidance`, (1, 1); 0 where the transformer has
    no guidance embedding and ignores it), the same for every term."""
    (clip, tokenizer), (t5, tokenizer_t5) = pair.text_encoders_for(model)
    pooled = clip(_tokens(tokenizer, text, warn=True).input_ids.to(_device(clip)), output_hidden_states=False)
    length = pair.family.max_sequence_length
    ids = tokenizer_t5(text, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    states = t5(ids.input_ids.to(_device(t5)), output_hidden_states=False)[0]
    guidance = torch.full((1, 1), distilled_guidance(pair) or 0.0, device=states.device)
    return {"encoder_hidden_states": states, "pooled_projections": pooled.pooler_output, "guidance": guidance}


#: family name -> `(pair, model, text, empty) -> conditioning dict`; other families: `_encode_single`.
ENCODERS = {"sdxl": _encode_sdxl, "sd3": _encode_sd3, "flux": _encode_flux}


def encode_text(pair, model: str, text: str, *, empty: bool = False) -> dict[str, torch.Tensor]:
    """One side's conditioning for one text, as the family's pipeline encodes it.

    Args:
        pair: a `ModelPair`.
        model: "base" or "finetuned" (whose text encoders and tokenizers to use).
        text: the text.
        empty: the term's caption is the empty one (SDXL with `force_zeros_for_empty_prompt`: zeros).

    Returns:
        key -> (1, ...) tensor, keys of `conditioning_keys(pair.family)`, on the encoder's device in
        its dtype: `encoder_hidden_states` (1, L, D) with L the tokenizer's maximum length and D the
        UNet's cross_attention_dim; SDXL also `text_embeds` (1, P) and `time_ids` (1, 6); SD3
        `encoder_hidden_states` (1, 77 + 256, joint_attention_dim) and `pooled_projections` (1, P).
    """
    if pair.family.name in ENCODERS:
        return ENCODERS[pair.family.name](pair, model, text, empty)
    ((encoder, tokenizer),) = pair.text_encoders_for(model)
    return _encode_single(encoder, tokenizer, text)


@torch.inference_mode()
def encode_conditioning(pair, rule, caption: str) -> tuple[torch.Tensor, ...]:
    """The conditioning tensors of every term of `rule`, flat, in term order and `conditioning_keys` order.

    Args:
        pair: a `ModelPair` (on its run's device and precision).
        rule: a `finextract.engine.guidance.GuidanceRule`.
        caption: the training caption c ("prompt" terms); "empty" terms use "".

    Returns:
        Per term, one (1, ...) tensor per key of `conditioning_keys(pair.family)` (see `encode_text`),
        on the UNet's device in the UNet's dtype. Terms that share a (model, caption) share the encoding.
    """
    encoded: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    device, dtype = pair.device, pair.dtype
    keys = conditioning_keys(pair.family)
    for term in rule.terms:
        if term.key not in encoded:
            empty = term.caption == "empty"
            tensors = encode_text(pair, term.model, "" if empty else caption, empty=empty)
            encoded[term.key] = {key: tensors[key].to(device=device, dtype=dtype) for key in keys}
    return tuple(encoded[term.key][key] for term in rule.terms for key in keys)
