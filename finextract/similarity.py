"""SSCD similarity matrix: cosine similarity of L2-normalised descriptors, on their device."""

from __future__ import annotations


def similarity_matrix(descriptors, *, zero_diagonal: bool = True):
    """Cosine similarity matrix of L2-normalised descriptors, as one matrix product.

    Args:
        descriptors: (N, D) float tensor or ndarray, rows L2-normalised (SSCD output). Stays on its
            device; fp16/bf16 inputs are promoted so the product accumulates in fp32.
        zero_diagonal: set S[i, i] = 0, as the released FineXtract code does before thresholding.

    Returns:
        (N, N) float32 tensor on the descriptors' device, values in [-1, 1] (diagonal 0).

    Raises:
        ValueError: `descriptors` is not 2-D or holds non-finite values.
    """
    import torch

    x = torch.as_tensor(descriptors)
    if x.ndim != 2:
        raise ValueError(f"descriptors must be (N, D); got shape {tuple(x.shape)}")
    x = x.float()
    if not torch.isfinite(x).all():
        raise ValueError("descriptors hold NaN/inf; drop degenerate images before computing similarities")
    s = x @ x.T
    if zero_diagonal:
        s.fill_diagonal_(0.0)
    return s
