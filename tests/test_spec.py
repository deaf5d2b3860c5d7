"""The extraction spec: defaults (the preset's N x N0), one validation with errors naming the option; the
procedure presets (a named bundle of settings that explicit options override)."""

from __future__ import annotations

import dataclasses

import pytest

from finextract import spec as spec_module
from finextract.engine.config import RunConfig
from finextract.spec import (
    AUTO_NUM_IMAGES,
    DEFAULT_PRESET,
    IMAGES_PER_N0,
    PRESETS,
    ExtractionSpec,
    default_num_images,
    preset_record,
    preset_run_options,
    preset_settings,
)


def test_defaults_n_is_the_default_presets_and_the_method_follows_the_caption():
    spec = ExtractionSpec.resolve("a photo of sks", 5)
    assert spec.num_images == 20 * 5 == default_num_images(5)  # the default preset: N = 20 x N0
    assert IMAGES_PER_N0 == 50 and default_num_images(5, "paper") == 50 * 5  # the paper's N = 50 x N0
    assert (spec.method, spec.w, spec.k, spec.train, spec.train_as_is, spec.sscd_preset, spec.preset) == (
        "finextract",
        None,
        None,
        None,
        False,
        None,
        DEFAULT_PRESET,
    )
    auto = ExtractionSpec.resolve(None, "auto")
    assert auto.num_images == AUTO_NUM_IMAGES == default_num_images("auto") and auto.method == "finextract-uncond"
    assert ExtractionSpec.resolve("", 2).method == "finextract-uncond"  # an empty caption is no caption
    given = ExtractionSpec.resolve("c", 2, num_images=7, method="cfg", w=2, train="photos", sscd_preset="paper")
    assert (given.num_images, given.method, given.w, given.train, given.sscd_preset) == (7, "cfg", 2, "photos", "paper")
    with pytest.raises(dataclasses.FrozenInstanceError):
        given.n0 = 3


@pytest.mark.parametrize(
    "args, options, match",
    [
        (("c", 0), {}, "--n0 0: must be an integer >= 1, or 'auto'"),
        (("c", "5"), {}, "--n0 '5'"),
        (("c", True), {}, "--n0 True"),
        (("c", 5), dict(num_images=4), "--num-images 4 is below --n0 5"),
        (("c", 5), dict(num_images=5.0), "--num-images 5.0: must be an integer"),
        (("c", "auto"), dict(num_images=10), r"--num-images 10: estimating N0 needs at least 50 images \(--n0 auto\)"),
        (("c", 1), dict(method="eq13"), "--method 'eq13': expected one of finextract, finextract-uncond, cfg"),
        ((None, 1), dict(method="cfg"), "method 'cfg' needs the training caption: give --caption TEXT"),
        (("", 1), dict(method="direct"), "method 'direct' needs the training caption"),
        (("c", 1), dict(w=float("nan")), "--w nan: must be a finite number"),
        (("c", 1), dict(k="0.1"), "--k '0.1': must be a finite number"),
        (("c", 1), dict(method="cfg", k=0.1), "has no k .* drop --k"),
        (("c", 1), dict(method="direct", w=2), "has no guidance scale; drop --w"),
        (("c", 1), dict(sscd_preset="imagenet"), "--sscd-preset 'imagenet': expected one of sscd, paper"),
        (("c", 1), dict(preset="sscd"), "--preset 'sscd': expected one of paper, default"),
    ],
)
def test_resolve_names_the_option_and_the_fix(args, options, match):
    with pytest.raises(ValueError, match=match):
        ExtractionSpec.resolve(*args, **options)


def test_the_cli_builds_the_spec_before_any_model_loads(tmp_path, capsys):
    from finextract.cli import main

    out = tmp_path / "run"
    code = main(
        ["extract", "--base", str(tmp_path / "nowhere"), "--lora", "x", "--caption", "c", "--n0", "5"]
        + ["--num-images", "3", "--device", "cpu", "--out", str(out)]
    )
    assert code != 0 and "--num-images 3 is below --n0 5" in capsys.readouterr().err and not out.exists()


def test_the_paper_preset_is_the_papers_procedure_and_the_default_a_tenth_of_its_work():
    # the paper: N = 50 x N0 and 50 DDIM steps (Sec. 5.1); RunConfig's own (engine) default is the same
    # the N0 largest cliques (Sec. 4.3), and FineXtract's w = 3 for a DreamBooth, 5 for a LoRA (Sec. 5.1)
    assert PRESETS["paper"] == {
        "images_per_n0": 50,
        "steps": 50,
        "scheduler": "ddim",
        "selection": "size",
        "finextract_w": {"dreambooth": 3.0, "lora": 5.0},
    }
    assert (RunConfig.defaults()["steps"], RunConfig.defaults()["scheduler"]) == (50, "ddim")
    # the default: N = 20 x N0 images x 12 DPM-Solver++ 2M steps, at most 1/10 of the paper's N x steps
    default = PRESETS[DEFAULT_PRESET]
    # the "modes" selection and w = 3 for both kinds (docs/results.md#time-to-evidence)
    assert default == {
        "images_per_n0": 20,
        "steps": 12,
        "scheduler": "dpmpp-2m",
        "selection": "modes",
        "finextract_w": {"dreambooth": 3.0, "lora": 3.0},
    }
    paper_work = PRESETS["paper"]["images_per_n0"] * PRESETS["paper"]["steps"]
    assert default["images_per_n0"] * default["steps"] * 10 <= paper_work
    paper = ExtractionSpec.resolve("c", 5, preset="paper")
    assert (paper.preset, paper.num_images, paper.selection) == ("paper", 250, "size")
    assert ExtractionSpec.resolve("c", 5).selection == "modes"
    # an explicit --selection overrides the preset's, and result.json says so
    chosen = ExtractionSpec.resolve("c", 5, preset="paper", selection="modes")
    config = RunConfig.resolve(device="cpu", backend="torch", **preset_run_options("paper"))
    assert preset_record(chosen, config) == {"name": "paper", "overrides": {"selection": "modes"}}
    # FineXtract's w: the preset's per kind unless given; the other methods keep their own defaults
    assert (paper.guidance_w("lora"), ExtractionSpec.resolve("c", 5).guidance_w("lora")) == (5.0, 3.0)
    assert ExtractionSpec.resolve("c", 5, w=4.0).guidance_w("lora") == 4.0
    assert ExtractionSpec.resolve("c", 5, method="cfg").guidance_w("lora") is None  # rules' w = 3
    assert ExtractionSpec.resolve("c", 5, method="direct").guidance_w("dreambooth") is None
    given = ExtractionSpec.resolve("c", 5, preset="paper", w=4.0)
    assert preset_record(given, config, "lora")["overrides"] == {"w": 4.0}
    assert preset_record(ExtractionSpec.resolve("c", 5, preset="paper", w=5.0), config, "lora")["overrides"] == {}
    assert preset_record(given, config)["overrides"] == {}  # the kind unknown: nothing to compare with
    # every preset names every setting: a missing one would fall back silently to another preset's
    assert all(set(settings) == set(PRESETS["paper"]) for settings in PRESETS.values())


def test_a_preset_fills_in_what_is_not_given_and_explicit_options_override_it(monkeypatch):
    tiny = {"images_per_n0": 4, "steps": 7, "scheduler": "unipc", "selection": "density", "finextract_w": {}}
    monkeypatch.setitem(PRESETS, "paper", tiny)  # read, not copied
    spec = ExtractionSpec.resolve("c", 3, preset="paper")
    assert spec.num_images == 12 == default_num_images(3, "paper") and default_num_images(3) == 60
    assert spec.selection == "density"
    assert preset_run_options("paper") == {"steps": 7, "scheduler": "unipc"}
    given = preset_run_options("paper", steps=20, seed=4, threads=None)
    assert given == {"steps": 20, "scheduler": "unipc", "seed": 4}
    assert preset_run_options(None) == {"steps": 12, "scheduler": "dpmpp-2m"}
    config = RunConfig.resolve(device="cpu", backend="torch", **preset_run_options("paper"))
    assert preset_record(spec, config) == {"name": "paper", "overrides": {}}
    overridden = ExtractionSpec.resolve("c", 3, preset="paper", num_images=5)
    assert preset_record(overridden, config.replace(steps=20)) == {
        "name": "paper",
        "overrides": {"num_images": 5, "steps": 20},
    }
    # a setting equal to the preset's is no override; N0 = "auto" keeps AUTO_NUM_IMAGES under any preset
    assert preset_record(ExtractionSpec.resolve("c", 3, preset="paper", num_images=12), config)["overrides"] == {}
    assert ExtractionSpec.resolve("c", "auto", preset="paper").num_images == AUTO_NUM_IMAGES


@pytest.mark.parametrize("preset", [None, "paper"])
def test_n0_known_before_generating_sets_the_presets_n(preset):
    """An "auto" N0 read from the trainer metadata (`with_n0`): N becomes the preset's images per N0 x N0,
    not AUTO_NUM_IMAGES (used when N0 is estimated from the generated images); a given N stays."""
    auto = ExtractionSpec.resolve("c", "auto", preset=preset)
    assert (auto.num_images, auto.num_images_given) == (AUTO_NUM_IMAGES, False)
    known = auto.with_n0(5)
    assert (known.n0, known.num_images) == (5, default_num_images(5, preset))
    assert known.num_images == 5 * preset_settings(preset)["images_per_n0"] and not known.num_images_given
    assert (known.caption, known.method, known.preset) == (auto.caption, auto.method, auto.preset)
    given = ExtractionSpec.resolve("c", "auto", num_images=60, preset=preset)
    assert given.num_images_given and given.with_n0(5).num_images == 60
    with pytest.raises(ValueError, match="--num-images 60 is below --n0 61"):
        given.with_n0(61)


def test_a_future_preset_setting_slots_in(monkeypatch):
    """A new key in every preset and in RUN_PRESET_SETTINGS reaches RunConfig keywords and the record."""
    monkeypatch.setattr(spec_module, "RUN_PRESET_SETTINGS", ("steps", "seed"))
    paper = {"images_per_n0": 50, "steps": 50, "seed": 9, "selection": "size", "finextract_w": {}}
    monkeypatch.setitem(PRESETS, "paper", paper)
    assert spec_module.preset_run_options("paper") == {"steps": 50, "seed": 9}
    config = RunConfig.resolve(device="cpu", backend="torch", **spec_module.preset_run_options("paper", seed=1))
    spec = ExtractionSpec.resolve("c", 5, preset="paper")
    assert spec_module.preset_record(spec, config) == {"name": "paper", "overrides": {"seed": 1}}


def test_the_cli_resolves_the_preset_once_and_explicit_options_override_it(monkeypatch):
    from finextract.cli import build_parser
    from finextract.commands.options import run_config_from

    base = ["extract", "--base", "b", "--lora", "l", "--caption", "c", "--n0", "5", "--out", "o", "--device", "cpu"]
    tiny = {"images_per_n0": 4, "steps": 7, "scheduler": "unipc", "selection": "size", "finextract_w": {}}
    monkeypatch.setitem(PRESETS, "paper", tiny)
    parse = build_parser().parse_args
    args = parse(base + ["--preset", "paper"])
    assert run_config_from(args).steps == 7 and ExtractionSpec.from_attributes(args).num_images == 20
    args = parse(base + ["--preset", "paper", "--steps", "20", "--num-images", "30"])
    spec, config = ExtractionSpec.from_attributes(args), run_config_from(args)
    assert (config.steps, spec.num_images, spec.preset) == (20, 30, "paper")
    assert preset_record(spec, config)["overrides"] == {"num_images": 30, "steps": 20}
    args = parse(base)  # no --preset: the default preset's
    config = run_config_from(args)
    spec = ExtractionSpec.from_attributes(args)
    assert (config.steps, config.scheduler, spec.preset, spec.selection) == (12, "dpmpp-2m", DEFAULT_PRESET, "modes")
    assert ExtractionSpec.from_attributes(parse(base + ["--selection", "size"])).selection == "size"
    # --preset is the procedure, --sscd-preset the descriptor's preprocessing: each takes only its names
    assert parse(base + ["--sscd-preset", "paper"]).sscd_preset == "paper"
    with pytest.raises(SystemExit):
        parse(base + ["--preset", "sscd"])
