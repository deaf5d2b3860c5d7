"""AS and A-ESR (Eq. 1, 2) on hand-computed examples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from finextract.metrics import extraction_metrics
from finextract.similarity import similarity_matrix


def _unit(angle_deg):
    a = np.deg2rad(angle_deg)
    return [np.cos(a), np.sin(a)]


def test_hand_computed():
    # Training images at 0 and 90 degrees; extracted at 30 and 180 degrees (2-D unit vectors).
    # Best matches: train 0 -> extracted 0 (cos 30 = 0.8660); train 1 -> extracted 0 (cos 60 = 0.5).
    train = np.array([_unit(0), _unit(90)], dtype=np.float32)
    extracted = np.array([_unit(30), _unit(180)], dtype=np.float32)
    m = extraction_metrics(train, extracted)
    assert m["AS"] == pytest.approx((np.cos(np.pi / 6) + 0.5) / 2, abs=1e-6)
    assert m["A-ESR0.6"] == 0.5 and m["A-ESR0.7"] == 0.5
    assert [b["extracted"] for b in m["best_match"]] == [0, 0]
    assert [b["train"] for b in m["extracted_best_match"]] == [0, 1]  # 180 deg: cos(-1) vs cos(90)=0
    assert m["best_match"][1]["similarity"] == pytest.approx(0.5, abs=1e-6)


def test_permuted_matches_and_loose_vs_strict():
    train = torch.eye(3)
    m = extraction_metrics(train, torch.eye(3)[[2, 0, 1]])
    assert m["AS"] == pytest.approx(1.0) and m["A-ESR0.7"] == 1.0
    assert [b["extracted"] for b in m["best_match"]] == [1, 2, 0]
    # similarity 0.65 counts for the loose threshold only
    x = torch.tensor([[0.65, (1 - 0.65**2) ** 0.5]])
    m = extraction_metrics(torch.tensor([[1.0, 0.0]]), x)
    assert (m["A-ESR0.6"], m["A-ESR0.7"]) == (1.0, 0.0)


def test_mismatched_sizes():
    with pytest.raises(ValueError, match="same SSCD model"):
        extraction_metrics(np.ones((2, 3)), np.ones((2, 4)))


def test_similarity_matrix_zero_diagonal_and_cosine():
    x = torch.nn.functional.normalize(torch.randn(5, 8, dtype=torch.float16), dim=1)
    s = similarity_matrix(x)
    assert s.dtype == torch.float32 and torch.all(s.diagonal() == 0)
    assert torch.allclose(s[0, 1], (x[0].float() * x[1].float()).sum(), atol=1e-6)
    assert torch.allclose(s, s.T)
