"""Real size on the CPU: SD 1.x-config random weights (`bench_load.write_models`), each figure from a fresh process.

    FINEXTRACT_THREADS=1 python -m pytest bench/bench_real_size.py -q --benchmark-enable \
        --benchmark-json=bench/results/real_size_pytest.json

- `test_export`: a LoRA pair's first run builds the export: seconds, files on disk, and the
  process's resident memory after loading, after exporting and after building the backend's session,
  with its peak (VmHWM), in one fresh process per backend (onnxruntime, openvino).
- `test_step_64`: one guided DDIM step at 64x64 latents (512 px), batch 1, FineXtract on the LoRA
  pair: the fused torch step (one UNet forward on 2 latents, the adapters gated per row) against the
  plain diffusers way (base UNet, then the LoRA-merged UNet, `DDIMScheduler.step`), alternating in one
  process; median of `FINEXTRACT_BENCH_STEPS` (default 3) steps each after one warm-up.
- `test_peak_rss`: `finextract generate` of one image, one step (torch backend), FineXtract against
  CFG on the DreamBooth pair, one fresh process each: peak RSS (the UNets dominate it).
Results: `bench/results/real_size.json`. The models are written once to `$FINEXTRACT_BENCH_MODELS`
(default under the system temporary folder; about 7 GB); allow 16 GB of free memory.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

MODELS = Path(os.environ.get("FINEXTRACT_BENCH_MODELS") or Path(tempfile.gettempdir()) / "finextract-bench-sd1")
STEPS = int(os.environ.get("FINEXTRACT_BENCH_STEPS", "3"))
RESULTS: dict[str, object] = {}


def _memory() -> dict:
    """This process's resident memory now and at its peak, GiB (Linux /proc/self/status)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = round(int(value.split()[0]) / 2**20, 2)
    return {"rss_gib": fields["VmRSS"], "peak_gib": fields["VmHWM"]}


def _lora_pair(models: Path):
    from finextract.engine.loading import load_model_pair

    return load_model_pair(models / "base", lora=models / "lora" / "pytorch_lora_weights.safetensors")


def worker_export(models: Path, backend: str, cache: Path) -> dict:
    """A fresh cache: load the LoRA pair, build `backend` (the export), report time, files and memory."""
    import time

    from finextract.engine.conditioning import encode_conditioning
    from finextract.engine.config import RunConfig
    from finextract.engine.denoiser import GuidedDenoiser
    from finextract.engine.export import ExportSpec, export_cached
    from finextract.engine.sampler import Sampler
    from finextract.rules import rule_for

    config = RunConfig.resolve(device="cpu", backend=backend, batch_size=1, steps=1, cache_dir=cache)
    started = time.perf_counter()
    pair = _lora_pair(models).place(config)
    row = {"backend": backend, "load_s": round(time.perf_counter() - started, 1), "after_load": _memory()}
    rule = rule_for("finextract", "lora")
    started = time.perf_counter()
    denoiser = GuidedDenoiser(pair, rule)
    export_cached(denoiser, ExportSpec.of(denoiser, encode_conditioning(pair, rule, "")), cache)
    row["export_s"] = round(time.perf_counter() - started, 1)
    row["after_export"] = _memory()
    started = time.perf_counter()
    sampler = Sampler(pair, rule, "a photo of sks dog", config)  # reuses the export
    row["session_s"] = round(time.perf_counter() - started, 1)
    row["after_session"] = _memory()
    row["export_files_gib"] = {
        path.name: round(path.stat().st_size / 2**30, 3)
        for path in sorted(sampler.backend.exported.path.parent.iterdir())
    }
    started = time.perf_counter()
    sampler([0])
    row["first_image_s"] = round(time.perf_counter() - started, 1)
    row["end"] = _memory()
    return row


def worker_step(models: Path) -> dict:
    """The fused torch step against the plain diffusers step at 64x64 latents, batch 1, alternating."""
    import statistics
    import time

    import baseline
    import torch

    from finextract.engine.config import RunConfig
    from finextract.engine.sampler import Sampler
    from finextract.rules import rule_for

    config = RunConfig.resolve(device="cpu", backend="torch", batch_size=1, steps=50)
    pair = _lora_pair(models).place(config)
    pair.base_unet.register_to_config(sample_size=64)  # the same weights at 512 px: 64x64 latents
    rule = rule_for("finextract", "lora")
    sampler = Sampler(pair, rule, "a photo of sks dog", config)
    pipelines = baseline.diffusers_pipelines(pair)
    unets = {"base": pipelines[0].unet, "finetuned": pipelines[1].unet}
    with torch.no_grad():
        embeddings = baseline.prompt_embeddings(pipelines, rule, "a photo of sks dog", 1, "cpu")
    scheduler = pipelines[1].scheduler
    scheduler.set_timesteps(50)
    x = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    loop = sampler.loop(1)
    loop.start(x)

    @torch.no_grad()
    def plain():
        baseline.guided_step(unets, rule, embeddings, x, scheduler.timesteps[10], scheduler)

    ways = {"fused_torch": lambda: loop.step(10), "diffusers": plain}
    times = {name: [] for name in ways}
    for fn in ways.values():
        fn()  # warm-up
    for _ in range(STEPS):
        for name, fn in ways.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    row = {name: {"median_s": round(statistics.median(v), 2), "min_s": round(min(v), 2), "max_s": round(max(v), 2)}
           for name, v in times.items()}  # fmt: skip
    row["ratios"] = [round(d / f, 2) for d, f in zip(times["diffusers"], times["fused_torch"])]
    row["threads"] = torch.get_num_threads()
    row["memory"] = _memory()
    return row


def _run_worker(*args: str) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, env=dict(os.environ), timeout=3000
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def models():
    from bench_load import write_models

    return write_models(MODELS)


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    if not RESULTS:
        return
    folder = Path(__file__).with_name("results")
    folder.mkdir(exist_ok=True)
    report = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average_at_end": os.getloadavg()},
        "models": "SD 1.x-config UNet (859.5 M parameters) with random weights; LoRA rank 4 on every attention projection",
        "results": RESULTS,
    }
    (folder / "real_size.json").write_text(json.dumps(report, indent=2))


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_export(benchmark, models, tmp_path, backend):
    row = benchmark.pedantic(lambda: _run_worker("export", str(models), backend, str(tmp_path)), rounds=1, iterations=1)
    RESULTS[f"export_{backend}"] = row
    benchmark.extra_info.update(row)
    assert row["export_files_gib"]


def test_step_64(benchmark, models):
    row = benchmark.pedantic(lambda: _run_worker("step", str(models)), rounds=1, iterations=1)
    RESULTS["step_64x64_batch1"] = row
    benchmark.extra_info.update(row)


@pytest.mark.parametrize("method", ["finextract", "cfg"])
def test_peak_rss(benchmark, models, tmp_path, method):
    code = (
        "import resource, sys; from finextract.cli import main; sys.argv = ['finextract'] + sys.argv[1:]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)"
    )
    command = [
        sys.executable, "-c", code, "generate", "--base", str(models / "base"), "--finetuned", str(models / "dreambooth"),
        "--method", method, "--caption", "a photo of sks dog", "--num-images", "1", "--steps", "1",
        "--batch-size", "1", "--backend", "torch", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "out"),
    ]  # fmt: skip

    def run():
        result = subprocess.run(command, capture_output=True, text=True, timeout=3000)
        assert result.returncode == 0, result.stderr[-3000:]
        return float(result.stdout.strip().splitlines()[-1])

    peak = benchmark.pedantic(run, rounds=1, iterations=1)
    RESULTS[f"peak_rss_gib_dreambooth_{method}"] = round(peak, 2)
    benchmark.extra_info["peak_rss_gib"] = round(peak, 2)


if __name__ == "__main__":  # a worker process: print one JSON line
    task, *rest = sys.argv[1:]
    if task == "export":
        print(json.dumps(worker_export(Path(rest[0]), rest[1], Path(rest[2]))))
    elif task == "step":
        print(json.dumps(worker_step(Path(rest[0]))))
    else:
        raise SystemExit(f"unknown worker task {task!r}")
