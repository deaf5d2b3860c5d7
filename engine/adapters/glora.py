"""GLoRA (Chavan et al. 2023, LyCORIS "glora"): dW = (alpha / rank) * (W a1 a2 + b1 b2), a low-rank
update that also scales the pretrained weight W through the rank-r product a1 a2.

LyCORIS layouts (each as the weight of a Linear or 1x1 Conv2d, hence the `.weight` suffixes):
`a1.weight` (in, r), `a2.weight` (r, in), `b1.weight` (out, r), `b2.weight` (r, in) or
(r, in, kh, kw); with a Tucker core `bm.weight` (r, r, kh, kw) `b2` is (r, in, 1, 1).
rank = `a2`'s first dimension.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Adapter, Conventions, alpha_of, optional, required, shape_text


@dataclass
class GLoRA(Adapter):
    type: ClassVar[str] = "glora"
    detect: ClassVar[frozenset[str]] = frozenset({"a1.weight", "a2.weight"})
    suffixes: ClassVar[frozenset[str]] = frozenset(
        {"a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight", "alpha"}
    )
    uses_alpha: ClassVar[bool] = True

    a1: torch.Tensor
    a2: torch.Tensor
    b1: torch.Tensor
    b2: torch.Tensor
    alpha: float
    bm: torch.Tensor | None = None

    @classmethod
    def from_tensors(cls, tensors, conventions: Conventions) -> GLoRA:
        a1, a2, b1, b2 = required(tensors, "a1.weight", "a2.weight", "b1.weight", "b2.weight")
        return cls(a1, a2, b1, b2, alpha_of(tensors, a2.shape[0]), optional(tensors, "bm.weight"))

    def _b(self, weight_shape) -> torch.Tensor:
        b1 = self.b1.flatten(1)
        if self.bm is not None:
            return torch.einsum("ij...,pi,jq->pq...", self.bm, b1, self.b2.flatten(1))
        return (b1 @ self.b2.flatten(1)).reshape(weight_shape)

    def check(self, weight_shape) -> str | None:
        out_features, in_features = weight_shape[0], weight_shape[1]
        a1, a2 = self.a1.flatten(1), self.a2.flatten(1)
        if a1.shape != (in_features, a2.shape[0]) or a2.shape != (a2.shape[0], in_features):
            return f"a1 {shape_text(self.a1.shape)} / a2 {shape_text(self.a2.shape)} for a weight {shape_text(weight_shape)}"
        b_numel = self.b1.shape[0] * (
            self.bm.shape[2:].numel() * self.b2.shape[1] if self.bm is not None else self.b2.flatten(1).shape[1]
        )
        if self.b1.shape[0] != out_features or b_numel != torch.Size(weight_shape).numel():
            return f"b1 {shape_text(self.b1.shape)} / b2 {shape_text(self.b2.shape)} for a weight {shape_text(weight_shape)}"
        return None

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        weight = weight.float()
        a = self.a1.flatten(1) @ self.a2.flatten(1)  # (in, in)
        scaled = torch.einsum("oi...,ij->oj...", weight, a)
        return weight + (self.alpha / self.a2.shape[0]) * (scaled + self._b(weight.shape).reshape(weight.shape))
