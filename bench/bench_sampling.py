"""Our sampling loop against the plain diffusers way, same tiny models, same steps, one run (CPU).

    FINEXTRACT_THREADS=1 python -m pytest bench/bench_sampling.py -q --benchmark-enable \
        --benchmark-json=bench/results/sampling.json

(On a shared 2-core machine use one thread: two threads beside a busy neighbour ran a tiny UNet
forward 20x slower here.)

For a DreamBooth pair and a LoRA pair (the random tiny zoo), FineXtract (Eq. 13) generates N images
with 50 DDIM steps, end to end (text encoding, UNet steps, VAE decode):
- `ours_b<N>`: `finextract.generation` with the torch backend, one batch of N (LoRA: one UNet forward on
  2N per step);
- `ours_b5`: the same at the baseline's batch of 5, to separate fusion from batching;
- `diffusers_b5`: `bench/baseline.py` (two pipelines, two sequential UNet calls, batch 5, fp32).
Each `extra_info` holds images/s and the process CPU seconds (less sensitive to busy neighbours); the baseline's also holds the ratios and the largest pixel
difference between our images and the baseline's (the same seeds give the same images).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import baseline

NUM_IMAGES = 20
STEPS = 50
CAPTION = "a photo of sks dog"
_results: dict[tuple[str, str], dict] = {}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from finextract.zoo.build import build_zoo

    return build_zoo(tmp_path_factory.mktemp("zoo"))


def _one_run(benchmark, fn):
    """One timed run (wall clock, pytest-benchmark) plus the process CPU seconds it used."""
    cpu = {}

    def timed():
        started = time.process_time()
        result = fn()
        cpu["seconds"] = time.process_time() - started
        return result

    return benchmark.pedantic(timed, rounds=1, iterations=1, warmup_rounds=0), cpu["seconds"]


@pytest.mark.parametrize("kind", ["dreambooth", "lora"])
@pytest.mark.parametrize("way", ["ours_b20", "ours_b5", "diffusers_b5"])
def test_sampling_images_per_s(benchmark, zoo, kind, way):
    from finextract.generation import generate

    benchmark.group = f"sampling-{kind}"
    pair = baseline.load_zoo_pair(kind, zoo)
    if way.startswith("ours"):
        batch = int(way.split("_b")[1])
        options = dict(backend="torch", progress=False)
        generate(pair, CAPTION, 2, steps=2, batch_size=2, **options)  # warm-up
        images, cpu_seconds = _one_run(
            benchmark, lambda: generate(pair, CAPTION, NUM_IMAGES, steps=STEPS, batch_size=batch, **options).images
        )
    else:
        pipelines = baseline.diffusers_pipelines(pair)
        baseline.baseline_generate(pair, CAPTION, 2, steps=2, pipelines=pipelines)  # warm-up
        images, cpu_seconds = _one_run(
            benchmark, lambda: baseline.baseline_generate(pair, CAPTION, NUM_IMAGES, steps=STEPS, pipelines=pipelines)
        )
    seconds = benchmark.stats.stats.median
    info = {
        "kind": kind,
        "way": way,
        "num_images": NUM_IMAGES,
        "steps": STEPS,
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu_seconds, 3),
        "images_per_s": round(NUM_IMAGES / seconds, 3),
        "threads": torch.get_num_threads(),
    }
    _results[(kind, way)] = {**info, "images": images}
    if way == "diffusers_b5":
        for ours in ("ours_b20", "ours_b5"):
            if (kind, ours) in _results:
                info[f"{ours}_over_diffusers"] = round(_results[(kind, ours)]["images_per_s"] / info["images_per_s"], 2)
                info[f"{ours}_over_diffusers_cpu"] = round(cpu_seconds / _results[(kind, ours)]["cpu_seconds"], 2)
                diff = (_results[(kind, ours)]["images"].int() - images.int()).abs().max().item()
                info[f"{ours}_max_pixel_diff"] = diff
                assert diff <= 2, f"{ours} and the diffusers baseline disagree by {diff} levels"
    benchmark.extra_info.update(info)
    assert images.shape == (NUM_IMAGES, 32, 32, 3)
