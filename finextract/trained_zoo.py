"""Trained tiny models: a "pretrained" base and a DreamBooth and a LoRA fine-tune of it on real photos.

`build_trained_zoo(out)` is the deterministic recipe behind `finextract zoo build --trained`; its
output is committed under `finextract/zoo_weights/` (fp16 safetensors) so that tests and the demo
never train. Every image comes from files that ship inside installed packages (no download):
scikit-image's bundled sample images, scikit-learn's `load_sample_images`, matplotlib's sample data.

Steps (32 px RGB images, 16x16x4 latents, the tiny configs of `finextract.zoo`):
1. VAE: a slim x2 `AutoencoderKL` trained to reconstruct random crops of *every* image, the five
   fine-tuning photographs included (their whole views are over-sampled). The VAE stands in for
   SD's general-purpose autoencoder, which reconstructs nearly any photograph; it is not what is
   audited, so training it on every image is fair: without it, a 32 px tiny VAE blurs images so much
   that SSCD cannot see a copy of anything. Its `scaling_factor` is then measured so that the scaled
   latents of the pretraining crops have unit variance, as SD's 0.18215 does for SD's VAE. Keeping
   SD's number (latent std 0.25) made every noise level 16x noisier than the schedule intends: the
   fine-tunes then produced mostly noise-textured images that SSCD finds all alike, one giant clique
   swallowed the copies, and FineXtract only tied Direct on A-ESR0.6 (N = 250 demo: AS 0.378 / A-ESR0.6
   0.20 against Direct 0.352 / 0.20). With unit-variance latents: 0.536 / 0.40 against 0.366 / 0.00.
2. Base ("pretrained") UNet + CLIP text encoder, trained jointly from scratch with the noise-prediction
   MSE on random crops and flips of the *other* images, captioned from the image names (10% empty
   captions, as SD 1.x dropped text, so that eps_base(x_t, "") is meaningful): 1,500 steps at a
   constant LR, then 2,000 more from those weights with a cosine-decayed LR (stage 2, "refinement").
   The refinement mattered to the demo (measured before the latent scaling above): with the
   1,500-step base, FineXtract's extrapolation away from a poor eps_base("") over-saturated and it did
   not beat CFG (N = 50 probe AS 0.437 vs 0.446); with the refined base, the same DreamBooth recipe
   gave 0.379 vs CFG 0.289 and Direct 0.282.
3. A DreamBooth fine-tune (full UNet, 1,200 steps, lr 1e-4) and a LoRA fine-tune (rank 8 on
   to_q/to_k/to_v/to_out.0, 1,000 steps, lr 5e-3) of that base on the five held-apart photographs with
   one caption, through `finextract.finetune`: partial memorisation (the DreamBooth model alone
   reproduces a training photo only sometimes); the LoRA, which adapts only the tiny UNet's attention,
   memorises little.
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

from .images import read_image

logger = logging.getLogger(__name__)

CAPTION = "a photo of sks"
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
    vae_finetune_share: float = 0.25  # fraction of each VAE batch drawn from the fine-tuning photos
    # latents * scaling_factor should have unit variance, as SD's 0.18215 gives for its own VAE: the
    # noise schedule's signal-to-noise ratios assume it. "unit_variance" measures the factor on the
    # pretraining crops; a number fixes it.
    latent_scaling: str | float = "unit_variance"
    base_steps: int = 1500
    base_batch: int = 16
    base_lr: float = 1e-3
    empty_caption_rate: float = 0.1
    # stage 2 of the base: continue from the stage-1 weights (fresh AdamW) with a cosine-decayed LR;
    # a better eps_base("") is what FineXtract extrapolates away from
    base_refine_steps: int = 2000
    base_refine_lr: float = 5e-4
    dreambooth_steps: int = 1200
    dreambooth_lr: float = 1e-4
    lora_steps: int = 1000
    lora_lr: float = 5e-3
    lora_rank: int = 8
    finetune_batch: int = 5

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
BASE_FIELDS = VAE_FIELDS + ("latent_scaling", "base_steps", "base_batch", "base_lr", "empty_caption_rate")
REFINED_BASE_FIELDS = BASE_FIELDS + ("base_refine_steps", "base_refine_lr")


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
    from .finetune import load_images

    return load_images([_package_file("skimage", name) for name in FINETUNE_IMAGES], resolution)


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


def train_vae(pool: np.ndarray, photos: np.ndarray, recipe: TrainedZooRecipe, progress: bool = True):
    """Train the slim x2 VAE on `pool` crops plus (over-sampled, flipped) `photos`; L1 + MSE + tiny KL."""
    import torch
    from diffusers import AutoencoderKL
    from tqdm.auto import tqdm

    from .zoo import TINY_VAE_CONFIG

    torch.manual_seed(recipe.seed + 1)
    vae = AutoencoderKL(**TINY_VAE_CONFIG).train()
    pool_t, photos_t = _to_tensor(pool), _to_tensor(np.concatenate([photos, photos[:, :, ::-1]]))
    optimizer = torch.optim.Adam(vae.parameters(), lr=recipe.vae_lr)
    # cosine decay to zero: the last steps sharpen the reconstructions most
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + np.cos(np.pi * min(step, recipe.vae_steps) / recipe.vae_steps))
    )
    generator = torch.Generator().manual_seed(recipe.seed + 11)
    n_photo = max(1, round(recipe.vae_batch * recipe.vae_finetune_share))
    bar = tqdm(range(recipe.vae_steps), desc="zoo: VAE", disable=not progress, dynamic_ncols=True)
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

    from .finetune import denoising_loss, tokenize

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
    from .finetune import train_loop
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

    from .finetune import train_loop

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


def build_trained_zoo(
    out: str | Path,
    recipe: TrainedZooRecipe = TrainedZooRecipe(),
    *,
    cache: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """Build the trained tiny zoo into `out`: base/, dreambooth/, lora/, train/, caption.txt, zoo.json.

    Deterministic for a given recipe and thread count (CPU, fp32 training; weights saved as fp16).
    Takes about 26 minutes on 1 CPU thread from scratch (measured: VAE 6, base and refinement 16,
    fine-tunes 3.5 minutes); with `cache` holding the VAE and base, about 4 minutes.

    Args:
        out: output folder (replaced parts: base/, dreambooth/, lora/, train/).
        recipe: the training recipe.
        cache: optional folder keeping the trained VAE and base keyed by a hash of their recipe
            fields, so a rebuild that changes only the fine-tunes skips them.
        progress: tqdm bars.

    Returns:
        `out`.

    Raises:
        FileNotFoundError: a sample image is missing from its package.
    """
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(recipe.seed)
    photos = finetune_photos(recipe.resolution)
    pretrain = [(read_image(_package_file(pkg, name)), caption) for pkg, name, caption in PRETRAIN_IMAGES]
    pretrain_crops = [random_crops(image, recipe.crops_per_image, recipe.resolution, rng) for image, _ in pretrain]
    captions = [caption for (_, caption), crops in zip(pretrain, pretrain_crops) for _ in range(len(crops))]
    base_pool = np.concatenate(pretrain_crops)
    photo_crops = np.concatenate([random_crops(p, recipe.crops_per_image // 2, recipe.resolution, rng) for p in photos])
    timings = {}

    # 1. VAE (cached by its recipe fields)
    t = time.perf_counter()
    vae_dir = Path(cache) / f"vae-{recipe.key(*VAE_FIELDS)}" if cache else None
    if vae_dir and (vae_dir / "config.json").is_file():
        vae = AutoencoderKL.from_pretrained(vae_dir, use_safetensors=True, torch_dtype=torch.float32).eval()
        logger.info("reusing the VAE in %s", vae_dir)
    else:
        vae = train_vae(np.concatenate([base_pool, photo_crops]), photos, recipe, progress)
        if vae_dir:
            vae.save_pretrained(vae_dir, safe_serialization=True)
    # evaluate the VAE as it will be used: fp16 weights, fp32 compute
    vae = vae.to(torch.float16).to(torch.float32)
    scaling = (
        unit_variance_scaling(vae, base_pool)
        if recipe.latent_scaling == "unit_variance"
        else float(recipe.latent_scaling)
    )
    vae.register_to_config(scaling_factor=scaling)
    timings["vae_s"] = time.perf_counter() - t

    # 2. Base UNet + text encoder (cached by the VAE + base fields)
    t = time.perf_counter()
    base_dir = out / "base"
    base_cache = Path(cache) / f"base-{recipe.key(*BASE_FIELDS)}" if cache else None
    if base_dir.exists():
        shutil.rmtree(base_dir)
    if base_cache and (base_cache / "model_index.json").is_file():
        shutil.copytree(base_cache, base_dir)
        logger.info("reusing the base in %s", base_cache)
    else:
        components = train_base(vae, base_pool, captions, recipe, base_dir / "tokenizer", progress)
        _save_fp16_pipeline(components, base_dir)
        if base_cache:
            shutil.copytree(base_dir, base_cache, dirs_exist_ok=True)
    if recipe.base_refine_steps:
        refined_cache = Path(cache) / f"refined-{recipe.key(*REFINED_BASE_FIELDS)}" if cache else None
        if refined_cache and (refined_cache / "model_index.json").is_file():
            shutil.rmtree(base_dir)
            shutil.copytree(refined_cache, base_dir)
            logger.info("reusing the refined base in %s", refined_cache)
        else:
            refine_base(base_dir, vae, base_pool, captions, recipe, progress)
            if refined_cache:
                shutil.copytree(base_dir, refined_cache, dirs_exist_ok=True)
    timings["base_s"] = time.perf_counter() - t

    # 3. The fine-tuning set and the two fine-tunes
    from PIL import Image

    from .finetune import finetune

    train_dir = out / "train"
    if train_dir.exists():
        shutil.rmtree(train_dir)
    train_dir.mkdir()
    for name, photo in zip(FINETUNE_IMAGES, photos):
        Image.fromarray(photo).save(train_dir / f"{Path(name).stem}.png")
    (out / "caption.txt").write_text(CAPTION + "\n")
    for method, steps, lr, rank in (
        ("dreambooth", recipe.dreambooth_steps, recipe.dreambooth_lr, recipe.lora_rank),
        ("lora", recipe.lora_steps, recipe.lora_lr, recipe.lora_rank),
    ):
        t = time.perf_counter()
        if (out / method).exists():
            shutil.rmtree(out / method)
        finetune(
            base_dir,
            train_dir,
            CAPTION,
            out=out / method,
            method=method,
            steps=steps,
            lr=lr,
            batch_size=recipe.finetune_batch,
            rank=rank,
            seed=recipe.seed + 31,
            resolution=recipe.resolution,
            device="cpu",
            save_dtype="fp16",
            progress=progress,
        )
        record_file = out / method / "finetune.json"  # a path that stays true where the zoo is copied
        record_file.write_text(json.dumps(json.loads(record_file.read_text()) | {"base": "../base"}, indent=2) + "\n")
        timings[f"{method}_s"] = time.perf_counter() - t

    _strip_local_paths(out)

    # 4. Record how good the VAE is on the photos that matter.
    saved_vae = StableDiffusionPipeline.from_pretrained(base_dir, use_safetensors=True, torch_dtype=torch.float32).vae
    round_trip = vae_round_trip(saved_vae, photos)
    mse = ((round_trip.astype(np.float64) - photos) ** 2).mean(axis=(1, 2, 3))
    metrics = {"vae_round_trip_psnr_db": [round(float(10 * np.log10(255**2 / m)), 2) for m in mse]}
    similarity = _sscd_similarity(photos, round_trip)
    if similarity is not None:
        metrics["vae_round_trip_sscd"] = [round(float(s), 3) for s in similarity]
    timings["total_s"] = time.perf_counter() - started
    record = {
        "recipe": asdict(recipe),
        "caption": CAPTION,
        "finetune_images": list(FINETUNE_IMAGES),
        "pretrain_images": [name for _, name, _ in PRETRAIN_IMAGES],
        "metrics": metrics,
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__},
    }
    (out / "zoo.json").write_text(json.dumps(record, indent=2) + "\n")
    logger.info("trained zoo written to %s: %s", out, metrics)
    return out


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
