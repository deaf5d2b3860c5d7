"""FLUX.1 adapter files in every layout FLUX trainers publish: detected from their keys, read onto the tiny
FLUX transformer and CLIP text encoder, and checked against diffusers' own FLUX LoRA loader, fused."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

from finextract.engine.adapters import merge_adapters
from finextract.engine.lora_formats import detect_lora_format, read_adapters
from finextract.engine.lora_layouts import LoRAKeyError

FORMATS = ("diffusers", "kohya", "xlabs", "onetrainer", "bfl")
# adapted modules per format (`zoo_flux_lora`: 8 double-block and 3 single-block attention projections plus
# the single block's proj_out; kohya has no single-block q, k, v (fused into linear1 with the MLP input);
# OneTrainer's file leaves proj_out out (diffusers' OneTrainer converter maps attention modules only);
# XLabs has no text encoder; ComfyUI's BFL names hold kohya's modules)
MODULES = {"diffusers": (12, 2), "kohya": (9, 2), "xlabs": (12, 0), "onetrainer": (11, 2), "bfl": (9, 2)}


@pytest.fixture(scope="module")
def flux_zoo(tmp_path_factory):
    """The tiny FLUX.1 components (`tiny_components(family="flux")`) and their adapter files (`write_flux_adapters`)."""
    from finextract.zoo.flux_writers import write_flux_adapters
    from finextract.zoo.models import tiny_components

    folder = tmp_path_factory.mktemp("flux")
    components = tiny_components(0, folder / "tokenizer", family="flux")
    files = write_flux_adapters(folder, components["transformer"], components["text_encoder"], seed=2000)
    return components, files


@pytest.fixture(scope="module")
def flux_base(flux_zoo, tmp_path_factory):
    """The tiny FLUX.1 components saved as a `FluxPipeline` folder."""
    from finextract.zoo.models import save_pipeline

    return save_pipeline(flux_zoo[0], tmp_path_factory.mktemp("flux_base") / "base")


def _models(components) -> dict:
    return {"transformer": components["transformer"], "text_encoder": components["text_encoder"]}


def _weights(model) -> dict:
    """module path (without CLIP's `text_model.`) -> weight; PEFT's fused `base_layer` as its module."""
    found = {}
    for name, value in model.state_dict().items():
        if name.endswith(".weight") and "lora_" not in name:
            found[name.removeprefix("text_model.").removesuffix(".weight").removesuffix(".base_layer")] = value
    return found


def _diffusers_fused(components, path) -> dict:
    """diffusers' FLUX LoRA loading of `path` (`FluxPipeline.lora_state_dict`, `load_lora_into_transformer`,
    `load_lora_into_text_encoder`, as `load_lora_weights` calls them), fused: component -> module -> weight."""
    from diffusers import FluxPipeline

    transformer = copy.deepcopy(components["transformer"])
    text_encoder = copy.deepcopy(components["text_encoder"])
    pipeline = FluxPipeline(
        scheduler=None,
        vae=None,
        text_encoder=text_encoder,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )
    state, alphas, metadata = FluxPipeline.lora_state_dict(str(path), return_alphas=True, return_lora_metadata=True)
    parts = {c: {k: v for k, v in state.items() if k.startswith(c + ".")} for c in ("transformer", "text_encoder")}
    FluxPipeline.load_lora_into_transformer(parts["transformer"], alphas, transformer, metadata=metadata)
    components_fused = ["transformer"]
    # diffusers 0.42 cannot place `text_model.`-named keys on transformers 5's CLIPTextModel (which lost the
    # prefix), nor infer the type of kohya text-encoder keys without an `out_proj`: renamed / typed here
    text = {k.replace("text_encoder.text_model.", "text_encoder."): v for k, v in parts["text_encoder"].items()}
    if text:
        from diffusers.utils.state_dict_utils import StateDictType, convert_state_dict_to_peft

        if any("_lora." in k or "lora_linear_layer" in k for k in text):
            text = convert_state_dict_to_peft(text, original_type=StateDictType.DIFFUSERS_OLD)
        if metadata and "text_encoder.target_modules" in metadata:
            names = metadata["text_encoder.target_modules"]
            metadata["text_encoder.target_modules"] = [n.removeprefix("text_model.") for n in names]
        FluxPipeline.load_lora_into_text_encoder(text, alphas, text_encoder, prefix="text_encoder", metadata=metadata)
        components_fused.append("text_encoder")
    pipeline.fuse_lora(components=components_fused)
    return {"transformer": _weights(transformer), "text_encoder": _weights(text_encoder)}


@pytest.mark.parametrize("fmt", FORMATS)
def test_flux_formats_are_detected_from_their_keys(flux_zoo, fmt):
    _, files = flux_zoo
    assert detect_lora_format(files[fmt]) == fmt


@pytest.mark.parametrize("fmt", FORMATS)
def test_flux_lora_formats_match_diffusers_loader(flux_zoo, fmt):
    """Each layout's adapters, merged into the transformer and CLIP, equal diffusers' fused weights."""
    components, files = flux_zoo
    weights = read_adapters(files[fmt], _models(components), family="flux")
    assert weights.format == fmt
    counts = (weights.counts["transformer"]["modules"], weights.counts["text_encoder"]["modules"])
    assert counts == MODULES[fmt]
    reference = _diffusers_fused(components, files[fmt])
    ours = {
        name: _weights(merge_adapters(copy.deepcopy(components[name]), weights.adapters[name]))
        for name in ("transformer", "text_encoder")
    }
    base = {name: _weights(components[name]) for name in ("transformer", "text_encoder")}
    for component, found in ours.items():
        adapted = [m for m in found if not torch.equal(found[m], base[component][m])]
        assert len(adapted) == MODULES[fmt][component == "text_encoder"], component
        theirs = reference[component]
        for module, weight in found.items():
            # W + B @ A (alpha / rank folded or applied) in float32, the two sides in another order: a few ulp
            # of the largest |W| or |delta| (both below 2 here); 8 ulp of 2 bounds rank-4 sums and one add
            tolerance = 8 * torch.finfo(torch.float32).eps * 2
            assert torch.allclose(weight, theirs[module], rtol=0, atol=tolerance), (component, module)


def test_the_formats_hold_the_same_adapters(flux_zoo):
    """The layouts carry one set of adapters: each module's merged weight is the same whichever file it came from
    (XLabs folds alpha / rank into `up`, kohya's converter into both factors: float32 rounding apart)."""
    components, files = flux_zoo
    merged = {}
    for fmt in FORMATS:
        weights = read_adapters(files[fmt], _models(components))
        merged[fmt] = _weights(
            merge_adapters(copy.deepcopy(components["transformer"]), weights.adapters["transformer"])
        )
    base = _weights(components["transformer"])
    for fmt in FORMATS[1:]:
        adapted = [m for m, weight in merged[fmt].items() if not torch.equal(weight, base[m])]
        assert len(adapted) == MODULES[fmt][0]
        for module in adapted:
            # as above: a few float32 ulp of |W| + |delta| < 2 (the scale folded in another place)
            tolerance = 8 * torch.finfo(torch.float32).eps * 2
            assert torch.allclose(merged[fmt][module], merged["diffusers"][module], rtol=0, atol=tolerance), module


def test_t5_and_resized_adapters_are_refused_with_their_format(flux_zoo, tmp_path):
    components, files = flux_zoo
    state = load_file(str(files["kohya"]))
    t5 = dict(state)
    t5["lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight"] = torch.zeros(4, 64)
    t5["lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight"] = torch.zeros(64, 4)
    save_file(t5, str(tmp_path / "t5.safetensors"))
    with pytest.raises(LoRAKeyError, match=r"kohya-ss \(sd-scripts\) FLUX LoRA that adapts FLUX's T5"):
        read_adapters(tmp_path / "t5.safetensors", _models(components))
    # a single block's linear1 (q, k, v and the MLP input fused): diffusers splits it at FLUX.1's widths only
    fused = dict(state)
    width = components["transformer"].config.num_attention_heads * components["transformer"].config.attention_head_dim
    fused["lora_unet_single_blocks_0_linear1.lora_down.weight"] = torch.zeros(4, width)
    fused["lora_unet_single_blocks_0_linear1.lora_up.weight"] = torch.zeros(7 * width, 4)
    save_file(fused, str(tmp_path / "linear1.safetensors"))
    with pytest.raises(LoRAKeyError, match=r"kohya-ss \(sd-scripts\) FLUX LoRA that diffusers' .*FLUX.1's widths"):
        read_adapters(tmp_path / "linear1.safetensors", _models(components))
    # OneTrainer's T5 adapters: not read by diffusers either
    one = load_file(str(files["onetrainer"]))
    one["lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight"] = torch.zeros(4, 64)
    save_file(one, str(tmp_path / "one.safetensors"))
    models = dict(_models(components), text_encoder_2=components["text_encoder_2"])
    with pytest.raises(LoRAKeyError, match=r"a OneTrainer FLUX LoRA that adapts FLUX's T5 text encoder"):
        read_adapters(tmp_path / "one.safetensors", models, family="flux")


def test_bare_bfl_names_diffusers_does_not_convert_are_refused(flux_zoo, tmp_path):
    components, _ = flux_zoo
    width = components["transformer"].config.num_attention_heads * components["transformer"].config.attention_head_dim
    tensors = {
        "double_blocks.0.img_attn.proj.lora_A.weight": torch.zeros(4, width),
        "double_blocks.0.img_attn.proj.lora_B.weight": torch.zeros(width, 4),
    }
    save_file(tensors, str(tmp_path / "bare.safetensors"))
    assert detect_lora_format(tmp_path / "bare.safetensors") == "bfl"
    with pytest.raises(
        LoRAKeyError, match=r"a BFL-named \(ComfyUI / fal\) LoRA whose keys diffusers' FLUX LoRA loader"
    ):
        read_adapters(tmp_path / "bare.safetensors", _models(components))


def test_a_flux_lora_on_a_unet_base_is_refused(flux_zoo, tiny_base):
    _, files = flux_zoo
    for fmt in FORMATS:
        with pytest.raises(LoRAKeyError, match="adapters for a diffusion transformer"):
            read_adapters(files[fmt], {"unet": tiny_base["unet"], "text_encoder": tiny_base["text_encoder"]})


# modules as each file names them (BFL's fused q/k/v count once), and where its alphas come from
INSPECTED = {
    "diffusers": (12, "config"),
    "kohya": (5, "tensors"),
    "xlabs": (6, "the format's (scale 1)"),
    "onetrainer": (11, "tensors"),
    "bfl": (5, "tensors"),
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_flux_files_are_inspected_and_told_flux(flux_zoo, fmt):
    from finextract.engine.families import adapter_evidence
    from finextract.engine.loading.checks import adapter_headers
    from finextract.inspection import inspect_checkpoint

    _, files = flux_zoo
    assert adapter_evidence(*adapter_headers(files[fmt])).family.name == "flux"
    report = inspect_checkpoint(files[fmt])
    assert (report["kind"], report["format"], report["family"]["name"]) == ("adapter", fmt, "flux") and report["runs"]
    transformer = report["components"]["transformer"]
    assert (transformer["modules"], transformer["alpha_source"]) == INSPECTED[fmt]
    assert transformer["ranks"] == {"4": INSPECTED[fmt][0]} and "unparsed" not in report["components"]
    # alpha 8 at rank 4 (XLabs: scale 1 with alpha / rank folded into `up`)
    assert transformer["alphas"] == {"4.0" if fmt == "xlabs" else "8.0": INSPECTED[fmt][0]}
    assert report["components"].get("text_encoder", {}).get("modules", 0) == MODULES[fmt][1]
    assert report["contradictions"] == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_flux_lora_pairs_load_as_one_gated_transformer(flux_zoo, flux_base, fmt):
    """`load_model_pair` on a FluxPipeline folder and each layout: the transformer's LoRA stays a per-sample
    low-rank branch (one fused 2B forward) holding the file's adapters; CLIP's are merged into a copy."""
    from finextract.engine.loading import load_model_pair

    components, files = flux_zoo
    pair = load_model_pair(flux_base, lora=files[fmt])
    assert pair.family.name == "flux" and pair.sources["lora_format"] == fmt
    reference = read_adapters(files[fmt], _models(components), family="flux").adapters["transformer"]
    assert sorted(pair.unet_lora) == sorted(reference)
    modules = dict(components["transformer"].named_modules())
    for module, layer in pair.unet_lora.items():
        shape = tuple(modules[module].weight.shape)
        # the same factors, the product formed the same way on both sides: bit-equal
        assert torch.equal(layer.delta().reshape(shape), reference[module].delta(shape)), module
    changed = [
        m
        for m, w in _weights(pair.finetuned_text_encoder).items()
        if not torch.equal(w, _weights(pair.base_text_encoder)[m])
    ]
    assert len(changed) == MODULES[fmt][1]
