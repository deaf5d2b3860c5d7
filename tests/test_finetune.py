"""Fine-tuning: a few steps on the random tiny base, then the saved files load back as a ModelPair."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from finextract.zoo.models import build_base

    return build_base(tmp_path_factory.mktemp("ft") / "base", seed=0)


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(3):  # not square and not 32 px: exercises the centre crop and resize
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _unet_weights(folder):
    from safetensors.torch import load_file

    return load_file(str(next((folder / "unet").glob("*.safetensors"))))


def test_dreambooth_trains_saves_and_loads_back(base_dir, images_dir, tmp_path):
    from finextract.engine.loading import load_model_pair
    from finextract.finetuning import finetune

    out = finetune(
        base_dir,
        images_dir,
        "a photo of sks",
        out=tmp_path / "db",
        steps=6,
        lr=1e-3,
        batch_size=2,
        seed=0,
        device="cpu",
        progress=False,
    )
    record = json.loads((out / "finetune.json").read_text())
    assert np.isfinite(record["final_loss"]) and 0 < record["final_loss"] < 10
    assert record["resolution"] == 32 and record["steps"] == 6
    assert record["num_images"] == 3 and record["caption"] == "a photo of sks" and record["base_name"] == base_dir.name
    from finextract.engine.metadata import read_metadata, training_record

    unet_keys = read_metadata(out / "unet")["sources"]["diffusion_pytorch_model.safetensors"]
    assert unet_keys["modelspec.trigger_phrase"] == "a photo of sks" and unet_keys["ss_num_train_images"] == "3"
    trained = training_record(read_metadata(out))
    assert trained.n0.value == 3 and trained.n0.source == "finetune.json:num_images"
    before, after = _unet_weights(base_dir), _unet_weights(out)
    assert before.keys() == after.keys()
    changed = sum(not torch.equal(before[k], after[k]) for k in before)
    assert changed > 0.9 * len(before)  # (nearly) every UNet tensor moved
    pair = load_model_pair(base_dir, out, dtype="fp32")
    assert pair.kind == "dreambooth"
    name = "conv_in.weight"
    assert torch.allclose(pair.finetuned_unet.state_dict()[name], after[name].float())
    assert not torch.equal(pair.base_unet.state_dict()[name], pair.finetuned_unet.state_dict()[name])


def test_lora_trains_only_adapters_and_loads_back(base_dir, images_dir, tmp_path):
    from safetensors.torch import load_file

    from finextract.engine.loading import load_model_pair
    from finextract.finetuning import LORA_TARGET_MODULES, finetune

    out = finetune(
        base_dir,
        images_dir,
        "a photo of sks",
        out=tmp_path / "lora",
        method="lora",
        steps=6,
        lr=1e-2,
        batch_size=2,
        rank=2,
        lora_modules="attention",
        seed=0,
        device="cpu",
        progress=False,
    )
    state = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert state and all(k.startswith("unet.") for k in state)
    assert all(any(f".{m}.lora_" in k for m in LORA_TARGET_MODULES) for k in state)
    downs = [v for k, v in state.items() if k.endswith("lora_A.weight")]
    assert all(v.shape[0] == 2 for v in downs)
    ups = [v for k, v in state.items() if k.endswith("lora_B.weight")]
    assert any(v.abs().max() > 0 for v in ups)  # B starts at zero: it moved, so the adapters trained
    pair = load_model_pair(base_dir, lora=out, dtype="fp32")
    assert pair.kind == "lora" and len(pair.unet_lora) == len(downs)
    # what it trained, in kohya's and the model spec's keys, read back as any kohya file is
    from finextract.engine.metadata import kohya_model_hashes, read_metadata, training_record

    metadata = read_metadata(out / "pytorch_lora_weights.safetensors")
    record = training_record(metadata)
    assert record.n0.value == 3 and record.n0.source == "ss_dataset_dirs"
    assert json.loads(metadata["sources"][""]["ss_dataset_dirs"]) == {images_dir.name: {"n_repeats": 1, "img_count": 3}}
    assert record.caption.value == "a photo of sks" and record.caption.source == "modelspec.trigger_phrase"
    assert record.settings["network_dim"].value == 2 and record.settings["steps"].value == 6
    hashes = kohya_model_hashes(base_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert record.parent["sha256"].value == hashes["ss_new_sd_model_hash"]
    assert record.parent["hash"].value == hashes["ss_sd_model_hash"] and record.parent["name"].value == base_dir.name
    # the base UNet itself is untouched by LoRA training
    base = _unet_weights(base_dir)
    assert torch.equal(pair.base_unet.state_dict()["conv_in.weight"], base["conv_in.weight"].float())


def test_locon_adapts_attention_feed_forward_and_convolutions(base_dir, images_dir, tmp_path):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from finextract.engine.loading import load_model_pair
    from finextract.finetuning import finetune, lora_target_modules

    unet = UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet")
    targets = lora_target_modules(unet, "locon")
    modules = dict(unet.named_modules())
    convs = [n for n in targets if isinstance(modules[n], torch.nn.Conv2d)]
    # every Linear / Conv2d of the blocks: the attention ones, feed-forward, projections, ResNet convs
    assert set(lora_target_modules(unet, "attention")) < set(targets)
    assert any(n.endswith("ff.net.2") for n in targets) and any(n.endswith("proj_in") for n in targets)
    assert any(n.endswith("resnets.0.conv1") for n in convs) and any("downsamplers" in n for n in convs)
    assert not any(n.startswith(("conv_in", "conv_out", "time_embedding")) for n in targets)
    out = finetune(
        base_dir,
        images_dir,
        "a photo of sks",
        out=tmp_path / "locon",
        method="lora",
        steps=3,
        lr=1e-2,
        batch_size=2,
        rank=2,
        lora_modules="locon",
        device="cpu",
        progress=False,
    )
    state = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert len([k for k in state if k.endswith("lora_A.weight")]) == len(targets)
    conv_down = state[f"unet.{convs[0]}.lora_A.weight"]
    assert conv_down.dim() == 4 and conv_down.shape[0] == 2  # (rank, in, kh, kw)
    pair = load_model_pair(base_dir, lora=out, dtype="fp32")
    assert len(pair.unet_lora) == len(targets)
    assert json.loads((out / "finetune.json").read_text())["lora_modules"] == "locon"
    # the file means to diffusers' own loader what it means to ours: the same fused weights
    import copy

    from diffusers import StableDiffusionPipeline

    from finextract.engine.lora import merge_lora

    ours = merge_lora(copy.deepcopy(pair.base_unet), pair.unet_lora).state_dict()
    state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(str(out), return_lora_metadata=True)
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet, metadata=metadata)
    unet.fuse_lora()
    theirs = unet.state_dict()  # fused weights stay in PEFT's `base_layer`
    moved = 0
    for module in targets:
        fused = theirs[f"{module}.base_layer.weight"]
        moved += not torch.equal(fused, pair.base_unet.state_dict()[f"{module}.weight"])
        # fp32 sums of a rank-2 product: equal to rounding
        assert torch.allclose(ours[f"{module}.weight"], fused, atol=1e-6), module
    assert moved == len(targets)


def test_default_recipe_follows_model_size():
    from finextract.finetuning import SD_RECIPES, TINY_RECIPES, default_recipe
    from finextract.zoo.configs import TINY_UNET_CONFIG

    sd_config = {"block_out_channels": (320, 640, 1280, 1280)}
    assert default_recipe(sd_config, "dreambooth") == SD_RECIPES["dreambooth"]
    assert SD_RECIPES["dreambooth"].lr == 5e-6 and SD_RECIPES["lora"].rank == 64
    assert default_recipe(TINY_UNET_CONFIG, "lora") == TINY_RECIPES["lora"]
    assert TINY_RECIPES["lora"].lora_modules == "locon"


def test_defaults_come_from_the_recipe_and_a_flat_loss_warns(base_dir, images_dir, tmp_path, caplog, monkeypatch):
    """With no settings the tiny base gets the tiny recipe; an lr too small to learn anything warns."""
    import logging

    from finextract import finetuning as module
    from finextract.finetuning import Recipe, finetune

    monkeypatch.setitem(module.TINY_RECIPES, "dreambooth", Recipe(steps=8, lr=1e-9, batch_size=2))
    with caplog.at_level(logging.WARNING, logger="finextract"):
        out = finetune(base_dir, images_dir, "a photo of sks", out=tmp_path / "flat", device="cpu", progress=False)
    record = json.loads((out / "finetune.json").read_text())
    assert (record["steps"], record["lr"], record["batch_size"]) == (8, 1e-9, 2)
    assert record["loss_fell"] is False
    assert any("the loss has not fallen" in r.getMessage() for r in caplog.records)


def test_loss_fall():
    from finextract.finetuning import loss_fall

    assert loss_fall([1.0] * 8 + [0.5] * 8) == (1.0, 0.5, True)
    assert loss_fall([1.0] * 16)[2] is False
    assert loss_fall([1.0, 0.1])[2] is False  # too few steps to tell


def test_finetune_validates_before_work(base_dir, images_dir, tmp_path):
    from finextract.finetuning import finetune

    with pytest.raises(ValueError, match="--method"):
        finetune(base_dir, images_dir, "c", out=tmp_path / "x", method="textual-inversion")
    with pytest.raises(ValueError, match="autocast needs a CUDA"):
        finetune(base_dir, images_dir, "c", out=tmp_path / "x", dtype="fp16", device="cpu")
    with pytest.raises(FileNotFoundError, match=r"model_index\.json"):
        finetune(tmp_path, images_dir, "c", out=tmp_path / "x")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_text("<html>not an image</html>")
    with pytest.raises(ValueError, match=r"a\.png"):
        finetune(base_dir, tmp_path / "bad", "c", out=tmp_path / "x", steps=1)


def test_load_images_crops_and_resizes():
    from finextract.finetuning import load_images

    image = np.zeros((20, 40, 3), np.uint8)
    image[:, 10:30] = 255  # the centre square is white, the sides black
    out = load_images([image], 8)
    assert out.shape == (1, 8, 8, 3) and out.dtype == np.uint8
    assert out.min() == 255


def test_cli_finetune(base_dir, images_dir, tmp_path):
    from finextract.cli import main

    assert (
        main(
            [
                "finetune",
                "--base",
                str(base_dir),
                "--images",
                str(images_dir),
                "--caption",
                "a photo of sks",
                "--method",
                "lora",
                "--steps",
                "2",
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "cli"),
            ]
        )
        == 0
    )
    assert (tmp_path / "cli" / "pytorch_lora_weights.safetensors").is_file()
    assert (
        main(
            [
                "finetune",
                "--base",
                str(tmp_path / "none"),
                "--images",
                str(images_dir),
                "--caption",
                "c",
                "--out",
                str(tmp_path / "y"),
            ]
        )
        == 1
    )


@pytest.mark.gpu
def test_finetune_mixed_precision_on_cuda(base_dir, images_dir, tmp_path):
    from finextract.finetuning import finetune

    for dtype in ("fp16", "bf16"):
        out = finetune(
            base_dir,
            images_dir,
            "a photo of sks",
            out=tmp_path / dtype,
            steps=4,
            lr=1e-3,
            batch_size=2,
            device="cuda",
            dtype=dtype,
            progress=False,
        )
        assert np.isfinite(json.loads((out / "finetune.json").read_text())["final_loss"])


def test_a_second_finetune_into_one_folder_is_refused_or_replaces_it_whole(base_dir, images_dir, tmp_path):
    """DreamBooth then LoRA into one folder would leave a pipeline beside a LoRA file: refused before
    training, or with overwrite=True replaced whole (no unet/ left)."""
    from finextract.finetuning import finetune

    options = dict(steps=1, batch_size=1, seed=0, device="cpu", progress=False)
    out = finetune(base_dir, images_dir, "a photo of sks", out=tmp_path / "ft", **options)
    assert (out / "unet").is_dir() and (out / "finetune.json").is_file()
    lora = dict(method="lora", rank=2, lora_modules="attention", **options)
    with pytest.raises(
        ValueError,
        match=r"holds another run \(there -> now: lora_modules: None -> 'attention'; method: dreambooth -> lora; rank: None -> 2\); .*--overwrite",
    ):
        finetune(base_dir, images_dir, "a photo of sks", out=out, **lora)
    assert (out / "unet").is_dir() and json.loads((out / "finetune.json").read_text())["method"] == "dreambooth"
    finetune(base_dir, images_dir, "a photo of sks", out=out, overwrite=True, **lora)
    assert sorted(p.name for p in out.iterdir()) == ["finetune.json", "pytorch_lora_weights.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft"]  # no staging folder left beside it
    record = json.loads((out / "finetune.json").read_text())
    assert record["method"] == "lora" and record["run_folder"]["settings"]["rank"] == 2
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a fine-tune")
    with pytest.raises(ValueError, match="not empty and holds no `finextract finetune` output"):
        finetune(base_dir, images_dir, "a photo of sks", out=tmp_path / "mine", **options)
