"""Headroom figures the CPU benchmarks share: a UNet's FLOPs per image and this CPU's fp32 GEMM peak.

FLOPs are `torch.utils.flop_counter.FlopCounterMode`'s count of one UNet forward built on the meta
device (2 FLOPs per multiply-add of matrix products, convolutions and attention; elementwise work,
norms and softmax are not counted; on meta, attention runs as counted matrix products). The peak is
the best of several square fp32 `torch.mm` products timed in process CPU seconds per thread, so a
busy neighbour that takes the core away does not lower it; CPU MFU = UNet FLOPs / CPU seconds / peak.
"""

from __future__ import annotations

import statistics
import time

import torch


def unet_flops_per_image(config, latent_hw: tuple[int, int] | None = None, text_tokens: int = 77) -> int:
    """FLOPs of one UNet forward on one latent (a diffusers `UNet2DConditionModel` config; no weights allocated).

    Args:
        config: the UNet's config (`unet.config`, a FrozenDict, or a plain dict).
        latent_hw: latent (h, w); default the config's `sample_size`.
        text_tokens: conditioning length (CLIP: 77).
    """
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    config = {key: value for key, value in dict(config).items() if not key.startswith("_")}
    size = config.get("sample_size", 64)
    h, w = latent_hw or ((size, size) if isinstance(size, int) else tuple(size))
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
        sample = torch.zeros(1, config.get("in_channels", 4), h, w)
        text = torch.zeros(1, text_tokens, unet.config.cross_attention_dim)
        timestep = torch.zeros(1)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(sample, timestep, encoder_hidden_states=text)
    return int(counter.get_total_flops())


def gemm_peak_cpu_gflops(threads: int, size: int = 1024, repeats: int = 7) -> dict:
    """fp32 GEMM rate of this CPU per thread: (size x size) @ (size x size) with torch at `threads` threads.

    Returns:
        {"threads", "size", "gflops_per_thread_best", "gflops_per_thread_median", "flops"}: GFLOP per
        process CPU second; `flops` (FLOP per CPU second, the best) is the peak MFU divides by.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        torch.mm(a, b)
        rates = []
        for _ in range(repeats):
            started = time.process_time()
            torch.mm(a, b)
            rates.append(2 * size**3 / (time.process_time() - started) / 1e9)
    finally:
        torch.set_num_threads(previous)
    best = max(rates)
    return {
        "threads": threads,
        "size": size,
        "gflops_per_thread_best": round(best, 1),
        "gflops_per_thread_median": round(statistics.median(rates), 1),
        "flops": best * 1e9,
    }
