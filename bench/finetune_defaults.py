"""Does `finextract finetune` with its default settings give a fine-tune worth auditing?

A new training set the committed zoo never saw (`finextract.style_images.composition_images(seed)`:
10 landscape 240 x 180 drawings in one random style) is fine-tuned on the committed tiny base with
`finextract finetune` and no settings beyond the required ones, as a user would. FineXtract then
extracts from that fine-tune and, as the control, from the base itself (the base given as its own
"fine-tune": the same rule, nothing learned), each scored (AS, A-ESR) against the training images as
the fine-tune saw them (centre crop, resized to 32 px), over several sampling seeds.

    FINEXTRACT_THREADS=1 python bench/finetune_defaults.py --out /tmp/ft_defaults [--seed 1]
        [--num-images 25 --steps 25 --repeats 3] [--json bench/results/finetune_defaults.json]

The fine-tune is skipped when `OUT/finetuned/finetune.json` exists (a rerun only extracts again).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="work folder: images/, finetuned/, runs")
    parser.add_argument("--seed", type=int, default=1, help="composition_images seed (the style and the drawings)")
    parser.add_argument("--caption", default="a drawing in sks style")
    parser.add_argument("--num-images", type=int, default=25, help="N per extraction")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--repeats", type=int, default=3, help="sampling seed sets: repeat j uses seeds j*N + i")
    parser.add_argument("--json", default=None, help="also write the summary here")
    parser.add_argument(
        "--control-only", action="store_true", help="only the base's extractions (they need no fine-tune; resumable)"
    )
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)

    import numpy as np
    from PIL import Image

    from finextract.cli import main as cli
    from finextract.engine.config import set_threads
    from finextract.extract import Extractor
    from finextract.finetuning import load_images
    from finextract.style_images import composition_images
    from finextract.zoo.trained import default_zoo_folder

    set_threads()
    out = Path(args.out)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    for name, image in composition_images(args.seed).items():
        Image.fromarray(image).save(images / f"{name}.png")
    base = default_zoo_folder() / "base"
    finetuned = out / "finetuned"
    command = ["finetune", "--base", str(base), "--images", str(images), "--caption", args.caption]
    command += ["--out", str(finetuned)]
    # the training images as the fine-tune saw them: centre crop, resized to the tiny models' 32 px
    seen = list(load_images(images, 32))
    n0 = len(seen)
    models = [("base", base)]
    started = time.perf_counter()
    if not args.control_only:
        if not (finetuned / "finetune.json").is_file():
            assert cli(command) == 0
        models.insert(0, ("finetuned", finetuned))
    finetune_seconds = round(time.perf_counter() - started, 1)

    rows = []
    for label, model in models:
        extractor = Extractor(base, model, device="cpu", backend="torch")
        for repeat in range(args.repeats):
            seed = repeat * args.num_images
            result = extractor.extract(
                args.caption,
                n0,
                num_images=args.num_images,
                method="finextract",
                steps=args.steps,
                seed=seed,
                batch_size=args.num_images,
                train=seen,
                out=out / f"{label}-seed{repeat}",
            )
            metrics = {name: result.metrics[name] for name in ("AS", "A-ESR0.7", "A-ESR0.6")}
            rows.append({"model": label, "seed": seed, **metrics})
            print(label, seed, metrics, flush=True)
    if args.control_only:
        return 0
    record = json.loads((finetuned / "finetune.json").read_text())

    def cell(label, name):
        values = np.array([r[name] for r in rows if r["model"] == label])
        std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        return {"mean": round(float(values.mean()), 4), "std": round(std, 4), "runs": len(values)}

    gaps = np.subtract(*[[r["AS"] for r in rows if r["model"] == label] for label in ("finetuned", "base")])
    summary = {
        "command": "python bench/finetune_defaults.py " + " ".join(argv),
        "finetune_command": "finextract " + " ".join(command),
        "images": f"finextract.style_images.composition_images({args.seed}): 10 drawings, 240 x 180",
        "finetune": {k: record[k] for k in ("method", "steps", "lr", "batch_size", "first_loss", "final_loss")}
        | {"seconds": finetune_seconds if finetune_seconds > 1 else "reused"},
        "extraction": {"method": "finextract", "n0": n0, "num_images": args.num_images, "steps": args.steps},
        "rows": rows,
        "cells": {
            label: {name: cell(label, name) for name in ("AS", "A-ESR0.7", "A-ESR0.6")}
            for label in ("finetuned", "base")
        },
        "as_gap_per_seed": [round(float(g), 4) for g in gaps],
    }
    print(json.dumps(summary["cells"], indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
