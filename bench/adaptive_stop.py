"""Adaptive N and selection rules replayed on the time-to-evidence runs' SSCD descriptors (issue 23).

An adaptive run's first M images are a fixed run's first M (image i from seed + i), and each round's
answer is the clustering of those M images' descriptors, so the descriptors one
`bench/bench_time_to_evidence.py --descriptors DIR` run keeps (an .npz per cell, seed and
scheduler:steps, N_max = 250 images) replay every stopping rule and selection rule exactly, with the
code an extraction runs (`finextract.adaptive.RoundTracker`, `finextract.clustering.cluster_descriptors`).
Scored as the extractor scores (`finextract.metrics.extraction_metrics` against the training images'
SSCD descriptors, at the model's resolution).

    FINEXTRACT_THREADS=1 python bench/bench_time_to_evidence.py --cells object:dreambooth,object:lora \\
        --settings ddim:50,dpmpp-2m:10,unipc:10 --prefixes 25,50,75,100,125,150,200,250 --descriptors DIR
    FINEXTRACT_THREADS=1 python bench/adaptive_stop.py DIR --out bench/results/adaptive_stop.json

Per run: for each rule (round images, stable rounds, cap) where it stopped, its UNet evaluations and
the AS / A-ESR0.6 at the stop; for each selection rule the AS at every N. The summary averages over
seeds per (cell, scheduler:steps, rule).

`--loco` replays only the selection, leave-one-cell-out: every run at N = 10 x N0 (and
DDIM 50 at the paper's 50 x N0) under "size" and the "modes" rule (`finextract.clustering.selection.modes`)
for each (neighbours, radius) of a grid; for each of the four cells held out, the pair with the highest
mean AS over the other three cells at `CHOOSE_ON` (DPM-Solver++ 2M 25, N = 50: the default preset when the
rule was chosen; now 12 steps at N = 100) is scored on it.

    FINEXTRACT_THREADS=1 python bench/adaptive_stop.py DIR --loco --out bench/results/selection_loco.json

`--constants` scores the shipped "modes" constants against "size", at `CHOOSE_ON` and at the
paper's, seed by seed: on fine-tunes the constants were not chosen on (`finextract zoo heldout`), or
on seeds they were not chosen on (the committed zoo's at seeds 3000-9000):

    finextract zoo heldout --out HZ
    FINEXTRACT_THREADS=1 python bench/bench_time_to_evidence.py --zoo HZ --cells heldout:dreambooth,heldout:lora \
        --settings ddim:50,dpmpp-2m:25 --prefixes 50,250 --json bench/results/heldout_time_to_evidence.json \
        --descriptors HDIR
    FINEXTRACT_THREADS=1 python bench/adaptive_stop.py HDIR --constants --zoo HZ --out bench/results/selection_heldout.json
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from finextract.adaptive import RoundTracker
from finextract.clustering import cluster_descriptors
from finextract.clustering.selection import MODE_NEIGHBOURS, MODE_RADIUS, modes
from finextract.engine.loading import load_model_pair
from finextract.evaluation import model_resolution, read_training_images
from finextract.metrics import extraction_metrics
from finextract.sscd import embed_images, load_embedder
from finextract.zoo.scenarios import scenario_folder
from finextract.zoo.trained import default_zoo_folder

N0 = 5
TERMS = 2  # FineXtract: the fine-tuned and the base UNet per step
#: (round images, stable rounds, cap)
RULES = [(25, 1, 250), (25, 2, 250), (50, 1, 250), (50, 2, 250), (25, 1, 125), (25, 2, 125), (25, 2, 100)]
SELECTIONS = ("size", "density", "merged", "modes")
#: --loco: the "modes" grid, the setting whose AS chooses (the default preset's when it was chosen) and the paper's
NEIGHBOURS = (1, 2, 3, 4, 5, 8)
RADII = tuple(round(0.4 + 0.025 * i, 3) for i in range(11))
CHOOSE_ON = ("dpmpp-2m", 25, 50)
PAPER = ("ddim", 50, 250)


def scores(train, descriptors, rows) -> dict:
    metrics = extraction_metrics(train, descriptors[list(rows)])
    return {"AS": round(metrics["AS"], 4), "A-ESR0.6": round(metrics["A-ESR0.6"], 4)}


def replay_rule(descriptors: torch.Tensor, round_images: int, stable_rounds: int, cap: int):
    """The `RoundTracker` of one adaptive run fed the first `cap` descriptors in order (16 per chunk);
    the fake embedder looks each image up by the index coded in its first pixel."""
    n = min(cap, len(descriptors))
    tracker = RoundTracker(
        N0, round_images, n, embed=lambda x: descriptors[x[:, 0, 0, 0].long()], stable_rounds=stable_rounds
    )
    coded = torch.zeros((n, 1, 1, 3), dtype=torch.int64)
    coded[:, 0, 0, 0] = torch.arange(n)  # the key (int64: no 256 wrap)
    coded[:, 0, 0, 1] = 1  # not constant
    for start in range(0, n, 16):
        if tracker.add(min(start + 16, n), coded[start : start + 16]):
            break
    return tracker


def replay(path: Path, train, steps: int) -> dict:
    data = np.load(path)
    if not np.array_equal(data["indices"], np.arange(len(data["indices"]))):
        raise ValueError(f"{path}: some generated images were constant; the replay assumes none")
    descriptors = torch.from_numpy(data["descriptors"])
    record = {"by_N": {}, "stops": []}
    for n in (25, 50, 75, 100, 125, 150, 200, 250):
        row = {}
        for selection in SELECTIONS:
            clustering = cluster_descriptors(descriptors[:n], N0, selection=selection)
            row[selection] = scores(train, descriptors, clustering.representatives)
        record["by_N"][n] = row
    for round_images, stable_rounds, cap in RULES:
        tracker = replay_rule(descriptors, round_images, stable_rounds, cap)
        last = tracker.rounds[-1]
        record["stops"].append(
            {
                "rule": f"round {round_images}, stable {stable_rounds}, cap {cap}",
                "stopped_at": last.images,
                "unet_evaluations": last.images * steps * TERMS,
                "stable": last.stable_run >= stable_rounds,
                **scores(train, descriptors, last.extracted),
            }
        )
    return record


def replay_selection(path: Path, train, scheduler: str, steps: int, grid: bool = True) -> dict:
    """--loco: AS / A-ESR0.6 of "size" and of every "modes" (neighbours, radius) at N = 10 x N0 (and
    at 50 x N0 for DDIM 50), and "best_match" (a perfect pick), {N: {rule: scores}}; `grid` False
    (--constants): "modes" at the shipped constants only."""
    descriptors = torch.from_numpy(np.load(path)["descriptors"])
    by_n = {}
    for n in (10 * N0, 50 * N0) if (scheduler, steps) == PAPER[:2] else (10 * N0,):
        x = descriptors[:n]
        row = {"size": scores(train, x, cluster_descriptors(x, N0).representatives)}
        pairs = [(k, r) for k in NEIGHBOURS for r in RADII] if grid else [(MODE_NEIGHBOURS, MODE_RADIUS)]
        for neighbours, radius in pairs:  # the rows as `cluster_descriptors` computes them (same rounding)
            _, picks = modes(lambda lo, hi, x=x: (x[lo:hi] @ x.T).numpy(), n, N0, neighbours, radius)
            row[f"modes {neighbours}/{radius}"] = scores(train, x, picks)
        extractor = cluster_descriptors(x, N0, selection="modes").representatives
        if row[f"modes {MODE_NEIGHBOURS}/{MODE_RADIUS}"] != scores(train, x, extractor):
            raise RuntimeError(f"{path}: the replayed 'modes' differs from cluster_descriptors'; a bug")
        # why a rule misses: each training image's best generated match, its similarity and where it
        # ranks among the N by "modes" density (0 = densest), i.e. how many near-copies it came with
        s = (x @ x.T).double().fill_diagonal_(-float("inf"))
        rank = torch.argsort(torch.argsort(-s.topk(MODE_NEIGHBOURS, dim=1).values.mean(1), stable=True))
        best = (torch.as_tensor(train).double() @ x.double().T).max(1)
        row["best_match"] = {
            "AS": round(float(best.values.mean()), 4),
            "similarity": [round(v, 3) for v in best.values.tolist()],
            "density_rank": rank[best.indices].tolist(),
        }
        by_n[n] = row
    return by_n


def _mean(runs, cell, setting, rule, metric="AS"):
    values = [r["by_N"][setting[2]][rule][metric] for r in runs if r["cell"] == cell and r["setting"] == setting]
    return round(statistics.fmean(values), 4) if values else None


def _per_seed(runs, cell, setting, rule):
    return [
        r["by_N"][setting[2]][rule]["AS"]
        for r in sorted(runs, key=lambda r: r["seed"])
        if r["cell"] == cell and r["setting"] == setting
    ]


def leave_one_cell_out(runs: list[dict]) -> dict:
    """For each cell held out: the "modes" pair chosen on the other cells, and the held-out scores."""

    mean = functools.partial(_mean, runs)
    cells = sorted({r["cell"] for r in runs})
    grid = [f"modes {k}/{r}" for k in NEIGHBOURS for r in RADII]
    folds = {}
    for held in cells:
        others = [c for c in cells if c != held]
        chosen = max(grid, key=lambda rule: statistics.fmean(mean(c, CHOOSE_ON, rule) for c in others))
        folds[held] = {
            "chosen_on_other_cells": chosen,
            "held_out": {
                rule: {
                    "AS": mean(held, CHOOSE_ON, rule),
                    "A-ESR0.6": mean(held, CHOOSE_ON, rule, "A-ESR0.6"),
                    "seeds": _per_seed(runs, held, CHOOSE_ON, rule),
                }
                for rule in ("size", chosen)
            },
            "paper_setting": {rule: mean(held, PAPER, rule) for rule in ("size", chosen)},
        }
    return {"folds": folds, **constants_table(runs)}


def constants_table(runs: list[dict]) -> dict:
    """Per cell, AS / A-ESR0.6 / per-seed AS of "size" and the shipped "modes" constants at `CHOOSE_ON` and
    at the paper's."""
    fixed = f"modes {MODE_NEIGHBOURS}/{MODE_RADIUS}"
    mean, per_seed = functools.partial(_mean, runs), functools.partial(_per_seed, runs)

    def seed_ids(cell, setting):  # the sampling seed of each "seeds" entry
        return sorted(r["seed"] for r in runs if r["cell"] == cell and r["setting"] == setting)

    constants = {
        cell: {
            f"default setting {rule}": {
                "AS": mean(cell, CHOOSE_ON, rule),
                "A-ESR0.6": mean(cell, CHOOSE_ON, rule, "A-ESR0.6"),
                "seeds": per_seed(cell, CHOOSE_ON, rule),
                "seed_ids": seed_ids(cell, CHOOSE_ON),
            }
            for rule in ("size", fixed)
        }
        | {
            f"paper setting {rule}": {
                "AS": mean(cell, PAPER, rule),
                "A-ESR0.6": mean(cell, PAPER, rule, "A-ESR0.6"),
                "seeds": per_seed(cell, PAPER, rule),
                "seed_ids": seed_ids(cell, PAPER),
            }
            for rule in ("size", fixed)
        }
        for cell in sorted({r["cell"] for r in runs})
    }
    return {f"constants {fixed}": constants}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "descriptors", type=Path, nargs="+", help="--descriptors folder(s) of bench_time_to_evidence.py"
    )
    parser.add_argument("--out", type=Path, required=True, help="JSON to write")
    parser.add_argument("--loco", action="store_true", help="only the selection rules, leave-one-cell-out")
    parser.add_argument(
        "--constants", action="store_true", help="only the selection rules: the shipped constants against 'size'"
    )
    parser.add_argument(
        "--zoo", type=Path, default=None, help="the zoo the runs came from (default: the committed one)"
    )
    args = parser.parse_args()
    zoo = args.zoo or default_zoo_folder()
    embedder = load_embedder("default", threads=1)
    resolution = None  # the side the extractor scores at, from the loaded pair as `Extractor` reads it
    train = {}
    started = time.perf_counter()
    runs = []
    for path in sorted(p for folder in args.descriptors for p in folder.glob("*.npz")):
        parts = path.stem.split("-")  # <scenario>-<kind>-<seed>-<scheduler>-<steps>, the scheduler may hold "-"
        scenario, kind, seed, scheduler, steps = *parts[:3], "-".join(parts[3:-1]), int(parts[-1])
        if scenario not in train:
            folder = scenario_folder(zoo, scenario)
            resolution = resolution or model_resolution(load_model_pair(zoo / "base", finetuned=folder / "dreambooth"))
            images, _, _ = read_training_images(folder / "train", resolution)
            train[scenario] = embed_images(embedder, images, "training")
        run = {"cell": f"{scenario}:{kind}", "seed": int(seed), "scheduler": scheduler, "steps": steps}
        if args.loco or args.constants:
            run["setting"] = (scheduler, steps, 50 * N0 if (scheduler, steps) == PAPER[:2] else 10 * N0)
            run["by_N"] = replay_selection(path, train[scenario], scheduler, steps, grid=args.loco)
            runs.append(run)
            print(path.stem, {n: row["size"]["AS"] for n, row in run["by_N"].items()}, flush=True)
            continue
        run.update(replay(path, train[scenario], steps))
        runs.append(run)
        print(path.stem, json.dumps([(s["rule"], s["stopped_at"], s["AS"]) for s in run["stops"]]))
    if args.constants:
        out = {
            "what": f"the shipped 'modes {MODE_NEIGHBOURS}/{MODE_RADIUS}' against 'size' on fine-tunes no choice was "
            f"made on (N0 = 5), at {CHOOSE_ON} and the paper's {PAPER}",
            "seconds": round(time.perf_counter() - started, 1),
            **constants_table(runs),
            "runs": [{**r, "setting": list(r["setting"])} for r in runs],
        }
        args.out.write_text(json.dumps(out, indent=1) + "\n")
        print(json.dumps(out[f"constants modes {MODE_NEIGHBOURS}/{MODE_RADIUS}"], indent=1))
        return
    if args.loco:
        out = {
            "what": "selection rules replayed leave-one-cell-out on the time-to-evidence descriptors (N0 = 5): "
            f"'modes neighbours/radius' chosen by mean AS over three cells at {CHOOSE_ON}, scored on the fourth",
            "seconds": round(time.perf_counter() - started, 1),
            **leave_one_cell_out(runs),
            "runs": [{**r, "setting": list(r["setting"])} for r in runs],
        }
        args.out.write_text(json.dumps(out, indent=1) + "\n")
        print(json.dumps(out["folds"], indent=1))
        return
    summary = {}
    for run in runs:
        for stop in run["stops"]:
            key = f"{run['cell']} {run['scheduler']}:{run['steps']} {stop['rule']}"
            summary.setdefault(key, []).append(stop)
        for n, row in run["by_N"].items():
            for selection, value in row.items():
                key = f"{run['cell']} {run['scheduler']}:{run['steps']} N={n} selection {selection}"
                summary.setdefault(key, []).append({**value, "unet_evaluations": n * run["steps"] * TERMS})
    table = {
        key: {
            "seeds": len(values),
            "mean_AS": round(statistics.fmean(v["AS"] for v in values), 4),
            "AS": [v["AS"] for v in values],
            "mean_A-ESR0.6": round(statistics.fmean(v["A-ESR0.6"] for v in values), 4),
            "mean_unet_evaluations": round(statistics.fmean(v["unet_evaluations"] for v in values)),
            "max_unet_evaluations": max(v["unet_evaluations"] for v in values),
        }
        for key, values in summary.items()
    }
    out = {
        "what": "adaptive N stopping rules and selection rules replayed on the time-to-evidence descriptors (N0 = 5)",
        "seconds": round(time.perf_counter() - started, 1),
        "summary": table,
        "runs": runs,
    }
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"{len(runs)} runs replayed in {out['seconds']} s: {args.out}")


if __name__ == "__main__":
    main()
