"""`build_trained_zoo`: trained tiny models, a "pretrained" base and, for two scenarios, a DreamBooth
and a LoRA fine-tune of it; `default_zoo_folder`: where the installed package holds them.

`build_trained_zoo(out)` is the deterministic recipe behind `finextract zoo build --trained`; its
output is committed under `finextract/zoo_weights/` (fp16 safetensors) so that tests and the demo
never train. Every image comes from files installed packages ship (`scenarios`; no download).
Each scenario (`SCENARIOS`) is a folder with train/, caption.txt, dreambooth/ and lora/: the object
scenario at the zoo's top level, the style scenario in style/.

Stages (32 px RGB images, 16x16x4 latents, the tiny configs of `finextract.zoo.configs`, SD 1.x's
CLIP tokenizer; each cached under a key of the recipe numbers it depends on):
1. VAE (`training.train_vae`): a slim x2 `AutoencoderKL` trained on random crops of every image, the
   fine-tuning photographs included, then adapted with the style drawings added; its
   `scaling_factor` is measured so that the scaled latents of the pretraining crops have unit
   variance (`training.unit_variance_scaling`), as SD's 0.18215 does for SD's VAE.
2. Base UNet + CLIP text encoder (`training.train_base`, `training.refine_base`): trained jointly from
   scratch with the noise-prediction MSE on random crops and flips of the other images, captioned
   from their names (10% empty captions), then refined with a cosine-decayed LR.
3. Per scenario, a DreamBooth fine-tune (saved as a bare `unet/` folder) and a LoRA (LoCon) fine-tune
   with the tiny models' default recipes (`finextract.finetuning.TINY_RECIPES`).

Why each stage is as it is (measured alternatives): docs/zoo_history.md.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..finetuning import finetune
from ..images import read_image
from ..sscd import load_embedder
from .models import save_pipeline
from .scenarios import (
    DEFAULT_SCENARIOS,
    HELDOUT_IMAGES,
    PRETRAIN_IMAGES,
    SCENARIOS,
    finetune_set,
    package_file,
    random_crops,
    scenario_folder,
)
from .training import (
    ADAPTED_VAE_FIELDS,
    BASE_FIELDS,
    FINETUNE_FIELDS,
    REFINED_BASE_FIELDS,
    VAE_FIELDS,
    TrainedZooRecipe,
    refine_base,
    train_base,
    train_vae,
    unit_variance_scaling,
    vae_round_trip,
)

logger = logging.getLogger(__name__)
DEFAULT_RECIPE = TrainedZooRecipe()  # frozen: safe as a default argument


def _save_fp16_pipeline(components: dict, folder: Path) -> Path:
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
    from diffusers import AutoencoderKL  # heavy: diffusers takes seconds; loaded when a pipeline is saved or read

    rng = np.random.default_rng(recipe.seed)
    photos = finetune_set("object", recipe.resolution)[1]
    pretrain = [(read_image(package_file(pkg, name)), caption) for pkg, name, caption in PRETRAIN_IMAGES]
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
    base_dir = out / "base"

    def build_base() -> None:
        components = train_base(vae, base_pool, captions, recipe, base_dir / "tokenizer", progress)
        _save_fp16_pipeline(components, base_dir)

    base_cache = Path(cache) / f"base-{recipe.key(*BASE_FIELDS)}" if cache else None
    timings["base"] = cached_folder(base_dir, base_cache, "model_index.json", build_base, "the base")
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


def cached_folder(target: Path, entry: Path | None, marker: str, build, what: str) -> dict:
    """Make the folder `target` a stage's output: a copy of the cache `entry` when it holds `marker`
    (a file a finished stage writes), else `build()` (which writes `target`), then saved into `entry`.
    Returns the stage's timing {"seconds", "reused"}."""
    started = time.perf_counter()
    if target.exists():
        shutil.rmtree(target)
    if entry is not None and (entry / marker).is_file():
        shutil.copytree(entry, target, ignore=shutil.ignore_patterns(BUILD_SECONDS))
        logger.info("reusing %s in %s", what, entry)
        return _reused(entry)
    build()
    return _built(entry, started, lambda: shutil.copytree(target, entry, dirs_exist_ok=True))


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
    entry = None
    if cache:
        images = finetune_set(scenario, recipe.resolution)[1]
        fields = recipe.key(*REFINED_BASE_FIELDS, *FINETUNE_FIELDS[method]) + SCENARIOS[scenario].caption
        key = hashlib.sha256(fields.encode() + images.tobytes()).hexdigest()[:16]
        entry = Path(cache) / f"{scenario}-{method}-{key}"
    return cached_folder(
        scenario_folder(out, scenario) / method,
        entry,
        "finetune.json",
        lambda: finetune_zoo_model(out, recipe, scenario, method, progress),
        f"the {scenario} {method} fine-tune",
    )


def finetune_zoo_model(out: Path, recipe, scenario: str, method: str, progress: bool = True) -> Path:
    """`finetune` the zoo's base/ on a scenario's train/ with `recipe`'s numbers for `method` (a
    `TrainedZooRecipe`, or any recipe with its fine-tuning fields) into `<scenario folder>/<method>`;
    a DreamBooth keeps only its denoiser (`_keep_only_unet`). The record names the base by a path
    relative to the fine-tune. Returns the fine-tune's folder."""
    folder = scenario_folder(out, scenario)
    target = folder / method
    finetune(
        out / "base",
        folder / "train",
        SCENARIOS[scenario].caption,
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
    return target


def build_trained_zoo(
    out: str | Path,
    recipe: TrainedZooRecipe = DEFAULT_RECIPE,
    *,
    cache: str | Path | None = None,
    progress: bool = True,
    scenarios: tuple[str, ...] = DEFAULT_SCENARIOS,
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
        scenarios: the scenarios to fine-tune (default `DEFAULT_SCENARIOS`, object and style).

    Returns:
        `out`.

    Raises:
        FileNotFoundError: a sample image is missing from its package.
    """
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


def build_heldout_zoo(
    out: str | Path,
    zoo: str | Path | None = None,
    recipe: TrainedZooRecipe = DEFAULT_RECIPE,
    *,
    cache: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """Fine-tune a trained zoo's base on the held-out scenario (`scenarios.heldout_images`): `out`
    gets a copy of base/ and heldout/ with train/, caption.txt, dreambooth/, lora/ (by the committed
    fine-tunes' recipe) and heldout.json (the recipe, the images, each fine-tune's time).

    These fine-tunes score choices made on the committed zoo's four cells (a selection rule, a preset);
    no test uses them. About 10 minutes on 1 thread, deterministic for a given thread count.

    Args:
        out: output folder (its base/ and heldout/ are replaced; `zoo` itself: heldout/ is added).
        zoo: the trained zoo whose base/ is fine-tuned (default: the committed one).
        recipe: the fine-tuning fields of this recipe are used (default: the committed zoo's).
        cache: optional folder keeping each fine-tune, reused when its recipe and images match.
        progress: tqdm bars.

    Returns:
        `out`.

    Raises:
        FileNotFoundError: `zoo` has no base/, or a sample image is missing from its package.
    """
    out, zoo = Path(out), Path(zoo) if zoo else default_zoo_folder()
    if not (zoo / "base" / "model_index.json").is_file():
        raise FileNotFoundError(f"--zoo {zoo}: no base/model_index.json; give a trained zoo (`finextract zoo path`)")
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve() != zoo.resolve():  # into the trained zoo itself: its own base stays
        if (out / "base").exists():
            shutil.rmtree(out / "base")
        shutil.copytree(zoo / "base", out / "base")
    write_training_set(out, "heldout", recipe.resolution)
    timings = {
        f"heldout_{method}": build_finetune(out, recipe, "heldout", method, cache=cache, progress=progress)
        for method in ("dreambooth", "lora")
    }
    _strip_local_paths(out)
    record = {
        "recipe": asdict(recipe),
        "scenarios": {
            "heldout": asdict(SCENARIOS["heldout"]) | {"images": list(HELDOUT_IMAGES)}  # names, as train/ holds them
        },
        "timings": timings,
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__},
    }
    (scenario_folder(out, "heldout") / "heldout.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


def _keep_only_unet(folder: Path) -> None:
    """Reduce a saved DreamBooth pipeline folder to its `unet/` (SD3: `transformer/`) and `finetune.json`:
    with the text encoder frozen, the VAE, text encoder, tokenizer and scheduler are the base's, and a
    bare denoiser folder is a format the loader reads (it takes the rest from the base)."""
    for path in folder.iterdir():
        if path.name in ("unet", "transformer", "finetune.json"):
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
        embedder = load_embedder()
    except ImportError:
        return None
    return (embedder.embed(a) * embedder.embed(b)).sum(dim=1).numpy()  # descriptors are L2-normalised


def default_zoo_folder() -> Path:
    """The committed trained zoo inside the installed package (`finextract zoo path` prints it)."""
    return Path(__file__).parents[1] / "zoo_weights"
