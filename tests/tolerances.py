"""Tolerances derived from float32 arithmetic, shared by the numeric tests (imported as `tolerances`).

Two computations of the same function in float32 that differ only in the order of operations (another
batch size, another backend, fused or separate calls, a thread count) are compared with the standard
rounding-error model: every float32 operation is exact up to a relative error of at most
u = 2^-24 (round to nearest). Two bounds follow:

- `elementwise`: a formula of n multiplications and additions per element (a DDIM update) computed in
  two orders differs by at most n * u * (the sum of the magnitudes of its terms).
- `network`: a network of L matrix products (Linear / Conv2d), each a sum of at most K products,
  computed with another blocking: each product's result is within gamma_K = K * u (Higham, Accuracy
  and Stability of Numerical Algorithms, Thm. 3.1, for summation in any order) relative to the
  magnitude of its terms, and to first order these relative errors add along the network, so the
  output differs by at most L * K * u * (the output's magnitude). Activations and normalisations
  are at most about 1-Lipschitz at these scales and keep the bound to first order.

Both are worst-case bounds: real differences are far smaller (~sqrt(K) u per product), so the tests
pass on every machine and thread count, and they are still far below what a real bug changes (a
wrong table row, a wrong step weight, a swapped coefficient: `tests/test_tolerances.py` proves it).
"""

from __future__ import annotations

import torch
from torch import nn

#: float32 unit roundoff (round to nearest): the relative error bound of one operation.
U = 2.0**-24


def elementwise(*terms: torch.Tensor, operations: int) -> torch.Tensor:
    """Per-element bound for a float32 formula of `operations` roundings over `terms` (its summands)."""
    magnitude = sum(term.detach().double().abs() for term in terms)
    return operations * U * magnitude


def network_size(module: nn.Module) -> tuple[int, int]:
    """(L, K): the number of matrix products (Linear / Conv2d layers) and the longest inner sum."""
    layers, longest = 0, 1
    for child in module.modules():
        if isinstance(child, nn.Linear):
            layers, longest = layers + 1, max(longest, child.in_features)
        elif isinstance(child, nn.Conv2d):
            kernel = child.kernel_size[0] * child.kernel_size[1]
            layers, longest = layers + 1, max(longest, child.in_channels // child.groups * kernel)
    return layers, longest


def network(module: nn.Module, reference: torch.Tensor) -> float:
    """Bound on |a - b| for two float32 evaluations of `module` (output `reference`) in other orders."""
    layers, longest = network_size(module)
    return layers * longest * U * reference.detach().abs().max().item()


def assert_same_images(a: torch.Tensor, b: torch.Tensor) -> None:
    """Two uint8 renderings of latents that agree within float32 rounding: at most 1 level apart.

    The latents agree to ~1e-5 (far below `network`'s bound), so a decoded pixel can only round to the
    other side of a .5 boundary when it lies within ~1e-3 levels of it: rare (< 1% of pixels), and never
    more than 1 level.
    """
    assert a.shape == b.shape and a.dtype == b.dtype == torch.uint8
    difference = (a.int() - b.int()).abs()
    assert difference.max().item() <= 1
    assert (difference > 0).float().mean().item() < 0.01
