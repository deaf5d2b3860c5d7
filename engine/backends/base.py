"""The one question a backend answers per denoising step.

A backend is built once per run for a model pair, a guidance rule and the run's text embeddings
(encoded once), and then called once per step on a whole batch:

    prediction = backend.predict(x_t, t)        # one fused call for both noise predictions
    x_prev = guided_ddim_step(x_t, prediction.eps_a, prediction.eps_b,
                              prediction.coef_a, prediction.coef_b, alpha_prod_t, alpha_prod_t_prev)

Backends that evaluate both UNets and combine them inside one compiled graph return the combined
`eps` as `eps_a` with `coef_a = 1`, `eps_b = None`, `coef_b = 0`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Prediction:
    """`eps = coef_a * eps_a + coef_b * eps_b` (eps_b None means coef_b * eps_b = 0).

    eps_a, eps_b: (B, C, h, w) on the device and in the dtype of `x_t`.
    """

    eps_a: torch.Tensor
    eps_b: torch.Tensor | None
    coef_a: float
    coef_b: float


class Backend(Protocol):
    """Evaluates a guidance rule's UNet terms for a batch of latents in one fused call."""

    name: str

    def predict(self, x_t: torch.Tensor, t: torch.Tensor) -> Prediction:
        """Noise predictions for `x_t` (B, C, h, w) at timestep `t` (0-dim int64 tensor)."""
        ...
