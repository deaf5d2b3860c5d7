"""Headroom helpers: FLOP counts against hand formulas, the GEMM timer's contract, MFU arithmetic."""

from __future__ import annotations

import pytest
import torch

from finextract.flops import forward_flops, gemm_peak_gflops, mfu, unet_flops, unet_parameters

META = torch.device("meta")


def test_linear_and_conv_flops_match_hand_counts():
    # 2 FLOPs per multiply-add; bias adds are not counted (FlopCounterMode's convention).
    with META:
        linear = torch.nn.Linear(64, 32)
        conv = torch.nn.Conv2d(3, 8, kernel_size=3, padding=1)
    assert forward_flops(linear, torch.zeros(5, 64, device=META)) == 2 * 5 * 64 * 32
    # each of the 8 x 10 x 12 outputs of 2 images takes 3 * 3 * 3 multiply-adds
    assert forward_flops(conv, torch.zeros(2, 3, 10, 12, device=META)) == 2 * (2 * 8 * 10 * 12) * (3 * 3 * 3)


def test_attention_is_counted_on_meta():
    # softmax(Q K^T) V for (batch, heads, T, d) queries and S keys: 2 T S d for Q K^T and again for A V.
    b, h, t, s, d = 2, 3, 16, 7, 8
    q = torch.zeros(b, h, t, d, device=META)
    kv = torch.zeros(b, h, s, d, device=META)
    flops = forward_flops(torch.nn.functional.scaled_dot_product_attention, q, kv, kv)
    assert flops == b * h * 2 * (2 * t * s * d)


def test_unet_flops_are_linear_in_batch_and_sd1_has_its_published_size():
    from diffusers import UNet2DConditionModel

    from finextract.benchmarking import SD1_UNET_CONFIG
    from finextract.zoo.trained import default_zoo_folder

    tiny = UNet2DConditionModel.load_config(str(default_zoo_folder() / "base" / "unet"))
    one = unet_flops(tiny, (16, 16))
    assert one > 0 and unet_flops(tiny, (16, 16), batch=3) == 3 * one
    assert unet_parameters(SD1_UNET_CONFIG) == 859_520_964  # runwayml/stable-diffusion-v1-5's UNet


def test_gemm_timer_contract_and_thread_restore():
    before = torch.get_num_threads()
    for library in ("torch", "numpy"):
        row = gemm_peak_gflops(1, library, size=64, repeats=2)
        assert row["library"] == library and row["threads"] == 1 and row["repeats"] == 2
        assert row["gflops_best"] >= row["gflops_median"] >= row["gflops_min"] > 0
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="library"):
        gemm_peak_gflops(1, "jax")
    with pytest.raises(ValueError, match="threads"):
        gemm_peak_gflops(0)


def test_mfu_arithmetic():
    # 50 GFLOP of work in 2 s on a 100 GFLOP/s peak: 25 GFLOP/s achieved, a quarter of the peak.
    assert mfu(50e9, 2.0, 100.0) == pytest.approx(0.25, rel=1e-12)
    with pytest.raises(ValueError, match="seconds"):
        mfu(1.0, 0.0, 1.0)


def _flux_hand_flops(cfg: dict, n_img: int, n_txt: int) -> int:
    """One FLUX.1 transformer forward by hand: 2 FLOPs per multiply-add of each Linear on the tokens it sees,
    and 4 L^2 d per joint attention of L = image + text tokens (2 L^2 d for Q K^T, again for A V)."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    length = n_img + n_txt

    def mm(i, o, n):
        return 2 * i * o * n

    embed = 2 * (mm(256, d, 1) + mm(d, d, 1)) if cfg["guidance_embeds"] else mm(256, d, 1) + mm(d, d, 1)
    embed += mm(cfg["pooled_projection_dim"], d, 1) + mm(d, d, 1)  # pooled text
    embed += mm(cfg["joint_attention_dim"], d, n_txt) + mm(cfg["in_channels"], d, n_img)  # txt_in, img_in
    stream = 4 * mm(d, d, 1) + mm(d, 4 * d, 1) + mm(4 * d, d, 1)  # q, k, v, out, MLP per token
    double = 2 * mm(d, 6 * d, 1) + stream * (n_img + n_txt) + 4 * length**2 * d
    single = mm(d, 3 * d, 1) + length * (3 * mm(d, d, 1) + mm(d, 4 * d, 1) + mm(5 * d, d, 1)) + 4 * length**2 * d
    out = mm(d, 2 * d, 1) + mm(d, cfg["in_channels"], n_img)
    return embed + cfg["num_layers"] * double + cfg["num_single_layers"] * single + out


def test_flux_transformer_flops_match_the_hand_count():
    from finextract.flops import FLUX1_DEV_TRANSFORMER_CONFIG, transformer_flops
    from finextract.zoo.configs import TINY_FLUX_TRANSFORMER_CONFIG

    tiny = dict(TINY_FLUX_TRANSFORMER_CONFIG, _class_name="FluxTransformer2DModel")
    # 16 x 16 latents: 8 x 8 packed tokens; 7 text tokens
    assert transformer_flops(tiny, (16, 16), text_tokens=7) == _flux_hand_flops(tiny, 64, 7)
    assert transformer_flops(tiny, (16, 16), batch=3, text_tokens=7) == 3 * _flux_hand_flops(tiny, 64, 7)
    # FLUX.1-dev at 1024 px: 128 x 128 latents, 4096 image and 512 T5 tokens
    assert transformer_flops(FLUX1_DEV_TRANSFORMER_CONFIG, (128, 128)) == _flux_hand_flops(
        FLUX1_DEV_TRANSFORMER_CONFIG, 4096, 512
    )


def test_released_transformers_have_their_published_sizes():
    from finextract.flops import (
        FLUX1_DEV_TRANSFORMER_CONFIG,
        SD35_LARGE_TRANSFORMER_CONFIG,
        SD35_MEDIUM_TRANSFORMER_CONFIG,
        transformer_flops,
        transformer_parameters,
    )

    # FLUX.1-dev "12B", SD 3.5 Large "8.1B" (diffusers' exact counts); SD 3.5 Medium's MMDiT-X 2.24 B
    assert transformer_parameters(FLUX1_DEV_TRANSFORMER_CONFIG) == 11_901_408_320
    assert transformer_parameters(SD35_LARGE_TRANSFORMER_CONFIG) == 8_056_627_520
    assert transformer_parameters(SD35_MEDIUM_TRANSFORMER_CONFIG) == 2_243_171_520
    # SD3 at 1024 px: 4096 patches and 333 text tokens; a joint block's attention alone is 4 L^2 d
    large = transformer_flops(SD35_LARGE_TRANSFORMER_CONFIG, (128, 128))
    attention = 38 * 4 * (4096 + 333) ** 2 * (38 * 64)
    assert attention < large < 2 * 8_056_627_520 * (4096 + 333) + attention
    with pytest.raises(ValueError, match="_class_name"):
        transformer_parameters({"_class_name": "UNet2DConditionModel"})
    with pytest.raises(ValueError, match="even"):
        transformer_flops(FLUX1_DEV_TRANSFORMER_CONFIG, (127, 128))
