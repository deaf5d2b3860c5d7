"""FineXtract's w on the trained tiny SD3 flow pair, over the 3 sampling seed sets of bench/flow_pair.py.

Runs `finextract sweep --param w` for the LoRA (k = 0) and the DreamBooth (k = -0.02, its default) at
each seed set the flow pair table uses (`finextract demo --seeds 3`: repeat j samples image i from seed
j * N + i, N = 50, so --seed 0, 50, 100), object scenario, N0 = 5, that table's settings (N = 50, 25 steps of
the flow form of DPM-Solver++ 2M and the paper's selection, size: the default preset of its time), torch on
the CPU, and writes mean ± sample std of AS and A-ESR
per (kind, w) next to Direct's cells from bench/results/flow_pair.json (the same seeds).

    FINEXTRACT_THREADS=1 python bench/flow_pair_w.py --zoo /tmp/flow_zoo --out /tmp/flow_sweep_w \\
        --json bench/results/flow_pair_w.json

The zoo is `finextract zoo build --trained --families sd3 --out /tmp/flow_zoo`. Finished sweep points
under --out are reused, so a rerun only aggregates; `--kinds lora` runs one kind (two processes, one
per kind, halve the wall time on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

N = 50  # bench/flow_pair.py's N (10 x N0 at N0 = 5)
SEEDS = (0, N, 2 * N)  # demo --seeds 3: repeat j starts at seed j * N
K = {"lora": 0.0, "dreambooth": -0.02}  # each kind's default Eq. 13 k
MODEL_OPTION = {"lora": ("--lora", "lora"), "dreambooth": ("--finetuned", "dreambooth")}
METRICS = ("AS", "A-ESR0.7", "A-ESR0.6")
DIRECT = Path(__file__).parent / "results" / "flow_pair.json"


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values), "values": values}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", required=True, help="the built flow pair (base/, dreambooth/, lora/, train/)")
    parser.add_argument("--out", required=True, help="sweep folders go to OUT/<kind>-seed<seed>/")
    parser.add_argument("--values", default="1,2,3,5", help="w values (default 1,2,3,5)")
    parser.add_argument("--kinds", default="lora,dreambooth", help="comma-separated kinds (default both)")
    parser.add_argument("--json", default=None, help="also write the summary here (needs both kinds run)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    from finextract.cli import main as finextract

    zoo, out = Path(args.zoo), Path(args.out)
    caption = (zoo / "caption.txt").read_text().strip()
    started = time.perf_counter()
    kinds = args.kinds.split(",")
    for kind in kinds:
        option, folder = MODEL_OPTION[kind]
        for seed in SEEDS:
            command = ["sweep", "--base", str(zoo / "base"), option, str(zoo / folder), "--caption", caption]
            command += ["--train", str(zoo / "train"), "--n0", "5", "--param", "w", "--values", args.values]
            command += ["--methods", "finextract", f"--k={K[kind]}", "--steps", "25", "--scheduler", "dpmpp-2m"]
            command += ["--num-images", str(N), "--selection", "size"]
            command += ["--seed", str(seed), "--backend", "torch", "--device", "cpu"]
            if finextract([*command, "--out", str(out / f"{kind}-seed{seed}")]):
                raise SystemExit(f"finextract sweep failed for {kind} seed {seed}")

    direct = {c["kind"]: c for c in json.loads(DIRECT.read_text())["cells"] if c["method"] == "direct"}
    summary = {"kinds": {}, "seeds": list(SEEDS), "k": K, "seconds": round(time.perf_counter() - started, 1)}
    lines = ["kind        w    AS              A-ESR0.6"]
    for kind in kinds:
        points = {}
        for seed in SEEDS:
            for point in json.loads((out / f"{kind}-seed{seed}" / "sweep.json").read_text())["points"]:
                points.setdefault(point["value"], []).append(point)
        reference = {m: direct[kind][m] for m in METRICS}
        cells = {}
        for w in sorted(points):
            cells[f"{w:g}"] = {m: _spread([p[m] for p in points[w]]) for m in METRICS}
            # paired by seed set: the same initial noise as Direct's run, so the per-seed lead is the comparison
            lead = [p["AS"] - d for p, d in zip(points[w], reference["AS"]["values"])]
            cells[f"{w:g}"]["AS minus Direct"] = _spread(lead)
        summary["kinds"][kind] = {"finextract": cells, "direct": reference}
        for w, cell in cells.items():
            lines.append(
                f"{kind:<11} {w:<4} {cell['AS']['mean']:.3f} ± {cell['AS']['std']:.3f}   "
                f"{cell['A-ESR0.6']['mean']:.2f} ± {cell['A-ESR0.6']['std']:.2f}   "
                f"lead over Direct {cell['AS minus Direct']['mean']:+.3f} ± {cell['AS minus Direct']['std']:.3f}"
            )
        lines.append(
            f"{kind:<11} Direct {reference['AS']['mean']:.3f} ± {reference['AS']['std']:.3f} "
            f"{reference['A-ESR0.6']['mean']:.2f} ± {reference['A-ESR0.6']['std']:.2f}"
        )
    summary["table"] = "\n".join(lines)
    print(summary["table"])
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
