"""The threshold sweep with greedy maximum-clique peeling: `cluster_descriptors` / `cluster_similarity`."""

from __future__ import annotations

import heapq
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from finextract.similarity import unit_descriptors

from .selection import ON_BUDGET, SELECTIONS, modes, select

logger = logging.getLogger("finextract.clustering")

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
    0.12 only 29 k). The cap bounds the work per threshold where the reference gives no calibration.

    Args:
        n: N, number of descriptors (>= 1).

    Returns:
        The budget in work units (vertices coloured by the branch-and-bound), an int >= 300.
    """
    return int(min(BUDGET_PER_VERTEX * max(n, 1), BUDGET_CAP))


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
        approximate: [{"threshold": t, "reason": str}] when the answer's peel ran out of budget and was
            finished approximately (`fallback`: its cliques are cliques, maybe not maximum); else [].
        selection: the rule that picked the N0 cliques (`selection.SELECTIONS`).
        on_budget: what the sweep did at a threshold whose peel ran out of budget ("skip" / "keep").
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
    approximate: list[dict] = field(default_factory=list)
    selection: str = "size"
    on_budget: str = "skip"

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
            "approximate": self.approximate,
            "selection": self.selection,
            "on_budget": self.on_budget,
        }


class _Keys:
    """Canonical clique keys (-size, -similarity sum, sorted original indices); the smallest is chosen."""

    def __init__(self, levels):
        self.perm, self.source = levels.perm, levels.source
        self.inv = np.argsort(levels.perm)

    def key(self, relabelled) -> tuple:
        members = sorted(int(v) for v in self.perm[relabelled])
        if len(members) == 1:
            return (-1, -0.0, tuple(members))
        w = float(self.source.submatrix(self.inv[members]).sum()) / 2.0
        return (-len(members), -w, tuple(members))

    def representative(self, members: list[int]) -> int:
        """The member with the highest mean similarity to the rest (first, i.e. smallest, on ties)."""
        if len(members) == 1:
            return members[0]
        mean = self.source.submatrix(self.inv[members]).sum(1) / (len(members) - 1)
        return members[int(np.argmax(mean))]


@dataclass
class _Frame:
    """The graph G_t, or a subgraph of it induced on `ids` (relabelled vertices, increasing).

    `csr` (adjacency lists) is set on a sparse graph: components, cores and greedy cliques then cost
    O(V + E) instead of O(V * W); the bitset and list kernels give the same results. `parent` is a
    spanning forest of the frame's parts (see `graph.split_rest`), updated as parts are peeled.
    """

    adj: np.ndarray  # (m, W) uint64 bitset adjacency
    ids: np.ndarray  # (m,) int64
    parent: np.ndarray  # (m,) int64
    csr: tuple | None = None


@dataclass
class _Part:
    """A connected vertex set `verts` (frame vertices, increasing int64) of a frame."""

    frame: _Frame
    verts: np.ndarray


def _groups(frame: _Frame, verts: np.ndarray, labels: np.ndarray, count: int) -> list[_Part]:
    """Parts from component labels aligned with `verts`, in label order."""
    if count == 1:
        return [_Part(frame, verts)]
    grouped = verts[np.argsort(labels, kind="stable")]
    return [_Part(frame, p) for p in np.split(grouped, np.cumsum(np.bincount(labels, minlength=count))[:-1])]


def _component_best(part: _Part, keys: _Keys, budget) -> tuple[tuple, np.ndarray, tuple, _Part]:
    """Canonical maximum clique of a part: (key, its frame vertices, every maximum clique as
    ([keys], (count, omega) frame vertices) best first, the part).

    The greedy clique gives the lower bound, the (lower - 1)-core the candidates. The search runs on
    the subgraph induced by the core when that is much smaller than the frame (same vertex order, so
    the same search and work units). A part much smaller than its bitset frame moves to its own
    compacted frame first (returned, so that its rest is split there too).

    When the threshold's budget runs out (now or in an earlier search), the part's clique is the best
    of those the search had listed and the greedy clique (`fallback.fallback_clique`), with no cache;
    `budget.exhausted` says why.
    """
    from . import graph  # heavy: numba (import and JIT) loads only when clustering runs; the package imports sweep
    from .fallback import fallback_clique
    from .maxclique import BudgetExceeded, all_max_cliques

    frame, verts = part.frame, part.verts
    m = len(verts)
    if frame.csr is not None:
        complete = m <= 2 or graph.is_complete_csr(*frame.csr, verts)
        if not complete:
            lower = graph.greedy_clique_size_csr(*frame.csr, verts)
            core = graph.k_core_csr(*frame.csr, verts, lower - 1)
    else:
        if 4 * m <= len(frame.ids):
            local = np.full(len(frame.ids), -1, np.int64)
            local[verts] = np.arange(m)
            parent = frame.parent[verts]
            parent = np.where(parent >= 0, local[np.maximum(parent, 0)], -1)
            frame = _Frame(graph.induced(frame.adj, verts), frame.ids[verts], parent)
            verts = np.arange(m)
            part = _Part(frame, verts)
        mask = graph.set_of(verts, len(frame.ids))
        complete = m <= 2 or graph.is_complete(frame.adj, mask)
        if not complete:
            lower = graph.greedy_clique_size(frame.adj, mask)
            core = graph.members(graph.k_core(frame.adj, mask, lower - 1))
    if complete:
        key = keys.key(frame.ids[verts])
        return key, verts, ([key], verts[None, :]), part
    small = 4 * len(core) <= len(frame.ids)  # a small core: search its own compacted bitsets
    try:
        if budget.exhausted:
            raise BudgetExceeded(budget.exhausted)
        if small:
            _, found = all_max_cliques(
                graph.induced(frame.adj, core), graph.set_of(np.arange(len(core)), len(core)), lower, budget
            )
            found = core[found]
        else:
            _, found = all_max_cliques(frame.adj, graph.set_of(core, len(frame.ids)), lower, budget)
    except BudgetExceeded as error:  # keep what the search found, else a greedy clique (fallback.py)
        budget.exhausted = budget.exhausted or error.reason
        found = core[error.found] if small and error.found.size else error.found
        key, clique = fallback_clique(frame.adj, verts, found, lambda c: keys.key(frame.ids[c]))
        return key, clique, None, part
    found = np.sort(found, axis=1)
    ranked = sorted((keys.key(frame.ids[c]), i) for i, c in enumerate(found))
    cache = ([key for key, _ in ranked], found[[i for _, i in ranked]])
    return cache[0][0], cache[1][0], cache, part


def _peel(
    adj: np.ndarray, keys: _Keys, n0: int, budget, edges: int | None = None, min_size: int | None = None
) -> tuple[list[tuple], bool]:
    """Greedy maximum-clique peel of G_t; returns (keys of peeled cliques in order, >= N0 cliques?).

    With `min_size`, N0 is ignored: the peel returns every clique of at least `min_size` vertices
    (and True), stopping at the first smaller one.

    Exact shortcuts (none changes which cliques are peeled):
    - a maximum clique of G is the best of its components' maximum cliques; components are searched
      lazily, only when their size bound could beat every known clique (an unsearched entry sorts as
      (-bound, -inf) ahead of all cliques of size <= bound), and peeling changes only its own component;
    - the rest of a peeled component inherits the maximum cliques it still holds (a size-omega clique
      of a subgraph is one of the enumerated size-omega cliques of the graph), so it is searched again
      only when none is left; its bound is then omega - 1;
    - the peel stops once N0 cliques are out and the next is smaller than the N0-th (peel sizes never
      grow), or once the remaining vertices cannot make N0 cliques.
    """
    from . import graph

    n = adj.shape[0]
    # adjacency lists when they are no larger than the bitsets (average degree up to N / 32)
    edges = graph.edge_count(adj) if edges is None else edges
    csr = graph.to_csr(adj) if 2 * edges * 32 <= n * graph.words(n) * 64 else None
    everything = np.arange(n)
    if csr is not None:
        labels, count, parent = graph.components_csr(*csr, everything)
    else:
        labels, count, parent = graph.components(adj, graph.set_of(everything, n))
    whole = _Frame(adj, everything, parent, csr)
    heap: list = []
    counter = 0

    def push(part: _Part, bound: int, cache) -> None:
        nonlocal counter
        size = len(part.verts)
        if size <= 2:
            entry = (keys.key(part.frame.ids[part.verts]), counter, part, True, part.verts, None)
        elif cache is not None and len(cache[0]):
            entry = (cache[0][0], counter, part, True, cache[1][0], cache)
        else:
            entry = ((-min(bound, size), -math.inf, ()), counter, part, False, None, None)
        heapq.heappush(heap, entry)
        counter += 1

    for part in _groups(whole, everything, labels, count):
        push(part, n, None)
    remaining = n
    peeled: list[tuple] = []
    while heap:
        key, _, part, searched, clique, cache = heapq.heappop(heap)
        if not searched:
            key, clique, cache, part = _component_best(part, keys, budget)
            heapq.heappush(heap, (key, counter, part, True, clique, cache))
            counter += 1
            continue
        if min_size is not None:
            if -key[0] < min_size:
                return peeled, True  # peel sizes never grow: no later clique is large enough
        elif len(peeled) >= n0 and -key[0] < -peeled[n0 - 1][0]:
            return peeled, True  # the N0 largest are known: later cliques are smaller
        peeled.append(key)
        remaining -= -key[0]
        if min_size is None and len(peeled) < n0 and len(peeled) + remaining < n0:
            return peeled, False  # cannot reach N0 cliques
        frame = part.frame
        removed = np.zeros(len(frame.ids), dtype=bool)
        removed[clique] = True
        rest = part.verts[~removed[part.verts]]
        if not len(rest):
            continue
        if frame.csr is not None:
            labels, count = graph.split_rest_csr(*frame.csr, frame.parent, rest, removed)
        else:
            labels, count = graph.split_rest(frame.adj, frame.parent, rest, removed)
        subcaches = [None] * count
        if cache is not None:  # a maximum clique disjoint from the peeled one lies in one component
            keep = np.flatnonzero(~removed[cache[1]].any(axis=1))
            if count == 1:
                subcaches[0] = ([cache[0][i] for i in keep], cache[1][keep])
            else:
                component = np.full(len(frame.ids), -1, np.int64)
                component[rest] = labels
                inside = component[cache[1][keep, 0]]
                for c in np.unique(inside):
                    chosen = keep[inside == c]
                    subcaches[c] = ([cache[0][i] for i in chosen], cache[1][chosen])
        omega = -key[0]
        for sub, subcache in zip(_groups(frame, rest, labels, count), subcaches):
            # an approximate clique (budget spent) bounds nothing: the rest may hold larger ones
            push(sub, len(sub.verts) if budget.exhausted else omega - 1, subcache)
    return peeled, len(peeled) >= n0


def cluster_similarity(
    similarity,
    n0: int,
    *,
    step: float = 0.01,
    budget: int | None = None,
    time_limit: float = 30.0,
    progress: bool = False,
    on_budget: str = "skip",
    selection: str = "size",
) -> ClusteringResult:
    """Cluster a similarity matrix by the FineXtract threshold sweep with greedy clique peeling.

    Args:
        similarity: (N, N) symmetric float matrix (ndarray or tensor on any device), cosine
            similarities; the diagonal is ignored and only the upper triangle is read. It is quantised
            into threshold levels block by block (`levels.py`; N^2 bytes), on its device.
        n0: N0, the number of cliques wanted, 1 <= n0 <= N.
        step: threshold increment (paper: 0.01), >= 1.6e-5 (levels must fit uint16).
        budget: deterministic per-threshold limit on branch-and-bound work (units: vertices coloured);
            a peel that needs more is finished approximately (`fallback`: the cliques the search had
            found, then greedy cliques) and, with on_budget="skip", skipped and reported. None:
            `default_budget(N)`.
        time_limit: wall-clock seconds per threshold, a safety net only (the paper's 30 s).
        progress: show a tqdm bar over thresholds.
        on_budget: "skip" (the paper's: such a threshold is skipped; a warning names a skipped one whose
            approximate peel had no one-image clique when the answer has only such cliques) or "keep" (its
            approximate peel counts like an exact one; `.approximate` records it).
        selection: which N0 cliques of the threshold's peel are returned (`selection.SELECTIONS`):
            "size" (the paper's), "density" or "merged"; or "modes", which runs no sweep
            (`selection.modes`: `.threshold` is its radius, `.cliques` the picks and their near-copies).

    Returns:
        ClusteringResult (threshold, N0 cliques largest first, representatives, skipped thresholds).

    Raises:
        ValueError: the matrix is not square / finite, n0, step, budget or time_limit is out of range, or
            on_budget / selection is unknown.
    """
    shape = tuple(similarity.shape)
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"similarity must be a square (N, N) matrix; got shape {shape}")
    n = shape[0]
    _check(n, n0, step, budget, time_limit, on_budget, selection)
    start = time.perf_counter()
    if n == 1:  # a single image is one clique
        return _single(start, budget)
    from .levels import from_matrix

    similarity = similarity.detach() if hasattr(similarity, "detach") else np.asarray(similarity)
    if selection == "modes":
        tensor = hasattr(similarity, "detach")
        return _modes(lambda lo, hi: similarity[lo:hi].cpu().numpy() if tensor else similarity[lo:hi], n, n0, start)
    return _sweep(from_matrix(similarity, step), n0, step, budget, time_limit, progress, start, on_budget, selection)


def cluster_descriptors(
    descriptors,
    n0: int,
    *,
    step: float = 0.01,
    budget: int | None = None,
    time_limit: float = 30.0,
    progress: bool = False,
    on_budget: str = "skip",
    selection: str = "size",
) -> ClusteringResult:
    """Cluster SSCD descriptors into N0 cliques (FineXtract Sec. 4.3), exactly and deterministically.

    The cosine similarities are computed on the descriptors' device in float32, one 2048 x 2048 block
    of the matrix product at a time, and quantised into threshold levels as they come (N^2 bytes, no
    N x N float matrix); see the package docstring for the procedure.

    Args:
        descriptors: (N, D) float tensor or ndarray, rows L2-normalised (SSCD output). float64 input is
            converted to float32 and unnormalised rows are normalised, each with a logged warning
            (`finextract.similarity.unit_descriptors`).
        n0: N0, number of images to extract, 1 <= n0 <= N.
        step, budget, time_limit, progress, on_budget, selection: see `cluster_similarity`.

    Returns:
        ClusteringResult with `.threshold`, `.cliques`, `.representatives`, `.skipped`, `.seconds`.

    Raises:
        ValueError: bad shapes, non-finite or all-zero descriptors, n0, step, budget out of range, or an
            unknown on_budget / selection.
    """
    start = time.perf_counter()
    x = unit_descriptors(descriptors)
    _check(len(x), n0, step, budget, time_limit, on_budget, selection)
    if len(x) == 1:
        return _single(start, budget)
    if selection == "modes":
        return _modes(lambda lo, hi: (x[lo:hi] @ x.T).cpu().numpy(), len(x), n0, start)
    from .levels import from_descriptors

    return _sweep(from_descriptors(x, step), n0, step, budget, time_limit, progress, start, on_budget, selection)


def _check(n: int, n0: int, step: float, budget: int | None, time_limit: float, on_budget: str, selection: str) -> None:
    if on_budget not in ON_BUDGET:
        raise ValueError(f"--on-budget {on_budget!r}: expected one of {', '.join(ON_BUDGET)}")
    if selection not in SELECTIONS:
        raise ValueError(f"--selection {selection!r}: expected one of {', '.join(SELECTIONS)}")
    if not 1 <= n0 <= n:
        raise ValueError(f"n0={n0} must be between 1 and the number of images N={n}")
    if not step > 0 or (budget is not None and budget < 1) or not time_limit > 0:
        raise ValueError(f"step={step}, budget={budget} and time_limit={time_limit} must be positive")


def _single(start: float, budget: int | None) -> ClusteringResult:
    budget = default_budget(1) if budget is None else budget
    return ClusteringResult(0.0, [[0]], [0], [], time.perf_counter() - start, 1, 0, 0, 0.0, budget)


def _modes(rows, n: int, n0: int, start: float) -> ClusteringResult:
    """The "modes" rule's answer (no sweep): `.threshold` is its radius, `.cliques` the picks' groups."""
    from .selection import MODE_RADIUS

    groups, picks = modes(rows, n, n0)
    return ClusteringResult(MODE_RADIUS, groups, picks, [], time.perf_counter() - start, n0, selection="modes")


def _sweep(levels, n0, step, budget, time_limit, progress, start, on_budget="skip", selection="size"):
    from . import graph
    from .maxclique import SearchBudget

    n = levels.n
    budget = default_budget(n) if budget is None else budget
    keys = _Keys(levels)
    adj = np.zeros((n, graph.words(n)), np.uint64)
    pack = graph.pack_graph if isinstance(levels.levels, np.ndarray) else graph.pack_graph_torch
    k = levels.start
    skipped: list[dict] = []
    approximate: list[dict] = []
    kept_sizes = None  # (threshold, N0 largest sizes) of the last skipped approximate peel without one-image cliques
    previous = None  # (edge count, outcome, threshold) of the last threshold, for unchanged graphs
    tried = 0
    bar = None
    if progress:
        bar = tqdm(desc="clustering thresholds", unit="thr")
    try:
        while True:
            if k >= len(levels.table):
                raise RuntimeError("clustering found no threshold with N0 cliques; this is a bug")
            threshold = round(k * step, 10)
            tried += 1
            if bar is not None:
                bar.update(1)
            edges = levels.edges(k)
            if previous is not None and previous[0] == edges:
                outcome = previous[1]  # edges only disappear as t rises: same count, same graph
                if outcome[0] == "skipped":
                    skipped.append({"threshold": threshold, "reason": f"same graph as {previous[2]}: " + outcome[1]})
            else:
                began = time.perf_counter()
                pack(levels.levels, k, adj)
                search = SearchBudget(budget, time.perf_counter() + time_limit)
                peeled, enough = _peel(adj, keys, n0, search, edges)
                outcome = ("done", peeled, enough, search.spent)
                if search.exhausted:  # the peel finished approximately (fallback.py)
                    reason = f"{search.exhausted} ({search.spent} units, budget {budget})"
                    sizes = [-key[0] for key in sorted(peeled)[:n0]]
                    if on_budget == "skip":
                        skipped.append({"threshold": threshold, "reason": reason, "approximate_sizes": sizes})
                        logger.debug("threshold %.2f skipped: %s", threshold, reason)
                        outcome = ("skipped", reason)
                        if enough and min(sizes) > 1:
                            kept_sizes = (threshold, sizes)
                    else:
                        approximate.append({"threshold": threshold, "reason": reason})
                        logger.info("threshold %.2f: peel approximate, kept (%s)", threshold, reason)
                previous = (edges, outcome, threshold)
                logger.debug(
                    "threshold %.2f: %d edges, %s, %d units, %.2f s",
                    threshold,
                    edges,
                    outcome[0],
                    search.spent,
                    time.perf_counter() - began,
                )
            if outcome[0] == "done" and outcome[2]:
                peeled = outcome[1]
                if selection != "size":  # the rule ranks every clique of the peel, not only the N0 largest
                    search = SearchBudget(budget, time.perf_counter() + time_limit)
                    peeled, _ = _peel(adj, keys, n0, search, edges, min_size=1)
                    if search.exhausted:
                        reason = f"{search.exhausted} ({search.spent} units, budget {budget}; complete peel)"
                        approximate.append({"threshold": threshold, "reason": reason})
                picked = select(selection, peeled, n0, threshold, keys)
                if picked is not None:
                    break
            k += 1
    finally:
        if bar is not None:
            bar.close()
    if skipped:  # one line per clustering; the per-threshold reasons are DEBUG lines and in `.skipped`
        reasons = sorted({s["reason"].split(" (")[0].removeprefix("same graph as ").split(": ")[-1] for s in skipped})
        logger.info(
            "clustering: %d threshold(s) skipped (%s; %.2f to %.2f; expected, not an error: a graph too dense "
            "to peel within the fixed work budget is skipped, as the paper skips a threshold after 30 s), "
            "chose %.2f",
            len(skipped),
            ", ".join(reasons),
            skipped[0]["threshold"],
            skipped[-1]["threshold"],
            threshold,
        )
    cliques, representatives = picked
    if kept_sizes is not None and max(len(c) for c in cliques) == 1:
        logger.warning(
            "clustering: the answer at %.2f holds only one-image cliques, while the peel of the skipped threshold %.2f, "
            "finished approximately when its budget ran out, had cliques of sizes %s; --on-budget keep "
            "(on_budget='keep') keeps such a peel",
            threshold,
            *kept_sizes,
        )
    return ClusteringResult(
        threshold=threshold,
        cliques=cliques,
        representatives=representatives,
        skipped=skipped,
        seconds=time.perf_counter() - start,
        num_cliques=len(peeled),
        thresholds_tried=tried,
        work=outcome[3],
        start_threshold=round(levels.start * step, 10),
        budget=budget,
        approximate=[a for a in approximate if a["threshold"] == threshold],
        selection=selection,
        on_budget=on_budget,
    )
