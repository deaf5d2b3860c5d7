"""Headroom: FLOPs of a UNet forward and this machine's fp32 matrix-product peak, for MFU.

`unet_flops` builds a diffusers `UNet2DConditionModel` on the meta device (no weights are allocated,
so an SDXL-size UNet costs nothing) and counts one forward with `torch.utils.flop_counter.FlopCounterMode`
(PyTorch's own counter: 2 FLOPs per multiply-add of matrix products, convolutions and attention;
elementwise work, norms and softmax are not counted). `gemm_peak_gflops` times square fp32 matrix
products with torch or NumPy at a given thread count. MFU = achieved FLOP/s / peak FLOP/s (`mfu`).
"""

from __future__ import annotations

import contextlib
import statistics
import time

import numpy as np

#: Stable Diffusion XL base 1.0 UNet (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json, as
#: published; 2.57 B parameters): 128 x 128 latents, text width 2048 (two text encoders), pooled text
#: embedding (1280) and six size/crop ids (256 each) as added "text_time" conditioning.
SDXL_UNET_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


def _meta_unet(config: dict):
    import torch  # heavy: torch and diffusers; flops.py imports torch-free
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def unet_parameters(config: dict) -> int:
    """Number of parameters of a diffusers UNet2DConditionModel with this config (built on meta)."""
    return sum(p.numel() for p in _meta_unet(config).parameters())


def unet_flops(config: dict, latent_hw: tuple[int, int], batch: int = 1, *, text_tokens: int = 77) -> int:
    """FLOPs of one UNet forward (`FlopCounterMode`'s count: 2 per multiply-add), weights not allocated.

    Args:
        config: `UNet2DConditionModel` config dict (e.g. `SDXL_UNET_CONFIG`, a loaded config.json).
        latent_hw: latent height and width (SD 1.x at 512 px: (64, 64); SDXL at 1024 px: (128, 128)).
        batch: batch size (FLOPs grow linearly with it).
        text_tokens: length of the text conditioning (CLIP: 77).

    Returns:
        The FLOP count, an int (fp32 or fp16 alike: precision does not change the count).

    Raises:
        ValueError: batch or latent size < 1; or the config's added conditioning is not "text_time"/None.
    """
    import torch

    h, w = latent_hw
    if batch < 1 or h < 1 or w < 1:
        raise ValueError(f"batch={batch} and latent_hw={latent_hw} must be positive")
    unet = _meta_unet(config)
    cfg = unet.config
    meta = torch.device("meta")
    sample = torch.zeros(batch, cfg.in_channels, h, w, device=meta)
    timestep = torch.zeros(batch, device=meta)
    text = torch.zeros(batch, text_tokens, cfg.cross_attention_dim, device=meta)
    added = None
    if cfg.addition_embed_type == "text_time":  # SDXL: pooled text embedding + six time ids
        time_ids = 6
        pooled = cfg.projection_class_embeddings_input_dim - time_ids * cfg.addition_time_embed_dim
        added = {
            "text_embeds": torch.zeros(batch, pooled, device=meta),
            "time_ids": torch.zeros(batch, time_ids, device=meta),
        }
    elif cfg.addition_embed_type is not None:
        raise ValueError(f"addition_embed_type={cfg.addition_embed_type!r} is not supported (text_time or None)")
    return forward_flops(unet, sample, timestep, encoder_hidden_states=text, added_cond_kwargs=added)


def forward_flops(module, *args, **kwargs) -> int:
    """FLOPs of `module(*args, **kwargs)` by `FlopCounterMode` (no gradients). Give meta tensors (and
    a module built on meta) to count without computing: on the CPU, torch's fused attention kernel
    has no FLOP formula and attention would be missed; on meta it runs as counted matrix products.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(*args, **kwargs)
    return int(counter.get_total_flops())


def gemm_peak_gflops(threads: int, library: str = "torch", *, size: int = 2048, repeats: int = 7) -> dict:
    """fp32 GEMM throughput of this CPU: square (size x size) @ (size x size) products, timed.

    Args:
        threads: intra-op threads for the product (torch.set_num_threads, or threadpoolctl's BLAS limit
            for NumPy); restored afterwards.
        library: "torch" or "numpy" (their own BLAS: oneDNN/MKL for torch, OpenBLAS for NumPy wheels).
        size: matrix side (2 * size^3 FLOPs per product).
        repeats: timed products after one untimed warm-up.

    Returns:
        {"library", "threads", "size", "gflops_best", "gflops_median", "gflops_min", "repeats"}: GFLOP/s
        (1e9 FLOP/s); best is the peak, median and min give the spread (a busy machine lowers them).

    Raises:
        ValueError: unknown library, or threads / size / repeats < 1.
    """
    if library not in ("torch", "numpy"):
        raise ValueError(f"library={library!r}: expected 'torch' or 'numpy'")
    if threads < 1 or size < 1 or repeats < 1:
        raise ValueError(f"threads={threads}, size={size} and repeats={repeats} must be >= 1")
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    with _threads(threads, library):
        if library == "torch":
            import torch

            ta, tb = torch.from_numpy(a), torch.from_numpy(b)
            out = torch.empty(size, size)

            def product():
                torch.mm(ta, tb, out=out)
        else:
            out = np.empty((size, size), np.float32)

            def product():
                np.matmul(a, b, out=out)

        product()
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            product()
            seconds.append(time.perf_counter() - start)
    rates = [2 * size**3 / s / 1e9 for s in seconds]
    return {
        "library": library,
        "threads": threads,
        "size": size,
        "gflops_best": max(rates),
        "gflops_median": statistics.median(rates),
        "gflops_min": min(rates),
        "repeats": repeats,
    }


@contextlib.contextmanager
def _threads(threads: int, library: str):
    if library == "torch":
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)
    else:
        from threadpoolctl import threadpool_limits  # optional: threadpoolctl comes with scikit-learn (the [zoo] extra)

        with threadpool_limits(limits=threads, user_api="blas"):
            yield


def mfu(flops: float, seconds: float, peak_gflops: float) -> float:
    """Model FLOP utilisation: (flops / seconds) / peak, a fraction in [0, 1] on a sound peak.

    Args:
        flops: FLOPs of the timed work (e.g. steps x `unet_flops(...)` x UNet calls per step).
        seconds: its wall-clock time. peak_gflops: the peak, GFLOP/s (`gemm_peak_gflops`).

    Raises:
        ValueError: seconds or peak_gflops not positive.
    """
    if seconds <= 0 or peak_gflops <= 0:
        raise ValueError(f"seconds={seconds} and peak_gflops={peak_gflops} must be positive")
    return flops / seconds / (peak_gflops * 1e9)
