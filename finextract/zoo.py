"""Tiny Stable-Diffusion-format models, built offline and deterministically from a seed.

No weights can be downloaded where this project is tested, so it builds its own SD 1.x-shaped
models: a tiny UNet (16x16x4 latents), a slim x2 VAE (32x32 RGB), a tiny CLIP text encoder and a
CLIP tokenizer whose vocabulary is generated here (byte-level characters, no merges). They are
saved with `save_pretrained` and loaded back by the same code that loads real checkpoints.
"""
from __future__ import annotations

import json
from pathlib import Path

# SD 1.x scheduler: scaled-linear betas 0.00085..0.012 over 1000 training steps (diffusers' config
# of runwayml/stable-diffusion-v1-5, DDIM flavour).
SD1_SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}

TINY_UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
)

TINY_VAE_CONFIG = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    norm_num_groups=32,
)

TINY_TEXT_CONFIG = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    projection_dim=32,
)

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_characters() -> list[str]:
    """GPT-2's reversible byte -> unicode characters (the alphabet CLIP's BPE works on)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def write_tokenizer(folder: str | Path) -> Path:
    """Write a character-level CLIP tokenizer (vocab.json, merges.txt, configs) into `folder`.

    Every byte character appears alone and with CLIP's `</w>` end-of-word suffix; merges.txt holds
    only its version header, so words tokenize to characters. Returns the folder.
    """
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    characters = _byte_characters()
    tokens = characters + [c + "</w>" for c in characters] + [BOS, EOS]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=EOS)
    tokenizer.model_max_length = TINY_TEXT_CONFIG["max_position_embeddings"]
    tokenizer.save_pretrained(folder)
    return folder


def tiny_components(seed: int = 0, tokenizer_folder: str | Path | None = None) -> dict:
    """Random tiny SD components: `unet`, `vae`, `text_encoder`, `tokenizer`, `scheduler`.

    Deterministic for a given seed (weights are drawn on the CPU generator). The tokenizer is
    written to `tokenizer_folder` (a temporary folder when None) and loaded back.
    """
    import tempfile

    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if tokenizer_folder is None:
        tokenizer_folder = tempfile.mkdtemp(prefix="finextract-tokenizer-")
    write_tokenizer(tokenizer_folder)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    torch.manual_seed(seed + 2)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **TINY_TEXT_CONFIG,
    )
    text_encoder = CLIPTextModel(text_config)
    scheduler = DDIMScheduler.from_config(SD1_SCHEDULER_CONFIG)
    return dict(unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, scheduler=scheduler)


def save_pipeline(components: dict, folder: str | Path) -> Path:
    """Save components as a diffusers `StableDiffusionPipeline` folder (safetensors); return it."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipeline.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def build_base(folder: str | Path, seed: int = 0) -> Path:
    """Write a random tiny base pipeline folder that `StableDiffusionPipeline.from_pretrained` loads."""
    folder = Path(folder)
    return save_pipeline(tiny_components(seed, tokenizer_folder=folder / "tokenizer"), folder)
