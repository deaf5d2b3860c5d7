"""The tiny flow-matching zoo models (SD3, FLUX.1): diffusers' own pipelines accept and run them, the T5
tokenizer is T5's kind, the configs are the released architectures' shapes at tiny widths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from finextract.engine.families import get_family
from finextract.zoo.configs import FLOW_ZOO_FAMILIES, ZOO_CAPTION


@pytest.fixture(scope="module")
def flow_components(tmp_path_factory):
    from finextract.zoo.models import tiny_components

    return {
        name: tiny_components(0, tmp_path_factory.mktemp(name) / "tokenizer", family=name) for name in FLOW_ZOO_FAMILIES
    }


@pytest.mark.parametrize("name", list(FLOW_ZOO_FAMILIES))
def test_diffusers_pipeline_runs_the_tiny_components(flow_components, name):
    from finextract.zoo.models import diffusers_pipeline, family_of_components

    components = flow_components[name]
    family = get_family(family_of_components(components))
    assert family.name == FLOW_ZOO_FAMILIES[name][0]
    pipeline = diffusers_pipeline(components)
    assert type(pipeline).__name__ == family.pipeline_class
    pipeline.set_progress_bar_config(disable=True)
    options = {"true_cfg_scale": 2.0} if family.name == "flux" else {"guidance_scale": 2.0}
    with torch.no_grad():
        images = pipeline(
            ZOO_CAPTION,
            negative_prompt="",
            num_inference_steps=2,
            height=32,
            width=32,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
            **options,
        ).images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    assert images.std() > 0.01  # an image, not a constant: the random VAE decodes a varied latent


def test_t5_tokenizer_is_t5s_kind_and_deterministic(tmp_path):
    from transformers import T5TokenizerFast

    from finextract.zoo.tokenizers import write_t5_tokenizer, zoo_captions

    first = T5TokenizerFast.from_pretrained(write_t5_tokenizer(tmp_path / "a"))
    second = T5TokenizerFast.from_pretrained(write_t5_tokenizer(tmp_path / "b"))
    assert (first.pad_token_id, first.eos_token_id, first.unk_token_id) == (0, 1, 2)  # T5's ids
    assert first.model_max_length == 512
    sentinels = first.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(100)])
    assert sorted(sentinels) == list(range(first.vocab_size, first.vocab_size + 100))  # after the pieces, as T5's
    ids = first(ZOO_CAPTION).input_ids
    assert ids[-1] == first.eos_token_id and first.unk_token_id not in ids
    assert first.decode(ids, skip_special_tokens=True) == ZOO_CAPTION
    # any ASCII prompt tokenises without <unk>: the alphabet is in the vocabulary
    assert first.unk_token_id not in first("Zebra #42, watercolour!").input_ids
    assert all(first(c).input_ids == second(c).input_ids for c in zoo_captions())
    assert first.get_vocab() == second.get_vocab()


def test_flux_rope_axes_fill_the_head_and_the_packing_fits_32_px():
    from finextract.zoo.configs import TINY_FLOW_VAE_CONFIG, TINY_FLUX_TRANSFORMER_CONFIG

    config = TINY_FLUX_TRANSFORMER_CONFIG
    assert sum(config["axes_dims_rope"]) == config["attention_head_dim"]
    assert all(dim % 2 == 0 for dim in config["axes_dims_rope"])  # RoPE rotates pairs
    vae_factor = 2 ** (len(TINY_FLOW_VAE_CONFIG["block_out_channels"]) - 1)
    assert 32 % (vae_factor * 2) == 0  # FluxPipeline's rule: 2 x 2 packing of the latents
    assert config["in_channels"] == TINY_FLOW_VAE_CONFIG["latent_channels"] * 4


def test_flow_family_zoo_folders_load_in_the_pipeline_and_are_detected(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from finextract.engine.loading.folders import folder_family
    from finextract.zoo.build import build_flow_family_zoo

    out = build_flow_family_zoo(tmp_path / "sd3", "sd3")
    assert (out / "caption.txt").read_text().strip() == ZOO_CAPTION
    assert (out / "base.safetensors").is_file() and (out / "dreambooth.safetensors").is_file()
    for name in ("base", "dreambooth"):
        assert folder_family(out / name, name)[0].name == "sd3"
    pipeline = StableDiffusion3Pipeline.from_pretrained(str(out / "base"))
    assert type(pipeline.tokenizer_3).__name__ == "T5Tokenizer" and pipeline.vae.config.latent_channels == 16
