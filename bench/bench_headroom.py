"""Headroom: this CPU's fp32 GEMM peak (torch and NumPy, 1 and 2 threads, one run) and UNet FLOP counts.

    python bench/bench_headroom.py            # writes bench/results/headroom.json
    python -m pytest bench/bench_headroom.py --benchmark-enable   # the GEMM peak under pytest-benchmark

Peak: square fp32 products (2048 x 2048 x 2048, 17.2 GFLOP each), best / median / min of the timed
repeats, the libraries interleaved round by round so that both see the same machine load. FLOPs:
`finextract.flops.unet_flops` (FlopCounterMode on the meta device) for the trained zoo's tiny UNet at
4x16x16 latents, the SD 1.x UNet at 4x64x64 and the SDXL base 1.0 UNet at 4x128x128, batch 1; and
`transformer_flops` for FLUX.1-dev, SD 3.5 Large and SD 3.5 Medium at 1024 px (16x128x128 latents).
`--flops-only` prints the counts alone (seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

from finextract.flops import (
    FLUX1_DEV_TRANSFORMER_CONFIG,
    SD35_LARGE_TRANSFORMER_CONFIG,
    SD35_MEDIUM_TRANSFORMER_CONFIG,
    SDXL_UNET_CONFIG,
    gemm_peak_gflops,
    transformer_flops,
    transformer_parameters,
    unet_flops,
    unet_parameters,
)

#: flow-matching transformers at 1024 px (128 x 128 latents; `transformer_flops`' default text tokens)
TRANSFORMERS = {
    "FLUX.1-dev": FLUX1_DEV_TRANSFORMER_CONFIG,
    "SD 3.5 Large": SD35_LARGE_TRANSFORMER_CONFIG,
    "SD 3.5 Medium": SD35_MEDIUM_TRANSFORMER_CONFIG,
}


def unets() -> dict:
    from diffusers import UNet2DConditionModel

    from finextract.benchmarking import SD1_UNET_CONFIG
    from finextract.zoo.trained import default_zoo_folder

    tiny = UNet2DConditionModel.load_config(str(default_zoo_folder() / "base" / "unet"))
    return {
        "tiny (trained zoo)": (tiny, (16, 16)),
        "SD 1.x": (SD1_UNET_CONFIG, (64, 64)),
        "SDXL base 1.0": (SDXL_UNET_CONFIG, (128, 128)),
    }


def peaks(threads: list[int], rounds: int, repeats: int, size: int) -> list[dict]:
    """Each (library, threads) measured `rounds` times, interleaved; keeps every round's figures."""
    rows = {(lib, t): [] for t in threads for lib in ("torch", "numpy")}
    for _ in range(rounds):
        for (lib, t), runs in rows.items():
            runs.append(gemm_peak_gflops(t, lib, size=size, repeats=repeats))
    out = []
    for (lib, t), runs in rows.items():
        best = [r["gflops_best"] for r in runs]
        medians = sorted(r["gflops_median"] for r in runs)
        out.append(
            {
                "library": lib,
                "threads": t,
                "size": size,
                "gflops_peak": max(best),
                "gflops_median": medians[len(medians) // 2],
                "gflops_min": min(r["gflops_min"] for r in runs),
                "rounds": rounds,
                "repeats_per_round": repeats,
            }
        )
    return out


def test_gemm_peak_torch_1_thread(benchmark):
    result = benchmark(lambda: gemm_peak_gflops(1, "torch", size=1024, repeats=1))
    assert result["gflops_best"] > 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--flops-only", action="store_true", help="print the FLOP counts; no timing, no file")
    args = parser.parse_args()
    flops = {}
    for name, (config, hw) in unets().items():
        flops[name] = {
            "latent": [4, *hw],
            "batch": 1,
            "gflop_per_forward": unet_flops(config, hw) / 1e9,
            "parameters": unet_parameters(config),
        }
        print(name, json.dumps(flops[name]), flush=True)
    for name, config in TRANSFORMERS.items():
        flops[name] = {
            "latent": [16, 128, 128],
            "batch": 1,
            "gflop_per_forward": transformer_flops(config, (128, 128)) / 1e9,
            "parameters": transformer_parameters(config),
        }
        print(name, json.dumps(flops[name]), flush=True)
    if args.flops_only:
        return
    rows = peaks(args.threads, args.rounds, args.repeats, args.size)
    for row in rows:
        print(json.dumps(row), flush=True)
    import numpy as np
    import torch

    out = {
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "note": "shared 2-core CPU machine (other engineers' jobs ran alongside): best = peak, "
            "median and min = spread under that load",
        },
        "gemm_fp32": rows,
        "unet_flops": flops,
    }
    path = Path(__file__).parent / "results" / "headroom.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print("wrote", path)


if __name__ == "__main__":
    main()
