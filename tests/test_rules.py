"""Guidance rules as data: the paper's Eq. 6, Eq. 13, CFG and Direct, with their defaults."""

from __future__ import annotations

import pytest
import torch

from finextract.rules import GuidanceRule, Term, rule_for, rule_params


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
