"""GPU benchmarks at Stable Diffusion 1.x size (each against the plain diffusers way) and at FLUX.1 size.

Run on a CUDA machine (bench/device_check.sh does it):

    python -m pytest bench/bench_gpu.py -q --benchmark-enable --benchmark-json=bench/results/gpu.json

- UNet steps: a randomly initialised `UNet2DConditionModel` with the SD 1.x config, fp16, batch 8/16/32,
  FineXtract on a DreamBooth pair (two UNets) and CFG (one UNet on a 2B batch), through the project's
  own step (`finextract.benchmarking.build_step`: the sampler's DDIM loop, one CUDA graph per step with
  both UNet calls and the fused kernel).
  Step latency, images/s (50 steps, UNet + update only), model FLOP utilisation from 0.89 TFLOP per
  image per UNet evaluation against 790 TFLOP/s (the H200's measured dense fp16/bf16 rate), and peak
  `torch.cuda.max_memory_allocated`.
- The plain diffusers way in the same run: two fp32 UNets called one after the other per step,
  batch 5, eager, with diffusers' `DDIMScheduler.step` (as the paper's released code does).
- A FLUX.1-dev-size transformer (`FluxTransformer2DModel`, 11.9 B parameters, random weights, bf16) at 1024 px,
  batch 1 and 2 (one true-CFG / FineXtract step): forward latency, TFLOP/s and MFU against
  `finextract.flops.transformer_flops` (74.4 TFLOP per image), peak memory.
- SSCD-shaped descriptors: a ResNet-50 trunk (transformers' `ResNetModel`, random weights) with GeM
  pooling and a 512-d projection, fp16, 224x224 uint8 input normalised on the device.
- Similarity matrix (on the GPU) and clique clustering for N = 500 and 5,000 planted descriptors.

Each benchmark also stores its derived numbers in `benchmark.extra_info` and in a summary JSON
(`$FINEXTRACT_BENCH_OUT/gpu_summary.json`, default bench/results/) that device_check.sh prints.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import baseline

from finextract.rules import rule_for

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU; none here (run bench/device_check.sh on one)"
    ),
]

STEPS = 50
PEAK_TFLOPS = float(os.environ.get("FINEXTRACT_PEAK_TFLOPS", "790"))  # H200 dense fp16/bf16, measured
TEXT_TOKENS = 77
BATCHES = [int(b) for b in os.environ.get("FINEXTRACT_BENCH_BATCHES", "8,16,32").split(",")]
ROUNDS = int(os.environ.get("FINEXTRACT_BENCH_ROUNDS", "5"))
SUMMARY: dict[str, dict] = {}


def _out_dir() -> Path:
    folder = Path(os.environ.get("FINEXTRACT_BENCH_OUT") or Path(__file__).with_name("results"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module", autouse=True)
def _write_summary():
    yield
    if SUMMARY:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        payload = {"device": device, "torch": torch.__version__, "peak_tflops": PEAK_TFLOPS, "results": SUMMARY}
        (_out_dir() / "gpu_summary.json").write_text(json.dumps(payload, indent=2))


def _record(benchmark, name: str, **numbers) -> None:
    numbers = {key: (round(value, 4) if isinstance(value, float) else value) for key, value in numbers.items()}
    benchmark.extra_info.update(numbers)
    SUMMARY[name] = numbers


def _synchronized(fn):
    def call():
        fn()
        torch.cuda.synchronize()

    return call


def _free() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------- models --


def sd1_unet(dtype: torch.dtype, seed: int = 0):
    """A random SD 1.x-sized UNet built directly on the GPU (random init on the CPU takes minutes)."""
    from diffusers import UNet2DConditionModel

    from finextract.benchmarking import SD1_UNET_CONFIG

    torch.manual_seed(seed)
    with torch.device("cuda"):
        unet = UNet2DConditionModel(**SD1_UNET_CONFIG)
    return unet.to(dtype=dtype).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def schedule():
    from finextract.engine.ddim import make_scheduler
    from finextract.zoo.configs import SD1_SCHEDULER_CONFIG

    return SimpleNamespace(scheduler=make_scheduler(SD1_SCHEDULER_CONFIG, STEPS))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A random SD 1.x-size DreamBooth pair in fp16 on the GPU (`finextract.benchmarking.sd1_random_pair`)."""
    from finextract.benchmarking import sd1_random_pair

    holder = SimpleNamespace(
        pair=sd1_random_pair(
            "dreambooth", device="cuda", dtype=torch.float16, tokenizer_folder=tmp_path_factory.mktemp("tok")
        )
    )
    yield holder
    holder.pair = None
    _free()


def _step_bench(benchmark, pair, method: str, batch: int) -> None:
    """The product's own step: `finextract.benchmarking.build_step` -> `Sampler.loop(batch).step(i)`, a CUDA
    graph replay of both UNet evaluations and the fused kernel, exactly what `finextract generate` runs."""
    from finextract.benchmarking import STEPS_PER_IMAGE, build_step, tflop_per_image_eval
    from finextract.engine.config import RunConfig

    _free()
    torch.cuda.reset_peak_memory_stats()
    config = RunConfig.resolve(device="cuda", dtype="fp16", backend="torch", batch_size=batch)
    runner = build_step(pair.pair, config, method=method)
    loop = runner.loop
    torch.cuda.synchronize()
    start = time.perf_counter()
    x_0 = runner.sampler.denoise(torch.randn(batch, 4, 64, 64, generator=torch.Generator().manual_seed(0)))
    torch.cuda.synchronize()
    generation_s = time.perf_counter() - start  # a whole generation as a user runs it: 50 steps, host loop included
    finite = bool(torch.isfinite(x_0).all())
    benchmark.pedantic(_synchronized(runner.step), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    step_s = benchmark.stats.stats.median
    evaluations = batch * len(runner.rule.terms)  # UNet image-evaluations per step
    _record(
        benchmark,
        f"{method}_b{batch}",
        method=method,
        batch=batch,
        mode=loop.mode,
        eager_reason=loop.eager_reason,
        forwards_per_step=runner.sampler.backend.forwards_per_step,
        step_ms=step_s * 1e3,
        images_per_s=batch / (STEPS_PER_IMAGE * step_s),
        s_per_image=STEPS_PER_IMAGE * step_s / batch,
        generation_s=generation_s,
        mfu=evaluations * tflop_per_image_eval((4, 64, 64)) / step_s / PEAK_TFLOPS,
        peak_gb=torch.cuda.max_memory_allocated() / 1e9,
        finite=finite,
    )
    runner = loop = None  # free the GPU memory before the next benchmark


@pytest.mark.parametrize("batch", BATCHES)
def test_cfg_step(benchmark, pair, batch):
    _step_bench(benchmark, pair, "cfg", batch)


@pytest.mark.parametrize("batch", BATCHES)
def test_finextract_step(benchmark, pair, batch):
    _step_bench(benchmark, pair, "finextract", batch)


def test_plain_diffusers_step(benchmark, schedule, pair):
    """The paper code's way: fp32 UNets, batch 5, two sequential UNet calls, then DDIMScheduler.step."""
    from finextract.benchmarking import tflop_per_image_eval

    pair.pair = None  # free the fp16 models: the baseline holds two fp32 ones
    _free()
    torch.cuda.reset_peak_memory_stats()
    unet_ft, unet_base = sd1_unet(torch.float32, seed=1), sd1_unet(torch.float32, seed=2)
    batch, w, k = 5, 3.0, -0.02
    generator = torch.Generator().manual_seed(0)
    text_c, text_empty = (torch.randn(batch, TEXT_TOKENS, 768, generator=generator).cuda() for _ in range(2))
    x_t = torch.randn(batch, 4, 64, 64, generator=generator).cuda()
    t = schedule.scheduler.timesteps[STEPS // 2]

    rule = rule_for("finextract", "dreambooth", w, k)  # Eq. 13
    unets = {"finetuned": unet_ft, "base": unet_base}
    embeddings = {term.key: text_c if term.caption == "prompt" else text_empty for term in rule.terms}

    @torch.no_grad()
    def one_step():
        return baseline.guided_step(unets, rule, embeddings, x_t, t, schedule.scheduler)

    benchmark.pedantic(_synchronized(one_step), rounds=max(3, ROUNDS // 2), iterations=1, warmup_rounds=1)
    step_s = benchmark.stats.stats.median
    _record(
        benchmark,
        "plain_diffusers_b5",
        method="finextract (plain diffusers, fp32)",
        batch=batch,
        mode="eager",
        step_ms=step_s * 1e3,
        images_per_s=batch / (STEPS * step_s),
        s_per_image=STEPS * step_s / batch,
        mfu=2 * batch * tflop_per_image_eval((4, 64, 64)) / step_s / PEAK_TFLOPS,
        peak_gb=torch.cuda.max_memory_allocated() / 1e9,
    )
    unet_ft = unet_base = None
    _free()


# --------------------------------------------------------------------- FLUX.1-size transformer --

FLUX_BATCHES = [int(b) for b in os.environ.get("FINEXTRACT_BENCH_FLUX_BATCHES", "1,2").split(",")]


@pytest.fixture(scope="module")
def flux_transformer():
    """A FLUX.1-dev-size transformer (11.9 B parameters) with random weights, bf16, built on the GPU (24 GB)."""
    from finextract.benchmarking import random_flow_transformer
    from finextract.flops import FLUX1_DEV_TRANSFORMER_CONFIG

    _free()
    holder = SimpleNamespace(
        model=random_flow_transformer(FLUX1_DEV_TRANSFORMER_CONFIG, device="cuda", dtype=torch.bfloat16)
    )
    yield holder
    holder.model = None
    _free()


@pytest.mark.parametrize("batch", FLUX_BATCHES)
def test_flux_transformer_forward(benchmark, flux_transformer, batch):
    """One FLUX.1-dev-size transformer forward at 1024 px (4,096 packed image tokens, 512 T5 tokens, the distilled
    guidance input), bf16, eager: latency, TFLOP/s and MFU from `finextract.flops.transformer_flops`, peak memory.
    Batch 2 is one image's true-CFG / FineXtract step (the two guidance terms on a 2B batch)."""
    from finextract.benchmarking import flux_forward_inputs
    from finextract.flops import FLUX1_DEV_TRANSFORMER_CONFIG, transformer_flops

    torch.cuda.reset_peak_memory_stats()
    inputs = flux_forward_inputs(FLUX1_DEV_TRANSFORMER_CONFIG, (128, 128), batch, device="cuda", dtype=torch.bfloat16)
    model = flux_transformer.model
    with torch.no_grad():
        (out,) = model(**inputs)
        benchmark.pedantic(_synchronized(lambda: model(**inputs)), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    step_s = benchmark.stats.stats.median
    tflop = transformer_flops(FLUX1_DEV_TRANSFORMER_CONFIG, (128, 128), batch) / 1e12
    _record(
        benchmark,
        f"flux_transformer_b{batch}",
        batch=batch,
        tokens=inputs["hidden_states"].shape[1] + inputs["encoder_hidden_states"].shape[1],
        forward_ms=step_s * 1e3,
        tflop_per_forward=tflop,
        tflops=tflop / step_s,
        mfu=tflop / step_s / PEAK_TFLOPS,
        peak_gb=torch.cuda.max_memory_allocated() / 1e9,
        finite=bool(torch.isfinite(out).all()),
    )


# ------------------------------------------------------------------------------ SSCD-shaped --


class SSCDShaped(torch.nn.Module):
    """ResNet-50 trunk + GeM pooling (p = 3) + 512-d projection + L2 norm: SSCD's disc architecture."""

    def __init__(self):
        super().__init__()
        from transformers import ResNetConfig, ResNetModel

        self.trunk = ResNetModel(ResNetConfig())  # the default config is ResNet-50
        self.projection = torch.nn.Linear(2048, 512)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255)

    def forward(self, images_uint8_nhwc: torch.Tensor) -> torch.Tensor:
        x = images_uint8_nhwc.permute(0, 3, 1, 2).to(self.mean.dtype)
        x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        features = self.trunk(x).last_hidden_state.float()
        pooled = features.clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3)  # GeM
        return torch.nn.functional.normalize(self.projection(pooled.to(self.projection.weight.dtype)).float(), dim=1)


def test_sscd_shaped_descriptor_throughput(benchmark):
    _free()
    batch = 256
    model = SSCDShaped().to("cuda", torch.float16).eval().to(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (batch, 224, 224, 3), dtype=torch.uint8, device="cuda")
    with torch.no_grad():
        descriptors = model(images)
        benchmark.pedantic(_synchronized(lambda: model(images)), rounds=ROUNDS, iterations=1, warmup_rounds=2)
    step_s = benchmark.stats.stats.median
    norms = descriptors.norm(dim=1)
    _record(
        benchmark,
        "sscd_shaped_b256",
        batch=batch,
        images_per_s=batch / step_s,
        ms_per_batch=step_s * 1e3,
        unit_norm=bool(torch.allclose(norms, torch.ones_like(norms), atol=1e-3)),
    )
    model = None
    _free()


# ------------------------------------------------------------------- similarity + clustering --


@pytest.mark.parametrize("n", [500, 5000])
def test_similarity_and_clustering(benchmark, n):
    from finextract.clustering import cluster_descriptors
    from finextract.similarity import similarity_matrix
    from tests.planted import planted_descriptors

    n0 = n // 50
    descriptors, labels = planted_descriptors(n, n0, 10, seed=0)
    on_gpu = torch.from_numpy(descriptors).cuda()
    similarity_matrix(on_gpu)  # warm-up (cuBLAS handle)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        similarity_matrix(on_gpu)
    torch.cuda.synchronize()
    similarity_ms = (time.perf_counter() - start) / 10 * 1e3
    result = benchmark.pedantic(lambda: cluster_descriptors(on_gpu, n0), rounds=1, iterations=1)
    planted = {frozenset(map(int, (labels == c).nonzero()[0])) for c in range(n0)}
    found = sum(1 for clique in result.cliques if frozenset(map(int, clique)) in planted)
    _record(
        benchmark,
        f"clustering_n{n}",
        n=n,
        n0=n0,
        similarity_ms=similarity_ms,
        clustering_s=benchmark.stats.stats.median,
        threshold=float(result.threshold),
        planted_clusters_found=found,
        skipped_thresholds=len(result.skipped),
    )
