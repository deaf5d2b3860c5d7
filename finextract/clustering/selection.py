"""Which N0 cliques of a threshold's peel an extraction returns: rules that never look at training images.

- "size" (the paper's, FineXtract Sec. 4.3): the N0 largest cliques at the first threshold whose peel
  gives N0 (ties: the higher similarity sum first).
- "density": at that threshold, every clique of at least 2 images ranked by size x mean pairwise
  similarity (= 2 W / (size - 1), W the clique's similarity sum): a tight clique can outrank a slightly
  larger loose one. One-image cliques score 0 and only fill up to N0.
- "merged": at that threshold, cliques whose representatives are themselves similar (S >= t) are
  merged (transitively) into one group before ranking groups by their total size; a group's
  representative is its largest clique's. When fewer than N0 groups remain, the sweep goes on to the
  next threshold. The answer's `cliques` are then the groups (unions of cliques, not cliques).

A clique is given as its canonical key (-size, -W, members) (`sweep._Keys`).
"""

from __future__ import annotations

import numpy as np

#: The selection rules; "size" is the paper's (and the default).
SELECTIONS = ("size", "density", "merged")
#: What the sweep does at a threshold whose peel ran out of work budget (`cluster_similarity`'s
#: `on_budget`): "skip" it (the paper's) or "keep" its approximate peel (`fallback`).
ON_BUDGET = ("skip", "keep")


def density_score(key: tuple) -> float:
    """size x mean pairwise similarity of a clique key (0 for one image)."""
    size, weight = -key[0], -key[1]
    return 0.0 if size < 2 else 2.0 * weight / (size - 1)


def select(rule: str, peeled: list[tuple], n0: int, threshold: float, keys) -> tuple[list[list[int]], list[int]] | None:
    """The N0 cliques (or groups) a rule picks from a threshold's complete peel.

    Args:
        rule: one of `SELECTIONS` ("size" needs only the N0 largest in `peeled`).
        peeled: clique keys of the peel (at least N0). n0: N0. threshold: the graph's threshold t.
        keys: the sweep's `_Keys` (representatives and similarities of original indices).

    Returns:
        (cliques: N0 sorted index lists, representatives: N0 indices), or None when "merged" leaves
        fewer than N0 groups.
    """
    if rule == "size":
        chosen = [list(key[2]) for key in sorted(peeled)[:n0]]
        return chosen, [keys.representative(c) for c in chosen]
    if rule == "density":
        ranked = sorted(peeled, key=lambda key: (-density_score(key), key))
        chosen = [list(key[2]) for key in ranked[:n0]]
        return chosen, [keys.representative(c) for c in chosen]
    if rule != "merged":
        raise ValueError(f"selection {rule!r}: expected one of {', '.join(SELECTIONS)}")
    ordered = sorted(peeled)
    cliques = [list(key[2]) for key in ordered]
    reps = [keys.representative(c) for c in cliques]
    similar = keys.source.submatrix(keys.inv[reps]) >= np.float32(threshold)
    group = list(range(len(cliques)))  # union-find; the root is the group's largest (first) clique

    def root(i: int) -> int:
        while group[i] != i:
            group[i] = group[group[i]]
            i = group[i]
        return i

    for i, j in zip(*np.nonzero(np.triu(similar, 1))):
        a, b = root(int(i)), root(int(j))
        if a != b:
            group[max(a, b)] = min(a, b)
    members: dict[int, list[int]] = {}
    for i in range(len(cliques)):
        members.setdefault(root(i), []).extend(cliques[i])
    if len(members) < n0:
        return None
    ranked = sorted(members, key=lambda r: (-len(members[r]), r))[:n0]
    return [sorted(members[r]) for r in ranked], [reps[r] for r in ranked]
