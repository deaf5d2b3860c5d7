"""Adaptive N: rounds, the incremental similarity matrix, the stopping rule, and resuming after a kill."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from finextract.adaptive import OVERLAP, RoundTracker, clique_overlap
from finextract.clustering import cluster_descriptors
from finextract.spec import ExtractionSpec
from tests.planted import planted_descriptors


def coded_images(n: int, seed: int = 0) -> torch.Tensor:
    """uint8 (n, 2, 2, 3) images whose first two values spell their index (the fake embedder's key)."""
    images = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 2, 2, 3), dtype=np.uint8))
    index = torch.arange(n)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = (index % 256).to(torch.uint8), (index // 256).to(torch.uint8)
    return images


def lookup(descriptors: np.ndarray):
    """A fake SSCD: image -> the planted descriptor its index names."""
    table = torch.from_numpy(descriptors)

    def embed(images):
        index = images[:, 0, 0, 0].long() + 256 * images[:, 0, 0, 1].long()
        return table[index]

    return embed


def feed(tracker: RoundTracker, images: torch.Tensor, chunk: int) -> int:
    """Give the tracker the images chunk by chunk, as `generate(until=...)` does; returns the images fed."""
    for start in range(0, len(images), chunk):
        stop = min(start + chunk, len(images))
        if tracker.add(stop, images[start:stop]):
            return stop
    return len(images)


def test_clique_overlap_matches_one_to_one():
    assert clique_overlap([[1, 2, 3, 4], [5, 6]], [[5, 6, 9], [1, 2, 7, 8]]) == 0.5  # {1,2} of 4 vs 4 members
    assert clique_overlap([[1, 2], [3, 4]], [[1, 2, 3, 4], [5]]) == 0.0  # one new clique holds both old ones
    assert clique_overlap([[1]], [[1], [2]]) == 0.0  # another N0: never stable


def test_rounds_equal_fixed_clusterings_and_stop_when_stable():
    x, labels = planted_descriptors(300, 5, 40, spread=0.3, style=0.1, seed=1)  # stable from round 3 on
    order = np.random.default_rng(2).permutation(300)  # clusters spread over the generation order
    x, labels = x[order], labels[order]
    images = coded_images(300)
    tracker = RoundTracker(5, 50, 300, embed=lookup(x), stable_rounds=2)
    fed = feed(tracker, images, chunk=16)  # chunks that do not end on round ends
    rounds = tracker.rounds
    assert tracker.done and rounds[-1].stable_run == 2 and rounds[-1].images < 300
    assert [r.images for r in rounds] == [50 * (i + 1) for i in range(len(rounds))]
    assert fed >= rounds[-1].images and fed - rounds[-1].images < 16  # at most the last chunk's rest
    for r in rounds:  # each round's answer is the fixed run's at N = M_r (the same first M_r images)
        fixed = cluster_descriptors(x[: r.images], 5)
        assert r.threshold == fixed.threshold and r.extracted == fixed.representatives
    assert all(r.stable == (r.overlap >= OVERLAP) for r in rounds[1:]) and not rounds[0].stable
    # the matrix grew by rows: equal to the full product up to float32 rounding of 512-term dot products of
    # unit vectors (|error| <= 512 * 2^-24 < 3.1e-5)
    m = rounds[-1].images
    full = torch.from_numpy(x[:m]) @ torch.from_numpy(x[:m]).T
    torch.testing.assert_close(tracker._similarity, full, atol=3.1e-5, rtol=0)
    record = tracker.record()
    assert record["stopped_at"] == m and record["stable"] and len(record["rounds"]) == len(rounds)


def test_cap_ends_an_unstable_run_and_degenerate_images_are_left_out():
    x, _ = planted_descriptors(120, 0, 0, seed=3)  # no cluster: cliques change every round
    images = coded_images(120)
    images[7] = 0  # constant: left out, never embedded
    tracker = RoundTracker(3, 40, 100, embed=lookup(x), stable_rounds=5)
    feed(tracker, images, chunk=40)
    assert [r.images for r in tracker.rounds] == [40, 80, 100] and tracker.done
    assert tracker.num_degenerate == 1 and 7 not in tracker.usable and len(tracker.usable) == 99
    assert not tracker.record()["stable"]


def test_spec_checks_adaptive_settings():
    spec = ExtractionSpec.resolve("a photo of sks", 5, adaptive=True)
    assert spec.round_images == 50 and spec.num_images == 250 and spec.stable_rounds == 2
    assert ExtractionSpec.resolve("a photo of sks", 5).round_images is None
    with pytest.raises(ValueError, match="--round-images 20: rounds apply only with --adaptive"):
        ExtractionSpec.resolve("a photo of sks", 5, round_images=20)
    with pytest.raises(ValueError, match="--adaptive needs a given --n0"):
        ExtractionSpec.resolve("a photo of sks", "auto", adaptive=True)
    with pytest.raises(ValueError, match="--stable-rounds 0"):
        ExtractionSpec.resolve("a photo of sks", 5, adaptive=True, stable_rounds=0)
    with pytest.raises(ValueError, match="--selection 'biggest'"):
        ExtractionSpec.resolve("a photo of sks", 5, selection="biggest")


def test_adaptive_extraction_resumes_and_matches_a_fixed_run(tiny_zoo, tmp_path, monkeypatch):
    from finextract import adaptive
    from finextract.extract import Extractor
    from finextract.generation import generate

    extractor = Extractor(tiny_zoo / "base", tiny_zoo / "dreambooth", device="cpu", backend="torch")
    spec = ExtractionSpec.resolve("a photo of sks", 2, num_images=16, adaptive=True, round_images=4, stable_rounds=9)
    run = {"steps": 2, "batch_size": 4, "progress": False}
    whole = extractor.extract(spec=spec, out=tmp_path / "whole", **run)
    assert [r["images"] for r in whole.adaptive["rounds"]] == [4, 8, 12, 16]  # never 9 stable rounds: the cap
    # only the images generated are counted: 16 images x 2 steps x 2 models
    assert whole.work["images"] == 16 and whole.work["unet_evaluations"] == 16 * 2 * 2

    # killed after round 2 (chunks 0-11 written, round 3 never clustered), then run again: the same answer
    original = adaptive.RoundTracker._round

    def killed(self, end):
        if end == 12:
            raise KeyboardInterrupt("killed")
        original(self, end)

    monkeypatch.setattr(adaptive.RoundTracker, "_round", killed)
    with pytest.raises(KeyboardInterrupt):
        extractor.extract(spec=spec, out=tmp_path / "resumed", **run)
    monkeypatch.setattr(adaptive.RoundTracker, "_round", original)
    resumed = extractor.extract(spec=spec, out=tmp_path / "resumed", **run)
    assert resumed.work["unet_evaluations_computed"] == 4 * 2 * 2  # only images 12-15 sampled again
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in resumed.adaptive["rounds"]]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in whole.adaptive["rounds"]]
    assert (resumed.indices, resumed.cliques, resumed.threshold) == (whole.indices, whole.cliques, whole.threshold)

    # stable after one round: it stops early, and its M images are a fixed run's first M
    early = ExtractionSpec.resolve("a photo of sks", 2, num_images=16, adaptive=True, round_images=4, stable_rounds=1)
    stopped = extractor.extract(spec=early, out=tmp_path / "early", **run)
    m = stopped.adaptive["stopped_at"]
    record = json.loads((tmp_path / "early" / "result.json").read_text())
    assert record["adaptive"]["stopped_at"] == m and record["num_images"] == m and len(record["config"]["seeds"]) == m
    assert record["work"]["images"] == m == stopped.work["images"]
    assert "Adaptive N" in (tmp_path / "early" / "report.html").read_text()
    fixed = generate(
        extractor.pair, "a photo of sks", m, config=extractor.config, steps=2, batch_size=4, progress=False
    )
    chunks = sorted((tmp_path / "early" / "generation").glob("chunk_*.npz"))
    adaptive_images = np.concatenate([np.load(c)["images"] for c in chunks])
    np.testing.assert_array_equal(adaptive_images[:m], fixed.images.numpy())  # bit for bit: same seeds, same loop
