"""The extraction spec: defaults (N = 50 x N0), one validation with errors naming the option."""

from __future__ import annotations

import dataclasses

import pytest

from finextract.spec import AUTO_NUM_IMAGES, IMAGES_PER_N0, ExtractionSpec, default_num_images


def test_defaults_n_is_50_n0_and_the_method_follows_the_caption():
    spec = ExtractionSpec.resolve("a photo of sks", 5)
    assert IMAGES_PER_N0 == 50 and spec.num_images == 50 * 5 == default_num_images(5)
    assert (spec.method, spec.w, spec.k, spec.train, spec.train_as_is, spec.preset) == (
        "finextract",
        None,
        None,
        None,
        False,
        None,
    )
    auto = ExtractionSpec.resolve(None, "auto")
    assert auto.num_images == AUTO_NUM_IMAGES == default_num_images("auto") and auto.method == "finextract-uncond"
    assert ExtractionSpec.resolve("", 2).method == "finextract-uncond"  # an empty caption is no caption
    given = ExtractionSpec.resolve("c", 2, num_images=7, method="cfg", w=2, train="photos", preset="paper")
    assert (given.num_images, given.method, given.w, given.train, given.preset) == (7, "cfg", 2, "photos", "paper")
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
        (("c", 1), dict(preset="imagenet"), "--preset 'imagenet': expected one of sscd, paper"),
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
