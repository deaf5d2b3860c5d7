"""Chunked, resumable generation: batch invariance, resume without recomputation, refused configs."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import numpy
import onnxruntime
import openvino
import pytest
import torch
import transformers

from finextract.generation import generate
from finextract.store.chunks import MANIFEST
from tests.tolerances import assert_same_images

CAPTION = "a photo of sks dog"
STEPS = 3


class Interrupt(Exception):
    pass


class UNetCalls:
    """Counts UNet forwards; optionally raises on forward number `fail_at` (an interruption)."""

    def __init__(self, *unets, fail_at: int | None = None):
        self.count, self.fail_at = 0, fail_at
        self.handles = [unet.register_forward_pre_hook(self._hook) for unet in {id(u): u for u in unets}.values()]

    def _hook(self, module, args):
        self.count += 1
        if self.fail_at is not None and self.count == self.fail_at:
            raise Interrupt(f"interrupted at UNet call {self.count}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def _unets(pair):
    return [pair.base_unet] + ([pair.finetuned_unet] if pair.finetuned_unet is not None else [])


def test_same_images_for_batch_sizes_1_3_8(lora_pair):
    runs = [
        generate(lora_pair, CAPTION, 8, steps=STEPS, batch_size=b, seed=7, progress=False, backend="torch").images
        for b in (1, 3, 8)
    ]
    assert runs[0].shape == (8, 32, 32, 3) and runs[0].dtype == torch.uint8
    assert_same_images(runs[0], runs[1])
    assert_same_images(runs[0], runs[2])
    # image i depends on seed + i only: a run starting at seed 10 reproduces images 3.. of seed 7
    shifted = generate(
        lora_pair, CAPTION, 3, steps=STEPS, batch_size=3, seed=10, progress=False, backend="torch"
    ).images
    assert_same_images(shifted, runs[1][3:6])


def test_interrupt_resume_recomputes_nothing(dreambooth_pair, tmp_path):
    pair, out = dreambooth_pair, tmp_path / "run"
    per_chunk = STEPS * 2  # DreamBooth FineXtract: two UNet forwards per step, chunk = one batch of 2
    reference = generate(pair, CAPTION, 6, steps=STEPS, batch_size=2, progress=False, backend="torch").images

    with UNetCalls(*_unets(pair), fail_at=2 * per_chunk + 3) as calls, pytest.raises(Interrupt):
        generate(pair, CAPTION, 6, steps=STEPS, batch_size=2, out=out, progress=False, backend="torch")
    manifest = json.loads((out / MANIFEST).read_text())
    assert [c["status"] for c in manifest["chunks"]] == ["done", "done", "pending"]
    assert sorted(p.name for p in out.iterdir()) == [".lock", "chunk_00000.npz", "chunk_00001.npz", MANIFEST]

    with UNetCalls(*_unets(pair)) as calls:
        resumed = generate(pair, CAPTION, 6, steps=STEPS, batch_size=2, out=out, progress=False, backend="torch")
    assert calls.count == per_chunk  # only the unfinished chunk
    assert torch.equal(resumed.images, reference)
    assert resumed.seeds == [0, 1, 2, 3, 4, 5] and resumed.manifest["seeds"] == resumed.seeds
    assert all(c["status"] == "done" for c in json.loads((out / MANIFEST).read_text())["chunks"])

    # a crash between the chunk rename and the manifest rename: the finished file is adopted
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["chunks"][1]["status"] = "pending"
    (out / MANIFEST).write_text(json.dumps(manifest))
    with UNetCalls(*_unets(pair)) as calls:
        again = generate(pair, CAPTION, 6, steps=STEPS, batch_size=3, out=out, progress=False, backend="torch")
    assert calls.count == 0
    assert torch.equal(again.images, reference)


def test_changed_config_is_refused(dreambooth_pair, tmp_path):
    generate(dreambooth_pair, CAPTION, 2, steps=2, batch_size=2, out=tmp_path, progress=False, backend="torch")
    with pytest.raises(ValueError, match=r"different config \(there -> now: caption: a photo of sks dog -> a cat\);"):
        generate(dreambooth_pair, "a cat", 2, steps=2, batch_size=2, out=tmp_path, progress=False, backend="torch")
    with pytest.raises(ValueError) as error:  # only the differing leaves, not whole dicts
        generate(dreambooth_pair, CAPTION, 2, steps=2, w=4.0, out=tmp_path, progress=False, backend="torch")
    assert "params.w: 3.0 -> 4.0" in str(error.value) and "rule.terms[1].coef: -2.02 -> -3.02" in str(error.value)
    assert "{" not in str(error.value) and "params.k" not in str(error.value)
    with pytest.raises(ValueError, match="num_images"):
        generate(dreambooth_pair, CAPTION, 3, steps=2, out=tmp_path, progress=False, backend="torch")
    # the scheduler config changes every image, so it is part of the resume key too
    other_schedule = dataclasses.replace(
        dreambooth_pair, scheduler_config={**dreambooth_pair.scheduler_config, "beta_end": 0.02}
    )
    with pytest.raises(ValueError, match="model"):
        generate(other_schedule, CAPTION, 2, steps=2, batch_size=2, out=tmp_path, progress=False, backend="torch")
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["config"]["params"] == {"w": 3.0, "k": -0.02}
    assert manifest["config"]["model"]["scheduler"]["beta_end"] == dreambooth_pair.scheduler_config["beta_end"] != 0.02
    assert manifest["config"]["rule"]["terms"][1] == {"model": "base", "caption": "empty", "coef": pytest.approx(-2.02)}
    # every library that changes the images or their scores, named by its own __version__
    expected = {"torch": torch.__version__, "numpy": numpy.__version__, "onnxruntime": onnxruntime.__version__}
    expected.update(openvino=openvino.__version__, transformers=transformers.__version__)
    assert {name: manifest["versions"].get(name) for name in expected} == expected


def test_invalid_arguments(dreambooth_pair):
    with pytest.raises(ValueError, match="needs a CUDA device"):
        generate(dreambooth_pair, CAPTION, 2, dtype="fp16", progress=False, backend="torch")
    with pytest.raises(ValueError, match="num_images"):
        generate(dreambooth_pair, CAPTION, 0, progress=False, backend="torch")
    with pytest.raises(ValueError, match="no k"):
        generate(dreambooth_pair, CAPTION, 2, method="cfg", k=0.1, progress=False, backend="torch")


def test_kill_9_then_resume(dreambooth_pair, tmp_path, tokenizer_dir):
    """A real `kill -9` right after the first chunk; resuming here (same weights, another process)
    computes only the second chunk and matches a clean run."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        from finextract.engine.config import set_threads
        set_threads(1)
        from finextract.engine.pair import ModelPair
        from finextract.generation import generate
        from finextract.zoo.models import tiny_components
        base = tiny_components(0, {str(tokenizer_dir)!r}); ft = tiny_components(100, {str(tokenizer_dir)!r})
        pair = ModelPair(kind="dreambooth", base_unet=base["unet"], finetuned_unet=ft["unet"], unet_lora=None,
            base_text_encoder=base["text_encoder"], finetuned_text_encoder=ft["text_encoder"],
            base_tokenizer=base["tokenizer"], vae=base["vae"], scheduler_config=dict(base["scheduler"].config))
        generate(pair, {CAPTION!r}, 4, steps=2, batch_size=2, out=sys.argv[1], progress=False, backend="torch",
                 on_chunk=lambda index, images: os.kill(os.getpid(), signal.SIGKILL))
    """)
    out = tmp_path / "killed"
    env = dict(os.environ, FINEXTRACT_THREADS="1")
    killed = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, env=env)
    assert killed.returncode == -9, killed.stderr
    assert [c["status"] for c in json.loads((out / MANIFEST).read_text())["chunks"]] == ["done", "pending"]
    reference = generate(dreambooth_pair, CAPTION, 4, steps=2, batch_size=2, progress=False, backend="torch").images
    with UNetCalls(*_unets(dreambooth_pair)) as calls:
        resumed = generate(dreambooth_pair, CAPTION, 4, steps=2, batch_size=2, out=out, progress=False, backend="torch")
    assert calls.count == 2 * 2  # 2 steps x 2 UNets for the one unfinished chunk
    assert torch.equal(resumed.images, reference)


def test_cli_generate(tiny_zoo, tmp_path, capsys):
    from finextract.cli import main

    out = tmp_path / "cli"
    caption = (tiny_zoo / "caption.txt").read_text().strip()
    args = [
        "generate",
        "--base",
        str(tiny_zoo / "base"),
        "--lora",
        str(tiny_zoo / "lora" / "pytorch_lora_weights.safetensors"),
        "--caption",
        caption,
        "--n0",
        "1",
        "--num-images",
        "3",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    # FineXtract's w: the default preset's (3 for a LoRA too), --preset paper's 5
    assert manifest["config"]["params"] == {"w": 3.0, "k": 0.0} and manifest["config"]["model"]["kind"] == "lora"
    assert [c["stop"] - c["start"] for c in manifest["chunks"]] == [2, 1]
    assert "3 images" in capsys.readouterr().out
    assert main(args[:-2] + ["--w", "2", "--out", str(out)]) == 1  # changed config: a one-line error
    assert "different config" in capsys.readouterr().err
    paper = tmp_path / "paper"
    assert main(args[:-2] + ["--preset", "paper", "--out", str(paper)]) == 0
    assert json.loads((paper / MANIFEST).read_text())["config"]["params"] == {"w": 5.0, "k": 0.0}
    capsys.readouterr()
    assert main(args[:5] + ["--caption", caption, "--n0", "1", "--dtype", "fp16", "--out", str(tmp_path / "x")]) == 1
    assert "needs a CUDA device" in capsys.readouterr().err


def test_out_that_is_a_file_is_refused_before_work(dreambooth_pair, tmp_path):
    file = tmp_path / "taken"
    file.write_text("x")
    for out in (file, file / "sub"):
        with pytest.raises(ValueError, match=rf"output folder {out} \(--out, out=\): not a folder"):
            generate(dreambooth_pair, CAPTION, 2, steps=1, out=out, progress=False, backend="torch")


def test_png_and_generate_folder_feed_read_images(lora_pair, tmp_path):
    from finextract.images import read_images

    out = tmp_path / "gen"
    seen = []
    result = generate(
        lora_pair,
        CAPTION,
        3,
        steps=1,
        batch_size=2,
        out=out,
        progress=False,
        backend="torch",
        png=True,
        on_chunk=lambda index, images: seen.append(sorted(p.name for p in (out / "images").iterdir())),
    )
    assert seen[0] == ["gen00000.png", "gen00001.png"]  # written as the first chunk finished
    images, paths = read_images(out)  # the generate folder itself: chunks in index order
    assert [p.name for p in paths] == ["gen00000", "gen00001", "gen00002"]
    assert all((image == result.images[i].numpy()).all() for i, image in enumerate(images))
    png_images, png_paths = read_images(out / "images")
    assert [p.name for p in png_paths] == ["gen00000.png", "gen00001.png", "gen00002.png"]
    assert all((a == b).all() for a, b in zip(png_images, images))
    (out / "images" / "gen00002.png").unlink()  # resume with --png restores a missing PNG, computing nothing
    with UNetCalls(*_unets(lora_pair)) as calls:
        generate(lora_pair, CAPTION, 3, steps=1, batch_size=2, out=out, progress=False, backend="torch", png=True)
    assert calls.count == 0 and (out / "images" / "gen00002.png").is_file()


def test_cli_generate_num_images_without_n0_and_errors(tiny_zoo, tmp_path, capsys):
    from finextract.cli import main

    lora = str(tiny_zoo / "lora" / "pytorch_lora_weights.safetensors")
    common = ["generate", "--base", str(tiny_zoo / "base"), "--lora", lora, "--caption", "c", "--steps", "1"]
    out = str(tmp_path / "gen") + "/"
    assert main(common + ["--num-images", "1", "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "1 images" in printed and "//" not in printed and f"{tmp_path / 'gen' / MANIFEST}" in printed
    assert main(common + ["--out", str(tmp_path / "y")]) == 1
    assert "give --n0 (N = the preset's N x N0 images) or --num-images N" in capsys.readouterr().err
    for flag in ("--n0", "--batch-size"):
        with pytest.raises(SystemExit):
            main(common + ["--num-images", "1", flag, "0", "--out", str(tmp_path / "z")])
        assert f"argument {flag}: 0: must be an integer >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["generate", "extract", "bench"])
def test_base_config_reaches_the_loader(command, tmp_path, capsys, monkeypatch):
    import finextract.engine.loading
    from finextract.cli import main

    def loader(base, finetuned=None, **kwargs):
        raise ValueError(f"loader saw base_config={kwargs.get('base_config')}")

    monkeypatch.setattr(finextract.engine.loading, "load_model_pair", loader)
    args = [command, "--base", "sd.safetensors", "--base-config", "configs/", "--finetuned", "ft"]
    if command != "bench":
        args += ["--caption", "c", "--n0", "1", "--device", "cpu", "--backend", "torch", "--out", str(tmp_path / "o")]
    assert main(args + (["--device", "cpu", "--backend", "torch"] if command == "bench" else [])) == 1
    assert "loader saw base_config=configs/" in capsys.readouterr().err


def test_a_second_writer_of_one_folder_is_refused_with_the_holders_pid(dreambooth_pair, tmp_path):
    """Two processes never interleave chunks: the folder's lock is held while one writes it."""
    import os

    from finextract.store.chunks import lock

    out = tmp_path / "gen"
    with lock(out), pytest.raises(RuntimeError, match=f"pid {os.getpid()}.*another output folder"):
        generate(dreambooth_pair, CAPTION, 2, steps=1, out=out, progress=False, backend="torch")
    assert not (out / MANIFEST).exists()  # refused before writing anything
    generate(dreambooth_pair, CAPTION, 2, steps=1, out=out, progress=False, backend="torch")  # free again
    assert (out / MANIFEST).exists()


def test_overwrite_replaces_a_generation_with_another_config_and_its_pngs(dreambooth_pair, tmp_path):
    options = dict(steps=1, batch_size=2, out=tmp_path, progress=False, backend="torch", png=True)
    generate(dreambooth_pair, CAPTION, 3, **options)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [f"gen0000{i}.png" for i in range(3)]
    with pytest.raises(ValueError, match=r"num_images: 3 -> 2\); .*pass --overwrite \(overwrite=True\)"):
        generate(dreambooth_pair, CAPTION, 2, **options)
    assert len(list(tmp_path.glob("chunk_*.npz"))) == 2  # a refusal deletes nothing
    result = generate(dreambooth_pair, CAPTION, 2, overwrite=True, **options)
    assert json.loads((tmp_path / MANIFEST).read_text())["config"]["num_images"] == 2
    assert sorted(p.name for p in tmp_path.glob("chunk_*.npz")) == ["chunk_00000.npz"]
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["gen00000.png", "gen00001.png"]
    with UNetCalls(*_unets(dreambooth_pair)) as calls:  # the same config resumes, overwrite or not
        again = generate(dreambooth_pair, CAPTION, 2, overwrite=True, **options)
    assert calls.count == 0 and torch.equal(again.images, result.images)


def test_generate_refuses_an_extract_or_cluster_folder(dreambooth_pair, tmp_path):
    (tmp_path / "result.json").write_text(json.dumps({"method": "cluster"}))
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=r"holds the output of `finextract cluster`.*another output folder"):
            generate(dreambooth_pair, CAPTION, 2, steps=1, out=tmp_path, progress=False, overwrite=overwrite)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


class ImageEvaluations:
    """Counts (image, step, model) UNet evaluations as the UNets see them: the batch size of every
    forward (a fused LoRA pair runs one forward on 2B images: 2B evaluations)."""

    def __init__(self, *unets):
        self.count = 0
        self.handles = [unet.register_forward_pre_hook(self._hook) for unet in {id(u): u for u in unets}.values()]

    def _hook(self, module, args):
        self.count += int(args[0].shape[0])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("method, terms", [("finextract", 2), ("cfg", 2), ("direct", 1)])
@pytest.mark.parametrize("pair_name", ["dreambooth_pair", "lora_pair"])
def test_work_counts_the_unet_evaluations_the_unets_see(request, tmp_path, pair_name, method, terms):
    pair = request.getfixturevalue(pair_name)
    options = dict(steps=STEPS, batch_size=2, progress=False, backend="torch")
    with ImageEvaluations(*_unets(pair)) as seen:
        result = generate(pair, CAPTION, 5, method=method, out=tmp_path / "run", **options)
    assert result.work["unet_evaluations"] == result.work["unet_evaluations_computed"] == seen.count
    assert seen.count == 5 * STEPS * terms and result.work["per_image"] == {"steps": STEPS, "terms": terms}
    assert result.work["wall_s"] > 0 and result.work["cpu_s"] > 0
    with ImageEvaluations(*_unets(pair)) as seen:  # resumed: the same work recorded, none computed
        again = generate(pair, CAPTION, 5, method=method, out=tmp_path / "run", **options)
    assert seen.count == 0 == again.work["unet_evaluations_computed"]
    assert again.work["unet_evaluations"] == result.work["unet_evaluations"]
