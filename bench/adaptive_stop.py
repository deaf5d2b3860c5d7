"""How often adaptive N stops too early, and what the selection rules give, on finished generations.

An adaptive run's first M images are a fixed run's first M (image i from seed + i), and each round's
answer is the clustering of those M images, so one generation of N = 250 per cell replays every
stopping rule exactly (SSCD runs once per image here, as in the adaptive run). Per cell: the round
where each rule (round size, stable rounds) stops, the AS and A-ESR0.6 at that stop against the AS at
N = 250, and the AS of each selection rule at every round's N.

    Z=$(finextract zoo path)
    for kind in dreambooth lora; do for seed in 0 1000 2000; do
      M=$([ $kind = lora ] && echo "--lora $Z/lora" || echo "--finetuned $Z/dreambooth")
      FINEXTRACT_THREADS=1 finextract generate --base $Z/base $M --caption "a photo of sks" --num-images 250 \\
          --steps 20 --seed $seed --threads 1 --out gens/$kind-$seed
    done; done
    FINEXTRACT_THREADS=1 python bench/adaptive_stop.py gens --out bench/results/adaptive_stop.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from finextract.adaptive import RoundTracker
from finextract.clustering import cluster_descriptors
from finextract.evaluation import read_training_images
from finextract.metrics import extraction_metrics
from finextract.sscd import embed_images, load_embedder
from finextract.store import chunks
from finextract.zoo.trained import default_zoo_folder

N0 = 5
RULES = [(50, 1), (50, 2), (50, 3), (25, 2), (25, 3)]  # (round images, stable rounds)
SELECTIONS = ("size", "density", "merged")


def scores(train, descriptors, indices) -> dict:
    m = extraction_metrics(train, descriptors[indices])
    return {"AS": round(m["AS"], 4), "A-ESR0.6": round(m["A-ESR0.6"], 4)}


def _as(value) -> float:
    return value if isinstance(value, float) else value["AS"]


def cell(folder: Path, train, embedder) -> dict:
    manifest = chunks.read_manifest(folder, "regenerate it")
    images = np.concatenate([chunks.read_chunk(folder / c["file"])[0] for c in manifest["chunks"]])
    descriptors = embed_images(embedder, torch.from_numpy(images), "generated")
    n = len(images)
    record = {"N": n, "steps": manifest["config"]["steps"], "seed": manifest["config"]["seed"]}
    record["bound_AS_all"] = round(extraction_metrics(train, descriptors, descriptors)["generated"]["AS"], 4)
    record["by_N"] = {}
    for m in range(50, n + 1, 25):
        row = {}
        for selection in SELECTIONS:
            c = cluster_descriptors(descriptors[:m], N0, selection=selection)
            row[selection] = {**scores(train, descriptors, c.representatives), "threshold": c.threshold}
        c = cluster_descriptors(descriptors[:m], N0, on_budget="keep")
        row["size, on_budget keep"] = {**scores(train, descriptors, c.representatives), "threshold": c.threshold}
        row["bound_AS"] = round(extraction_metrics(train, descriptors[:m], descriptors[:m])["generated"]["AS"], 4)
        record["by_N"][m] = row
    full = record["by_N"][n]["size"]
    record["stops"] = []
    for round_images, stable_rounds in RULES:
        tracker = RoundTracker(
            N0, round_images, n, embed=lambda x: descriptors[x[:, 0, 0, 0].long()], stable_rounds=stable_rounds
        )
        coded = torch.zeros((n, 1, 1, 3), dtype=torch.uint8)
        coded[:, 0, 0, 0] = torch.arange(n) % 256  # n <= 256: the fake embedder's key
        coded[:, 0, 0, 1] = 1  # not constant
        for start in range(0, n, 16):
            if tracker.add(min(start + 16, n), coded[start : start + 16]):
                break
        last = tracker.rounds[-1]
        at_stop = scores(train, descriptors, [i for i in last.extracted])
        record["stops"].append(
            {
                "round_images": round_images,
                "stable_rounds": stable_rounds,
                "stopped_at": last.images,
                "stable": last.stable_run >= stable_rounds,
                "AS_at_stop": at_stop["AS"],
                "A-ESR0.6_at_stop": at_stop["A-ESR0.6"],
                "AS_at_250": full["AS"],
                "AS_loss": round(full["AS"] - at_stop["AS"], 4),
                "overlaps": [round(r.overlap, 2) for r in tracker.rounds],
            }
        )
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gens", type=Path, help="folder of <kind>-<seed> generation folders")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    zoo = default_zoo_folder()
    embedder = load_embedder("default", threads=1)
    train_images, _, _ = read_training_images(zoo / "train", 32)
    train = embed_images(embedder, train_images, "training")
    started = time.perf_counter()
    cells = {}
    for folder in sorted(p for p in args.gens.iterdir() if (p / chunks.MANIFEST).is_file()):
        cells[folder.name] = cell(folder, train, embedder)
        print(folder.name, json.dumps(cells[folder.name]["stops"]))
    summary = {}
    for round_images, stable_rounds in RULES:
        stops = [
            s
            for c in cells.values()
            for s in c["stops"]
            if (s["round_images"], s["stable_rounds"]) == (round_images, stable_rounds)
        ]
        summary[f"round {round_images}, stable {stable_rounds}"] = {
            "mean_stopped_at": float(np.mean([s["stopped_at"] for s in stops])),
            "mean_AS_at_stop": round(float(np.mean([s["AS_at_stop"] for s in stops])), 4),
            "mean_AS_at_250": round(float(np.mean([s["AS_at_250"] for s in stops])), 4),
            "too_early": sum(s["AS_loss"] > 0.03 for s in stops),
            "cells": len(stops),
        }
    rules = (*SELECTIONS, "size, on_budget keep", "bound_AS")
    selection_summary = {
        m: {rule: round(float(np.mean([_as(c["by_N"][m][rule]) for c in cells.values()])), 4) for rule in rules}
        for m in next(iter(cells.values()))["by_N"]
    }
    out = {
        "what": "adaptive N stopping rules and selection rules replayed on N = 250 generations (N0 = 5, object scenario)",
        "too_early": "AS at the stop more than 0.03 below the AS at N = 250",
        "seconds": round(time.perf_counter() - started, 1),
        "summary": summary,
        "mean_AS_by_N_and_selection": selection_summary,
        "cells": cells,
    }
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    print(json.dumps(selection_summary, indent=1))


if __name__ == "__main__":
    main()
