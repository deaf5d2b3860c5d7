"""The similarity matrix as exact threshold levels: N^2 bytes instead of N^2 floats, the same graphs.

The sweep only ever asks whether S[i, j] >= t_k for the thresholds t_k = float32(round(k * step, 10)),
k = 1, 2, .... These are strictly increasing (checked), so the set of thresholds an entry passes is
{1, ..., L} with L = #{k : S[i, j] >= t_k}, the entry's level, and

    S[i, j] >= t_k   <=>   L[i, j] >= k        for every k,

exactly: the level matrix holds every thresholded graph the float comparisons give, with no rounding
argument. Levels fit uint8 for step >= 1.01/255 (uint16 below). The float32 similarities are made and
quantised one square block at a time (a block of a matrix product for descriptors), only for the upper
triangle, and mirrored, so the graphs are symmetric by construction and no N x N float is held.

The same pass counts the pairs at each level (edges of every G_k, for free) and histograms
floor(S / step + 1e-9), from which the sweep's start (the 25th percentile of the off-diagonal entries,
NumPy's 'linear' method, floored to a multiple of step) is read exactly; in the rare case that the
percentile's two order statistics fall in different bins a second pass finds them.

Vertices are relabelled once by decreasing similarity row sum (MCQ's initial order: colouring meets
likely-dense vertices first); `perm[r]` is the original index of relabelled vertex r. The CPU pass
quantises with a numba kernel; `_quantise_torch` is its twin for GPU tensors (tested equal on the CPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit

#: rows/columns of one similarity block (block x block float32 at a time)
BLOCK = 2048
#: similarities of unit descriptors (norms within 1 +- 1e-2, `unit_descriptors`) lie within +-1.0201
_DESCRIPTOR_RANGE = 1.05


def threshold_table(step: float, top: float) -> np.ndarray:
    """t_k = float32(round(k * step, 10)) for k = 0..K, t_0 = -inf, K the first k with t_k > top.

    Raises:
        ValueError: the levels would not fit uint16 (step too small), or float32 cannot tell two
            consecutive thresholds apart.
    """
    count = max(math.floor(top / step) + 2, 2)
    if count > 65535:
        raise ValueError(f"step={step} gives {count} threshold levels; use step >= {top / 65000:.2g}")
    table = np.array([-np.inf] + [round(k * step, 10) for k in range(1, count + 1)], dtype=np.float32)
    while table[-1] <= top:  # make sure the last level's graph is empty
        table = np.append(table, np.float32(round(len(table) * step, 10)))
    if not np.all(np.diff(table[1:]) > 0):
        raise ValueError(f"step={step} is below float32 resolution: consecutive thresholds coincide")
    return table


def bin_table(step: float, lo: float, hi: float) -> tuple[int, np.ndarray]:
    """Edges of the start-threshold histogram: bin b holds the values v with floor(v / step + 1e-9) = b.

    That float64 expression is non-decreasing in v, so {v : floor(v / step + 1e-9) >= b} is the set of
    float32 values v >= e_b for one float32 e_b (found below by stepping float32 neighbours): the bin
    of v is then counted like a level, by float32 comparisons, with no division per entry.

    Returns:
        (b_lo, edges): edges[i] = e_(b_lo + i) for i >= 1, edges[0] = -inf; bin index i <-> b = b_lo + i,
        covering [lo, hi] (values outside fall into the end bins).
    """
    b_lo = math.floor(lo / step) - 1
    count = math.floor(hi / step) + 2 - b_lo

    def floor_bin(v) -> int:
        return math.floor(float(v) / step + 1e-9)

    edges = np.empty(count, np.float32)
    edges[0] = -np.inf
    for i in range(1, count):
        b = b_lo + i
        e = np.float32((b - 1e-9) * step)
        while floor_bin(e) >= b:
            e = np.nextafter(e, np.float32(-np.inf))
        while floor_bin(e) < b:
            e = np.nextafter(e, np.float32(np.inf))
        edges[i] = e
    return b_lo, edges


@njit(cache=True)
def _quantise_block(block, diagonal, table, edges, inv_step, bin_lo, tol, out, counts, bins, fast):
    """Levels of the block's upper-triangle entries into `out` (mirrored on a diagonal block), with
    the pair counts per level and the start-threshold histogram. Returns the non-finite count.

    g = floor(v / step) is the level and the bin unless v / step lies within `tol` of an integer: the
    float32 thresholds are within K * 2^-23 (relative) of k * step, below tol. Those few entries are
    counted by the exact float32 comparisons; the rest go to `fast[j % 4, g - bin_lo]` (four copies, so
    that consecutive increments of one bin do not wait on each other), folded in by the caller.
    """
    rows, cols = block.shape
    top = len(table) - 1
    last = len(edges) - 1
    bad = 0
    for i in range(rows):
        j0 = i + 1 if diagonal else 0
        for j in range(j0, cols):
            v = block[i, j]
            if not np.isfinite(v):
                bad += 1
                out[i, j] = 0
                continue
            x = v * inv_step
            g = math.floor(x)
            frac = x - g
            b = g - bin_lo
            if frac < tol or frac > 1.0 - tol or b < 0 or b > last:
                c = min(max(g, 0), top)
                while c < top and v >= table[c + 1]:
                    c += 1
                while c > 0 and v < table[c]:
                    c -= 1
                counts[c] += 1
                b = min(max(b, 0), last)
                while b < last and v >= edges[b + 1]:
                    b += 1
                while b > 0 and v < edges[b]:
                    b -= 1
                bins[b] += 1
            else:
                c = min(max(g, 0), top)
                fast[j & 3, b] += 1
            out[i, j] = c
    if diagonal:
        for i in range(rows):
            out[i, i] = 0
            for j in range(i):
                out[i, j] = out[j, i]
    return bad


@njit(cache=True)
def _mirror(src, dst):
    """dst = src.T, in 64 x 64 tiles (a plain strided transpose misses the cache on every entry)."""
    rows, cols = src.shape
    for i0 in range(0, rows, 64):
        for j0 in range(0, cols, 64):
            for j in range(j0, min(j0 + 64, cols)):
                for i in range(i0, min(i0 + 64, rows)):
                    dst[j, i] = src[i, j]


def _quantise_torch(block, diagonal: bool, table_t, edges_t, dtype):
    """Twin of `_quantise_block` in torch (any device): returns (levels block, counts, bins, bad).

    torch.bucketize(v, t_1..t_K, right=True) counts the thresholds <= v: the level, by the same float32
    comparisons (and likewise the histogram bin from the bin edges).
    """
    import torch  # heavy: torch, only for GPU descriptors; clustering is torch-free

    upper = torch.ones(block.shape, dtype=torch.bool, device=block.device)
    if diagonal:
        upper = torch.triu(upper, 1)
    finite = torch.isfinite(block)
    bad = int((upper & ~finite).sum())
    keep = upper & finite
    levels = torch.where(keep, torch.bucketize(block, table_t[1:], right=True), 0)
    counts = torch.bincount(levels[keep], minlength=len(table_t))
    bins = torch.bincount(torch.bucketize(block[keep], edges_t[1:], right=True), minlength=len(edges_t))
    if diagonal:
        levels = levels + levels.T
    return levels.to(dtype), counts.cpu().numpy(), bins.cpu().numpy(), bad


class _DescriptorSource:
    """Similarity blocks as float32 matrix products of relabelled descriptors (torch, their device)."""

    def __init__(self, x, perm: np.ndarray):
        import torch

        self.x = x[torch.as_tensor(perm, device=x.device)]
        self.device = x.device

    def block(self, i0: int, i1: int, j0: int, j1: int):
        return self.x[i0:i1] @ self.x[j0:j1].T

    def submatrix(self, relabelled: np.ndarray) -> np.ndarray:
        """(k, k) float64 similarities of the given relabelled vertices, zero diagonal."""
        import torch

        # small, on the CPU, single-threaded (einsum's own loop, not BLAS): per-clique products would
        # otherwise pay a thread pool's start-up each time
        rows = self.x[torch.as_tensor(relabelled, device=self.device)].cpu().numpy().astype(np.float64)
        sub = np.einsum("id,jd->ij", rows, rows)
        upper = np.triu(sub, 1)
        return upper + upper.T


class _MatrixSource:
    """Similarity blocks gathered from a given (N, N) matrix (ndarray or torch tensor), upper triangle."""

    def __init__(self, s, perm: np.ndarray):
        self.s, self.perm = s, perm
        self.torch = hasattr(s, "detach")
        self.device = s.device if self.torch else None
        if self.torch:
            import torch

            self.index = torch.as_tensor(perm, device=s.device)

    def block(self, i0: int, i1: int, j0: int, j1: int):
        if self.torch:
            return self.s[self.index[i0:i1]][:, self.index[j0:j1]].float()
        return self.s[np.ix_(self.perm[i0:i1], self.perm[j0:j1])].astype(np.float32, copy=False)

    def submatrix(self, relabelled: np.ndarray) -> np.ndarray:
        """(k, k) float64 similarities (the float32 entries, upper triangle mirrored), zero diagonal."""
        idx = self.perm[relabelled]
        if self.torch:
            import torch

            t = torch.as_tensor(idx, device=self.device)
            sub = self.s[t][:, t].float().cpu().numpy()
        else:
            sub = np.asarray(self.s[np.ix_(idx, idx)], dtype=np.float32)
        upper = np.triu(sub.astype(np.float64), 1)
        return upper + upper.T


@dataclass
class SimilarityLevels:
    """Quantised, relabelled similarity matrix (see the module docstring).

    Attributes:
        levels: (N, N) uint8 (uint16 for step < 1.01/255) level matrix, relabelled, zero diagonal: a
            NumPy array, or a torch tensor on the GPU the similarities came from.
        table: (K + 1,) float32 thresholds t_0 = -inf, t_1 .. t_K (t_K above every similarity).
        pair_counts: (K + 1,) int64, unordered pairs at each level (edges of G_k = pair_counts[k:].sum()).
        start: the sweep's first level k (its threshold is round(k * step, 10)).
        perm: (N,) int64, original index of each relabelled vertex.
        source: gives small float64 similarity blocks (`submatrix`) for clique weights and representatives.
    """

    levels: object
    table: np.ndarray
    pair_counts: np.ndarray
    start: int
    perm: np.ndarray
    source: object

    @property
    def n(self) -> int:
        return len(self.perm)

    def edges(self, k: int) -> int:
        return int(self.pair_counts[k:].sum())


def from_descriptors(x, step: float, block: int = BLOCK) -> SimilarityLevels:
    """Levels of S = x x^T for (N, D) float32 L2-normalised torch descriptors (any device)."""
    x64 = x.double()
    row_sums = (x64 @ x64.sum(0) - (x64 * x64).sum(1)).cpu().numpy()  # S's row sums, zero diagonal
    perm = np.argsort(-row_sums, kind="stable")
    return _quantise(_DescriptorSource(x, perm), perm, step, -_DESCRIPTOR_RANGE, _DESCRIPTOR_RANGE, block)


def from_matrix(s, step: float, block: int = BLOCK) -> SimilarityLevels:
    """Levels of a given (N, N) similarity matrix (ndarray or torch tensor, any float dtype)."""
    n = s.shape[0]
    if hasattr(s, "detach"):
        s = s.detach()
        row_sums = (s.double().sum(1) - s.diagonal().double()).cpu().numpy()
        lo, hi = float(s.min()), float(s.max())
    else:
        row_sums = s.sum(1, dtype=np.float64) - np.diagonal(s).astype(np.float64)
        lo, hi = float(s.min()), float(s.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("similarity holds NaN/inf; drop degenerate images first")
    perm = np.argsort(-row_sums, kind="stable") if n else np.zeros(0, np.int64)
    return _quantise(_MatrixSource(s, perm), perm, step, lo, hi, block)


def _on_gpu(device) -> bool:
    """Whether to quantise with torch on the similarities' device (a GPU) instead of the CPU kernel."""
    return device is not None and device.type != "cpu"


def _quantise(source, perm: np.ndarray, step: float, lo: float, hi: float, block: int) -> SimilarityLevels:
    n = len(perm)
    table = threshold_table(step, hi)
    dtype = np.uint8 if len(table) <= 256 else np.uint16
    bin_lo, edges = bin_table(step, lo, hi)
    counts = np.zeros(len(table), np.int64)
    bins = np.zeros(len(edges), np.int64)
    fast = np.zeros((4, len(edges)), np.int64)
    tol = max(1e-4, 4e-7 * len(table))  # > K * 2^-23 (threshold rounding) + 1e-9 (the bins' offset)
    bad = 0
    gpu = _on_gpu(source.device)
    if gpu:
        import torch

        tdtype = torch.uint8 if dtype == np.uint8 else torch.int16
        levels = torch.zeros((n, n), dtype=tdtype, device=source.device)
        table_t = torch.as_tensor(table, device=source.device)
        edges_t = torch.as_tensor(edges, device=source.device)
    else:
        levels = np.zeros((n, n), dtype=dtype)
    for i0 in range(0, n, block):
        i1 = min(i0 + block, n)
        for j0 in range(i0, n, block):
            j1 = min(j0 + block, n)
            values = source.block(i0, i1, j0, j1)
            if gpu:
                q, c, b, nb = _quantise_torch(values, i0 == j0, table_t, edges_t, tdtype)
                levels[i0:i1, j0:j1] = q
                counts += c
                bins += b
                if j0 != i0:
                    levels[j0:j1, i0:i1] = q.T
            else:
                values = values.numpy() if hasattr(values, "numpy") else values
                q = levels[i0:i1, j0:j1]
                nb = _quantise_block(values, i0 == j0, table, edges, 1.0 / step, bin_lo, tol, q, counts, bins, fast)
                if j0 != i0:
                    _mirror(q, levels[j0:j1, i0:i1])
            bad += nb
    fast = fast.sum(0)  # fold the fast-path histogram: bin b_lo + i is level min(max(b_lo + i, 0), K)
    bins += fast
    np.add.at(counts, np.clip(bin_lo + np.arange(len(edges)), 0, len(table) - 1), fast)
    if bad:
        raise ValueError(f"the similarities hold {bad} NaN/inf entries; drop degenerate images first")
    start = _start_level(bins, bin_lo, n, step, lambda b_lo, b_hi: _bin_extremes(source, n, step, b_lo, b_hi, block))
    return SimilarityLevels(levels, table, counts, start, perm, source)


def _start_level(bins: np.ndarray, bin_lo: int, n: int, step: float, exact) -> int:
    """floor(q / step + 1e-9), q = the 25th percentile of the off-diagonal entries (NumPy 'linear'),
    at least 0.01 / step; from the histogram of floor(v / step + 1e-9) over the N(N-1)/2 pairs.

    Off the diagonal each pair appears twice, so the sorted off-diagonal entries a satisfy
    a[2m] = a[2m + 1] = u[m] (u: the sorted pairs) and the percentile interpolates u[lo], u[hi]. When
    both lie in one bin, q does too (the bin is an interval of values); otherwise `exact(b_lo, b_hi)`
    returns u[lo] (the largest value of bin b_lo) and u[hi] (the smallest of bin b_hi).
    """
    floor_k = math.ceil(0.01 / step - 1e-9)
    pairs = n * (n - 1) // 2
    if pairs == 0:
        return floor_k
    j = math.floor(0.25 * (2 * pairs - 1))
    lo, hi = j // 2, (j + 1) // 2
    cum = np.cumsum(bins)
    b_lo, b_hi = (int(np.searchsorted(cum, r, side="right")) for r in (lo, hi))
    if b_lo == b_hi:
        k = b_lo + bin_lo
    else:
        a, b = exact(b_lo + bin_lo, b_hi + bin_lo)
        # NumPy's own interpolation (float32, gamma = 0.25 or 0.75) on a small array with the same
        # two order statistics at the same fractional position
        tiny = [a, b, b, b] if (0.25 * (2 * pairs - 1)) % 1 == 0.75 else [a, a, b, b, b, b]
        k = math.floor(float(np.percentile(np.array(tiny, dtype=np.float32), 25)) / step + 1e-9)
    return max(k, floor_k)


def _bin_extremes(source, n: int, step: float, b_lo: int, b_hi: int, block: int) -> tuple[float, float]:
    """Largest pair value in bin b_lo and smallest in bin b_hi (a second pass over the blocks)."""
    import torch

    a, b = -math.inf, math.inf
    for i0 in range(0, n, block):
        for j0 in range(i0, n, block):
            values = torch.as_tensor(source.block(i0, min(i0 + block, n), j0, min(j0 + block, n)))
            keep = torch.ones(values.shape, dtype=torch.bool, device=values.device)
            if i0 == j0:
                keep = torch.triu(keep, 1)
            values = values[keep]
            bins = torch.floor(values.double() / step + 1e-9).long()
            if (bins == b_lo).any():
                a = max(a, float(values[bins == b_lo].max()))
            if (bins == b_hi).any():
                b = min(b, float(values[bins == b_hi].min()))
    return a, b
