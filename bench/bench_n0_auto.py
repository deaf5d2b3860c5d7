"""`--n0 auto` on generations: the N0 estimate (`finextract.clustering.n0.estimate_n0`) replayed on the
SSCD descriptors of the trained zoo's generations, against the true N0 (object 5, style 10).

    FINEXTRACT_THREADS=1 python bench/bench_n0_auto.py DESC_DIR --out bench/results/n0_auto.json

DESC_DIR holds one .npz per run (`bench/bench_time_to_evidence.py --descriptors DIR`:
`<scenario>-<dreambooth|lora>-<seed>-<scheduler>-<steps>.npz`, `descriptors` (250, 512) in image order,
image i from seed + i), so the descriptors of an extraction's first N images are the first N rows: the
estimate at N is the one `extract --n0 auto --num-images N` makes from the same generations.

Per run and N (50, 100, 250): the estimate with its interval and confidence, for each candidate rule
(`RULES`: how the per-threshold clique counts become one N0), and the number of training images the
generations visibly copy (`visible`: training images that are the nearest, at SSCD >= 0.6, of at least
3 of the N generations, 3 being the smallest clique the estimate counts): no estimate from the
generations alone can see a training image the fine-tune does not regenerate.

Guard against tuning to the four fine-tunes: a rule is chosen on the development runs (every scheduler
and step count but the two reported ones) and reported on the held-out runs (DDIM 50, the paper's
setting, and DPM-Solver++ 2M 25, the default preset's of the time), 3 seeds each; and it must keep the planted sets of
`tests/test_n0.py` exact.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRUE_N0 = {"object": 5, "style": 10}
HELD_OUT = ("ddim-50", "dpmpp-2m-25")
SIZES = (50, 100, 250)
VISIBLE_SSCD, VISIBLE_COPIES = 0.6, 3


def mode_rule(counts: list[int]) -> int:
    """Today's rule: the most frequent count over the thresholds with a count >= 1 (ties: the smaller)."""
    values, frequency = np.unique(np.asarray(counts), return_counts=True)
    return int(values[np.argmax(frequency)])


def plateau_rule(counts: list[int]) -> int:
    """The count of the longest run of consecutive thresholds with one count (ties: the lower thresholds')."""
    best, run, best_len = counts[0], 1, 1
    for previous, count in itertools.pairwise(counts):
        run = run + 1 if count == previous else 1
        if run > best_len:
            best, best_len = count, run
    return int(best)


RULES = {"mode": mode_rule, "plateau": plateau_rule}


def visible_n0(descriptors: np.ndarray, train: np.ndarray) -> int:
    similarity = descriptors @ train.T
    nearest, best = similarity.argmax(1), similarity.max(1)
    return int(sum(((nearest == j) & (best >= VISIBLE_SSCD)).sum() >= VISIBLE_COPIES for j in range(len(train))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("descriptors", help="folder of <scenario>-<kind>-<seed>-<scheduler>-<steps>.npz")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "n0_auto.json"))
    parser.add_argument("--alphas", default="0.01,0.001", help="chance-clique probabilities (default 0.01: today's)")
    args = parser.parse_args()
    from finextract.clustering.n0 import estimate_n0
    from finextract.engine.config import set_threads
    from finextract.engine.loading import load_model_pair
    from finextract.evaluation import model_resolution, read_training_images
    from finextract.sscd import embed_images, load_embedder
    from finextract.zoo.scenarios import scenario_folder
    from finextract.zoo.trained import default_zoo_folder

    set_threads()
    zoo = default_zoo_folder()
    embedder = load_embedder("default", threads=1)
    resolution = model_resolution(load_model_pair(zoo / "base", finetuned=zoo / "dreambooth"))
    train = {}
    for scenario in TRUE_N0:
        images, _, _ = read_training_images(scenario_folder(zoo, scenario) / "train", resolution)
        train[scenario] = embed_images(embedder, images, "training").numpy()
    alphas = [float(a) for a in args.alphas.split(",")]
    runs = []
    for path in sorted(Path(args.descriptors).glob("*.npz")):
        scenario, kind, seed, setting = path.stem.split("-", 3)
        descriptors = np.load(path)["descriptors"]
        for n in SIZES:
            row = {
                "scenario": scenario,
                "kind": kind,
                "seed": int(seed),
                "setting": setting,
                "held_out": setting in HELD_OUT,
                "N": n,
                "true_n0": TRUE_N0[scenario],
                "visible": visible_n0(descriptors[:n], train[scenario]),
            }
            for alpha in alphas:
                estimate = estimate_n0(descriptors[:n], alpha=alpha)
                counts = [r["count"] for r in estimate.per_threshold if r["count"]]
                assert mode_rule(counts) == estimate.n0  # the replayed rule is the library's
                for name, rule in RULES.items():
                    row[f"{name} alpha={alpha:g}"] = rule(counts)
                row[f"interval alpha={alpha:g}"] = list(estimate.interval)
                row[f"confidence alpha={alpha:g}"] = round(estimate.confidence, 3)
            runs.append(row)
            print(json.dumps(row), flush=True)
    estimators = [f"{name} alpha={alpha:g}" for alpha in alphas for name in RULES]
    summary = {}
    for split in ("development", "held out"):
        for n in SIZES:
            rows = [r for r in runs if r["held_out"] == (split == "held out") and r["N"] == n]
            for estimator in estimators + ["visible"]:
                errors = [r[estimator] - r["true_n0"] for r in rows]
                summary.setdefault(split, {}).setdefault(str(n), {})[estimator] = {
                    "runs": len(rows),
                    "mean_abs_error": round(statistics.fmean(abs(e) for e in errors), 3),
                    "mean_error": round(statistics.fmean(errors), 3),
                    "within_1": round(statistics.fmean(abs(e) <= 1 for e in errors), 3),
                }
    cells = {}
    for r in runs:
        if r["held_out"]:
            key = f"{r['scenario']} {r['kind']} {r['setting']} N={r['N']}"
            cells.setdefault(key, {"true_n0": r["true_n0"]})
            for estimator in estimators + ["visible"]:
                cells[key].setdefault(estimator, []).append(r[estimator])
    record = {
        "settings": {"sizes": SIZES, "held_out": HELD_OUT, "alphas": alphas, "visible": [VISIBLE_SSCD, VISIBLE_COPIES]},
        "summary": summary,
        "held_out_cells": cells,
        "runs": runs,
    }
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
