"""`finextract demo --out DIR`: extract the training images of the committed trained tiny models.

The paper's Table 1 in small: two scenarios (object-driven: 5 photographs; style-driven: 10 drawings
in one style), each with a DreamBooth and a LoRA fine-tune (`finextract zoo path`), extracted with
FineXtract, CFG and Direct (N0 = the number of training images, N = the preset's N x N0, the same seeds
for every method) and scored against the training images as the fine-tune saw them (AS, A-ESR0.7, A-ESR0.6).
With `--seeds K` every cell is run with K disjoint sets of sampling seeds and reported as mean ± std;
the fine-tunes themselves are the committed ones (one per scenario and kind; fine-tuning seeds are
not varied). Writes `DIR/demo.json` and `DIR/report.html` (an index of the runs: table, the
training images and each run's best matches) beside each run's own folder and report.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from finextract.metrics import format_score, format_scores
from finextract.spec import DEFAULT_PRESET, PRESETS

from .options import (
    DEFAULT_N,
    PAPER_N,
    RUN_DEFAULTS,
    add_backend_option,
    add_command,
    add_device_option,
    add_overwrite_option,
    add_preset_option,
    add_sampler_options,
    options_of,
    positive_int,
)

logger = logging.getLogger(__name__)

SCENARIOS = ("object", "style")
KINDS = ("dreambooth", "lora")
METHODS = ("finextract", "cfg", "direct")
METRICS = ("AS", "A-ESR0.7", "A-ESR0.6")
METHOD_NAMES = {"finextract": "FineXtract", "cfg": "CFG", "direct": "Direct"}
KIND_NAMES = {"dreambooth": "DreamBooth", "lora": "LoRA"}
SCENARIO_NAMES = {"object": "Object-driven", "style": "Style-driven"}


def register(subparsers) -> None:
    parser = add_command(
        subparsers,
        "demo",
        run,
        help="extract the training images of the bundled tiny fine-tunes; print a Table-1-style table",
        description="Run FineXtract, CFG and Direct on the committed trained tiny DreamBooth and LoRA models of the "
        "object-driven (5 photographs) and style-driven (10 drawings) scenarios (N0 = the training set's size, "
        f"N = {DEFAULT_N} at {PRESETS[DEFAULT_PRESET]['steps']} DPM-Solver++ 2M steps, or the paper's {PAPER_N} at 50 "
        "DDIM steps with --preset paper; the same "
        "seeds for every method), score them against the training images (AS, A-ESR) and write report.html. The "
        "default (object scenario, one seed) takes about 36 s on 2 CPU cores once the ONNX exports are cached; "
        "--scenarios object,style --seeds 3 runs the full table as mean ± std over 3 sampling seeds.",
    )
    parser.add_argument("--out", required=True, help="output folder (one sub-folder per run, report.html)")
    parser.add_argument(
        "--zoo", default=None, help="trained zoo folder (default: the committed one, `finextract zoo path`)"
    )
    parser.add_argument(
        "--scenarios",
        default="object",
        help="comma-separated: object,style (default object)",
    )
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated: dreambooth,lora")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated: finextract,cfg,direct")
    parser.add_argument(
        "--seeds",
        type=positive_int,
        default=1,
        help="K: repeat every run with K disjoint sampling seed sets and report mean ± std (default 1)",
    )
    parser.add_argument("--seed", type=int, default=0, help="first seed; image i of repeat j uses seed + j*N + i")
    parser.add_argument(
        "--n0", type=positive_int, default=None, help="N0, images to extract (default: the training set's size)"
    )
    add_preset_option(parser)
    parser.add_argument(
        "--num-images",
        type=positive_int,
        default=None,
        help=f"N, images generated per run (default the preset's: {DEFAULT_N}; paper: {PAPER_N})",
    )
    add_sampler_options(parser, preset=True)
    # larger than RunConfig's 16: the default scenario's N = 100 in two UNet batches per step
    parser.add_argument("--batch-size", type=positive_int, default=50, help="images per UNet batch (default 50)")
    add_device_option(parser)
    add_backend_option(parser)
    add_overwrite_option(parser, "a run folder")


def _check_names(given, allowed, option: str) -> tuple:
    given = tuple(given)
    for name in given:
        if name not in allowed:
            raise ValueError(f"--{option} {name!r}: expected some of {','.join(allowed)}")
    return given


def run_demo(
    out: str | Path,
    zoo: str | Path | None = None,
    *,
    scenarios=("object",),
    kinds=KINDS,
    methods=METHODS,
    seeds: int = 1,
    seed: int = 0,
    n0: int | None = None,
    num_images: int | None = None,
    steps: int | None = None,
    scheduler: str | None = None,
    preset: str | None = None,
    batch_size: int = 50,
    device: str = RUN_DEFAULTS["device"],
    backend: str = RUN_DEFAULTS["backend"],
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Run every (scenario, kind, method, seed repeat) extraction on the trained zoo; write runs,
    demo.json and report.html.

    Args:
        out: output folder (created); run j of a cell goes to `<scenario>-<kind>-<method>-seed<j>/`.
        zoo: trained zoo folder (default: the committed one).
        scenarios, kinds, methods: subsets of SCENARIOS, KINDS, METHODS.
        seeds: K >= 1 repeats; repeat j samples image i from seed `seed + j * N + i` (disjoint sets).
        n0: N0 (default: each scenario's number of training images). num_images: N, steps and scheduler:
            the sampler (None: the preset's). preset: the procedure preset (`finextract.spec.PRESETS`;
            None = the default); num_images, steps and scheduler given override it.
        overwrite: replace a run folder holding a run with other settings (e.g. other --steps)
            instead of refusing it (`Extractor.extract(overwrite=)`, `--overwrite`).

    Returns:
        {"rows": one dict per run {"scenario", "kind", "method", "repeat", "seed", "AS", "A-ESR0.7",
         "A-ESR0.6", "best_match", "seconds", "folder"},
         "cells": one dict per (scenario, kind, method) {"AS": {"mean", "std", "values"}, ..., "unet_evaluations"},
         "complete": True, "config": {...}, "seconds": total}. std is the sample standard deviation
        (0 for K = 1). demo.json is rewritten after every run ("complete": False until the last).

    Raises:
        FileNotFoundError: no trained zoo at `zoo`, or a scenario missing from it.
        ValueError: an unknown scenario, kind or method, or seeds < 1; `out` holding another
            command's output (`finextract.store.folders.prepare`); a run folder holding a run with other
            settings, without `overwrite`.
    """
    from finextract.engine.config import RunConfig
    from finextract.extract import Extractor
    from finextract.spec import RUN_PRESET_SETTINGS, ExtractionSpec, preset_run_options
    from finextract.store.files import write_json
    from finextract.store.folders import prepare
    from finextract.zoo.scenarios import scenario_folder
    from finextract.zoo.trained import default_zoo_folder

    zoo = Path(zoo) if zoo else default_zoo_folder()
    if not (zoo / "base" / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{zoo}: no trained zoo (base/model_index.json); build one with `finextract zoo build --trained`"
        )
    scenarios = _check_names(scenarios, SCENARIOS, "scenarios")
    kinds = _check_names(kinds, KINDS, "kinds")
    methods = _check_names(methods, METHODS, "methods")
    if seeds < 1:
        raise ValueError(f"--seeds {seeds}: must be >= 1")
    folders = {name: scenario_folder(zoo, name) for name in scenarios}
    for name, folder in folders.items():
        if not (folder / "caption.txt").is_file():
            raise FileNotFoundError(f"{folder}: the {name} scenario is missing from the zoo (no caption.txt)")
    config = RunConfig.resolve(
        **preset_run_options(
            preset, device=device, backend=backend, steps=steps, scheduler=scheduler, batch_size=batch_size, seed=seed
        )
    )
    resolved = {name: getattr(config, name) for name in RUN_PRESET_SETTINGS}  # given to extract: kept
    out = prepare(out, "demo").path
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows, settings = [], {}

    def summary(complete: bool) -> dict:
        return {
            "rows": rows,
            "cells": summarise(rows),
            "complete": complete,
            "seconds": round(time.perf_counter() - started, 1),
            "config": {
                "zoo": str(zoo),
                "scenarios": settings,
                "seeds": seeds,
                "seed": seed,
                "sampling_seeds": "repeat j, image i: seed + j * N + i",
                "finetune_seeds": "not varied: one committed fine-tune per scenario and kind",
                "preset": specs[scenarios[0], methods[0]].preset,
                "steps": config.steps,
                "scheduler": config.scheduler,
                "batch_size": batch_size,
                "device": device,
                "backend": backend,
            },
        }

    specs = {}  # (scenario, method) -> ExtractionSpec, every one checked before the first run
    for scenario in scenarios:
        folder = folders[scenario]
        caption = (folder / "caption.txt").read_text().strip()
        train_count = len(list((folder / "train").glob("*.png")))
        for method in methods:
            specs[scenario, method] = ExtractionSpec.resolve(
                caption,
                n0 or train_count,
                num_images=num_images,
                method=method,
                train=folder / "train",
                preset=preset,
            )
        spec = specs[scenario, methods[0]]
        settings[scenario] = {"caption": caption, "n0": spec.n0, "num_images": spec.num_images, "train": train_count}
    extractors = {}
    runs, total = 0, seeds * len(scenarios) * len(kinds) * len(methods)
    # seed repeats outermost: an interrupted demo has whole tables for the seeds it finished
    for repeat in range(seeds):
        for scenario in scenarios:
            folder, scenario_settings = folders[scenario], settings[scenario]
            for kind in kinds:
                if (scenario, kind) not in extractors:
                    finetuned = (
                        dict(finetuned=folder / "dreambooth") if kind == "dreambooth" else dict(lora=folder / "lora")
                    )
                    extractors[scenario, kind] = Extractor(zoo / "base", **finetuned, config=config)
                for method in methods:
                    t = time.perf_counter()
                    run_seed = seed + repeat * scenario_settings["num_images"]
                    run_folder = out / f"{scenario}-{kind}-{method}-seed{repeat}"
                    runs += 1
                    result = extractors[scenario, kind].extract(
                        spec=specs[scenario, method],
                        seed=run_seed,
                        **resolved,
                        out=run_folder,
                        progress=progress,
                        label=f"run {runs}/{total} {scenario} {kind} {method} seed {repeat}",
                        overwrite=overwrite,
                    )
                    metrics = result.metrics
                    # each run's own scores as it finishes: the table only comes after the last run
                    logger.info(
                        "run %d/%d %s %s %s seed %d: %s (%.0f s)",
                        runs,
                        total,
                        scenario,
                        kind,
                        method,
                        repeat,
                        format_scores(metrics),
                        time.perf_counter() - t,
                    )
                    _save_best_matches(result.images, metrics["best_match"], run_folder / "best_match")
                    rows.append(
                        {
                            "scenario": scenario,
                            "kind": kind,
                            "method": method,
                            "repeat": repeat,
                            "seed": run_seed,
                            **{name: metrics[name] for name in METRICS},
                            "unet_evaluations": result.work["unet_evaluations"],
                            "best_match": metrics["best_match"],
                            "seconds": round(time.perf_counter() - t, 1),
                            "folder": run_folder.name,
                        }
                    )
                    # after every run, so an interrupted demo keeps what it measured (and a rerun
                    # into the same folder resumes the generation chunks already written)
                    write_json(out / "demo.json", summary(False), newline=True)
    result = summary(True)
    write_json(out / "demo.json", result, newline=True)
    _write_index(out, result, {name: folders[name] for name in scenarios})
    return result


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and sample standard deviation (ddof 1; 0 for one run) of each metric per (scenario, kind, method)."""
    import numpy as np

    cells = {}
    for row in rows:
        cells.setdefault((row["scenario"], row["kind"], row["method"]), []).append(row)
    out = []
    for (scenario, kind, method), runs in cells.items():
        cell = {"scenario": scenario, "kind": kind, "method": method, "runs": len(runs)}
        cell["unet_evaluations"] = runs[0]["unet_evaluations"]  # N x steps x models: the same for every seed
        for name in METRICS:
            values = np.array([r[name] for r in runs], dtype=float)
            std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            cell[name] = {"mean": float(values.mean()), "std": std, "values": values.round(4).tolist()}
        out.append(cell)
    return out


def _save_best_matches(images, best_match: list[dict], folder: Path) -> None:
    """Write the extracted image closest to training image i as `folder/train<i>.png`."""
    from finextract.store.files import write_png

    for match in best_match:
        write_png(images[match["extracted"]], folder / f"train{match['train']}.png")


def _value(cell: dict, name: str, with_std: bool) -> str:
    mean, std = cell[name]["mean"], cell[name]["std"]
    return f"{format_score(mean)}±{format_score(std)}" if with_std else format_score(mean)


def format_table(cells: list[dict]) -> str:
    """The paper's Table 1 layout, one block per scenario: a line per method, AS / A-ESR0.7 / A-ESR0.6
    and the UNet evaluations each extraction cost ("evals": images x steps x models) per fine-tune kind;
    mean ± std when a cell has several runs."""
    with_std = any(c["runs"] > 1 for c in cells)
    width = (14 if with_std else 8) + 2  # "A-ESR0.7" is 8 characters: two spaces between columns
    evals = 8  # "evals" column: up to 7 digits
    by_key = {(c["scenario"], c["kind"], c["method"]): c for c in cells}
    blocks = []
    for scenario in [s for s in SCENARIOS if any(c["scenario"] == s for c in cells)]:
        kinds = [k for k in KINDS if any((scenario, k, m) in by_key for m in METHODS)]
        methods = [m for m in METHODS if any((scenario, k, m) in by_key for k in kinds)]
        group = width * 3 + evals + 1
        first = max(12, len(SCENARIO_NAMES[scenario]) + 1)  # "Object-driven" is 13 characters
        lines = [
            f"{SCENARIO_NAMES[scenario]:<{first}}" + "".join(f"| {KIND_NAMES[k]:<{group}}" for k in kinds),
            f"{'Method':<{first}}"
            + "".join("| " + "".join(f"{m:<{width}}" for m in METRICS) + f"{'evals':<{evals}} " for _ in kinds),
        ]
        lines.append("-" * len(lines[1]))
        for method in methods:
            line = f"{METHOD_NAMES[method]:<{first}}"
            for kind in kinds:
                cell = by_key.get((scenario, kind, method))
                if cell is None:
                    line += f"| {'-':<{group}}"
                else:
                    line += "| " + "".join(f"{_value(cell, m, with_std):<{width}}" for m in METRICS)
                    line += f"{cell['unet_evaluations']:<{evals}} "
            lines.append(line.rstrip())
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _write_index(out: Path, summary: dict, folders: dict) -> None:
    """report.html: the table, each scenario's training images, and each run's best matches (first seed)."""
    import shutil

    from finextract.report import esc, figure, image, similarity_text, table, write_page

    settings = summary["config"]["scenarios"]
    seeds = summary["config"]["seeds"]
    spread = (
        f"{seeds} sampling seed sets per cell (mean ± std)"
        if seeds > 1
        else "one sampling seed set per cell (one run each, so no spread: --seeds K gives mean ± std)"
    )
    body = [
        "<h1>FineXtract on the tiny trained models</h1>",
        f"<p>{summary['config']['steps']} {summary['config'].get('scheduler', 'ddim')} steps, the same seeds for every method, {spread}; the fine-tunes "
        f"are the committed ones. Total {summary['seconds']:.0f} s.</p>",
        table(
            ("scenario", "kind", "method", *METRICS, "UNet evaluations", "runs"),
            [
                (
                    SCENARIO_NAMES[cell["scenario"]],
                    KIND_NAMES[cell["kind"]],
                    METHOD_NAMES[cell["method"]],
                    *(_value(cell, name, seeds > 1) for name in METRICS),
                    cell["unet_evaluations"],
                    cell["runs"],
                )
                for cell in summary["cells"]
            ],
            numeric=(3, 4, 5, 6, 7),
        ),
        "<p class='note'>AS: mean over the training images of the SSCD similarity to their best extracted "
        "match (paper Eq. 1). A-ESR0.6 / 0.7: share of training images whose best match exceeds 0.6 / 0.7 "
        "(Eq. 2); such matches are green / bold green below. UNet evaluations: what one extraction cost, "
        "images x sampler steps x models per step (2 for FineXtract and CFG, 1 for Direct).</p>",
    ]
    for scenario, folder in folders.items():
        train_dir = out / "train" / scenario
        train_dir.mkdir(parents=True, exist_ok=True)
        train = sorted((folder / "train").glob("*.png"))
        for path in train:
            shutil.copy(path, train_dir / path.name)
        config = settings[scenario]
        body.append(
            f"<h2>{SCENARIO_NAMES[scenario]}: training images (X0)</h2><p>Caption "
            f"<code>{esc(config['caption'])}</code>; N0 = {config['n0']}, N = {config['num_images']}.</p>"
        )
        body.append(
            "<div>"
            + "".join(figure(image(train_dir / p.name, out=out, side=96), esc(p.stem)) for p in train)
            + "</div>"
        )
        body.append("<h3>Best extracted match per training image (first seed)</h3>")
        for r in summary["rows"]:
            if r["scenario"] != scenario or r["repeat"] != 0:
                continue
            cells = [
                figure(
                    image(out / r["folder"] / "best_match" / f"train{m['train']}.png", out=out, side=96),
                    similarity_text(m["similarity"]),
                )
                for m in r["best_match"]
            ]
            body.append(
                f"<h4>{KIND_NAMES[r['kind']]} / {METHOD_NAMES[r['method']]} "
                f"(<a href='{esc(r['folder'])}/report.html'>report</a>)</h4><div>{''.join(cells)}</div>"
            )
    write_page(out / "report.html", "finextract demo", body)


def run(args) -> int:
    import logging

    summary = run_demo(
        args.out,
        args.zoo,
        scenarios=args.scenarios.split(","),
        kinds=args.kinds.split(","),
        methods=args.methods.split(","),
        **options_of(
            args, "seeds", "seed", "n0", "num_images", "steps", "scheduler", "preset", "batch_size", "device", "backend"
        ),
        overwrite=args.overwrite,
    )
    print(format_table(summary["cells"]))
    out = Path(args.out).resolve()
    print(
        f"\n{len(summary['rows'])} extractions in {summary['seconds']:.0f} s. Report: {out / 'report.html'}; "
        f"extracted images: {out}/<scenario>-<kind>-<method>-seed<j>/extracted/; numbers: {out / 'demo.json'}"
    )
    logging.getLogger("finextract").debug("demo config %s", summary["config"])
    return 0
