"""Load-to-first-step time at SD 1.x size: `finextract generate` of one image, one DDIM step, as a user runs it.

    FINEXTRACT_THREADS=2 python -m pytest bench/bench_load.py -q --benchmark-enable \
        --benchmark-json=bench/results/load_pytest.json
    # side by side with another checkout (e.g. the commit before a change), in one run:
    FINEXTRACT_BENCH_OTHER=/path/to/other/.venv/bin/python python -m pytest bench/bench_load.py ...

The models are random but SD 1.x-size where it matters for loading: the SD 1.x UNet config (859.5 M
parameters, 3.4 GB of safetensors) with 16x16 latents (the same weights; the one step then costs
little next to the loading), a LoRA of rank 4 on every attention projection, and a full fine-tune
(a second UNet). They are written once to `$FINEXTRACT_BENCH_MODELS` (default a folder under the
system temporary directory; ~7 GB). Each timed run is a fresh process: Python and library imports,
`load_model_pair`, building the backend (onnxruntime: the export cache is warm, as on every run but
the first), one step and the VAE decode. Results: one row per (pair kind, backend) with each
interpreter's median and, with another checkout, the round-by-round ratio, in `bench/results/load.json`.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROUNDS = int(os.environ.get("FINEXTRACT_BENCH_ROUNDS", "3"))
MODELS = Path(os.environ.get("FINEXTRACT_BENCH_MODELS") or Path(tempfile.gettempdir()) / "finextract-bench-sd1")
INTERPRETERS = {"this": sys.executable}
if os.environ.get("FINEXTRACT_BENCH_OTHER"):
    INTERPRETERS["other"] = os.environ["FINEXTRACT_BENCH_OTHER"]
RESULTS: list[dict] = []


def write_models(folder: Path) -> Path:
    """SD 1.x-size random base pipeline, LoRA file and full fine-tune (`unet/` folder), written once."""
    import copy

    import torch
    from diffusers import DDIMScheduler

    from finextract.benchmarking import sd1_random_pair
    from finextract.zoo.models import save_pipeline
    from finextract.zoo.writers import write_lora_diffusers

    done = folder / "done"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    pair = sd1_random_pair("lora", tokenizer_folder=folder / "tokenizer")
    pair.base_unet.register_to_config(sample_size=16)  # the same weights, 16x16 latents: a cheap step
    unet = pair.base_unet
    save_pipeline(
        {
            "unet": unet,
            "vae": pair.vae,
            "text_encoder": pair.base_text_encoder,
            "tokenizer": pair.base_tokenizer,
            "scheduler": DDIMScheduler.from_config(pair.scheduler_config),
        },
        folder / "base",
    )
    write_lora_diffusers(folder / "lora", pair.unet_lora, {})
    finetuned = copy.deepcopy(unet)
    with torch.no_grad():
        for parameter in finetuned.parameters():
            parameter.mul_(1.001)
    finetuned.save_pretrained(folder / "dreambooth" / "unet", safe_serialization=True)
    done.write_text("ok")
    return folder


@pytest.fixture(scope="module")
def models():
    return write_models(MODELS)


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    if not RESULTS:
        return
    folder = Path(__file__).with_name("results")
    folder.mkdir(exist_ok=True)
    report = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "what": "one fresh `finextract generate --num-images 1 --steps 1` process: imports, load, backend, 1 step",
        "interpreters": INTERPRETERS,
        "results": RESULTS,
    }
    (folder / "load.json").write_text(json.dumps(report, indent=2))


def _command(python: str, models: Path, kind: str, backend: str, out: Path) -> list[str]:
    source = ["--lora", str(models / "lora" / "pytorch_lora_weights.safetensors")]
    if kind == "dreambooth":
        source = ["--finetuned", str(models / "dreambooth")]
    return [
        python, "-m", "finextract.cli", "generate", "--base", str(models / "base"), *source,
        "--caption", "a photo of sks dog", "--num-images", "1", "--steps", "1", "--batch-size", "1",
        "--backend", backend, "--device", "cpu", "--no-progress", "--out", str(out),
    ]  # fmt: skip


@pytest.mark.parametrize("kind", ["lora", "dreambooth"])
@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_load_to_first_step(benchmark, models, tmp_path, kind, backend):
    """Each round runs every interpreter once, in turn (A B A B ...), so a busy neighbour slows them alike;
    the ratio is taken round by round."""
    import statistics

    benchmark.group = f"load-{kind}-{backend}"
    runs = iter(range(10**6))
    seconds: dict[str, list[float]] = {name: [] for name in INTERPRETERS}

    def run(name: str) -> float:
        out = tmp_path / f"run{next(runs)}"  # a new folder: nothing to resume
        env = dict(os.environ, FINEXTRACT_CACHE=str(MODELS / f"cache-{name}"))
        # cwd outside any checkout: `python -m` must import the interpreter's own installed finextract
        command = _command(INTERPRETERS[name], models, kind, backend, out)
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        return time.perf_counter() - started

    for name in INTERPRETERS:
        run(name)  # warm-up: the first onnxruntime run exports into the cache; later runs reuse it

    def one_round():
        for name in INTERPRETERS:
            seconds[name].append(run(name))

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    if benchmark.disabled or benchmark.stats is None:
        return
    row = {"kind": kind, "backend": backend, "rounds": ROUNDS}
    for name, values in seconds.items():
        row[f"{name}_median_s"] = round(statistics.median(values), 2)
        row[f"{name}_min_s"], row[f"{name}_max_s"] = round(min(values), 2), round(max(values), 2)
    if "other" in seconds:
        ratios = [this / other for this, other in zip(seconds["this"], seconds["other"])]
        row["this_over_other_median"] = round(statistics.median(ratios), 3)
        row["this_over_other_range"] = [round(min(ratios), 3), round(max(ratios), 3)]
    RESULTS.append(row)
