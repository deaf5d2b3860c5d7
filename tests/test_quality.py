"""Extraction quality on the committed trained zoo (fast: small N and 25 DDIM steps).

The full-N table over 3 sampling seeds (`finextract demo --scenarios object,style --seeds 3`) is
recorded in bench/results/demo.json.
"""

from __future__ import annotations

import pytest

STEPS = 25
# Measured with this file's settings (N, 25 DDIM steps, torch backend) on the committed zoo over the
# sampling seeds 0, N, 2N (AS per seed; also in bench/results/demo.json, "after_probe"):
MEASURED = {
    ("object", "dreambooth"): {
        "finextract": (0.5732, 0.4658, 0.5958),
        "cfg": (0.3961, 0.3689, 0.4079),
        "direct": (0.3202, 0.2936, 0.3881),
    },
    ("object", "lora"): {
        "finextract": (0.5850, 0.4923, 0.5370),
        "cfg": (0.4617, 0.4964, 0.4230),
        "direct": (0.3614, 0.4181, 0.4958),
    },
}


# (scenario, kind) -> (N, margin). The test runs seed 0; its margin is the mean FineXtract - CFG gap
# over the three seeds minus twice the gap's standard deviation over them (0.154 - 2 x 0.050 on the
# DreamBooth), so one small-N seed's noise does not fail it while FineXtract falling to CFG's level does.
# On the LoRA that bound is negative (gap 0.078 ± 0.071: one seed tied), so the test only asks
# FineXtract to stay ahead at seed 0 (measured gap 0.123). The style scenario is not built yet.
def _margin(measured: dict) -> float:
    import numpy as np

    gaps = np.subtract(measured["finextract"], measured["cfg"])
    return max(0.0, round(float(gaps.mean() - 2 * gaps.std(ddof=1)), 2))


CASES = {case: (25, _margin(measured)) for case, measured in MEASURED.items()}  # DreamBooth 0.05, LoRA 0


@pytest.fixture(scope="module")
def zoo():
    from finextract.trained_zoo import default_zoo_folder

    folder = default_zoo_folder()
    assert (folder / "base" / "model_index.json").is_file(), f"{folder}: the trained zoo is not committed"
    return folder


def _as(extractor, folder, method, n0, num_images, seed=0):
    caption = (folder / "caption.txt").read_text().strip()
    result = extractor.extract(
        caption,
        n0,
        num_images=num_images,
        method=method,
        steps=STEPS,
        seed=seed,
        batch_size=num_images,
        train=folder / "train",
        progress=False,
    )
    return result.metrics["AS"]


def test_committed_zoo_layout(zoo):
    """Every scenario the committed zoo.json lists is complete (the object one at least)."""
    import json

    from finextract.trained_zoo import SCENARIOS, scenario_folder

    built = json.loads((zoo / "zoo.json").read_text())["scenarios"]
    assert "object" in built and set(built) <= set(SCENARIOS)
    sizes = {"object": 5, "style": 10}
    for name in built:
        folder = scenario_folder(zoo, name)
        assert (folder / "caption.txt").read_text().strip() == SCENARIOS[name].caption
        assert len(sorted((folder / "train").glob("*.png"))) == sizes[name]
        assert (folder / "lora" / "pytorch_lora_weights.safetensors").is_file()
        # DreamBooth: a bare unet/ folder; the VAE, text encoder and tokenizer are the base's
        assert (folder / "dreambooth" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
        assert sorted(p.name for p in (folder / "dreambooth").iterdir()) == ["finetune.json", "unet"]
        assert json.loads((folder / "lora" / "finetune.json").read_text())["lora_modules"] == "locon"
    total = sum(p.stat().st_size for p in zoo.rglob("*") if p.is_file())
    assert total < 25e6, f"committed weights are {total / 1e6:.1f} MB; keep them under 25 MB"


def test_committed_configs_hold_no_build_paths(zoo):
    import json

    configs = [p for p in zoo.rglob("*.json") if p.name in ("config.json", "model_index.json")]
    built = json.loads((zoo / "zoo.json").read_text())["scenarios"]
    assert len(configs) == 4 + len(built)  # base: model_index, unet, vae, text_encoder; a unet per DreamBooth
    for config in configs:
        assert "_name_or_path" not in json.loads(config.read_text()), f"{config} records its build folder"


@pytest.mark.parametrize("scenario, kind", list(CASES))
def test_finextract_beats_cfg(zoo, scenario, kind):
    from finextract.extract import Extractor
    from finextract.trained_zoo import scenario_folder

    folder = scenario_folder(zoo, scenario)
    n0 = len(list((folder / "train").glob("*.png")))
    num_images, margin = CASES[scenario, kind]
    finetuned = dict(finetuned=folder / "dreambooth") if kind == "dreambooth" else dict(lora=folder / "lora")
    extractor = Extractor(zoo / "base", **finetuned, device="cpu", backend="torch")  # as measured
    as_finextract = _as(extractor, folder, "finextract", n0, num_images)
    as_cfg = _as(extractor, folder, "cfg", n0, num_images)
    print(f"{scenario} {kind}: AS finextract {as_finextract:.3f} cfg {as_cfg:.3f}")
    assert as_finextract > as_cfg + margin, (as_finextract, as_cfg, margin)


def test_demo_runs_and_prints_table(zoo, tmp_path, capsys):
    import json

    from finextract.cli import main

    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--num-images", "12", "--steps", "3", "--kinds", "lora"]
    argv += ["--methods", "finextract,direct", "--scenarios", "object", "--seeds", "2", "--device", "cpu"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for word in ("Object-driven", "FineXtract", "Direct", "A-ESR0.6", "±", "report.html"):
        assert word in printed, word
    summary = json.loads((out / "demo.json").read_text())
    # seed repeats outermost; repeat j starts at seed j * N (N = 12 here)
    assert [(r["scenario"], r["method"], r["seed"]) for r in summary["rows"]] == [
        ("object", "finextract", 0),
        ("object", "direct", 0),
        ("object", "finextract", 12),
        ("object", "direct", 12),
    ]
    assert summary["complete"] is True
    for row in summary["rows"]:
        assert 0 <= row["A-ESR0.7"] <= row["A-ESR0.6"] <= 1 and -1 <= row["AS"] <= 1
        assert (
            len(list((out / row["folder"] / "best_match").glob("*.png"))) == {"object": 5, "style": 10}[row["scenario"]]
        )
    import numpy as np

    for cell in summary["cells"]:
        values = [
            r["AS"] for r in summary["rows"] if (r["scenario"], r["method"]) == (cell["scenario"], cell["method"])
        ]
        assert cell["runs"] == 2 and np.isclose(cell["AS"]["mean"], np.mean(values))
        assert np.isclose(cell["AS"]["std"], np.std(values, ddof=1))
    assert "object-lora-finextract-seed0/best_match/train0.png" in (out / "report.html").read_text()


def test_demo_names_a_scenario_missing_from_the_zoo(tmp_path):
    from finextract.commands.demo import run_demo

    zoo = tmp_path / "zoo"
    (zoo / "base").mkdir(parents=True)
    (zoo / "base" / "model_index.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="the style scenario is missing from the zoo"):
        run_demo(tmp_path / "out", zoo, scenarios=("style",))
    with pytest.raises(ValueError, match="--scenarios 'people'"):
        run_demo(tmp_path / "out", zoo, scenarios=("people",))


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
