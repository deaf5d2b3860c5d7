"""Adaptive N: generate in rounds, re-cluster after each, stop once the N0 extracted cliques are stable.

Round r ends at M_r = min(r x round_images, cap) images (image i from seed + i, as in a fixed run, so
the first M images are a fixed run's). After each round the new images are embedded (SSCD), their rows
of the similarity matrix added (the old rows are kept, not recomputed) and the M_r x M_r matrix
clustered again (`finextract.clustering.cluster_similarity`; 0.09 s at N = 500).

Stopping rule: a round is *stable* when its N0 cliques match the previous round's one to one, each
pair sharing at least `OVERLAP` of the smaller clique's members (cliques of a round are a superset's
peel, so an unchanged clique keeps its old members and gains new ones). The run stops after
`stable_rounds` consecutive stable rounds, or at the cap (by default the paper's 50 x N0). The
defaults (`finextract.spec.ROUND_PER_N0`, `STABLE_ROUNDS`) live with the spec; how often they stop
too early on the committed zoo: docs/results.md ("Adaptive N").
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from finextract.clustering import ClusteringResult, cluster_similarity
from finextract.images import degenerate_mask
from finextract.similarity import unit_descriptors
from finextract.spec import STABLE_ROUNDS

#: Share of the smaller clique's members two matched cliques of consecutive rounds must have in common.
OVERLAP = 0.5


@dataclass
class Round:
    """One round: `images` generated so far (M_r), the `extracted` indices (N0), their `clique_sizes`,
    the `threshold`, `overlap` (the smallest matched overlap with the previous round, 0 for the first),
    `stable` (overlap >= OVERLAP), `stable_run` (consecutive stable rounds so far) and `seconds`
    (embedding and clustering)."""

    images: int
    extracted: list[int]
    clique_sizes: list[int]
    threshold: float
    overlap: float
    stable: bool
    stable_run: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def clique_overlap(previous: list[list[int]], current: list[list[int]]) -> float:
    """The smallest overlap |A & B| / min(|A|, |B|) of a one-to-one matching of two rounds' cliques,
    matched greedily by decreasing overlap (0.0 when the counts differ).

    Args:
        previous, current: clique index lists (indices into the generated images), N0 each.
    """
    if len(previous) != len(current) or not previous:
        return 0.0
    pairs = sorted(
        (
            (len(set(a) & set(b)) / min(len(a), len(b)), i, j)
            for i, a in enumerate(previous)
            for j, b in enumerate(current)
        ),
        reverse=True,
    )
    used_i, used_j, matched = set(), set(), []
    for value, i, j in pairs:
        if i not in used_i and j not in used_j:
            used_i.add(i)
            used_j.add(j)
            matched.append(value)
    return min(matched)


@dataclass
class RoundTracker:
    """The rounds of one adaptive extraction: feed it the images in order (`add`); it embeds, grows the
    similarity matrix, clusters at each round's end and says when to stop (`done`).

    Args:
        n0: N0 (an integer). round_images: images per round. cap: N at most. embed: a function of uint8
            (n, H, W, 3) images (tensor or ndarray) returning (n, D) unit descriptors (float32 tensor).
        clustering: `cluster_similarity` keywords (budget=, on_budget=, selection=).
        stable_rounds: consecutive stable rounds that end the run.
    """

    n0: int
    round_images: int
    cap: int
    embed: object
    clustering: dict = field(default_factory=dict)
    stable_rounds: int = STABLE_ROUNDS
    rounds: list[Round] = field(default_factory=list)
    result: ClusteringResult | None = None
    descriptors: object = None  # (M', D) tensor of the usable images so far
    usable: list[int] = field(default_factory=list)  # their generated indices
    num_degenerate: int = 0
    _similarity: object = None
    _cliques: list = field(default_factory=list)
    _pending: list = field(default_factory=list)
    _seen: int = 0

    @property
    def done(self) -> bool:
        """Stable for `stable_rounds` rounds, or the cap reached."""
        if not self.rounds:
            return False
        return self.rounds[-1].stable_run >= self.stable_rounds or self.rounds[-1].images >= self.cap

    def add(self, stop: int, images) -> bool:
        """Take the images generated up to `stop` (this chunk's `images`, in order); at each round's end
        embed and cluster. Returns `done` (the `until` of `finextract.generation.generate`).

        Raises:
            ValueError: fewer than N0 usable (non-constant) images at the cap.
        """
        self._pending.append(images)
        while not self.done:
            end = min((len(self.rounds) + 1) * self.round_images, self.cap)
            if stop < end:
                break
            self._round(end)
        return self.done

    def _round(self, end: int) -> None:
        import torch

        started = time.perf_counter()
        pending = torch.cat([torch.as_tensor(p) for p in self._pending])
        take, self._pending = pending[: end - self._seen], [pending[end - self._seen :]]
        bad = degenerate_mask(take)
        keep = np.flatnonzero(~bad)
        self.num_degenerate += int(bad.sum())
        if len(keep):
            new = self.embed(take if len(keep) == len(take) else take[torch.as_tensor(keep, device=take.device)])
            self._grow(new)
            self.usable += [self._seen + int(i) for i in keep]
        self._seen = end
        if len(self.usable) < self.n0:
            if end >= self.cap:
                raise ValueError(
                    f"only {len(self.usable)} usable images of {end} for n0={self.n0}; raise the cap (--num-images) "
                    "or lower --n0"
                )
            self.rounds.append(Round(end, [], [], 0.0, 0.0, False, 0, time.perf_counter() - started))
            return
        m = len(self.usable)
        result = cluster_similarity(self._similarity[:m, :m], self.n0, **self.clustering)
        cliques = [[self.usable[i] for i in c] for c in result.cliques]
        previous = self.rounds[-1] if self.rounds and self.result is not None else None
        overlap = clique_overlap(self._cliques, cliques) if previous is not None else 0.0
        stable = previous is not None and overlap >= OVERLAP
        run = previous.stable_run + 1 if stable else 0
        self.result, self._cliques = result, cliques
        extracted = [self.usable[i] for i in result.representatives]
        seconds = time.perf_counter() - started
        self.rounds.append(
            Round(end, extracted, [len(c) for c in cliques], result.threshold, overlap, stable, run, seconds)
        )

    def _grow(self, new) -> None:
        """Append the new descriptors' rows and columns to the similarity matrix (old rows kept)."""
        import torch

        new = unit_descriptors(new, name="SSCD descriptors")
        if self.descriptors is None:
            self.descriptors = new
            self._similarity = new @ new.T
            return
        cross = new @ self.descriptors.T
        old = self._similarity
        grown = torch.empty((len(old) + len(new),) * 2, dtype=old.dtype, device=old.device)
        grown[: len(old), : len(old)] = old
        grown[len(old) :, : len(old)] = cross
        grown[: len(old), len(old) :] = cross.T
        grown[len(old) :, len(old) :] = new @ new.T
        self._similarity = grown
        self.descriptors = torch.cat([self.descriptors, new])

    def record(self) -> dict:
        """The rounds for result.json and the report: {"round_images", "cap", "stable_rounds", "overlap",
        "stopped_at", "stable", "rounds": [Round.to_dict()]}."""
        last = self.rounds[-1] if self.rounds else None
        return {
            "round_images": self.round_images,
            "cap": self.cap,
            "stable_rounds": self.stable_rounds,
            "overlap": OVERLAP,
            "stopped_at": last.images if last else 0,
            "stable": bool(last and last.stable_run >= self.stable_rounds),
            "rounds": [r.to_dict() for r in self.rounds],
        }
