"""Clique clustering: equal to a plain networkx reference, recovers planted clusters, deterministic."""

from __future__ import annotations

import logging
import math
import threading

import networkx as nx
import numpy as np
import pytest

from finextract.clustering import cluster_descriptors, cluster_similarity, planted_descriptors
from finextract.similarity import similarity_matrix


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


# --- speed-ups and the GPU hints never change the answer -------------------------------------------

from finextract import clustering as C  # noqa: E402


def _same(a, b):
    assert (a.threshold, a.cliques, a.representatives, a.skipped, a.work, a.num_cliques) == (
        b.threshold,
        b.cliques,
        b.representatives,
        b.skipped,
        b.work,
        b.num_cliques,
    )


@pytest.mark.parametrize("budget", [None, 5_000])
def test_cpu_twin_of_gpu_hints_gives_same_answer(monkeypatch, budget):
    # The GPU path feeds cuGraph components and core numbers to the same search; its CPU twin (SciPy,
    # NumPy) must leave the answer, the skips and even the work count unchanged, including under skips.
    x, _ = planted_descriptors(200, 4, 20, dim=64, spread=0.6, seed=1)
    s = similarity_matrix(x).numpy()
    plain = cluster_similarity(s, 4, budget=budget)
    monkeypatch.setattr(C, "_graph_cpu", C._graph_cpu_twin)
    twin = cluster_similarity(s, 4, budget=budget)
    _same(plain, twin)
    if budget == 5_000:
        assert twin.skipped


def test_twin_hints_match_networkx():
    rng = np.random.default_rng(5)
    s = rng.random((60, 60)).astype(np.float32)
    s = np.triu(s, 1) + np.triu(s, 1).T
    g = C._graph_cpu_twin(s, 0.93)
    graph = nx.from_numpy_array((s >= np.float32(0.93)).astype(np.uint8))
    assert g.core.tolist() == [nx.core_number(graph)[v] for v in range(60)]
    parts = {frozenset(c) for c in nx.connected_components(graph)}
    assert {frozenset(C._bits(c)) for c in C._initial_components(g, 60)} == parts
    assert {frozenset(C._bits(c)) for c in C._components(g, (1 << 60) - 1)} == parts
    assert g.edges == graph.number_of_edges()


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
    calls = []
    search = C._all_max_cliques
    monkeypatch.setattr(C, "_all_max_cliques", lambda *a: calls.append(1) or search(*a))
    ours = cluster_similarity(s, groups)
    threshold, cliques = reference_clustering(s, groups)
    assert ours.threshold == pytest.approx(threshold) and ours.cliques == cliques
    # At t = 0.5 the graph is exactly the chained cliques (plus lone vertices): peel it directly.
    monkeypatch.setattr(C, "_all_max_cliques", search)
    calls.clear()
    g = C._graph_cpu(s, 0.5)
    monkeypatch.setattr(C, "_all_max_cliques", lambda *a: calls.append(1) or search(*a))
    n_cliques = groups + n - groups * size  # the planted cliques and the lone vertices
    peeled, _ = C._peel(g, C._Keys(s, np.arange(n)), n_cliques, C._Search(10**9, math.inf))
    assert sorted(list(k[2]) for k in peeled[:groups]) == [list(range(c * size, (c + 1) * size)) for c in range(groups)]
    assert len(peeled) == n_cliques
    assert len(calls) == 1  # one search listed all five maximum cliques; the rest were inherited


def test_start_threshold_without_square_copy_matches_percentile():
    rng = np.random.default_rng(2)
    for n in (7, 50, 301):
        s = rng.normal(0.2, 0.1, (n, n)).astype(np.float32)
        s = np.triu(s, 1) + np.triu(s, 1).T
        assert C._start_threshold(s, 0.01, exact_below=0) == C._start_threshold(s, 0.01)
        assert C._start_threshold(s, 0.001, exact_below=0) == C._start_threshold(s, 0.001)


def test_default_budget_grows_with_n_and_is_reported():
    assert C.default_budget(250) == 75_000 and C.default_budget(10**6) == C.BUDGET_CAP
    x, _ = planted_descriptors(100, 2, 20, dim=64, spread=0.5, seed=0)
    assert cluster_descriptors(x, 2).budget == C.default_budget(100)


@pytest.mark.gpu
def test_gpu_graph_matches_cpu_twin():
    import torch

    x, _ = planted_descriptors(300, 6, 20, dim=64, spread=0.6, seed=4)
    s = similarity_matrix(x).numpy()
    g_gpu = C._graph_gpu(torch.as_tensor(s, device="cuda"), 0.2)
    assert g_gpu is not None, "CuPy/cuDF/cuGraph not importable on this CUDA machine"
    g_cpu = C._graph_cpu_twin(s, 0.2)
    assert np.array_equal(g_gpu.packed, g_cpu.packed) and g_gpu.edges == g_cpu.edges
    assert np.array_equal(g_gpu.core, g_cpu.core)
    assert {frozenset(C._bits(c)) for c in C._initial_components(g_gpu, 300)} == {
        frozenset(C._bits(c)) for c in C._initial_components(g_cpu, 300)
    }
    _same(cluster_similarity(torch.as_tensor(s, device="cuda"), 6), cluster_similarity(s, 6))


def test_skips_log_one_info_summary_and_debug_details(caplog):
    x, _ = planted_descriptors(250, 5, 20, spread=0.6, seed=3)
    with caplog.at_level(logging.DEBUG, logger="finextract.clustering"):
        result = cluster_descriptors(x, 5, budget=20_000)
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    debugs = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG and "skipped:" in r.getMessage()]
    assert len(infos) == 1
    assert infos[0].startswith(f"clustering: {len(result.skipped)} threshold(s) skipped (search budget exhausted;")
    assert infos[0].endswith(f"chose {result.threshold:.2f}")
    assert len(debugs) == sum(not s["reason"].startswith("same graph") for s in result.skipped) > 0
