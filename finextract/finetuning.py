"""Fine-tune a Stable Diffusion 1.x or SD3 pipeline on a few images: DreamBooth (full UNet /
transformer) or LoRA.

The standard recipe of diffusers' `train_dreambooth.py` / `train_dreambooth_lora.py`: encode the
images once with the VAE (latents scaled by `vae.config.scaling_factor`), then at each step draw a
timestep and noise, noise the latents with the model's own scheduler and regress the UNet's
prediction onto the noise (or the velocity for v-prediction models) with MSE; AdamW at a constant
learning rate. SD3 (`train_dreambooth_sd3.py`): rectified flow, the transformer's velocity regressed
onto noise - x0 at logit-normal sigmas (`finextract.objectives`), captions encoded by the two CLIP
encoders with T5's zeros (`finextract.training_parts`). LoRA goes through `peft`, on the UNet attention projections (to_q, to_k, to_v,
to_out.0, as diffusers' script) or LoCon-style on every Linear and Conv2d of the UNet's blocks
(attention, feed-forward, projections, ResNet convolutions, resamplers: LyCORIS' LoCon), and is saved
as diffusers' `pytorch_lora_weights.safetensors`; DreamBooth saves a diffusers pipeline folder. The
same code runs the tiny models on a CPU and SD 1.x on a GPU (fp16 / bf16 autocast there, fp32
master weights).

Defaults (`default_recipe`) depend on the model: an SD-size UNet gets the usual SD 1.x values, a
tiny one (first block narrower than SD's 320 channels, such as `finextract.zoo`'s) the recipe the
committed trained zoo was built and measured with.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm.auto import tqdm

from .engine.config import resolve_device, torch_dtype
from .engine.metadata import add_safetensors_metadata, finetune_metadata, kohya_model_hashes
from .images import center_crop_resize, read_image, read_images
from .objectives import training_loss
from .store.files import write_json
from .store.folders import prepare, replace_folder, run_entry, stage
from .training_parts import SD3_LORA_TARGET_MODULES, caption_conditioning, load_parts, predict, vae_latents

logger = logging.getLogger(__name__)

LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
LORA_MODULES = ("attention", "locon")
# SD 1.x's first UNet block has 320 channels; a narrower UNet is a tiny test model
SD_WIDTH = 320
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


@dataclass(frozen=True)
class Recipe:
    """Default training settings for one kind of model and method (`default_recipe`)."""

    steps: int
    lr: float
    batch_size: int
    rank: int = 4
    lora_modules: str = "attention"


# SD 1.x: diffusers' example scripts (train_dreambooth.py lr 5e-6, batch 1; train_dreambooth_lora.py
# lr 1e-4 on the attention projections) with the paper's released LoRA rank 64 and 2,000 steps.
SD_RECIPES = {
    "dreambooth": Recipe(steps=800, lr=5e-6, batch_size=1),
    "lora": Recipe(steps=2000, lr=1e-4, batch_size=1, rank=64),
}
# The tiny models (measured on the trained zoo, see finextract/zoo/trained.py): a tiny UNet trained
# from scratch on few images learns nothing at SD's lr 5e-6. The LoRA is LoCon (attention,
# feed-forward, convolutions) at rank 8: 25% / 12.5% of the tiny UNet's 32 / 64 channels, where
# SD's rank 64 is 20% / 5% of its 320 / 1280.
TINY_RECIPES = {
    "dreambooth": Recipe(steps=1200, lr=1e-4, batch_size=5),
    "lora": Recipe(steps=1500, lr=3e-3, batch_size=5, rank=8, lora_modules="locon"),
}


def default_recipe(unet_config, method: str) -> Recipe:
    """The default recipe for fine-tuning a UNet (or SD3 transformer) with this config by `method`
    ("dreambooth" / "lora").

    Args:
        unet_config: the denoiser's config (dict or diffusers FrozenDict), read for `block_out_channels`
            (a UNet) or `num_attention_heads` x `attention_head_dim` (a transformer).
        method: "dreambooth" or "lora".

    Returns:
        `SD_RECIPES[method]` for a UNet whose first block has >= 320 channels (SD 1.x / 2.x size) or a
        transformer at least that wide (SD3's 1,536), else `TINY_RECIPES[method]`.
    """
    if "block_out_channels" in unet_config:
        width = int(unet_config["block_out_channels"][0])
    else:
        width = int(unet_config["num_attention_heads"]) * int(unet_config["attention_head_dim"])
    return (SD_RECIPES if width >= SD_WIDTH else TINY_RECIPES)[method]


def lora_target_modules(unet, which: str = "attention") -> list[str]:
    """Names of the UNet modules a LoRA adapts.

    Args:
        unet: a diffusers `UNet2DConditionModel`, or an `SD3Transformer2DModel`.
        which: "attention": the attention projections to_q / to_k / to_v / to_out.0 (diffusers'
            `train_dreambooth_lora.py`; a transformer: both streams' projections,
            `SD3_LORA_TARGET_MODULES`, as `train_dreambooth_lora_sd3.py`); "locon": every Linear and
            Conv2d inside the down, mid and up blocks (attention, feed-forward, proj_in / proj_out,
            ResNet conv1 / conv2 / shortcut and time projection, down- and upsampler convolutions), as
            LyCORIS' LoCon adapts them (a transformer: every Linear of its `transformer_blocks`).

    Raises:
        ValueError: an unknown `which`.
    """
    # heavy: torch, diffusers, transformers, peft load when training starts; zoo.scenarios imports this torch-free
    import torch

    if hasattr(unet, "transformer_blocks"):  # SD3's MMDiT
        suffixes = tuple("." + m for m in SD3_LORA_TARGET_MODULES) if which == "attention" else None
        if which not in LORA_MODULES:
            raise ValueError(f"--lora-modules {which!r}: expected one of {', '.join(LORA_MODULES)}")
        return [
            name
            for name, module in unet.named_modules()
            if isinstance(module, torch.nn.Linear)
            and name.startswith("transformer_blocks.")
            and (suffixes is None or name.endswith(suffixes))
        ]
    if which == "attention":
        return [
            name
            for name, module in unet.named_modules()
            if isinstance(module, torch.nn.Linear) and name.endswith(tuple("." + m for m in LORA_TARGET_MODULES))
        ]
    if which == "locon":
        return [
            name
            for name, module in unet.named_modules()
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
            and name.startswith(("down_blocks.", "mid_block.", "up_blocks."))
        ]
    raise ValueError(f"--lora-modules {which!r}: expected one of {', '.join(LORA_MODULES)}")


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that defines a fine-tuning run (written to `finetune.json` beside the weights)."""

    method: str
    caption: str
    steps: int
    lr: float
    batch_size: int
    rank: int
    lora_modules: str
    seed: int
    resolution: int
    dtype: str
    save_dtype: str
    train_text_encoder: bool


def load_images(images: str | Path | Sequence, resolution: int) -> np.ndarray:
    """Training images as the fine-tune sees them: uint8 (B, resolution, resolution, 3), centre-cropped
    and resized (`finextract.images.center_crop_resize`).

    Args:
        images: a folder of image files (read by `finextract.images.read_images`: sorted by name,
            unreadable files named and skipped), or a sequence of file paths, PIL images or uint8
            (H, W, 3) arrays.
        resolution: output side in pixels.

    Raises:
        FileNotFoundError: the folder or a file does not exist.
        ValueError: no readable image, or a listed file that Pillow cannot read (the message names it).
    """
    if isinstance(images, (str, Path)):
        try:
            arrays = read_images(images)[0]
        except (FileNotFoundError, ValueError) as error:
            raise type(error)(f"--images: {error}") from None
    else:
        arrays = [
            read_image(item)
            if isinstance(item, (str, Path))
            else np.asarray(item.convert("RGB") if hasattr(item, "convert") else item)
            for item in images
        ]
    if not arrays:
        raise ValueError("no training images given")
    return np.stack([center_crop_resize(array, resolution) for array in arrays])


def train_loop(
    parameters: list,
    loss_fn: Callable[[object], object],
    *,
    steps: int,
    lr: float,
    device: str,
    dtype: str,
    seed: int,
    weight_decay: float = 1e-2,
    max_grad_norm: float = 1.0,
    desc: str = "finetune",
    progress: bool = True,
    schedule: Literal["constant", "cosine"] = "constant",
) -> list[float]:
    """Run `steps` AdamW steps on `loss_fn(generator)`; return the per-step losses.

    The learning rate is constant (the fine-tuning recipe) or, with `schedule="cosine"`, decays from
    `lr` to 0 over `steps` (used to refine the trained zoo's base).

    Mixed precision: on CUDA with dtype "fp16" / "bf16" the loss runs under autocast (fp16 with a
    gradient scaler); the parameters stay fp32. On a CPU only "fp32" is accepted.

    Raises:
        RuntimeError: the loss became non-finite (the message gives the step and the fix).
    """
    import torch

    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule {schedule!r}: expected 'constant' or 'cosine'")
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    decay = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: 1.0 if schedule == "constant" else 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)),
    )
    autocast_dtype = None if dtype == "fp32" else torch_dtype(dtype)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == "fp16")
    generator = torch.Generator(device=device).manual_seed(seed)
    losses = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, dynamic_ncols=True)
    for step in bar:
        with torch.autocast(device_type="cuda", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = loss_fn(generator)
        if not torch.isfinite(loss):
            raise RuntimeError(
                f"{desc}: the loss is {loss.item()} at step {step}; lower --lr or use --dtype fp32 / bf16"
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        decay.step()
        losses.append(float(loss.detach()))
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    return losses


def finetune(
    base: str | Path,
    images: str | Path | Sequence,
    caption: str,
    *,
    out: str | Path,
    method: Literal["dreambooth", "lora"] = "dreambooth",
    steps: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    rank: int | None = None,
    lora_modules: str | None = None,
    seed: int = 0,
    resolution: int | None = None,
    device: str = "auto",
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32",
    save_dtype: Literal["fp32", "fp16", "bf16"] = "fp32",
    train_text_encoder: bool = False,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Fine-tune the pipeline folder `base` on `images` with one caption and save the result.

    DreamBooth trains every UNet (SD3: transformer) weight (and the SD 1.x text encoder if
    `train_text_encoder`) and saves a full diffusers pipeline folder (safetensors). An SD3 base trains
    with flow matching (`finextract.objectives`), its captions encoded as its pipeline encodes them. LoRA adds peft adapters of rank `rank`
    (alpha = rank, so scale 1) on the modules `lora_target_modules(unet, lora_modules)` names and saves
    `out/pytorch_lora_weights.safetensors` in diffusers' format (keys `unet.<module>.lora_A/lora_B.weight`, SD3 `transformer.<module>...`,
    rank and alpha in the metadata), as `StableDiffusionLoraLoaderMixin.save_lora_weights` writes it. Both write `finetune.json` (with the
    image count, caption, base name and hashes) and the same in kohya's `ss_*` and the model spec's keys
    into the weights file's metadata (`finextract.engine.metadata.finetune_metadata`).
    Settings left as None come from `default_recipe` for the base's UNet (SD 1.x values for SD-size
    models, the trained zoo's for tiny ones). A warning is logged when the loss has not fallen.

    Args:
        base: diffusers Stable Diffusion 1.x or SD3 pipeline folder with safetensors weights.
        images: folder of training images, or a sequence of paths / PIL images / uint8 arrays.
        caption: the instance prompt, e.g. "a photo of sks dog".
        out: output folder (created).
        method: "dreambooth" or "lora".
        steps: optimiser steps (>= 1); default from the recipe (SD: 800 DreamBooth / 2000 LoRA).
        lr: AdamW learning rate, constant; default from the recipe (SD: 5e-6 DreamBooth / 1e-4
            LoRA, diffusers' example values; tiny: 1e-4 / 3e-3).
        batch_size: images per step, drawn with replacement by the seeded generator (SD: 1, tiny: 5).
        rank: LoRA rank r (LoRA only; SD: 64, tiny: 8).
        lora_modules: "attention" or "locon" (`lora_target_modules`; SD: attention, tiny: locon).
        seed: seeds adapter init, image order, timesteps and noise.
        resolution: training side in pixels; default the UNet sample size x the VAE factor.
        device: "auto", "cpu" or "cuda[:N]".
        dtype: "fp32", or "fp16" / "bf16" autocast (CUDA only).
        save_dtype: dtype of the saved weights.
        train_text_encoder: DreamBooth only: also train the text encoder.
        progress: show a tqdm bar with the running loss.
        overwrite: replace a fine-tune in `out` made with other settings instead of refusing it
            (`--overwrite`). The folder is written whole into a hidden sibling and swapped in, so no
            file of an earlier fine-tune (e.g. a LoRA file beside a DreamBooth pipeline) remains.

    Returns:
        The output folder.

    Raises:
        ValueError: bad method, steps, batch size, rank, dtype or images; a pipeline class other than
            SD 1.x / SD3's, or `train_text_encoder` on SD3; `out` holding another
            command's output, files of no finextract run, or (without `overwrite`) a fine-tune with
            other settings (`finextract.store.folders.prepare`; checked before training).
        FileNotFoundError: `base` or an image is missing.
        RuntimeError: the loss became non-finite.
    """
    import torch

    if method not in ("dreambooth", "lora"):
        raise ValueError(f"--method {method!r}: expected 'dreambooth' or 'lora'")
    for name, value in (("steps", steps), ("batch-size", batch_size), ("rank", rank)):
        if value is not None and value < 1:
            raise ValueError(f"--{name} {value}: must be >= 1")
    if lora_modules is not None and lora_modules not in LORA_MODULES:
        raise ValueError(f"--lora-modules {lora_modules!r}: expected one of {', '.join(LORA_MODULES)}")
    for name, value in (("dtype", dtype), ("save_dtype", save_dtype)):
        if value not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"--{name.replace('_', '-')} {value!r}: expected one of bf16, fp16, fp32")
    if train_text_encoder and method == "lora":
        raise ValueError("train_text_encoder is for DreamBooth; LoRA here adapts the UNet only")
    device = resolve_device(device)
    if dtype != "fp32" and not device.startswith("cuda"):
        raise ValueError(f"--dtype {dtype} autocast needs a CUDA device; use --dtype fp32 on {device}")
    given = {  # what defines the run, as given (None: the recipe's default)
        "base": str(Path(base).resolve()),
        "images": str(Path(images).resolve()) if isinstance(images, (str, Path)) else f"{len(images)} given",
        **dict(caption=caption, method=method, steps=steps, lr=lr, batch_size=batch_size, rank=rank),
        **dict(lora_modules=lora_modules, seed=seed, resolution=resolution, dtype=dtype, save_dtype=save_dtype),
        "train_text_encoder": train_text_encoder,
    }
    out = prepare(out, "finetune", given, overwrite=overwrite).path

    parts = load_parts(base)
    unet, vae, text_encoder, scheduler = parts.denoiser, parts.vae, parts.text_encoders[0], parts.scheduler
    if train_text_encoder and parts.family == "sd3":
        raise ValueError("--train-text-encoder: SD3 fine-tunes here train the transformer only; leave it out")
    recipe = default_recipe(unet.config, method)
    steps = recipe.steps if steps is None else steps
    lr = recipe.lr if lr is None else float(lr)
    batch_size = recipe.batch_size if batch_size is None else batch_size
    rank = recipe.rank if rank is None else rank
    lora_modules = recipe.lora_modules if lora_modules is None else lora_modules
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    resolution = resolution or unet.config.sample_size * factor
    pixels = load_images(images, resolution)
    config = FinetuneConfig(
        method,
        caption,
        steps,
        lr,
        batch_size,
        rank,
        lora_modules,
        seed,
        resolution,
        dtype,
        save_dtype,
        train_text_encoder,
    )
    logger.info("fine-tuning %s on %d images at %d px: %s", base, len(pixels), resolution, config)

    # 1. Latent distribution of every image, once (the VAE is frozen): mean and std.
    vae.to(device).requires_grad_(False)
    with torch.no_grad():
        x = torch.from_numpy(pixels).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        dist = vae.encode(x).latent_dist
        latent_mean, latent_std = dist.mean, dist.std

    # 2. What trains.
    unet.to(device).train()
    for encoder in parts.text_encoders:
        encoder.to(device).requires_grad_(train_text_encoder)
    if method == "lora":
        from peft import LoraConfig

        torch.manual_seed(seed)  # peft draws lora_A from the global generator
        unet.requires_grad_(False)
        targets = lora_target_modules(unet, lora_modules)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets))
    parameters = [p for p in unet.parameters() if p.requires_grad]
    if train_text_encoder:
        text_encoder.train()
        parameters += list(text_encoder.parameters())
    with torch.no_grad():
        fixed = None if train_text_encoder else caption_conditioning(parts, [caption])

    def loss_fn(generator):
        index = torch.randint(0, len(pixels), (batch_size,), generator=generator, device=device)
        noise = torch.randn(latent_mean[index].shape, generator=generator, device=device)
        latents = vae_latents(vae, latent_mean[index], latent_std[index], noise)
        conditioning = caption_conditioning(parts, [caption]) if train_text_encoder else fixed
        rows = {name: value.expand(batch_size, *value.shape[1:]) for name, value in conditioning.items()}
        return training_loss(scheduler, latents, lambda x_t, t: predict(unet, x_t, t, rows), generator)

    losses = train_loop(
        parameters,
        loss_fn,
        steps=steps,
        lr=lr,
        device=device,
        dtype=dtype,
        seed=seed,
        desc=f"finetune {method}",
        progress=progress,
    )

    # 3. Save the format users download, into a staging folder swapped in whole at the end.
    staged = stage(out)
    save_torch_dtype = torch_dtype(save_dtype)
    unet.eval()
    if method == "lora":
        _save_lora(parts, staged, save_torch_dtype, rank, targets)
    else:
        _save_pipeline(base, parts, staged, save_torch_dtype)

    first, last, fell = loss_fall(losses)
    trained = _trained_record(base, images, len(pixels), config, parts.family)
    denoiser_folder = "transformer" if parts.family == "sd3" else "unet"
    for file in (staged / "pytorch_lora_weights.safetensors", staged / denoiser_folder / WEIGHTS_FILE):
        if file.is_file():  # the trainers' keys, in the weights themselves
            add_safetensors_metadata(file, finetune_metadata(**trained["keys"]))
    record = (
        asdict(config)
        | trained["record"]
        | {
            "base": str(base),
            "first_loss": first,
            "final_loss": float(np.mean(losses[-50:])),
            "loss_fell": fell,
            "device": device,
            "run_folder": run_entry("finetune", given),
        }
    )
    write_json(staged / "finetune.json", record, newline=True)
    replace_folder(out, staged)
    logger.info("saved the %s fine-tune to %s (mean loss of the last 50 steps %.4f)", method, out, record["final_loss"])
    if not fell:
        logger.warning(
            "finetune: the loss has not fallen (mean %.4f over the first quarter of the steps, %.4f over the "
            "last): the fine-tune has probably learnt little from the images; raise --lr or --steps",
            first,
            last,
        )
    return out


def _trained_record(base, images, num_images: int, config: FinetuneConfig, family: str = "sd1") -> dict:
    """What a fine-tune records of its training (`finextract.engine.metadata`): {"record": the fields
    added to finetune.json (`num_images`, `base_name`, `base_unet_hash`, `base_unet_sha256`,
    `base_family`), "keys": `finetune_metadata`'s arguments}. The base hashes are kohya's
    (`kohya_model_hashes`) of the base's denoiser weights file (`unet/`, SD3's `transformer/`)."""
    unet_file = Path(base) / ("transformer" if family == "sd3" else "unet") / WEIGHTS_FILE
    hashes = kohya_model_hashes(unet_file) if unet_file.is_file() else {}
    folder = Path(images).name if isinstance(images, (str, Path)) else "images"
    record = {"num_images": num_images, "base_name": Path(base).resolve().name, "base_family": family}
    record |= {"base_unet_hash": hashes.get("ss_sd_model_hash"), "base_unet_sha256": hashes.get("ss_new_sd_model_hash")}
    keys = dict(method=config.method, caption=config.caption, num_images=num_images, image_folder=folder)
    keys |= dict(steps=config.steps, lr=config.lr, batch_size=config.batch_size, rank=config.rank, alpha=config.rank)
    keys |= dict(resolution=config.resolution, seed=config.seed, dtype=config.dtype, base_name=record["base_name"])
    if family == "sd3":  # flow matching: the velocity (`engine.loading.checks.agreed_scheduler`'s "flow")
        keys |= dict(family="sd3", prediction_type="flow")
    return {"record": record, "keys": keys | {"base_hashes": hashes}}


# The denoising loss of one step varies by a factor of several with its random timesteps, so the fall
# is judged on quarter means; 5% separates "learnt" (the tiny DreamBooth falls ~40%) from "flat".
LOSS_FALL = 0.05


def loss_fall(losses: Sequence[float]) -> tuple[float, float, bool]:
    """(mean of the first quarter, mean of the last quarter, whether the last is >= 5% lower).

    Fewer than 8 steps never count as fallen (too few to tell).
    """
    quarter = len(losses) // 4
    if quarter < 2:
        mean = float(np.mean(losses)) if len(losses) else float("nan")
        return mean, mean, False
    first, last = float(np.mean(losses[:quarter])), float(np.mean(losses[-quarter:]))
    return first, last, last <= (1 - LOSS_FALL) * first


def _save_lora(parts, out: Path, dtype, rank: int, targets: list[str]) -> None:
    """Save the denoiser's peft adapters as diffusers does (`save_lora_weights`): keys
    `unet.<module>.lora_A.weight` / `.lora_B.weight` (SD3: `transformer.<module>...`) and the rank /
    alpha in the file's metadata.

    The keys stay in peft's naming for every module: diffusers' `convert_state_dict_to_diffusers`
    renames only attention projections (to `lora.down` / `lora.up`), which would mix two namings in a
    LoCon file.
    """
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(parts.denoiser)
    layers = {key: value.detach().to("cpu", dtype).contiguous() for key, value in state.items()}
    metadata = dict(r=rank, lora_alpha=rank, target_modules=sorted(targets))
    prefix = "transformer" if parts.family == "sd3" else "unet"
    parts.pipeline_class.save_lora_weights(
        out, **{f"{prefix}_lora_layers": layers, f"{prefix}_lora_adapter_metadata": metadata}, safe_serialization=True
    )


def _save_pipeline(base, parts, out: Path, dtype) -> None:
    """Save `base`'s pipeline (its own VAE, tokenizers, scheduler class) with the trained parts."""
    import torch

    if parts.family == "sd3":  # parts the folder saved as null (T5, the IP-Adapter's) are passed as None
        index = json.loads((Path(base) / "model_index.json").read_text())
        absent = ("text_encoder_3", "tokenizer_3", "image_encoder", "feature_extractor")
        trained = {"transformer": parts.denoiser} | {
            name: None for name in absent if (index.get(name) or [None, None])[1] is None
        }
    else:  # no safety checker: the tiny and research pipelines have none
        trained = {"unet": parts.denoiser, "text_encoder": parts.text_encoders[0].eval()}
        trained |= dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline = parts.pipeline_class.from_pretrained(base, **trained, use_safetensors=True, torch_dtype=torch.float32)
    pipeline.to("cpu", dtype)
    pipeline.save_pretrained(out, safe_serialization=True)
