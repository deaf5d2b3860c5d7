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
