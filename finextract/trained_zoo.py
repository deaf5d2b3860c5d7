"""Trained tiny models: a "pretrained" base and, for two scenarios, a DreamBooth and a LoRA fine-tune of it.

`build_trained_zoo(out)` is the deterministic recipe behind `finextract zoo build --trained`; its
output is committed under `finextract/zoo_weights/` (fp16 safetensors) so that tests and the demo
never train. Every image comes from files that ship inside installed packages or is drawn here (no
download): scikit-image's bundled sample images, scikit-learn's `load_sample_images`, matplotlib's
sample data, and `finextract.style_images`.

The paper's two scenarios (`SCENARIOS`; each a folder with train/, caption.txt, dreambooth/, lora/):
- object-driven, at the zoo's top level: five photographs of different objects, "a photo of sks";
- style-driven, in style/: ten drawings of different subjects in one style, "an illustration in sks style".

Steps (32 px RGB images, 16x16x4 latents, the tiny configs of `finextract.zoo`, SD 1.x's CLIP tokenizer):
1. VAE: a slim x2 `AutoencoderKL` trained to reconstruct random crops of *every* image, the five
   fine-tuning photographs included (their whole views are over-sampled), then adapted for 300 steps
   with the ten drawings added (stage 2). The VAE stands in for SD's general-purpose autoencoder,
   which reconstructs nearly any image; it is not what is audited, so training it on every image is
   fair: without it, a 32 px tiny VAE blurs images so much that SSCD cannot see a copy of anything.
   Its `scaling_factor` is then measured so that the scaled latents of the pretraining crops have
   unit variance, as SD's 0.18215 does for SD's VAE. Keeping SD's number (latent std 0.25) made every
   noise level 16x noisier than the schedule intends: the fine-tunes then produced mostly
   noise-textured images that SSCD finds all alike, one giant clique swallowed the copies, and
   FineXtract only tied Direct on A-ESR0.6 (N = 250 demo: AS 0.378 / A-ESR0.6 0.20 against Direct
   0.352 / 0.20). With unit-variance latents: 0.536 / 0.40 against 0.366 / 0.00.
2. Base ("pretrained") UNet + CLIP text encoder, trained jointly from scratch with the noise-prediction
   MSE on random crops and flips of the *other* images, captioned from the image names (10% empty
   captions, as SD 1.x dropped text, so that eps_base(x_t, "") is meaningful): 1,500 steps at a
   constant LR, then 800 more from those weights with a cosine-decayed LR (stage 2, "refinement").
   The refinement mattered to the demo (measured before the latent scaling above): with the
   1,500-step base, FineXtract's extrapolation away from a poor eps_base("") over-saturated and it did
   not beat CFG (N = 50 probe AS 0.437 vs 0.446); with a refined base, the same DreamBooth recipe
   gave 0.379 vs CFG 0.289 and Direct 0.282.
3. Per scenario, a DreamBooth fine-tune (full UNet) and a LoRA fine-tune through `finextract.finetuning`
   with the tiny models' default recipes (`finextract.finetuning.TINY_RECIPES`); the DreamBooth is saved
   as a bare `unet/` folder (the VAE, text encoder and tokenizer are the base's). The LoRA is LoCon
   (every Linear and Conv2d of the UNet's blocks) at rank 8, the share of the tiny UNet's 32 / 64
   channels that SD's rank 64 is of its 320 / 1280; the old rank-8 LoRA on the attention projections
   only memorised little (no generation above SSCD 0.45, FineXtract behind CFG and Direct). Its lr,
   3e-3 for 1,500 steps, was kept because its training loss fell to 0.095, below the DreamBooth's
   0.115 (the old LoRA: 0.190); a 1e-3 run was stopped unfinished, so the lr is not yet swept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .finetuning import TINY_RECIPES
from .images import read_image

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scenario:
    """One of the paper's two fine-tuning scenarios (the column groups of its Table 1)."""

    name: str
    folder: str  # inside the zoo: "." (the object scenario keeps the zoo's top level) or "style"
    caption: str
    description: str


SCENARIOS = {
    "object": Scenario(
        "object", ".", "a photo of sks", "object-driven: 5 photographs of different objects (scikit-image samples)"
    ),
    "style": Scenario(
        "style",
        "style",
        "an illustration in sks style",
        "style-driven: 10 drawings of different subjects in one flat, outlined style (finextract.style_images)",
    ),
}
CAPTION = SCENARIOS["object"].caption


def scenario_folder(zoo: str | Path, scenario: str) -> Path:
    """The folder of a scenario in a trained zoo: dreambooth/ (bare unet/), lora/, train/, caption.txt.

    Raises:
        ValueError: an unknown scenario.
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario {scenario!r}: expected one of {', '.join(SCENARIOS)}")
    return (Path(zoo) / SCENARIOS[scenario].folder).resolve() if SCENARIOS[scenario].folder != "." else Path(zoo)


# The five held-apart fine-tuning photographs (scikit-image sample files), never seen by the base UNet.
FINETUNE_IMAGES = ("chelsea.png", "coffee.png", "rocket.jpg", "astronaut.png", "motorcycle_left.png")
# Pretraining images: (package, file, caption). motorcycle_right.png is left out: it is nearly the
# same photograph as a fine-tuning one.
PRETRAIN_IMAGES = (
    ("sklearn", "china.jpg", "a photo of a temple"),
    ("sklearn", "flower.jpg", "a photo of a flower"),
    ("matplotlib", "grace_hopper.jpg", "a portrait of a woman"),
    ("skimage", "hubble_deep_field.jpg", "a photo of galaxies"),
    ("skimage", "retina.jpg", "a photo of a retina"),
    ("skimage", "ihc.png", "a microscopy image of tissue"),
    ("skimage", "camera.png", "a photo of a cameraman"),
    ("skimage", "moon.png", "a photo of the moon"),
    ("skimage", "coins.png", "a photo of coins"),
    ("skimage", "horse.png", "a silhouette of a horse"),
    ("skimage", "brick.png", "a photo of a brick wall"),
    ("skimage", "gravel.png", "a photo of gravel"),
    ("skimage", "grass.png", "a photo of grass"),
    ("skimage", "text.png", "a photo of text"),
    ("skimage", "page.png", "a scan of a page"),
    ("skimage", "logo.png", "a logo"),
    ("skimage", "cell.png", "a microscopy image of a cell"),
    ("skimage", "microaneurysms.png", "a photo of blood vessels"),
    ("skimage", "color.png", "a color wheel"),
    ("skimage", "clock_motion.png", "a photo of a clock"),
)


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
    # the text encoder's vocabulary: SD 1.x's CLIP BPE (`finextract.zoo.write_tokenizer`)
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


def _package_file(package: str, name: str) -> Path:
    if package == "skimage":
        import skimage.data

        path = Path(skimage.data.__file__).parent / name
    elif package == "sklearn":
        import sklearn.datasets

        path = Path(sklearn.datasets.__file__).parent / "images" / name
    elif package == "matplotlib":
        import matplotlib

        path = Path(matplotlib.get_data_path()) / "sample_data" / name
    else:
        raise ValueError(f"unknown image package {package!r}")
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall {package} (pip install 'finextract[zoo]')")
    return path


def finetune_photos(resolution: int = 32) -> np.ndarray:
    """The five fine-tuning photographs, centre-cropped and resized: uint8 (5, res, res, 3)."""
    from .finetuning import load_images

    return load_images([_package_file("skimage", name) for name in FINETUNE_IMAGES], resolution)


def finetune_set(scenario: str, resolution: int = 32) -> tuple[list[str], np.ndarray]:
    """A scenario's training images as the fine-tune sees them (`center_crop_resize`).

    Args:
        scenario: "object" (the five photographs) or "style" (`finextract.style_images`).
        resolution: side in pixels.

    Returns:
        (file stems, uint8 (n, resolution, resolution, 3)).

    Raises:
        ValueError: an unknown scenario.
    """
    from .images import center_crop_resize
    from .style_images import style_images

    if scenario == "object":
        return [Path(name).stem for name in FINETUNE_IMAGES], finetune_photos(resolution)
    if scenario == "style":
        drawings = style_images()
        return list(drawings), np.stack([center_crop_resize(image, resolution) for image in drawings.values()])
    raise ValueError(f"scenario {scenario!r}: expected one of {', '.join(SCENARIOS)}")


def random_crops(image: np.ndarray, count: int, resolution: int, rng: np.random.Generator) -> np.ndarray:
    """`count` random square crops (side 30-100% of the short edge), resized, half of them flipped."""
    from PIL import Image

    height, width = image.shape[:2]
    pil = Image.fromarray(image)
    out = np.empty((count, resolution, resolution, 3), np.uint8)
    for i in range(count):
        side = int(min(height, width) * rng.uniform(0.3, 1.0))
        top, left = rng.integers(0, height - side + 1), rng.integers(0, width - side + 1)
        crop = pil.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
        crop = np.asarray(crop)
        out[i] = crop[:, ::-1] if rng.random() < 0.5 else crop
    return out


def _to_tensor(pixels: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_vae(pool: np.ndarray, photos: np.ndarray, recipe: TrainedZooRecipe, progress: bool = True, *, vae=None):
    """Train the slim x2 VAE on `pool` crops plus (over-sampled, flipped) `photos`; L1 + MSE + tiny KL.

    From scratch (`recipe.vae_steps` at `recipe.vae_lr`) or, given `vae`, continuing it
    (`recipe.vae_adapt_steps` at `recipe.vae_adapt_lr`); either way a cosine decay to zero.
    """
    import torch
    from diffusers import AutoencoderKL
    from tqdm.auto import tqdm

    from .zoo import TINY_VAE_CONFIG

    if vae is None:
        torch.manual_seed(recipe.seed + 1)
        vae = AutoencoderKL(**TINY_VAE_CONFIG)
        steps, lr, seed, desc = recipe.vae_steps, recipe.vae_lr, recipe.seed + 11, "zoo: VAE"
    else:
        steps, lr, seed, desc = recipe.vae_adapt_steps, recipe.vae_adapt_lr, recipe.seed + 12, "zoo: VAE adaptation"
    vae.train()
    pool_t, photos_t = _to_tensor(pool), _to_tensor(np.concatenate([photos, photos[:, :, ::-1]]))
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
    import torch

    with torch.no_grad():
        x_hat = vae.decode(vae.encode(_to_tensor(pixels)).latent_dist.mean).sample
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
    means, _ = _latent_parameters(vae, pixels).chunk(2, dim=1)
    return float(f"{1.0 / means.std().item():.4g}")


def _latent_parameters(vae, pixels: np.ndarray):
    """The VAE posterior of uint8 (B, H, W, 3) images: float32 (B, 2C, h, w), means then log-variances."""
    import torch

    with torch.no_grad():
        return torch.cat([vae.encode(chunk).latent_dist.parameters for chunk in _to_tensor(pixels).split(256)])


def _base_loss_fn(unet, text_encoder, tokenizer, scheduler, vae, pool, captions, recipe):
    """The pretraining loss on captioned crops (10% empty captions): a `loss_fn(generator)` for train_loop."""
    import torch

    from .finetuning import denoising_loss, tokenize

    mean, logvar = _latent_parameters(vae, pool).chunk(2, dim=1)
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


def train_base(
    vae, pool: np.ndarray, captions: list[str], recipe: TrainedZooRecipe, tokenizer_folder: Path, progress: bool = True
) -> dict:
    """Pretrain a tiny UNet + text encoder from scratch on captioned crops; return SD components."""
    from .finetuning import train_loop
    from .zoo import tiny_components

    components = tiny_components(recipe.seed, tokenizer_folder=tokenizer_folder)
    components["vae"] = vae
    unet, text_encoder = components["unet"], components["text_encoder"]
    unet.train()
    text_encoder.train()
    loss_fn = _base_loss_fn(
        unet, text_encoder, components["tokenizer"], components["scheduler"], vae, pool, captions, recipe
    )
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    train_loop(
        parameters,
        loss_fn,
        steps=recipe.base_steps,
        lr=recipe.base_lr,
        device="cpu",
        dtype="fp32",
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
    import torch
    from diffusers import StableDiffusionPipeline

    from .finetuning import train_loop

    pipeline = StableDiffusionPipeline.from_pretrained(base_dir, use_safetensors=True, torch_dtype=torch.float32)
    unet, text_encoder = pipeline.unet.train(), pipeline.text_encoder.train()
    loss_fn = _base_loss_fn(unet, text_encoder, pipeline.tokenizer, pipeline.scheduler, vae, pool, captions, recipe)
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    train_loop(
        parameters,
        loss_fn,
        steps=recipe.base_refine_steps,
        lr=recipe.base_refine_lr,
        device="cpu",
        dtype="fp32",
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


def _save_fp16_pipeline(components: dict, folder: Path) -> Path:
    import copy

    import torch

    from .zoo import save_pipeline

    half = {
        name: copy.deepcopy(part).to(torch.float16) if isinstance(part, torch.nn.Module) else part
        for name, part in components.items()
    }
    return save_pipeline(half, folder)


def build_base_stage(out: Path, recipe: TrainedZooRecipe, *, cache=None, progress: bool = True):
    """Steps 1 and 2 of the build: the VAE and the base pipeline, written to `out/base` (fp16).

    Returns:
        timings: stage name -> {"seconds": training time, "reused": taken from `cache`}.
    """
    import torch
    from diffusers import AutoencoderKL

    rng = np.random.default_rng(recipe.seed)
    photos = finetune_set("object", recipe.resolution)[1]
    pretrain = [(read_image(_package_file(pkg, name)), caption) for pkg, name, caption in PRETRAIN_IMAGES]
    pretrain_crops = [random_crops(image, recipe.crops_per_image, recipe.resolution, rng) for image, _ in pretrain]
    captions = [caption for (_, caption), crops in zip(pretrain, pretrain_crops) for _ in range(len(crops))]
    base_pool = np.concatenate(pretrain_crops)
    photo_crops = np.concatenate([random_crops(p, recipe.crops_per_image // 2, recipe.resolution, rng) for p in photos])
    timings: dict[str, dict] = {}

    # 1. VAE (cached by its recipe fields)
    t = time.perf_counter()
    vae_dir = Path(cache) / f"vae-{recipe.key(*VAE_FIELDS)}" if cache else None
    if vae_dir and (vae_dir / "config.json").is_file():
        vae = AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True, torch_dtype=torch.float32).eval()
        logger.info("reusing the VAE in %s", vae_dir)
        timings["vae"] = _reused(vae_dir)
    else:
        vae = train_vae(np.concatenate([base_pool, photo_crops]), photos, recipe, progress)
        timings["vae"] = _built(vae_dir, t, lambda: vae.save_pretrained(vae_dir, safe_serialization=True))
    if recipe.vae_adapt_steps:
        drawings = finetune_set("style", recipe.resolution)[1]
        drawing_crops = np.concatenate(
            [random_crops(d, recipe.crops_per_image // 2, recipe.resolution, rng) for d in drawings]
        )
        adapted_dir = Path(cache) / f"vae-adapted-{recipe.key(*ADAPTED_VAE_FIELDS)}" if cache else None
        t = time.perf_counter()
        if adapted_dir and (adapted_dir / "config.json").is_file():
            vae = AutoencoderKL.from_pretrained(adapted_dir, use_safetensors=True, torch_dtype=torch.float32).eval()
            logger.info("reusing the adapted VAE in %s", adapted_dir)
            timings["vae_adaptation"] = _reused(adapted_dir)
        else:
            pool = np.concatenate([base_pool, photo_crops, drawing_crops])
            vae = train_vae(pool, np.concatenate([photos, drawings]), recipe, progress, vae=vae)
            timings["vae_adaptation"] = _built(
                adapted_dir, t, lambda: vae.save_pretrained(adapted_dir, safe_serialization=True)
            )
    # evaluate the VAE as it will be used: fp16 weights, fp32 compute
    vae = vae.to(torch.float16).to(torch.float32)
    scaling = (
        unit_variance_scaling(vae, base_pool)
        if recipe.latent_scaling == "unit_variance"
        else float(recipe.latent_scaling)
    )
    vae.register_to_config(scaling_factor=scaling)

    # 2. Base UNet + text encoder (cached by the VAE + base fields)
    t = time.perf_counter()
    base_dir = out / "base"
    base_cache = Path(cache) / f"base-{recipe.key(*BASE_FIELDS)}" if cache else None
    if base_dir.exists():
        shutil.rmtree(base_dir)
    if base_cache and (base_cache / "model_index.json").is_file():
        shutil.copytree(base_cache, base_dir, ignore=shutil.ignore_patterns(BUILD_SECONDS))
        logger.info("reusing the base in %s", base_cache)
        timings["base"] = _reused(base_cache)
    else:
        components = train_base(vae, base_pool, captions, recipe, base_dir / "tokenizer", progress)
        _save_fp16_pipeline(components, base_dir)
        timings["base"] = _built(base_cache, t, lambda: shutil.copytree(base_dir, base_cache, dirs_exist_ok=True))
    if recipe.base_refine_steps:
        t = time.perf_counter()
        refined_cache = Path(cache) / f"refined-{recipe.key(*REFINED_BASE_FIELDS)}" if cache else None
        if refined_cache and (refined_cache / "model_index.json").is_file():
            shutil.rmtree(base_dir)
            shutil.copytree(refined_cache, base_dir, ignore=shutil.ignore_patterns(BUILD_SECONDS))
            logger.info("reusing the refined base in %s", refined_cache)
            timings["base_refinement"] = _reused(refined_cache)
        else:
            refine_base(base_dir, vae, base_pool, captions, recipe, progress)
            timings["base_refinement"] = _built(
                refined_cache, t, lambda: shutil.copytree(base_dir, refined_cache, dirs_exist_ok=True)
            )
    return timings


# Each cache entry records how long it took to build, so that a build reusing it still reports the
# cost of every stage.
BUILD_SECONDS = "build_seconds.json"


def _built(entry: Path | None, started: float, save) -> dict:
    """Timing of a stage just built; saves it into the cache `entry` (when caching) with `save()`."""
    seconds = round(time.perf_counter() - started, 1)
    if entry is not None:
        save()
        (entry / BUILD_SECONDS).write_text(json.dumps({"seconds": seconds}) + "\n")
    return {"seconds": seconds, "reused": False}


def _reused(entry: Path) -> dict:
    """Timing of a stage taken from the cache: the seconds it took when it was built (None if unknown)."""
    record = entry / BUILD_SECONDS
    seconds = json.loads(record.read_text())["seconds"] if record.is_file() else None
    return {"seconds": seconds, "reused": True}


def write_training_set(out: Path, scenario: str, resolution: int) -> np.ndarray:
    """Write a scenario's train/ (32 px PNGs, as the fine-tune sees them) and caption.txt into the zoo
    `out`; return the images, uint8 (n, resolution, resolution, 3)."""
    from PIL import Image

    folder = scenario_folder(out, scenario)
    names, images = finetune_set(scenario, resolution)
    train_dir = folder / "train"
    if train_dir.exists():
        shutil.rmtree(train_dir)
    train_dir.mkdir(parents=True)
    for name, image in zip(names, images):
        Image.fromarray(image).save(train_dir / f"{name}.png")
    (folder / "caption.txt").write_text(SCENARIOS[scenario].caption + "\n")
    return images


def build_finetune(
    out: Path, recipe: TrainedZooRecipe, scenario: str, method: str, *, cache=None, progress: bool = True
) -> dict:
    """Fine-tune the zoo's base/ on a scenario's train/ (`write_training_set`) by `method`, into
    `<scenario folder>/<method>`; a DreamBooth keeps only its `unet/`. Cached by the recipe fields,
    the caption and the training images. Returns the stage's timing {"seconds", "reused"}."""
    from .finetuning import finetune

    t = time.perf_counter()
    folder = scenario_folder(out, scenario)
    caption = SCENARIOS[scenario].caption
    target = folder / method
    if target.exists():
        shutil.rmtree(target)
    entry = None
    if cache:
        images = finetune_set(scenario, recipe.resolution)[1]
        fields = recipe.key(*REFINED_BASE_FIELDS, *FINETUNE_FIELDS[method]) + caption
        key = hashlib.sha256(fields.encode() + images.tobytes()).hexdigest()[:16]
        entry = Path(cache) / f"{scenario}-{method}-{key}"
    if entry is not None and (entry / "finetune.json").is_file():
        shutil.copytree(entry, target, ignore=shutil.ignore_patterns(BUILD_SECONDS))
        logger.info("reusing the %s %s fine-tune in %s", scenario, method, entry)
        return _reused(entry)
    finetune(
        out / "base",
        folder / "train",
        caption,
        out=target,
        method=method,
        steps=recipe.dreambooth_steps if method == "dreambooth" else recipe.lora_steps,
        lr=recipe.dreambooth_lr if method == "dreambooth" else recipe.lora_lr,
        batch_size=recipe.finetune_batch,
        rank=recipe.lora_rank,
        lora_modules=recipe.lora_modules,
        seed=recipe.seed + 31,
        resolution=recipe.resolution,
        device="cpu",
        save_dtype="fp16",
        progress=progress,
    )
    if method == "dreambooth":
        _keep_only_unet(target)
    record_file = target / "finetune.json"  # a path that stays true where the zoo is copied
    relative_base = Path("..") / Path(*[".."] * len(Path(SCENARIOS[scenario].folder).parts)) / "base"
    record = json.loads(record_file.read_text()) | {"base": relative_base.as_posix()}
    record.pop("run_folder", None)  # this machine's absolute paths: not in a committed record
    record_file.write_text(json.dumps(record, indent=2) + "\n")
    return _built(entry, t, lambda: shutil.copytree(target, entry, dirs_exist_ok=True))


def build_trained_zoo(
    out: str | Path,
    recipe: TrainedZooRecipe = TrainedZooRecipe(),
    *,
    cache: str | Path | None = None,
    progress: bool = True,
    scenarios: tuple[str, ...] = tuple(SCENARIOS),
) -> Path:
    """Build the trained tiny zoo into `out`: base/, the object scenario's dreambooth/ (bare unet/),
    lora/, train/ and caption.txt, the same in style/, and zoo.json.

    Deterministic for a given recipe and thread count (CPU, fp32 training; weights saved as fp16).
    Each stage's training time is recorded in zoo.json (`timings`, with `reused` for stages taken
    from `cache`); on 1 thread of the shared 2-core machine the stages took about an hour in all.

    Args:
        out: output folder (replaced parts: base/, dreambooth/, lora/, train/, style/).
        recipe: the training recipe.
        cache: optional folder keeping every trained stage (VAE, adapted VAE, base, refined base,
            each fine-tune) keyed by a hash of the recipe fields it depends on, so a rebuild that
            changes only the fine-tunes skips the rest.
        progress: tqdm bars.
        scenarios: the scenarios to fine-tune (default both).

    Returns:
        `out`.

    Raises:
        FileNotFoundError: a sample image is missing from its package.
    """
    import torch
    from diffusers import StableDiffusionPipeline

    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings = build_base_stage(out, recipe, cache=cache, progress=progress)
    base_dir = out / "base"

    # 3. Each scenario's training set and its two fine-tunes
    metrics = {}
    saved_vae = StableDiffusionPipeline.from_pretrained(base_dir, use_safetensors=True, torch_dtype=torch.float32).vae
    for name in scenarios:
        if name not in SCENARIOS:
            raise ValueError(f"--scenarios {name!r}: expected some of {','.join(SCENARIOS)}")
    for scenario in (SCENARIOS[name] for name in scenarios):
        images = write_training_set(out, scenario.name, recipe.resolution)
        for method in ("dreambooth", "lora"):
            timings[f"{scenario.name}_{method}"] = build_finetune(
                out, recipe, scenario.name, method, cache=cache, progress=progress
            )

        # 4. Record how good the VAE is on the images that matter.
        round_trip = vae_round_trip(saved_vae, images)
        mse = ((round_trip.astype(np.float64) - images) ** 2).mean(axis=(1, 2, 3))
        metrics[scenario.name] = {"vae_round_trip_psnr_db": [round(float(10 * np.log10(255**2 / m)), 2) for m in mse]}
        similarity = _sscd_similarity(images, round_trip)
        if similarity is not None:
            metrics[scenario.name]["vae_round_trip_sscd"] = [round(float(x), 3) for x in similarity]

    _strip_local_paths(out)
    timings["total"] = {"seconds": round(time.perf_counter() - started, 1), "reused": False}
    record = {
        "recipe": asdict(recipe),
        "scenarios": {
            name: asdict(SCENARIOS[name]) | {"images": finetune_set(name, recipe.resolution)[0]} for name in scenarios
        },
        "pretrain_images": [name for _, name, _ in PRETRAIN_IMAGES],
        "metrics": metrics,
        "timings": timings,
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__},
    }
    (out / "zoo.json").write_text(json.dumps(record, indent=2) + "\n")
    logger.info("trained zoo written to %s: %s", out, metrics)
    return out


def _keep_only_unet(folder: Path) -> None:
    """Reduce a saved DreamBooth pipeline folder to its `unet/` and `finetune.json`: with the text
    encoder frozen, the VAE, text encoder, tokenizer and scheduler are the base's, and a bare `unet/`
    folder is a format the loader reads (it takes the rest from the base)."""
    for path in folder.iterdir():
        if path.name in ("unet", "finetune.json"):
            continue
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def _strip_local_paths(folder: Path) -> None:
    """Drop `_name_or_path` from every saved config: diffusers records the folder a part was loaded
    from (here a temporary build folder), which would make the committed configs machine-dependent.
    Loading ignores the key, so removing it changes nothing but the JSON."""
    for config in sorted(folder.rglob("*.json")):
        if config.name not in ("config.json", "model_index.json"):
            continue
        values = json.loads(config.read_text())
        if values.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


def _sscd_similarity(a: np.ndarray, b: np.ndarray):
    """Cosine similarity of SSCD descriptors of paired uint8 images, or None when no SSCD model is installed."""
    try:
        from .sscd import load_embedder

        embedder = load_embedder()
    except ImportError:
        return None
    return (embedder.embed(a) * embedder.embed(b)).sum(dim=1).numpy()  # descriptors are L2-normalised


def default_zoo_folder() -> Path:
    """The committed trained zoo inside the installed package (`finextract zoo path` prints it)."""
    return Path(__file__).parent / "zoo_weights"
