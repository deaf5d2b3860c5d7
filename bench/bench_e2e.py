"""End to end on the CPU tiny models, ours against the plain diffusers way, side by side in one run.

    FINEXTRACT_THREADS=1 python -m pytest bench/bench_e2e.py -q --benchmark-enable \
        --benchmark-json=bench/results/e2e_pytest.json

End to end = text encoding, 50 DDIM steps, VAE decode (generation), SSCD and clustering, from a loaded
model pair, for FineXtract (Eq. 13) on the DreamBooth and the LoRA pair of the random tiny zoo
(`finextract.zoo.build.build_zoo`) and of the committed trained zoo (`finextract.zoo.trained`):
- `diffusers`: `bench/baseline.py` (two `StableDiffusionPipeline`s built once, the rule's UNet calls one
  after the other, `DDIMScheduler.step`, batch 5, fp32), then the same SSCD embedder and clustering;
- `onnxruntime`, `openvino`: `finextract.generation` (the sampler built per call, as every extraction
  builds it: text encoding, the cached export loaded into a session / compiled, one batch of N), then
  `finextract.extraction.cluster_images` (the extraction's own SSCD + clustering).
SSCD and clustering are the same code on both sides (the plain way has no faster one), so the ratio
is what our generation gains, diluted by the shared stages.

Each round runs every way once, in a rotated order (drift on a shared machine falls on every way);
the ratios are per round, and the row holds their median and range. Wall-clock seconds are what a
user waits; CPU seconds (the process's) are less sensitive to busy neighbours. With
`FINEXTRACT_THREADS=2` both sides get two threads (torch: intra-op; OpenVINO: two streams of one
thread, the batch split in two). Each row also checks that the images agree within 1 uint8 level and
that the extraction (cliques and extracted indices) is the same, records AS on the trained zoo, and
the generation's CPU MFU: UNet FLOPs (`FlopCounterMode`) over the generation's CPU seconds, as a
share of this CPU's fp32 GEMM peak per thread (torch, measured in the same run).
Summary: `bench/results/e2e_threads<T>.json`. `FINEXTRACT_BENCH_IMAGES` (default 10) and
`FINEXTRACT_BENCH_ROUNDS` (default 3) size the run. `FINEXTRACT_BENCH_DEVICE=cuda` (bench/device_check.sh)
runs the torch backend against the diffusers way on the GPU instead (`$FINEXTRACT_BENCH_OUT/e2e_gpu.json`;
no CPU MFU there).
"""

from __future__ import annotations

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

DEVICE = os.environ.get("FINEXTRACT_BENCH_DEVICE", "cpu")
NUM_IMAGES = int(os.environ.get("FINEXTRACT_BENCH_IMAGES", "10"))
ROUNDS = int(os.environ.get("FINEXTRACT_BENCH_ROUNDS", "3"))
N0 = 2
STEPS = 50
# on CUDA (bench/device_check.sh): the torch backend (CUDA graphs + the fused kernel) against diffusers on the GPU
WAYS = ("diffusers", "onnxruntime", "openvino") if DEVICE == "cpu" else ("diffusers", "torch")
CASES = [(zoo, kind) for zoo in ("random", "trained") for kind in ("dreambooth", "lora")]
RESULTS: list[dict] = []


@pytest.fixture(scope="module")
def zoos(tmp_path_factory):
    from finextract.zoo.build import build_zoo
    from finextract.zoo.trained import default_zoo_folder

    trained = default_zoo_folder()
    return {
        "random": (build_zoo(tmp_path_factory.mktemp("zoo")), "a photo of sks dog", None),
        "trained": (trained, (trained / "caption.txt").read_text().strip(), trained / "train"),
    }


@pytest.fixture(scope="module")
def peak():
    return headroom.gemm_peak_cpu_gflops(torch.get_num_threads())


@pytest.fixture(scope="module")
def embedder():
    from finextract.sscd import load_embedder

    return load_embedder(device=DEVICE)


@pytest.fixture(scope="module", autouse=True)
def _summary(peak):
    yield
    if not RESULTS:
        return
    folder = Path(__file__).with_name("results")
    folder.mkdir(exist_ok=True)
    threads = torch.get_num_threads()
    report = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "threads": threads,
            "load_average_at_end": os.getloadavg(),
            "note": "a machine shared with other engineers' jobs: ratios are per round, side by side",
        },
        "what": "text encoding + 50 DDIM steps + VAE decode + SSCD + clustering, from a loaded pair",
        "num_images": NUM_IMAGES,
        "n0": N0,
        "rounds": ROUNDS,
        "gemm_peak": peak,
        "results": RESULTS,
    }
    report["device"] = DEVICE
    folder = Path(os.environ.get("FINEXTRACT_BENCH_OUT") or folder)
    name = f"e2e_threads{threads}.json" if DEVICE == "cpu" else "e2e_gpu.json"
    (folder / name).write_text(json.dumps(report, indent=2))


def _load(zoo: Path, kind: str):
    """The zoo's pair in fp32 on the CPU (the trained zoo stores fp16 weights)."""
    from finextract.engine.config import RunConfig
    from finextract.engine.loading import load_model_pair

    if kind == "dreambooth":
        pair = load_model_pair(zoo / "base", zoo / "dreambooth")
    else:
        pair = load_model_pair(zoo / "base", lora=zoo / "lora" / "pytorch_lora_weights.safetensors")
    return pair.place(RunConfig.resolve(device=DEVICE, backend="torch"))


def _ways(pair, caption: str, cache_dir: Path):
    """way -> a function generating the NUM_IMAGES images (uint8 (N, H, W, 3)) the way it does."""
    from finextract.engine.config import RunConfig
    from finextract.generation import generate

    pipelines = baseline.diffusers_pipelines(pair)
    ways = {"diffusers": lambda: baseline.baseline_generate(pair, caption, NUM_IMAGES, pipelines=pipelines)}
    for name in WAYS[1:]:
        config = RunConfig.resolve(
            device=DEVICE, backend=name, batch_size=NUM_IMAGES, steps=STEPS, threads=torch.get_num_threads(),
            cache_dir=cache_dir,
        )  # fmt: skip
        generate(pair, caption, 2, config=config.replace(steps=2), progress=False)  # export once (cached)
        ways[name] = lambda config=config: generate(pair, caption, NUM_IMAGES, config=config, progress=False).images
    return ways


def _run(generate_images, embedder) -> dict:
    """One end-to-end run: images, extraction, and wall / CPU seconds per stage."""
    from finextract.extraction import cluster_images

    wall, cpu = time.perf_counter(), time.process_time()
    images = generate_images()
    generate_wall, generate_cpu = time.perf_counter() - wall, time.process_time() - cpu
    timings: dict = {}
    if DEVICE != "cpu":
        torch.cuda.synchronize()
    extraction = cluster_images(images, N0, embedder, timings=timings)
    return {
        "images": images,
        "extraction": extraction,
        "wall_s": time.perf_counter() - wall,
        "cpu_s": time.process_time() - cpu,
        "generate_wall_s": generate_wall,
        "generate_cpu_s": generate_cpu,
        "sscd_s": timings["embed"],
        "cluster_s": timings["cluster"],
    }


def _spread(values: list[float], digits: int = 3) -> dict:
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
    }


@pytest.mark.parametrize("zoo_name, kind", CASES)
def test_end_to_end(benchmark, zoos, peak, embedder, tmp_path, zoo_name, kind):
    benchmark.group = f"e2e-{zoo_name}-{kind}"
    zoo, caption, train = zoos[zoo_name]
    pair = _load(zoo, kind)
    ways = _ways(pair, caption, tmp_path / "cache")
    runs: dict[str, list[dict]] = {way: [] for way in ways}
    order = list(ways)

    def one_round():
        for way in order:
            runs[way].append(_run(ways[way], embedder))
        order.append(order.pop(0))  # rotate: no way always runs first

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    flops_per_image = STEPS * 2 * headroom.unet_flops_per_image(pair.base_unet.config)  # two UNet terms per step
    reference = runs["diffusers"]
    row = {"zoo": zoo_name, "kind": kind, "method": "finextract", "threads": torch.get_num_threads(), "ways": {}}
    for way, way_runs in runs.items():
        entry = {
            "wall_s": _spread([r["wall_s"] for r in way_runs]),
            "cpu_s": _spread([r["cpu_s"] for r in way_runs]),
            "generate_cpu_s": _spread([r["generate_cpu_s"] for r in way_runs]),
            "sscd_s": _spread([r["sscd_s"] for r in way_runs]),
            "cluster_s": _spread([r["cluster_s"] for r in way_runs], 4),
            "images_per_s": round(NUM_IMAGES / statistics.median(r["wall_s"] for r in way_runs), 3),
            "cliques": way_runs[0]["extraction"].cliques,
            "extracted": way_runs[0]["extraction"].indices,
        }
        if DEVICE == "cpu":
            generate_cpu_s = statistics.median(r["generate_cpu_s"] for r in way_runs)
            entry["generation_cpu_mfu"] = round(NUM_IMAGES * flops_per_image / generate_cpu_s / peak["flops"], 4)
        if way != "diffusers":
            entry["speedup_wall"] = _spread([b["wall_s"] / r["wall_s"] for b, r in zip(reference, way_runs)], 2)
            entry["speedup_cpu"] = _spread([b["cpu_s"] / r["cpu_s"] for b, r in zip(reference, way_runs)], 2)
            diff = (way_runs[0]["images"].int() - reference[0]["images"].int()).abs().max().item()
            entry["max_pixel_diff"] = diff
            entry["same_extraction"] = (
                way_runs[0]["extraction"].cliques == reference[0]["extraction"].cliques
                and way_runs[0]["extraction"].indices == reference[0]["extraction"].indices
            )
        if train is not None:
            from finextract.evaluation import evaluate_against, model_resolution

            # the training images at the model's side, as `finextract extract --train` compares them
            metrics, _ = evaluate_against(
                train, way_runs[0]["extraction"].descriptors, embedder, resolution=model_resolution(pair)
            )
            entry["AS"] = round(metrics["AS"], 4)
        row["ways"][way] = entry
    RESULTS.append(row)
    benchmark.extra_info.update(row)
    for way, entry in row["ways"].items():
        if way != "diffusers":
            # same seeds, same arithmetic to float32 rounding: a pixel may round the other way, no more
            assert entry["max_pixel_diff"] <= 1, f"{way} differs from the diffusers way by {entry['max_pixel_diff']}"
