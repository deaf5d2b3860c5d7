"""Full-weight differences (LyCORIS "full" and norm training): W' = W + diff, b' = b + diff_b;
for normalisation layers W' = W + w_norm, b' = b + b_norm. No scale: the file holds the change itself."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Adapter, Conventions, optional, required, shape_text


@dataclass
class Diff(Adapter):
    """`diff` shaped like the weight; `diff_b` (out,) added to the bias (a module without one gets it)."""

    type: ClassVar[str] = "diff"
    detect: ClassVar[frozenset[str]] = frozenset({"diff"})
    suffixes: ClassVar[frozenset[str]] = frozenset({"diff", "diff_b"})
    weight_key: ClassVar[str] = "diff"
    bias_key: ClassVar[str] = "diff_b"

    weight_delta: torch.Tensor
    bias_delta: torch.Tensor | None = None

    @classmethod
    def from_tensors(cls, tensors, conventions: Conventions) -> Diff:
        (weight_delta,) = required(tensors, cls.weight_key)
        return cls(weight_delta=weight_delta, bias_delta=optional(tensors, cls.bias_key))

    def check(self, weight_shape) -> str | None:
        if (
            self.weight_delta.numel() != torch.Size(weight_shape).numel()
            or self.weight_delta.shape[0] != weight_shape[0]
        ):
            return f"{self.weight_key} {shape_text(self.weight_delta.shape)} for a weight {shape_text(weight_shape)}"
        if self.bias_delta is not None and self.bias_delta.numel() != weight_shape[0]:
            return f"{self.bias_key} {shape_text(self.bias_delta.shape)} for {weight_shape[0]} outputs"
        return None

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.float() + self.weight_delta.reshape(weight.shape)

    def merged_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        if self.bias_delta is None:
            return bias
        base = torch.zeros(self.bias_delta.numel()) if bias is None else bias.float()
        return base + self.bias_delta.reshape(base.shape)


@dataclass
class NormDiff(Diff):
    """LyCORIS' trained normalisation layers (`train_norm`): `w_norm`, `b_norm` on GroupNorm / LayerNorm."""

    type: ClassVar[str] = "norm"
    detect: ClassVar[frozenset[str]] = frozenset({"w_norm"})
    suffixes: ClassVar[frozenset[str]] = frozenset({"w_norm", "b_norm"})
    targets: ClassVar[str] = "norm"
    weight_key: ClassVar[str] = "w_norm"
    bias_key: ClassVar[str] = "b_norm"
