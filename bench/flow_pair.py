"""Model guidance on a flow-matching model: FineXtract, CFG and Direct on the trained tiny SD3 pair.

Builds (or takes from `--cache`) the trained flow pair (`finextract.zoo.flow_trained.build_flow_zoo`:
an SD3-architecture base trained with rectified flow, its object DreamBooth and LoRA), then runs
`finextract demo` on it (object scenario, N0 = 5, the default preset of the committed run's time: N = 50,
25 steps of the flow form of DPM-Solver++ 2M, the paper's selection and w, which is `--preset paper` with
those N and steps; 3 sampling seed sets, torch on the CPU) and writes the table, each
cell's best-generated-image AS (the best any of the N images reached: the ceiling a perfect pick
could score), the training losses and the stage timings.

    FINEXTRACT_THREADS=1 python bench/flow_pair.py --zoo /tmp/flow_zoo --cache /tmp/flow_cache \\
        --out /tmp/flow_demo --json bench/results/flow_pair.json

A rerun with the same cache trains nothing; a rerun into the same --out resumes the extractions.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", required=True, help="folder to build the flow pair into")
    parser.add_argument("--cache", default=None, help="folder keeping each trained stage (reused when it matches)")
    parser.add_argument("--out", required=True, help="the demo's output folder (one sub-folder per run)")
    parser.add_argument("--seeds", type=int, default=3, help="sampling seed sets (default 3)")
    parser.add_argument("--json", default=None, help="also write the summary here")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    import torch

    from finextract.commands.demo import format_table, run_demo
    from finextract.engine.config import set_threads
    from finextract.zoo.flow_trained import build_flow_zoo

    set_threads()
    started = time.perf_counter()
    zoo = build_flow_zoo(args.zoo, cache=args.cache)
    demo = run_demo(  # the settings bench/results/flow_pair.json was measured with (see the docstring)
        args.out,
        zoo,
        scenarios=("object",),
        seeds=args.seeds,
        backend="torch",
        device="cpu",
        preset="paper",
        num_images=50,
        steps=25,
        scheduler="dpmpp-2m",
    )
    ceiling = {}
    for row in demo["rows"]:
        metrics = json.loads((Path(args.out) / row["folder"] / "result.json").read_text())["metrics"]
        generated = metrics.get("generated", {})
        ceiling.setdefault(f"{row['kind']}/{row['method']}", []).append(generated.get("AS"))
    summary = {
        "table": format_table(demo["cells"]),
        "cells": demo["cells"],
        "best_generated_as": ceiling,
        "zoo": json.loads((zoo / "flow_zoo.json").read_text()),
        "config": demo["config"],
        "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(summary["table"])
    print(json.dumps({"best_generated_as": ceiling, "losses": summary["zoo"]["losses"]}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
