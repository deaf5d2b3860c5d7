"""N0 estimation from generated images (`finextract.clustering.n0`, `--n0 auto`)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from finextract.cli import main
from tests.planted import planted_descriptors


def test_random_clique_bound_by_hand():
    from finextract.clustering.n0 import random_clique_bound

    # expected k-cliques of G(50, 0.1): C(50,3) 0.1^3 = 19.6, C(50,4) 0.1^6 = 0.23, C(50,5) 0.1^10 = 2.1e-4
    assert math.comb(50, 4) * 0.1**6 > 0.01 > math.comb(50, 5) * 0.1**10
    assert random_clique_bound(50, 0.1, alpha=0.01) == 5
    assert random_clique_bound(50, 0.1, alpha=0.5) == 4  # 0.23 < 0.5
    assert random_clique_bound(50, 0.0) == 3  # an edge (a pair) is never evidence
    assert random_clique_bound(50, 1.0) == 51  # in a complete graph every clique is likely


@pytest.mark.parametrize(("n0", "n"), [(3, 150), (8, 400), (8, 250)])
def test_estimate_on_planted_sets(n0, n):
    """Planted near-duplicate clusters of 20 copies among background descriptors: N0 is known."""
    from finextract.clustering.n0 import estimate_n0

    x, _ = planted_descriptors(n, n0, 20, seed=n0)
    estimate = estimate_n0(x)
    assert estimate.n0 == n0
    assert estimate.interval[0] <= n0 <= estimate.interval[1]
    assert 0.0 < estimate.confidence <= 1.0 and estimate.num_images == n
    counted = [r for r in estimate.per_threshold if r["count"]]
    assert len(counted) == estimate.num_thresholds
    assert estimate.confidence == pytest.approx(np.mean([r["count"] == n0 for r in counted]))
    record = estimate.to_dict()
    assert record["source"] == "estimated" and record["interval"] == list(estimate.interval)


def test_too_few_images_says_how_many():
    from finextract.clustering.n0 import MIN_IMAGES, estimate_n0

    x, _ = planted_descriptors(MIN_IMAGES - 1, 1, 20)
    with pytest.raises(ValueError, match=f"at least {MIN_IMAGES} generated images.*got {MIN_IMAGES - 1}"):
        estimate_n0(x)


def test_no_clique_above_chance_is_an_error():
    from finextract.clustering.n0 import estimate_n0

    with pytest.raises(ValueError, match="no memorised image"):
        estimate_n0(np.eye(64, dtype=np.float32)[:60])  # orthogonal: no edge at any threshold


def _copies(count=10, size=32, seed=0):
    """`count` noisy copies of each of five photographs: a generated set with N0 = 5 memorised images."""
    from PIL import Image
    from skimage import data

    rng = np.random.default_rng(seed)
    images = []
    for photo in (data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.camera()):
        tile = np.asarray(Image.fromarray(photo).convert("RGB").resize((size, size), Image.BICUBIC), np.float32)
        for _ in range(count):
            images.append(np.clip(tile + rng.normal(0, 6, tile.shape), 0, 255).astype(np.uint8))
    return images


def test_cluster_command_estimates_n0(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "generated"
    folder.mkdir()
    for i, image in enumerate(_copies()):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    out = tmp_path / "run"
    assert main(["cluster", "--images", str(folder), "--n0", "auto", "--out", str(out)]) == 0
    record = json.loads((out / "result.json").read_text())
    assert record["n0_estimate"]["source"] == "estimated"
    assert record["n0"] == record["n0_estimate"]["n0"] == 5
    assert len(record["cliques"]) == 5
    assert "N0 estimated from the generations" in (out / "report.html").read_text()
    few = tmp_path / "few"
    few.mkdir()
    for i, image in enumerate(_copies(count=2)):
        Image.fromarray(image).save(few / f"{i:03d}.png")
    assert main(["cluster", "--images", str(few), "--n0", "auto", "--out", str(tmp_path / "r2")]) == 1
    assert "estimating N0 needs at least 50" in capsys.readouterr().err
