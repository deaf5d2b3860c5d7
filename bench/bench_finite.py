"""Cost of the load-time NaN/Inf check (`engine.loading.checks.check_finite`) on the zoo and at SD 1.x size.

    FINEXTRACT_THREADS=1 python bench/bench_finite.py            # writes bench/results/finite.json
    FINEXTRACT_THREADS=1 python bench/bench_finite.py --dtype fp16   # bench/results/finite_fp16.json

"zoo": the tiny zoo's base (UNet, text encoder, VAE), built into a temporary folder. "sd1_unet": the
tensors of an SD 1.x UNet (`UNet2DConditionModel` with cross_attention_dim 768: 859.5 M parameters,
3.44 GB in fp32), allocated with the real shapes and filled with a constant (a sum's speed does not
depend on the values). Each timing is the median of `--repeats` passes, on as many threads as torch
uses (FINEXTRACT_THREADS=1: one core); the check reads every weight once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from finextract.engine.loading.checks import check_finite  # noqa: E402


def timed(models: dict, repeats: int) -> dict:
    size = sum(t.numel() * t.element_size() for m in models.values() for t in [*m.parameters(), *m.buffers()])
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        check_finite(models, "bench")
        times.append(time.perf_counter() - started)
    seconds = statistics.median(times)
    return {"bytes": size, "seconds": round(seconds, 4), "seconds_per_GB": round(seconds / (size / 1e9), 4)}


def sd1_unet(dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64)
    unet = unet.to_empty(device="cpu").to(dtype).requires_grad_(False)
    for parameter in unet.parameters():
        parameter.fill_(0.01)
    return unet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--out", type=Path, help="default bench/results/finite.json (finite_fp16.json with --dtype fp16)"
    )
    args = parser.parse_args()
    args.out = args.out or ROOT / "bench" / "results" / ("finite.json" if args.dtype == "fp32" else "finite_fp16.json")
    torch.set_num_threads(int(os.environ.get("FINEXTRACT_THREADS", "0")) or torch.get_num_threads())
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[args.dtype]
    from finextract.engine.loading import load_base
    from finextract.zoo.build import build_zoo

    with tempfile.TemporaryDirectory() as folder:
        base = load_base(build_zoo(Path(folder), seed=0, families=()) / "base").parts
        rows = {"zoo": timed({name: base[name] for name in ("unet", "text_encoder", "vae")}, args.repeats)}
    rows["sd1_unet"] = timed({"unet": sd1_unet(dtype)}, args.repeats)
    record = {
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        **rows,
    }
    print(json.dumps(record, indent=2))
    args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
