"""Time to evidence (issue 23, item 4): AS and A-ESR0.6 against UNet evaluations on the committed trained zoo.

For each cell (scenario x fine-tune kind), sampling seed and setting (scheduler:steps), one FineXtract
extraction generates N_max images (image i from seed + i), and every prefix N of them is scored as
the extraction at that N: image i does not depend on N, so the first N images are what a run of N
generates. The prefix reuses the images' SSCD descriptors and is clustered by the extractor's own
code (`finextract.clustering.cluster_descriptors`, the call `finextract.extraction.cluster_images` makes);
it is scored with `finextract.evaluation.evaluate_against`. Recorded per prefix: AS, A-ESR0.6/0.7,
UNet evaluations (`finextract.generation.count_work`: N x steps x models), the best AS among the N
generated images (what a perfect selection reaches) and the seconds a run of N takes (generation and
SSCD pro-rated by N / N_max, clustering and scoring measured).

    FINEXTRACT_THREADS=1 python bench/bench_time_to_evidence.py --settings ddim:50,ddim:20 \
        --cells object:dreambooth --seeds 0
    python bench/bench_time_to_evidence.py --report      # the markdown table and the plot, nothing run

Results are appended to `bench/results/time_to_evidence.json` after every run; a run already there
(same cell, seed, setting, N0, N_max, prefixes, backend) is skipped, so an interrupted grid resumes.
`--report` (and the end of every run) writes `docs/time_to_evidence.png`: AS against UNet evaluations
(log x), one panel per cell, one marker per setting over its prefixes, error bars the sample standard
deviation over seeds, the paper's procedure (`--preset paper`: DDIM 50 at N = 50 x N0) ringed.
A scheduler other than ddim needs `RunConfig`'s `scheduler` field (issue 23, item 2).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "time_to_evidence.json"
PLOT = ROOT / "docs" / "time_to_evidence.png"
CELLS = ("object:dreambooth", "object:lora", "style:dreambooth", "style:lora")
# the held-out scenario's cells: trained on demand (`finextract zoo heldout --out DIR`, then `--zoo DIR`), never
# in the default grid: they score choices made on the four above
HELDOUT_CELLS = ("heldout:dreambooth", "heldout:lora")
FORMAT = "finextract-time-to-evidence/1"


def parse_settings(text: str) -> list[tuple[str, int]]:
    """ "ddim:50,dpmpp-2m:15" -> [("ddim", 50), ("dpmpp-2m", 15)].

    Raises:
        ValueError: an entry that is not SCHEDULER:STEPS with STEPS an integer >= 1, or a repeated one.
    """
    settings = []
    for entry in filter(None, text.split(",")):
        scheduler, _, steps = entry.partition(":")
        if not scheduler or not steps.isdigit() or int(steps) < 1:
            raise ValueError(f"--settings {entry!r}: expected SCHEDULER:STEPS, e.g. ddim:50")
        settings.append((scheduler, int(steps)))
    if not settings or len(set(settings)) != len(settings):
        raise ValueError(f"--settings {text!r}: give each SCHEDULER:STEPS once, e.g. ddim:50,ddim:20")
    return settings


def scheduler_options(scheduler: str) -> dict:
    """The run keywords that select `scheduler`: {} for ddim while `RunConfig` has no scheduler field.

    Raises:
        ValueError: another scheduler without that field (the solvers are issue 23, item 2).
    """
    from finextract.engine.config import RunConfig

    if "scheduler" in RunConfig.defaults():
        return {"scheduler": scheduler}
    if scheduler != "ddim":
        raise ValueError(f"--settings {scheduler}: this finextract has DDIM only (RunConfig has no scheduler field)")
    return {}


def score_prefixes(result, extractor, train, n0: int, prefixes, num_images: int) -> list[dict]:
    """Score each prefix of an extraction's generated images as the extraction at that N.

    Args:
        result: the `ExtractionResult` of `extractor.extract(..., num_images=max(prefixes), train=...)`:
            its `generated_descriptors` (M, D) and `generated_indices` (the M usable images' indices)
            are clustered again, restricted to the images below N.
        extractor: the `finextract.extract.Extractor` (its SSCD embedder, clustering budget, resolution).
        train: the training images (a folder, as `Extractor.extract`'s `train`).
        n0: N0. prefixes: the N values, each n0 <= N <= num_images. num_images: the images generated.

    Returns:
        One dict per prefix: {"N", "AS", "A-ESR0.6", "A-ESR0.7", "best_generated_AS" (the AS of the
        best among the N generated), "selection" (the extraction's rule), "threshold", "clique_sizes",
        "extracted" (indices into the generated images), "unet_evaluations", "seconds" (generation and
        SSCD pro-rated, clustering and scoring measured)}.

    Raises:
        ValueError: a prefix outside [n0, num_images], or fewer than n0 usable images below it.
    """
    import numpy as np

    from finextract.clustering import cluster_descriptors
    from finextract.evaluation import evaluate_against
    from finextract.generation import count_work

    indices = np.asarray(result.generated_indices)
    shared = result.timings["generate"] + result.timings["embed"]  # seconds for all num_images
    selection = result.config["clustering"].get("selection", "size")  # the extraction's rule (absent: "size")
    rows = []
    for n in prefixes:
        if not n0 <= n <= num_images:
            raise ValueError(f"prefix N = {n}: must lie in [N0 = {n0}, N_max = {num_images}]")
        started = time.perf_counter()
        rows_below = np.flatnonzero(indices < n)  # cluster_images drops degenerate images the same way
        if len(rows_below) < n0:
            raise ValueError(f"prefix N = {n}: only {len(rows_below)} usable images for N0 = {n0}")
        descriptors = result.generated_descriptors[rows_below]
        clustering = cluster_descriptors(descriptors, n0, budget=extractor.budget, selection=selection)
        metrics, _ = evaluate_against(
            train,
            descriptors[list(clustering.representatives)],
            extractor.embedder,
            resolution=extractor.resolution,
            generated_descriptors=descriptors,
            generated_indices=indices[rows_below],
        )
        per = result.work["per_image"]
        rows.append(
            {
                "N": n,
                "AS": metrics["AS"],
                "A-ESR0.6": metrics["A-ESR0.6"],
                "A-ESR0.7": metrics["A-ESR0.7"],
                "best_generated_AS": metrics["generated"]["AS"],
                "selection": selection,
                "threshold": clustering.threshold,
                "clique_sizes": [len(c) for c in clustering.cliques],
                "extracted": [int(indices[rows_below[i]]) for i in clustering.representatives],
                "unet_evaluations": count_work(n, n, per["steps"], per["terms"], 0.0, 0.0)["unet_evaluations"],
                "seconds": round(shared * n / num_images + time.perf_counter() - started, 2),
            }
        )
    return rows


def save_descriptors(folder: Path, entry: dict, result) -> Path:
    """`folder/<cell>-<seed>-<scheduler>-<steps>.npz`: the run's float32 (M, D) SSCD descriptors of its M
    usable generated images ("descriptors") and their indices ("indices"), for replays."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    name = f"{entry['cell'].replace(':', '-')}-{entry['seed']}-{entry['scheduler']}-{entry['steps']}.npz"
    path = folder / name
    descriptors = result.generated_descriptors.detach().cpu().numpy().astype(np.float32)
    np.savez(path, descriptors=descriptors, indices=np.asarray(result.generated_indices, dtype=np.int64))
    return path


def run_key(entry: dict) -> tuple:
    """What makes two runs the same: a run with this key in the results is skipped."""
    names = ("cell", "seed", "scheduler", "steps", "n0", "n_max", "prefixes", "backend", "w")
    return tuple(json.dumps(entry.get(name)) for name in names)


def load_results(path: Path) -> dict:
    if path.is_file():
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} file; pass another --json")
        return data
    return {"format": FORMAT, "runs": []}


def measure(args) -> None:
    from finextract.engine.config import default_threads
    from finextract.evidence import environment_record
    from finextract.extract import Extractor
    from finextract.spec import PRESETS, preset_guidance_w
    from finextract.store.files import write_json
    from finextract.zoo.scenarios import scenario_folder
    from finextract.zoo.trained import default_zoo_folder

    zoo = Path(args.zoo) if args.zoo else default_zoo_folder()
    results = load_results(args.json)
    done = {run_key(entry) for entry in results["runs"]}
    settings = parse_settings(args.settings)
    for scheduler, _ in settings:
        scheduler_options(scheduler)  # refuse a scheduler this finextract lacks before anything runs
    prefixes = sorted({int(n) for n in args.prefixes.split(",")})
    n_max = max(prefixes)
    for cell in args.cells.split(","):
        if cell not in CELLS + HELDOUT_CELLS:
            raise ValueError(f"--cells {cell!r}: expected some of {','.join(CELLS + HELDOUT_CELLS)}")
        scenario, kind = cell.split(":")
        folder = scenario_folder(zoo, scenario)
        caption = (folder / "caption.txt").read_text().strip()
        model = dict(finetuned=folder / "dreambooth") if kind == "dreambooth" else dict(lora=folder / "lora")
        extractor = None  # loaded when the cell has a run to do
        for seed in (int(s) for s in args.seeds.split(",")):
            for scheduler, steps in settings:
                entry = {
                    "cell": cell,
                    "seed": seed,
                    "scheduler": scheduler,
                    "steps": steps,
                    "n0": args.n0,
                    "n_max": n_max,
                    "prefixes": prefixes,
                    "backend": args.backend,
                }
                if args.w is not None:  # absent: the paper's w per kind, as in every earlier run
                    entry["w"] = args.w
                if run_key(entry) in done:
                    print(f"{cell} seed {seed} {scheduler}:{steps}: done already, skipped")
                    continue
                if extractor is None:
                    extractor = Extractor(zoo / "base", **model, backend=args.backend, device="cpu")
                started = time.perf_counter()
                result = extractor.extract(
                    caption,
                    args.n0,
                    num_images=n_max,
                    train=folder / "train",
                    seed=seed,
                    steps=steps,
                    progress=False,
                    w=preset_guidance_w("paper", "finextract", kind, args.w),  # not the default preset's
                    **scheduler_options(scheduler),
                )
                entry.update(
                    {
                        "method": "finextract",
                        "backend_used": extractor.config.backend,  # "auto" resolved (openvino on a CPU)
                        "threads": default_threads(),
                        "paper_setting": scheduler == "ddim" and steps == PRESETS["paper"]["steps"],
                        "wall_s": round(time.perf_counter() - started, 1),
                        "work": result.work,
                        "timings": {name: round(value, 2) for name, value in result.timings.items()},
                        "prefix_scores": score_prefixes(result, extractor, folder / "train", args.n0, prefixes, n_max),
                    }
                )
                results["runs"].append(entry)
                if args.descriptors:
                    save_descriptors(args.descriptors, entry, result)
                results["machine"] = environment_record()
                write_json(args.json, results, newline=True)
                done.add(run_key(entry))
                last = entry["prefix_scores"][-1]
                print(
                    f"{cell} seed {seed} {scheduler}:{steps}: {entry['wall_s']:.0f} s, N = {n_max}: AS {last['AS']:.3f}, "
                    f"A-ESR0.6 {last['A-ESR0.6']:.2f}, best generated {last['best_generated_AS']:.3f}"
                )


def summarise(runs: list[dict]) -> list[dict]:
    """One row per (cell, scheduler, steps, N): mean and sample std over seeds of AS, A-ESR0.6, best
    generated AS and seconds; UNet evaluations; `work` relative to the paper's setting (DDIM 50 at
    N = 50 x N0)."""
    from finextract.spec import PRESETS

    paper = PRESETS["paper"]
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        for score in run["prefix_scores"]:
            key = (run["cell"], run["scheduler"], run["steps"], score["N"], run["n0"])
            groups.setdefault(key, []).append(score)
    rows = []
    for (cell, scheduler, steps, n, n0), scores in sorted(groups.items()):
        evaluations = scores[0]["unet_evaluations"]
        terms = evaluations // (n * steps)  # UNet evaluations per image and step
        paper_evaluations = paper["images_per_n0"] * n0 * paper["steps"] * terms
        rows.append(
            {
                "cell": cell,
                "setting": f"{scheduler}:{steps}",
                "N": n,
                "seeds": len(scores),
                "unet_evaluations": evaluations,
                "work": evaluations / paper_evaluations,
                "paper": scheduler == "ddim" and steps == paper["steps"] and n == paper["images_per_n0"] * n0,
                **{
                    name: _stat([s[name] for s in scores])
                    for name in ("AS", "A-ESR0.6", "best_generated_AS", "seconds")
                },
            }
        )
    return rows


def _stat(values: list[float]) -> dict:
    """Mean and sample standard deviation (0 for one value)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def markdown_table(rows: list[dict]) -> str:
    """The summary as a markdown table (mean ± sample std over seeds)."""

    def pm(value):
        return f"{value['mean']:.3f} ± {value['std']:.3f}"

    lines = [
        "| cell | setting | N | seeds | UNet evaluations | work | AS | A-ESR0.6 | best generated AS | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mark = " (paper)" if r["paper"] else ""
        lines.append(
            f"| {r['cell']} | {r['setting']}{mark} | {r['N']} | {r['seeds']} | {r['unet_evaluations']:,} | "
            f"{r['work']:.2f} | {pm(r['AS'])} | {pm(r['A-ESR0.6'])} | {pm(r['best_generated_AS'])} | "
            f"{r['seconds']['mean']:.0f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> Path:
    """AS against UNet evaluations (log x): one panel per cell, one marker per setting over its N,
    error bars the seed spread (sample std), the paper's point ringed."""
    from matplotlib.ticker import NullFormatter

    from finextract.report import new_figure, save_plot

    cells = [cell for cell in CELLS + HELDOUT_CELLS if any(r["cell"] == cell for r in rows)]
    settings = sorted({r["setting"] for r in rows})
    markers = dict(zip(settings, "osD^v<>px*h"))
    fig = new_figure(4.0 * max(1, len(cells)), 3.4)
    axes = fig.subplots(1, max(1, len(cells)), squeeze=False)[0]
    for ax, cell in zip(axes, cells):
        for setting in settings:
            mine = sorted((r for r in rows if r["cell"] == cell and r["setting"] == setting), key=lambda r: r["N"])
            if not mine:
                continue
            x = [r["unet_evaluations"] for r in mine]
            ax.errorbar(
                x,
                [r["AS"]["mean"] for r in mine],
                yerr=[r["AS"]["std"] for r in mine],
                marker=markers[setting],
                capsize=3,
                label=setting,
            )
            for r in mine:
                ax.annotate(f"N={r['N']}", (r["unet_evaluations"], r["AS"]["mean"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")  # fmt: skip
                if r["paper"]:
                    ax.scatter([r["unet_evaluations"]], [r["AS"]["mean"]], s=220, facecolors="none",
                               edgecolors="red", linewidths=1.5, label="paper (--preset paper)", zorder=3)  # fmt: skip
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # the labelled decades only: minor labels overlap
        ax.set_title(cell.replace(":", " "))
        ax.set_xlabel("UNet evaluations")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("AS (mean ± std over seeds)")
    axes[-1].legend(fontsize=7)
    return save_plot(fig, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default="ddim:50", help="comma-separated SCHEDULER:STEPS (default ddim:50)")
    parser.add_argument("--cells", default=",".join(CELLS), help=f"comma-separated, of {','.join(CELLS)}")
    parser.add_argument("--seeds", default="0,1000,2000", help="sampling seeds: image i from seed + i")
    parser.add_argument("--n0", type=int, default=5, help="N0 (default 5)")
    parser.add_argument("--prefixes", default="50,100,250", help="the N scored; the largest is generated")
    parser.add_argument("--backend", default="auto", help="the extraction's backend (default auto)")
    parser.add_argument(
        "--w", type=float, default=None, help="FineXtract's w (default: the paper's per kind, DreamBooth 3, LoRA 5)"
    )
    parser.add_argument("--zoo", default=None, help="trained zoo folder (default: the committed one)")
    parser.add_argument(
        "--json", type=Path, default=RESULTS, help=f"results file (default {RESULTS.relative_to(ROOT)})"
    )
    parser.add_argument(
        "--descriptors",
        type=Path,
        default=None,
        help="also keep each run's SSCD descriptors of its generated images (an .npz per run) in this folder, "
        "to replay adaptive N and selection rules without generating again (bench/adaptive_stop.py)",
    )
    parser.add_argument("--plot", type=Path, default=PLOT, help=f"plot file (default {PLOT.relative_to(ROOT)})")
    parser.add_argument("--report", action="store_true", help="only print the table and write the plot")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")  # each extraction's status lines
    if not args.report:
        measure(args)
    runs = load_results(args.json)["runs"]
    if not runs:
        print(f"{args.json}: no runs yet")
        return 0
    rows = summarise(runs)
    print(markdown_table(rows))
    print(f"plot: {plot(rows, args.plot)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
