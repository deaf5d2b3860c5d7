"""BFL's original FLUX.1 transformer file: the zoo's writer against diffusers' own converter, detection from its
keys, and loading as a base (with `base_config`) and as a fine-tune."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from finextract.engine.families import FamilyMismatchError, checkpoint_evidence
from finextract.engine.loading import detect_finetuned_format, load_model_pair
from finextract.engine.loading.flux_file import convert_flux_transformer
from finextract.zoo.flux_writers import bfl_flux_state, write_flux_transformer_file


@pytest.fixture(scope="module")
def flux_parts(tmp_path_factory):
    """The tiny FLUX.1 pipeline folder, a perturbed transformer (the "fine-tune") and both as BFL files."""
    from finextract.zoo.models import perturbed_copy, save_pipeline, tiny_components

    folder = tmp_path_factory.mktemp("flux_file")
    components = tiny_components(0, folder / "tokenizer", family="flux")
    base = save_pipeline(components, folder / "base")
    tuned = perturbed_copy(components["transformer"], 1000)
    return {
        "components": components,
        "base": base,
        "tuned": tuned,
        "base_file": write_flux_transformer_file(folder / "flux1-dev.safetensors", components["transformer"]),
        "tuned_file": write_flux_transformer_file(folder / "tuned.safetensors", tuned, prefix="model.diffusion_model."),
    }


def _equal_states(a, b) -> bool:
    a, b = a.state_dict(), b.state_dict()
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_the_writer_inverts_diffusers_converter_at_flux1_width():
    """At FLUX.1-dev's widths (3072, 24 heads of 128, T5 4096, CLIP 768, guidance), on the meta device: diffusers'
    own `convert_flux_transformer_checkpoint_to_diffusers` maps the writer's BFL names back to exactly the
    model's names and shapes, and diffusers' `infer_diffusers_model_type` calls the file FLUX.1-dev."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import (
        convert_flux_transformer_checkpoint_to_diffusers,
        infer_diffusers_model_type,
    )

    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=2, num_single_layers=2, guidance_embeds=True)
    state = bfl_flux_state(model)
    assert infer_diffusers_model_type(state) == "flux-dev"
    converted = convert_flux_transformer_checkpoint_to_diffusers(dict(state))
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert {key: tuple(value.shape) for key, value in converted.items()} == expected


@pytest.mark.parametrize("which", ["base_file", "tuned_file"])
def test_bfl_files_load_back_to_the_transformer(flux_parts, which):
    """The tiny transformer written as BFL's file (bare and `model.diffusion_model.` names) converts back, through
    diffusers' converter (its FLUX.1 widths padded around the tiny linear1), to bit-equal weights."""
    model = flux_parts["components"]["transformer"] if which == "base_file" else flux_parts["tuned"]
    state = load_file(str(flux_parts[which]))
    assert checkpoint_evidence({k: tuple(v.shape) for k, v in state.items()}).family.name == "flux"
    assert detect_finetuned_format(flux_parts[which]) == "checkpoint"
    assert _equal_states(convert_flux_transformer(state, dict(model.config), "f"), model)


def test_a_flux_base_file_and_fine_tune_file_load_as_a_pair(flux_parts):
    pair = load_model_pair(flux_parts["base_file"], flux_parts["tuned_file"], base_config=flux_parts["base"])
    folder = load_model_pair(flux_parts["base"], flux_parts["base"])
    assert pair.family.name == "flux" and pair.sources["base_format"] == "single-file"
    assert pair.sources["single_file_parts"] == ["transformer"]
    assert _equal_states(pair.base_unet, folder.base_unet)
    assert _equal_states(pair.finetuned_unet, flux_parts["tuned"])
    assert _equal_states(pair.vae, folder.vae) and _equal_states(pair.base_text_encoder_2, folder.base_text_encoder_2)


def test_bad_flux_files_are_named(flux_parts, tmp_path, tiny_zoo):
    state = load_file(str(flux_parts["base_file"]))
    config = dict(flux_parts["components"]["transformer"].config)
    partial = {k: v for k, v in state.items() if k != "final_layer.linear.weight"}
    with pytest.raises(ValueError, match=r"f is partial: the FLUX.1 transformer tensor 'final_layer.linear.weight'"):
        convert_flux_transformer(partial, config, "f")
    with pytest.raises(ValueError, match=r"1 tensors no FLUX.1 transformer has, e.g. \['vae.x'\]"):
        convert_flux_transformer({**state, "vae.x": torch.zeros(1)}, config, "f")
    wider = dict(config, attention_head_dim=2 * config["attention_head_dim"], axes_dims_rope=(8, 12, 12))
    with pytest.raises(ValueError, match=r"rows, expected"):
        convert_flux_transformer(state, wider, "f")
    # an SD 1.x checkpoint as the fine-tune of a FLUX.1 base, and a FLUX.1 file on an SD 1.x base
    from finextract.zoo.models import tiny_components
    from finextract.zoo.writers import write_ldm_checkpoint

    sd = tiny_components(0, tmp_path / "tok")
    write_ldm_checkpoint(tmp_path / "sd.safetensors", sd["unet"], sd["text_encoder"], sd["vae"])
    with pytest.raises(FamilyMismatchError, match=r"is SD 1.x .*; the base is FLUX.1"):
        load_model_pair(flux_parts["base"], tmp_path / "sd.safetensors")
    with pytest.raises(FamilyMismatchError, match=r"is FLUX.1, told by BFL's FLUX.1 transformer names"):
        load_model_pair(tiny_zoo / "base", flux_parts["tuned_file"])
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match="partial"):
        load_model_pair(flux_parts["base"], tmp_path / "partial.safetensors")


def test_the_flux_zoo_holds_every_adapter_layout_and_the_single_files(tmp_path):
    from finextract.engine.lora_formats import detect_lora_format
    from finextract.zoo.build import build_flow_family_zoo

    out = build_flow_family_zoo(tmp_path / "flux", "flux")
    layouts = {
        "lora": "diffusers",
        "lora_kohya.safetensors": "kohya",
        "lora_xlabs.safetensors": "xlabs",
        "lora_onetrainer.safetensors": "onetrainer",
        "lora_comfyui.safetensors": "bfl",
    }
    assert {name: detect_lora_format(out / name) for name in layouts} == layouts
    single = load_model_pair(out / "base.safetensors", out / "dreambooth.safetensors", base_config=out / "base")
    folder = load_model_pair(out / "base", out / "dreambooth")
    assert _equal_states(single.base_unet, folder.base_unet)
    assert _equal_states(single.finetuned_unet, folder.finetuned_unet)
