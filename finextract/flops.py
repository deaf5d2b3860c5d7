"""Headroom: FLOPs of a UNet or flow transformer forward and this machine's fp32 matrix-product peak, for MFU.

`unet_flops` (and `transformer_flops` for FLUX.1 and SD3) builds a diffusers `UNet2DConditionModel` on the meta device (no weights are allocated,
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


#: FLUX.1-dev's transformer (black-forest-labs/FLUX.1-dev, transformer/config.json; 11.90 B parameters):
#: 19 double-stream and 38 single-stream blocks of width 3072 (24 heads of 128), T5 states (4096 wide),
#: the pooled CLIP embedding (768) and the distilled guidance embedding; 2 x 2 packed latents (64 values).
FLUX1_DEV_TRANSFORMER_CONFIG = dict(
    _class_name="FluxTransformer2DModel",
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
#: SD 3.5 Large's transformer (stabilityai/stable-diffusion-3.5-large, transformer/config.json; 8.06 B
#: parameters): 38 joint blocks of width 2432 (38 heads of 64), patch 2, QK RMS norm.
SD35_LARGE_TRANSFORMER_CONFIG = dict(
    _class_name="SD3Transformer2DModel",
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=38,
    attention_head_dim=64,
    num_attention_heads=38,
    joint_attention_dim=4096,
    caption_projection_dim=2432,
    pooled_projection_dim=2048,
    pos_embed_max_size=192,
    qk_norm="rms_norm",
)
#: SD 3.5 Medium's transformer (stabilityai/stable-diffusion-3.5-medium, transformer/config.json; 2.24 B
#: parameters, MMDiT-X): 24 joint blocks of width 1536 (24 heads of 64), the first 13 with a second,
#: image-only attention.
SD35_MEDIUM_TRANSFORMER_CONFIG = dict(
    SD35_LARGE_TRANSFORMER_CONFIG,
    num_layers=24,
    num_attention_heads=24,
    caption_projection_dim=1536,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
)
#: text tokens the pipelines encode a caption to by default: FLUX.1-dev's T5 (max_sequence_length 512),
#: SD3's 77 CLIP + 256 T5 tokens joined
DEFAULT_TEXT_TOKENS = {"FluxTransformer2DModel": 512, "SD3Transformer2DModel": 77 + 256}


def _meta_transformer(config: dict):
    import diffusers  # heavy: torch and diffusers; flops.py imports torch-free
    import torch

    name = config.get("_class_name")
    if name not in DEFAULT_TEXT_TOKENS:
        raise ValueError(f"_class_name={name!r}: expected one of {', '.join(DEFAULT_TEXT_TOKENS)}")
    config = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    with torch.device("meta"):
        return getattr(diffusers, name)(**config)


def transformer_parameters(config: dict) -> int:
    """Number of parameters of a FLUX.1 or SD3 transformer with this config (`_class_name` names it; built on meta)."""
    return sum(p.numel() for p in _meta_transformer(config).parameters())


def transformer_flops(
    config: dict, latent_hw: tuple[int, int], batch: int = 1, *, text_tokens: int | None = None
) -> int:
    """FLOPs of one flow-matching transformer forward (FLUX.1 `FluxTransformer2DModel`, SD3
    `SD3Transformer2DModel`), counted as `unet_flops` counts (FlopCounterMode on the meta device, 2 per
    multiply-add of matrix products and attention; RoPE, norms and elementwise work not counted).

    Args:
        config: the transformer's config with its `_class_name` (e.g. `FLUX1_DEV_TRANSFORMER_CONFIG`, a loaded
            config.json).
        latent_hw: the VAE latent's height and width (1024 px: (128, 128)). FLUX reads (h / 2) x (w / 2) tokens
            of 2 x 2 packed latents, SD3 the same count of 2 x 2 patches.
        batch: batch size (FLOPs grow linearly with it).
        text_tokens: text sequence length (default `DEFAULT_TEXT_TOKENS`: FLUX.1 512 T5 tokens; SD3 333).

    Returns:
        The FLOP count, an int.

    Raises:
        ValueError: batch or latent size < 1, an odd latent size, or another `_class_name`.
    """
    import torch

    h, w = latent_hw
    if batch < 1 or h < 2 or w < 2 or h % 2 or w % 2:
        raise ValueError(f"batch={batch} and latent_hw={latent_hw} must be positive, the latent size even")
    model = _meta_transformer(config)
    name, cfg, meta = type(model).__name__, model.config, torch.device("meta")
    text_tokens = DEFAULT_TEXT_TOKENS[name] if text_tokens is None else text_tokens
    text = torch.zeros(batch, text_tokens, cfg.joint_attention_dim, device=meta)
    pooled = torch.zeros(batch, cfg.pooled_projection_dim, device=meta)
    timestep = torch.zeros(batch, device=meta)
    if name == "SD3Transformer2DModel":
        sample = torch.zeros(batch, cfg.in_channels, h, w, device=meta)
        return forward_flops(
            model,
            hidden_states=sample,
            encoder_hidden_states=text,
            pooled_projections=pooled,
            timestep=timestep,
            return_dict=False,
        )
    tokens = (h // 2) * (w // 2)
    return forward_flops(
        model,
        hidden_states=torch.zeros(batch, tokens, cfg.in_channels, device=meta),
        encoder_hidden_states=text,
        pooled_projections=pooled,
        timestep=timestep,
        guidance=timestep if cfg.guidance_embeds else None,
        img_ids=torch.zeros(tokens, 3, device=meta),
        txt_ids=torch.zeros(text_tokens, 3, device=meta),
        return_dict=False,
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
