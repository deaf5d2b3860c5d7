"""`build_flow_zoo`: a trained tiny flow-matching pair, an SD3-architecture base trained with rectified
flow on the trained zoo's pretraining images, and a DreamBooth and a LoRA fine-tune of it on the object
scenario's 5 photographs (`finextract zoo build --trained --families sd3`).

Sized for a 2-core CPU (about half an hour in all on 1 thread):
- The VAE, the CLIP tokenizer and the CLIP text encoder are the committed trained zoo's
  (`default_zoo_folder()/base`): the VAE is SD 1.x's 4-channel one (shift_factor 0, its measured
  scaling_factor), so the transformer takes 4 latent channels, not SD3's 16; both of SD3's CLIP
  encoders are that trained encoder with a random (seeded) pooled projection, frozen; no T5 (SD3 runs
  without it: zeros in its place).
- The transformer (`SD3Transformer2DModel`, `FLOW_TRANSFORMER_CONFIG`) is trained from scratch with
  `finextract.objectives.flow_matching_noising` (logit-normal sigmas over SD3's shift-3 training sigmas,
  velocity target), 10% empty captions, cosine-decayed LR.
- The fine-tunes are `finextract.finetuning.finetune` on the saved base (what `finextract finetune`
  runs), DreamBooth saved as a bare `transformer/` folder.
Each stage is cached under a key of the recipe numbers it depends on, as `finextract.zoo.trained`.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..finetuning import train_loop
from ..images import read_image
from ..objectives import training_loss
from ..training_parts import predict, sd3_conditioning
from .configs import SD3_SCHEDULER_CONFIG, TINY_SD3_TRANSFORMER_CONFIG
from .scenarios import PRETRAIN_IMAGES, SCENARIOS, finetune_set, package_file, random_crops, scenario_folder
from .trained import _strip_local_paths, cached_folder, default_zoo_folder, finetune_zoo_model, write_training_set
from .training import latent_parameters

# SD3's MMDiT at 4 layers of width 64 (4 heads x 16), patch 2 on the committed VAE's 4-channel 16 x 16
# latents (64 image tokens); 0.59 M parameters, ~0.3 s per batch-16 step on one CPU thread.
FLOW_TRANSFORMER_CONFIG = dict(
    TINY_SD3_TRANSFORMER_CONFIG,
    in_channels=4,
    out_channels=4,
    num_layers=4,
    attention_head_dim=16,
    num_attention_heads=4,
    caption_projection_dim=64,
)


@dataclass(frozen=True)
class FlowZooRecipe:
    """Every number that defines the flow pair (hashed into each stage's cache key)."""

    seed: int = 0
    resolution: int = 32
    crops_per_image: int = 300
    base_steps: int = 2000
    base_batch: int = 16
    base_lr: float = 1e-3
    empty_caption_rate: float = 0.1
    dreambooth_steps: int = 4000
    dreambooth_lr: float = 3e-4
    lora_steps: int = 4000
    lora_lr: float = 3e-3
    lora_rank: int = 8
    lora_modules: str = "locon"
    finetune_batch: int = 5

    def key(self, *fields: str) -> str:
        values = {name: getattr(self, name) for name in fields} | {"transformer": FLOW_TRANSFORMER_CONFIG}
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


BASE_FIELDS = ("seed", "resolution", "crops_per_image", "base_steps", "base_batch", "base_lr", "empty_caption_rate")
FINETUNE_FIELDS = {
    "dreambooth": ("dreambooth_steps", "dreambooth_lr", "finetune_batch"),
    "lora": ("lora_steps", "lora_lr", "lora_rank", "lora_modules", "finetune_batch"),
}


def flow_base_components(seed: int, zoo: Path | None = None) -> dict:
    """StableDiffusion3Pipeline components: a random `FLOW_TRANSFORMER_CONFIG` transformer (seed
    `seed`), the committed zoo's VAE (shift_factor set to 0) and CLIP tokenizer, its CLIP encoder as
    both `CLIPTextModelWithProjection`s (projections seeded `seed + 2`, `seed + 3`), no T5."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    folder = (zoo or default_zoo_folder()) / "base"
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**FLOW_TRANSFORMER_CONFIG)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", use_safetensors=True, torch_dtype=torch.float32)
    vae.register_to_config(shift_factor=0.0)  # the pipeline adds it when decoding; SD 1.x's VAE has none
    encoders = []
    for offset in (2, 3):
        torch.manual_seed(seed + offset)  # the projection transformers initialises (absent from a CLIPTextModel)
        encoders.append(
            CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder", dtype=torch.float32).eval()
        )
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    return dict(
        transformer=transformer,
        vae=vae.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER_CONFIG),
        text_encoder=encoders[0],
        tokenizer=tokenizer,
        text_encoder_2=encoders[1],
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def train_flow_base(components: dict, pool: np.ndarray, captions: list[str], recipe: FlowZooRecipe, progress=True):
    """Train `components["transformer"]` in place with flow matching on captioned crops (uint8
    (n, 32, 32, 3) `pool`, one caption each; `recipe.empty_caption_rate` of the rows get ""); the
    text encoders stay frozen, so each distinct caption is encoded once. Returns the per-step losses."""
    transformer, vae, scheduler = components["transformer"], components["vae"], components["scheduler"]
    mean, logvar = latent_parameters(vae, pool).chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30, 20))
    distinct = sorted(set(captions)) + [""]  # last: the empty caption
    row_of = torch.tensor([distinct.index(c) for c in captions])
    with torch.no_grad():
        encoders = [components["text_encoder"], components["text_encoder_2"]]
        tokenizers = [components["tokenizer"], components["tokenizer_2"]]
        table = sd3_conditioning(encoders, tokenizers, distinct, transformer.config.joint_attention_dim)
    shift, scaling = vae.config.shift_factor or 0.0, vae.config.scaling_factor

    def loss_fn(generator):
        index = torch.randint(0, len(pool), (recipe.base_batch,), generator=generator)
        drop = torch.rand(recipe.base_batch, generator=generator) < recipe.empty_caption_rate
        rows = torch.where(drop, torch.full_like(index, len(distinct) - 1), row_of[index])
        latents = (mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator) - shift) * scaling
        conditioning = {name: value[rows] for name, value in table.items()}
        return training_loss(scheduler, latents, lambda x, t: predict(transformer, x, t, conditioning), generator)

    transformer.train()
    losses = train_loop(
        list(transformer.parameters()),
        loss_fn,
        steps=recipe.base_steps,
        lr=recipe.base_lr,
        device="cpu",
        dtype="fp32",
        seed=recipe.seed + 21,
        desc="flow zoo: base transformer",
        progress=progress,
        schedule="cosine",
    )
    transformer.eval()
    return losses


def _pretraining_set(recipe: FlowZooRecipe):
    rng = np.random.default_rng(recipe.seed)
    pretrain = [(read_image(package_file(pkg, name)), caption) for pkg, name, caption in PRETRAIN_IMAGES]
    crops = [random_crops(image, recipe.crops_per_image, recipe.resolution, rng) for image, _ in pretrain]
    captions = [caption for (_, caption), group in zip(pretrain, crops) for _ in range(len(group))]
    return np.concatenate(crops), captions


def build_flow_base(out: Path, recipe: FlowZooRecipe, *, cache=None, progress: bool = True) -> dict:
    """The base pipeline (fp16 safetensors) into `out/base`, with `losses.json` (the mean loss of the
    first and of the last 100 steps); returns its timing."""
    from .trained import _save_fp16_pipeline

    base_dir = out / "base"

    def build() -> None:
        components = flow_base_components(recipe.seed)
        pool, captions = _pretraining_set(recipe)
        losses = train_flow_base(components, pool, captions, recipe, progress)
        _save_fp16_pipeline(components, base_dir)
        record = {"first_100": float(np.mean(losses[:100])), "last_100": float(np.mean(losses[-100:]))}
        (base_dir / "losses.json").write_text(json.dumps(record) + "\n")

    entry = Path(cache) / f"sd3-base-{recipe.key(*BASE_FIELDS)}" if cache else None
    return cached_folder(base_dir, entry, "model_index.json", build, "the flow base")


def build_flow_finetune(out: Path, recipe: FlowZooRecipe, method: str, *, cache=None, progress=True) -> dict:
    """The object scenario's `method` fine-tune of `out/base` into `out/<method>`
    (`finextract.zoo.trained.finetune_zoo_model`: a DreamBooth keeps only its `transformer/`), cached
    by the recipe, the caption and the images. Returns its timing."""
    entry = None
    if cache:
        images = finetune_set("object", recipe.resolution)[1]
        fields = recipe.key(*BASE_FIELDS, *FINETUNE_FIELDS[method]) + SCENARIOS["object"].caption
        key = hashlib.sha256(fields.encode() + images.tobytes()).hexdigest()[:16]
        entry = Path(cache) / f"sd3-object-{method}-{key}"
    return cached_folder(
        scenario_folder(out, "object") / method,
        entry,
        "finetune.json",
        lambda: finetune_zoo_model(out, recipe, "object", method, progress),
        f"the flow {method} fine-tune",
    )


def build_flow_zoo(
    out: str | Path,
    recipe: FlowZooRecipe = FlowZooRecipe(),
    *,
    cache: str | Path | None = None,
    progress: bool = True,
    methods: tuple[str, ...] = ("dreambooth", "lora"),
) -> Path:
    """Build the flow pair into `out`: base/ (StableDiffusion3Pipeline), train/, caption.txt,
    dreambooth/ (bare transformer/), lora/ (pytorch_lora_weights.safetensors) and flow_zoo.json
    (recipe, timings, losses). Deterministic for a recipe and thread count; `cache` as
    `finextract.zoo.trained.build_trained_zoo`'s.

    Raises:
        ValueError: an unknown method.
    """
    for method in methods:
        if method not in FINETUNE_FIELDS:
            raise ValueError(f"method {method!r}: expected some of dreambooth, lora")
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings = {"base": build_flow_base(out, recipe, cache=cache, progress=progress)}
    write_training_set(out, "object", recipe.resolution)
    for method in methods:
        timings[method] = build_flow_finetune(out, recipe, method, cache=cache, progress=progress)
    _strip_local_paths(out)
    timings["total"] = {"seconds": round(time.perf_counter() - started, 1), "reused": False}
    losses = {"base": json.loads((out / "base" / "losses.json").read_text())}
    for method in methods:
        record = json.loads((out / method / "finetune.json").read_text())
        losses[method] = {"first_quarter": record["first_loss"], "last_50": record["final_loss"]}
    record = {
        "recipe": asdict(recipe),
        "transformer": FLOW_TRANSFORMER_CONFIG,
        "losses": losses,
        "timings": timings,
        "threads": torch.get_num_threads(),
    }
    (out / "flow_zoo.json").write_text(json.dumps(record, indent=2) + "\n")
    return out
