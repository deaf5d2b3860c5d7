"""The trained zoos' cached stages at a few steps each: the flow pair's build (`build_flow_zoo`) writes a
layout `finextract demo` and the loaders read, and a rebuild with the cache trains nothing; the SD 1.x
zoo's fine-tune stage (`build_finetune`) is cached the same way."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch


def test_flow_zoo_builds_a_loadable_pair_and_a_rebuild_reuses_every_stage(tmp_path):
    from finextract.engine.loading import load_model_pair
    from finextract.zoo.flow_trained import FlowZooRecipe, build_flow_zoo

    recipe = replace(FlowZooRecipe(), crops_per_image=2, base_steps=3, dreambooth_steps=2, lora_steps=2)
    cache = tmp_path / "cache"
    out = build_flow_zoo(tmp_path / "zoo", recipe, cache=cache, progress=False)
    record = json.loads((out / "flow_zoo.json").read_text())
    assert not any(stage["reused"] for stage in record["timings"].values())
    assert set(record["losses"]) == {"base", "dreambooth", "lora"}
    assert sorted(p.name for p in (out / "dreambooth").iterdir()) == ["finetune.json", "transformer"]
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "caption.txt").read_text().strip() == "a photo of sks" and len(list((out / "train").iterdir())) == 5
    base = json.loads((out / "base" / "model_index.json").read_text())
    assert base["_class_name"] == "StableDiffusion3Pipeline" and base["text_encoder_3"] == [None, None]
    dreambooth = load_model_pair(out / "base", out / "dreambooth")
    assert dreambooth.family.name == "sd3" and dreambooth.base_unet.config.in_channels == 4
    assert not torch.equal(dreambooth.base_unet.proj_out.weight, dreambooth.finetuned_unet.proj_out.weight)
    assert load_model_pair(out / "base", out / "lora").kind == "lora"

    again = build_flow_zoo(tmp_path / "zoo2", recipe, cache=cache, progress=False)
    timings = json.loads((again / "flow_zoo.json").read_text())["timings"]
    assert all(timings[stage]["reused"] for stage in ("base", "dreambooth", "lora"))
    for name in ("transformer/diffusion_pytorch_model.safetensors",):
        assert (again / "dreambooth" / name).read_bytes() == (out / "dreambooth" / name).read_bytes()


def test_the_sd1_zoos_finetune_stage_is_built_then_reused(tmp_path):
    from finextract.zoo.trained import build_finetune, default_zoo_folder, write_training_set
    from finextract.zoo.training import TrainedZooRecipe

    zoo = tmp_path / "zoo"
    shutil.copytree(default_zoo_folder() / "base", zoo / "base")
    write_training_set(zoo, "object", 32)
    recipe = replace(TrainedZooRecipe(), dreambooth_steps=2)
    first = build_finetune(zoo, recipe, "object", "dreambooth", cache=tmp_path / "cache", progress=False)
    assert first["reused"] is False
    assert sorted(p.name for p in (zoo / "dreambooth").iterdir()) == ["finetune.json", "unet"]
    assert json.loads((zoo / "dreambooth" / "finetune.json").read_text())["base"] == "../base"
    second = build_finetune(zoo, recipe, "object", "dreambooth", cache=tmp_path / "cache", progress=False)
    assert second == {"seconds": first["seconds"], "reused": True}


def test_flow_zoo_refuses_an_unknown_method(tmp_path):
    from finextract.zoo.flow_trained import build_flow_zoo

    with pytest.raises(ValueError, match="method 'textual-inversion'"):
        build_flow_zoo(tmp_path, methods=("textual-inversion",))
