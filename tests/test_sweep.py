"""`finextract sweep`: one extraction per value, resumed without redoing a finished value, plotted."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from finextract.cli import main


@pytest.fixture(scope="module")
def extractor(tiny_zoo):
    from finextract.extract import Extractor

    return Extractor(tiny_zoo / "base", tiny_zoo / "dreambooth", device="cpu", backend="torch")


def _train_folder(folder):
    """Three 40 x 48 noise images: non-square, so the centre crop and resize runs at every point."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"t{i}.png")
    return folder


def test_sweep_resumes_without_redoing_a_value_and_plots(extractor, tmp_path, monkeypatch):
    from finextract.sweep import run_sweep

    out = tmp_path / "sweep"
    options = dict(
        param="w", methods=["finextract"], out=out, train=_train_folder(tmp_path / "train"), n0=2, num_images=4
    )
    run = dict(steps=2, batch_size=4, progress=False)
    first = run_sweep(extractor, "a photo of sks", values=[1, 3], **options, **run)
    assert [p["value"] for p in first["points"]] == [1.0, 3.0] and not any(p["reused"] for p in first["points"])

    labels = []
    original = extractor.extract

    def counting(*args, **kwargs):
        labels.append(kwargs["label"])
        return original(*args, **kwargs)

    monkeypatch.setattr(extractor, "extract", counting)
    second = run_sweep(extractor, "a photo of sks", values=[1, 3, 5], **options, **run)
    # w = 1 and 3 are finished folders: read back, not generated again; only w = 5 runs, labelled
    assert labels == ["[3/3] finextract w=5"]
    assert [p["reused"] for p in second["points"]] == [True, True, False]
    for before, after in zip(first["points"], second["points"]):
        assert after["AS"] == before["AS"] and after["clique_sizes"] == before["clique_sizes"]
    record = json.loads((out / "sweep.json").read_text())
    assert record["complete"] and record["param"] == "w" and len(record["points"]) == 3
    for point in record["points"]:
        result = json.loads((out / point["folder"] / "result.json").read_text())
        assert result["config"]["w"] == point["value"] and result["metrics"]["AS"] == point["AS"]
    with Image.open(out / "sweep.png") as plot:
        assert plot.format == "PNG" and plot.width >= 600
        # a real drawing: more than a background and a line colour
        assert len(np.unique(np.asarray(plot.convert("RGB")).reshape(-1, 3), axis=0)) > 20
    page = (out / "report.html").read_text()
    assert 'alt="sweep plot"' in page and "finextract-w_5/report.html" in page
    assert f"{record['points'][2]['AS']:.3f}" in page

    # a point folder holding another run is named, not overwritten
    with pytest.raises(ValueError, match="holds another run"):
        run_sweep(extractor, "another caption", values=[1], **options, **run)
    # ... nor one extracted with another selection rule (the first sweep took the default preset's "modes")
    with pytest.raises(ValueError, match="selection: 'modes' -> 'size'"):
        run_sweep(extractor, "a photo of sks", values=[1], **options, **run, spec_options={"selection": "size"})
    # "modes" records its radius as the threshold; the selection given reaches every point
    assert first["points"][0]["threshold"] == 0.5 and first["settings"]["selection"] == "modes"
    size = run_sweep(
        extractor,
        "a photo of sks",
        values=[1],
        **{**options, "out": tmp_path / "size"},
        **run,
        spec_options={"selection": "size"},
    )
    result = json.loads((tmp_path / "size" / size["points"][0]["folder"] / "result.json").read_text())
    assert result["config"]["clustering"]["selection"] == "size" and size["settings"]["selection"] == "size"
    assert size["points"][0]["threshold"] == result["threshold"] != 0.5


def test_sweep_checks_its_settings_before_any_model_loads(tmp_path, capsys):
    from finextract.sweep import check_sweep

    assert check_sweep("N", [25, 50], ["finextract", "cfg"]) == ("num_images", [25, 50], ["finextract", "cfg"])
    with pytest.raises(ValueError, match="only finextract has k"):
        check_sweep("k", [0.0], ["finextract", "cfg"])
    with pytest.raises(ValueError, match="integers >= 1"):
        check_sweep("n0", [1.5], ["finextract"])
    from finextract.sweep import run_sweep

    with pytest.raises(ValueError, match="--adaptive decides N"):  # before the extractor is touched
        run_sweep(
            None, "c", param="N", values=[4], out=tmp_path / "a", train=None, n0=1, spec_options={"adaptive": True}
        )
    args = ["sweep", "--base", "no-such-base", "--finetuned", "x", "--caption", "c", "--train", str(tmp_path)]
    assert main([*args, "--n0", "1", "--param", "w", "--values", "1,1", "--out", str(tmp_path / "o")]) == 1
    assert "each value once" in capsys.readouterr().err
