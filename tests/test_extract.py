"""End to end: Extractor on the tiny zoo, and the cluster / evaluate commands on image folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from skimage import data

from finextract.cli import main


def _tile(image, size=32):
    return np.asarray(Image.fromarray(image).convert("RGB").resize((size, size), Image.BICUBIC))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from finextract.zoo.build import build_zoo

    return build_zoo(tmp_path_factory.mktemp("zoo"))


def test_extractor_writes_output_folder(zoo, tmp_path):
    from finextract.extract import Extractor

    extractor = Extractor(zoo / "base", zoo / "dreambooth", device="cpu")
    train = [_tile(data.astronaut()), _tile(data.coffee())]
    out = tmp_path / "run"
    result = extractor.extract(
        "a photo of sks",
        2,
        num_images=8,
        steps=2,
        batch_size=4,
        out=out,
        train=train,
        save_generated=True,
        progress=False,
    )
    assert len(result.indices) == 2 and len(result.cliques) == 2
    assert all(i in c for i, c in zip(result.indices, result.cliques))
    record = json.loads((out / "result.json").read_text())
    for key in ("method", "n0", "num_images", "threshold", "cliques", "extracted", "timings", "config", "metrics"):
        assert key in record, key
    assert record["n0"] == 2 and record["num_images"] == 8 and record["extracted"] == result.indices
    assert record["config"]["w"] == 3.0 and record["config"]["k"] == -0.02  # resolved DreamBooth defaults, not None
    assert set(record["metrics"]) >= {"AS", "A-ESR0.6", "A-ESR0.7", "best_match"}
    assert len(record["config"]["sscd"]["sha256"]) == 64 and record["config"]["seeds"] == list(range(8))
    assert {"generate", "embed", "cluster"} <= set(record["timings"])
    assert len(list((out / "extracted").glob("*.png"))) == 2
    assert len(list((out / "generated").glob("*.png"))) == 8
    assert record["config"]["num_images"] == 8 and record["config"]["n0"] == 2
    assert record["config"]["models"]["family"] == "sd1" and record["config"]["models"]["prediction_type"] == "epsilon"
    # no preset named: the default one, with what the keywords changed (50 x 2 images, 50 steps)
    assert record["config"]["preset"] == {"name": "default", "overrides": {"num_images": 8, "steps": 2}}
    report = (out / "report.html").read_text()
    assert "similarity" in report
    assert "<title>finextract: dreambooth, finextract \u2014 \u201ca photo of sks\u201d</title>" in report
    # the model paths in the settings table, one row each
    for key, path in (("base", zoo / "base"), ("finetuned", zoo / "dreambooth")):
        assert f"<td><code>models.{key}</code></td><td>{path}</td>" in report
    assert "best match exceeds 0.6 / 0.7 (paper Eq. 2)" in report and "Clique: a set of generated images" in report
    with pytest.raises(ValueError, match="--batch-size 0: must be an integer >= 1"):
        extractor.extract("a photo of sks", 2, num_images=8, steps=2, batch_size=0, progress=False)


def test_a_named_preset_sets_the_run_and_extract_keywords_override_it(zoo, monkeypatch):
    from finextract.extract import Extractor
    from finextract.spec import PRESETS, ExtractionSpec

    paper_w = {"dreambooth": 3.0, "lora": 5.0}
    tiny = {"images_per_n0": 3, "steps": 2, "scheduler": "ddim", "selection": "size", "finextract_w": paper_w}
    monkeypatch.setitem(PRESETS, "paper", tiny)
    extractor = Extractor(zoo / "base", zoo / "dreambooth", device="cpu", backend="torch", steps=3, batch_size=6)
    spec = ExtractionSpec.resolve("a photo of sks", 2, preset="paper")
    result = extractor.extract(spec=spec, progress=False)  # the preset's 2 steps over the Extractor's 3
    assert (result.config["run"]["steps"], result.config["num_images"]) == (2, 6)
    assert result.config["preset"] == {"name": "paper", "overrides": {}}
    assert result.work["unet_evaluations"] == 6 * 2 * 2  # N x steps x 2 models (Eq. 13)
    result = extractor.extract(spec=spec, steps=1, progress=False)
    assert result.config["run"]["steps"] == 1 and result.config["preset"]["overrides"] == {"steps": 1}
    default = extractor.extract("a photo of sks", 2, num_images=6, progress=False)  # the Extractor's own 3
    assert default.config["run"]["steps"] == 3 and default.config["preset"]["name"] == "default"
    keywords = extractor.extract("a photo of sks", 2, preset="paper", progress=False)  # preset= as a keyword
    assert keywords.config["preset"] == {"name": "paper", "overrides": {}} and keywords.config["run"]["steps"] == 2
    with pytest.raises(ValueError, match="not both"):
        extractor.extract(spec=spec, preset="paper")


def test_the_preset_sets_finextracts_w_per_kind_and_a_given_w_wins(zoo):
    """A LoRA: FineXtract guides with the default preset's w = 3, the paper's 5 under --preset paper, a given
    w under either (recorded as an override); CFG keeps its own w = 3 (`finextract.rules.DEFAULTS`)."""
    from finextract.extract import Extractor

    extractor = Extractor(zoo / "base", lora=zoo / "lora", device="cpu", backend="torch", steps=1, batch_size=2)
    assert extractor.pair.kind == "lora"
    runs = {
        name: extractor.extract("a photo of sks", 1, num_images=2, progress=False, **options).config
        for name, options in {
            "default": {},
            "paper": {"preset": "paper", "steps": 1},
            "given": {"preset": "paper", "steps": 1, "w": 4.0},
            "cfg": {"method": "cfg"},
        }.items()
    }
    assert [runs[name]["w"] for name in runs] == [3.0, 5.0, 4.0, 3.0]
    assert runs["paper"]["preset"]["overrides"] == {"num_images": 2, "steps": 1}
    assert runs["given"]["preset"]["overrides"] == {"num_images": 2, "steps": 1, "w": 4.0}


def test_extractor_caption_auto_and_none(zoo, tmp_path):
    """caption="auto" recovers a caption first and records it; None runs Eq. 6 (and refuses Eq. 13)."""
    from finextract.extract import Extractor

    extractor = Extractor(zoo / "base", zoo / "dreambooth", device="cpu")
    out = tmp_path / "auto"
    options = {"vocabulary": range(320, 336), "max_tokens": 2}  # a small vocabulary keeps it fast
    result = extractor.extract(
        "auto", 1, num_images=4, steps=2, batch_size=4, out=out, progress=False, recovery=options
    )
    record = json.loads((out / "result.json").read_text())
    caption = record["caption"]
    assert caption["source"] == "recovered" and caption["caption"] == record["config"]["caption"]
    assert caption["candidates"][0]["caption"] == caption["caption"] and len(caption["candidates"]) >= 2
    assert result.config["caption_recovery"]["source"] == "recovered" and "caption" in record["timings"]
    assert record["n0_estimate"] == {"source": "given"}
    report = (out / "report.html").read_text()
    assert "Caption recovered from the weights" in report and caption["candidates"][1]["caption"] in report
    result = extractor.extract(None, 1, num_images=4, steps=2, batch_size=4, out=tmp_path / "none", progress=False)
    assert result.config["method"] == "finextract-uncond" and result.config["caption_recovery"]["source"] == "none"
    with pytest.raises(ValueError, match="method 'cfg' needs the training caption"):
        extractor.extract(None, 1, num_images=4, method="cfg", progress=False)
    with pytest.raises(ValueError, match="estimating N0 needs at least 50"):
        extractor.extract("a photo of sks", "auto", num_images=10, progress=False)


def test_cluster_and_evaluate_commands(tmp_path, caplog):
    # 3 source images, each with 5 lightly perturbed copies, plus an unreadable file.
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    images.mkdir()
    sources = [_tile(im, 96) for im in (data.astronaut(), data.coffee(), data.chelsea())]
    for s, source in enumerate(sources):
        for c in range(5):
            noisy = np.clip(source.astype(int) + rng.integers(-6, 7, source.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(images / f"s{s}_c{c}.png")
    for u, name in enumerate(
        (
            "camera",
            "rocket",
            "horse",
            "immunohistochemistry",
            "coins",
            "moon",
            "page",
            "text",
            "clock",
            "hubble_deep_field",
            "grass",
            "gravel",
        )
    ):
        Image.fromarray(_tile(getattr(data, name)(), 96)).save(images / f"u{u:02d}.png")
    (images / "README.txt").write_text("not an image")
    (images / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")  # hidden: ignored silently
    out = tmp_path / "out"
    assert main(["cluster", "--images", str(images), "--n0", "3", "--out", str(out)]) == 0
    assert "README.txt" in caplog.text and ".DS_Store" not in caplog.text
    record = json.loads((out / "result.json").read_text())
    # The paper's procedure stops at the first threshold with N0 cliques, where unrelated images may
    # join a clique; but near-identical copies are never split, and the largest clique holds copies.
    files = record["config"]["inputs"]["files"]
    for s in range(3):
        members = {i for i, name in enumerate(files) if name.startswith(f"s{s}_")}
        assert sum(bool(members & set(c)) for c in record["cliques"]) <= 1 or any(
            members <= set(c) for c in record["cliques"]
        )
    assert files[record["extracted"][0]].startswith("s")
    assert all(i in c for i, c in zip(record["extracted"], record["cliques"]))
    # --selection modes (extract's default): one pick per source, each the densest of its 5 near-copies
    modes_out = tmp_path / "modes"
    assert main(["cluster", "--images", str(images), "--n0", "3", "--selection", "modes", "--out", str(modes_out)]) == 0
    picked = json.loads((modes_out / "result.json").read_text())
    assert picked["config"]["clustering"]["selection"] == "modes" and picked["threshold"] == 0.5
    assert sorted(files[i][:2] for i in picked["extracted"]) == ["s0", "s1", "s2"]
    # the same folder with another rule is another run: refused unless --overwrite
    assert main(["cluster", "--images", str(images), "--n0", "3", "--out", str(modes_out)]) == 1

    train = tmp_path / "train"
    train.mkdir()
    for s, source in enumerate(sources[:2]):
        Image.fromarray(source).save(train / f"t{s}.png")
    extracted = tmp_path / "extracted"  # one noisy copy of each training image, plus an unrelated one
    extracted.mkdir()
    for name in ("s0_c1.png", "s1_c2.png", "u03.png"):
        (extracted / name).write_bytes((images / name).read_bytes())
    metrics_file = tmp_path / "m.json"
    assert main(["evaluate", "--extracted", str(extracted), "--train", str(train), "--json", str(metrics_file)]) == 0
    metrics = json.loads(metrics_file.read_text())
    assert metrics["A-ESR0.7"] == 1.0 and metrics["AS"] > 0.8
    assert [m["extracted_file"] for m in metrics["best_match"]] == ["s0_c1.png", "s1_c2.png"]


def test_cluster_command_reports_missing_folder(tmp_path, capsys):
    assert main(["cluster", "--images", str(tmp_path / "nope"), "--n0", "1", "--out", str(tmp_path)]) == 1
    assert "--images: image folder" in capsys.readouterr().err
    # evaluate checks both folders before the SSCD model loads, naming the option
    extracted = tmp_path / "extracted"
    extracted.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(extracted / "a.png")
    assert main(["evaluate", "--extracted", str(extracted), "--train", str(tmp_path / "nope")]) == 1
    assert f"--train: image folder {tmp_path / 'nope'} does not exist" in capsys.readouterr().err


def test_extract_checks_train_and_out_before_loading(tmp_path, capsys, monkeypatch):
    import finextract.extract

    def no_loading(*args, **kwargs):
        raise AssertionError("models loaded before the inputs were checked")

    monkeypatch.setattr(finextract.extract, "Extractor", no_loading)
    common = ["extract", "--base", "b", "--finetuned", "f", "--caption", "c", "--n0", "1"]
    assert main(common + ["--train", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 1
    assert f"--train: image folder {tmp_path / 'missing'} does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".DS_Store").write_bytes(b"junk")
    assert main(common + ["--train", str(empty), "--out", str(tmp_path / "o")]) == 1
    assert f"--train: no readable image in {empty}" in capsys.readouterr().err
    taken = tmp_path / "taken"
    taken.write_text("x")
    assert main(common + ["--out", str(taken)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"output folder {taken} (--out, out=): not a folder" in err
    with pytest.raises(SystemExit):
        main(common[:-1] + ["0", "--out", str(tmp_path / "o")])
    assert "argument --n0: 0: must be an integer >= 1" in capsys.readouterr().err


def test_cli_turns_os_errors_into_one_line(tmp_path, capsys, monkeypatch):
    import finextract.commands.cluster

    def fail(args):
        raise NotADirectoryError(20, "Not a directory", str(tmp_path / "file" / "x"))

    monkeypatch.setattr(finextract.commands.cluster, "run", fail)
    assert main(["cluster", "--images", "i", "--n0", "1", "--out", "o"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "finextract cluster: error:" in err and str(tmp_path / "file" / "x") in err


def test_cli_silences_torchvision_notices_only(caplog):
    import logging
    import warnings

    from finextract.cli import quiet_libraries

    quiet_libraries()
    emitter = logging.getLogger("transformers.utils.import_utils")
    with caplog.at_level(logging.WARNING):
        emitter.warning("SiglipImageProcessor requires the Torchvision library but it was not found")
        emitter.warning("a real warning")
    assert [r.getMessage() for r in caplog.records] == ["a real warning"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_libraries()  # the filter is inserted ahead of "default"
        warnings.warn("This requires torchvision >= 0.27", stacklevel=2)
        warnings.warn("something else", stacklevel=2)
    assert [str(w.message) for w in caught] == ["something else"]


@pytest.mark.parametrize(
    ("precision", "cause"),
    [
        (("fp32", "fp32"), r"generated in fp32 \(no overflow\), so the model pair is broken: a corrupt fine-tune"),
        (("fp16", "fp32"), r"Likely causes: overflow \(UNet in fp16: rerun with --dtype fp32\), or the model pair"),
        (None, r"If they were generated, the model pair is broken"),
    ],
)
def test_constant_images_name_their_likely_cause(precision, cause, caplog):
    from finextract.extraction import cluster_images

    constant = np.zeros((6, 16, 16, 3), dtype=np.uint8)
    constant[::2] = 255  # black and white: each image constant, the set not
    with pytest.raises(ValueError, match=r"all 6 images are constant .*lower --n0 will not help\. .*" + cause) as error:
        cluster_images(constant, 2, embedder=None, precision=precision)  # refused before any embedding
    assert (precision == ("fp16", "fp32")) == ("fp16" in str(error.value))  # fp16 blamed only in an fp16 run
    mixed = np.concatenate([constant[:3], np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)])
    with pytest.raises(ValueError, match=r"only 2 usable images \(3 constant images excluded\) for n0=3"):
        cluster_images(mixed, 3, embedder=None, precision=precision)
    assert "3 of 5 images are constant" in caplog.text and cause.replace("\\", "") in caplog.text
