"""What fine-tuning needs of a base pipeline folder, per family: its parts (`load_parts`), the caption's
conditioning, the denoiser's training forward, the LoRA target modules and the pipeline class that saves
the result. SD 1.x (`UNet2DConditionModel`, CLIP) and SD3 (`SD3Transformer2DModel`, two CLIP encoders
with projection, T5 optional) share everything else (`finextract.finetuning`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# the attention projections diffusers' `train_dreambooth_lora_sd3.py` adapts by default (image and text streams)
SD3_LORA_TARGET_MODULES = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)


@dataclass
class TrainingParts:
    """A base pipeline's parts in fp32 on the CPU.

    family: "sd1" (the UNet families' single CLIP encoder) or "sd3". denoiser: the UNet or the
    transformer. text_encoders / tokenizers: in the pipeline's order (SD3: the two CLIP encoders, then
    T5 when the folder has one).
    """

    family: str
    denoiser: object
    vae: object
    text_encoders: list
    tokenizers: list
    scheduler: object
    pipeline_class: type


def load_parts(base: str | Path) -> TrainingParts:
    """Load a diffusers SD 1.x or SD3 pipeline folder's parts in fp32 from safetensors only (never pickle).

    The scheduler is the training one: DDPM's on the UNet's noise schedule, or a fresh
    `FlowMatchEulerDiscreteScheduler` from the folder's config (its training sigmas).

    Raises:
        FileNotFoundError: no model_index.json, or weights that are not safetensors.
        ValueError: a pipeline class other than StableDiffusionPipeline / StableDiffusion3Pipeline.
    """
    import json

    import torch
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    base = Path(base)
    index = base / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(
            f"--base {base}: not a diffusers pipeline folder (no model_index.json); pass a Stable Diffusion 1.x "
            "or SD3 folder"
        )
    pipeline_class = json.loads(index.read_text()).get("_class_name", "StableDiffusionPipeline")
    if pipeline_class not in ("StableDiffusionPipeline", "StableDiffusion3Pipeline"):
        raise ValueError(
            f"--base {base}: a {pipeline_class} folder; finextract finetune trains StableDiffusionPipeline "
            "(SD 1.x) and StableDiffusion3Pipeline folders"
        )
    sd3 = pipeline_class == "StableDiffusion3Pipeline"
    fp32 = dict(use_safetensors=True, torch_dtype=torch.float32)
    try:
        vae = AutoencoderKL.from_pretrained(base, subfolder="vae", **fp32)
        if sd3:
            denoiser = SD3Transformer2DModel.from_pretrained(base, subfolder="transformer", **fp32)
            encoders = [
                CLIPTextModelWithProjection.from_pretrained(base, subfolder=name, dtype=torch.float32)
                for name in ("text_encoder", "text_encoder_2")
            ]
        else:
            denoiser = UNet2DConditionModel.from_pretrained(base, subfolder="unet", **fp32)
            encoders = [CLIPTextModel.from_pretrained(base, subfolder="text_encoder", dtype=torch.float32)]
    except OSError as error:
        raise FileNotFoundError(
            f"--base {base}: could not load safetensors weights ({error}); convert .bin/.ckpt weights to safetensors first"
        ) from None
    tokenizers = [
        CLIPTokenizer.from_pretrained(base, subfolder=name) for name in ("tokenizer", "tokenizer_2")[: 1 + sd3]
    ]
    if sd3 and (base / "text_encoder_3" / "config.json").is_file():  # T5 is optional in SD3 folders
        from transformers import T5EncoderModel, T5TokenizerFast

        encoders.append(T5EncoderModel.from_pretrained(base, subfolder="text_encoder_3", dtype=torch.float32))
        tokenizers.append(T5TokenizerFast.from_pretrained(base, subfolder="tokenizer_3"))
    if sd3:
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler")
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    else:
        scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    return TrainingParts(
        family="sd3" if sd3 else "sd1",
        denoiser=denoiser,
        vae=vae,
        text_encoders=encoders,
        tokenizers=tokenizers,
        scheduler=scheduler,
        pipeline_class=StableDiffusion3Pipeline if sd3 else StableDiffusionPipeline,
    )


def tokenize(tokenizer, captions):
    """Token ids (B, model_max_length), padded and truncated the way SD pipelines do."""
    return tokenizer(
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


# StableDiffusion3Pipeline's default max_sequence_length: the T5 token count, zeros without T5
SD3_T5_LENGTH = 256


def sd3_conditioning(text_encoders, tokenizers, captions, joint_dim: int, length: int = SD3_T5_LENGTH) -> dict:
    """SD3's conditioning of captions, as `StableDiffusion3Pipeline.encode_prompt` builds it (clip_skip
    None): each CLIP encoder's penultimate hidden states joined on the feature axis, zero-padded to
    `joint_dim`, followed by T5's `length` token states (zeros without T5, as the pipeline with
    `text_encoder_3=None`); the pooled projections joined.

    Args:
        text_encoders: the two `CLIPTextModelWithProjection`s, then optionally the `T5EncoderModel`.
        tokenizers: their tokenizers.
        captions: B strings.
        joint_dim: the transformer's `joint_attention_dim`.
        length: T5's token count (the pipeline's `max_sequence_length`, 256).

    Returns:
        {"encoder_hidden_states": (B, 77 + length, joint_dim), "pooled_projections": (B, sum of the
        projection widths)}, float32.
    """
    import torch

    states, pooled = [], []
    for encoder, tokenizer in zip(text_encoders[:2], tokenizers[:2]):
        output = encoder(tokenize(tokenizer, captions).to(encoder.device), output_hidden_states=True)
        states.append(output.hidden_states[-2])
        pooled.append(output[0])
    clip = torch.cat(states, dim=-1)
    clip = torch.nn.functional.pad(clip, (0, joint_dim - clip.shape[-1]))
    if len(text_encoders) > 2:
        t5, t5_tokenizer = text_encoders[2], tokenizers[2]
        ids = t5_tokenizer(
            list(captions), padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        )
        t5_states = t5(ids.input_ids.to(t5.device))[0]
    else:
        t5_states = clip.new_zeros((clip.shape[0], length, joint_dim))
    return {"encoder_hidden_states": torch.cat([clip, t5_states], dim=-2), "pooled_projections": torch.cat(pooled, -1)}


def caption_conditioning(parts: TrainingParts, captions) -> dict:
    """The conditioning of B captions as the family's pipeline encodes it: {"encoder_hidden_states":
    (B, L, D)} for SD 1.x (the last hidden states), `sd3_conditioning` for SD3."""
    if parts.family == "sd3":
        return sd3_conditioning(
            parts.text_encoders, parts.tokenizers, captions, parts.denoiser.config.joint_attention_dim
        )
    encoder = parts.text_encoders[0]
    return {"encoder_hidden_states": encoder(tokenize(parts.tokenizers[0], captions).to(encoder.device))[0]}


def predict(denoiser, x_t, timesteps, conditioning: dict):
    """The denoiser's training forward: (B, C, h, w) output for per-row `timesteps` (B,), with
    `conditioning` rows matching the batch (`caption_conditioning`)."""
    if "pooled_projections" in conditioning:
        return denoiser(
            hidden_states=x_t,
            timestep=timesteps,
            encoder_hidden_states=conditioning["encoder_hidden_states"],
            pooled_projections=conditioning["pooled_projections"],
            return_dict=False,
        )[0]
    return denoiser(x_t, timesteps, conditioning["encoder_hidden_states"]).sample


def vae_latents(vae, mean, std, noise):
    """Scaled latents of a posterior sample: (mean + std noise - shift_factor) x scaling_factor, as the
    pipelines scale them (shift_factor: SD3 / FLUX.1's VAE; none for SD 1.x's)."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (mean + std * noise - shift) * vae.config.scaling_factor
