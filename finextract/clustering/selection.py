"""Which N0 cliques of a threshold's peel (or, for "modes", which N0 images) an extraction returns: rules
that never look at training images.

- "size" (the paper's, FineXtract Sec. 4.3): the N0 largest cliques at the first threshold whose peel
  gives N0 (ties: the higher similarity sum first).
- "density": at that threshold, every clique of at least 2 images ranked by size x mean pairwise
  similarity (= 2 W / (size - 1), W the clique's similarity sum): a tight clique can outrank a slightly
  larger loose one. One-image cliques score 0 and only fill up to N0.
- "merged": at that threshold, cliques whose representatives are themselves similar (S >= t) are
  merged (transitively) into one group before ranking groups by their total size; a group's
  representative is its largest clique's. When fewer than N0 groups remain, the sweep goes on to the
  next threshold. The answer's `cliques` are then the groups (unions of cliques, not cliques).
- "modes": no threshold sweep. Each image's density is its mean similarity to its `MODE_NEIGHBOURS`
  most similar other images (a training image the model reproduces comes back as near-copies); images
  are taken greedily by density, skipping any at similarity >= `MODE_RADIUS` to one already taken (so
  the N0 picks are N0 different images, not near-copies of one: AS scores how many training images are
  covered). The default preset's rule; measured (its constants chosen leave-one-cell-out, then checked on
  held-out fine-tunes) in docs/results.md#time-to-evidence.

A clique is given as its canonical key (-size, -W, members) (`sweep._Keys`).
"""

from __future__ import annotations

import numpy as np

#: The selection rules; "size" is the paper's and `cluster_similarity`'s default; an extraction takes its
#: preset's (`finextract.spec.PRESETS`: "modes" by default).
SELECTIONS = ("size", "density", "merged", "modes")
#: "modes": an image's density is its mean similarity to this many most similar other images ...
MODE_NEIGHBOURS = 2
#: ... and an image at similarity >= this to a pick is its near-copy, never picked too.
MODE_RADIUS = 0.5
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


def modes(rows, n: int, n0: int, neighbours: int = MODE_NEIGHBOURS, radius: float = MODE_RADIUS, block: int = 1024):
    """The "modes" rule: N0 images picked greedily by density, none within `radius` of an earlier pick.

    Args:
        rows: rows(lo, hi) -> (hi - lo, n) float ndarray, the similarities of images lo..hi-1 to every
            image (their own entry is ignored); read in blocks of `block` rows, so S is never whole.
        n: N, the images (>= 2). n0: N0, 1 <= n0 <= N. neighbours: images in the density mean (capped
            at N - 1). radius: the suppression similarity.

    Returns:
        (groups, picks): picks, N0 indices in pick order (highest density first; ties: the smaller
        index); when fewer than N0 images lie outside every pick's radius, the densest of the rest
        fill up. groups[i]: sorted indices, pick i and the images at similarity >= radius whose most
        similar pick it is (its near-copies).
    """
    k = min(neighbours, n - 1)
    density = np.empty(n, np.float64)
    for lo in range(0, n, block):
        part = np.array(rows(lo, min(lo + block, n)), dtype=np.float64)
        part[np.arange(len(part)), np.arange(lo, lo + len(part))] = -np.inf  # not its own neighbour
        density[lo : lo + len(part)] = -np.partition(-part, k - 1, axis=1)[:, :k].mean(1)
    order = np.argsort(-density, kind="stable")
    nearest = np.full(n, -np.inf)  # each image's highest similarity to a pick so far
    picks: list[int] = []
    for i in order:
        if nearest[i] < radius:
            picks.append(int(i))
            nearest = np.maximum(nearest, np.asarray(rows(int(i), int(i) + 1), dtype=np.float64)[0])
            if len(picks) == n0:
                break
    picks += [int(i) for i in order if int(i) not in picks][: n0 - len(picks)]
    to_picks = np.stack([np.asarray(rows(p, p + 1), dtype=np.float64)[0] for p in picks])
    owner = to_picks.argmax(0)
    owner[picks] = np.arange(len(picks))
    near = to_picks.max(0) >= radius
    groups = [sorted({p, *np.nonzero((owner == g) & near)[0].tolist()}) for g, p in enumerate(picks)]
    return groups, picks
