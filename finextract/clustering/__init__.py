"""Clique clustering of SSCD descriptors (FineXtract Sec. 4.3, as its released code does it), exact.

Procedure: S = cosine similarities with a zero diagonal; the start threshold is the 25th percentile of
all off-diagonal entries, floored to a multiple of `step` and to at least 0.01. At each threshold t
(raised by `step`) the graph G_t = {S[i, j] >= t} is peeled greedily: take a maximum clique, remove it,
repeat until no vertex is left (a lone vertex is a clique of size 1). The sweep stops at the first
threshold with at least N0 cliques; the answer is its N0 largest cliques.

Determinism. The paper skips a threshold whose peel takes more than 30 s of wall clock, so its answer
depends on the machine. Here a threshold is skipped when its peel needs more than `budget` units of
branch-and-bound work (one unit per vertex coloured in a bound computation): the same input gives the
same answer on any machine and under any load. The wall-clock `time_limit` remains only as a safety
net; every skipped threshold is reported with why. The default budget grows with N (`default_budget`).

Canonical choice among maximum cliques (so that "a maximum clique" is one well-defined set): the one
with the largest sum of pairwise similarities, then the lexicographically smallest sorted index list.

Modules, bottom-up:
- `levels`: S quantised block by block into exact threshold levels (N^2 bytes; on the GPU for CUDA
  input), pair counts per level, the start threshold, the vertex relabelling;
- `graph`: G_t as packed bitset rows (NumPy, or torch on the GPU), and the compiled bitset kernels:
  components, k-cores, greedy clique, induced subgraphs;
- `maxclique`: every maximum clique of a bitset graph within a work budget (MCQ branch and bound);
- `sweep`: the threshold sweep and the peel (`cluster_descriptors`, `cluster_similarity`).
"""

from .sweep import (
    BUDGET_CAP,
    BUDGET_PER_VERTEX,
    ClusteringResult,
    cluster_descriptors,
    cluster_similarity,
    default_budget,
)

__all__ = [
    "BUDGET_CAP",
    "BUDGET_PER_VERTEX",
    "ClusteringResult",
    "cluster_descriptors",
    "cluster_similarity",
    "default_budget",
]
