"""LoHa (Hyeon-Woo et al. 2022, FedPara): dW = (alpha / rank) * (w1_a @ w1_b) * (w2_a @ w2_b), the
product elementwise, so two rank-r factors give a weight of rank up to r^2.

LyCORIS layouts: `hada_w1_a` (out, r), `hada_w1_b` (r, in * kh * kw), the same for `w2`; with a
Tucker core (`hada_t1` / `hada_t2`, (r, r, kh, kw)) `hada_w1_a` is (r, out) and `hada_w1_b` (r, in).
The scale alpha / rank is applied once, as LyCORIS' module forward (the one training ran) and
ComfyUI do; LyCORIS 4.1's `merge_to` applies it twice when alpha != rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Adapter, AdapterError, Conventions, alpha_of, optional, required, shape_text, tucker, weight_decompose


@dataclass
class LoHa(Adapter):
    """A Hadamard-product adapter (tensors as `hada_*`, float32); `magnitude` is LyCORIS' DoRA `dora_scale`."""

    type: ClassVar[str] = "loha"
    detect: ClassVar[frozenset[str]] = frozenset({"hada_w1_a", "hada_w1_b"})
    suffixes: ClassVar[frozenset[str]] = frozenset(
        {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha", "dora_scale"}
    )
    uses_alpha: ClassVar[bool] = True

    w1_a: torch.Tensor
    w1_b: torch.Tensor
    w2_a: torch.Tensor
    w2_b: torch.Tensor
    alpha: float
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None
    dora_eps: float = 0.0
    dora_on_output: bool | None = None

    @classmethod
    def from_tensors(cls, tensors, conventions: Conventions) -> LoHa:
        w1_a, w1_b, w2_a, w2_b = required(tensors, "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        t1, t2 = optional(tensors, "hada_t1"), optional(tensors, "hada_t2")
        if (t1 is None) != (t2 is None):
            raise AdapterError("a Tucker LoHa needs both hada_t1 and hada_t2")
        return cls(
            w1_a, w1_b, w2_a, w2_b, alpha_of(tensors, w1_b.shape[0]), t1, t2, optional(tensors, "dora_scale"),
            conventions.dora_eps, conventions.dora_on_output,
        )  # fmt: skip

    @property
    def rank(self) -> int:
        return int(self.w1_b.shape[0])

    def _halves(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.t1 is not None:
            return tucker(self.t1, self.w1_a, self.w1_b), tucker(self.t2, self.w2_a, self.w2_b)
        return self.w1_a @ self.w1_b, self.w2_a @ self.w2_b

    def check(self, weight_shape) -> str | None:
        if self.t1 is not None:
            shape = (self.w1_a.shape[1], self.w1_b.shape[1], *self.t1.shape[2:])
            fits = tuple(shape) == tuple(weight_shape)
        else:
            shape = (self.w1_a.shape[0], self.w1_b.shape[1])
            fits = shape == (weight_shape[0], int(torch.Size(weight_shape[1:]).numel()))
        return None if fits else f"LoHa factors rebuild {shape_text(shape)}, the weight is {shape_text(weight_shape)}"

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        first, second = self._halves()
        merged = weight.float() + (self.alpha / self.rank) * (first * second).reshape(weight.shape)
        if self.magnitude is not None:
            merged = weight_decompose(merged, self.magnitude, self.dora_eps, self.dora_on_output)
        return merged
