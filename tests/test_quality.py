"""Extraction quality on the committed trained DreamBooth pair (fast: N = 25 and 25 DDIM steps).

The full-N numbers (`finextract demo`) are recorded in bench/results/demo.json.
"""

from __future__ import annotations

import pytest

N0, N, STEPS = 5, 25, 25
# Measured with this file on the committed zoo (N = 25, 25 DDIM steps, seed 0, torch backend): AS
# FineXtract 0.596, CFG 0.329, pretrained 0.189; full-N numbers in bench/results/demo.json. Each margin
# is half the measured gap, which leaves room for the noise of 25 samples.
MARGIN_PRETRAINED = 0.2
MARGIN_CFG = 0.13


@pytest.fixture(scope="module")
def zoo():
    from finextract.trained_zoo import default_zoo_folder

    folder = default_zoo_folder()
    assert (folder / "dreambooth" / "model_index.json").is_file(), f"{folder}: the trained zoo is not committed"
    return folder


def _as(extractor, caption, zoo, method):
    result = extractor.extract(
        caption, N0, num_images=N, method=method, steps=STEPS, seed=0, batch_size=N, train=zoo / "train", progress=False
    )
    return result.metrics["AS"]


def test_committed_zoo_layout(zoo):
    caption = (zoo / "caption.txt").read_text().strip()
    assert caption
    assert len(sorted((zoo / "train").glob("*.png"))) == N0
    assert (zoo / "lora" / "pytorch_lora_weights.safetensors").is_file()
    total = sum(p.stat().st_size for p in zoo.rglob("*") if p.is_file())
    assert total < 25e6, f"committed weights are {total / 1e6:.1f} MB; keep them under 25 MB"


def test_committed_configs_hold_no_build_paths(zoo):
    import json

    configs = [p for p in zoo.rglob("*.json") if p.name in ("config.json", "model_index.json")]
    assert len(configs) >= 8  # base and dreambooth: model_index, unet, vae, text_encoder
    for config in configs:
        assert "_name_or_path" not in json.loads(config.read_text()), f"{config} records its build folder"


def test_finextract_beats_pretrained_and_cfg_on_dreambooth(zoo):
    from finextract.extract import Extractor

    caption = (zoo / "caption.txt").read_text().strip()
    finetuned = Extractor(zoo / "base", zoo / "dreambooth", device="cpu")
    as_finextract = _as(finetuned, caption, zoo, "finextract")
    as_cfg = _as(finetuned, caption, zoo, "cfg")
    # the pretrained model's own generations for the caption: the base against itself, Direct rule
    pretrained = Extractor(zoo / "base", zoo / "base", device="cpu")
    as_pretrained = _as(pretrained, caption, zoo, "direct")
    print(f"AS finextract {as_finextract:.3f} cfg {as_cfg:.3f} pretrained {as_pretrained:.3f}")
    assert as_finextract > as_pretrained + MARGIN_PRETRAINED, (as_finextract, as_pretrained)
    assert as_finextract > as_cfg + MARGIN_CFG, (as_finextract, as_cfg)


def test_demo_runs_and_prints_table(zoo, tmp_path, capsys):
    import json

    from finextract.cli import main

    out = tmp_path / "demo"
    assert (
        main(
            [
                "demo",
                "--out",
                str(out),
                "--num-images",
                "10",
                "--steps",
                "4",
                "--kinds",
                "lora",
                "--methods",
                "finextract,direct",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "FineXtract" in printed and "Direct" in printed and "A-ESR0.6" in printed and "report.html" in printed
    summary = json.loads((out / "demo.json").read_text())
    assert [(r["kind"], r["method"]) for r in summary["rows"]] == [("lora", "finextract"), ("lora", "direct")]
    for row in summary["rows"]:
        assert 0 <= row["A-ESR0.7"] <= row["A-ESR0.6"] <= 1 and -1 <= row["AS"] <= 1
        assert len(list((out / row["folder"] / "best_match").glob("*.png"))) == 5
    assert "lora-finextract/best_match/train0.png" in (out / "report.html").read_text()


def test_committed_latents_have_unit_variance(zoo):
    """The diffusion sees VAE latents * scaling_factor; the noise schedule assumes they have unit
    variance (SD's 0.18215 does this for its own VAE). The old tiny zoo kept SD's number: std 0.25."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL

    from finextract.images import read_images
    from finextract.trained_zoo import _to_tensor

    vae = AutoencoderKL.from_pretrained(zoo / "base" / "vae", torch_dtype=torch.float32).eval()
    photos = np.stack(read_images(zoo / "train")[0])
    with torch.no_grad():
        latents = vae.encode(_to_tensor(photos)).latent_dist.mean * vae.config.scaling_factor
    assert 0.7 < latents.std().item() < 1.4, latents.std().item()
