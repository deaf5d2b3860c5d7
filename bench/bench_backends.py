"""CPU benchmark of the backends on the tiny models: torch vs onnxruntime vs the plain diffusers way, one run.

    FINEXTRACT_THREADS=1 python -m pytest bench/bench_backends.py -q --benchmark-enable \
        --benchmark-json=bench/results/backends_pytest.json

For FineXtract on a DreamBooth pair and on a LoRA pair, and CFG on the DreamBooth pair (the random
tiny zoo), each way times one guided DDIM step:
- `torch` / `onnxruntime` / `openvino`: the sampler's own step (`finextract.benchmarking.build_step`, the same
  code `finextract bench` and `finextract generate` run), batch `FINEXTRACT_BENCH_BATCH` (default 64:
  the batch is ours to choose);
- `diffusers`: the plain diffusers way of `bench/baseline.py` (two `StableDiffusionPipeline`s, the
  rule's UNet calls one after the other, `DDIMScheduler.step(eta=0)`, batch 5, fp32), as the paper's code.
Each `extra_info` holds the median step latency, images/s for a 50-step image (UNet work + update;
text encoding and decode are once per batch and timed end to end in bench_sampling.py), peak RSS of
the process, the CPU MFU (UNet FLOPs per step over the step's CPU seconds, as a share of this CPU's
fp32 GEMM peak per thread: `bench/headroom.py`), and on the `diffusers` row the ratio of each backend's images/s to it (the CPU goal:
at least 3x). A summary is also written to bench/results/backends.json when timing is enabled.
`FINEXTRACT_BENCH_STEPS` (default 10) sets the timed rounds; `--benchmark-disable` runs each once.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import baseline
import headroom

from finextract.benchmarking import STEPS_PER_IMAGE, build_step, peak_memory_mib
from finextract.engine.config import RunConfig

CAPTION = "a photo of sks dog"
BATCH = int(os.environ.get("FINEXTRACT_BENCH_BATCH", "64"))
ROUNDS = int(os.environ.get("FINEXTRACT_BENCH_STEPS", "10"))
CASES = [  # (method, kind, way): the baseline last, so its row can hold the ratios
    (method, kind, way)
    for method, kind in (("finextract", "dreambooth"), ("finextract", "lora"), ("cfg", "dreambooth"))
    for way in ("torch", "onnxruntime", "openvino", "diffusers")
]
RESULTS: dict[tuple[str, str, str], dict] = {}


@functools.cache
def _peak() -> dict:
    return headroom.gemm_peak_cpu_gflops(torch.get_num_threads())


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from finextract.zoo.build import build_zoo

    return build_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    if not RESULTS or any(row.get("step_ms") is None for row in RESULTS.values()):
        return  # timing disabled: nothing to record
    report = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
        },
        "models": "tiny zoo (UNet 16x16x4 latents, ~1 M parameters), fp32, CPU",
        "images_per_s_note": f"batch / ({STEPS_PER_IMAGE} x median step latency): UNet evaluations + DDIM update",
        "gemm_peak": _peak(),
        "results": list(RESULTS.values()),
    }
    folder = Path(__file__).with_name("results")
    folder.mkdir(exist_ok=True)
    (folder / "backends.json").write_text(json.dumps(report, indent=2))


def _diffusers_step(pair, method: str):
    """One step of the plain diffusers way on a batch of 5: sequential UNet calls + DDIMScheduler.step."""
    from finextract.engine.sampler import start_latents
    from finextract.rules import rule_for

    rule = rule_for(method, pair.kind)
    pipelines = baseline.diffusers_pipelines(pair)
    unets = {"base": pipelines[0].unet, "finetuned": pipelines[1].unet}
    batch = baseline.BATCH_SIZE
    with torch.no_grad():
        embeddings = baseline.prompt_embeddings(pipelines, rule, CAPTION, batch, "cpu")
    scheduler = pipelines[1].scheduler
    scheduler.set_timesteps(STEPS_PER_IMAGE)
    state = {"x_t": start_latents(range(batch), (4, 16, 16)), "index": 0}

    @torch.no_grad()
    def step():
        t = scheduler.timesteps[state["index"] % STEPS_PER_IMAGE]
        state["x_t"] = baseline.guided_step(unets, rule, embeddings, state["x_t"], t, scheduler)
        state["index"] += 1

    return step, batch


@pytest.mark.parametrize("method, kind, way", CASES)
def test_step(benchmark, zoo, onnx_cache, method, kind, way):
    benchmark.group = f"{method}-{kind}"
    pair = baseline.load_zoo_pair(kind, zoo)
    if way == "diffusers":
        step, batch = _diffusers_step(pair, method)
        row = {"backend": "diffusers (baseline)", "method": method, "kind": kind, "batch": batch}
    else:
        config = RunConfig.resolve(device="cpu", backend=way, batch_size=BATCH, cache_dir=onnx_cache)
        runner = build_step(pair.place(config), config, method=method, caption=CAPTION)
        step, batch = runner.step, BATCH
        row = {
            "backend": way,
            "method": method,
            "kind": kind,
            "batch": batch,
            "forwards_per_step": runner.sampler.backend.forwards_per_step,
            "setup_s": round(runner.setup_s, 2),
        }
    cpu_seconds = []

    def timed_step():
        started = time.process_time()
        step()
        cpu_seconds.append(time.process_time() - started)

    benchmark.pedantic(timed_step, rounds=ROUNDS, iterations=1, warmup_rounds=2)
    if benchmark.disabled or benchmark.stats is None:
        RESULTS[(method, kind, way)] = {**row, "step_ms": None}
        return
    step_s = benchmark.stats.stats.median
    row.update(
        step_ms=round(step_s * 1e3, 3),
        images_per_s=round(batch / (STEPS_PER_IMAGE * step_s), 4),
        peak_rss_mib=round(peak_memory_mib("cpu"), 1),
        threads=torch.get_num_threads(),
    )
    # CPU MFU: the rule's UNet FLOPs per step (two terms per image) over the step's median process CPU
    # seconds, as a share of this CPU's fp32 GEMM peak per thread (measured once per run)
    flops = batch * 2 * headroom.unet_flops_per_image(pair.base_unet.config)
    step_cpu_s = statistics.median(cpu_seconds[-ROUNDS:])
    row["step_cpu_ms"] = round(step_cpu_s * 1e3, 3)
    row["images_per_cpu_s"] = round(batch / (STEPS_PER_IMAGE * step_cpu_s), 4)
    row["cpu_mfu"] = round(flops / step_cpu_s / _peak()["flops"], 4)
    if way == "diffusers":
        for ours in ("torch", "onnxruntime", "openvino"):
            measured = RESULTS.get((method, kind, ours), {})
            if measured.get("images_per_s"):
                row[f"{ours}_over_diffusers"] = round(measured["images_per_s"] / row["images_per_s"], 2)
                row[f"{ours}_over_diffusers_cpu"] = round(measured["images_per_cpu_s"] / row["images_per_cpu_s"], 2)
    RESULTS[(method, kind, way)] = row
    benchmark.extra_info.update(row)
    assert row["images_per_s"] > 0
