"""Clique clustering: equal to a plain networkx reference, recovers planted clusters, deterministic."""

from __future__ import annotations

import logging
import math
import threading

import networkx as nx
import numpy as np
import pytest
import torch

from finextract.clustering import cluster_descriptors, cluster_similarity
from finextract.similarity import similarity_matrix
from tests.planted import planted_descriptors


def _key(members, weights):
    members = sorted(int(v) for v in members)
    w = float(weights[np.ix_(members, members)].sum(dtype=np.float64)) / 2.0
    return (-len(members), -w, tuple(members))


def reference_clustering(s: np.ndarray, n0: int, step: float = 0.01):
    """The plain procedure: networkx maximal cliques, greedy maximum-clique peel at each threshold.

    Among maximum cliques it takes the canonical one (largest similarity sum, then smallest indices).
    Returns (threshold, N0 cliques as sorted index tuples, largest first).
    """
    s = s.astype(np.float32).copy()
    np.fill_diagonal(s, 0)
    n = len(s)
    off = s[~np.eye(n, dtype=bool)]
    k = max(math.floor(float(np.percentile(off, 25)) / step + 1e-9), 1)
    weights = s.astype(np.float64)
    while True:
        t = round(k * step, 10)
        a = s >= np.float32(t)
        np.fill_diagonal(a, False)
        graph = nx.from_numpy_array(a.astype(np.uint8))
        peeled = []
        while graph.number_of_nodes():
            cliques = list(nx.find_cliques(graph))
            omega = max(len(c) for c in cliques)
            best = min(_key(c, weights) for c in cliques if len(c) == omega)
            peeled.append(best)
            graph.remove_nodes_from(best[2])
        if len(peeled) >= n0:
            return t, [list(key[2]) for key in sorted(peeled)[:n0]]
        k += 1


def _assert_valid(result, s, n0):
    assert len(result.cliques) == n0 == len(result.representatives)
    seen = set()
    for clique, rep in zip(result.cliques, result.representatives):
        assert rep in clique
        assert not seen & set(clique)
        seen |= set(clique)
        for i in clique:
            for j in clique:
                assert i == j or s[i, j] >= np.float32(result.threshold)
    sizes = [len(c) for c in result.cliques]
    assert sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("seed", range(6))
def test_equals_reference_on_random_graphs(seed):
    rng = np.random.default_rng(seed)
    n = 30 + 5 * seed
    s = rng.random((n, n)).astype(np.float32)
    s = (s + s.T) / 2
    n0 = 4 + seed
    ours = cluster_similarity(s, n0)
    threshold, cliques = reference_clustering(s, n0)
    assert ours.skipped == []
    assert ours.threshold == pytest.approx(threshold)
    assert ours.cliques == cliques
    _assert_valid(ours, s, n0)


@pytest.mark.parametrize("seed", range(3))
def test_equals_reference_on_planted_descriptors(seed):
    x, _ = planted_descriptors(80, 3, 10, dim=64, spread=0.5, style=0.3, seed=seed)
    s = similarity_matrix(x).numpy()
    ours = cluster_descriptors(x, 3, budget=10_000_000)
    threshold, cliques = reference_clustering(s, 3)
    assert ours.skipped == []  # the reference needs no time limit here either: same problem solved
    assert ours.threshold == pytest.approx(threshold)
    assert [len(c) for c in ours.cliques] == [len(c) for c in cliques]
    assert ours.cliques == cliques
    _assert_valid(ours, s, 3)


def test_planted_clusters_recovered():
    # Tight near-duplicate clusters (similarity 0.7-0.95) among unrelated images (0-0.5, independent):
    # every extracted clique is exactly one planted cluster, and each representative belongs to it.
    rng = np.random.default_rng(0)
    n, n0, size = 200, 5, 20
    labels = np.full(n, -1)
    perm = rng.permutation(n)
    for c in range(n0):
        labels[perm[c * size : (c + 1) * size]] = c
    s = rng.uniform(0.0, 0.5, (n, n))
    same = (labels[:, None] == labels[None, :]) & (labels[:, None] >= 0)
    s[same] = rng.uniform(0.7, 0.95, same.sum())
    s = np.triu(s, 1)
    s = (s + s.T).astype(np.float32)
    result = cluster_similarity(s, n0)
    assert sorted(int(labels[c[0]]) for c in result.cliques) == list(range(n0))
    for clique, rep in zip(result.cliques, result.representatives):
        assert sorted(clique) == sorted(np.flatnonzero(labels == labels[clique[0]]).tolist())
        assert labels[rep] == labels[clique[0]]


def test_budget_skips_are_reported_and_deterministic():
    x, _ = planted_descriptors(250, 5, 20, spread=0.6, seed=3)
    first = cluster_descriptors(x, 5, budget=20_000)
    assert first.skipped and all("budget" in item["reason"] for item in first.skipped)
    assert first.skipped[0]["threshold"] == pytest.approx(first.start_threshold)
    assert first.threshold > first.start_threshold

    # Same answer with the machine loaded: a busy thread competes for the interpreter and the cores.
    stop = threading.Event()

    def burn():
        a = np.random.default_rng(0).random((200, 200))
        while not stop.is_set():
            a = a @ a.T
            a /= np.abs(a).max()

    thread = threading.Thread(target=burn, daemon=True)
    thread.start()
    try:
        second = cluster_descriptors(x, 5, budget=20_000)
    finally:
        stop.set()
        thread.join()
    assert second.threshold == first.threshold
    assert second.cliques == first.cliques
    assert second.skipped == first.skipped


def test_representative_and_tie_order():
    # Two disjoint triangles at threshold 0.5, the second tighter: it must come first (same size).
    s = np.zeros((7, 7), dtype=np.float32)
    for i, j, v in [(0, 1, 0.6), (0, 2, 0.6), (1, 2, 0.9), (3, 4, 0.95), (3, 5, 0.95), (4, 5, 0.7)]:
        s[i, j] = s[j, i] = v
    result = cluster_similarity(s, 2)
    assert result.cliques == [[3, 4, 5], [0, 1, 2]]
    assert result.representatives == [3, 1]  # 3: mean 0.95; 1 and 2 tie at 0.75 -> smaller index


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="n0"):
        cluster_similarity(np.zeros((3, 3)), 4)
    with pytest.raises(ValueError, match="square"):
        cluster_similarity(np.zeros((3, 4)), 1)


# --- the exact shortcuts never change the answer ---------------------------------------------------

from finextract.clustering import graph as G  # noqa: E402
from finextract.clustering import levels as LV  # noqa: E402
from finextract.clustering import maxclique as M  # noqa: E402
from finextract.clustering import sweep as S  # noqa: E402


def _same(a, b):
    assert (a.threshold, a.cliques, a.representatives, a.skipped, a.work, a.num_cliques) == (
        b.threshold,
        b.cliques,
        b.representatives,
        b.skipped,
        b.work,
        b.num_cliques,
    )


def _random_graph(rng, n, density):
    a = np.triu(rng.random((n, n)) < density, 1)
    a = a | a.T
    adj = np.zeros((n, G.words(n)), np.uint64)
    G.pack_graph(a.astype(np.uint8), 1, adj)
    return a, adj, nx.from_numpy_array(a.astype(np.uint8))


def test_levels_give_exactly_the_thresholded_graphs():
    # Entries exactly at each float32 threshold and one float32 step either side, plus random values:
    # level >= k must equal the float comparison S >= float32(round(k * 0.01, 10)) for every k.
    table = LV.threshold_table(0.01, 1.0)
    at = table[1:]
    values = np.concatenate(
        [at, np.nextafter(at, np.float32(-2)), np.nextafter(at, np.float32(2)), np.linspace(-1, 1, 997)]
    ).astype(np.float32)
    n = 64
    rng = np.random.default_rng(0)
    s = rng.choice(values, (n, n)).astype(np.float32)
    s = np.triu(s, 1) + np.triu(s, 1).T
    lv = LV.from_matrix(s, 0.01)
    original = lv.levels[np.ix_(np.argsort(lv.perm), np.argsort(lv.perm))]  # back to input order
    off = ~np.eye(n, dtype=bool)
    for k in range(1, len(lv.table)):
        assert np.array_equal((original >= k)[off], (s >= lv.table[k])[off]), k
        assert lv.table[k] == np.float32(round(k * 0.01, 10))
        assert lv.edges(k) == int(np.triu(s >= lv.table[k], 1).sum())
    assert np.array_equal(original, original.T) and not original.diagonal().any()


def test_histogram_bins_and_start_threshold_match_numpy_percentile():
    # The start threshold is floor(percentile_25 / step + 1e-9) of the off-diagonal entries; it is read
    # from a histogram whose bins are exact float32 comparisons (checked against the float64 formula),
    # and when the two order statistics straddle a bin edge the second pass must agree with NumPy.
    step = 0.01
    b_lo, edges = LV.bin_table(step, -1.05, 1.05)
    v = np.concatenate([edges[1:], np.nextafter(edges[1:], np.float32(-3)), np.linspace(-1.04, 1.04, 1001)])
    v = v.astype(np.float32)
    exact = np.array([math.floor(float(x) / step + 1e-9) for x in v])
    assert np.array_equal(np.searchsorted(edges[1:], v, side="right") + b_lo, exact)
    rng = np.random.default_rng(2)
    cases = [rng.normal(0.2, 0.1, (n, n)).astype(np.float32) for n in (2, 3, 7, 50, 301)]
    # n = 6: 15 pairs, the percentile interpolates sorted pairs 3 and 4 (gamma 0.25): 0.094 | 0.101
    pairs = np.array([0.05, 0.06, 0.07, 0.094, 0.101, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95])
    straddle = np.zeros((6, 6), np.float32)
    straddle[np.triu_indices(6, 1)] = pairs
    cases.append(straddle + straddle.T)
    for s in cases:
        s = np.triu(s, 1) + np.triu(s, 1).T
        n = len(s)
        q = float(np.percentile(s[~np.eye(n, dtype=bool)], 25))
        expected = max(math.floor(q / step + 1e-9), 1)
        assert LV.from_matrix(s, step).start == expected, n
    assert LV.from_matrix(cases[-1], step).start == 9  # q = 0.09575


def test_torch_twin_of_the_gpu_path_gives_the_same_levels_graphs_and_answer(monkeypatch):
    # On a CUDA input the levels are made by torch.bucketize and the graphs packed by torch; run that
    # same code on CPU tensors: identical levels, counts, start, bitsets and clustering (work included).
    x, _ = planted_descriptors(300, 4, 20, dim=64, spread=0.6, seed=1)
    plain = LV.from_descriptors(torch.as_tensor(x), 0.01, block=128)
    monkeypatch.setattr(LV, "_on_gpu", lambda device: True)
    twin = LV.from_descriptors(torch.as_tensor(x), 0.01, block=128)
    assert isinstance(twin.levels, torch.Tensor)
    assert np.array_equal(twin.levels.numpy(), plain.levels)
    assert np.array_equal(twin.pair_counts, plain.pair_counts) and twin.start == plain.start
    for k in range(plain.start, plain.start + 15):
        a = G.pack_graph(plain.levels, k, np.zeros((300, G.words(300)), np.uint64))
        b = G.pack_graph_torch(twin.levels, k, np.zeros((300, G.words(300)), np.uint64), block=64)
        assert np.array_equal(a, b), k
    twin_answers = [cluster_descriptors(x, 4), cluster_descriptors(x, 4, budget=5_000)]
    monkeypatch.undo()
    answers = [cluster_descriptors(x, 4), cluster_descriptors(x, 4, budget=5_000)]
    for a, b in zip(twin_answers, answers):
        _same(a, b)
    assert answers[1].skipped  # the budget case skips thresholds on both paths alike


def _sign_descriptors(n: int, clusters: int, size: int, seed: int) -> np.ndarray:
    """Unit descriptors with entries +-1/8 in 64 dimensions: every dot product is a multiple of 1/64,
    exact in float32 whatever the summation order, so any blocking or device gives the same S."""
    rng = np.random.default_rng(seed)
    signs = rng.choice([-1.0, 1.0], (n, 64))
    for c in range(clusters):
        centre = rng.choice([-1.0, 1.0], 64)
        flip = rng.random((size, 64)) < 0.15
        signs[c * size : (c + 1) * size] = np.where(flip, -centre, centre)
    return (signs / 8).astype(np.float32)


def test_blocking_does_not_change_the_answer():
    x = _sign_descriptors(260, 4, 20, seed=5)
    s = similarity_matrix(x).numpy()
    assert np.array_equal(s * 64, np.round(s * 64))  # the premise: exact products
    base = cluster_similarity(s, 4)
    for block in (7, 64, 100, 2048):
        levels = LV.from_descriptors(torch.as_tensor(x), 0.01, block)
        _same(S._sweep(levels, 4, 0.01, None, 30.0, False, 0.0), base)
    assert sorted(len(c) for c in base.cliques)[-1] >= 10  # a non-trivial answer


def test_bitset_and_list_kernels_match_networkx():
    rng = np.random.default_rng(5)
    for n, density in [(60, 0.07), (150, 0.3), (130, 0.6)]:
        a, adj, graph = _random_graph(rng, n, density)
        everything = np.arange(n)
        csr = G.to_csr(adj)
        assert G.edge_count(adj) == graph.number_of_edges() == len(csr[1]) // 2
        parts = {frozenset(c) for c in nx.connected_components(graph)}
        for labels, count, parent in (G.components(adj, G.set_of(everything, n)), G.components_csr(*csr, everything)):
            assert {frozenset(np.flatnonzero(labels == c).tolist()) for c in range(count)} == parts
            firsts = [int(np.flatnonzero(labels == c)[0]) for c in range(count)]
            assert firsts == sorted(firsts)  # numbered by lowest vertex
            roots = parent < 0
            assert all(a[v, parent[v]] for v in everything[~roots])  # a spanning forest of the graph
            assert roots.sum() == count
        core_numbers = nx.core_number(graph)
        for k in (0, 2, 5, 9):
            expected = sorted(v for v, c in core_numbers.items() if c >= k)
            assert G.members(G.k_core(adj, G.set_of(everything, n), k)).tolist() == expected
            assert G.k_core_csr(*csr, everything, k).tolist() == expected
        greedy = G.greedy_clique_size(adj, G.set_of(everything, n))
        assert greedy == G.greedy_clique_size_csr(*csr, everything)
        assert greedy <= max(len(c) for c in nx.find_cliques(graph))
        sub = np.sort(rng.choice(n, n // 3, replace=False))
        induced = np.unpackbits(G.induced(adj, sub).view(np.uint8), axis=1, bitorder="little")[:, : len(sub)]
        assert np.array_equal(induced.astype(bool), a[np.ix_(sub, sub)])


def test_all_maximum_cliques_match_networkx_and_honour_the_budget():
    rng = np.random.default_rng(7)
    for n, density in [(40, 0.2), (70, 0.5), (60, 0.8)]:
        _, adj, graph = _random_graph(rng, n, density)
        cliques = list(nx.find_cliques(graph))
        omega = max(len(c) for c in cliques)
        budget = M.SearchBudget(10**9, math.inf)
        size, found = M.all_max_cliques(adj, G.set_of(np.arange(n), n), 1, budget)
        assert size == omega
        assert {frozenset(c.tolist()) for c in found} == {frozenset(c) for c in cliques if len(c) == omega}
        assert budget.spent > 0 and budget.left == 10**9 - budget.spent
    small = M.SearchBudget(budget.spent - 1, math.inf)  # one unit short of the last search's work
    with pytest.raises(M.BudgetExceeded, match="budget"):
        M.all_max_cliques(adj, G.set_of(np.arange(n), n), 1, small)


def test_split_after_peeling_equals_a_fresh_search():
    # Removing cliques (here: any vertex sets) from a component and splitting with the spanning forest
    # gives the components networkx finds, in lowest-vertex order, with a forest that stays valid.
    rng = np.random.default_rng(3)
    for n, density in [(200, 0.012), (120, 0.05), (90, 0.2)]:
        a, adj, graph = _random_graph(rng, n, density)
        csr = G.to_csr(adj)
        for use_csr in (False, True):
            labels, count, parent = (
                G.components_csr(*csr, np.arange(n)) if use_csr else G.components(adj, G.set_of(np.arange(n), n))
            )
            alive = np.ones(n, bool)
            for _ in range(12):
                comp = int(labels[rng.choice(np.flatnonzero(alive))])
                verts = np.flatnonzero(alive & (labels == comp))
                removed = np.zeros(n, bool)
                removed[rng.choice(verts, min(len(verts), int(rng.integers(1, 4))), replace=False)] = True
                rest = verts[~removed[verts]]
                alive &= ~removed
                if not len(rest):
                    continue
                if use_csr:
                    sub, count = G.split_rest_csr(*csr, parent, rest, removed)
                else:
                    sub, count = G.split_rest(adj, parent, rest, removed)
                expected = [sorted(c) for c in nx.connected_components(graph.subgraph(rest.tolist()))]
                got = [rest[sub == c].tolist() for c in range(count)]
                assert got == sorted(expected, key=lambda c: c[0])
                assert all(a[v, parent[v]] for v in rest if parent[v] >= 0)
                assert (parent[rest] < 0).sum() == count
                labels[rest] = sub + labels.max() + 1


def test_inherited_cliques_skip_searches_and_match_reference(monkeypatch):
    # Five 6-cliques chained by single edges into one component, plus noise edges: after the first
    # clique is peeled the rest inherits the other maximum cliques, so far fewer searches than cliques.
    rng = np.random.default_rng(0)
    n, size, groups = 40, 6, 5
    s = rng.uniform(0.0, 0.4, (n, n))
    for c in range(groups):
        idx = np.arange(c * size, (c + 1) * size)
        s[np.ix_(idx, idx)] = rng.uniform(0.6, 0.9, (size, size))
        if c:
            s[c * size - 1, c * size] = 0.55  # bridge to the previous group
    s = np.triu(s, 1)
    s = (s + s.T).astype(np.float32)
    ours = cluster_similarity(s, groups)
    threshold, cliques = reference_clustering(s, groups)
    assert ours.threshold == pytest.approx(threshold) and ours.cliques == cliques
    # At t = 0.5 the graph is exactly the chained cliques (plus lone vertices): peel it directly.
    levels = LV.from_matrix(s, 0.01)
    adj = G.pack_graph(levels.levels, 50, np.zeros((n, G.words(n)), np.uint64))
    calls = []
    search = M.all_max_cliques
    monkeypatch.setattr(M, "all_max_cliques", lambda *a: calls.append(1) or search(*a))
    n_cliques = groups + n - groups * size  # the planted cliques and the lone vertices
    peeled, _ = S._peel(adj, S._Keys(levels), n_cliques, M.SearchBudget(10**9, math.inf))
    assert sorted(list(k[2]) for k in peeled[:groups]) == [list(range(c * size, (c + 1) * size)) for c in range(groups)]
    assert len(peeled) == n_cliques
    assert len(calls) == 1  # one search listed all five maximum cliques; the rest were inherited


def test_unnormalised_and_float64_descriptors_are_normalised_with_a_warning(caplog):
    x, _ = planted_descriptors(120, 3, 15, dim=64, spread=0.5, seed=2)
    expected = cluster_descriptors(x, 3)
    scale = np.random.default_rng(0).uniform(2.0, 30.0, (len(x), 1)).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="finextract.similarity"):
        scaled = cluster_descriptors(x * scale, 3)
    assert any("not L2-normalised" in r.getMessage() for r in caplog.records)
    assert scaled.cliques == expected.cliques
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="finextract.similarity"):
        as64 = cluster_descriptors(x.astype(np.float64), 3)
    assert any("float64" in r.getMessage() for r in caplog.records)
    _same(as64, expected)  # float64 -> float32 is exact for float32 values: the same answer
    x[5] = 0
    with pytest.raises(ValueError, match="all-zero"):
        cluster_descriptors(x, 3)
    with pytest.raises(ValueError, match="floating point"):
        cluster_descriptors(np.ones((4, 3), dtype=np.int64), 1)


def test_default_budget_grows_with_n_and_is_reported():
    assert S.default_budget(250) == 75_000 and S.default_budget(10**6) == S.BUDGET_CAP
    x, _ = planted_descriptors(100, 2, 20, dim=64, spread=0.5, seed=0)
    assert cluster_descriptors(x, 2).budget == S.default_budget(100)


@pytest.mark.gpu
def test_gpu_levels_and_answer_match_cpu():
    x = _sign_descriptors(3000, 6, 20, seed=4)  # exact products: the GPU's S equals the CPU's
    cpu = LV.from_descriptors(torch.as_tensor(x), 0.01)
    gpu = LV.from_descriptors(torch.as_tensor(x, device="cuda"), 0.01)
    assert gpu.levels.is_cuda
    assert np.array_equal(gpu.levels.cpu().numpy(), cpu.levels) and gpu.start == cpu.start
    _same(cluster_descriptors(torch.as_tensor(x, device="cuda"), 6), cluster_descriptors(x, 6))


def test_skips_log_one_info_summary_and_debug_details(caplog):
    x, _ = planted_descriptors(250, 5, 20, spread=0.6, seed=3)
    with caplog.at_level(logging.DEBUG, logger="finextract.clustering"):
        result = cluster_descriptors(x, 5, budget=20_000)
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    debugs = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG and "skipped:" in r.getMessage()]
    assert len(infos) == 1
    assert infos[0].startswith(f"clustering: {len(result.skipped)} threshold(s) skipped (search budget exhausted;")
    assert "expected, not an error" in infos[0] and infos[0].endswith(f"chose {result.threshold:.2f}")
    assert len(debugs) == sum(not s["reason"].startswith("same graph") for s in result.skipped) > 0
