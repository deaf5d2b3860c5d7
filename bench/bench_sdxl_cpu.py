"""One SDXL-size UNet forward on this CPU: the SDXL base 1.0 UNet (2.57 B parameters, random weights), fp32.

    python bench/bench_sdxl_cpu.py                 # writes bench/results/sdxl_cpu.json
    python bench/bench_sdxl_cpu.py --latent 32 --repeats 3 --threads 1
    python -m pytest bench/bench_sdxl_cpu.py --benchmark-enable   # the same forward under pytest-benchmark

It shows that the SDXL path (two text encoders' 2048-wide cross-attention, the pooled `text_embeds` and
six `time_ids` as `added_cond_kwargs`) runs at full size here; it is not a throughput figure for real use
(SDXL samples at 4x128x128 on a GPU). Latents are small (default 4x32x32, 256 px) so that a forward takes
seconds; the FLOP count is `finextract.flops.unet_flops` at that size. The weights (10.3 GB in fp32) are
allocated uninitialised and filled with N(0, 0.02): the timing does not depend on their values, and
filling is faster than diffusers' initialisers. Needs about 11 GB of free memory (checked first).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import pytest

from finextract.flops import SDXL_UNET_CONFIG, unet_flops

RESULTS = Path(__file__).parent / "results" / "sdxl_cpu.json"
NEEDED_GIB = 11.0


def available_gib() -> float:
    """MemAvailable from /proc/meminfo, in GiB (inf where there is no /proc)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("inf")


def sdxl_unet():
    """The SDXL base 1.0 UNet, fp32 on the CPU, weights N(0, 0.02) (seeded), in eval mode."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    unet = unet.to_empty(device="cpu").eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.normal_(0.0, 0.02, generator=generator)
    for buffer in unet.buffers():  # none in this UNet, but keep to_empty's garbage out of the forward
        buffer.zero_()
    return unet


def sdxl_inputs(latent: int, batch: int = 1) -> tuple:
    """(x_t, t, encoder_hidden_states, added_cond_kwargs) at SDXL's widths: 77 x 2048 text states,
    the (B, 1280) pooled embedding and (B, 6) time ids (original size, crop, target size, in pixels)."""
    import torch

    generator = torch.Generator().manual_seed(1)
    x_t = torch.randn(batch, 4, latent, latent, generator=generator)
    hidden = torch.randn(batch, 77, 2048, generator=generator)
    pixels = float(latent * 8)
    added = {
        "text_embeds": torch.randn(batch, 1280, generator=generator),
        "time_ids": torch.tensor([[pixels, pixels, 0.0, 0.0, pixels, pixels]] * batch),
    }
    return x_t, torch.tensor([500.0]), hidden, added


def forward(unet, inputs):
    import torch

    x_t, t, hidden, added = inputs
    with torch.inference_mode():
        return unet(x_t, t, encoder_hidden_states=hidden, added_cond_kwargs=added, return_dict=False)[0]


def _check_memory() -> None:
    free = available_gib()
    if free < NEEDED_GIB:
        raise SystemExit(
            f"bench_sdxl_cpu: {free:.1f} GiB of memory available, the SDXL UNet needs about {NEEDED_GIB:.0f} GiB "
            "in fp32; free memory (or run it on a larger machine)"
        )


@pytest.fixture(scope="module")
def unet():
    if available_gib() < NEEDED_GIB:
        pytest.skip(f"needs about {NEEDED_GIB:.0f} GiB of free memory for the SDXL UNet in fp32")
    return sdxl_unet()


def test_sdxl_size_forward(benchmark, unet):
    inputs = sdxl_inputs(16)
    out = benchmark.pedantic(forward, args=(unet, inputs), rounds=2, warmup_rounds=1)
    assert out.shape == inputs[0].shape and bool(out.isfinite().all())


def main() -> None:
    import torch

    from finextract.engine.config import set_threads

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=32, help="latent height = width (32: 256 px images)")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards after one warm-up")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("FINEXTRACT_THREADS", "1")))
    args = parser.parse_args()
    _check_memory()
    set_threads(args.threads)
    started = time.perf_counter()
    unet = sdxl_unet()
    build_s = time.perf_counter() - started
    parameters = sum(p.numel() for p in unet.parameters())
    inputs = sdxl_inputs(args.latent)
    out = forward(unet, inputs)  # warm-up
    if not bool(out.isfinite().all()):
        raise SystemExit("bench_sdxl_cpu: the forward gave non-finite values")
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        forward(unet, inputs)
        seconds.append(time.perf_counter() - start)
        print(f"forward: {seconds[-1]:.2f} s", flush=True)
    gflop = unet_flops(SDXL_UNET_CONFIG, (args.latent, args.latent)) / 1e9
    median = statistics.median(seconds)
    result = {
        "unet": "SDXL base 1.0 config (finextract.flops.SDXL_UNET_CONFIG), random weights",
        "parameters": parameters,
        "dtype": "float32",
        "latent": [1, 4, args.latent, args.latent],
        "text_tokens": 77,
        "threads": args.threads,
        "build_s": round(build_s, 2),
        "forward_s": [round(s, 3) for s in seconds],
        "forward_s_median": round(median, 3),
        "forward_s_spread": [round(min(seconds), 3), round(max(seconds), 3)],
        "gflop_per_forward": round(gflop, 1),
        "gflops_achieved_median": round(gflop / median, 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "load_average_1min_at_end": round(os.getloadavg()[0], 2),
            "note": "shared 2-core CPU machine: other engineers' jobs ran alongside",
        },
        "command": f"python bench/bench_sdxl_cpu.py --latent {args.latent} --repeats {args.repeats} "
        f"--threads {args.threads}",
    }
    print(json.dumps(result, indent=2))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print("wrote", RESULTS)


if __name__ == "__main__":
    main()
