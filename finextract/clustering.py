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
The default budget grows with N (`default_budget`), calibrated so that on the benchmark's planted
SSCD-like sets the sweep stops at the threshold the plain 30 s networkx procedure stops at.

Canonical choice among maximum cliques (so that "a maximum clique" is one well-defined set): the one
with the largest sum of pairwise similarities, then the lexicographically smallest sorted index list.

Exact speed-ups, all sound (they never change which cliques are peeled):
- bitsets: G_t is packed to bits once per threshold (vectorised) and held as Python-int rows over
  vertices relabelled by similarity row sum (low bit = likely high degree, MCQ's initial order);
- components: a maximum clique of G is the best of its components' maximum cliques; components are
  searched lazily (only when their size bound could beat every known clique), and removing a clique
  only changes its own component;
- inherited cliques: the search lists every maximum clique of a component (it must, for the canonical
  pick); after one is peeled, the rest keeps those disjoint from it, which are exactly the maximum
  cliques of the rest when any is left, so no new search is needed;
- k-core pruning: a clique of size s lies in the (s-1)-core, so vertices of degree < s-1 are dropped;
- bitset branch-and-bound with greedy-colouring bounds (Tomita's MCQ, with San Segundo's bitset
  colouring), started from a greedy clique;
- the peel can stop once N0 cliques are out and the next clique is smaller than the N0-th (peel sizes
  never grow), or once the remaining vertices cannot make N0 cliques;
- a threshold with the same edge count as the previous one has the same graph (edges only disappear as
  t rises) and gives the previous outcome.
On a CUDA similarity matrix with CuPy, cuDF and cuGraph importable, each G_t is thresholded and packed on
the GPU and cuGraph's connected components and core numbers are used as hints (`_graph_gpu`). The hints
never change the search (the bitset code derives the same components and cores), so every path gives
the same answer and the same work count; `_graph_cpu_twin` computes the same hints on the CPU (tested).
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)

#: Work units per vertex of the default budget, and its cap (see `default_budget`).
BUDGET_PER_VERTEX = 300
BUDGET_CAP = 1_000_000


def default_budget(n: int) -> int:
    """Default per-threshold work budget for N descriptors: min(300 N, 1e6) units.

    Calibration (bench/results/clustering.json): the plain procedure's 30 s cap skips thresholds whose
    networkx peel explodes; its cost grows faster with N than ours, so the matching budget grows with N.
    300 N gives the reference's threshold on the planted N = 500 and 1000 sets (0.14, 0.17); at N = 250
    the reference itself flips between 0.11 and 0.12 with machine load, and 300 N gives 0.12 (0.11 needs
    84 k units). A fixed budget cannot match them all (N = 500 needs >= 115 k units at 0.14, N = 250 at
    0.12 only 29 k). The cap keeps N = 10,000 to ~20 s on 2 cores, where the reference gives no calibration.

    Args:
        n: N, number of descriptors (>= 1).

    Returns:
        The budget in work units (vertices coloured by the branch-and-bound), an int >= 300.
    """
    return int(min(BUDGET_PER_VERTEX * max(n, 1), BUDGET_CAP))


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
        budget: the per-threshold budget used (units).
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
    budget: int = 0

    def to_dict(self) -> dict:
        return {
            "threshold": self.threshold,
            "start_threshold": self.start_threshold,
            "cliques": self.cliques,
            "clique_sizes": [len(c) for c in self.cliques],
            "representatives": self.representatives,
            "skipped": self.skipped,
            "seconds": self.seconds,
            "num_cliques": self.num_cliques,
            "thresholds_tried": self.thresholds_tried,
            "work": self.work,
            "budget": self.budget,
        }


# ---------------------------------------------------------------------------------------------------
# Thresholded graphs as bitsets (Python ints: bit j of adj[i] set <=> S[i, j] >= t)
# ---------------------------------------------------------------------------------------------------


@dataclass
class _Graph:
    """G_t on vertices relabelled so that low index = high similarity row sum (MCQ's degree order).

    `labels` (component label per vertex) and `core` (core number per vertex) are optional hints from
    cuGraph or its CPU twin; they only speed things up: the components and k-cores they give are the
    ones the bitset code computes itself, so the search, its work units and the answer are unchanged.
    """

    adj: list
    nadj: list
    edges: int
    packed: np.ndarray  # (n, ceil(n/8)) uint8, the same rows little-endian packed (vectorised scans)
    labels: np.ndarray | None = None
    core: np.ndarray | None = None
    _core_masks: dict = field(default_factory=dict)

    def core_mask(self, k: int) -> int:
        """Bitset of vertices with core number >= k (all vertices when no hint is known)."""
        if self.core is None or k <= 0:
            return -1
        if k not in self._core_masks:
            self._core_masks[k] = _to_int(np.packbits(self.core >= k, bitorder="little"))
        return self._core_masks[k]


def _to_int(packed_row: np.ndarray) -> int:
    return int.from_bytes(packed_row.tobytes(), "little")


def _rows(packed: np.ndarray) -> tuple[list, list, int, np.ndarray]:
    """Bitsets (and complements without the vertex itself) from little-endian packed rows (n, ceil(n/8))."""
    n, width = packed.shape
    data = packed.tobytes()
    adj = [int.from_bytes(data[i * width : (i + 1) * width], "little") for i in range(n)]
    nadj = [~(row | (1 << i)) for i, row in enumerate(adj)]
    edges = int(np.bitwise_count(packed).sum(dtype=np.int64)) // 2
    return adj, nadj, edges, packed


def _pack_cpu(s: np.ndarray, threshold: float, block: int = 1024) -> np.ndarray:
    """Little-endian packed rows of (s >= threshold), built in row blocks to bound memory."""
    n = len(s)
    packed = np.empty((n, (n + 7) // 8), dtype=np.uint8)
    t = np.float32(threshold)
    for i in range(0, n, block):
        packed[i : i + block] = np.packbits(s[i : i + block] >= t, axis=1, bitorder="little")
    return packed


def _graph_cpu(s: np.ndarray, threshold: float) -> _Graph:
    """G_t on the CPU: bitsets only (components and cores are computed by the bitset code)."""
    return _Graph(*_rows(_pack_cpu(s, threshold)))


def _core_numbers(a: np.ndarray) -> np.ndarray:
    """Core number of every vertex of the graph with (n, n) boolean adjacency `a` (networkx semantics)."""
    alive = np.ones(len(a), dtype=bool)
    degree = a.sum(1).astype(np.int64)
    core = np.zeros(len(a), dtype=np.int64)
    k = 0
    while alive.any():
        k = max(k, int(degree[alive].min()))
        drop = alive & (degree <= k)
        while drop.any():
            core[drop] = k
            alive &= ~drop
            degree -= a[drop].sum(0)
            drop = alive & (degree <= k)
    return core


def _graph_cpu_twin(s: np.ndarray, threshold: float) -> _Graph:
    """CPU twin of `_graph_gpu`: the same hints (SciPy components, NumPy core numbers), for tests."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    a = s >= np.float32(threshold)
    _, labels = connected_components(csr_matrix(a), directed=False)
    return _Graph(*_rows(_pack_cpu(s, threshold)), labels=labels, core=_core_numbers(a))


def _graph_gpu(s_gpu, threshold: float) -> _Graph | None:
    """G_t built on the GPU (CuPy), with cuGraph's connected components and core numbers as hints.

    The thresholded matrix is packed to bits on the device, so only N*N/8 bytes cross to the host.
    cuGraph (documented API): an undirected `cugraph.Graph` from a cuDF edge list (upper triangle;
    undirected graphs are symmetrised by cuGraph), `cugraph.connected_components(G)` -> DataFrame
    (vertex, labels) and `cugraph.core_number(G)` -> DataFrame (vertex, core_number); vertices without
    edges are absent from both (they are their own component, core number 0).
    Returns None when CuPy/cuDF/cuGraph are not importable or fail, so the CPU path runs instead.
    """
    try:
        import cudf
        import cugraph
        import cupy as cp
    except Exception:  # optional GPU stack; any import failure means "use the CPU path"
        return None
    try:
        s = cp.asarray(s_gpu)
        n = s.shape[0]
        a = s >= cp.float32(threshold)  # the diagonal is 0 < threshold: no self-loops
        bits = cp.pad(a, ((0, 0), (0, (-n) % 8))).reshape(n, -1, 8).astype(cp.uint8)
        packed = cp.asnumpy((bits << cp.arange(8, dtype=cp.uint8)).sum(axis=2, dtype=cp.uint8))
        labels = -1 - np.arange(n, dtype=np.int64)  # vertices without edges: their own component
        core = np.zeros(n, dtype=np.int64)
        src, dst = cp.nonzero(cp.triu(a, 1))
        if len(src):
            graph = cugraph.Graph(directed=False)
            graph.from_cudf_edgelist(
                cudf.DataFrame({"src": src.astype(cp.int32), "dst": dst.astype(cp.int32)}),
                source="src",
                destination="dst",
            )
            cc = cugraph.connected_components(graph)
            labels[cc["vertex"].values.get()] = cc["labels"].values.get().astype(np.int64)
            cn = cugraph.core_number(graph)
            core[cn["vertex"].values.get()] = cn["core_number"].values.get().astype(np.int64)
        return _Graph(*_rows(packed), labels=labels, core=core)
    except Exception as error:  # fall back rather than fail: the CPU path gives the same answer
        logger.warning("cuGraph path failed (%s); using the CPU path", error)
        return None


def _bits(x: int):
    while x:
        low = x & -x
        yield low.bit_length() - 1
        x ^= low


def _components(g: _Graph, verts: int) -> list[int]:
    """Connected components of G[verts] as bitsets (bitset breadth-first search)."""
    n, out = len(g.adj), []
    while verts:
        comp = frontier = verts & -verts
        while frontier:
            if frontier & (frontier - 1):  # several vertices: OR their rows in one NumPy reduction
                rows = g.packed[np.flatnonzero(_unpack(frontier, n))]
                reach = _to_int(np.bitwise_or.reduce(rows, axis=0))
            else:
                reach = g.adj[frontier.bit_length() - 1]
            frontier = reach & verts & ~comp
            comp |= frontier
        out.append(comp)
        verts &= ~comp
    return out


def _initial_components(g: _Graph, n: int) -> list[int]:
    if g.labels is None:
        return _components(g, (1 << n) - 1)
    groups: dict = {}
    for v, label in enumerate(g.labels.tolist()):
        groups[label] = groups.get(label, 0) | (1 << v)
    return sorted(groups.values(), key=lambda c: c & -c)  # same order as the bitset search


def _unpack(bits: int, n: int) -> np.ndarray:
    raw = np.frombuffer(bits.to_bytes((n + 7) // 8, "little"), dtype=np.uint8)
    return np.unpackbits(raw, bitorder="little")[:n].astype(bool)


def _pack(mask: np.ndarray) -> np.ndarray:
    return np.packbits(mask, bitorder="little")


def _degrees(g: _Graph, idx: np.ndarray, packed_set: np.ndarray) -> np.ndarray:
    """Degree of each vertex in `idx` within the set `packed_set` (vectorised popcounts)."""
    return np.bitwise_count(g.packed[idx] & packed_set).sum(1, dtype=np.int64)


def _core(g: _Graph, verts: int, k: int) -> int:
    """The k-core of G[verts] (a clique of size s lies in the (s-1)-core)."""
    if k <= 0:
        return verts
    n = len(g.adj)
    verts &= g.core_mask(k)  # sound pre-filter: the k-core of a subgraph lies in the graph's k-core
    mask = _unpack(verts, n)
    idx = np.flatnonzero(mask)
    while len(idx):
        keep = _degrees(g, idx, _pack(mask)) >= k
        if keep.all():
            break
        mask[idx[~keep]] = False
        idx = idx[keep]
    return _to_int(_pack(mask))


def _greedy_clique(g: _Graph, verts: int) -> int:
    """A maximal clique built greedily (most candidate neighbours first, then lowest index)."""
    n = len(g.adj)
    mask = _unpack(verts, n)
    idx = np.flatnonzero(mask)
    clique = 0
    while len(idx):
        v = int(idx[int(np.argmax(_degrees(g, idx, _pack(mask))))])  # argmax: lowest index on ties
        clique |= 1 << v
        row = np.unpackbits(g.packed[v], bitorder="little")[:n].astype(bool)
        mask &= row
        idx = idx[row[idx]]
    return clique


# ---------------------------------------------------------------------------------------------------
# Exact search: every maximum clique (bitset branch-and-bound, greedy-colouring bounds)
# ---------------------------------------------------------------------------------------------------


class _Search:
    """Work budget of one threshold, shared by every search of its peel."""

    def __init__(self, budget: int, deadline: float):
        self.left = budget
        self.spent = 0
        self.deadline = deadline
        self.nodes = 0


def _all_max_cliques(g: _Graph, p: int, lower: int, search: _Search) -> tuple[int, list[list[int]]]:
    """All maximum cliques of G[p], given that one of size `lower` exists (Tomita's MCQ, enumerating).

    A node with m candidates colours them greedily (lowest bit first, San Segundo's bitset colouring)
    and costs m work units; a vertex of colour c cannot extend the current clique C past |C| + c, so
    branches with |C| + c < best are cut (`<`, not `<=`: ties must all be listed for the canonical pick).
    """
    adj, nadj = g.adj, g.nadj
    best = lower
    found: list[list[int]] = []
    clique: list[int] = []

    def expand(p: int) -> None:
        nonlocal best, found
        units = p.bit_count()
        search.left -= units
        search.spent += units
        if search.left < 0:
            raise _BudgetExceeded("search budget exhausted")
        search.nodes += 1
        if search.nodes & 1023 == 0 and time.perf_counter() > search.deadline:
            raise _BudgetExceeded("wall-clock time limit (safety net; machine-dependent)")
        depth = len(clique)
        kmin = best - depth
        order, colours = [], []
        k, uncoloured = 0, p
        while uncoloured:
            k += 1
            q = uncoloured
            while q:
                low = q & -q
                v = low.bit_length() - 1
                q &= nadj[v]
                uncoloured ^= low
                if k >= kmin:
                    order.append(v)
                    colours.append(k)
        for i in range(len(order) - 1, -1, -1):
            if depth + colours[i] < best:
                return
            v = order[i]
            clique.append(v)
            child = p & adj[v]
            if child:
                expand(child)
            elif depth + 1 > best:
                best, found = depth + 1, [list(clique)]
            elif depth + 1 == best:
                found.append(list(clique))
            clique.pop()
            p ^= 1 << v

    expand(p)
    return best, found


class _Keys:
    """Canonical clique keys: (-size, -similarity sum, sorted original indices); smallest = chosen."""

    def __init__(self, s: np.ndarray, perm: np.ndarray):
        self.s, self.perm = s, perm  # s is relabelled: s[i, j] = S[perm[i], perm[j]]
        self.inv = np.argsort(perm)

    def key(self, local: list[int]) -> tuple:
        members = sorted(int(self.perm[v]) for v in local)
        if len(members) == 1:
            return (-1, -0.0, tuple(members))
        idx = self.inv[members]  # relabelled rows in original-index order: same sum as the reference
        w = float(self.s[np.ix_(idx, idx)].astype(np.float64).sum()) / 2.0
        return (-len(members), -w, tuple(members))


def _component_best(g: _Graph, keys: _Keys, comp: int, search: _Search) -> tuple[tuple, int, list | None]:
    """Canonical maximum clique of component `comp`: (key, its bitset, all max cliques [(key, bits)])."""
    m = comp.bit_count()
    if m <= 2 or all((g.adj[v] | (1 << v)) & comp == comp for v in _bits(comp)):
        key = keys.key(list(_bits(comp)))
        return key, comp, [(key, comp)]
    greedy = _greedy_clique(g, comp)
    lower = greedy.bit_count()
    p = _core(g, comp, lower - 1)
    _, found = _all_max_cliques(g, p, lower, search)
    cache = sorted((keys.key(c), sum(1 << v for v in c)) for c in found)
    return cache[0][0], cache[0][1], cache


def _peel(g: _Graph, keys: _Keys, n0: int, search: _Search) -> tuple[list[tuple], bool]:
    """Greedy maximum-clique peel of G_t; returns (keys of peeled cliques in order, >= N0 cliques?).

    Lazy: a component is searched only when its size bound could beat every known clique (an unsearched
    entry sorts as (-bound, -inf) ahead of all cliques of size <= bound). After a clique is peeled, the
    rest of its component inherits the maximum cliques it still holds (a size-omega clique of a subgraph
    is one of the enumerated size-omega cliques of the graph), so it is searched again only when none is
    left; its bound is then omega - 1.
    """
    n = len(g.adj)
    heap: list = []
    counter = 0

    def push(comp: int, bound: int, cache) -> None:
        nonlocal counter
        size = comp.bit_count()
        if size <= 2:
            key = keys.key(list(_bits(comp)))
            entry = (key, counter, comp, True, comp, None)
        elif cache:
            entry = (cache[0][0], counter, comp, True, cache[0][1], cache)
        else:
            entry = ((-min(bound, size), -math.inf, ()), counter, comp, False, 0, None)
        heapq.heappush(heap, entry)
        counter += 1

    for comp in _initial_components(g, n):
        push(comp, n, None)
    remaining = n
    peeled: list[tuple] = []
    while heap:
        key, _, comp, searched, kbits, cache = heapq.heappop(heap)
        if not searched:
            key, kbits, cache = _component_best(g, keys, comp, search)
            heapq.heappush(heap, (key, counter, comp, True, kbits, cache))
            counter += 1
            continue
        if len(peeled) >= n0 and -key[0] < -peeled[n0 - 1][0]:
            return peeled, True  # the N0 largest are known: later cliques are smaller
        peeled.append(key)
        remaining -= -key[0]
        if len(peeled) < n0 and len(peeled) + remaining < n0:
            return peeled, False  # cannot reach N0 cliques
        rest = comp & ~kbits
        if not rest:
            continue
        omega = -key[0]
        for sub in _components(g, rest):
            push(sub, omega - 1, [item for item in cache if item[1] & sub == item[1]])
    return peeled, len(peeled) >= n0


# ---------------------------------------------------------------------------------------------------
# The threshold sweep
# ---------------------------------------------------------------------------------------------------


def _start_threshold(s: np.ndarray, step: float, exact_below: int = 4096) -> int:
    """k such that k*step is the 25th percentile of the off-diagonal entries, floored (NumPy 'linear')."""
    n = len(s)
    if n <= exact_below:
        q = float(np.percentile(s[~np.eye(n, dtype=bool)], 25))
    else:  # same value without an N^2 copy: each unordered pair appears twice off the diagonal
        upper = np.concatenate([s[i, i + 1 :] for i in range(n - 1)])
        pos = 0.25 * (n * (n - 1) - 1)
        j = math.floor(pos)
        lo, hi = j // 2, (j + 1) // 2
        vals = np.partition(upper, [lo, hi])[[lo, hi]].astype(np.float64)
        frac = pos - j
        q = float(vals[0] + (vals[1] - vals[0]) * frac)
    return max(math.floor(q / step + 1e-9), math.ceil(0.01 / step - 1e-9))


def _representative(members: list[int], s: np.ndarray) -> int:
    if len(members) == 1:
        return members[0]
    mean = s[np.ix_(members, members)].sum(1, dtype=np.float64) / (len(members) - 1)
    return members[int(np.argmax(mean))]  # argmax: first (smallest index) on ties


def cluster_similarity(
    similarity,
    n0: int,
    *,
    step: float = 0.01,
    budget: int | None = None,
    time_limit: float = 30.0,
    progress: bool = False,
) -> ClusteringResult:
    """Cluster a similarity matrix by the FineXtract threshold sweep with greedy clique peeling.

    Args:
        similarity: (N, N) symmetric float matrix (ndarray or tensor on any device), cosine
            similarities in [-1, 1]; the diagonal is ignored (treated as 0). On a CUDA tensor the
            thresholded graphs are built on the GPU (CuPy + cuGraph when importable).
        n0: N0, the number of cliques wanted, 1 <= n0 <= N.
        step: threshold increment (paper: 0.01).
        budget: deterministic per-threshold limit on branch-and-bound work (units: vertices coloured);
            a threshold whose peel needs more is skipped and reported. None: `default_budget(N)`.
        time_limit: wall-clock seconds per threshold, a safety net only (the paper's 30 s).
        progress: show a tqdm bar over thresholds.

    Returns:
        ClusteringResult (threshold, N0 cliques largest first, representatives, skipped thresholds).

    Raises:
        ValueError: the matrix is not square / finite, or n0, step or budget is out of range.
    """
    start = time.perf_counter()
    s_dev = similarity
    s = similarity.detach().float().cpu().numpy() if hasattr(similarity, "detach") else np.asarray(similarity)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"similarity must be a square (N, N) matrix; got shape {s.shape}")
    n = s.shape[0]
    if not 1 <= n0 <= n:
        raise ValueError(f"n0={n0} must be between 1 and the number of images N={n}")
    if budget is None:
        budget = default_budget(n)
    if step <= 0 or budget < 1:
        raise ValueError(f"step={step} and budget={budget} must be positive")
    s = s.astype(np.float32, copy=True)
    if not np.isfinite(s).all():
        raise ValueError("similarity holds NaN/inf; drop degenerate images first")
    np.fill_diagonal(s, 0.0)
    if n == 1:  # a single image is one clique
        return ClusteringResult(0.0, [[0]], [0], [], time.perf_counter() - start, 1, 0, 0, 0.0, budget)
    k = _start_threshold(s, step)
    start_threshold = round(k * step, 10)
    top = float(s.max())
    # Relabel once: low index = high similarity row sum, so colouring meets likely-dense vertices first.
    perm = np.argsort(-s.sum(1, dtype=np.float64), kind="stable")
    s_perm = s[np.ix_(perm, perm)]
    keys = _Keys(s_perm, perm)
    gpu_s = None
    if hasattr(s_dev, "device") and getattr(s_dev.device, "type", "cpu") == "cuda":
        import torch

        gpu_s = (
            s_dev.detach()
            .float()[torch.as_tensor(perm, device=s_dev.device)][:, torch.as_tensor(perm, device=s_dev.device)]
            .fill_diagonal_(0.0)
        )

    skipped: list[dict] = []
    previous = None  # (edge count, outcome, threshold) of the last threshold, for unchanged graphs
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
            g = _graph_gpu(gpu_s, threshold) if gpu_s is not None else None
            if g is None:
                g = _graph_cpu(s_perm, threshold)
            if previous is not None and previous[0] == g.edges:
                outcome = previous[1]  # edges only disappear as t rises: same count, same graph
                if outcome[0] == "skipped":
                    skipped.append({"threshold": threshold, "reason": f"same graph as {previous[2]}: " + outcome[1]})
            else:
                search = _Search(budget, time.perf_counter() + time_limit)
                try:
                    peeled, enough = _peel(g, keys, n0, search)
                    outcome = ("done", peeled, enough, search.spent)
                except _BudgetExceeded as error:
                    reason = f"{error.reason} ({search.spent} units, budget {budget})"
                    skipped.append({"threshold": threshold, "reason": reason})
                    logger.debug("threshold %.2f skipped: %s", threshold, reason)
                    outcome = ("skipped", reason)
                previous = (g.edges, outcome, threshold)
            if outcome[0] == "done" and outcome[2]:
                peeled = outcome[1]
                break
            if threshold > top and outcome[0] == "done":
                raise RuntimeError("clustering found no threshold with N0 cliques; this is a bug")
            k += 1
    finally:
        if bar is not None:
            bar.close()
    if skipped:  # one line per clustering; the per-threshold reasons are DEBUG lines and in `.skipped`
        reasons = sorted({s["reason"].split(" (")[0].removeprefix("same graph as ").split(": ")[-1] for s in skipped})
        logger.info(
            "clustering: %d threshold(s) skipped (%s; %.2f to %.2f), chose %.2f",
            len(skipped),
            ", ".join(reasons),
            skipped[0]["threshold"],
            skipped[-1]["threshold"],
            threshold,
        )
    chosen = sorted(peeled)[:n0]  # (-size, -weight, members): largest, then higher mean similarity
    cliques = [list(key[2]) for key in chosen]
    return ClusteringResult(
        threshold=threshold,
        cliques=cliques,
        representatives=[_representative(c, s) for c in cliques],
        skipped=skipped,
        seconds=time.perf_counter() - start,
        num_cliques=len(peeled),
        thresholds_tried=tried,
        work=outcome[3],
        start_threshold=start_threshold,
        budget=budget,
    )


def cluster_descriptors(
    descriptors,
    n0: int,
    *,
    step: float = 0.01,
    budget: int | None = None,
    time_limit: float = 30.0,
    progress: bool = False,
) -> ClusteringResult:
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

    return cluster_similarity(
        similarity_matrix(descriptors), n0, step=step, budget=budget, time_limit=time_limit, progress=progress
    )


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
