"""Clique clustering: equal to a plain networkx reference, recovers planted clusters, deterministic."""
from __future__ import annotations

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
        labels[perm[c * size:(c + 1) * size]] = c
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
    for (i, j, v) in [(0, 1, 0.6), (0, 2, 0.6), (1, 2, 0.9), (3, 4, 0.95), (3, 5, 0.95), (4, 5, 0.7)]:
        s[i, j] = s[j, i] = v
    result = cluster_similarity(s, 2)
    assert result.cliques == [[3, 4, 5], [0, 1, 2]]
    assert result.representatives == [3, 1]  # 3: mean 0.95; 1 and 2 tie at 0.75 -> smaller index


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="n0"):
        cluster_similarity(np.zeros((3, 3)), 4)
    with pytest.raises(ValueError, match="square"):
        cluster_similarity(np.zeros((3, 4)), 1)
