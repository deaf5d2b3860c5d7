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


def sd3_pair(components, *, finetuned=None, t5: bool = True, lora=None):
    """An SD3 `ModelPair` on the components: LoRA-kind with `lora` (module path -> LoRALayer on the base
    transformer), else DreamBooth-kind with the fine-tuned transformer `finetuned` (a copy of the base's by
    default: base == fine-tuned, two modules back to back)."""
    from finextract.engine.pair import ModelPair

    if lora is None and finetuned is None:
        finetuned = copy.deepcopy(components["transformer"])
    return ModelPair(
        kind="lora" if lora else "dreambooth",
        base_unet=components["transformer"],
        finetuned_unet=finetuned,
        unet_lora=lora,
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


@pytest.fixture(scope="module")
def sd3_folders(sd3_components, tmp_path_factory):
    """base/ (the components as a `StableDiffusion3Pipeline` folder) and dreambooth/ (its transformer perturbed)."""
    from finextract.zoo.models import perturbed_copy, save_pipeline

    root = tmp_path_factory.mktemp("sd3_zoo")
    save_pipeline(sd3_components, root / "base")
    tuned = dict(sd3_components, transformer=perturbed_copy(sd3_components["transformer"], 1000))
    save_pipeline(tuned, root / "dreambooth")
    return root


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "openvino"])
def test_sd3_cfg_and_finextract_k0_reproduce_the_pipeline(sd3_folders, sd3_pipeline_images, backend):
    """base == fine-tuned and k = 0: Eq. 13 is CFG with scale w, so both equal StableDiffusion3Pipeline.
    The pair is loaded from the pipeline folder (two transformers, back to back)."""
    from finextract.engine.loading import load_model_pair

    pair = load_model_pair(sd3_folders / "base", sd3_folders / "base")
    assert pair.family.name == "sd3" and type(pair.base_unet).__name__ == "SD3Transformer2DModel"
    assert pair.finetuned_unet is not pair.base_unet and pair.base_text_encoder_3 is not None
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


def test_sd3_folders_are_detected_and_checked(sd3_folders, tmp_path):
    """Family from the folder's configs; a DreamBooth fine-tune loads as a second transformer; a fine-tune of
    another family is refused naming both; the flow scheduler records the velocity, not a prediction type."""
    from finextract.engine.families import FamilyMismatchError, UnknownFamilyError, detect_family
    from finextract.engine.loading import load_model_pair
    from finextract.engine.loading.folders import folder_family
    from finextract.zoo.models import build_base

    family, index = folder_family(sd3_folders / "base", "base")
    assert family.name == "sd3" and index["_class_name"] == "StableDiffusion3Pipeline"
    pair = load_model_pair(sd3_folders / "base", sd3_folders / "dreambooth")
    assert pair.kind == "dreambooth" and pair.sources["prediction_type"]["used"] == "flow"
    assert not torch.equal(
        next(pair.base_unet.parameters()), next(pair.finetuned_unet.parameters())
    )  # the fine-tune's own transformer
    sd1 = build_base(tmp_path / "sd1")
    with pytest.raises((FamilyMismatchError, ValueError), match=r"SD3|SD 1.x"):
        load_model_pair(sd1, sd3_folders / "dreambooth")
    with pytest.raises(UnknownFamilyError, match="takes 33 input channels"):
        detect_family(None, transformer_config={"_class_name": "SD3Transformer2DModel", "in_channels": 33})
    assert detect_family(None, pipeline_class="FluxPipeline").name == "flux"


def test_sd3_lora_pair_is_one_gated_forward_equal_to_the_merged_fine_tune(sd3_components):
    """A LoRA pair on the transformer runs FineXtract as ONE forward on 2B rows with the adapters gated
    1 / 0; its images equal those of a DreamBooth pair whose fine-tune has the adapters merged in.

    Tolerance: the gated branch computes W x + (alpha / r) up (down x), the merged copy (W + (alpha / r) up
    down) x: the same function in another float32 order, so latents agree to ~1e-5 and a decoded pixel
    moves by at most 1 level (`tolerances.assert_same_images`)."""
    from finextract.engine.denoiser import GuidedDenoiser
    from finextract.rules import rule_for
    from tests import tolerances
    from tests.conftest import random_unet_lora

    components = dict(sd3_components, transformer=copy.deepcopy(sd3_components["transformer"]))
    layers = random_unet_lora(components["transformer"], seed=5)
    assert any(".attn.add_q_proj" not in name and "transformer_blocks.1" in name for name in layers)
    merged = copy.deepcopy(components["transformer"])
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for name, layer in layers.items():
            modules[name].weight += (layer.alpha / layer.down.shape[0]) * layer.up @ layer.down
    gated_pair = sd3_pair(components, lora=layers)
    denoiser = GuidedDenoiser(gated_pair, rule_for("finextract", "lora"))
    assert len(denoiser.groups) == 1 and denoiser.lora_gate is not None  # one fused forward
    options = dict(steps=STEPS, scheduler="euler", seed=0, batch_size=2, backend="torch", progress=False)
    ours = generate(gated_pair, ZOO_CAPTION, 2, method="finextract", **options).images
    merged_pair = sd3_pair(components, finetuned=merged)
    theirs = generate(merged_pair, ZOO_CAPTION, 2, method="finextract", w=5.0, k=0.0, **options).images
    tolerances.assert_same_images(ours, theirs)
    base_only = generate(merged_pair, ZOO_CAPTION, 2, method="direct", **options).images
    assert (base_only.int() - ours.int()).abs().max().item() > 10  # the adapters matter


@pytest.mark.parametrize("scheduler", ["dpmpp-2m", "unipc"])
def test_sd3_multistep_flow_forms_reproduce_the_pipeline(sd3_components, scheduler):
    """--scheduler dpmpp-2m / unipc on SD3 == StableDiffusion3Pipeline with diffusers' flow form of that
    solver swapped in (use_flow_sigmas, flow_prediction, flow_shift = the model's shift), CFG scale W,
    within 2 levels (`_assert_within_two_levels`); 4 steps run the first- and second-order branches."""
    import diffusers

    classes = {"dpmpp-2m": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler"}
    config = sd3_components["scheduler"].config
    swapped = getattr(diffusers, classes[scheduler]).from_config(
        config, use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=config.shift, solver_order=2
    )
    pipeline = diffusers.StableDiffusion3Pipeline(**dict(sd3_components, scheduler=swapped))
    pipeline.set_progress_bar_config(disable=True)
    with torch.no_grad():
        result = pipeline(
            [ZOO_CAPTION] * len(SEEDS),
            negative_prompt=[""] * len(SEEDS),
            num_inference_steps=4,
            guidance_scale=W,
            latents=start_latents(SEEDS, (16, 16, 16)),
            height=32,
            width=32,
            output_type="np",
        ).images
    theirs = torch.from_numpy((result * 255).round().astype(np.uint8))
    pair = sd3_pair(sd3_components)
    options = dict(steps=4, scheduler=scheduler, seed=SEEDS[0], batch_size=len(SEEDS), backend="torch", progress=False)
    ours = generate(pair, ZOO_CAPTION, len(SEEDS), method="cfg", w=W, **options).images
    _assert_within_two_levels(ours, theirs)


def test_sd3_single_files_load_to_the_pipelines_weights(sd3_components, sd3_folders, tmp_path):
    """Stability AI's single-file layout (`write_sd3_checkpoint`, whose MMDiT names diffusers' own
    `convert_sd3_transformer_checkpoint_to_diffusers` reads back) loads to exactly the folder's weights: as a
    fine-tune on a folder base (with its text encoders and VAE), and as a base whose text encoders come from
    --base-config (SD3's released files ship without them); another family's base is refused naming SD3."""
    from finextract.engine.families import FamilyMismatchError
    from finextract.engine.loading import load_model_pair
    from finextract.zoo.models import build_base, perturbed_copy
    from finextract.zoo.writers import write_sd3_checkpoint

    def same(a, b) -> bool:
        sa, sb = a.state_dict(), b.state_dict()
        return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)

    tuned = perturbed_copy(sd3_components["transformer"], 7)
    clip_l = perturbed_copy(sd3_components["text_encoder"], 8)
    encoders = {"clip_l": clip_l, "clip_g": sd3_components["text_encoder_2"], "t5xxl": sd3_components["text_encoder_3"]}
    file = write_sd3_checkpoint(tmp_path / "tuned.safetensors", tuned, sd3_components["vae"], encoders)
    pair = load_model_pair(sd3_folders / "base", file)
    assert pair.sources["finetuned_format"] == "checkpoint" and same(pair.finetuned_unet, tuned)
    assert same(pair.finetuned_text_encoder, clip_l) and same(pair.finetuned_text_encoder_3, encoders["t5xxl"])
    assert same(pair.vae, sd3_components["vae"])

    bare = write_sd3_checkpoint(tmp_path / "base.safetensors", sd3_components["transformer"], sd3_components["vae"])
    pair = load_model_pair(bare, sd3_folders / "dreambooth", base_config=sd3_folders / "base")
    assert pair.family.name == "sd3" and same(pair.base_unet, sd3_components["transformer"])
    assert same(pair.base_text_encoder_2, sd3_components["text_encoder_2"])
    with pytest.raises(FamilyMismatchError, match=r"is SD3.*told by MMDiT joint_blocks.*the base is SD 1.x"):
        load_model_pair(build_base(tmp_path / "sd1"), file)


@pytest.mark.parametrize(
    "kind, method",
    [("dreambooth", "finextract-uncond"), ("dreambooth", "direct"), ("lora", "finextract"), ("lora", "cfg")],
)
def test_every_rule_steps_alike_on_torch_and_onnxruntime(sd3_components, kind, method):
    """Eq. 6 and Direct on a DreamBooth pair (two transformers in one graph), Eq. 13 and CFG on a LoRA pair
    (gated adapters in the graph): one Euler step on onnxruntime == torch within the network bound of
    `tests/tolerances.py` (CFG and Eq. 13 on a DreamBooth pair: the pipeline test above)."""
    from finextract.engine.backends.ort_backend import OnnxRuntimeBackend
    from finextract.engine.config import RunConfig
    from finextract.rules import rule_for
    from finextract.zoo.models import perturbed_copy
    from tests.conftest import random_unet_lora
    from tests.steps import assert_step_matches, backends

    if kind == "lora":
        components = dict(sd3_components, transformer=copy.deepcopy(sd3_components["transformer"]))
        pair = sd3_pair(components, lora=random_unet_lora(components["transformer"], seed=5))
    else:
        pair = sd3_pair(sd3_components, finetuned=perturbed_copy(sd3_components["transformer"], 3))
    rule = rule_for(method, kind)
    config = RunConfig.resolve(device="cpu", backend="onnxruntime", threads=1, scheduler="euler")
    ours, reference = backends(OnnxRuntimeBackend, pair, rule, config, ZOO_CAPTION)
    assert_step_matches(ours, reference, pair.base_unet, pair, rule)


def test_sd3_folders_without_t5_and_with_t5s_padded_rows_load(sd3_components, tmp_path):
    """A pipeline saved without T5 loads as a pair without it (the pipeline's zeros); a T5 whose embedding has
    more rows than its tokenizer (the released T5's 32,128 rows for 32,100 entries) loads."""
    from finextract.engine.loading import load_model_pair
    from finextract.zoo.models import save_pipeline

    no_t5 = save_pipeline(dict(sd3_components, text_encoder_3=None, tokenizer_3=None), tmp_path / "no_t5")
    pair = load_model_pair(no_t5, no_t5)
    assert pair.base_text_encoder_3 is None and pair.base_tokenizer_3 is None
    t5 = copy.deepcopy(sd3_components["text_encoder_3"])
    t5.resize_token_embeddings(256)  # 232 tokenizer entries, 256 rows
    padded = save_pipeline(dict(sd3_components, text_encoder_3=t5), tmp_path / "padded")
    pair = load_model_pair(padded, padded)
    assert pair.base_text_encoder_3.get_input_embeddings().num_embeddings == 256 > len(pair.base_tokenizer_3)


def test_flux_folders_load_and_sample(tmp_path):
    """A FLUX.1 folder is detected, loads with diffusers' classes and samples through FLUX's denoiser hooks
    (`engine/flux.py`; images against FluxPipeline: tests/test_flux_sampling.py)."""
    from finextract.engine.loading import load_model_pair
    from finextract.zoo.build import build_flow_family_zoo

    zoo = build_flow_family_zoo(tmp_path / "flux", "flux")
    pair = load_model_pair(zoo / "base", zoo / "dreambooth")
    assert pair.family.name == "flux" and type(pair.base_unet).__name__ == "FluxTransformer2DModel"
    assert type(pair.base_text_encoder_2).__name__ == "T5EncoderModel"
    images = generate(pair, ZOO_CAPTION, 1, method="cfg", steps=2, scheduler="euler", backend="torch", progress=False)
    assert images.images.shape == (1, 32, 32, 3) and images.images.dtype == torch.uint8


def test_a_fine_tunes_t5_of_another_width_is_named(sd3_components, tmp_path):
    from transformers import T5Config, T5EncoderModel

    from finextract.engine.loading import load_model_pair
    from finextract.zoo.models import save_pipeline

    base = save_pipeline(sd3_components, tmp_path / "base")
    config = T5Config(**{**sd3_components["text_encoder_3"].config.to_dict(), "d_ff": 96})
    tuned = save_pipeline(dict(sd3_components, text_encoder_3=T5EncoderModel(config)), tmp_path / "tuned")
    with pytest.raises(ValueError, match="fine-tuned text_encoder_3 has d_ff 96, base has 128"):
        load_model_pair(base, tuned)
