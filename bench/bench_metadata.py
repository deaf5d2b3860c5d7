"""Audits without the training metadata: caption recovery (`--caption auto`) and N0 estimation (`--n0 auto`).

    nice -n 10 env FINEXTRACT_THREADS=1 OMP_NUM_THREADS=1 python bench/bench_metadata.py
    python bench/bench_metadata.py --parts n0            # only the N0 table (seconds)

Writes bench/results/metadata.json (updated after every part, so a stopped run keeps what it measured).

Parts:
- caption: `recover_caption` on the committed trained zoo's DreamBooth and LoRA (object scenario, true
  caption "a photo of sks"): the recovered caption and runner-ups, word recall (share of the true
  caption's words in the recovered one), trigger-token recall ("sks" recovered), the scores of the
  true and the recovered caption, seconds.
- as: extraction of the zoo DreamBooth with the true caption, the recovered one and Eq. 6 (method
  "finextract-uncond", no caption), same seeds, N = --num-images, --steps DDIM steps: AS / A-ESR
  against the zoo's training images, and the N0 estimate of each generated set (true N0 = 5).
- n0: `estimate_n0` on planted SSCD-like descriptor sets (`tests.planted`, clusters of 20 copies) with
  N0 = 3, 5, 8, 10, at N = 50 x N0 and at a fixed N = 250.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRUE_CAPTION = "a photo of sks"
TRIGGER = "sks"


def word_recall(true: str, recovered: str) -> float:
    """Share of the true caption's words that appear among the recovered caption's words."""
    words, found = true.lower().split(), set(recovered.lower().split())
    return sum(w in found for w in words) / len(words)


def caption_part(zoo: Path, record: dict, save, extra: list[str]) -> str:
    import torch

    from finextract.caption import CaptionScorer, cross_attention_deltas, recover_caption
    from finextract.engine.loading import load_model_pair

    recovered = {}
    # with --extra, the zoo rows measured before are kept and the extra rows replaced
    rows = [r for r in record.get("caption") or [] if r["fine_tune"].startswith("zoo")] if extra else []
    runs = [("zoo dreambooth", zoo / "dreambooth", None, TRUE_CAPTION), ("zoo lora", None, zoo / "lora", TRUE_CAPTION)]
    if extra:
        runs = []
        for item in extra:
            folder, caption = item.split("=", 1)
            runs.append((f"extra dreambooth {Path(folder).name}", Path(folder), None, caption))
    for name, finetuned, lora, true_caption in runs:
        pair = load_model_pair(zoo / "base", finetuned, lora=lora)
        pair.to("cpu", torch.float32)
        kind = name
        result = recover_caption(pair)
        tokenizer = pair.finetuned_tokenizer
        scorer = CaptionScorer(cross_attention_deltas(pair), pair.finetuned_text_encoder, tokenizer)
        true_ids = torch.tensor([tokenizer(true_caption, add_special_tokens=False).input_ids])
        true_score = float(scorer.score(true_ids))
        rows.append(
            {
                "fine_tune": name,
                "true_caption": true_caption,
                "recovered": result.caption,
                "runner_ups": [c["caption"] for c in result.candidates[1:]],
                "score_recovered": result.score,
                "score_true": true_score,
                "baseline": result.baseline,
                "length_scores": result.length_scores,
                "word_recall": word_recall(true_caption, result.caption),
                "trigger_recall": float(TRIGGER in result.caption.lower().split()),
                "trigger_in_candidates": float(any(TRIGGER in c["caption"].split() for c in result.candidates)),
                "seconds": result.seconds,
                "evaluations": result.evaluations,
            }
        )
        recovered[kind] = result.caption
        record["caption"] = rows
        save()
        print(json.dumps(rows[-1]), flush=True)
    return recovered.get("zoo dreambooth")


def as_part(zoo: Path, recovered: str, args, record: dict, save) -> None:
    """One generated set per run (same seeds), clustered with N0 = 5 and estimated from, as
    `Extractor.extract` does it, with the descriptors kept for the estimate."""
    from finextract.clustering.n0 import estimate_n0
    from finextract.evaluation import evaluate_against
    from finextract.extract import Extractor
    from finextract.extraction import cluster_images
    from finextract.generation import generate
    from finextract.sscd import embed_images

    extractor = Extractor(zoo / "base", zoo / "dreambooth", device="cpu", backend="torch")
    rows = []
    for label, caption, method in (
        ("true caption", TRUE_CAPTION, "finextract"),
        ("recovered caption", recovered, "finextract"),
        ("Eq. 6 (no caption)", "", "finextract-uncond"),
    ):
        start = time.perf_counter()
        config = extractor.config.replace(steps=args.steps)
        images = generate(extractor.pair, caption, args.num_images, method=method, config=config).images
        result = cluster_images(images, 5, extractor.embedder)
        metrics, _ = evaluate_against(
            zoo / "train", result.descriptors, extractor.embedder, resolution=extractor.resolution
        )
        seconds = time.perf_counter() - start
        row = {
            "run": label,
            "caption": caption,
            "method": method,
            "AS": metrics["AS"],
            "A-ESR0.6": metrics["A-ESR0.6"],
            "A-ESR0.7": metrics["A-ESR0.7"],
            "threshold": result.threshold,
            "seconds": seconds,
        }
        try:
            estimate = estimate_n0(embed_images(extractor.embedder, images, "generated"))
            row["n0_estimate"] = {
                "true_n0": 5,
                "n0": estimate.n0,
                "interval": list(estimate.interval),
                "confidence": estimate.confidence,
                "seconds": estimate.seconds,
            }
        except ValueError as error:
            row["n0_estimate"] = {"true_n0": 5, "error": str(error)}
        rows.append(row)
        record["as"] = rows
        save()
        print(json.dumps(row), flush=True)


def n0_part(record: dict) -> None:
    from finextract.clustering.n0 import estimate_n0
    from tests.planted import planted_descriptors

    rows = []
    for n0 in (3, 5, 8, 10):
        for label, n in (("50 x N0", 50 * n0), ("fixed 250", 250)):
            x, _ = planted_descriptors(n, n0, 20, seed=n0)
            estimate = estimate_n0(x)
            rows.append(
                {
                    "true_n0": n0,
                    "N": n,
                    "N_rule": label,
                    "estimate": estimate.n0,
                    "interval": list(estimate.interval),
                    "confidence": estimate.confidence,
                    "within_1": abs(estimate.n0 - n0) <= 1,
                    "seconds": estimate.seconds,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    record["n0_planted"] = rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="n0,caption,as", help="comma-separated: n0, caption, as")
    parser.add_argument("--num-images", type=int, default=50, help="N for the AS part (default 50)")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps for the AS part (default 20)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "metadata.json"))
    parser.add_argument(
        "--extra",
        nargs="*",
        default=[],
        help="caption part on other DreamBooths of the zoo base instead: FOLDER=TRUE_CAPTION (trigger: 'sks')",
    )
    args = parser.parse_args()
    from finextract.engine.config import set_threads
    from finextract.zoo.trained import default_zoo_folder

    set_threads()
    zoo = default_zoo_folder()
    out = Path(args.out)
    record = json.loads(out.read_text()) if out.exists() else {}
    record["machine"] = {"platform": platform.platform(), "note": "2 shared CPU cores, 1 thread, niced"}
    record["settings"] = {"num_images": args.num_images, "steps": args.steps}
    parts = args.parts.split(",")
    recovered = (record.get("caption") or [{}])[0].get("recovered")

    def save() -> None:
        out.write_text(json.dumps(record, indent=2))

    if "n0" in parts:
        n0_part(record)
        save()
    if "caption" in parts:
        recovered = caption_part(zoo, record, save, args.extra) or recovered
        save()
    if "as" in parts:
        if recovered is None:
            raise SystemExit("run the caption part first (--parts caption,as)")
        as_part(zoo, recovered, args, record, save)
        save()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
