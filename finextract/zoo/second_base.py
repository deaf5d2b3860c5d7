"""`build_second_base`: a second trained tiny SD 1.x base, the committed base's sibling.

Community fine-tunes are trained on derivative bases of one family (same architecture, other
weights), so an auditor must pick the parent among bases that all load. This base is that kind of
wrong-but-plausible candidate for the committed zoo: the committed base's VAE, tokenizer, text
encoder and scheduler, copied unchanged, and a UNet trained from its own seeded initialisation on a
seeded subset of the pretraining images, in another order (`SecondBaseRecipe`). Only the UNet
differs, so a bare DreamBooth `unet/` loads on either base, and a LoRA applies to either.

The UNet is trained as the committed one was (`training._base_loss_fn`: noise-prediction MSE on
random crops and flips of captioned images, 10% empty captions, then a cosine-decayed refinement),
with the text encoder frozen. It is not committed: `finextract zoo second-base --out DIR` rebuilds it
(about 25 minutes on 1 thread), deterministically for a given thread count (`--cache` keeps each stage).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..finetuning import train_loop
from ..images import read_image
from .scenarios import PRETRAIN_IMAGES, package_file, random_crops
from .trained import BUILD_SECONDS, DEFAULT_RECIPE, _built, _reused, _strip_local_paths, default_zoo_folder
from .training import _base_loss_fn


@dataclass(frozen=True)
class SecondBaseRecipe:
    """Every number that defines the second base (hashed into each stage's cache key).

    The committed base's steps, batch and learning rates (1500 steps, then 800 with a cosine decay);
    the text encoder is not trained here.
    """

    seed: int = 1
    images: int = 16  # of the 20 pretraining images: the first 16 of a permutation seeded by `seed`
    crops_per_image: int = 300
    base_steps: int = 1500
    base_batch: int = 16
    base_lr: float = 1e-3
    empty_caption_rate: float = 0.1
    refine_steps: int = 800
    refine_lr: float = 5e-4

    def key(self, *fields: str, parent: str = "") -> str:
        values = {name: getattr(self, name) for name in fields} | {"parent": parent}
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


_STAGE1 = ("seed", "images", "crops_per_image", "base_steps", "base_batch", "base_lr", "empty_caption_rate")
_STAGE2 = _STAGE1 + ("refine_steps", "refine_lr")


def pretraining_subset(recipe: SecondBaseRecipe) -> list[tuple[str, str, str]]:
    """The (package, file, caption) pretraining images the second base sees, in its order."""
    order = np.random.default_rng(recipe.seed).permutation(len(PRETRAIN_IMAGES))[: recipe.images]
    return [PRETRAIN_IMAGES[i] for i in order]


def _parent_digest(base: Path) -> str:
    """sha256 of the parts taken from the committed base (VAE and text encoder weights): part of the cache key."""
    digest = hashlib.sha256()
    for part in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        digest.update((base / part).read_bytes())
    return digest.hexdigest()[:16]


def build_second_base(
    out: str | Path,
    recipe: SecondBaseRecipe = SecondBaseRecipe(),  # frozen: safe as a default
    *,
    zoo: str | Path | None = None,
    cache: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """Write a second trained tiny SD 1.x base pipeline folder into `out` (fp16 safetensors).

    Args:
        out: the pipeline folder to write (replaced if it exists).
        recipe: the UNet's training recipe.
        zoo: the trained zoo whose base lends the VAE, tokenizer, text encoder and scheduler
            (default: the committed one).
        cache: optional folder keeping both UNet stages, keyed by the recipe and the parent's weights.
        progress: tqdm bars.

    Returns:
        `out`, holding also `second_base.json`: the recipe, the images in training order, and each
        stage's training seconds ({"seconds", "reused"}) and the thread count.

    Raises:
        FileNotFoundError: no `base/model_index.json` in `zoo`, or a sample image missing from its package.
    """
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    parent = Path(zoo or default_zoo_folder()) / "base"
    if not (parent / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{parent}: no trained base (model_index.json); build the zoo with `zoo build --trained`"
        )
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(parent, out, ignore=shutil.ignore_patterns("unet", BUILD_SECONDS))
    pipeline = StableDiffusionPipeline.from_pretrained(parent, use_safetensors=True, torch_dtype=torch.float32)
    text_encoder = pipeline.text_encoder.requires_grad_(False).eval()

    rng = np.random.default_rng(recipe.seed)
    subset = pretraining_subset(recipe)
    crops = [
        random_crops(read_image(package_file(pkg, name)), recipe.crops_per_image, DEFAULT_RECIPE.resolution, rng)
        for pkg, name, _ in subset
    ]
    captions = [caption for (_, _, caption), pool in zip(subset, crops) for _ in range(len(pool))]
    pool = np.concatenate(crops)
    parent_key = _parent_digest(parent)
    timings: dict[str, dict] = {}

    def stage(name: str, fields: tuple, train) -> None:
        entry = Path(cache) / f"second-{name}-{recipe.key(*fields, parent=parent_key)}" if cache else None
        t = time.perf_counter()
        if entry is not None and (entry / "config.json").is_file():
            shutil.rmtree(out / "unet", ignore_errors=True)
            shutil.copytree(entry, out / "unet", ignore=shutil.ignore_patterns(BUILD_SECONDS))
            timings[name] = _reused(entry)
            return
        unet = train()
        unet.eval().to(torch.float16).save_pretrained(out / "unet", safe_serialization=True)
        timings[name] = _built(entry, t, lambda: shutil.copytree(out / "unet", entry, dirs_exist_ok=True))

    def run(unet, steps, lr, seed, schedule, desc):
        unet.train()
        loss_args = (unet, text_encoder, pipeline.tokenizer, pipeline.scheduler, pipeline.vae, pool, captions, recipe)
        train_loop(
            list(unet.parameters()),
            _base_loss_fn(*loss_args),
            steps=steps,
            lr=lr,
            device="cpu",
            dtype="fp32",
            seed=seed,
            desc=desc,
            progress=progress,
            schedule=schedule,
        )
        return unet

    def initial():
        torch.manual_seed(recipe.seed)  # as `tiny_components(seed)` draws its UNet
        unet = UNet2DConditionModel.from_config(pipeline.unet.config)
        return run(unet, recipe.base_steps, recipe.base_lr, recipe.seed + 21, "constant", "second base UNet")

    def refined():  # from the saved fp16 stage-1 weights, as the committed base's refinement
        unet = UNet2DConditionModel.from_pretrained(out / "unet", torch_dtype=torch.float32)
        return run(unet, recipe.refine_steps, recipe.refine_lr, recipe.seed + 22, "cosine", "second base refinement")

    stage("base", _STAGE1, initial)
    stage("refined", _STAGE2, refined)
    _strip_local_paths(out)
    record = {
        "recipe": asdict(recipe),
        "parent_parts": {"folder": "the trained zoo's base/", "sha256_prefix": parent_key},
        "pretrain_images": [name for _, name, _ in subset],
        "timings": timings,
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__},
    }
    (out / "second_base.json").write_text(json.dumps(record, indent=2) + "\n")
    return out
