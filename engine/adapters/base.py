"""What every adapter type shares: the `Adapter` contract, the conventions a file format leaves
implicit, and the two pieces of algebra several types reuse (DoRA's weight decomposition and the
Tucker rebuild)."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar

import torch

# torch.finfo(torch.float32).eps: LyCORIS adds it to DoRA's weight norm, PEFT adds nothing
FLOAT32_EPS = float(torch.finfo(torch.float32).eps)


class AdapterError(ValueError):
    """One module's adapter tensors cannot be read (a factor missing, shapes that do not combine)."""


@dataclass(frozen=True)
class Conventions:
    """What a file leaves implicit and its format (producer) defines.

    Attributes:
        dora_eps: added to the weight norm in DoRA's decomposition: `FLOAT32_EPS` for LyCORIS /
            kohya files (`dora_scale`), 0 for PEFT / diffusers files (`lora_magnitude_vector`).
        dora_on_output: the norm's axis: None reads it from the magnitude's shape (LyCORIS: (out, 1,
            ...) per output row, (1, in, ...) per input column); True always per output row (PEFT,
            whose Conv2d magnitude is shaped (1, out, 1, 1)).
        oft_cayley_neumann: OFTv2 (PEFT `oft_R`): build the rotation with PEFT's truncated Neumann
            series (True, PEFT's default) or with the exact Cayley transform (False).
        oft_neumann_terms: the series' number of terms (PEFT's `num_cayley_neumann_terms`, default 5).
        oft_coft: OFTv2 with PEFT's constrained OFT (`coft=True`): project each block first.
        oft_coft_eps: the projection's radius (PEFT's `eps`).
    """

    dora_eps: float = FLOAT32_EPS
    dora_on_output: bool | None = None
    oft_cayley_neumann: bool = True
    oft_neumann_terms: int = 5
    oft_coft: bool = False
    oft_coft_eps: float = 6e-5


class Adapter(abc.ABC):
    """One module's adapter, as a file stores it; subclasses hold the tensors (float32, CPU).

    Class attributes:
        type: the name used in counts, logs and errors ("lora", "loha", "lokr", "oft", "boft",
            "oftv2", "glora", "diff", "norm").
        detect: tensor suffixes whose presence selects this type.
        suffixes: every suffix the type reads (anything else in the module is an unknown suffix).
        uses_alpha: whether a missing `alpha` means alpha = rank (recorded as assumed).
        targets: "weight" types adapt Linear / Conv2d modules; "norm" adapts GroupNorm / LayerNorm.
    """

    type: ClassVar[str] = ""
    detect: ClassVar[frozenset[str]] = frozenset()
    suffixes: ClassVar[frozenset[str]] = frozenset()
    uses_alpha: ClassVar[bool] = False
    targets: ClassVar[str] = "weight"

    @classmethod
    def claims(cls, tensors: dict[str, torch.Tensor]) -> bool:
        """Whether a module's tensors (suffix -> tensor) are of this type."""
        return any(suffix in tensors for suffix in cls.detect)

    @classmethod
    @abc.abstractmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], conventions: Conventions) -> Adapter:
        """Build the adapter from its tensors (suffix -> tensor). Raises AdapterError."""

    @abc.abstractmethod
    def check(self, weight_shape: tuple[int, ...]) -> str | None:
        """None when the adapter fits a weight of `weight_shape`, else what does not fit (in words)."""

    @abc.abstractmethod
    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The adapted weight, float32, shaped like `weight` (the module's own weight, any dtype)."""

    def merged_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        """The adapted bias (float32), or `bias` itself when the type leaves it alone."""
        return bias

    def low_rank(self):
        """A `LoRALayer` computing exactly this adapter's delta, for the per-sample branch; None
        when the adapter is not a low-rank delta (merged into a fine-tuned copy instead)."""
        return None


def required(tensors: dict[str, torch.Tensor], *names: str) -> list[torch.Tensor]:
    """The named tensors as float32; AdapterError naming the first one missing."""
    missing = [name for name in names if name not in tensors]
    if missing:
        raise AdapterError(f"missing {missing[0]!r} (the module has {sorted(tensors)})")
    return [tensors[name].float() for name in names]


def optional(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor | None:
    return tensors[name].float() if name in tensors else None


def alpha_of(tensors: dict[str, torch.Tensor], rank: int) -> float:
    """The module's alpha; a missing or zero alpha means alpha = rank (LyCORIS' and kohya's rule)."""
    alpha = float(tensors["alpha"].item()) if "alpha" in tensors else 0.0
    return alpha if alpha else float(rank)


def tucker(core: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Rebuild a Tucker-factored weight: W[p, q, ...] = sum_ij core[i, j, ...] up[i, p] down[j, q].

    Args:
        core: (r_up, r_down, kh, kw), the spatial core.
        up: (r_up, out); down: (r_down, in) (LyCORIS' `*_t` layouts for LoHa and LoKr).

    Returns:
        (out, in, kh, kw).
    """
    return torch.einsum("ij...,ip,jq->pq...", core, up, down)


def weight_decompose(
    weight: torch.Tensor, magnitude: torch.Tensor, eps: float, on_output: bool | None = None
) -> torch.Tensor:
    """DoRA (Liu et al. 2024, Eq. 5): W' = m * W / ||W||, on an already adapted weight W = W0 + dW.

    The norm runs over each output row (kohya / LyCORIS `dora_scale` (out, 1, ...); PEFT
    `lora_magnitude_vector` (out,), or (1, out, 1, 1) for a Conv2d), or over each input column
    (LyCORIS `wd_on_out=False`: `dora_scale` (1, in, ...)).

    Args:
        weight: (out, in, ...) float32.
        magnitude: m.
        eps: added to the norm (`Conventions.dora_eps`).
        on_output: True for output rows; None decides from `magnitude`'s shape (LyCORIS' rule:
            output rows when its first dimension is the output count).

    Raises:
        AdapterError: `magnitude` has neither one entry per output row nor per input column.
    """
    out_channels, in_channels = weight.shape[0], weight.shape[1]
    ones = [1] * (weight.dim() - 1)
    if on_output is None:
        on_output = magnitude.shape[0] == out_channels and magnitude.numel() == out_channels
    if on_output and magnitude.numel() == out_channels:
        norm = weight.reshape(out_channels, -1).norm(dim=1).reshape(out_channels, *ones)
    elif not on_output and magnitude.numel() == in_channels:
        norm = weight.transpose(0, 1).reshape(in_channels, -1).norm(dim=1).reshape(1, in_channels, *ones[1:])
    else:
        raise AdapterError(
            f"DoRA magnitude of shape {tuple(magnitude.shape)} fits neither the {out_channels} output rows nor the "
            f"{in_channels} input columns of the weight {tuple(weight.shape)}"
        )
    return weight * (magnitude.reshape(norm.shape) / (norm + eps))


def shape_text(shape) -> str:
    return "x".join(str(int(n)) for n in shape)
