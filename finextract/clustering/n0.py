"""Estimate N0 from the generated images alone (`--n0 auto`): count the cliques no random graph would hold.

Each memorised training image makes the fine-tune regenerate near-copies of it: a clique of the
similarity graph G_t = {S[i, j] >= t} far larger than the cliques of an Erdos-Renyi graph G(N, p) of
the same edge density p. In G(N, p) the expected number of k-cliques is C(N, k) p^(k (k-1) / 2); the
smallest k where it drops below `alpha` is the size a chance clique almost never reaches
(`random_clique_bound`, at least 3: a pair is never evidence). At each threshold t of a grid from the
clustering's start threshold up, the graph is peeled greedily (maximum clique first, as the
clustering does) and the cliques of at least that size are counted.

Too low a threshold merges copies of different images (and the bound is large); too high a one splits
them (and the bound falls to 3). In between, the count stays at N0 over a range of thresholds: the
estimate is the most frequent count over the thresholds where it is >= 1 (ties: the smaller), the
interval the 25th..75th percentile of those counts, and the confidence the share of them equal to the
estimate.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm.auto import tqdm

from finextract.similarity import unit_descriptors

from .sweep import _Keys, _peel, default_budget

#: Fewest generated images to estimate from: the paper's N = 50 x N0 for N0 = 1.
MIN_IMAGES = 50


@dataclass
class N0Estimate:
    """What `estimate_n0` found.

    Attributes:
        n0: the estimate (>= 1). interval: (low, high) 25th..75th percentile of the per-threshold
            counts. confidence: share of the counted thresholds that gave exactly `n0`, in [0, 1].
        num_images: N, the descriptors estimated from. num_thresholds: thresholds with a count >= 1.
        per_threshold: [{"threshold", "density", "min_size", "count"}] for every threshold visited.
        alpha: the chance-clique probability used. seconds: wall-clock time.
    """

    n0: int
    interval: tuple[int, int]
    confidence: float
    num_images: int
    num_thresholds: int
    per_threshold: list[dict] = field(default_factory=list)
    alpha: float = 0.01
    seconds: float = 0.0

    def to_dict(self) -> dict:
        record = asdict(self)
        record["interval"] = list(self.interval)
        return {"source": "estimated", "by": "clique statistics", **record}


def random_clique_bound(n: int, density: float, alpha: float = 0.01) -> int:
    """Smallest k >= 3 with C(n, k) density^(k (k - 1) / 2) < alpha (expected k-cliques of G(n, p)).

    Args:
        n: vertices N (>= 1). density: edge probability p in [0, 1]. alpha: in (0, 1).

    Returns:
        k in 3..n + 1 (n + 1: even an n-clique is not unlikely, e.g. p = 1).
    """
    if density <= 0.0:
        return 3
    log_p, log_alpha = math.log(min(density, 1.0)), math.log(alpha)
    for k in range(3, n + 1):
        log_count = math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * (k - 1) / 2 * log_p
        if log_count < log_alpha:
            return k
    return n + 1


def estimate_n0(
    descriptors,
    *,
    step: float = 0.01,
    alpha: float = 0.01,
    budget: int | None = None,
    time_limit: float = 30.0,
    progress: bool = False,
) -> N0Estimate:
    """Estimate N0 from SSCD descriptors of generated images (see the module docstring).

    Args:
        descriptors: (N, D) float tensor or ndarray, rows L2-normalised (SSCD output), N >= `MIN_IMAGES`.
        step: threshold grid step (the clustering's 0.01). alpha: chance-clique probability (0, 1).
        budget: branch-and-bound work per threshold (None: `default_budget(N)`); a threshold whose peel
            needs more is left out of the count (recorded with count None).
        time_limit: wall-clock seconds per threshold, a safety net.
        progress: show a tqdm bar over thresholds.

    Returns:
        `N0Estimate`.

    Raises:
        ValueError: fewer than `MIN_IMAGES` descriptors (the message says how many are needed), bad
            descriptors, or no threshold with a clique larger than chance (no sign of memorisation).
    """
    from . import graph  # heavy: numba (import and JIT) loads only when clustering runs; spec.py imports n0
    from .levels import from_descriptors
    from .maxclique import BudgetExceeded, SearchBudget

    start = time.perf_counter()
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha={alpha}: must be in (0, 1)")
    n = len(descriptors)
    if n < MIN_IMAGES:
        raise ValueError(
            f"estimating N0 needs at least {MIN_IMAGES} generated images (the paper's N = 50 x N0 for N0 = 1); "
            f"got {n}: generate more (--num-images) or give --n0"
        )
    x = unit_descriptors(descriptors)
    levels = from_descriptors(x, step)
    budget = default_budget(n) if budget is None else budget
    keys = _Keys(levels)
    adj = np.zeros((n, graph.words(n)), np.uint64)
    pack = graph.pack_graph if isinstance(levels.levels, np.ndarray) else graph.pack_graph_torch
    pairs = n * (n - 1) / 2
    rows = []
    bar = None
    if progress:
        bar = tqdm(desc="estimate N0", unit="thr")
    for k in range(levels.start, len(levels.table)):
        edges = levels.edges(k)
        if edges == 0:
            break
        density = edges / pairs
        bound = random_clique_bound(n, density, alpha)
        row = {"threshold": round(k * step, 10), "density": density, "min_size": bound, "count": 0}
        if bound <= n:
            pack(levels.levels, k, adj)
            try:
                peeled, _ = _peel(adj, keys, n, SearchBudget(budget, time.perf_counter() + time_limit), edges, bound)
                row["count"] = len(peeled)
            except BudgetExceeded:
                row["count"] = None
        rows.append(row)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    counts = np.array([r["count"] for r in rows if r["count"]], dtype=np.int64)
    if not len(counts):
        raise ValueError(
            f"no threshold holds a clique larger than a random graph of the same density would (N = {n}, "
            f"alpha = {alpha}): the generations show no memorised image; give --n0 if you know it"
        )
    values, frequency = np.unique(counts, return_counts=True)
    n0 = int(values[np.argmax(frequency)])  # np.unique sorts: ties go to the smaller count
    low, high = (round(float(q)) for q in np.percentile(counts, [25, 75]))
    return N0Estimate(
        n0=n0,
        interval=(min(low, n0), max(high, n0)),
        confidence=float(np.mean(counts == n0)),
        num_images=n,
        num_thresholds=len(counts),
        per_threshold=rows,
        alpha=alpha,
        seconds=time.perf_counter() - start,
    )
