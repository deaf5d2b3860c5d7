"""FLUX.1 through finextract's loop: CFG and FineXtract (k = 0, base == fine-tuned) equal diffusers'
`FluxPipeline(prompt, negative_prompt="", true_cfg_scale=w)` at the pipeline's distilled guidance, from the
same start latents (`start_latents` in the unpacked layout, packed as FluxPipeline packs them)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from finextract.engine.sampler import start_latents
from finextract.generation import generate
from finextract.zoo.configs import ZOO_CAPTION
from tests.test_flow_families import _assert_within_two_levels  # the flow families' 2-level bound, argued there

STEPS = 3
W = 4.0
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    """The tiny FLUX.1-dev components (`tiny_components(family="flux")`) and their `FluxPipeline` folder."""
    from finextract.zoo.models import save_pipeline, tiny_components

    root = tmp_path_factory.mktemp("flux_sampling")
    components = tiny_components(0, root / "tokenizer", family="flux")
    return components, save_pipeline(components, root / "base")


def pipeline_images(components, **options) -> torch.Tensor:
    """`FluxPipeline(prompt, negative_prompt="", true_cfg_scale=W)` from our start latents, packed by the
    pipeline's own `_pack_latents`; uint8 as diffusers' `numpy_to_pil` rounds them."""
    from diffusers import FluxPipeline

    pipeline = FluxPipeline(**components)
    pipeline.set_progress_bar_config(disable=True)
    latents = start_latents(SEEDS, (16, 16, 16))
    packed = FluxPipeline._pack_latents(latents, len(SEEDS), 16, 16, 16)
    with torch.no_grad():
        result = pipeline(
            [ZOO_CAPTION] * len(SEEDS),
            negative_prompt=[""] * len(SEEDS),
            true_cfg_scale=W,
            num_inference_steps=STEPS,
            latents=packed,
            height=32,
            width=32,
            output_type="np",
            **options,
        ).images
    return torch.from_numpy((result * 255).round().astype(np.uint8))


@pytest.fixture(scope="module")
def flux_pipeline_images(flux_folder):
    return pipeline_images(flux_folder[0])


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "openvino"])
def test_flux_cfg_and_finextract_k0_reproduce_the_pipeline(flux_folder, flux_pipeline_images, backend):
    """base == fine-tuned and k = 0: Eq. 13 is CFG with scale w (both terms at the distilled guidance 3.5), so
    both equal FluxPipeline's true CFG. The pair is loaded from the pipeline folder (two transformers)."""
    from finextract.engine.loading import load_model_pair

    pair = load_model_pair(flux_folder[1], flux_folder[1])
    assert pair.family.name == "flux" and type(pair.base_unet).__name__ == "FluxTransformer2DModel"
    options = dict(steps=STEPS, scheduler="euler", seed=SEEDS[0], batch_size=len(SEEDS), backend=backend)
    cfg = generate(pair, ZOO_CAPTION, len(SEEDS), method="cfg", w=W, progress=False, **options).images
    finextract = generate(pair, ZOO_CAPTION, len(SEEDS), method="finextract", w=W, k=0.0, progress=False, **options)
    _assert_within_two_levels(cfg, flux_pipeline_images)
    _assert_within_two_levels(finextract.images, flux_pipeline_images)
    # not trivially equal: guidance changes the images (Direct, guidance scale 1, differs)
    direct = generate(pair, ZOO_CAPTION, len(SEEDS), method="direct", progress=False, **dict(options, backend="torch"))
    assert (direct.images.int() - flux_pipeline_images.int()).abs().max().item() > 10


def test_the_distilled_guidance_is_a_recorded_setting_of_both_terms(flux_folder, flux_pipeline_images, tmp_path):
    """`distilled_guidance=g` gives FluxPipeline's images at `guidance_scale=g` (its distilled guidance), recorded
    in the pair's sources (the default: the pipeline's 3.5); a model without the embedding refuses it."""
    from finextract.engine.loading import load_model_pair
    from finextract.zoo.models import save_pipeline, tiny_components

    components, folder = flux_folder
    assert load_model_pair(folder, folder).sources["distilled_guidance"] == 3.5
    pair = load_model_pair(folder, folder, distilled_guidance=1.5)
    assert pair.sources["distilled_guidance"] == 1.5
    options = dict(steps=STEPS, scheduler="euler", seed=SEEDS[0], batch_size=len(SEEDS), backend="torch")
    ours = generate(pair, ZOO_CAPTION, len(SEEDS), method="finextract", w=W, k=0.0, progress=False, **options).images
    theirs = pipeline_images(components, guidance_scale=1.5)
    _assert_within_two_levels(ours, theirs)
    assert (theirs.int() - flux_pipeline_images.int()).abs().max().item() > 2  # the setting matters
    schnell = save_pipeline(tiny_components(0, tmp_path / "tok", family="flux-schnell"), tmp_path / "schnell")
    assert "distilled_guidance" not in load_model_pair(schnell, schnell).sources
    with pytest.raises(ValueError, match="no distilled guidance embedding"):
        load_model_pair(schnell, schnell, distilled_guidance=2.0)


@pytest.mark.parametrize("eps", [1e-6, None])
def test_rms_norm_exports_at_opset_17_as_torch_computes_it(tmp_path, eps):
    """FLUX.1's query / key norms (`torch.nn.RMSNorm`) through the opset-17 form of `engine.onnx_symbolics` on
    onnxruntime equal torch's within float32 rounding (a mean of 16 squares, a square root, a division: a few
    ulp of values below 10)."""
    import onnxruntime

    from finextract.engine.onnx_symbolics import register_symbolics

    register_symbolics(17)
    norm = torch.nn.RMSNorm(16, eps=eps)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 16))
    x = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(0)) * 3
    torch.onnx.export(norm, (x,), str(tmp_path / "n.onnx"), dynamo=False, opset_version=17, input_names=["x"])
    session = onnxruntime.InferenceSession(str(tmp_path / "n.onnx"), providers=["CPUExecutionProvider"])
    (ours,) = session.run(None, {"x": x.numpy()})
    assert np.allclose(ours, norm(x).detach().numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_a_flux_lora_pair_is_one_gated_forward_equal_to_the_merged_fine_tune(
    flux_folder, flux_pipeline_images, tmp_path, backend
):
    """A kohya FLUX LoRA (`write_flux_adapters`) on the folder: FineXtract runs the base transformer once on 2B
    rows with the adapters gated 1 / 0; its images equal the DreamBooth pair whose fine-tuned transformer has
    the adapters merged (float32 products in another order: within 1 level)."""
    import copy

    from finextract.engine.adapters import merge_adapters
    from finextract.engine.loading import load_model_pair
    from finextract.engine.lora_formats import read_adapters
    from finextract.zoo.flux_writers import write_flux_adapters

    components, folder = flux_folder
    files = write_flux_adapters(tmp_path, components["transformer"], components["text_encoder"], seed=2000)
    pair = load_model_pair(folder, lora=files["kohya"])
    assert pair.unet_lora and pair.finetuned_unet is None
    merged = load_model_pair(folder, folder)
    models = {"transformer": components["transformer"], "text_encoder": components["text_encoder"]}
    adapters = read_adapters(files["kohya"], models, family="flux")
    merged.finetuned_unet = merge_adapters(copy.deepcopy(merged.base_unet), adapters.adapters["transformer"])
    merged.finetuned_text_encoder = pair.finetuned_text_encoder
    options = dict(method="finextract", w=W, k=0.0, steps=STEPS, scheduler="euler", seed=SEEDS[0], progress=False)
    ours = generate(pair, ZOO_CAPTION, len(SEEDS), batch_size=len(SEEDS), backend=backend, **options).images
    theirs = generate(merged, ZOO_CAPTION, len(SEEDS), batch_size=len(SEEDS), backend="torch", **options).images
    assert (ours.int() - theirs.int()).abs().max().item() <= 1
    assert (ours.int() - flux_pipeline_images.int()).abs().max().item() > 2  # the adapters change the images


def test_the_cli_records_the_distilled_guidance(flux_folder, tmp_path):
    import json

    from finextract.cli import main

    _, folder = flux_folder
    args = ["generate", "--base", str(folder), "--finetuned", str(folder), "--caption", ZOO_CAPTION]
    args += ["--num-images", "1", "--steps", "2", "--scheduler", "euler", "--backend", "torch"]
    assert main([*args, "--distilled-guidance", "2.0", "--out", str(tmp_path / "gen")]) == 0
    manifest = (tmp_path / "gen" / "manifest.json").read_text()
    assert '"distilled_guidance": 2.0' in json.dumps(json.loads(manifest))


def test_the_flux_export_spec_and_tensorrt_profile_carry_its_inputs(flux_folder):
    """The exported step (onnxruntime, OpenVINO, and TensorRT's build path) takes FLUX's conditioning per term:
    T5's sequence, CLIP's pooled projection and the distilled guidance; the latents stay unpacked, so the
    TensorRT profile's x_t is (B, 16, h, w) as for every other family (the packing is inside the graph)."""
    from finextract.engine.conditioning import encode_conditioning
    from finextract.engine.denoiser import GuidedDenoiser
    from finextract.engine.export import ExportSpec
    from finextract.engine.loading import load_model_pair
    from finextract.engine.tensorrt import unet_profiles
    from finextract.rules import rule_for

    components, folder = flux_folder
    pair = load_model_pair(folder, folder)
    rule = rule_for("finextract", "dreambooth")
    spec = ExportSpec.of(GuidedDenoiser(pair, rule), encode_conditioning(pair, rule, ZOO_CAPTION), batch_sizes=(8,))
    keys = pair.family.conditioning_keys
    assert set(keys) >= {"encoder_hidden_states", "pooled_projections", "guidance"}
    assert spec.input_names == ("x_t", "t", "weights", *(f"{k}_a" for k in keys), *(f"{k}_b" for k in keys))
    profile = unet_profiles(spec, (8,))[8]
    t5_width = components["text_encoder_2"].config.d_model
    clip_width = components["text_encoder"].config.projection_dim or components["text_encoder"].config.hidden_size
    assert profile["x_t"] == ((8, 16, 16, 16),) * 3
    assert profile["encoder_hidden_states_a"][0] == (1, pair.family.max_sequence_length, t5_width)
    assert profile["pooled_projections_b"][0] == (1, clip_width) and profile["guidance_a"][0] == (1, 1)


def test_the_exported_flux_graph_runs_at_any_batch_size(flux_folder):
    """The ONNX graph is traced at batch 2; diffusers' rotary embedding unpacks `x.shape` into constants, so the
    export swaps in `traceable_rotary`'s form: 3 images in one batch on onnxruntime equal torch's (2 levels,
    the flow families' bound), where the constant-shaped graph failed with "broadcast ... 16 by 32"."""
    from finextract.engine.loading import load_model_pair

    pair = load_model_pair(flux_folder[1], flux_folder[1])
    seeds = (0, 1, 2)
    images = {
        backend: generate(
            pair,
            ZOO_CAPTION,
            len(seeds),
            method="finextract",
            w=W,
            k=0.0,
            steps=STEPS,
            scheduler="euler",
            seed=seeds[0],
            batch_size=len(seeds),
            backend=backend,
            progress=False,
        ).images
        for backend in ("torch", "onnxruntime")
    }
    _assert_within_two_levels(images["onnxruntime"], images["torch"])


def test_the_traceable_rotary_embedding_is_diffusers_arithmetic():
    """`onnx_symbolics._rotary` equals diffusers' `apply_rotary_emb` bit for bit (the same float operations in
    the same order), for FLUX.1's sequence axis 1 and the default 2."""
    from diffusers.models.embeddings import apply_rotary_emb

    from finextract.engine.onnx_symbolics import _rotary

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 2, 8, generator=generator)
    freqs = (torch.randn(5, 8, generator=generator), torch.randn(5, 8, generator=generator))
    assert torch.equal(_rotary(x, freqs, sequence_dim=1), apply_rotary_emb(x, freqs, sequence_dim=1))
    x = x.transpose(1, 2).contiguous()
    assert torch.equal(_rotary(x, freqs), apply_rotary_emb(x, freqs))
