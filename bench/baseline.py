"""The plain diffusers way, as the paper's released code samples: the reference every benchmark beats.

Two `StableDiffusionPipeline` objects (pretrained and fine-tuned), fp32, batch 5; at each DDIM step
the two UNet calls of the rule run one after the other, the guidance is combined in eager torch and
`DDIMScheduler.step(eta=0)` updates the latents; the VAE decodes each batch and the pipeline's image
processor post-processes it. Start latents are the project's (`seed + i` per image), so the images
can be compared with `finextract.generation` one for one.

    images = baseline_generate(pair, caption, 20)             # uint8 (N, H, W, 3)
    figures = measure(method="finextract", kind="lora", zoo=Path("zoo"))   # images/s, for bench_backends
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch

BATCH_SIZE = 5  # the paper's released code


def _plain_unet(unet):
    """A copy of `unet` without the gated LoRA hooks a LoRA pair's base UNet carries: a plain diffusers UNet."""
    from finextract.engine.lora import GatedLoRA

    unet = copy.deepcopy(unet)
    for module in unet.modules():
        for key, hook in list(module._forward_hooks.items()):
            if isinstance(hook, GatedLoRA):
                del module._forward_hooks[key]
    return unet


def diffusers_pipelines(pair):
    """(pretrained, fine-tuned) `StableDiffusionPipeline`s on the pair's device in fp32, DDIM from the model config.

    A LoRA pair's fine-tuned UNet is a copy of the base UNet with the adapters merged in.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from finextract.engine.lora import merge_lora

    base_unet = _plain_unet(pair.base_unet).float()
    if pair.finetuned_unet is None:
        layers = pair.unet_lora or {}
        lora_device = next((layer.down.device for layer in layers.values()), base_unet.device)
        # merged where the adapters live (merge_lora adds in place), then on the pair's device
        finetuned_unet = merge_lora(copy.deepcopy(base_unet).to(lora_device), layers).to(base_unet.device)
    else:
        finetuned_unet = _plain_unet(pair.finetuned_unet).float()
    pipelines = []
    sides = (
        (base_unet, pair.base_text_encoder, pair.base_tokenizer),
        (finetuned_unet, pair.finetuned_text_encoder, pair.finetuned_tokenizer),
    )
    for unet, text_encoder, tokenizer in sides:
        pipeline = StableDiffusionPipeline(
            vae=pair.vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=DDIMScheduler.from_config(pair.scheduler_config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipeline.set_progress_bar_config(disable=True)
        pipelines.append(pipeline)
    return tuple(pipelines)


def prompt_embeddings(pipelines, rule, caption: str, batch: int, device) -> dict:
    """Each rule term's prompt embeddings, term key -> (batch, tokens, width), from its own side's
    pipeline (`pipelines`: (pretrained, fine-tuned), as `diffusers_pipelines` returns them)."""
    by_model = dict(zip(("base", "finetuned"), pipelines))
    return {
        term.key: by_model[term.model].encode_prompt(
            caption if term.caption == "prompt" else "", device, batch, do_classifier_free_guidance=False
        )[0]
        for term in rule.terms
    }


def guided_step(unets: dict, rule, embeddings: dict, latents: torch.Tensor, t, scheduler) -> torch.Tensor:
    """The plain diffusers guided DDIM step, the one reference every benchmark compares with: the rule's
    UNet calls one after the other (`unets`: "base" / "finetuned" -> UNet), their guidance combined in
    eager torch, then `DDIMScheduler.step(eta=0)`. Returns x_{t-1}, the shape of `latents`."""
    eps = 0
    for term in rule.terms:
        eps = eps + term.coef * unets[term.model](latents, t, encoder_hidden_states=embeddings[term.key]).sample
    return scheduler.step(eps, t, latents, eta=0.0).prev_sample


@torch.no_grad()
def baseline_generate(
    pair,
    caption: str,
    num_images: int,
    *,
    method: str = "finextract",
    w=None,
    k=None,
    steps: int = 50,
    batch_size: int = BATCH_SIZE,
    seed: int = 0,
    pipelines=None,
) -> torch.Tensor:
    """Sample like the paper's code: uint8 images (N, H, W, 3), image i from seed `seed + i`.

    Args mirror `finextract.generation.generate`; `pipelines` reuses `diffusers_pipelines(pair)`.
    """
    from finextract.engine.sampler import start_latents
    from finextract.rules import rule_for

    rule = rule_for(method, pair.kind, w, k)
    pipe_base, pipe_ft = pipelines = pipelines or diffusers_pipelines(pair)
    unets = {"base": pipe_base.unet, "finetuned": pipe_ft.unet}
    scheduler = pipe_ft.scheduler
    scheduler.set_timesteps(steps)
    unet_config = pipe_ft.unet.config
    shape = (unet_config.in_channels, unet_config.sample_size, unet_config.sample_size)
    device = pipe_ft.unet.device
    outputs = []
    for start in range(0, num_images, batch_size):
        seeds = range(seed + start, seed + min(start + batch_size, num_images))
        embeddings = prompt_embeddings(pipelines, rule, caption, len(seeds), device)
        latents = start_latents(seeds, shape).to(device)
        for t in scheduler.timesteps:
            latents = guided_step(unets, rule, embeddings, latents, t, scheduler)
        image = pipe_ft.vae.decode(latents / pipe_ft.vae.config.scaling_factor, return_dict=False)[0]
        image = pipe_ft.image_processor.postprocess(image, output_type="pt")  # (B, 3, H, W) in [0, 1]
        outputs.append((image * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu())
    return torch.cat(outputs)


def load_zoo_pair(kind: str, zoo: Path):
    """The random tiny zoo's DreamBooth or LoRA pair (`finextract.zoo.build.build_zoo` layout)."""
    from finextract.engine.loading import load_model_pair

    zoo = Path(zoo)
    if kind == "dreambooth":
        return load_model_pair(zoo / "base", zoo / "dreambooth")
    return load_model_pair(zoo / "base", lora=zoo / "lora" / "pytorch_lora_weights.safetensors")


def measure(
    method: str = "finextract",
    kind: str = "dreambooth",
    zoo: Path | None = None,
    *,
    num_images: int = 10,
    steps: int = 50,
    caption: str = "a photo of sks dog",
) -> dict:
    """Images/s of the plain diffusers way (batch 5, fp32, CPU) on the zoo pair, end to end with decode."""
    from finextract.engine.config import set_threads

    threads = set_threads()
    pair = load_zoo_pair(kind, zoo)
    pipelines = diffusers_pipelines(pair)
    baseline_generate(pair, caption, BATCH_SIZE, method=method, steps=2, pipelines=pipelines)  # warm-up
    started = time.perf_counter()
    baseline_generate(pair, caption, num_images, method=method, steps=steps, pipelines=pipelines)
    seconds = time.perf_counter() - started
    return {
        "way": "plain diffusers: 2 StableDiffusionPipelines, sequential UNet calls, DDIMScheduler.step, fp32",
        "batch": BATCH_SIZE,
        "steps": steps,
        "num_images": num_images,
        "threads": threads,
        "seconds": round(seconds, 3),
        "images_per_s": round(num_images / seconds, 3),
        "note": "end to end (text encoding, UNet steps, VAE decode)",
    }
