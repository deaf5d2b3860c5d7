"""The flow-matching families end to end: SD3 through finextract's loop equals diffusers'
`StableDiffusion3Pipeline` on every rule's reduction to CFG, on torch and onnxruntime."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from finextract.engine.sampler import start_latents
from finextract.generation import generate
from finextract.zoo.configs import ZOO_CAPTION

STEPS = 3
W = 4.0
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def sd3_components(tmp_path_factory):
    from finextract.zoo.models import tiny_components

    return tiny_components(0, tmp_path_factory.mktemp("sd3") / "tokenizer", family="sd3")


def sd3_pair(components, *, finetuned=None, t5: bool = True):
    """A DreamBooth-kind SD3 `ModelPair` on the components; its fine-tuned transformer `finetuned` (a
    copy of the base's by default: base == fine-tuned, two modules back to back)."""
    from finextract.engine.pair import ModelPair

    return ModelPair(
        kind="dreambooth",
        base_unet=components["transformer"],
        finetuned_unet=copy.deepcopy(components["transformer"]) if finetuned is None else finetuned,
        unet_lora=None,
        base_text_encoder=components["text_encoder"],
        finetuned_text_encoder=components["text_encoder"],
        base_tokenizer=components["tokenizer"],
        vae=components["vae"],
        scheduler_config=dict(components["scheduler"].config),
        family="sd3",
        base_text_encoder_2=components["text_encoder_2"],
        base_tokenizer_2=components["tokenizer_2"],
        base_text_encoder_3=components["text_encoder_3"] if t5 else None,
        base_tokenizer_3=components["tokenizer_3"] if t5 else None,
    )


def pipeline_images(components, *, t5: bool = True) -> torch.Tensor:
    """`StableDiffusion3Pipeline(prompt, negative_prompt="", guidance_scale=W)` from our start latents, uint8
    as diffusers' `numpy_to_pil` rounds them."""
    from diffusers import StableDiffusion3Pipeline

    parts = dict(components) if t5 else dict(components, text_encoder_3=None, tokenizer_3=None)
    pipeline = StableDiffusion3Pipeline(**parts)
    pipeline.set_progress_bar_config(disable=True)
    latents = start_latents(SEEDS, (16, 16, 16))
    with torch.no_grad():
        result = pipeline(
            [ZOO_CAPTION] * len(SEEDS),
            negative_prompt=[""] * len(SEEDS),
            num_inference_steps=STEPS,
            guidance_scale=W,
            latents=latents,
            height=32,
            width=32,
            output_type="np",
        ).images
    return torch.from_numpy((result * 255).round().astype(np.uint8))


def _assert_within_two_levels(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    # Same weights, latents and arithmetic up to the order of float32 operations (a 2B batch vs the
    # pipeline's, the fused row vs FlowMatchEulerDiscreteScheduler.step): latents agree to ~1e-5, so a
    # pixel may round to the next level; 2 levels is the acceptance bound, while a wrong conditioning
    # (pooled projections, T5 padding) or a wrong sigma moves pixels by tens of levels.
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == torch.uint8
    assert (ours.int() - theirs.int()).abs().max().item() <= 2


@pytest.fixture(scope="module")
def sd3_pipeline_images(sd3_components):
    return pipeline_images(sd3_components)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_sd3_cfg_and_finextract_k0_reproduce_the_pipeline(sd3_components, sd3_pipeline_images, backend):
    """base == fine-tuned and k = 0: Eq. 13 is CFG with scale w, so both equal StableDiffusion3Pipeline."""
    pair = sd3_pair(sd3_components)
    options = dict(steps=STEPS, scheduler="euler", seed=SEEDS[0], batch_size=len(SEEDS), backend=backend)
    cfg = generate(pair, ZOO_CAPTION, len(SEEDS), method="cfg", w=W, progress=False, **options).images
    finextract = generate(pair, ZOO_CAPTION, len(SEEDS), method="finextract", w=W, k=0.0, progress=False, **options)
    _assert_within_two_levels(cfg, sd3_pipeline_images)
    _assert_within_two_levels(finextract.images, sd3_pipeline_images)
    # not trivially equal: guidance changes the images (Direct, guidance scale 1, differs)
    direct = generate(pair, ZOO_CAPTION, len(SEEDS), method="direct", progress=False, **dict(options, backend="torch"))
    assert (direct.images.int() - sd3_pipeline_images.int()).abs().max().item() > 10


def test_sd3_without_t5_is_the_pipelines_without_t5(sd3_components, sd3_pipeline_images):
    """text_encoder_3 = None: zeros in T5's place, as the pipeline does; the images change without T5."""
    pair = sd3_pair(sd3_components, t5=False)
    options = dict(steps=STEPS, scheduler="euler", seed=SEEDS[0], batch_size=len(SEEDS), progress=False)
    ours = generate(pair, ZOO_CAPTION, len(SEEDS), method="cfg", w=W, backend="torch", **options).images
    theirs = pipeline_images(sd3_components, t5=False)
    _assert_within_two_levels(ours, theirs)
    assert (theirs.int() - sd3_pipeline_images.int()).abs().max().item() > 2
