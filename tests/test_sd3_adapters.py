"""SD3 adapter files: diffusers' layout (`StableDiffusion3Pipeline.save_lora_weights`) read onto the tiny SD3
transformer and both CLIP encoders and checked against diffusers' own SD3 LoRA loader, fused; the layouts
diffusers' SD3 loader does not read (Stability AI's module names: kohya-ss, ComfyUI) refused with their format."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from finextract.engine.adapters import merge_adapters
from finextract.engine.lora_formats import detect_lora_format, read_adapters
from finextract.engine.lora_layouts import LoRAKeyError
from tests.test_flux_adapters import _weights  # module path -> weight, PEFT's fused base_layer as its module

TEXTS = ("text_encoder", "text_encoder_2")
# `zoo_sd3_lora` on the tiny SD3 (2 joint blocks, the last without `to_add_out`): 8 + 7 attention
# projections; each CLIP's first-layer q_proj and v_proj
MODULES = {"transformer": 15, "text_encoder": 2, "text_encoder_2": 2}


@pytest.fixture(scope="module")
def sd3_zoo(tmp_path_factory):
    """The tiny SD3 zoo family (`build_flow_family_zoo(..., "sd3")`): its base folder, components and LoRA file."""
    from finextract.zoo.build import build_flow_family_zoo
    from finextract.zoo.models import tiny_components

    folder = build_flow_family_zoo(tmp_path_factory.mktemp("zoo") / "sd3", "sd3", seed=0)
    components = tiny_components(0, tmp_path_factory.mktemp("tok") / "tokenizer", family="sd3")
    return folder, components, folder / "lora" / "pytorch_lora_weights.safetensors"


def _models(components) -> dict:
    return {name: components[name] for name in ("transformer", *TEXTS)}


def _diffusers_fused(components, path) -> dict:
    """`StableDiffusion3Pipeline.load_lora_weights(path)` then `fuse_lora()`: component -> module -> weight."""
    from diffusers import StableDiffusion3Pipeline

    models = {name: copy.deepcopy(model) for name, model in _models(components).items()}
    pipeline = StableDiffusion3Pipeline(
        scheduler=components["scheduler"],
        vae=None,
        text_encoder_3=None,
        tokenizer=None,
        tokenizer_2=None,
        tokenizer_3=None,
        **models,
    )
    pipeline.load_lora_weights(str(path))
    pipeline.fuse_lora(components=["transformer", *TEXTS])
    return {name: _weights(model) for name, model in models.items()}


def test_sd3_diffusers_lora_matches_diffusers_loader(sd3_zoo):
    """The file's adapters, merged into the transformer and both CLIPs, equal diffusers' fused weights."""
    _, components, path = sd3_zoo
    assert detect_lora_format(path) == "diffusers"
    weights = read_adapters(path, _models(components), family="sd3")
    assert {name: weights.counts[name]["modules"] for name in MODULES} == MODULES
    reference = _diffusers_fused(components, path)
    for name, model in _models(components).items():
        ours = _weights(merge_adapters(copy.deepcopy(model), weights.adapters[name]))
        base = _weights(model)
        assert sum(not torch.equal(ours[m], base[m]) for m in ours) == MODULES[name], name
        for module, weight in ours.items():
            # W + (alpha / rank) B @ A in float32, the two sides summing in another order: a few ulp of the largest
            # |W| or |delta| (both below 2 here); 8 ulp of 2 bounds rank-4 sums and one add
            tolerance = 8 * torch.finfo(torch.float32).eps * 2
            assert torch.allclose(weight, reference[name][module], rtol=0, atol=tolerance), (name, module)


def test_sd3_lora_pair_loads_as_one_gated_transformer(sd3_zoo):
    """`load_model_pair(base, lora=file)`: the transformer's LoRA a per-sample branch holding the file's adapters,
    both CLIPs' merged into copies."""
    from finextract.engine.loading import load_model_pair

    folder, components, path = sd3_zoo
    pair = load_model_pair(folder / "base", lora=path)
    assert pair.family.name == "sd3" and pair.sources["lora_format"] == "diffusers"
    reference = read_adapters(path, _models(components), family="sd3").adapters["transformer"]
    assert sorted(pair.unet_lora) == sorted(reference)
    modules = dict(components["transformer"].named_modules())
    for module, layer in pair.unet_lora.items():
        shape = tuple(modules[module].weight.shape)
        # the same factors, the product formed the same way on both sides: bit-equal
        assert torch.equal(layer.delta().reshape(shape), reference[module].delta(shape)), module


@pytest.mark.parametrize(
    ("key", "kind"),
    [
        ("lora_unet_joint_blocks_0_x_block_attn_qkv", "kohya-ss \\(sd-scripts\\)"),
        ("diffusion_model.joint_blocks.0.x_block.attn.qkv", "ComfyUI"),
    ],
)
def test_sai_named_sd3_loras_are_refused_with_their_format(sd3_zoo, tmp_path, key, kind):
    """diffusers' SD3 LoRA loader has no converter for Stability AI's module names: refused, format named, also
    through `load_model_pair` and `inspect`."""
    from finextract.engine.loading import load_model_pair
    from finextract.inspection import inspect_checkpoint

    folder, components, _ = sd3_zoo
    width = components["transformer"].config.num_attention_heads * components["transformer"].config.attention_head_dim
    file = tmp_path / "sai.safetensors"
    save_file(
        {f"{key}.lora_down.weight": torch.zeros(4, width), f"{key}.lora_up.weight": torch.zeros(3 * width, 4)},
        str(file),
    )
    message = f"a {kind} SD3 LoRA .*which diffusers' SD3 LoRA loader .*does not read"
    with pytest.raises(LoRAKeyError, match=message):
        read_adapters(file, _models(components), family="sd3")
    with pytest.raises(LoRAKeyError, match=message):
        load_model_pair(folder / "base", lora=file)
    if key.startswith("lora_"):
        report = inspect_checkpoint(file)
        assert report["family"]["name"] == "sd3" and not report["runs"]


def test_sd3_lora_is_inspected_and_told_sd3(sd3_zoo):
    from finextract.engine.families import adapter_evidence
    from finextract.engine.loading.checks import adapter_headers
    from finextract.inspection import inspect_checkpoint

    _, _, path = sd3_zoo
    assert adapter_evidence(*adapter_headers(path)).family.name == "sd3"
    report = inspect_checkpoint(path)
    assert (report["kind"], report["format"], report["family"]["name"], report["runs"]) == (
        "adapter",
        "diffusers",
        "sd3",
        True,
    )
    assert {name: report["components"][name]["modules"] for name in MODULES} == MODULES
    assert report["components"]["transformer"]["alphas"] == {"8.0": MODULES["transformer"]}
    assert report["contradictions"] == []
