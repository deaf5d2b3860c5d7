"""SSCD similarity: descriptor checks and the cosine similarity matrix, on the descriptors' device."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

#: rows whose L2 norm is further than this from 1 are renormalised (with a warning). bf16 rounding moves
#: a unit vector's norm by at most 2^-8 relative (fp16: 2^-11), well inside; an unnormalised SSCD
#: descriptor (norms of order 10) is far outside.
NORM_TOLERANCE = 1e-2


def unit_descriptors(descriptors, *, name: str = "descriptors"):
    """Check SSCD descriptors and return them as float32 rows of unit L2 norm, on their device.

    fp16/bf16 inputs are promoted to float32 (so products accumulate in float32); float64 inputs are
    converted to float32 with a warning (the similarities are compared in float32); rows whose norm
    is off 1 by more than `NORM_TOLERANCE` are L2-normalised, with a warning (cosine similarity is
    meant). Rows already of unit norm are left bit for bit as they are.

    Args:
        descriptors: (N, D) float tensor or ndarray.
        name: what to call the input in messages.

    Returns:
        (N, D) float32 torch tensor on the input's device (CPU for ndarrays).

    Raises:
        ValueError: not 2-D, no rows, non-finite values, or an all-zero row (its cosine is undefined).
    """
    import torch  # heavy: torch, only for torch tensors; clustering is torch-free

    x = torch.as_tensor(descriptors)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (N, D) matrix; got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floating point (SSCD descriptors); got {x.dtype}")
    if x.dtype == torch.float64:
        logger.warning("%s are float64; clustering compares float32 similarities, converting", name)
    x = x.float()
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} hold NaN/inf; drop degenerate images before computing similarities")
    norms = torch.linalg.vector_norm(x, dim=1)
    if bool((norms == 0).any()):
        raise ValueError(f"{name} have {int((norms == 0).sum())} all-zero row(s); drop those images first")
    off = (norms - 1).abs() > NORM_TOLERANCE
    if bool(off.any()):
        logger.warning(
            "%d of %d %s rows are not L2-normalised (norms %.3g to %.3g); normalising them",
            int(off.sum()),
            len(x),
            name,
            float(norms.min()),
            float(norms.max()),
        )
        x = torch.where(off[:, None], x / norms[:, None], x)
    return x


def similarity_matrix(descriptors, *, zero_diagonal: bool = True):
    """Cosine similarity matrix of SSCD descriptors, as one matrix product (N^2 floats: small N only;
    clustering quantises the similarities block by block instead, `finextract.clustering.levels`).

    Args:
        descriptors: (N, D) float tensor or ndarray, checked and normalised by `unit_descriptors`.
            Stays on its device.
        zero_diagonal: set S[i, i] = 0, as the released FineXtract code does before thresholding.

    Returns:
        (N, N) float32 tensor on the descriptors' device, values in [-1, 1] (diagonal 0).

    Raises:
        ValueError: see `unit_descriptors`.
    """
    x = unit_descriptors(descriptors)
    s = x @ x.T
    if zero_diagonal:
        s.fill_diagonal_(0.0)
    return s
