"""The exact maximum-clique search: every maximum clique of a bitset graph, within a work budget.

Tomita and Seki's MCQ branch and bound with greedy-colouring bounds, enumerating (every maximum clique is
listed, for the canonical pick among them), on bitsets with San Segundo's colouring (BBMC): a node with
candidate set P colours P greedily, lowest vertex first, and a vertex of colour c cannot extend the
current clique C beyond |C| + c, so it is cut when |C| + c < best (`<`, not `<=`: ties must be listed).

Work units: a node with m candidates costs m (the vertices it colours), so a search's cost is the same
on every machine and under any load. The recursion runs on an explicit stack, compiled with numba.
"""

from __future__ import annotations

import time

import numpy as np
from numba import njit, objmode

from .graph import lowest_bit, popcount

_ONE = np.uint64(1)

#: search outcome codes
DONE, BUDGET, TIME = 0, 1, 2


class SearchBudget:
    """Work budget of one threshold, shared by every search of its peel, and its wall-clock deadline."""

    def __init__(self, units: int, deadline: float):
        self.left = units
        self.spent = 0
        self.deadline = deadline
        #: why the budget ran out (the first `BudgetExceeded.reason`), or None while it lasts
        self.exhausted: str | None = None


class BudgetExceeded(Exception):
    """A search ran out of work units (deterministic) or past the wall-clock deadline (safety net).

    `found`: (count, size) int64 array, the largest cliques the search had listed when it stopped (all of
    one size, at least the `lower` it was given; cliques, maybe not maximum); count may be 0.
    """

    def __init__(self, reason: str, found: np.ndarray | None = None):
        super().__init__(reason)
        self.reason = reason
        self.found = np.zeros((0, 0), np.int64) if found is None else found


def all_max_cliques(adj: np.ndarray, candidates: np.ndarray, lower: int, budget: SearchBudget):
    """Every maximum clique of G[candidates], given that a clique of size `lower` exists.

    Args:
        adj: (m, W) uint64 bitset adjacency (see `graph.py`).
        candidates: (W,) uint64 vertex set P to search.
        lower: size of a known clique of G (cliques smaller than it are not listed).
        budget: the threshold's budget; the units spent are taken from it.

    Returns:
        (omega, cliques): the maximum clique size and an (count, omega) int64 array of every maximum
        clique's vertices; count is 0 when no clique of P is larger than or as large as `lower`.

    Raises:
        BudgetExceeded: the budget ran out (or the wall-clock deadline passed) before the search ended;
            its `found` holds the cliques listed by then.
    """
    status, spent, best, found = _search(adj, candidates, lower, budget.left, budget.deadline)
    budget.left -= spent
    budget.spent += spent
    if status == BUDGET:
        raise BudgetExceeded("search budget exhausted", found)
    if status == TIME:
        raise BudgetExceeded("wall-clock time limit (safety net; machine-dependent)", found)
    return best, found


@njit(cache=True)
def _now():
    with objmode(t="float64"):
        t = time.perf_counter()
    return t


@njit(cache=True)
def _search(adj, p0, lower, units_left, deadline):
    """MCQ on an explicit stack. Depth d holds candidate set P[d] (word range lo[d]..hi[d]) and its
    branch list order/colour[start[d] .. pos[d]], branched from the highest colour down."""
    width = adj.shape[1]
    total = 0
    for t in range(width):
        total += popcount(p0[t])
    depth_cap = total + 2
    P = np.zeros((depth_cap, width), np.uint64)
    lo = np.zeros(depth_cap, np.int64)
    hi = np.zeros(depth_cap, np.int64)
    start = np.zeros(depth_cap + 1, np.int64)
    pos = np.zeros(depth_cap, np.int64)
    clique = np.zeros(depth_cap, np.int64)
    cap = max(1024, 4 * total)
    order = np.empty(cap, np.int64)
    colour = np.empty(cap, np.int64)
    found = np.empty((16, depth_cap), np.int64)
    count = 0
    uncoloured = np.empty(width, np.uint64)
    q = np.empty(width, np.uint64)
    listed = np.empty(width + 1, np.int64)
    best = lower
    spent = 0
    nodes = 0
    P[0] = p0
    first, last = width, -1
    for t in range(width):
        if p0[t]:
            first = min(first, t)
            last = t
    if last < 0:
        return DONE, 0, best, found[:0, :best]
    lo[0], hi[0] = first, last + 1
    d = 0
    entering = True
    while True:
        if entering:  # a new node at depth d: pay, then colour P[d]
            entering = False
            units = 0
            for t in range(lo[d], hi[d]):
                units += popcount(P[d, t])
            spent += units
            if spent > units_left:  # what was listed so far: cliques of size best, maybe not maximum
                return BUDGET, spent, best, found[:count, :best]
            nodes += 1
            if nodes & 1023 == 0 and _now() > deadline:
                return TIME, spent, best, found[:count, :best]
            base = start[d]
            if base + units > cap:
                while base + units > cap:
                    cap *= 2
                grown = np.empty(cap, np.int64)
                grown[:base] = order[:base]
                order = grown
                grown = np.empty(cap, np.int64)
                grown[:base] = colour[:base]
                colour = grown
            kmin = best - d
            a, b = lo[d], hi[d]
            uncoloured[a:b] = P[d, a:b]
            ulo = a
            left = units
            cnt = 0
            k = 0
            while left:
                k += 1
                while uncoloured[ulo] == 0:
                    ulo += 1
                q[ulo:b] = uncoloured[ulo:b]
                qlo = ulo
                qcount = left
                # colour class k: repeatedly the lowest vertex v of q, then q -= N(v) + v. On bitsets
                # while q has at least as many vertices as words (or the rows are short), then on a
                # list of q's vertices: on long rows that reads far fewer words (measured 1.9x faster
                # at 30,000 vertices, no gain below ~8,000).
                while qcount >= b - qlo or (qcount and b - a < 128):
                    while q[qlo] == 0:
                        qlo += 1
                    bit = np.uint64(lowest_bit(q[qlo]))
                    v = qlo * 64 + np.int64(bit)
                    q[qlo] &= ~(_ONE << bit)
                    qcount = 0
                    for t in range(qlo, b):
                        x = q[t] & ~adj[v, t]
                        q[t] = x
                        qcount += popcount(x)
                    uncoloured[qlo] &= ~(_ONE << bit)
                    left -= 1
                    if k >= kmin:
                        order[base + cnt] = v
                        colour[base + cnt] = k
                        cnt += 1
                size = 0
                for t in range(qlo, b):
                    x = q[t]
                    while x:
                        listed[size] = t * 64 + lowest_bit(x)
                        size += 1
                        x &= x - _ONE
                while size:
                    v = listed[0]
                    uncoloured[v >> 6] &= ~(_ONE << np.uint64(v & 63))
                    left -= 1
                    if k >= kmin:
                        order[base + cnt] = v
                        colour[base + cnt] = k
                        cnt += 1
                    kept = 0
                    for i in range(1, size):
                        u = listed[i]
                        if not (adj[v, u >> 6] >> np.uint64(u & 63)) & _ONE:
                            listed[kept] = u
                            kept += 1
                    size = kept
            start[d + 1] = base + cnt
            pos[d] = base + cnt - 1
        i = pos[d]
        if i < start[d] or d + colour[i] < best:  # node finished (or cut): back to the parent
            if d == 0:
                return DONE, spent, best, found[:count, :best]
            d -= 1
            v = order[pos[d]]
            P[d, v >> 6] &= ~(_ONE << np.uint64(v & 63))
            pos[d] -= 1
            continue
        v = order[i]
        clique[d] = v
        first, last = width, -1
        for t in range(lo[d], hi[d]):
            x = P[d, t] & adj[v, t]
            P[d + 1, t] = x
            if x:
                first = min(first, t)
                last = t
        if last >= 0:  # branch into the child P[d] & N(v)
            lo[d + 1], hi[d + 1] = first, last + 1
            d += 1
            entering = True
            continue
        size = d + 1  # a maximal clique: record it if maximum so far
        if size > best:
            best = size
            count = 0
        if size == best:
            if count == found.shape[0]:
                grown2 = np.empty((2 * count, depth_cap), np.int64)
                grown2[:count] = found[:count]
                found = grown2
            found[count, :size] = clique[:size]
            count += 1
        P[d, v >> 6] &= ~(_ONE << np.uint64(v & 63))
        pos[d] -= 1
