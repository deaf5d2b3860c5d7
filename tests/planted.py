"""SSCD-like synthetic descriptor sets with planted near-duplicate clusters (tests and benchmarks).

Importable from the repository root as `tests.planted` (bench/ puts the root on sys.path).
"""

from __future__ import annotations

import numpy as np


def planted_descriptors(
    n: int,
    n_clusters: int,
    cluster_size: int,
    *,
    dim: int = 512,
    spread: float = 1.0,
    style: float = 0.35,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """SSCD-like synthetic descriptors with planted near-duplicate clusters.

    Unrelated images share a weak common "style" direction (background cosine ~style^2/(1+style^2),
    about 0.1 by default) as generations of one model do; cluster members are noisy copies of a centre
    (within-cluster cosine ~1/(1+spread^2), about 0.5 by default).

    Args:
        n: N, total number of descriptors; n_clusters * cluster_size <= n.
        n_clusters, cluster_size: planted clusters (the rest are background).
        dim: descriptor size D (SSCD: 512). spread: noise scale of members. style: common direction weight.
        seed: NumPy seed.

    Returns:
        (descriptors (N, D) float32 L2-normalised, labels (N,) int64: cluster id or -1 for background).

    Raises:
        ValueError: the clusters do not fit in n.
    """
    if n_clusters * cluster_size > n:
        raise ValueError(f"n_clusters*cluster_size={n_clusters * cluster_size} exceeds n={n}")
    rng = np.random.default_rng(seed)

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    common = unit(rng.standard_normal(dim))
    x = unit(rng.standard_normal((n, dim)))
    labels = np.full(n, -1, dtype=np.int64)
    for c in range(n_clusters):
        idx = np.arange(c * cluster_size, (c + 1) * cluster_size)
        centre = unit(rng.standard_normal(dim))
        x[idx] = unit(centre + spread * unit(rng.standard_normal((cluster_size, dim))))
        labels[idx] = c
    x = unit(x + style * common)
    order = rng.permutation(n)
    return x[order].astype(np.float32), labels[order]
