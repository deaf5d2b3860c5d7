"""`finextract verify`: passes on a fresh extraction; fails on an altered extracted PNG, a swapped training
image, a changed LoRA file and a mixed extracted/ folder, each failure naming the file."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from skimage import data

from finextract.cli import main

CAPTION = "a photo of sks"


def _image(name: str, size=(40, 32)) -> Image.Image:
    return Image.fromarray(getattr(data, name)()).convert("RGB").resize(size, Image.BICUBIC)


@pytest.fixture(scope="module")
def extraction(tiny_zoo, tmp_path_factory):
    """A LoRA extraction on the tiny zoo (N0 = 2 of N = 6, 2 DDIM steps, torch on the CPU) with 2
    non-square training images; its inputs live in their own folder. The paper's preset (DDIM, `size`,
    w = 5), not the default's: on these images a one-level change of one pixel moves a score by under
    verify's 1e-3, which the tamper tests below rely on (under DPM-Solver++ one moves by 0.0012, under
    the default preset's "modes" picks and w = 3 by 0.003)."""
    from finextract.extract import Extractor

    inputs = tmp_path_factory.mktemp("inputs")
    lora = inputs / "lora.safetensors"
    shutil.copy(tiny_zoo / "lora" / "pytorch_lora_weights.safetensors", lora)
    train = inputs / "train"
    train.mkdir()
    for name in ("astronaut", "coffee"):
        _image(name).save(train / f"{name}.png")
    run = tmp_path_factory.mktemp("runs") / "run"
    extractor = Extractor(tiny_zoo / "base", lora=lora, device="cpu", backend="torch")
    extractor.extract(
        CAPTION, 2, num_images=6, steps=2, preset="paper", batch_size=4, out=run, train=train, progress=False
    )
    return {"run": run, "lora": lora, "train": train, "base": tiny_zoo / "base"}


def _verify(capsys, *argv) -> tuple[int, list[str]]:
    code = main(["verify", *map(str, argv)])
    return code, capsys.readouterr().out.splitlines()


def _copy_run(extraction, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(extraction["run"], run)
    return run


def test_record_names_every_input(extraction):
    record = json.loads((extraction["run"] / "result.json").read_text())
    inputs = {entry["role"]: entry for entry in record["evidence"]["inputs"]}
    assert list(inputs) == ["base", "lora", "train"]
    lora = inputs["lora"]["files"][0]
    assert inputs["lora"]["path"] == str(extraction["lora"])
    assert lora["sha256"] == hashlib.sha256(extraction["lora"].read_bytes()).hexdigest()
    assert lora["size"] == extraction["lora"].stat().st_size
    weights = [f["name"] for f in inputs["base"]["files"] if f["name"].endswith(".safetensors")]
    assert weights == [
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    assert [f["name"] for f in inputs["train"]["files"]] == ["astronaut.png", "coffee.png"]
    assert record["config"]["run"]["backend"] == "torch" and record["config"]["run"]["steps"] == 2
    command = record["evidence"]["command"]
    assert command["call"]["function"] == "finextract.Extractor"
    assert command["call"]["then"]["arguments"]["n0"] == 2
    assert command["call"]["then"]["arguments"]["train"] == str(extraction["train"])
    environment = record["evidence"]["environment"]
    assert environment["python"] and ("distributions" in environment or "lock" in environment)


def test_verify_passes_on_a_fresh_extraction_and_on_moved_copies(extraction, capsys, tmp_path):
    code, lines = _verify(capsys, extraction["run"])
    assert code == 0, lines
    assert sum(line.startswith("ok   image extracted/") and "bit-identical" in line for line in lines) == 2
    assert "images: bit-identical required (same backend, device, dtypes, machine kind and versions)" in lines
    assert any(line.startswith("ok   score AS:") for line in lines) and lines[-1].endswith("checks hold")
    assert not any(line.startswith("FAIL") for line in lines)
    moved = tmp_path / "moved"
    shutil.copytree(extraction["train"], moved / "train")
    shutil.copy(extraction["lora"], moved / "adapter.safetensors")
    code, lines = _verify(
        capsys, extraction["run"], "--lora", moved / "adapter.safetensors", "--train", moved / "train", "--images", "1"
    )
    assert code == 0, lines
    size = extraction["lora"].stat().st_size
    assert f"ok   input lora {moved / 'adapter.safetensors'}: sha256 and size ({size} B) match" in lines
    assert f"ok   input train {moved / 'train' / 'coffee.png'}" in "\n".join(lines)
    assert sum(line.startswith("ok   image") for line in lines) == 1  # --images 1


def test_verify_fails_on_an_altered_extracted_image(extraction, capsys, tmp_path):
    run = _copy_run(extraction, tmp_path)
    name = json.loads((run / "result.json").read_text())["extracted_files"][0]
    pixels = np.asarray(Image.open(run / name).convert("RGB")).copy()
    pixels[0, 0, 0] = pixels[0, 0, 0] + 1 if pixels[0, 0, 0] < 255 else 254  # one level, one pixel
    Image.fromarray(pixels).save(run / name)
    code, lines = _verify(capsys, run)
    failures = [line for line in lines if line.startswith("FAIL")]
    assert code == 1
    assert failures[0] == f"FAIL folder {name}: sha256 differs from result.json: the file changed after the run"
    assert len(failures) == 2 and failures[1].startswith(f"FAIL image {name}: differs from its regeneration")
    assert "max |difference| 1 levels (allowed 0)" in failures[1]
    # regenerating none of the images (--images 0) still catches it: every saved PNG's sha256 is recorded
    code, lines = _verify(capsys, run, "--images", "0")
    assert code == 1 and [line for line in lines if line.startswith("FAIL")] == failures[:1]


def test_verify_fails_on_a_swapped_training_image(extraction, capsys, tmp_path):
    train = tmp_path / "train"
    shutil.copytree(extraction["train"], train)
    _image("chelsea").save(train / "coffee.png")  # same name, another image
    code, lines = _verify(capsys, extraction["run"], "--train", train, "--images", "0")
    failures = [line for line in lines if line.startswith("FAIL")]
    assert code == 1
    assert failures[0].startswith(f"FAIL input train {train / 'coffee.png'}: changed: sha256")
    assert not any("astronaut" in line for line in failures)
    assert any(line.startswith("FAIL score train coffee.png: best similarity") for line in failures)


def test_verify_fails_on_a_changed_lora_file(extraction, capsys, tmp_path):
    from safetensors.torch import load_file, save_file

    weights = load_file(extraction["lora"])
    weights = {key: value * 3 if "up" in key else value for key, value in weights.items()}
    changed = tmp_path / "lora.safetensors"
    save_file(weights, changed)
    code, lines = _verify(capsys, extraction["run"], "--lora", changed)
    failures = [line for line in lines if line.startswith("FAIL")]
    assert code == 1
    assert failures[0].startswith(f"FAIL input lora {changed}: changed: sha256")
    # the regenerated images change with the adapter: each saved one now differs from its regeneration
    assert sum(line.startswith("FAIL image extracted/") for line in failures) == 2


def test_verify_fails_on_a_mixed_folder(extraction, capsys, tmp_path):
    run = _copy_run(extraction, tmp_path)
    stray = run / "extracted" / "002_gen00003.png"
    _image("coffee", (32, 32)).save(stray)  # another run's image, not in this record
    code, lines = _verify(capsys, run, "--images", "0")
    failures = [line for line in lines if line.startswith("FAIL")]
    assert code == 1
    assert failures == [
        "FAIL folder extracted/002_gen00003.png: not named by result.json (another run's image? a mixed folder)"
    ]


def test_verify_tolerance_case_on_another_machine(extraction, tmp_path, monkeypatch):
    """Another machine kind: bit-identity is not required, a difference within the tolerance passes, and
    the verification says which case applied and why."""
    from finextract import verify

    run = _copy_run(extraction, tmp_path)
    name = json.loads((run / "result.json").read_text())["extracted_files"][1]
    pixels = np.asarray(Image.open(run / name).convert("RGB")).astype(int)
    pixels[0, 0, 1] = pixels[0, 0, 1] + 1 if pixels[0, 0, 1] < 255 else 254
    Image.fromarray(pixels.astype(np.uint8)).save(run / name)
    # as if that PNG had been saved so on the other machine: its recorded sha256 is the file's
    record = json.loads((run / "result.json").read_text())
    record["extracted_sha256"][name] = hashlib.sha256((run / name).read_bytes()).hexdigest()
    (run / "result.json").write_text(json.dumps(record))
    monkeypatch.setattr(verify, "machine_record", lambda: {"system": "Linux", "arch": "riscv64", "cpu": "other"})
    result = verify.verify_run(run)
    assert result.ok and result.case == "tolerance" and result.tolerance == verify.PIXEL_TOLERANCE == 1
    assert any(reason.startswith("machine arch ") and reason.endswith("-> riscv64") for reason in result.reasons)
    assert "max |pixel difference| <= 1 level(s) of 255 required" in result.case_line()
    image = next(check for check in result.checks if check.subject == name)
    assert image.detail.startswith("within tolerance: max |difference| 1,")
    assert not verify.verify_run(run, tolerance=0).ok  # the same image fails when no difference is allowed


def test_verify_refuses_what_is_not_an_extract_run(tmp_path):
    from finextract.verify import verify_run

    with pytest.raises(FileNotFoundError, match=r"no result\.json"):
        verify_run(tmp_path)
    (tmp_path / "result.json").write_text(json.dumps({"config": {"inputs": {}}, "extracted_files": []}))
    with pytest.raises(ValueError, match="no evidence block"):
        verify_run(tmp_path)


def test_original_batch_follows_the_manifest_chunks():
    """An image is regenerated inside the batch it was generated in (the batch shape changes the last bits
    of a CPU matrix product): chunks of 6 images run in batches of 4 from each chunk's start."""
    from finextract.verify import _original_batch

    manifest = {"chunks": [{"start": 0, "stop": 6}, {"start": 6, "stop": 12}, {"start": 12, "stop": 13}]}
    assert [_original_batch(i, manifest, 4) for i in (0, 3, 4, 5, 6, 9, 10, 12)] == [
        (0, 4), (0, 4), (4, 6), (4, 6), (6, 10), (6, 10), (10, 12), (12, 13),
    ]  # fmt: skip
    assert _original_batch(5, {}, 4) == (4, 8)


def test_training_arrays_are_checked_by_their_pixels(tiny_zoo, tmp_path, capsys):
    """Training images passed to the API as arrays are recorded by their pixels' sha256: verify asks for
    them as files (`--train`), compares the pixels, and re-scores against them."""
    from finextract.extract import Extractor

    arrays = [np.asarray(_image(name)) for name in ("astronaut", "coffee")]
    run = tmp_path / "run"
    extractor = Extractor(tiny_zoo / "base", lora=tiny_zoo / "lora", device="cpu", backend="torch")
    extractor.extract(CAPTION, 1, num_images=3, steps=1, batch_size=4, out=run, train=arrays, progress=False)
    train = json.loads((run / "result.json").read_text())["evidence"]["inputs"][-1]
    assert train["path"] is None and [f["sha256"] for f in train["files"]] == [None, None]
    code, lines = _verify(capsys, run, "--images", "0")
    assert code == 1 and "ok   input train: passed as arrays, not files: give --train to re-check them" in lines
    assert "FAIL score metrics: the training images are not there to re-score; pass --train" in lines
    folder = tmp_path / "train"
    folder.mkdir()
    for i, array in enumerate(arrays):  # saved under the names the record gives them (PNG: the same pixels)
        Image.fromarray(array).save(folder / f"train_{i:03d}.png")
    code, lines = _verify(capsys, run, "--images", "0", "--train", folder)
    assert code == 0 and f"ok   input train {folder / 'train_001.png'}: pixels match" in lines
    Image.fromarray(arrays[0][::-1].copy()).save(folder / "train_001.png")  # another picture
    code, lines = _verify(capsys, run, "--images", "0", "--train", folder)
    assert code == 1 and f"FAIL input train {folder / 'train_001.png'}: pixels changed" in lines


def test_a_cuda_run_is_regenerated_on_the_cpu_in_fp32_where_there_is_no_gpu(monkeypatch):
    from finextract import verify

    monkeypatch.setattr("finextract.engine.config.resolve_device", lambda device: "cpu")
    monkeypatch.setattr(verify, "resolve_device", lambda device: "cpu")  # bound at verify's import
    record = {"config": {"run": {"device": "cuda", "dtype": "fp16", "vae_dtype": "fp32", "backend": "tensorrt",
                                 "threads": 8, "batch_size": 16, "steps": 50, "seed": 3, "cache_dir": "/x",
                                 "cuda_graphs": True}}}  # fmt: skip
    config = verify._run_config(record)
    assert (config.device, config.dtype, config.backend, config.batch_size, config.steps, config.seed) == (
        "cpu", "fp32", "torch", 16, 50, 3,
    )  # fmt: skip


def test_verify_reads_the_sscd_preset_under_its_old_key(extraction, capsys, tmp_path):
    """result.json files written before --sscd-preset name it `config.sscd.preset`: verify re-scores
    with that preset (the "paper" preprocessing gives other descriptors, so a wrong one fails the AS)."""
    from finextract.extract import Extractor

    run = tmp_path / "run"
    extractor = Extractor(
        extraction["base"], lora=extraction["lora"], device="cpu", backend="torch", sscd_preset="paper"
    )
    extractor.extract(
        CAPTION,
        2,
        num_images=6,
        steps=2,
        scheduler="ddim",
        batch_size=4,
        out=run,
        train=extraction["train"],
        progress=False,
    )
    path = run / "result.json"
    record = json.loads(path.read_text())
    assert record["config"]["sscd"]["sscd_preset"] == "paper"
    record["config"]["sscd"]["preset"] = record["config"]["sscd"].pop("sscd_preset")  # the old layout
    path.write_text(json.dumps(record))
    code, lines = _verify(capsys, run, "--images", "0")
    assert code == 0 and any(line.startswith("ok   score AS:") for line in lines), lines
    record["config"]["sscd"]["preset"] = "sscd"  # the other preprocessing: the re-score must differ
    path.write_text(json.dumps(record))
    code, lines = _verify(capsys, run, "--images", "0")
    assert code != 0 and any(line.startswith("FAIL score AS:") for line in lines), lines
