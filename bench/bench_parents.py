"""Parent-base ranking (`engine.loading.parents.rank_bases`) on the committed trained zoo.

    FINEXTRACT_THREADS=1 python bench/bench_parents.py     # writes bench/results/parents.json

Candidates: the committed trained base (`finextract/zoo_weights/base`, the parent of every committed
fine-tune), and two random tiny SD 1.x bases of the same architecture: seed 0 (the weights the trained
base was pretrained from, so its "grandparent") and seed 1 (unrelated). Ranked for the committed
DreamBooths (object, style) and LoRAs, with the time taken: each records the hashes of its parent's UNet
file (`finextract finetune`'s kohya keys), which name the trained base; the DreamBooths also by relative
L2 UNet distance.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from finextract.engine.loading.parents import rank_bases  # noqa: E402
from finextract.zoo.models import save_pipeline, tiny_components  # noqa: E402

WEIGHTS = ROOT / "finextract" / "zoo_weights"


def main() -> None:
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        candidates = [WEIGHTS / "base"]
        for seed in (0, 1):
            out = Path(folder) / f"random-seed{seed}"
            candidates.append(save_pipeline(tiny_components(seed, tokenizer_folder=out / "tokenizer"), out))
        for name in ("dreambooth", "style/dreambooth", "lora/pytorch_lora_weights.safetensors", "style/lora"):
            started = time.perf_counter()
            ranked = rank_bases(WEIGHTS / name, candidates)
            rows[name] = {
                "seconds": round(time.perf_counter() - started, 3),
                "ranking": [
                    {
                        "base": c.path.name if c.path.parent != WEIGHTS else "zoo_weights/base",
                        "compatible": c.compatible,
                        "match": c.match,
                        "distance": None if c.distance is None else round(c.distance, 4),
                    }
                    for c in ranked
                ],
            }
    print(json.dumps(rows, indent=1))
    (ROOT / "bench" / "results" / "parents.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
