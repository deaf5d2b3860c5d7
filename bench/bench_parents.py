"""The parent base on the committed trained zoo: `rank_bases`' ranking, and what a wrong base costs.

    FINEXTRACT_THREADS=1 nice -n 5 python bench/bench_parents.py --cache CACHE
        # builds (or reuses from CACHE) the second trained base, then both parts
    python bench/bench_parents.py --second-base DIR --parts ranking         # seconds
    python bench/bench_parents.py --second-base DIR --parts as --seeds 0    # one seed (about 20 min)

The second base (`finextract.zoo.second_base`, `finextract zoo second-base`) is a sibling of the committed
trained base: the same VAE, tokenizer and text encoder, a UNet trained from another seed on another
subset and order of the pretraining images. It loads for every committed fine-tune: a plausible wrong
parent, as derivative bases of one family are.

Parts (each written as soon as measured; `--parts` picks):
- ranking -> bench/results/parents.json: `rank_bases` for the committed object and style DreamBooths and
  LoRAs among the trained base (their parent), the second trained base, and two random tiny SD 1.x bases
  of the same architecture (seed 0: the trained base's initialisation; seed 1: the second base's), with
  the fine-tune's own metadata (its `finetune` kohya keys name the parent by hash) and with none
  (`metadata={}`: the DreamBooths are ranked by UNet weight distance, the LoRAs tie).
- as -> bench/results/parents_as.json: `Extractor.extract` of the committed object DreamBooth and LoRA
  (N0 = 5, caption "a photo of sks", `MEASURED_WITH`: the default preset of the committed runs' time) guided by the
  right base and by the second base (`--bases`), per seed (`--seeds`), AS and A-ESR0.6 against the zoo's train/.
- probe -> bench/results/parents_probe.json: each committed LoRA extracted on each candidate without
  training images (its caption, N0 = 5, N = 50, seed 0): how alike its generations are, a parent signal
  that needs no metadata (an adapter has no weights of its parent to compare).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WEIGHTS = ROOT / "finextract" / "zoo_weights"
RESULTS = ROOT / "bench" / "results"
#: The extraction settings the committed parents_as / parents_probe runs used: the default preset of their time
#: (N = 50, DPM-Solver++ 2M in 25 steps, the paper's selection and w), i.e. `--preset paper` with that N and
#: those steps; pinned so that a rerun reproduces them whatever the default preset is now.
MEASURED_WITH = {"preset": "paper", "num_images": 50, "steps": 25, "scheduler": "dpmpp-2m"}
MEASURED_LABEL = "paper, N = 50, dpmpp-2m, 25 steps (the default preset of the time: N = 50, dpmpp-2m, 25 steps)"
FINETUNES = {
    "object dreambooth": "dreambooth",
    "style dreambooth": "style/dreambooth",
    "object lora": "lora/pytorch_lora_weights.safetensors",
    "style lora": "style/lora",
}


def named_candidates(folder: Path, second: Path) -> dict[Path, str]:
    """The four candidate bases, path -> name: the two trained bases, and random seeds 0 and 1 saved in `folder`."""
    from finextract.zoo.models import save_pipeline, tiny_components

    names = {WEIGHTS / "base": "trained base", second: "second trained base"}
    for seed in (0, 1):
        out = folder / f"random-seed{seed}"
        names[save_pipeline(tiny_components(seed, tokenizer_folder=out / "tokenizer"), out)] = f"random seed {seed}"
    return names


def ranking_part(names: dict[Path, str]) -> dict:
    from finextract.engine.loading.parents import decided_base, rank_bases

    candidates = list(names)
    rows = {}
    for label, name in FINETUNES.items():
        for metadata_label, metadata in (("with metadata", None), ("metadata stripped", {})):
            started = time.perf_counter()
            ranked = rank_bases(WEIGHTS / name, candidates, metadata=metadata)
            seconds = round(time.perf_counter() - started, 3)
            try:
                chosen, refusal = decided_base(ranked, "the candidates", label), None
            except ValueError as error:  # a tie: what --base DIR answers
                chosen, refusal = None, str(error)
            rows.setdefault(label, {})[metadata_label] = {
                "seconds": seconds,
                "chosen": names.get(chosen),
                "right": chosen == WEIGHTS / "base",
                "refused": refusal,
                "ranking": [
                    {
                        "base": names[c.path],
                        "compatible": c.compatible,
                        "match": c.match,
                        "distance": None if c.distance is None else round(c.distance, 4),
                    }
                    for c in ranked
                ],
            }
            print(label, metadata_label, json.dumps(rows[label][metadata_label]), flush=True)
    return rows


def probe_part(names: dict[Path, str]) -> dict:
    """Each committed LoRA on each candidate, its own caption, `MEASURED_WITH` (N = 50), seed 0, no
    training images: how alike the generations are (the mean SSCD similarity of each image to its 3
    nearest others; the share of pairs at SSCD >= 0.6) and the clustering's threshold."""
    import numpy as np

    from finextract.extract import Extractor
    from finextract.zoo.scenarios import SCENARIOS

    rows = {}
    for scenario, lora in (("object", WEIGHTS / "lora"), ("style", WEIGHTS / "style" / "lora")):
        for base, name in names.items():
            started = time.perf_counter()
            result = Extractor(base, lora=lora, device="cpu", seed=0).extract(
                SCENARIOS[scenario].caption, 5, progress=False, **MEASURED_WITH
            )
            x = result.generated_descriptors.double().numpy()
            similarity = x @ x.T
            np.fill_diagonal(similarity, -np.inf)
            pairs = similarity[np.triu_indices(len(x), 1)]
            rows.setdefault(f"{scenario} lora", {})[name] = {
                "images": len(x),
                "mean_top3_similarity": round(float(np.sort(similarity, 1)[:, -3:].mean()), 3),
                "pairs_at_0.6": round(float((pairs >= 0.6).mean()), 3),
                "threshold": result.threshold,
                "seconds": round(time.perf_counter() - started, 1),
            }
            print(scenario, name, json.dumps(rows[f"{scenario} lora"][name]), flush=True)
    return rows


def as_part(second: Path | None, bases: list[str], seeds: list[int], record: dict, save) -> None:
    from finextract.extract import Extractor

    runs = record.setdefault("runs", [])
    done = {(r["fine_tune"], r["base"], r["seed"]) for r in runs}
    for label, finetuned, lora in (
        ("object dreambooth", WEIGHTS / "dreambooth", None),
        ("object lora", None, WEIGHTS / "lora"),
    ):
        for base_label, base in (("right", WEIGHTS / "base"), ("wrong", second)):
            if base_label not in bases:
                continue
            for seed in seeds:
                if (label, base_label, seed) in done:
                    continue
                started = time.perf_counter()
                extractor = Extractor(base, finetuned, lora=lora, device="cpu", seed=seed)
                result = extractor.extract(
                    "a photo of sks", 5, train=WEIGHTS / "train", progress=False, **MEASURED_WITH
                )
                runs.append(
                    {
                        "fine_tune": label,
                        "base": base_label,
                        "seed": seed,
                        "AS": round(result.metrics["AS"], 4),
                        "A-ESR0.6": round(result.metrics["A-ESR0.6"], 4),
                        "seconds": round(time.perf_counter() - started, 1),
                    }
                )
                record["summary"] = summarize(runs)
                save()
                print(json.dumps(runs[-1]), flush=True)


def summarize(runs: list[dict]) -> dict:
    """Mean and sample std (ddof 1; 0 for one seed) of AS and A-ESR0.6 per (fine-tune, base)."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(f"{run['fine_tune']} / {run['base']}", []).append(run)
    summary = {}
    for key, rows in groups.items():
        summary[key] = {"seeds": [r["seed"] for r in rows]}
        for metric in ("AS", "A-ESR0.6"):
            values = [r[metric] for r in rows]
            summary[key][metric] = {
                "mean": round(statistics.fmean(values), 4),
                "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
            }
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--second-base", default=None, help="a built second base (`finextract zoo second-base`)")
    parser.add_argument("--cache", default=None, help="without --second-base: build it here, or reuse it (minutes)")
    parser.add_argument("--parts", default="ranking,as,probe", help="comma-separated: ranking, as, probe")
    parser.add_argument("--bases", default="right,wrong", help="the as part's bases: right (the parent), wrong")
    parser.add_argument("--seeds", default="0,1000,2000", help="the as part's sampling seeds (default 0,1000,2000)")
    args = parser.parse_args()
    from finextract.engine.config import set_threads

    set_threads()
    parts, bases = args.parts.split(","), args.bases.split(",")
    second = built = None
    if args.second_base:
        second = Path(args.second_base)
    elif "ranking" in parts or "probe" in parts or "wrong" in bases:
        from finextract.zoo.second_base import build_second_base

        if not args.cache:
            parser.error("pass --second-base DIR, or --cache DIR to build it there")
        second = build_second_base(Path(args.cache) / "second-base", cache=args.cache)
    if second is not None:
        built = json.loads((second / "second_base.json").read_text())
    with tempfile.TemporaryDirectory() as folder:
        names = named_candidates(Path(folder), second) if second is not None else {}
        if "ranking" in parts:
            record = {"second_base": built, "ranking": ranking_part(names)}
            (RESULTS / "parents.json").write_text(json.dumps(record, indent=1) + "\n")
        if "probe" in parts:
            record = {"settings": {"n0": 5, "preset": MEASURED_LABEL, "seed": 0, "threads": 1}}
            record["probe"] = probe_part(names)
            (RESULTS / "parents_probe.json").write_text(json.dumps(record, indent=1) + "\n")
    if "as" in parts:
        out = RESULTS / "parents_as.json"
        record = json.loads(out.read_text()) if out.exists() else {}
        record["settings"] = {
            "n0": 5,
            "caption": "a photo of sks",
            "preset": MEASURED_LABEL,
            "train": "finextract/zoo_weights/train",
            "device": "cpu",
            "backend": "auto (OpenVINO on a CPU)",
            "threads": 1,
            "machine": platform.platform(),
        }
        if built is not None:
            record["settings"]["second_base"] = built["recipe"]

        def save() -> None:
            out.write_text(json.dumps(record, indent=1) + "\n")

        as_part(second, bases, [int(s) for s in args.seeds.split(",")], record, save)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
