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
    from finextract.zoo import build_zoo

    return build_zoo(tmp_path_factory.mktemp("zoo"))


def test_extractor_writes_output_folder(zoo, tmp_path):
    from finextract.extract import Extractor

    extractor = Extractor(zoo / "base", zoo / "dreambooth", device="cpu")
    train = [_tile(data.astronaut()), _tile(data.coffee())]
    out = tmp_path / "run"
    result = extractor.extract("a photo of sks", 2, num_images=8, steps=2, batch_size=4, out=out, train=train,
                               save_generated=True, progress=False)
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
    assert "similarity" in (out / "report.html").read_text()


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
    for u, name in enumerate(("camera", "rocket", "horse", "immunohistochemistry", "coins", "moon", "page",
                              "text", "clock", "hubble_deep_field", "grass", "gravel")):
        Image.fromarray(_tile(getattr(data, name)(), 96)).save(images / f"u{u:02d}.png")
    (images / "README.txt").write_text("not an image")
    out = tmp_path / "out"
    assert main(["cluster", "--images", str(images), "--n0", "3", "--out", str(out)]) == 0
    assert "README.txt" in caplog.text
    record = json.loads((out / "result.json").read_text())
    # The paper's procedure stops at the first threshold with N0 cliques, where unrelated images may
    # join a clique; but near-identical copies are never split, and the largest clique holds copies.
    files = record["config"]["files"]
    for s in range(3):
        members = {i for i, name in enumerate(files) if name.startswith(f"s{s}_")}
        assert sum(bool(members & set(c)) for c in record["cliques"]) <= 1 or any(members <= set(c) for c in record["cliques"])
    assert files[record["extracted"][0]].startswith("s")
    assert all(i in c for i, c in zip(record["extracted"], record["cliques"]))

    train = tmp_path / "train"
    train.mkdir()
    for s, source in enumerate(sources[:2]):
        Image.fromarray(source).save(train / f"t{s}.png")
    extracted = tmp_path / "extracted"  # one noisy copy of each training image, plus an unrelated one
    extracted.mkdir()
    for name in ("s0_c1.png", "s1_c2.png", "u03.png"):
        (extracted / name).write_bytes((images / name).read_bytes())
    metrics_file = tmp_path / "m.json"
    assert main(["evaluate", "--extracted", str(extracted), "--train", str(train),
                 "--json", str(metrics_file)]) == 0
    metrics = json.loads(metrics_file.read_text())
    assert metrics["A-ESR0.7"] == 1.0 and metrics["AS"] > 0.8
    assert [m["extracted_file"] for m in metrics["best_match"]] == ["s0_c1.png", "s1_c2.png"]


def test_cluster_command_reports_missing_folder(tmp_path, capsys):
    assert main(["cluster", "--images", str(tmp_path / "nope"), "--n0", "1", "--out", str(tmp_path)]) == 1
    assert "does not exist" in capsys.readouterr().err
