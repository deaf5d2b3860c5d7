"""A threshold whose work budget runs out keeps its cliques (`on_budget`), and the selection rules."""

from __future__ import annotations

import itertools

import networkx as nx
import numpy as np
import pytest
import torch

from finextract.clustering import cluster_descriptors, cluster_similarity
from finextract.clustering.levels import from_matrix
from finextract.clustering.selection import MODE_NEIGHBOURS, MODE_RADIUS, density_score, modes, select
from finextract.clustering.sweep import _Keys

EDGE, NON_EDGE = 0.605, 0.595  # an edge of G_0.60 and not of G_0.61; below 0.60: no edge
BUDGET = 2_000  # units: far below what proving the maximum clique of the noisy graph needs


def adversarial_matrix(noise: int = 60, p_noise: float = 0.4, p_cross: float = 0.2, seed: int = 0) -> np.ndarray:
    """Two disjoint 30-cliques (vertices 0-29, 30-59) and `noise` random vertices at 0.60.

    Every entry is EDGE or NON_EDGE: the 25th percentile (a NON_EDGE) starts the sweep at 0.59, where
    the graph is complete (1 clique); G_0.60 is the adversarial graph; G_0.61 has no edge.
    """
    rng = np.random.default_rng(seed)
    n = 60 + noise
    p = np.full((n, n), p_cross)
    p[60:, 60:] = p_noise
    p[:30, :30] = p[30:60, 30:60] = 1.0
    p[:30, 30:60] = p[30:60, :30] = 0.0
    upper = np.triu(rng.random((n, n)) < p, 1)
    s = np.where(upper | upper.T, EDGE, NON_EDGE).astype(np.float32)
    np.fill_diagonal(s, 1.0)
    return s


def test_budget_exhaustion_keeps_the_threshold_cliques():
    s = adversarial_matrix()
    graph = nx.from_numpy_array((s >= np.float32(0.60)) & ~np.eye(len(s), dtype=bool))
    # networkx: the two 30-cliques are the only maximum cliques of G_0.60
    maximum = [sorted(c) for c in nx.find_cliques(graph) if len(c) == 30]
    assert sorted(maximum) == [list(range(30)), list(range(30, 60))]
    assert max(len(c) for c in nx.find_cliques(graph)) == 30

    # today's rule (the paper's): 0.60 is skipped, 0.61 gives three one-image cliques
    skipped = cluster_similarity(s, 3, budget=BUDGET)
    assert [t["threshold"] for t in skipped.skipped] == [0.6]
    assert skipped.threshold == 0.61 and [len(c) for c in skipped.cliques] == [1, 1, 1]
    assert skipped.skipped[0]["approximate_sizes"][:2] == [30, 30]

    kept = cluster_similarity(s, 3, budget=BUDGET, on_budget="keep")
    assert kept.threshold == 0.6 and not kept.skipped
    assert [a["threshold"] for a in kept.approximate] == [0.6] and "budget" in kept.approximate[0]["reason"]
    assert kept.cliques[:2] == [list(range(30)), list(range(30, 60))]
    for clique in kept.cliques:  # each really is a clique of G_0.60
        assert all(graph.has_edge(a, b) for a, b in itertools.combinations(clique, 2))
    # with budget enough for the exact search, "keep" changes nothing: same peel, nothing approximate
    exact = cluster_similarity(s, 3, budget=10**9, on_budget="keep")
    assert exact.approximate == [] and exact.threshold == 0.6 and exact.cliques[:2] == kept.cliques[:2]


def test_budget_skip_warns_about_one_image_answer(caplog):
    with caplog.at_level("WARNING", logger="finextract.clustering"):
        cluster_similarity(adversarial_matrix(), 3, budget=BUDGET)
    assert any("--on-budget keep" in r.getMessage() and "0.60" in r.getMessage() for r in caplog.records)


def blocks(sizes_and_values: list[tuple[int, float]], background: float = 0.1, total: int = 40) -> np.ndarray:
    """A similarity matrix of disjoint blocks (size, within-block similarity) and background pairs."""
    s = np.full((total, total), background, np.float32)
    start = 0
    for size, value in sizes_and_values:
        s[start : start + size, start : start + size] = value
        start += size
    np.fill_diagonal(s, 1.0)
    return s


def test_density_ranks_tight_cliques_first():
    # A 6-clique at 0.30 (score 6 x 0.30 = 1.8) against a 4-clique at 0.95 (4 x 0.95 = 3.8)
    s = blocks([(6, 0.30), (4, 0.95), (3, 0.25)])
    by_size = cluster_similarity(s, 2)
    by_density = cluster_similarity(s, 2, selection="density")
    assert by_size.threshold == by_density.threshold  # the same threshold, another ranking
    assert [len(c) for c in by_size.cliques] == [6, 4]
    assert by_density.cliques[0] == [6, 7, 8, 9] and by_density.selection == "density"
    # 2 W / (size - 1) with W the similarity sum over pairs: 4-clique at 0.95 -> 2 * 6 * 0.95 / 3
    assert density_score((-4, -6 * 0.95, ())) == pytest.approx(3.8)


def test_merged_joins_cliques_of_similar_representatives():
    # A (0-4) and B (5-9) are 5-cliques at 0.9 whose cross pairs are 0.3, but for their representatives'
    # (0 and 5: ties go to the smallest index) at 0.9; C (10-12) a 3-clique at 0.8; 13-19 background.
    s = blocks([(5, 0.9), (5, 0.9), (3, 0.8)], background=0.05, total=20)
    s[:5, 5:10] = s[5:10, :5] = 0.3
    s[0, 5] = s[5, 0] = 0.9
    keys = _Keys(from_matrix(s, 0.01))
    peeled = [
        keys.key(keys.inv[m]) for m in ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12], *([v] for v in range(13, 20)))
    ]
    assert select("size", peeled, 2, 0.6, keys) == ([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], [0, 5])
    assert select("merged", peeled, 3, 0.6, keys) == ([list(range(10)), [10, 11, 12], [13]], [0, 10, 13])
    assert select("merged", peeled[:2], 2, 0.6, keys) is None  # one group: the sweep must go on
    assert select("merged", peeled[:2], 2, 0.95, keys) == ([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], [0, 5])


def test_unknown_rules_are_refused():
    s = blocks([(3, 0.9)])
    with pytest.raises(ValueError, match="--selection 'largest'"):
        cluster_similarity(s, 1, selection="largest")
    with pytest.raises(ValueError, match="--on-budget 'drop'"):
        cluster_similarity(s, 1, on_budget="drop")


def test_modes_picks_one_image_per_group_of_near_copies():
    # A (0-7) at 0.95, B (8-11) at 0.9, C (12-14) at 0.85, the rest at 0.1: "size" and "modes" agree on
    # the groups here; "modes" takes the densest image of each (ties: the smallest index) and no second
    # image of a group (every pair inside one is above MODE_RADIUS = 0.5).
    s = blocks([(8, 0.95), (4, 0.9), (3, 0.85)], background=0.1, total=20)
    result = cluster_similarity(s, 3, selection="modes")
    assert result.representatives == [0, 8, 12] and result.selection == "modes"
    assert result.cliques == [list(range(8)), [8, 9, 10, 11], [12, 13, 14]]
    assert result.threshold == MODE_RADIUS
    # N0 beyond the groups: the background images (density 0.1, all below the radius) fill up in order
    assert cluster_similarity(s, 5, selection="modes").representatives == [0, 8, 12, 15, 16]


def test_modes_against_networkx():
    # Independent reference: density from the whole matrix (np.sort, float64), the graph G_radius in
    # networkx, and the greedy pass written over it. With N0 large the pass runs out of candidates:
    # its picks are then a maximal independent set of G_radius, checked with networkx's own functions.
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(6, 64))
    x = np.repeat(centres, 12, axis=0) + rng.normal(scale=1.2, size=(72, 64))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    s = x.astype(np.float64) @ x.T.astype(np.float64)
    off = ~np.eye(len(s), dtype=bool)
    # float32 rows may round differently from these float64 ones by ~1e-7: keep every entry clear of
    # the radius, and every density gap clear of rounding, so that the order and the graph are exact
    assert np.abs(s[off] - MODE_RADIUS).min() > 1e-5
    density = np.sort(np.where(off, s, -np.inf), axis=1)[:, ::-1][:, :MODE_NEIGHBOURS].mean(1)
    assert np.diff(np.sort(density)).min() > 1e-6
    graph = nx.from_numpy_array((s >= MODE_RADIUS) & off)
    independent = []
    for i in np.argsort(-density):
        if not any(graph.has_edge(int(i), j) for j in independent):
            independent.append(int(i))
    assert graph.subgraph(independent).number_of_edges() == 0 and nx.is_dominating_set(graph, independent)
    assert 5 <= len(independent) < 40
    for n0 in (5, len(independent), 40):
        rest = [int(i) for i in np.argsort(-density) if i not in independent]
        want = independent[:n0] + rest[: max(0, n0 - len(independent))]
        from_descriptors = cluster_descriptors(torch.from_numpy(x), n0, selection="modes")
        assert from_descriptors.representatives == want
        assert cluster_similarity(s.astype(np.float32), n0, selection="modes").representatives == want
        # blocks of 7 rows give the same answer as one block
        assert modes(lambda lo, hi: s[lo:hi], len(s), n0, block=7)[1] == want
        # every image within the radius of a pick is in some pick's group, and in its most similar pick's
        for group, pick in zip(from_descriptors.cliques, want):
            for j in group:
                assert s[j, pick] >= MODE_RADIUS or j == pick
                assert s[j, pick] == max(s[j, p] for p in want)


def test_the_log_line_names_what_the_rule_found():
    """`extract` and `cluster` log `selection_summary()`: a threshold and clique sizes for the sweep's rules;
    for "modes", which has neither, its picks' near-copy groups and radius."""
    from finextract.extraction import ExtractionResult

    def summary(selection):
        images = np.zeros((2, 2, 2, 3), np.uint8)
        config = {"clustering": {"selection": selection}}
        return ExtractionResult(images, [3, 0], [[1, 3, 4], [0]], 0.5, config=config).selection_summary()

    assert summary("size") == "threshold 0.50, clique sizes [3, 1]"
    assert summary("modes") == "modes picks, near-copy groups of sizes [3, 1] (radius 0.50)"
