"""What a peel does when its threshold's work budget runs out: keep the cliques found, peel the rest greedily.

The exact search (`maxclique.all_max_cliques`) lists cliques of the best size found so far as it goes;
when the budget runs out, those are still cliques (of a size at least the greedy lower bound), just not
proven maximum. The peel keeps the best of them, or a greedy clique when none was listed, and every
later search of that threshold is replaced by the greedy clique (the budget is spent). Such a peel
is "approximate": its cliques are cliques, their sizes lower bounds of the exact peel's.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .graph import lowest_bit, popcount

_ONE = np.uint64(1)


@njit(cache=True)
def greedy_clique(adj, verts):
    """A maximal clique of G[verts], built greedily: add the candidate with the most candidate neighbours
    (lowest vertex on ties), keep its neighbours as candidates, repeat (`graph.greedy_clique_size`'s
    rule, returning the members; degrees are recounted each step: O(size * V * W), a fallback only).

    Args:
        adj: (m, W) uint64 bitset adjacency. verts: int64 vertex ids, increasing, non-empty.

    Returns:
        int64 array of the clique's vertices, increasing.
    """
    width = adj.shape[1]
    cand = np.zeros(width, np.uint64)
    for v in verts:
        cand[v >> 6] |= _ONE << np.uint64(v & 63)
    chosen = np.empty(len(verts), np.int64)
    size = 0
    while True:
        best_v, best_d = -1, -1
        for t in range(width):
            x = cand[t]
            while x:
                v = t * 64 + lowest_bit(x)
                x &= x - _ONE
                d = 0
                for u in range(width):
                    d += popcount(adj[v, u] & cand[u])
                if d > best_d:
                    best_v, best_d = v, d
        if best_v < 0:
            break
        chosen[size] = best_v
        size += 1
        for t in range(width):
            cand[t] &= adj[best_v, t]
    return np.sort(chosen[:size])


def fallback_clique(adj: np.ndarray, verts: np.ndarray, found: np.ndarray, key) -> tuple[tuple, np.ndarray]:
    """The clique an approximate peel takes from a part: the best (by `key`) of the cliques the search
    listed before its budget ran out (`found`, rows of frame vertices) and the greedy clique of `verts`.

    Returns:
        (its canonical key, its frame vertices, increasing).
    """
    options = [greedy_clique(adj, np.asarray(verts, np.int64))]
    options += [np.sort(row) for row in found]
    ranked = sorted((key(c), i) for i, c in enumerate(options))
    return ranked[0][0], options[ranked[0][1]]
