"""LoKr (Yeh et al. 2023, LyCORIS): dW = scale * kron(w1, w2), each factor stored whole or as a
low-rank product, the larger one optionally with a Tucker core.

LyCORIS layouts: `lokr_w1` (a, c) or `lokr_w1_a` (a, r) @ `lokr_w1_b` (r, c); `lokr_w2` (b, d) or
(b, d, kh, kw), or `lokr_w2_a` (b, r) @ `lokr_w2_b` (r, d * kh * kw), or with `lokr_t2`
(r, r, kh, kw): `lokr_w2_a` (r, b), `lokr_w2_b` (r, d). out = a * b, in * kh * kw = c * d * kh * kw.
Scale: alpha / r with r the rank of the decomposed factor (`*_b`'s first dimension); 1 when both
factors are whole (LyCORIS then ignores alpha; so does ComfyUI). Applied once, as LyCORIS' module
forward does (its 4.1 `merge_to` applies it twice when alpha != rank).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Adapter, AdapterError, Conventions, optional, shape_text, tucker, weight_decompose


@dataclass
class LoKr(Adapter):
    """A Kronecker-product adapter: `w1`, `w2` rebuilt factors (float32), `scale`, optional DoRA."""

    type: ClassVar[str] = "lokr"
    detect: ClassVar[frozenset[str]] = frozenset({"lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a"})
    suffixes: ClassVar[frozenset[str]] = frozenset(
        {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha", "dora_scale"}
    )
    uses_alpha: ClassVar[bool] = True

    w1: torch.Tensor
    w2: torch.Tensor
    scale: float
    magnitude: torch.Tensor | None = None
    dora_eps: float = 0.0
    dora_on_output: bool | None = None

    @classmethod
    def from_tensors(cls, tensors, conventions: Conventions) -> LoKr:
        rank = None
        if "lokr_w1" in tensors:
            w1 = tensors["lokr_w1"].float()
        elif "lokr_w1_a" in tensors and "lokr_w1_b" in tensors:
            w1 = tensors["lokr_w1_a"].float() @ tensors["lokr_w1_b"].float()
            rank = tensors["lokr_w1_b"].shape[0]
        else:
            raise AdapterError("LoKr needs lokr_w1 or both lokr_w1_a and lokr_w1_b")
        if "lokr_w2" in tensors:
            w2 = tensors["lokr_w2"].float()
        elif "lokr_w2_a" in tensors and "lokr_w2_b" in tensors:
            w2_a, w2_b = tensors["lokr_w2_a"].float(), tensors["lokr_w2_b"].float()
            rank = w2_b.shape[0]
            core = optional(tensors, "lokr_t2")
            w2 = tucker(core, w2_a, w2_b.flatten(1)) if core is not None else w2_a @ w2_b.flatten(1)
        else:
            raise AdapterError("LoKr needs lokr_w2 or both lokr_w2_a and lokr_w2_b")
        if rank is None:
            scale = 1.0
        else:
            alpha = float(tensors["alpha"].item()) if "alpha" in tensors else 0.0
            scale = (alpha or rank) / rank
        return cls(
            w1=w1,
            w2=w2,
            scale=scale,
            magnitude=optional(tensors, "dora_scale"),
            dora_eps=conventions.dora_eps,
            dora_on_output=conventions.dora_on_output,
        )

    def _shape(self) -> tuple[int, int]:
        return self.w1.shape[0] * self.w2.shape[0], self.w1.flatten(1).shape[1] * self.w2.flatten(1).shape[1]

    def check(self, weight_shape) -> str | None:
        if self.w1.dim() != 2:
            return f"lokr_w1 must be a matrix, got {shape_text(self.w1.shape)}"
        if self._shape() != (weight_shape[0], int(torch.Size(weight_shape[1:]).numel())):
            return f"kron(w1 {shape_text(self.w1.shape)}, w2 {shape_text(self.w2.shape)}) does not fit a weight {shape_text(weight_shape)}"
        return None

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        # kron of w1 (a, c) with w2 flattened to (b, d*kh*kw) is (a*b, c*d*kh*kw): exactly the weight
        # (out, in, kh, kw) flattened, since in-index c_i * d + d_i and the window stay in order
        delta = torch.kron(self.w1, self.w2.flatten(1)).reshape(weight.shape)
        merged = weight.float() + self.scale * delta
        if self.magnitude is not None:
            merged = weight_decompose(merged, self.magnitude, self.dora_eps, self.dora_on_output)
        return merged
