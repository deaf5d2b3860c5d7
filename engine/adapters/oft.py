"""Orthogonal fine-tuning: the weight is rotated by block-diagonal orthogonal matrices R built from
skew-symmetric Q by the Cayley transform.

- OFT (Qiu et al. 2023; kohya-ss and LyCORIS "diag-oft"): `oft_blocks` (n, b, b) with n * b = out;
  Q = B - B^T, scaled down to Frobenius norm alpha * out when alpha > 0 (the "constraint");
  R = (I + Q)(I - Q)^-1; each block of b output rows becomes R^T W_k; `rescale` (out, 1, ...) scales
  the rows after the rotation.
- BOFT (Liu et al. 2024, LyCORIS "boft"): `oft_blocks` (m, n, b, b): m butterfly stages, stage i
  rotating pairs of rows 2^i * b / 2 apart (the butterfly permutation), each stage R W.
- OFTv2 (PEFT's `OFTConfig`, peft >= 0.17, "oft_R"): `oft_R.weight` (r, b(b-1)/2), each row the
  upper triangle of one block's Q; R from PEFT's truncated Neumann series
  I + 2Q + 2Q^2 + ... + 2Q^(n-2) + Q^(n-1) (or its exact `(I - Q)(I + Q)^-1`); the rotation acts on
  the input side, W' = W R^T over the flattened (in, kh, kw) axis, as PEFT's `merge` computes it;
  one row (r = 1) is one block shared by every group of b inputs (`oft_block_share`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Adapter, AdapterError, Conventions, optional, required, shape_text


def _constrained_skew(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """Q = B - B^T over the last two axes, scaled to Frobenius norm `constraint` (all blocks
    together) when it is larger and `constraint` > 0 (LyCORIS' 1e-8 guard included)."""
    q = blocks - blocks.transpose(-1, -2)
    if constraint > 0:
        norm = torch.linalg.matrix_norm(q.reshape(-1, q.shape[-1]), ord="fro") + 1e-8
        if norm > constraint:
            q = q * (constraint / norm)
    return q


def _cayley(q: torch.Tensor) -> torch.Tensor:
    """R = (I + Q)(I - Q)^-1 (LyCORIS / kohya), batched over the leading axes."""
    identity = torch.eye(q.shape[-1], dtype=q.dtype).expand_as(q)
    return torch.linalg.solve(identity - q, identity + q, left=False)


@dataclass
class OFT(Adapter):
    """Block-diagonal OFT: `blocks` (n, b, b), `alpha` the constraint, optional `rescale` (out, 1, ...)."""

    type: ClassVar[str] = "oft"
    detect: ClassVar[frozenset[str]] = frozenset({"oft_blocks"})
    suffixes: ClassVar[frozenset[str]] = frozenset({"oft_blocks", "rescale", "alpha"})

    blocks: torch.Tensor
    alpha: float
    rescale: torch.Tensor | None = None

    @classmethod
    def claims(cls, tensors) -> bool:
        return "oft_blocks" in tensors and tensors["oft_blocks"].dim() == 3

    @classmethod
    def from_tensors(cls, tensors, conventions: Conventions) -> OFT:
        (blocks,) = required(tensors, "oft_blocks")
        alpha = float(tensors["alpha"].item()) if "alpha" in tensors else 0.0
        return cls(blocks=blocks, alpha=alpha, rescale=optional(tensors, "rescale"))

    def check(self, weight_shape) -> str | None:
        rows = self.blocks.shape[-3] * self.blocks.shape[-1]
        if rows != weight_shape[0] or self.blocks.shape[-1] != self.blocks.shape[-2]:
            return f"oft_blocks {shape_text(self.blocks.shape)} do not cover the {weight_shape[0]} output rows"
        return None

    def rotations(self, out_features: int) -> torch.Tensor:
        return _cayley(_constrained_skew(self.blocks, self.alpha * out_features))

    def _rescaled(self, weight: torch.Tensor) -> torch.Tensor:
        return weight if self.rescale is None else weight * self.rescale.reshape(-1, *[1] * (weight.dim() - 1))

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        rotation = self.rotations(weight.shape[0])
        n, b = rotation.shape[0], rotation.shape[-1]
        rows = weight.float().reshape(n, b, *weight.shape[1:])
        rotated = torch.einsum("knm,kn...->km...", rotation, rows).reshape(weight.shape)
        return self._rescaled(rotated)


@dataclass
class BOFT(OFT):
    """Butterfly OFT: `blocks` (m, n, b, b), m stages of n blocks of size b (b even)."""

    type: ClassVar[str] = "boft"

    @classmethod
    def claims(cls, tensors) -> bool:
        return "oft_blocks" in tensors and tensors["oft_blocks"].dim() == 4

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        rotation = self.rotations(weight.shape[0])  # (m, n, b, b)
        b = rotation.shape[-1]
        rows = weight.float()
        for stage in range(rotation.shape[0]):
            stride = 2**stage * (b // 2)
            # the butterfly permutation: rows `stride` apart become neighbours, b at a time ...
            grouped = rows.unflatten(0, (-1, 2, stride)).transpose(1, 2).flatten(0, 2).unflatten(0, (-1, b))
            grouped = torch.einsum("kij,kj...->ki...", rotation[stage], grouped)
            # ... rotated, and put back in place
            rows = grouped.flatten(0, 1).unflatten(0, (-1, stride, 2)).transpose(1, 2).flatten(0, 2)
        return self._rescaled(rows)


@dataclass
class OFTv2(Adapter):
    """PEFT OFT: `vectors` (r, b(b-1)/2), the Neumann / Cayley and COFT settings of `Conventions`."""

    type: ClassVar[str] = "oftv2"
    detect: ClassVar[frozenset[str]] = frozenset({"oft_R.weight"})
    suffixes: ClassVar[frozenset[str]] = frozenset({"oft_R.weight"})

    vectors: torch.Tensor
    conventions: Conventions

    @classmethod
    def from_tensors(cls, tensors, conventions: Conventions) -> OFTv2:
        (vectors,) = required(tensors, "oft_R.weight")
        if vectors.dim() != 2:
            raise AdapterError(f"oft_R.weight must be (blocks, b(b-1)/2), got {shape_text(vectors.shape)}")
        return cls(vectors=vectors, conventions=conventions)

    @property
    def block_size(self) -> int:
        n_elements = self.vectors.shape[1]
        size = (1 + math.isqrt(1 + 8 * n_elements)) // 2
        if size * (size - 1) // 2 != n_elements:
            raise AdapterError(f"oft_R.weight has {n_elements} entries per block: not b(b-1)/2 for any block size b")
        return size

    def check(self, weight_shape) -> str | None:
        inputs, size, blocks = int(torch.Size(weight_shape[1:]).numel()), self.block_size, self.vectors.shape[0]
        if blocks * size == inputs or (blocks == 1 and inputs % size == 0):
            return None
        return f"oft_R {shape_text(self.vectors.shape)} (block size {size}) does not cover {inputs} inputs"

    def rotations(self) -> torch.Tensor:
        """The (r, b, b) rotations, as PEFT's `OFTRotationModule.get_weight` builds them."""
        size, conventions = self.block_size, self.conventions
        rows, cols = torch.triu_indices(size, size, 1)
        skew = torch.zeros(self.vectors.shape[0], size, size)
        skew[:, rows, cols] = self.vectors
        q = skew - skew.transpose(-1, -2)
        if conventions.oft_coft:  # PEFT's projection onto a ball of radius eps / sqrt(r) around 0
            radius = conventions.oft_coft_eps / math.sqrt(q.shape[0])
            norm = torch.linalg.matrix_norm(q, ord="fro", keepdim=True)
            q = torch.where(norm <= radius, q, radius * q / norm)
        identity = torch.eye(size).expand_as(q)
        if not conventions.oft_cayley_neumann:
            return torch.linalg.solve(identity + q, identity - q, left=False)
        # PEFT's `_cayley_batch` term by term: I + 2Q (2 terms); then + 2Q^2, + 2Q^j for j < terms - 1,
        # and the last power with coefficient 1 (so 3 terms end like 4: I + 2Q + 2Q^2 + Q^3)
        terms = conventions.oft_neumann_terms
        rotation = identity.clone()
        if terms > 1:
            rotation = rotation + 2 * q
        if terms > 2:
            power = q @ q
            rotation = rotation + 2 * power
            for _ in range(3, terms - 1):
                power = power @ q
                rotation = rotation + 2 * power
            rotation = rotation + power @ q
        return rotation

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        rotation = self.rotations()
        size = rotation.shape[-1]
        flat = weight.float().reshape(weight.shape[0], -1, size)  # (out, blocks, b) over (in, kh, kw)
        rotation = rotation.expand(flat.shape[1], size, size)
        return torch.einsum("ork,rck->orc", flat, rotation).reshape(weight.shape)
