"""bench/bench_time_to_evidence.py's pure parts: a prefix of one extraction's images scores as a fresh
extraction at that N (on the random tiny zoo, tiny settings); the settings parser; the summary's work."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_time_to_evidence.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_time_to_evidence", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tile(image, size=32):
    return np.asarray(Image.fromarray(image).convert("RGB").resize((size, size), Image.BICUBIC))


def test_a_prefix_scores_as_a_fresh_extraction_at_that_n(bench, tiny_zoo):
    from finextract.extract import Extractor

    # batch 4 divides every N: image i is computed in the same batch of the same shape either way, so
    # the images are bit-identical (a batch's shape changes a CPU GEMM's last bits)
    extractor = Extractor(
        tiny_zoo / "base", tiny_zoo / "dreambooth", device="cpu", backend="torch", steps=2, batch_size=4
    )
    train = [_tile(data.astronaut()), _tile(data.coffee()), _tile(data.chelsea())]
    full = extractor.extract("a photo of sks", 2, num_images=12, train=train, progress=False)
    rows = bench.score_prefixes(full, extractor, train, 2, [4, 8, 12], 12)
    assert [row["N"] for row in rows] == [4, 8, 12]
    for row in rows:
        fresh = extractor.extract("a photo of sks", 2, num_images=row["N"], train=train, progress=False)
        assert row["extracted"] == fresh.indices and row["threshold"] == pytest.approx(fresh.threshold)
        assert row["clique_sizes"] == [len(c) for c in fresh.cliques]
        # SSCD embeds the N images in one batch here and all 12 in the full run: its descriptors agree
        # to 1e-4 across batch shapes (tests/test_sscd.py), so a similarity to within 2e-4
        assert row["AS"] == pytest.approx(fresh.metrics["AS"], abs=2e-4)
        assert row["best_generated_AS"] == pytest.approx(fresh.metrics["generated"]["AS"], abs=2e-4)
        assert (row["A-ESR0.6"], row["A-ESR0.7"]) == (fresh.metrics["A-ESR0.6"], fresh.metrics["A-ESR0.7"])
        assert row["unet_evaluations"] == fresh.work["unet_evaluations"] == row["N"] * 2 * 2  # N x steps x 2 models
    assert rows[-1]["AS"] == pytest.approx(full.metrics["AS"], abs=1e-6)  # the whole set is the run itself
    with pytest.raises(ValueError, match="prefix N = 13"):
        bench.score_prefixes(full, extractor, train, 2, [13], 12)


def test_settings_parser(bench):
    assert bench.parse_settings("ddim:50,dpmpp-2m:15") == [("ddim", 50), ("dpmpp-2m", 15)]
    for bad in ("ddim", "ddim:0", "ddim:x", "ddim:50,ddim:50", ""):
        with pytest.raises(ValueError, match="--settings"):
            bench.parse_settings(bad)
    assert bench.scheduler_options("ddim") in ({}, {"scheduler": "ddim"})


def test_summary_work_is_relative_to_the_papers_setting(bench, tmp_path):
    def run(seed, steps, scores):
        prefix = [
            {
                "N": n,
                "AS": a,
                "A-ESR0.6": 0.2,
                "best_generated_AS": a + 0.1,
                "unet_evaluations": n * steps * 2,
                "seconds": 1.0,
            }
            for n, a in scores
        ]
        return {
            "cell": "object:lora",
            "seed": seed,
            "scheduler": "ddim",
            "steps": steps,
            "n0": 5,
            "prefix_scores": prefix,
        }

    runs = [run(0, 50, [(50, 0.5), (250, 0.6)]), run(1000, 50, [(50, 0.7), (250, 0.6)]), run(0, 20, [(100, 0.4)])]
    rows = {(r["setting"], r["N"]): r for r in bench.summarise(runs)}
    paper = rows["ddim:50", 250]
    assert paper["paper"] and paper["work"] == 1.0 and paper["unet_evaluations"] == 250 * 50 * 2
    assert rows["ddim:20", 100]["work"] == pytest.approx(100 * 20 / (250 * 50))  # 0.16, the table
    # mean and sample std over the two seeds: 0.5 and 0.7 -> 0.6 ± 0.1414
    assert rows["ddim:50", 50]["AS"]["mean"] == pytest.approx(0.6)
    assert rows["ddim:50", 50]["AS"]["std"] == pytest.approx(0.02**0.5)
    table = bench.markdown_table(bench.summarise(runs))
    assert "| object:lora | ddim:50 (paper) | 250 | 2 | 25,000 | 1.00 | 0.600 ± 0.000 |" in table
    assert bench.plot(bench.summarise(runs), tmp_path / "t.png").stat().st_size > 1000
