"""The trained zoo's recipe (`TrainedZooRecipe`) and its training steps: the VAE, its latent scaling,
and the base UNet + text encoder (trained, then refined)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..finetuning import TINY_RECIPES, train_loop
from ..objectives import denoising_loss
from ..training_parts import tokenize
from .configs import TINY_VAE_CONFIG
from .models import tiny_components


@dataclass(frozen=True)
class TrainedZooRecipe:
    """Every number that defines the trained zoo (hashed into each stage's cache key)."""

    seed: int = 0
    resolution: int = 32
    crops_per_image: int = 300
    vae_steps: int = 1200
    vae_batch: int = 24
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    vae_finetune_share: float = 0.25  # fraction of each VAE batch drawn from the fine-tuning images
    # stage 2 of the VAE: continue it with the style drawings added to the fine-tuning images (SD's
    # autoencoder reconstructs flat drawings as well as photos; the photo-trained tiny VAE did not:
    # SSCD of the round trip 0.33-0.58 on the drawings against 0.71-0.88 on the photos)
    vae_adapt_steps: int = 300
    vae_adapt_lr: float = 1e-3
    # latents * scaling_factor should have unit variance, as SD's 0.18215 gives for its own VAE: the
    # noise schedule's signal-to-noise ratios assume it. "unit_variance" measures the factor on the
    # pretraining crops; a number fixes it.
    latent_scaling: str | float = "unit_variance"
    base_steps: int = 1500
    base_batch: int = 16
    base_lr: float = 1e-3
    empty_caption_rate: float = 0.1
    # the text encoder's vocabulary: SD 1.x's CLIP BPE (`finextract.zoo.tokenizers.write_tokenizer`)
    tokenizer: str = "clip-bpe-49408"
    # stage 2 of the base: continue from the stage-1 weights (fresh AdamW) with a cosine-decayed LR;
    # a better eps_base("") is what FineXtract extrapolates away from. 2,000 steps until the CLIP
    # tokenizer rebuild, where the shared 2-core machine ran 3x slower than before: 800 steps (the
    # LR anneals to zero either way)
    base_refine_steps: int = 800
    base_refine_lr: float = 5e-4
    # the fine-tunes: the tiny models' default recipe (`finextract.finetuning.TINY_RECIPES`), the same
    # for both scenarios
    dreambooth_steps: int = TINY_RECIPES["dreambooth"].steps
    dreambooth_lr: float = TINY_RECIPES["dreambooth"].lr
    lora_steps: int = TINY_RECIPES["lora"].steps
    lora_lr: float = TINY_RECIPES["lora"].lr
    lora_rank: int = TINY_RECIPES["lora"].rank
    lora_modules: str = TINY_RECIPES["lora"].lora_modules
    finetune_batch: int = TINY_RECIPES["lora"].batch_size

    def key(self, *fields: str) -> str:
        values = {name: getattr(self, name) for name in fields}
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


VAE_FIELDS = (
    "seed",
    "resolution",
    "crops_per_image",
    "vae_steps",
    "vae_batch",
    "vae_lr",
    "vae_kl_weight",
    "vae_finetune_share",
)
ADAPTED_VAE_FIELDS = VAE_FIELDS + ("vae_adapt_steps", "vae_adapt_lr")
BASE_FIELDS = ADAPTED_VAE_FIELDS + (
    "latent_scaling",
    "base_steps",
    "base_batch",
    "base_lr",
    "empty_caption_rate",
    "tokenizer",
)
REFINED_BASE_FIELDS = BASE_FIELDS + ("base_refine_steps", "base_refine_lr")
FINETUNE_FIELDS = {
    "dreambooth": ("dreambooth_steps", "dreambooth_lr", "finetune_batch"),
    "lora": ("lora_steps", "lora_lr", "lora_rank", "lora_modules", "finetune_batch"),
}


def to_tensor(pixels: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_vae(pool: np.ndarray, photos: np.ndarray, recipe: TrainedZooRecipe, progress: bool = True, *, vae=None):
    """Train the slim x2 VAE on `pool` crops plus (over-sampled, flipped) `photos`; L1 + MSE + tiny KL.

    From scratch (`recipe.vae_steps` at `recipe.vae_lr`) or, given `vae`, continuing it
    (`recipe.vae_adapt_steps` at `recipe.vae_adapt_lr`); either way a cosine decay to zero.
    """
    from diffusers import AutoencoderKL  # heavy: diffusers takes seconds; loaded when a pipeline is built

    if vae is None:
        torch.manual_seed(recipe.seed + 1)
        vae = AutoencoderKL(**TINY_VAE_CONFIG)
        steps, lr, seed, desc = recipe.vae_steps, recipe.vae_lr, recipe.seed + 11, "zoo: VAE"
    else:
        steps, lr, seed, desc = recipe.vae_adapt_steps, recipe.vae_adapt_lr, recipe.seed + 12, "zoo: VAE adaptation"
    vae.train()
    pool_t, photos_t = to_tensor(pool), to_tensor(np.concatenate([photos, photos[:, :, ::-1]]))
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    # cosine decay to zero: the last steps sharpen the reconstructions most
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + np.cos(np.pi * min(step, steps) / steps))
    )
    generator = torch.Generator().manual_seed(seed)
    n_photo = max(1, round(recipe.vae_batch * recipe.vae_finetune_share))
    bar = tqdm(range(steps), desc=desc, disable=not progress, dynamic_ncols=True)
    for step in bar:
        index = torch.randint(0, len(pool_t), (recipe.vae_batch - n_photo,), generator=generator)
        photo_index = torch.randint(0, len(photos_t), (n_photo,), generator=generator)
        x = torch.cat([pool_t[index], photos_t[photo_index]])
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator)
        x_hat = vae.decode(z).sample
        loss = (x_hat - x).abs().mean() + ((x_hat - x) ** 2).mean() + recipe.vae_kl_weight * dist.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return vae.eval()


def vae_round_trip(vae, pixels: np.ndarray) -> np.ndarray:
    """Encode (latent mean) then decode: uint8 (B, H, W, 3) -> uint8 (B, H, W, 3)."""
    with torch.no_grad():
        x_hat = vae.decode(vae.encode(to_tensor(pixels)).latent_dist.mean).sample
    return ((x_hat.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def unit_variance_scaling(vae, pixels: np.ndarray) -> float:
    """The `scaling_factor` that gives the VAE's latent means of `pixels` unit standard deviation,
    which is how SD 1.x chose 0.18215 for its own autoencoder (diffusers' `AutoencoderKL` docs).

    Args:
        vae: an fp32 diffusers `AutoencoderKL` on the CPU.
        pixels: uint8 (B, H, W, 3) images, H and W multiples of the VAE's downsampling.

    Returns:
        1 / std of all latent-mean values, rounded to 4 significant digits (float, > 0).
    """
    means, _ = latent_parameters(vae, pixels).chunk(2, dim=1)
    return float(f"{1.0 / means.std().item():.4g}")


def latent_parameters(vae, pixels: np.ndarray):
    """The VAE posterior of uint8 (B, H, W, 3) images: float32 (B, 2C, h, w), means then log-variances."""
    with torch.no_grad():
        return torch.cat([vae.encode(chunk).latent_dist.parameters for chunk in to_tensor(pixels).split(256)])


def _base_loss_fn(unet, text_encoder, tokenizer, scheduler, vae, pool, captions, recipe):
    """The pretraining loss on captioned crops (10% empty captions): a `loss_fn(generator)` for train_loop."""
    mean, logvar = latent_parameters(vae, pool).chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30, 20))
    ids = tokenize(tokenizer, captions + [""])  # last row: the empty caption
    empty = len(captions)
    ddpm = _ddpm(scheduler)
    scaling = vae.config.scaling_factor

    def loss_fn(generator):
        index = torch.randint(0, len(pool), (recipe.base_batch,), generator=generator)
        drop = torch.rand(recipe.base_batch, generator=generator) < recipe.empty_caption_rate
        rows = torch.where(drop, torch.full_like(index, empty), index)
        latents = (mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator)) * scaling
        return denoising_loss(unet, ddpm, latents, text_encoder(ids[rows])[0], generator)

    return loss_fn


def _train_jointly(loss_args: tuple, **options) -> None:
    """Train a base's UNet and text encoder together (CPU, fp32) on `_base_loss_fn(*loss_args)`;
    `options`: `train_loop`'s steps, lr, seed, desc, progress, schedule."""
    unet, text_encoder = loss_args[:2]
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    train_loop(parameters, _base_loss_fn(*loss_args), device="cpu", dtype="fp32", **options)


def train_base(
    vae, pool: np.ndarray, captions: list[str], recipe: TrainedZooRecipe, tokenizer_folder: Path, progress: bool = True
) -> dict:
    """Pretrain a tiny UNet + text encoder from scratch on captioned crops; return SD components."""
    components = tiny_components(recipe.seed, tokenizer_folder=tokenizer_folder)
    components["vae"] = vae
    unet, text_encoder = components["unet"], components["text_encoder"]
    unet.train()
    text_encoder.train()
    _train_jointly(
        (unet, text_encoder, components["tokenizer"], components["scheduler"], vae, pool, captions, recipe),
        steps=recipe.base_steps,
        lr=recipe.base_lr,
        seed=recipe.seed + 21,
        desc="zoo: base UNet + text encoder",
        progress=progress,
    )
    unet.eval()
    text_encoder.eval()
    return components


def refine_base(
    base_dir: Path, vae, pool: np.ndarray, captions: list[str], recipe: TrainedZooRecipe, progress: bool = True
) -> None:
    """Stage 2: continue training the saved base's UNet + text encoder (cosine LR to 0); save in place (fp16)."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(base_dir, use_safetensors=True, torch_dtype=torch.float32)
    unet, text_encoder = pipeline.unet.train(), pipeline.text_encoder.train()
    _train_jointly(
        (unet, text_encoder, pipeline.tokenizer, pipeline.scheduler, vae, pool, captions, recipe),
        steps=recipe.base_refine_steps,
        lr=recipe.base_refine_lr,
        seed=recipe.seed + 22,
        desc="zoo: base refinement",
        progress=progress,
        schedule="cosine",
    )
    for name, part in (("unet", unet), ("text_encoder", text_encoder)):
        part.eval().to(torch.float16).save_pretrained(base_dir / name, safe_serialization=True)


def _ddpm(scheduler):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler.config)
