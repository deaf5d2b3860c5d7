"""Thresholded similarity graphs as packed bitsets, and the bitset graph kernels the search uses.

A graph on m vertices is an (m, W) uint64 array, W = ceil(m / 64): bit j % 64 of word j // 64 of row i
is set when i and j are adjacent (never on the diagonal). A vertex set is one (W,) uint64 row.

`pack_graph` builds G_k = {level >= k} from the quantised similarity levels (`levels.py`), in row
blocks with NumPy on the CPU; `pack_graph_torch` is its twin for levels held on a GPU (it runs on any
torch device, so the CPU tests check it bit for bit). The kernels (components, k-core, greedy clique,
induced subgraph) are compiled with numba and single-threaded; all scan vertices in increasing order,
so their results are well defined and do not depend on the representation (a compacted induced
subgraph keeps the vertex order).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

_ONE = np.uint64(1)
_ZERO = np.uint64(0)


@intrinsic
def popcount(typingctx, x):
    """Number of set bits of a uint64, as an int64 (LLVM ctpop: one POPCNT instruction). int64, not
    uint64: numba turns int64 + uint64 into float64."""
    if x != types.uint64:
        return None

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return types.int64(types.uint64), codegen


@intrinsic
def lowest_bit(typingctx, x):
    """Index of the lowest set bit of a non-zero uint64, as an int64 (LLVM cttz: one TZCNT instruction)."""
    if x != types.uint64:
        return None

    def codegen(context, builder, signature, args):
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 1))

    return types.int64(types.uint64), codegen


def words(m: int) -> int:
    """W, the uint64 words per bitset row of an m-vertex graph."""
    return (m + 63) // 64


# ---------------------------------------------------------------------------------------------------
# G_k from the levels
# ---------------------------------------------------------------------------------------------------


def pack_graph(levels: np.ndarray, k: int, out: np.ndarray, block: int = 64) -> np.ndarray:
    """G_k = {levels >= k} as bitset rows, written into `out` (reused between thresholds).

    Args:
        levels: (n, n) uint8/uint16 symmetric level matrix, zero diagonal.
        k: the threshold's level, >= 1 (so the diagonal is never an edge).
        out: (n, W) uint64 array to fill.
        block: rows per NumPy step: the temporary boolean block (block * n bytes) stays in cache
            (64 rows: 2.4x faster than 2048 at n = 20,000, measured).

    Returns:
        `out`.
    """
    n = levels.shape[0]
    out8 = out.view(np.uint8)  # little-endian words: byte b of word w holds vertices 64w + 8b ..
    width = (n + 7) // 8
    out8[:, width:] = 0
    for i in range(0, n, block):
        out8[i : i + block, :width] = np.packbits(levels[i : i + block] >= k, axis=1, bitorder="little")
    return out


def pack_graph_torch(levels, k: int, out: np.ndarray, block: int = 4096) -> np.ndarray:
    """Twin of `pack_graph` for a torch level matrix on any device (a GPU: only n*n/8 bytes cross).

    Same arguments and result as `pack_graph`; `levels` is an (n, n) torch.uint8/int16 tensor.
    """
    import torch  # heavy: torch, only for GPU descriptors; clustering is torch-free

    n = levels.shape[0]
    out8 = out.view(np.uint8)
    width = out8.shape[1]
    weights = (1 << torch.arange(8, device=levels.device, dtype=torch.int32)).to(torch.uint8)
    for i in range(0, n, block):
        bits = levels[i : i + block] >= k
        bits = torch.nn.functional.pad(bits, (0, width * 8 - n)).view(bits.shape[0], width, 8)
        out8[i : i + block] = (bits.to(torch.uint8) * weights).sum(-1, dtype=torch.uint8).cpu().numpy()
    return out


# ---------------------------------------------------------------------------------------------------
# Kernels on bitset graphs
# ---------------------------------------------------------------------------------------------------


@njit(cache=True)
def set_of(indices, m):
    """The vertex set {indices} of an m-vertex graph as a (W,) bitset."""
    s = np.zeros((m + 63) // 64, np.uint64)
    for v in indices:
        s[v >> 6] |= _ONE << np.uint64(v & 63)
    return s


@njit(cache=True)
def members(s):
    """The vertices of bitset `s`, increasing, as an int64 array."""
    count = 0
    for w in range(s.shape[0]):
        count += popcount(s[w])
    out = np.empty(count, np.int64)
    i = 0
    for w in range(s.shape[0]):
        x = s[w]
        while x:
            out[i] = w * 64 + lowest_bit(x)
            i += 1
            x &= x - _ONE
    return out


@njit(cache=True)
def components(adj, mask):
    """Connected components of G[mask], numbered in order of their lowest vertex, with a spanning forest.

    Returns (labels (m,) int64: component number, -1 outside `mask`; number of components; parent
    (m,) int64: each vertex's parent in a search tree of its component, -1 at the roots and outside).
    Cost: one pass over W words per vertex reached (bitset graph search).
    """
    m, width = adj.shape
    labels = np.full(m, -1, np.int64)
    parent = np.full(m, -1, np.int64)
    rest = mask.copy()
    stack = np.empty(m, np.int64)
    count = 0
    for w in range(width):
        while rest[w]:
            root = w * 64 + lowest_bit(rest[w])
            rest[w] &= ~(_ONE << np.uint64(root & 63))
            labels[root] = count
            stack[0] = root
            top = 1
            while top:
                top -= 1
                u = stack[top]
                for t in range(width):
                    x = adj[u, t] & rest[t]
                    if x:
                        rest[t] &= ~x
                        while x:
                            v = t * 64 + lowest_bit(x)
                            x &= x - _ONE
                            labels[v] = count
                            parent[v] = u
                            stack[top] = v
                            top += 1
            count += 1
    return labels, count, parent


@njit(cache=True)
def is_complete(adj, mask):
    """True when every two vertices of `mask` are adjacent."""
    size = 0
    for w in range(mask.shape[0]):
        size += popcount(mask[w])
    for v in members(mask):
        degree = 0
        for t in range(mask.shape[0]):
            degree += popcount(adj[v, t] & mask[t])
        if degree != size - 1:
            return False
    return True


@njit(cache=True)
def k_core(adj, mask, k):
    """The k-core of G[mask]: its largest subgraph of minimum degree >= k (unique), as a bitset.

    A clique of size s lies in the (s-1)-core. Peeling order does not change the core.
    """
    alive = mask.copy()
    if k <= 0:
        return alive
    width = mask.shape[0]
    verts = members(mask)
    degree = np.zeros(adj.shape[0], np.int64)
    queued = np.zeros(adj.shape[0], np.bool_)
    stack = np.empty(len(verts), np.int64)
    top = 0
    for v in verts:
        d = 0
        for t in range(width):
            d += popcount(adj[v, t] & mask[t])
        degree[v] = d
        if d < k:
            queued[v] = True
            stack[top] = v
            top += 1
    while top:
        top -= 1
        v = stack[top]
        alive[v >> 6] &= ~(_ONE << np.uint64(v & 63))
        for t in range(width):
            x = adj[v, t] & alive[t]
            while x:
                u = t * 64 + lowest_bit(x)
                x &= x - _ONE
                degree[u] -= 1
                if degree[u] < k and not queued[u]:
                    queued[u] = True
                    stack[top] = u
                    top += 1
    return alive


@njit(cache=True)
def greedy_clique_size(adj, mask):
    """Size of a maximal clique of G[mask] built greedily: add the candidate with the most candidate
    neighbours (lowest vertex on ties), keep its neighbours as candidates, repeat. A lower bound for
    the maximum clique.

    Degrees within the candidates are kept up to date by subtracting the dropped vertices' edges (or
    recounted, whichever touches fewer rows): O(V * W) in all instead of O(V * W) per step.
    """
    width = mask.shape[0]
    cand = mask.copy()
    verts = members(cand)
    degree = np.zeros(adj.shape[0], np.int64)
    for v in verts:
        d = 0
        for t in range(width):
            d += popcount(adj[v, t] & cand[t])
        degree[v] = d
    size = 0
    while len(verts):
        best_v = verts[0]
        for v in verts:
            if degree[v] > degree[best_v]:
                best_v = v
        size += 1
        keep = np.empty(len(verts), np.bool_)
        for i in range(len(verts)):
            v = verts[i]
            keep[i] = (adj[best_v, v >> 6] >> np.uint64(v & 63)) & _ONE != 0
        for t in range(width):
            cand[t] &= adj[best_v, t]
        dropped = verts[~keep]
        verts = verts[keep]
        if len(dropped) <= len(verts):
            for r in dropped:
                for t in range(width):
                    x = adj[r, t] & cand[t]
                    while x:
                        degree[t * 64 + lowest_bit(x)] -= 1
                        x &= x - _ONE
        else:
            for v in verts:
                d = 0
                for t in range(width):
                    d += popcount(adj[v, t] & cand[t])
                degree[v] = d
    return size


@njit(cache=True)
def induced(adj, verts):
    """Adjacency of the subgraph induced by `verts` (increasing int64), relabelled 0..len-1 in order."""
    m = len(verts)
    width = (m + 63) // 64
    out = np.zeros((m, width), np.uint64)
    word = verts >> 6
    bit = (verts & 63).astype(np.uint64)
    for i in range(m):
        row = verts[i]
        for j in range(i + 1, m):
            if (adj[row, word[j]] >> bit[j]) & _ONE:
                out[i, j >> 6] |= _ONE << np.uint64(j & 63)
                out[j, i >> 6] |= _ONE << np.uint64(i & 63)
    return out


@njit(cache=True)
def edge_count(adj):
    """Number of edges (each counted once) of a symmetric bitset graph."""
    total = 0
    for i in range(adj.shape[0]):
        for t in range(adj.shape[1]):
            total += popcount(adj[i, t])
    return total // 2


# ---------------------------------------------------------------------------------------------------
# The same kernels on adjacency lists (CSR), for sparse graphs: O(V + E) instead of O(V * W)
# ---------------------------------------------------------------------------------------------------


@njit(cache=True)
def to_csr(adj):
    """Adjacency lists of a bitset graph: (indptr (m + 1,) int64, indices int32, increasing per row)."""
    m, width = adj.shape
    indptr = np.zeros(m + 1, np.int64)
    for i in range(m):
        d = 0
        for t in range(width):
            d += popcount(adj[i, t])
        indptr[i + 1] = indptr[i] + d
    indices = np.empty(indptr[m], np.int32)
    for i in range(m):
        j = indptr[i]
        for t in range(width):
            x = adj[i, t]
            while x:
                indices[j] = t * 64 + lowest_bit(x)
                j += 1
                x &= x - _ONE
    return indptr, indices


@njit(cache=True)
def components_csr(indptr, indices, verts):
    """`components` on adjacency lists, for the vertex set `verts` (increasing int64)."""
    m = len(indptr) - 1
    labels = np.full(m, -1, np.int64)
    parent = np.full(m, -1, np.int64)
    inside = np.zeros(m, np.bool_)
    for v in verts:
        inside[v] = True
    stack = np.empty(len(verts), np.int64)
    count = 0
    for root in verts:
        if labels[root] >= 0:
            continue
        labels[root] = count
        stack[0] = root
        top = 1
        while top:
            top -= 1
            u = stack[top]
            for j in range(indptr[u], indptr[u + 1]):
                v = indices[j]
                if inside[v] and labels[v] < 0:
                    labels[v] = count
                    parent[v] = u
                    stack[top] = v
                    top += 1
        count += 1
    return labels, count, parent


@njit(cache=True)
def _degrees_within(indptr, indices, verts, inside):
    degree = np.zeros(len(verts), np.int64)
    for i in range(len(verts)):
        v = verts[i]
        d = 0
        for j in range(indptr[v], indptr[v + 1]):
            if inside[indices[j]]:
                d += 1
        degree[i] = d
    return degree


@njit(cache=True)
def is_complete_csr(indptr, indices, verts):
    """`is_complete` on adjacency lists."""
    inside = np.zeros(len(indptr) - 1, np.bool_)
    for v in verts:
        inside[v] = True
    return bool(np.all(_degrees_within(indptr, indices, verts, inside) == len(verts) - 1))


@njit(cache=True)
def greedy_clique_size_csr(indptr, indices, verts):
    """`greedy_clique_size` on adjacency lists (the same choices, so the same size)."""
    inside = np.zeros(len(indptr) - 1, np.bool_)
    cand = verts.copy()
    for v in cand:
        inside[v] = True
    size = 0
    while len(cand):
        degree = _degrees_within(indptr, indices, cand, inside)
        best_v = cand[np.argmax(degree)]  # argmax: first, i.e. lowest vertex, on ties
        size += 1
        count = 0
        nxt = np.empty(indptr[best_v + 1] - indptr[best_v], np.int64)
        for j in range(indptr[best_v], indptr[best_v + 1]):
            if inside[indices[j]]:
                nxt[count] = indices[j]
                count += 1
        for v in cand:
            inside[v] = False
        cand = nxt[:count]
        for v in cand:
            inside[v] = True
    return size


@njit(cache=True)
def k_core_csr(indptr, indices, verts, k):
    """`k_core` on adjacency lists; returns the core's vertices, increasing."""
    m = len(indptr) - 1
    alive = np.zeros(m, np.bool_)
    for v in verts:
        alive[v] = True
    if k <= 0:
        return verts.copy()
    degree = np.zeros(m, np.int64)
    queued = np.zeros(m, np.bool_)
    stack = np.empty(len(verts), np.int64)
    top = 0
    d0 = _degrees_within(indptr, indices, verts, alive)
    for i in range(len(verts)):
        v = verts[i]
        degree[v] = d0[i]
        if d0[i] < k:
            queued[v] = True
            stack[top] = v
            top += 1
    while top:
        top -= 1
        v = stack[top]
        alive[v] = False
        for j in range(indptr[v], indptr[v + 1]):
            u = indices[j]
            if alive[u]:
                degree[u] -= 1
                if degree[u] < k and not queued[u]:
                    queued[u] = True
                    stack[top] = u
                    top += 1
    count = 0
    for v in verts:
        if alive[v]:
            count += 1
    out = np.empty(count, np.int64)
    i = 0
    for v in verts:
        if alive[v]:
            out[i] = v
            i += 1
    return out


# ---------------------------------------------------------------------------------------------------
# Components after a peel, from the spanning forest (decremental connectivity)
# ---------------------------------------------------------------------------------------------------
#
# A part C is connected and spanned by a tree (`parent`). Removing a clique K cuts the tree into
# pieces: each rest vertex belongs to the piece of its highest ancestor reached without passing through
# K. Pieces are connected; two pieces are in one component of C - K exactly when edges join them, and
# every edge between pieces has an end outside the largest piece, so only the other pieces' edges are
# scanned (cheap: a peeled clique's subtrees are usually small). Each joining edge found also relinks
# the forest (the joined tree is re-rooted at the edge's end), so `parent` spans the new components.
# The components are the same sets a full search gives, numbered in the same order.


@njit(cache=True)
def _pieces(parent, verts, removed):
    """Piece root of each vertex of `verts` (frame-size array, -1 elsewhere); roots get parent -1."""
    piece = np.full(len(parent), -1, np.int64)
    stack = np.empty(len(verts), np.int64)
    for v in verts:
        top = 0
        u = v
        while piece[u] < 0:
            p = parent[u]
            if p < 0 or removed[p]:
                parent[u] = -1
                piece[u] = u
                break
            stack[top] = u
            top += 1
            u = p
        root = piece[u]
        for i in range(top):
            piece[stack[i]] = root
    return piece


@njit(cache=True)
def _find(uf, a):
    while uf[a] != a:
        uf[a] = uf[uf[a]]
        a = uf[a]
    return a


@njit(cache=True)
def _join(parent, uf, piece, v, w):
    """Merge the sets of v and w if they differ, hanging v's tree (re-rooted at v) under w."""
    a, b = _find(uf, piece[v]), _find(uf, piece[w])
    if a == b:
        return
    previous, u = -1, v
    while u >= 0:  # re-root v's tree at v: reverse the path to its root
        nxt = parent[u]
        parent[u] = previous
        previous, u = u, nxt
    parent[v] = w
    uf[a] = b


@njit(cache=True)
def _largest_piece(piece, verts):
    size = np.zeros(len(piece), np.int64)
    big, best = -1, -1
    for v in verts:
        r = piece[v]
        size[r] += 1
        if size[r] > best:
            big, best = r, size[r]
    return big


@njit(cache=True)
def _numbered(uf, piece, verts):
    """Component number of each vertex of `verts`, in order of the components' lowest vertex."""
    number = np.full(len(piece), -1, np.int64)
    labels = np.empty(len(verts), np.int64)
    count = 0
    for i in range(len(verts)):
        r = _find(uf, piece[verts[i]])
        if number[r] < 0:
            number[r] = count
            count += 1
        labels[i] = number[r]
    return labels, count


@njit(cache=True)
def split_rest_csr(indptr, indices, parent, verts, removed):
    """Components of a part's rest `verts` (increasing) after removing `removed` (bool, frame-size),
    given a spanning tree `parent` of the part (updated to span the components). Returns (labels
    aligned with `verts`, count)."""
    piece = _pieces(parent, verts, removed)
    big = _largest_piece(piece, verts)
    uf = np.arange(len(parent))
    for v in verts:
        if piece[v] == big:
            continue
        for j in range(indptr[v], indptr[v + 1]):
            w = indices[j]
            if piece[w] >= 0:
                _join(parent, uf, piece, v, w)
    return _numbered(uf, piece, verts)


@njit(cache=True)
def split_rest(adj, parent, verts, removed):
    """`split_rest_csr` on bitset rows."""
    piece = _pieces(parent, verts, removed)
    big = _largest_piece(piece, verts)
    uf = np.arange(len(parent))
    for v in verts:
        if piece[v] == big:
            continue
        for t in range(adj.shape[1]):
            x = adj[v, t]
            while x:
                w = t * 64 + lowest_bit(x)
                x &= x - _ONE
                if piece[w] >= 0:
                    _join(parent, uf, piece, v, w)
    return _numbered(uf, piece, verts)
