"""Model families (SD 1.x, SD 2.x epsilon / v, SDXL, AltDiffusion): diffusers' own pipelines as the oracle,
detection, mismatches naming both families, prediction types, SDXL adapters and single files, export specs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from finextract.engine.families import FamilyMismatchError, UnknownFamilyError, detect_family, get_family
from finextract.engine.loading import PredictionTypeMismatchError, load_model_pair
from finextract.engine.sampler import start_latents
from finextract.generation import generate
from finextract.rules import METHODS
from finextract.zoo.configs import ZOO_CAPTION, ZOO_FAMILIES

STEPS = 3
W = 4.0
SEEDS = (0, 1)
FAMILY_OF_ZOO = {zoo: name for zoo, (name, _) in ZOO_FAMILIES.items()}


def _folder(zoo, family: str):
    return zoo if family == "sd1" else zoo / family


@pytest.fixture(scope="session")
def same_pairs(family_zoo):
    """Per zoo family: a DreamBooth pair whose fine-tune is its base (`load_model_pair(base, base)`)."""
    return {
        name: load_model_pair(_folder(family_zoo, name) / "base", _folder(family_zoo, name) / "base")
        for name in ZOO_FAMILIES
    }


@pytest.fixture(scope="session")
def pipeline_images(family_zoo):
    """diffusers' own pipeline of each family (StableDiffusionPipeline, StableDiffusionXLPipeline,
    AltDiffusionPipeline) on the base folder: DDIM, eta 0, guidance_scale W, our start latents; uint8 as
    diffusers' `numpy_to_pil` rounds them."""
    from diffusers import DDIMScheduler

    images = {}
    for name, (family_name, _) in ZOO_FAMILIES.items():
        family = get_family(family_name)
        folder = _folder(family_zoo, name) / "base"
        options = {"add_watermarker": False} if family.name == "sdxl" else {"safety_checker": None}
        if family.name == "altdiffusion":  # diffusers 0.42 cannot resolve its deprecated encoder from model_index.json
            pipeline = _alt_diffusion_pipeline(folder)
        else:
            pipeline = family.pipeline().from_pretrained(str(folder), **options)
        pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
        pipeline.set_progress_bar_config(disable=True)
        unet = pipeline.unet.config
        latents = start_latents(SEEDS, (unet.in_channels, unet.sample_size, unet.sample_size))
        with torch.no_grad():
            result = pipeline(
                [ZOO_CAPTION] * len(SEEDS),
                num_inference_steps=STEPS,
                guidance_scale=W,
                eta=0.0,
                latents=latents,
                output_type="np",
            ).images
        images[name] = torch.from_numpy((result * 255).round().astype(np.uint8))
    return images


def _alt_diffusion_pipeline(folder):
    """`AltDiffusionPipeline` built from the folder's components (its `from_pretrained` cannot load the
    deprecated `RobertaSeriesModelWithTransformation` class it saves)."""
    from diffusers import AltDiffusionPipeline, AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import XLMRobertaTokenizer

    family = get_family("altdiffusion")
    return AltDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(str(folder / "vae")),
        text_encoder=family.text_encoder_class().from_pretrained(str(folder / "text_encoder")),
        tokenizer=XLMRobertaTokenizer.from_pretrained(str(folder / "tokenizer")),
        unet=UNet2DConditionModel.from_pretrained(str(folder / "unet")),
        scheduler=DDIMScheduler.from_pretrained(str(folder / "scheduler")),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _assert_within_two_levels(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    # Same weights, same latents, same arithmetic up to the order of float32 operations (batched vs
    # separate UNet calls, the fused update vs DDIMScheduler.step): the latents agree to ~1e-5, so a pixel
    # can move by one level at a rounding boundary; 2 levels is the acceptance bound, while a wrong
    # conditioning (pooled embedding, time ids, zeros for "") or a wrong step moves pixels by tens of levels.
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == torch.uint8
    assert (ours.int() - theirs.int()).abs().max().item() <= 2


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("name", list(ZOO_FAMILIES))
def test_cfg_and_finextract_k0_reproduce_the_familys_diffusers_pipeline(same_pairs, pipeline_images, name, backend):
    """base == fine-tuned and k = 0: Eq. 13 is CFG with scale w, so both methods are diffusers' pipeline."""
    pair = same_pairs[name]
    assert pair.family.name == FAMILY_OF_ZOO[name]
    options = dict(steps=STEPS, seed=SEEDS[0], batch_size=len(SEEDS), backend=backend, progress=False)
    cfg = generate(pair, ZOO_CAPTION, len(SEEDS), method="cfg", w=W, **options).images
    finextract = generate(pair, ZOO_CAPTION, len(SEEDS), method="finextract", w=W, k=0.0, **options).images
    _assert_within_two_levels(cfg, pipeline_images[name])
    _assert_within_two_levels(finextract, pipeline_images[name])
    # not trivially equal: guidance changes the images (Direct, guidance scale 1, differs)
    direct = generate(pair, ZOO_CAPTION, len(SEEDS), method="direct", **dict(options, backend="torch")).images
    assert (direct.int() - pipeline_images[name].int()).abs().max().item() > 10


# The multistep solvers against diffusers' pipelines with DPMSolverMultistepScheduler / UniPCMultistepScheduler
# built from the model's scheduler config (as a user swaps them in), on an epsilon and a v-prediction family;
# 5 steps run every order: the first-order warm-up, second-order steps, UniPC's corrector at orders 1 and 2,
# and the lower-order final step.
MULTISTEP_SCHEDULERS = {"dpmpp-2m": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler"}
MULTISTEP_FAMILIES = ("sd1", "sd2-v")
MULTISTEP_STEPS = 5


@pytest.fixture(scope="session")
def multistep_pipeline_images(family_zoo):
    """(family, scheduler) -> StableDiffusionPipeline's uint8 images with that scheduler, CFG scale W, our
    start latents."""
    import diffusers

    images = {}
    for name in MULTISTEP_FAMILIES:
        pipeline = (
            get_family(ZOO_FAMILIES[name][0])
            .pipeline()
            .from_pretrained(str(_folder(family_zoo, name) / "base"), safety_checker=None)
        )
        pipeline.set_progress_bar_config(disable=True)
        unet = pipeline.unet.config
        latents = start_latents(SEEDS, (unet.in_channels, unet.sample_size, unet.sample_size))
        config = pipeline.scheduler.config
        for scheduler, class_name in MULTISTEP_SCHEDULERS.items():
            pipeline.scheduler = getattr(diffusers, class_name).from_config(config)
            with torch.no_grad():
                result = pipeline(
                    [ZOO_CAPTION] * len(SEEDS),
                    num_inference_steps=MULTISTEP_STEPS,
                    guidance_scale=W,
                    latents=latents,
                    output_type="np",
                ).images
            images[name, scheduler] = torch.from_numpy((result * 255).round().astype(np.uint8))
    return images


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("scheduler", list(MULTISTEP_SCHEDULERS))
@pytest.mark.parametrize("name", MULTISTEP_FAMILIES)
def test_multistep_cfg_reproduces_diffusers_pipeline(same_pairs, multistep_pipeline_images, name, scheduler, backend):
    """--scheduler dpmpp-2m / unipc with CFG == diffusers' pipeline with that scheduler (within 2 levels,
    as `_assert_within_two_levels` derives), on torch and on onnxruntime's exported K = 1 / K = 2 graph."""
    pair = same_pairs[name]
    options = dict(steps=MULTISTEP_STEPS, seed=SEEDS[0], batch_size=len(SEEDS), progress=False)
    ours = generate(pair, ZOO_CAPTION, len(SEEDS), method="cfg", w=W, scheduler=scheduler, backend=backend, **options)
    expected = multistep_pipeline_images[name, scheduler]
    _assert_within_two_levels(ours.images, expected)
    # not trivially equal: DDIM at the same steps gives other images
    ddim = generate(pair, ZOO_CAPTION, len(SEEDS), method="cfg", w=W, backend="torch", **options).images
    assert (ddim.int() - expected.int()).abs().max().item() > 2


# Every rule on every family on onnxruntime: the oracle test above runs CFG and Eq. 13 there end to end; this
# adds Eq. 6 and Direct on the DreamBooth pairs (base == fine-tune: the oracle test's exported graphs, reused
# from the session's export cache) and all four rules on each family's LoRA pair (gated adapters in the graph).
# SD 1.x: tests/test_ort_backend.py; "sd2" shares "sd2-v"'s architecture (only the step weights differ).
BACKEND_FAMILIES = [name for name in ZOO_FAMILIES if name not in ("sd1", "sd2")]


@pytest.fixture(scope="module")
def lora_pairs(family_zoo):
    return {
        name: load_model_pair(family_zoo / name / "base", lora=family_zoo / name / "lora") for name in BACKEND_FAMILIES
    }


# A rule reaches the UNets only through the denoiser's terms, which no family changes; a family changes
# the UNet and its conditioning. So every rule runs on SDXL (the family with added conditioning), and
# the other families run one rule of each shape (one model: Direct; two: FineXtract on the LoRA pair):
# 10 exports where every pairing would take 18 (each export costs seconds of the suite's budget).
_RULE_CASES = [("dreambooth", "finextract-uncond"), ("dreambooth", "direct")] + [("lora", m) for m in METHODS]
_FAMILY_RULE_CASES = [("sdxl", kind, method) for kind, method in _RULE_CASES] + [
    (name, kind, method)
    for name in BACKEND_FAMILIES
    if name != "sdxl"
    for kind, method in (("dreambooth", "direct"), ("lora", "finextract"))
]


@pytest.mark.parametrize("name, kind, method", _FAMILY_RULE_CASES)
def test_every_rule_steps_alike_on_torch_and_onnxruntime(same_pairs, lora_pairs, name, kind, method):
    from finextract.engine.backends.ort_backend import OnnxRuntimeBackend
    from finextract.engine.config import RunConfig
    from finextract.rules import rule_for
    from tests.steps import assert_step_matches, backends

    pair = same_pairs[name] if kind == "dreambooth" else lora_pairs[name]
    assert pair.kind == kind and pair.family.name == FAMILY_OF_ZOO[name]
    rule = rule_for(method, kind)
    config = RunConfig.resolve(device="cpu", backend="onnxruntime", threads=1)  # the session's export cache
    ours, reference = backends(OnnxRuntimeBackend, pair, rule, config, ZOO_CAPTION)
    assert_step_matches(ours, reference, pair.base_unet, pair, rule)


def test_sdxl_conditioning_is_the_pipelines(same_pairs, family_zoo):
    """Per term: encoder_hidden_states, pooled text_embeds and time ids equal `encode_prompt` / `_get_add_time_ids`
    (zeros for the empty caption, as force_zeros_for_empty_prompt says)."""
    from diffusers import StableDiffusionXLPipeline

    from finextract.engine.conditioning import conditioning_keys, encode_conditioning
    from finextract.rules import rule_for

    pair = same_pairs["sdxl"]
    pipeline = StableDiffusionXLPipeline.from_pretrained(str(family_zoo / "sdxl" / "base"), add_watermarker=False)
    rule = rule_for("finextract", "dreambooth", w=W, k=0.0)  # (finetuned, prompt), (base, empty)
    ours = encode_conditioning(pair, rule, ZOO_CAPTION)
    assert conditioning_keys(pair.family) == ("encoder_hidden_states", "text_embeds", "time_ids")
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipeline.encode_prompt(
            ZOO_CAPTION, do_classifier_free_guidance=True
        )
    time_ids = pipeline._get_add_time_ids((32, 32), (0, 0), (32, 32), torch.float32, text_encoder_projection_dim=32)
    expected = (embeds, pooled, time_ids, negative, negative_pooled, time_ids)
    assert len(ours) == len(expected)
    for a, b in zip(ours, expected):
        assert a.shape == b.shape and torch.equal(a, b)  # same modules, same inputs: bit-equal
    assert not negative.any() and negative_pooled.shape == (1, 32) and embeds.shape == (1, 77, 64)


# --- detection and bad input -----------------------------------------------------------------------


def test_family_detected_from_each_zoo_folder_and_recorded(same_pairs, family_zoo, tmp_path):
    from finextract.engine.loading import folder_family

    for name, (family_name, _) in ZOO_FAMILIES.items():
        assert folder_family(_folder(family_zoo, name) / "base", "base")[0].name == family_name
    pair = same_pairs["sdxl"]
    result = generate(pair, ZOO_CAPTION, 1, steps=1, backend="torch", progress=False, out=tmp_path / "gen")
    manifest = json.loads((tmp_path / "gen" / "manifest.json").read_text())
    assert manifest["sources"]["family"] == "sdxl" == result.manifest["sources"]["family"]
    assert manifest["sources"]["prediction_type"]["used"] == "epsilon"


@pytest.mark.parametrize(
    "config, index, match",
    [
        ({"in_channels": 9, "out_channels": 4}, {}, r"9 input and 4 output channels \(an inpainting UNet\)"),
        (
            {"in_channels": 4, "out_channels": 4, "addition_embed_type": "text_time"},
            {"requires_aesthetics_score": True},
            "SDXL refiner",
        ),
        (None, {"_class_name": "PixArtAlphaPipeline"}, "PixArtAlphaPipeline .PixArt"),
        (None, {}, "has no UNet"),
        ({"in_channels": 4, "out_channels": 4, "addition_embed_type": "image"}, {}, "addition_embed_type 'image'"),
    ],
)
def test_unknown_families_are_named(config, index, match):
    with pytest.raises(UnknownFamilyError, match=match) as error:
        detect_family(
            config,
            pipeline_class=index.get("_class_name"),
            requires_aesthetics_score=index.get("requires_aesthetics_score", False),
        )
    assert "SD 1.x" in str(error.value) or "SDXL base" in str(error.value)  # says what is supported


def test_unknown_family_name_lists_the_families():
    with pytest.raises(UnknownFamilyError, match=r"unknown model family 'pixart'.*sd1 .SD 1.x.*sdxl .SDXL.*flux"):
        get_family("pixart")
    assert get_family("SD 1.x").name == "sd1" and get_family("sd-2.1").name == "sd2"
    assert get_family("SD3.5").name == "sd3" and get_family("FLUX.1").name == "flux"


@pytest.mark.parametrize(
    "base, kwargs, match",
    [
        # an SDXL LoRA on an SD 1.x base: its metadata (and lora_te2_ keys) name SDXL
        (
            "",
            {"lora": "sdxl/lora_kohya.safetensors"},
            r"the LoRA .* is for SDXL \(cross-attention 64\).*the base is SD 1.x \(32\)",
        ),
        # a diffusers SDXL LoRA (text_encoder_2. keys) on SD 2.x
        ("sd2", {"lora": "sdxl/lora"}, r"is for SDXL .*the base is SD 2.x \(48\)"),
        # an SD 2.x UNet LoRA on an SD 1.x base: its cross-attention width differs
        ("", {"lora": "sd2/lora_kohya.safetensors"}, r"is for SD 2.x .*; the base is SD 1.x \(32\)"),
        # a DreamBooth pipeline folder of another family
        (
            "",
            {"finetuned": "sd2/dreambooth"},
            r"the fine-tune .* is SD 2.x \(cross-attention 48\).*the base is SD 1.x \(32\)",
        ),
        ("sdxl", {"finetuned": "dreambooth"}, r"is SD 1.x \(cross-attention 32\).*the base is SDXL \(64\)"),
        # an original-layout SDXL single file over an SD 2.x base
        ("sd2", {"finetuned": "sdxl/dreambooth.safetensors"}, r"is SDXL \(cross-attention 64\), told by conditioner"),
    ],
)
def test_fine_tunes_and_loras_of_another_family_name_both(family_zoo, base, kwargs, match):
    ((key, value),) = kwargs.items()
    with pytest.raises(FamilyMismatchError, match=match) as error:
        load_model_pair(family_zoo / base / "base", **{key: family_zoo / value})
    assert "pass the" in str(error.value)  # and says the fix


def test_prediction_type_mismatch_is_refused_then_overridden(family_zoo, caplog):
    base, finetuned = family_zoo / "sd2" / "base", family_zoo / "sd2-v" / "dreambooth"
    with pytest.raises(
        PredictionTypeMismatchError,
        match=r"base's scheduler says 'epsilon'.*fine-tune's says 'v_prediction'.*--prediction-type v_prediction",
    ):
        load_model_pair(base, finetuned)
    # the single file's v_pred marker says the same
    with pytest.raises(PredictionTypeMismatchError, match=r"'v_prediction' \(its v_pred marker"):
        load_model_pair(base, family_zoo / "sd2-v" / "dreambooth.safetensors")
    pair = load_model_pair(base, finetuned, prediction_type="v_prediction")
    assert pair.scheduler_config["prediction_type"] == "v_prediction"
    assert pair.sources["prediction_type"] == {
        "base": "epsilon",
        "finetuned": "v_prediction",
        "used": "v_prediction",
        "override": True,
    }
    with pytest.raises(ValueError, match=r"prediction_type 'x0'.*epsilon, v_prediction, sample"):
        load_model_pair(base, finetuned, prediction_type="x0")


def test_prediction_type_option_on_the_cli(family_zoo, tmp_path, capsys):
    from finextract.cli import main

    base, finetuned = family_zoo / "sd2" / "base", family_zoo / "sd2-v" / "dreambooth"
    args = [
        "generate",
        "--base",
        str(base),
        "--finetuned",
        str(finetuned),
        "--caption",
        ZOO_CAPTION,
        "--num-images",
        "1",
    ]
    args += ["--steps", "1", "--backend", "torch", "--out", str(tmp_path / "gen")]
    assert main(args) != 0
    assert "--prediction-type" in capsys.readouterr().err
    assert main([*args, "--prediction-type", "v_prediction"]) == 0
    manifest = json.loads((tmp_path / "gen" / "manifest.json").read_text())
    assert manifest["sources"]["prediction_type"]["used"] == "v_prediction"


def test_unsupported_scheduler_spacing_is_refused():
    from finextract.engine.ddim import make_scheduler
    from finextract.zoo.configs import SD1_SCHEDULER_CONFIG

    with pytest.raises(
        ValueError, match=r"timestep_spacing='karras'.*linspace, leading, trailing.*scheduler_config.json"
    ):
        make_scheduler(dict(SD1_SCHEDULER_CONFIG, timestep_spacing="karras"), 10)


def test_single_file_markers_and_family_evidence(family_zoo):
    from finextract.engine.families import checkpoint_evidence
    from finextract.engine.formats import state_dict_keys

    evidence = {
        name: checkpoint_evidence(state_dict_keys(family_zoo / name / "dreambooth.safetensors"))
        for name in ("sd2", "sd2-v", "sdxl")
    }
    assert evidence["sdxl"].family.name == "sdxl" and evidence["sdxl"].cross_attention_dim == 64
    assert evidence["sd2"].family.name == "sd2" and evidence["sd2"].prediction_type is None
    assert evidence["sd2-v"].prediction_type == "v_prediction" and evidence["sd2-v"].zero_terminal_snr


# --- SDXL and SD 2.x formats -----------------------------------------------------------------------


def _state(model) -> dict:
    return {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["sd2", "sdxl"])
def test_single_files_convert_to_the_pipelines_weights(family_zoo, name):
    """The original-layout files (written by the zoo's inverse of diffusers' converters) load back, with
    `base_config` offline, to exactly the pipeline folder's weights."""
    folder = family_zoo / name
    single = load_model_pair(
        folder / "base.safetensors", folder / "dreambooth.safetensors", base_config=folder / "base"
    )
    pipeline = load_model_pair(folder / "base", folder / "dreambooth")
    assert single.family.name == pipeline.family.name == name
    for role in ("base_unet", "finetuned_unet", "base_text_encoder", "finetuned_text_encoder", "vae"):
        ours, theirs = _state(getattr(single, role)), _state(getattr(pipeline, role))
        assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours), role
    if name == "sdxl":
        for role in ("base_text_encoder_2", "finetuned_text_encoder_2"):
            ours, theirs = _state(getattr(single, role)), _state(getattr(pipeline, role))
            assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours), role


def _module_weights(model) -> dict:
    """module path (without CLIP's `text_model.` prefix) -> weight; PEFT's fused `base_layer` as its module."""
    weights = {}
    for name, value in model.state_dict().items():
        if name.endswith(".weight"):
            name = name.removeprefix("text_model.").removesuffix(".weight").removesuffix(".base_layer")
            weights[name] = value
    return weights


@pytest.fixture(scope="session")
def sdxl_diffusers_lora(family_zoo):
    """diffusers' own SDXL LoRA loading of the diffusers and the kohya file (`lora_state_dict` with the UNet
    config, as `load_lora_weights` calls it: kohya's SGM names mapped, `lora_te1_` / `lora_te2_` split),
    `load_lora_into_unet` / `load_lora_into_text_encoder`, fused: component -> module -> weight."""
    from diffusers import StableDiffusionXLPipeline

    folder = family_zoo / "sdxl"
    reference = {}
    for fmt, path in (("diffusers", "lora"), ("kohya", "lora_kohya.safetensors")):
        pipeline = StableDiffusionXLPipeline.from_pretrained(str(folder / "base"), add_watermarker=False)
        state, alphas, metadata = StableDiffusionXLPipeline.lora_state_dict(
            str(folder / path), unet_config=pipeline.unet.config, return_lora_metadata=True
        )
        parts = {
            component: {k: v for k, v in state.items() if k.split(".", 1)[0] == component}
            for component in ("unet", "text_encoder", "text_encoder_2")
        }
        # diffusers 0.42 cannot place `text_model.`-named keys on transformers 5's flattened CLIPTextModel
        parts["text_encoder"] = {
            k.replace("text_encoder.text_model.", "text_encoder."): v for k, v in parts["text_encoder"].items()
        }
        alphas = {k.replace("text_encoder.text_model.", "text_encoder."): v for k, v in (alphas or {}).items()}
        if metadata and "text_encoder.target_modules" in metadata:
            names = metadata["text_encoder.target_modules"]
            metadata["text_encoder.target_modules"] = [n.removeprefix("text_model.") for n in names]
        StableDiffusionXLPipeline.load_lora_into_unet(parts["unet"], alphas, pipeline.unet, metadata=metadata)
        # diffusers 0.42 cannot convert kohya text-encoder keys that adapt no `out_proj` ("Could not automatically
        # infer state dict type"): the kohya file's text encoders are compared with the diffusers file's reference
        components = ["unet", "text_encoder", "text_encoder_2"] if fmt == "diffusers" else ["unet"]
        for component in components[1:]:
            StableDiffusionXLPipeline.load_lora_into_text_encoder(
                parts[component], alphas, getattr(pipeline, component), prefix=component, metadata=metadata
            )
        pipeline.fuse_lora(components=components)
        reference[fmt] = {c: _module_weights(getattr(pipeline, c)) for c in components}
    reference["kohya"].update({c: reference["diffusers"][c] for c in ("text_encoder", "text_encoder_2")})
    return reference


@pytest.mark.parametrize(
    "fmt, path", [("diffusers", "lora"), ("kohya", "lora_kohya.safetensors"), ("peft", "lora_peft")]
)
def test_sdxl_lora_formats_match_diffusers_loader(family_zoo, sdxl_diffusers_lora, fmt, path):
    """Each format's adapters, merged, equal diffusers' fused weights on the UNet (kohya: under its SGM names)
    and both text encoders (`text_projection` too); the PEFT folder holds the diffusers file's adapters."""
    pair = load_model_pair(family_zoo / "sdxl" / "base", lora=family_zoo / "sdxl" / path)
    assert pair.sources["lora_format"] == fmt and pair.family.name == "sdxl"
    counts = pair.sources["lora_counts"]
    assert counts["text_encoder_2"]["modules"] == 3 and counts["unet"]["modules"] == len(pair.unet_lora)
    reference = sdxl_diffusers_lora["kohya" if fmt == "kohya" else "diffusers"]
    from diffusers import UNet2DConditionModel

    from finextract.engine.lora import merge_lora

    plain = UNet2DConditionModel.from_pretrained(str(family_zoo / "sdxl" / "base" / "unet"))  # no gated hooks
    ours = {
        "unet": _module_weights(merge_lora(plain, pair.unet_lora)),
        "text_encoder": _module_weights(pair.finetuned_text_encoder),
        "text_encoder_2": _module_weights(pair.finetuned_text_encoder_2),
    }
    base = {
        "text_encoder": _module_weights(pair.base_text_encoder),
        "text_encoder_2": _module_weights(pair.base_text_encoder_2),
    }
    assert "text_projection" in ours["text_encoder_2"]
    for component, weights in ours.items():
        theirs = reference[component]
        adapted = [m for m in weights if component != "unet" and not torch.equal(weights[m], base[component][m])]
        assert component == "unet" or len(adapted) == counts[component]["modules"]
        for module, weight in weights.items():
            # W + (alpha / r) up @ down in float32, in another order: within a few ulp of |W| + |delta| (<= 2)
            assert torch.allclose(weight, theirs[module], rtol=0, atol=1e-6), (component, module)


def test_sdxl_lora_pair_runs_fused_on_both_backends(family_zoo):
    pair = load_model_pair(family_zoo / "sdxl" / "base", lora=family_zoo / "sdxl" / "lora_kohya.safetensors")
    options = dict(steps=2, batch_size=2, progress=False)
    torch_images = generate(pair, ZOO_CAPTION, 2, backend="torch", **options).images
    ort_images = generate(pair, ZOO_CAPTION, 2, backend="onnxruntime", **options).images
    assert (torch_images.int() - ort_images.int()).abs().max().item() <= 1


def test_sdxl_export_spec_carries_the_added_inputs(same_pairs):
    from finextract.engine.conditioning import encode_conditioning
    from finextract.engine.denoiser import GuidedDenoiser
    from finextract.engine.export import ExportSpec
    from finextract.engine.tensorrt import unet_profiles
    from finextract.rules import rule_for

    pair = same_pairs["sdxl"]
    rule = rule_for("finextract", "dreambooth")
    denoiser = GuidedDenoiser(pair, rule)
    spec = ExportSpec.of(denoiser, encode_conditioning(pair, rule, ZOO_CAPTION), batch_sizes=(8,))
    assert spec.input_names == (
        "x_t",
        "t",
        "weights",
        "encoder_hidden_states_a",
        "text_embeds_a",
        "time_ids_a",
        "encoder_hidden_states_b",
        "text_embeds_b",
        "time_ids_b",
    )
    profile = unet_profiles(spec, (8,))[8]
    assert profile["text_embeds_a"] == ((1, 32),) * 3 and profile["time_ids_b"] == ((1, 6),) * 3
    assert profile["encoder_hidden_states_a"][0] == (1, 77, 64) and profile["x_t"][0] == (8, 4, 16, 16)


def test_pairs_on_a_loaded_sdxl_base_equal_pairs_loaded_from_disk(family_zoo):
    """`load_base` keeps SDXL's second text encoder and tokenizer: the pairs built on it equal fresh ones."""
    from finextract.engine.loading import load_base
    from finextract.engine.lora import lora_gate_of

    folder = family_zoo / "sdxl"
    base = load_base(folder / "base")
    for checkpoint in ({"lora": folder / "lora_kohya.safetensors"}, {"finetuned": folder / "dreambooth"}):
        reused, fresh = load_model_pair(base, **checkpoint), load_model_pair(folder / "base", **checkpoint)
        assert reused.family.name == "sdxl" and reused.fingerprint == fresh.fingerprint
        assert reused.sources == fresh.sources
        assert reused.base_text_encoder_2 is base.parts["text_encoder_2"]  # shared, not loaded again
        assert lora_gate_of(base.parts["unet"]) is None  # a LoRA pair's hooks went on its own modules
