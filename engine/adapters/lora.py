"""LoRA and LoCon (Hu et al. 2021): dW = (alpha / rank) * up @ down, with an optional Tucker core
(LyCORIS `lora_mid`) and optional DoRA magnitudes.

Spellings read (the reader maps PEFT / diffusers names onto kohya's before building):
- kohya / LyCORIS: `lora_down.weight`, `lora_up.weight`, `lora_mid.weight`, `alpha`, `dora_scale`;
- PEFT / diffusers: `lora_A.weight` (down), `lora_B.weight` (up), `lora_magnitude_vector` (DoRA),
  alpha from the adapter config (rsLoRA's alpha / sqrt(rank) folded into alpha by the reader);
- cloneofsimo: `up` / `down`, scale 1 (the file's `up` already holds the scale).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..pair import LoRALayer
from .base import Adapter, Conventions, alpha_of, optional, required, shape_text, weight_decompose


@dataclass
class LoRA(Adapter):
    """A (possibly Tucker-factored, possibly DoRA) low-rank adapter.

    Attributes:
        down: (rank, in) for a Linear, (rank, in, kh, kw) for a Conv2d; with `mid`, (rank, in, 1, 1).
        up: (out, rank) or (out, rank, 1, 1).
        alpha: scale = alpha / rank.
        mid: LyCORIS' Tucker core (rank, rank, kh, kw) between `down` and `up` (a 1x1 conv, the
            kh x kw core with the module's stride and padding, a 1x1 conv), or None.
        magnitude: DoRA's magnitude vector (see `base.weight_decompose`), or None.
        dora_eps: added to DoRA's norm (`Conventions.dora_eps`).
    """

    type: ClassVar[str] = "lora"
    detect: ClassVar[frozenset[str]] = frozenset({"lora_up.weight", "lora_down.weight"})
    suffixes: ClassVar[frozenset[str]] = frozenset(
        {"lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha", "dora_scale"}
    )
    uses_alpha: ClassVar[bool] = True

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    mid: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None
    dora_eps: float = 0.0
    dora_on_output: bool | None = None

    @classmethod
    def from_tensors(cls, tensors, conventions: Conventions) -> LoRA:
        down, up = required(tensors, "lora_down.weight", "lora_up.weight")
        return cls(
            down=down,
            up=up,
            alpha=alpha_of(tensors, down.shape[0]),
            mid=optional(tensors, "lora_mid.weight"),
            magnitude=optional(tensors, "dora_scale"),
            dora_eps=conventions.dora_eps,
            dora_on_output=conventions.dora_on_output,
        )

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def effective_down(self) -> torch.Tensor:
        """`down` with the Tucker core folded in: (rank, in, kh, kw). A 1x1 conv followed by the core's
        kh x kw conv is one kh x kw conv whose kernel is their product (the 1x1 conv is pointwise)."""
        if self.mid is None:
            return self.down
        return torch.einsum("ij...,jc->ic...", self.mid, self.down.flatten(1))

    def check(self, weight_shape) -> str | None:
        down = self.effective_down()
        out_features, in_features = weight_shape[0], int(torch.Size(weight_shape[1:]).numel())
        if self.up.shape[0] != out_features or self.up.flatten(1).shape[1] != self.rank:
            return f"up {shape_text(self.up.shape)} for a weight {shape_text(weight_shape)}"
        if down.flatten(1).shape[1] != in_features or (
            down.dim() > 2 and tuple(down.shape[1:]) != tuple(weight_shape[1:])
        ):
            return f"down {shape_text(self.down.shape)} for a weight {shape_text(weight_shape)}"
        return None

    def delta(self, weight_shape) -> torch.Tensor:
        """dW = (alpha / rank) * up @ down, float32, shaped `weight_shape`."""
        return (self.alpha / self.rank) * (self.up.flatten(1) @ self.effective_down().flatten(1)).reshape(weight_shape)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        merged = weight.float() + self.delta(weight.shape)
        if self.magnitude is not None:
            merged = weight_decompose(merged, self.magnitude, self.dora_eps, self.dora_on_output)
        return merged

    def low_rank(self) -> LoRALayer | None:
        if self.magnitude is not None:  # DoRA renormalises the whole weight: not a low-rank delta
            return None
        return LoRALayer(down=self.effective_down().contiguous(), up=self.up.contiguous(), alpha=float(self.alpha))
