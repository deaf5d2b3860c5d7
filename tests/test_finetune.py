"""Fine-tuning: a few steps on the random tiny base, then the saved files load back as a ModelPair."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from finextract.zoo import build_base

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
    from finextract.finetune import finetune

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
    from finextract.finetune import LORA_TARGET_MODULES, finetune

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
        seed=0,
        device="cpu",
        progress=False,
    )
    state = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert state and all(k.startswith("unet.") for k in state)
    assert all(any(f".{m}.lora." in k for m in LORA_TARGET_MODULES) for k in state)
    downs = [v for k, v in state.items() if k.endswith("lora.down.weight")]
    assert all(v.shape[0] == 2 for v in downs)
    ups = [v for k, v in state.items() if k.endswith("lora.up.weight")]
    assert any(v.abs().max() > 0 for v in ups)  # B starts at zero: it moved, so the adapters trained
    pair = load_model_pair(base_dir, lora=out, dtype="fp32")
    assert pair.kind == "lora" and len(pair.unet_lora) == len(downs)
    # the base UNet itself is untouched by LoRA training
    base = _unet_weights(base_dir)
    assert torch.equal(pair.base_unet.state_dict()["conv_in.weight"], base["conv_in.weight"].float())


def test_finetune_validates_before_work(base_dir, images_dir, tmp_path):
    from finextract.finetune import finetune

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
    from finextract.finetune import load_images

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
    from finextract.finetune import finetune

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
