"""Clique clustering of SSCD descriptors (FineXtract Sec. 4.3, as its released code does it), exact.

Procedure (SPEC section 1): S = cosine similarities with a zero diagonal; the start threshold is the
25th percentile of all off-diagonal entries, floored to a multiple of `step` and to at least 0.01. At
each threshold t (raised by `step`) the graph G_t = {S[i, j] >= t} is peeled greedily: take a maximum
clique, remove it, repeat until no vertex is left (a lone vertex is a clique of size 1). The sweep stops
at the first threshold with at least N0 cliques; the answer is its N0 largest cliques.

Determinism. The paper skips a threshold whose peel takes more than 30 s of wall clock, so its answer
depends on the machine. Here a threshold is skipped when its peel needs more than `budget` units of
branch-and-bound work (one unit per vertex coloured in a bound computation, i.e. a node with m
candidates costs m): the same input gives the same answer on any machine and under any load. The
wall-clock `time_limit` remains only as a safety net; every skipped threshold is reported with why.

Canonical choice among maximum cliques (so that "a maximum clique" is one well-defined set): the one
with the largest sum of pairwise similarities, then the lexicographically smallest sorted index list.

Exact speed-ups, all sound (they never change the answer):
- components: a maximum clique of G is the best of its components' maximum cliques, and removing a
  clique only changes its own component, so the other components' answers are kept;
- k-core pruning: a clique of size s lies in the (s-1)-core, so vertices of degree < s-1 are dropped;
- bitset branch-and-bound with greedy-colouring bounds (Tomita's MCQ, with San Segundo's bitset
  colouring), vertices relabelled by degree so low bit = high degree;
- the peel can stop once N0 cliques are out and the next clique is smaller than the N0-th (peel sizes
  never grow), or once the remaining vertices cannot make N0 cliques;
- a threshold that adds no edge change over the previous one gives the previous answer.
Where `cupy` and `cugraph` import, the thresholded graph and its connected components are computed on
the GPU (`_components_gpu`); the CPU twin (`_components_cpu`, SciPy) gives the same labels up to naming,
and the exact search is the same code on both paths.
"""
from __future__ import annotations

import heapq
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)

#: Default per-threshold search budget (work units, see the module docstring). Calibrated on this
#: project's 2-core CPU machine, where the search runs ~2.5 M units/s: a skipped (dense, hopeless)
#: threshold costs ~40 ms, and N = 500 planted SSCD-like sets cluster in ~0.3 s in all. Graphs the
#: plain 30 s networkx procedure solves at the final threshold need far less (thousands of units).
#: Raise it for a more thorough (slower) sweep; the answer depends on it, never on the machine.
DEFAULT_BUDGET = 100_000


class _BudgetExceeded(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class ClusteringResult:
    """Outcome of `cluster_descriptors` / `cluster_similarity`.

    Attributes:
        threshold: the similarity threshold at which the peel first gave >= N0 cliques.
        cliques: the N0 largest cliques at that threshold, index lists (sorted), largest first (ties:
            higher mean intra-clique similarity first).
        representatives: one index per clique: the member with the highest mean similarity to the rest
            of its clique.
        skipped: [{"threshold": t, "reason": str}] for every threshold whose peel did not finish.
        seconds: wall-clock time of the whole sweep.
        num_cliques: cliques peeled at `threshold` (>= N0; the peel stops once the N0 largest are known).
        thresholds_tried: number of thresholds visited.
        work: branch-and-bound work units spent at `threshold`.
        start_threshold: the first threshold of the sweep.
        budget: the per-threshold budget used.
    """

    threshold: float
    cliques: list[list[int]]
    representatives: list[int]
    skipped: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    num_cliques: int = 0
    thresholds_tried: int = 0
    work: int = 0
    start_threshold: float = 0.0
    budget: int = DEFAULT_BUDGET

    def to_dict(self) -> dict:
        return {
            "threshold": self.threshold, "start_threshold": self.start_threshold,
            "cliques": self.cliques, "clique_sizes": [len(c) for c in self.cliques],
            "representatives": self.representatives, "skipped": self.skipped, "seconds": self.seconds,
            "num_cliques": self.num_cliques, "thresholds_tried": self.thresholds_tried,
            "work": self.work, "budget": self.budget,
        }


# ---------------------------------------------------------------------------------------------------
# Exact maximum clique on one component (bitsets as Python ints)
# ---------------------------------------------------------------------------------------------------

class _Search:
    """Branch-and-bound state for one threshold: the budget is shared by every search of the peel."""

    def __init__(self, budget: int, deadline: float):
        self.left = budget
        self.spent = 0
        self.deadline = deadline
        self._calls = 0

    def spend(self, units: int) -> None:
        self.left -= units
        self.spent += units
        if self.left < 0:
            raise _BudgetExceeded("search budget exhausted")
        self._calls += 1
        if self._calls & 1023 == 0 and time.perf_counter() > self.deadline:
            raise _BudgetExceeded("wall-clock time limit (safety net; machine-dependent)")


def _colour(nadj: list[int], p: int, kmin: int) -> tuple[list[int], list[int]]:
    """Greedy sequential colouring of candidate set `p` (bitset), lowest bit first.

    Returns the vertices with colour >= kmin and their colours, in colour order: colour k bounds the
    size of a clique drawn from the vertices listed up to it (Tomita's MCQ bound).
    """
    order, colours = [], []
    k = 0
    while p:
        k += 1
        q = p
        while q:
            low = q & -q
            v = low.bit_length() - 1
            q &= nadj[v]
            p ^= low
            if k >= kmin:
                order.append(v)
                colours.append(k)
    return order, colours


def _max_clique_size(adj, nadj, p: int, lower: int, search: _Search) -> tuple[int, list[int] | None]:
    """Largest clique in `p` if larger than `lower` (its size, local vertices), else (lower, None)."""
    best = [lower, None]
    clique: list[int] = []

    def expand(p: int) -> None:
        order, colours = _colour(nadj, p, best[0] - len(clique))
        search.spend(p.bit_count())
        for i in range(len(order) - 1, -1, -1):
            if len(clique) + colours[i] <= best[0]:
                return
            v = order[i]
            clique.append(v)
            np_ = p & adj[v]
            if np_:
                expand(np_)
            elif len(clique) > best[0]:
                best[0], best[1] = len(clique), list(clique)
            clique.pop()
            p &= ~(1 << v)

    expand(p)
    return best[0], best[1]


def _all_cliques_of_size(adj, nadj, p: int, target: int, search: _Search, visit) -> None:
    """Call visit(local clique) for every clique of size `target` in `p` (target = clique number)."""
    clique: list[int] = []

    def expand(p: int) -> None:
        order, colours = _colour(nadj, p, target - len(clique))
        search.spend(p.bit_count())
        for i in range(len(order) - 1, -1, -1):
            if len(clique) + colours[i] < target:
                return
            v = order[i]
            clique.append(v)
            np_ = p & adj[v]
            if np_ and len(clique) < target:
                expand(np_)
            elif len(clique) == target:
                visit(clique)
            clique.pop()
            p &= ~(1 << v)

    expand(p)


def _core(a: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the k-core of the graph with (m, m) boolean adjacency `a`."""
    alive = np.ones(len(a), dtype=bool)
    degree = a.sum(1)
    while True:
        drop = alive & (degree < k)
        if not drop.any():
            return alive
        alive &= ~drop
        degree -= a[drop].sum(0)


def _greedy_clique(a: np.ndarray) -> list[int]:
    """A clique built greedily (most candidate neighbours first): a lower bound for the search."""
    cand = np.ones(len(a), dtype=bool)
    clique = []
    while cand.any():
        inner = (a[:, cand].sum(1)) * cand - (~cand)  # -1 for non-candidates
        v = int(np.argmax(inner))
        clique.append(v)
        cand &= a[v]
        cand[v] = False
    return clique


def _bitsets(a: np.ndarray) -> list[int]:
    packed = np.packbits(a, axis=1, bitorder="little")
    return [int.from_bytes(row.tobytes(), "little") for row in packed]


def _clique_key(members: list[int], weights: np.ndarray) -> tuple:
    """Sort key of a clique: larger first, then larger similarity sum, then smaller indices."""
    members = sorted(members)
    w = float(weights[np.ix_(members, members)].sum(dtype=np.float64)) / 2.0
    return (-len(members), -w, tuple(members))


def _best_clique(adj_full: np.ndarray, weights: np.ndarray, comp: np.ndarray, search: _Search) -> tuple:
    """Canonical maximum clique of the component with global vertex indices `comp`; returns its key."""
    m = len(comp)
    if m <= 2:
        return _clique_key(list(comp), weights)
    a = adj_full[np.ix_(comp, comp)]
    degree = a.sum(1)
    if degree.min() == m - 1:  # the component is a clique
        return _clique_key(list(comp), weights)
    # Phase 1: the clique number, searching only the L-core for a clique larger than the greedy L.
    greedy = _greedy_clique(a)
    lower = len(greedy)
    omega = lower
    keep = np.flatnonzero(_core(a, lower))
    if len(keep) > lower:
        omega = _search_size(a, keep, lower, search)
    # Phase 2: every clique of size omega (all in the (omega-1)-core); keep the canonical one.
    keep = np.flatnonzero(_core(a, omega - 1))
    keep = keep[np.argsort(-a[np.ix_(keep, keep)].sum(1), kind="stable")]
    sub = a[np.ix_(keep, keep)]
    adj = _bitsets(sub)
    nadj = [~(row | (1 << i)) for i, row in enumerate(adj)]
    best = [None]

    def visit(local: list[int]) -> None:
        key = _clique_key([int(comp[keep[v]]) for v in local], weights)
        if best[0] is None or key < best[0]:
            best[0] = key

    _all_cliques_of_size(adj, nadj, (1 << len(keep)) - 1, omega, search, visit)
    return best[0]


def _search_size(a: np.ndarray, keep: np.ndarray, lower: int, search: _Search) -> int:
    keep = keep[np.argsort(-a[np.ix_(keep, keep)].sum(1), kind="stable")]
    adj = _bitsets(a[np.ix_(keep, keep)])
    nadj = [~(row | (1 << i)) for i, row in enumerate(adj)]
    size, _ = _max_clique_size(adj, nadj, (1 << len(keep)) - 1, lower, search)
    return size


# ---------------------------------------------------------------------------------------------------
# Components: CPU (SciPy) and GPU (cuGraph) twins
# ---------------------------------------------------------------------------------------------------

def _components_cpu(a: np.ndarray) -> list[np.ndarray]:
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    _, labels = connected_components(csr_matrix(a), directed=False)
    return _group(labels)


def _group(labels: np.ndarray) -> list[np.ndarray]:
    order = np.argsort(labels, kind="stable")
    splits = np.flatnonzero(np.diff(labels[order])) + 1
    return [np.sort(g) for g in np.split(order, splits)]


def _components_gpu(s_gpu, threshold: float):
    """Thresholded graph on the GPU: its boolean adjacency (copied to host) and components (cuGraph).

    Returns None when cupy/cugraph are not importable or fail, so the CPU twin runs instead.
    """
    try:
        import cudf
        import cugraph
        import cupy as cp
    except Exception:  # optional GPU stack; any import failure means "use the CPU path"
        return None
    try:
        s = cp.asarray(s_gpu)
        a = s >= threshold
        cp.fill_diagonal(a, False)
        src, dst = cp.nonzero(cp.triu(a, 1))
        n = a.shape[0]
        # every vertex appears (self-loop-free isolated vertices are added as their own labels below)
        graph = cugraph.Graph(directed=False)
        graph.from_cudf_edgelist(cudf.DataFrame({"src": src.astype(cp.int32), "dst": dst.astype(cp.int32)}),
                                 source="src", destination="dst")
        labels = np.arange(n) + n  # isolated vertices: own label
        if len(src):
            df = cugraph.connected_components(graph).to_pandas()
            labels[df["vertex"].to_numpy()] = df["labels"].to_numpy().astype(np.int64) % n
        _, labels = np.unique(labels, return_inverse=True)
        return cp.asnumpy(a), _group(labels)
    except Exception as error:  # fall back rather than fail: the CPU twin gives the same answer
        logger.warning("cuGraph path failed (%s); using the CPU path", error)
        return None


# ---------------------------------------------------------------------------------------------------
# Peeling and the threshold sweep
# ---------------------------------------------------------------------------------------------------

def _peel(a: np.ndarray, weights: np.ndarray, components, n0: int, search: _Search):
    """Greedy maximum-clique peel of graph `a`; returns (keys of peeled cliques, complete?)."""
    heap = [(_best_clique(a, weights, comp, search), i, comp) for i, comp in enumerate(components)]
    heapq.heapify(heap)
    counter = len(heap)
    remaining = len(a)
    peeled: list[tuple] = []
    while heap:
        key, _, comp = heapq.heappop(heap)
        if len(peeled) >= n0 and -key[0] < -peeled[n0 - 1][0]:
            return peeled, True  # the N0 largest are known: later cliques are smaller
        peeled.append(key)
        remaining -= -key[0]
        if len(peeled) < n0 and len(peeled) + remaining < n0:
            return peeled, False  # cannot reach N0 cliques
        members = set(key[2])
        rest = np.array([v for v in comp if v not in members], dtype=np.int64)
        if len(rest):
            for sub in _components_cpu(a[np.ix_(rest, rest)]):
                comp_sub = rest[sub]
                heapq.heappush(heap, (_best_clique(a, weights, comp_sub, search), counter, comp_sub))
                counter += 1
    return peeled, len(peeled) >= n0


def _representative(members: list[int], s: np.ndarray) -> int:
    if len(members) == 1:
        return members[0]
    mean = s[np.ix_(members, members)].sum(1, dtype=np.float64) / (len(members) - 1)
    return members[int(np.argmax(mean))]  # argmax: first (smallest index) on ties


def cluster_similarity(similarity, n0: int, *, step: float = 0.01, budget: int = DEFAULT_BUDGET,
                       time_limit: float = 30.0, progress: bool = False) -> ClusteringResult:
    """Cluster a similarity matrix by the FineXtract threshold sweep with greedy clique peeling.

    Args:
        similarity: (N, N) symmetric float matrix (ndarray or tensor on any device), cosine
            similarities in [-1, 1]; the diagonal is ignored (treated as 0).
        n0: N0, the number of cliques wanted, 1 <= n0 <= N.
        step: threshold increment (paper: 0.01).
        budget: deterministic per-threshold limit on branch-and-bound work (units: vertices coloured);
            a threshold whose peel needs more is skipped and reported.
        time_limit: wall-clock seconds per threshold, a safety net only (the paper's 30 s).
        progress: show a tqdm bar over thresholds.

    Returns:
        ClusteringResult (threshold, N0 cliques largest first, representatives, skipped thresholds).

    Raises:
        ValueError: the matrix is not square / finite, or n0 is out of range.
    """
    start = time.perf_counter()
    s_dev = similarity
    s = similarity.detach().float().cpu().numpy() if hasattr(similarity, "detach") else np.asarray(similarity, np.float32)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"similarity must be a square (N, N) matrix; got shape {s.shape}")
    n = s.shape[0]
    if not 1 <= n0 <= n:
        raise ValueError(f"n0={n0} must be between 1 and the number of images N={n}")
    if not np.isfinite(s).all():
        raise ValueError("similarity holds NaN/inf; drop degenerate images first")
    if step <= 0 or budget < 1:
        raise ValueError(f"step={step} and budget={budget} must be positive")
    s = s.astype(np.float32, copy=True)
    np.fill_diagonal(s, 0.0)
    off = s[~np.eye(n, dtype=bool)]
    if len(off) == 0:  # a single image is one clique
        return ClusteringResult(0.0, [[0]], [0], [], time.perf_counter() - start, 1, 0, 0, 0.0, budget)
    k = max(math.floor(float(np.percentile(off, 25)) / step + 1e-9), math.ceil(0.01 / step - 1e-9))
    start_threshold = round(k * step, 10)
    top = float(off.max())
    weights = s.astype(np.float64)
    use_gpu = hasattr(s_dev, "device") and getattr(s_dev.device, "type", "cpu") == "cuda"

    skipped: list[dict] = []
    previous = None  # (edge count, outcome) of the last threshold, for unchanged graphs
    tried = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="clustering thresholds", unit="thr")
    try:
        while True:
            threshold = round(k * step, 10)
            tried += 1
            if bar is not None:
                bar.update(1)
            gpu = _components_gpu(s_dev, threshold) if use_gpu else None
            if gpu is not None:
                a, components = gpu
            else:
                a = s >= np.float32(threshold)
                np.fill_diagonal(a, False)
                components = None
            edges = int(a.sum())
            if previous is not None and previous[0] == edges:
                outcome = previous[1]  # same graph as the previous threshold: same outcome
                if outcome[0] == "skipped":
                    skipped.append({"threshold": threshold, "reason": f"same graph as {previous[2]}: "
                                    + outcome[1]})
            else:
                if components is None:
                    components = _components_cpu(a)
                search = _Search(budget, time.perf_counter() + time_limit)
                try:
                    peeled, enough = _peel(a, weights, components, n0, search)
                    outcome = ("done", peeled, enough, search.spent)
                except _BudgetExceeded as error:
                    reason = f"{error.reason} ({search.spent} units, budget {budget})"
                    skipped.append({"threshold": threshold, "reason": reason})
                    logger.info("threshold %.2f skipped: %s", threshold, reason)
                    outcome = ("skipped", reason)
                previous = (edges, outcome, threshold)
            if outcome[0] == "done" and outcome[2]:
                peeled = outcome[1]
                break
            if threshold > top and outcome[0] == "done":
                raise RuntimeError("clustering found no threshold with N0 cliques; this is a bug")
            k += 1
    finally:
        if bar is not None:
            bar.close()
    chosen = sorted(peeled)[:n0]  # (-size, -weight, members): largest, then higher mean similarity
    cliques = [list(key[2]) for key in chosen]
    return ClusteringResult(
        threshold=threshold, cliques=cliques, representatives=[_representative(c, s) for c in cliques],
        skipped=skipped, seconds=time.perf_counter() - start, num_cliques=len(peeled),
        thresholds_tried=tried, work=outcome[3], start_threshold=start_threshold, budget=budget,
    )


def cluster_descriptors(descriptors, n0: int, *, step: float = 0.01, budget: int = DEFAULT_BUDGET,
                        time_limit: float = 30.0, progress: bool = False) -> ClusteringResult:
    """Cluster SSCD descriptors into N0 cliques (FineXtract Sec. 4.3), exactly and deterministically.

    Args:
        descriptors: (N, D) float32 tensor or ndarray, rows L2-normalised; the similarity matrix is
            computed on their device (one matmul, `finextract.similarity.similarity_matrix`).
        n0: N0, number of images to extract, 1 <= n0 <= N.
        step, budget, time_limit, progress: see `cluster_similarity`.

    Returns:
        ClusteringResult with `.threshold`, `.cliques`, `.representatives`, `.skipped`, `.seconds`.

    Raises:
        ValueError: bad shapes, non-finite descriptors, or n0 out of range.
    """
    from finextract.similarity import similarity_matrix

    return cluster_similarity(similarity_matrix(descriptors), n0, step=step, budget=budget,
                              time_limit=time_limit, progress=progress)


def planted_descriptors(n: int, n_clusters: int, cluster_size: int, *, dim: int = 512, spread: float = 1.0,
                        style: float = 0.35, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """SSCD-like synthetic descriptors with planted near-duplicate clusters (tests and benchmarks).

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
    """
    if n_clusters * cluster_size > n:
        raise ValueError(f"n_clusters*cluster_size={n_clusters * cluster_size} exceeds n={n}")
    rng = np.random.default_rng(seed)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
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
