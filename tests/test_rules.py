"""Guidance rules as data (paper Eq. 6, Eq. 13) and the fused guidance + DDIM step."""

from __future__ import annotations

import pytest
import torch
from finextract.kernels.guidance_ddim import guided_ddim_step

from finextract.rules import GuidanceRule, Term, rule_for, rule_params
from finextract.zoo import SD1_SCHEDULER_CONFIG


def _combine(rule, eps):
    """sum(coef * eps[(model, caption)]) over the rule's terms."""
    return sum(term.coef * eps[term.key] for term in rule.terms)


@pytest.fixture
def eps():
    generator = torch.Generator().manual_seed(0)
    return {
        (model, caption): torch.randn(2, 4, 8, 8, generator=generator)
        for model in ("base", "finetuned")
        for caption in ("prompt", "empty")
    }


@pytest.mark.parametrize("kind", ["dreambooth", "lora"])
def test_finextract_rule_is_eq13(kind, eps):
    w, k = 4.0, -0.3
    rule = rule_for("finextract", kind, w=w, k=k)
    ft, base = eps[("finetuned", "prompt")], eps[("base", "empty")]
    expected = ft + (w - 1) * (ft - base) + k * base  # paper Eq. 13
    assert torch.allclose(_combine(rule, eps), expected, atol=1e-5)
    assert rule.coefs == (4.0, 1.0 - 4.0 - 0.3)


def test_uncond_cfg_direct_rules(eps):
    w = 2.5
    ft_empty, base_empty = eps[("finetuned", "empty")], eps[("base", "empty")]
    expected = ft_empty + (w - 1) * (ft_empty - base_empty)  # paper Eq. 6
    assert torch.allclose(_combine(rule_for("finextract-uncond", "dreambooth", w=w), eps), expected, atol=1e-5)
    ft_c = eps[("finetuned", "prompt")]
    expected = ft_empty + w * (ft_c - ft_empty)  # classifier-free guidance
    assert torch.allclose(_combine(rule_for("cfg", "lora", w=w), eps), expected, atol=1e-5)
    direct = rule_for("direct", "dreambooth")
    assert direct.terms == (Term("finetuned", "prompt", 1.0),) and direct.coefs == (1.0, 0.0)


def test_paper_defaults():
    assert rule_params("finextract", "dreambooth") == {"w": 3.0, "k": -0.02}
    assert rule_params("finextract", "lora") == {"w": 5.0, "k": 0.0}
    assert rule_params("cfg", "dreambooth") == {"w": 3.0}
    assert rule_params("finextract-uncond", "lora") == {"w": 3.0}
    db = rule_for("finextract", "dreambooth")
    assert db.terms == (Term("finetuned", "prompt", 3.0), Term("base", "empty", pytest.approx(-2.02)))
    assert rule_for("finextract", "lora").coefs == (5.0, -4.0)
    assert db.to_dict()["terms"][0] == {"model": "finetuned", "caption": "prompt", "coef": 3.0}


def test_rule_validation():
    with pytest.raises(ValueError, match="method 'x'"):
        rule_for("x", "lora")
    with pytest.raises(ValueError, match="kind"):
        rule_for("cfg", "textual-inversion")
    with pytest.raises(ValueError, match="no k"):
        rule_for("cfg", "lora", k=0.1)
    with pytest.raises(ValueError, match="no guidance scale"):
        rule_for("direct", "lora", w=2.0)
    with pytest.raises(ValueError, match="same"):
        GuidanceRule("bad", (Term("base", "empty", 1.0), Term("base", "empty", 2.0)))
    with pytest.raises(ValueError, match=r"Term\.model"):
        Term("teacher", "empty", 1.0)


def test_fused_step_equals_diffusers_ddim_every_timestep():
    """guided_ddim_step == DDIMScheduler.step(eps, t, x_t, eta=0) at all 50 timesteps of SD 1.x."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(SD1_SCHEDULER_CONFIG)
    scheduler.set_timesteps(50)
    stride = scheduler.config.num_train_timesteps // 50
    generator = torch.Generator().manual_seed(1)
    x_t = torch.randn(3, 4, 16, 16, generator=generator)
    coef_a, coef_b = 3.0, -2.02
    worst = 0.0
    for t in scheduler.timesteps:
        eps_a, eps_b = torch.randn(2, 3, 4, 16, 16, generator=generator)
        prev = int(t) - stride
        alpha_prev = scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod
        ours = guided_ddim_step(
            x_t, eps_a, eps_b, coef_a, coef_b, scheduler.alphas_cumprod[t].item(), float(alpha_prev)
        )
        reference = scheduler.step(coef_a * eps_a + coef_b * eps_b, t, x_t, eta=0.0).prev_sample
        worst = max(worst, (ours - reference).abs().max().item())
        one_term = guided_ddim_step(x_t, eps_a, None, 1.0, 0.0, scheduler.alphas_cumprod[t], alpha_prev)
        assert torch.allclose(one_term, scheduler.step(eps_a, t, x_t, eta=0.0).prev_sample, atol=1e-5)
        x_t = reference
    assert worst < 1e-5


def test_step_keeps_dtype_and_validates():
    x = torch.randn(2, 4, 4, 4, dtype=torch.bfloat16)
    out = guided_ddim_step(x, x, None, 1.0, 0.0, 0.5, 0.6)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    with pytest.raises(ValueError, match="one shape"):
        guided_ddim_step(x, x[:1], None, 1.0, 0.0, 0.5, 0.6)
    with pytest.raises(ValueError, match="impl"):
        guided_ddim_step(x, x, None, 1.0, 0.0, 0.5, 0.6, impl="triton")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        guided_ddim_step(x, x, None, 1.0, 0.0, 0.5, 0.6, impl="cuda")


@pytest.mark.gpu
def test_cuda_dispatch_matches_reference():
    """On CUDA, impl='auto' (the kernel when it loads) agrees with the torch reference."""
    generator = torch.Generator().manual_seed(2)
    x_t, eps_a, eps_b = (torch.randn(4, 4, 64, 64, generator=generator).cuda() for _ in range(3))
    for dtype, atol in ((torch.float32, 1e-5), (torch.float16, 2e-2)):
        args = (x_t.to(dtype), eps_a.to(dtype), eps_b.to(dtype), 3.0, -2.02, 0.3, 0.4)
        auto = guided_ddim_step(*args, impl="auto")
        reference = guided_ddim_step(*args, impl="reference")
        assert auto.dtype == dtype
        assert (auto.float() - reference.float()).abs().max().item() < atol
