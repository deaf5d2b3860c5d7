"""A run folder never mixes two runs (issue 21, item 6): refusals, atomic replacement, and `evaluate`
scoring exactly the images a run's result.json records."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image
from skimage import data

from finextract.cli import main
from finextract.store.files import differences
from finextract.store.folders import commit, prepare, recorded_extracted, run_entry, stage, write_record


def _tile(image, size=96):
    return np.asarray(Image.fromarray(image).convert("RGB").resize((size, size), Image.BICUBIC))


def _image_folder(folder, sources, copies=4, unrelated=()):
    """`copies` lightly perturbed copies of each source (s<i>_c<j>.png) plus unrelated images (u<k>.png)."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    for s, source in enumerate(sources):
        for c in range(copies):
            noisy = np.clip(source.astype(int) + rng.integers(-6, 7, source.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(folder / f"s{s}_c{c}.png")
    for u, image in enumerate(unrelated):
        Image.fromarray(image).save(folder / f"u{u}.png")
    return folder


def _pngs(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def sources():
    return [_tile(im) for im in (data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.camera())]


def test_two_cluster_runs_into_one_out_never_mix(tmp_path, sources, capsys):
    """The user's report: a second `cluster` into the same --out left the first run's PNGs behind and
    `evaluate` scored them all. Now the second run is refused (nothing changes) or, with --overwrite,
    replaces the first whole; evaluate scores exactly the recorded images and refuses a planted one."""
    first = _image_folder(tmp_path / "a", sources[:3], unrelated=[_tile(data.moon()), _tile(data.text())])
    second = _image_folder(tmp_path / "b", sources[3:], unrelated=[_tile(data.clock()), _tile(data.page())])
    out = tmp_path / "clusters"
    assert main(["cluster", "--images", str(first), "--n0", "3", "--out", str(out)]) == 0
    record = json.loads((out / "result.json").read_text())
    assert record["run_folder"]["command"] == "cluster" and record["run_folder"]["settings"]["n0"] == 3
    assert _pngs(out / "extracted") == sorted(name.split("/")[1] for name in record["extracted_files"])
    assert len(record["extracted_files"]) == 3
    before = (out / "result.json").read_bytes()
    capsys.readouterr()

    # other inputs and N0 into the same folder: refused, naming what differs and the fixes; nothing changed
    assert main(["cluster", "--images", str(second), "--n0", "2", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"output folder {out} (--out, out=) holds another run" in err and "n0: 3 -> 2" in err
    assert f"images: {first.resolve()} -> {second.resolve()}" in err
    assert "--overwrite" in err and "another output folder" in err
    assert (out / "result.json").read_bytes() == before and len(_pngs(out / "extracted")) == 3

    # --overwrite: exactly the second run's 2 images remain, and no staging folder
    assert main(["cluster", "--images", str(second), "--n0", "2", "--out", str(out), "--overwrite"]) == 0
    record = json.loads((out / "result.json").read_text())
    assert record["n0"] == 2 and record["config"]["inputs"]["images"] == str(second)
    assert _pngs(out / "extracted") == sorted(name.split("/")[1] for name in record["extracted_files"])
    assert len(_pngs(out / "extracted")) == 2
    assert _pngs(out) == ["extracted", "report.html", "result.json"]
    assert set(record["extracted_sources"]) <= set(_pngs(second))

    # clustering a folder into itself (or into a folder holding it) would replace its own input
    inner = tmp_path / "holder" / "images"
    inner.parent.mkdir()
    second.rename(inner)
    for target in (inner, inner.parent):
        assert main(["cluster", "--images", str(inner), "--n0", "2", "--out", str(target), "--overwrite"]) == 1
        assert f"--out {target} holds --images {inner}: write the clusters to another folder" in capsys.readouterr().err
    inner.rename(second)

    # the same settings again: allowed, the outputs replaced (not added to)
    assert main(["cluster", "--images", str(second), "--n0", "2", "--out", str(out)]) == 0
    assert len(_pngs(out / "extracted")) == 2

    # evaluate scores exactly the recorded images ...
    train = tmp_path / "train"
    train.mkdir()
    for s, source in enumerate(sources[3:]):
        Image.fromarray(source).save(train / f"t{s}.png")
    metrics_file = tmp_path / "m.json"
    recorded = [name.split("/")[1] for name in record["extracted_files"]]
    for folder in (out, out / "extracted"):
        assert main(["evaluate", "--extracted", str(folder), "--train", str(train), "--json", str(metrics_file)]) == 0
        metrics = json.loads(metrics_file.read_text())
        assert {m["extracted_file"] for m in metrics["best_match"]} <= set(recorded)
        assert [m["extracted"] for m in metrics["best_match"]] == [
            recorded.index(m["extracted_file"]) for m in metrics["best_match"]
        ]
    capsys.readouterr()
    # ... and refuses a folder holding one more (here an exact training image: scoring it would inflate AS)
    (out / "extracted" / "999_planted.png").write_bytes((train / "t0.png").read_bytes())
    assert main(["evaluate", "--extracted", str(out), "--train", str(train)]) == 1
    err = capsys.readouterr().err
    assert "--extracted: " in err and "1 not in its record: 999_planted.png" in err
    assert "--overwrite" in err and "AS" not in capsys.readouterr().out
    # or one fewer
    (out / "extracted" / "999_planted.png").unlink()
    (out / "extracted" / recorded[0]).unlink()
    assert main(["evaluate", "--extracted", str(out / "extracted"), "--train", str(train)]) == 1
    assert f"1 recorded but missing: {recorded[0]}" in capsys.readouterr().err


def test_extract_reruns_replace_or_refuse_and_keep_chunks(tiny_zoo, tmp_path):
    from finextract.extract import Extractor

    extractor = Extractor(tiny_zoo / "base", tiny_zoo / "dreambooth", device="cpu", backend="torch")
    out = tmp_path / "run"
    options = dict(num_images=8, steps=2, batch_size=4, progress=False)
    extractor.extract("a photo of sks", 3, out=out, save_generated=True, **options)
    assert len(_pngs(out / "extracted")) == 3 and len(_pngs(out / "generated")) == 8
    chunks = {p.name: p.stat().st_mtime_ns for p in (out / "generation").glob("chunk_*.npz")}
    before = (out / "result.json").read_bytes()

    # another N0: refused before any work, nothing touched
    # (N0 alone changed: the message offers clustering the generated images again instead)
    hint = r"to pick another N0 from its images: finextract cluster --images .* --n0 K --out NEW"
    with pytest.raises(ValueError, match=r"holds another run \(there -> now: n0: 3 -> 1; " + hint + r"\).*--overwrite"):
        extractor.extract("a photo of sks", 1, out=out, **options)
    assert (out / "result.json").read_bytes() == before and len(_pngs(out / "extracted")) == 3

    # overwrite=True: the chunks are resumed (same generation), the outputs replaced whole, generated/ gone
    result = extractor.extract("a photo of sks", 1, out=out, overwrite=True, **options)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "generation").glob("chunk_*.npz")} == chunks
    record = json.loads((out / "result.json").read_text())
    assert record["n0"] == 1 and record["run_folder"]["settings"]["n0"] == 1
    assert _pngs(out / "extracted") == [f"000_gen{result.indices[0]:05d}.png"]
    assert _pngs(out) == ["extracted", "generation", "report.html", "result.json"]
    assert recorded_extracted(out) == [out / "extracted" / f"000_gen{result.indices[0]:05d}.png"]

    # another generation (N): refused; with overwrite its chunks are replaced by the new run's
    with pytest.raises(ValueError, match=r"num_images: 8 -> 4"):
        extractor.extract("a photo of sks", 1, out=out, **{**options, "num_images": 4})
    assert {p.name: p.stat().st_mtime_ns for p in (out / "generation").glob("chunk_*.npz")} == chunks
    extractor.extract("a photo of sks", 1, out=out, overwrite=True, **{**options, "num_images": 4})
    manifest = json.loads((out / "generation" / "manifest.json").read_text())
    assert manifest["config"]["num_images"] == 4 and _pngs(out / "generation") == [
        ".lock",
        "chunk_00000.npz",
        "manifest.json",
    ]
    assert json.loads((out / "result.json").read_text())["num_images"] == 4


def test_extract_cli_refuses_a_taken_out_before_loading(tmp_path, capsys, monkeypatch):
    import finextract.extract

    def no_loading(*args, **kwargs):
        raise AssertionError("models loaded before --out was checked")

    monkeypatch.setattr(finextract.extract, "Extractor", no_loading)
    generated = tmp_path / "gen"
    generated.mkdir()
    (generated / "manifest.json").write_text(json.dumps({"format": "finextract-generate/1"}))
    common = ["extract", "--base", "b", "--finetuned", "f", "--caption", "c", "--n0", "1"]
    assert main(common + ["--out", str(generated)]) == 1
    err = capsys.readouterr().err
    assert f"holds the output of `finextract generate` ({generated / 'manifest.json'})" in err
    assert main(common + ["--out", str(generated), "--overwrite"]) == 1  # never another command's output
    assert "--overwrite replaces only a run of the same kind" in capsys.readouterr().err
    clustered = tmp_path / "clustered"
    clustered.mkdir()
    write_record(clustered, {"method": "cluster", "run_folder": run_entry("cluster", {"n0": 1})})
    assert main(common + ["--out", str(clustered)]) == 1
    assert "`finextract cluster` -> `finextract extract`" in capsys.readouterr().err


@pytest.mark.parametrize(
    "marker, command",
    [
        ("manifest.json", "cluster"),
        ("result.json", "generate"),
        ("result.json", "sweep"),
        ("result.json", "audit"),
        ("sweep.json", "demo"),
        ("summary.json", "finetune"),
        ("finetune.json", "extract"),
    ],
)
def test_another_commands_output_is_refused(tmp_path, marker, command):
    formats = {"manifest.json": "finextract-generate/1", "summary.json": "finextract-audit/1"}
    (tmp_path / marker).write_text(json.dumps({"format": formats.get(marker, "x")}))
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=r"holds the output of `finextract \w+`.*cannot share it"):
            prepare(tmp_path, command, {"n0": 1}, overwrite=overwrite)
    assert _pngs(tmp_path) == [marker]  # a refusal deletes nothing


def test_prepare_accepts_new_same_and_legacy_runs(tmp_path):
    assert prepare(tmp_path / "new", "extract", {"n0": 1}).path == tmp_path / "new" and not (tmp_path / "new").exists()
    write_record(tmp_path, {"method": "finextract", "run_folder": run_entry("extract", {"n0": 2, "seed": 0})})
    assert prepare(tmp_path, "extract", {"n0": 2, "seed": 0}).path == tmp_path
    with pytest.raises(ValueError, match=r"there -> now: n0: 2 -> 3; seed: 0 -> 1\)"):
        prepare(tmp_path, "extract", {"n0": 3, "seed": 1})
    assert prepare(tmp_path, "extract", {"n0": 3, "seed": 1}, overwrite=True).path == tmp_path
    write_record(tmp_path, {"method": "finextract"})  # from before run_folder was recorded: replaced
    assert prepare(tmp_path, "extract", {"n0": 3}).path == tmp_path
    with pytest.raises(ValueError, match="`finextract extract` -> `finextract cluster`"):
        prepare(tmp_path, "cluster", {"n0": 3})  # a legacy extract record still is an extract run
    (tmp_path / "result.json").unlink()
    (tmp_path / "manifest.json").write_text(json.dumps({"files": []}))  # a user's own, not a generate run's
    assert prepare(tmp_path, "extract", {"n0": 3}).path == tmp_path
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no `finextract finetune` output"):
        prepare(tmp_path, "finetune", {})


def test_commit_replaces_folders_whole_and_leaves_no_staging(tmp_path):
    out = tmp_path / "run"
    (out / "extracted").mkdir(parents=True)
    for name in ("000_a.png", "001_b.png", "002_c.png"):
        (out / "extracted" / name).write_bytes(b"old")
    (out / "generated").mkdir()
    (out / "generated" / "00000.png").write_bytes(b"old")
    (out / "result.json").write_text("{}")
    (out / "report.html").write_text("old")
    (out / ".extracted.new-1").mkdir()  # left by an interrupted earlier write
    staged = stage(out / "extracted")
    assert staged.parent == out and staged.name == f".extracted.new-{os.getpid()}"
    assert not (out / ".extracted.new-1").exists()
    (staged / "000_d.png").write_bytes(b"new")
    commit(out, {"extracted": staged, "generated": None})
    assert _pngs(out) == ["extracted"]  # the old record is gone until the new one is written
    assert _pngs(out / "extracted") == ["000_d.png"] and (out / "extracted" / "000_d.png").read_bytes() == b"new"
    write_record(out, {"extracted_files": ["extracted/000_d.png"]})
    assert recorded_extracted(out / "extracted") == [out / "extracted" / "000_d.png"]
    assert recorded_extracted(tmp_path) is None  # a plain folder


def test_leaf_differences_wording():
    old = {"kind": "dreambooth", "rule": {"terms": [{"coef": 3.0}, {"coef": -2.0}]}, "steps": 50, "x": [1]}
    new = {"kind": "lora", "rule": {"terms": [{"coef": 4.0}, {"coef": -2.0}]}, "steps": 50, "x": [1, 2], "y": 1}
    assert differences(old, new) == [
        "kind: dreambooth -> lora",
        "rule.terms[0].coef: 3.0 -> 4.0",
        "x: [1] -> [1, 2]",
        "y: (absent) -> 1",
    ]


def test_a_prepared_folder_is_checked_once(tmp_path, monkeypatch):
    """The CLI checks --out before loading models and passes the `RunFolder` on: the extraction it runs
    (and its generation/) do not check the folder again."""
    from finextract.store import folders

    folder = prepare(tmp_path / "run", "extract", {"n0": 1})
    checks = []
    monkeypatch.setattr(folders, "check_out_folder", lambda out: checks.append(out) or tmp_path)
    assert prepare(folder, "extract", {"n0": 1}) is folder
    assert prepare(folder.part("generation", "generate"), "generate").path == tmp_path / "run" / "generation"
    assert checks == []
    assert prepare(folder, "extract", {"n0": 2}).settings == {"n0": 2}  # other settings: compared only
    assert checks == []
    prepare(folder, "extract", {"n0": 1}, overwrite=True)  # checked for another overwrite: checked again
    assert len(checks) == 1


def test_the_store_imports_no_torch():
    import subprocess
    import sys

    code = "import finextract.store.folders, finextract.store.chunks, finextract.images, sys; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
