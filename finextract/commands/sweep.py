"""`finextract sweep`: AS and A-ESR against one setting (w, k, N or N0), one extraction per value, plotted."""

from __future__ import annotations

from .extract import add_selection_options
from .options import (
    DEFAULT_N,
    add_command,
    add_model_options,
    add_overwrite_option,
    add_runtime_options,
    add_sscd_options,
    add_step_options,
    extractor_from,
    positive_int,
)


def register(subparsers) -> None:
    p = add_command(
        subparsers,
        "sweep",
        run,
        help="sensitivity sweep: AS / A-ESR against w, k, N (num_images) or N0 (n0), with a plot",
        description="Run one extraction per (method, value) of one setting into OUT/<method>-<param>_<value>/ (normal "
        "extract output folders; finished ones are reused, unfinished ones resume), then write OUT/sweep.json, "
        "OUT/sweep.png (AS and A-ESR0.6 against the setting, one line per method) and OUT/report.html. "
        "Example: finextract sweep --base B --finetuned F --caption C --n0 5 --train T --param w --values 1,2,3,5,7 "
        "--methods finextract,cfg --out sweep_w/",
    )
    add_model_options(p)
    p.add_argument("--caption", required=True, help="the training caption c")
    p.add_argument("--train", required=True, help="folder of the real training images (AS / A-ESR)")
    p.add_argument(
        "--train-as-is", action="store_true", help="compare the training images as they are (no crop and resize)"
    )
    p.add_argument(
        "--param",
        required=True,
        choices=("w", "k", "num_images", "n0", "N", "N0"),
        help="the setting to sweep: w, k, num_images (N) or n0 (N0)",
    )
    p.add_argument(
        "--values",
        required=True,
        help="comma-separated values, e.g. 1,2,3,5,7 (num_images, n0: integers); negative ones after an equals "
        "sign: --values=-0.04,-0.02,0",
    )
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated guidance rules (default finextract,cfg; for k: finextract, the only one with k)",
    )
    p.add_argument("--n0", type=positive_int, required=True, help="N0, images extracted (swept with --param n0)")
    p.add_argument(
        "--num-images",
        type=positive_int,
        default=None,
        help=f"N, images generated (default the default preset's {DEFAULT_N})",
    )
    p.add_argument(
        "--w",
        type=float,
        default=None,
        help="fixed guidance scale (default 3: the default preset's for finextract, the paper's for cfg)",
    )
    p.add_argument("--k", type=float, default=None, help="fixed Eq. 13 correction (default: the paper's)")
    add_step_options(p, note=", at every point")
    add_selection_options(p)
    add_runtime_options(p)
    add_sscd_options(p)
    p.add_argument("--out", required=True, help="sweep folder (one extract folder per point, sweep.json/.png)")
    add_overwrite_option(p, "a point's run")


def _values(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--values {text!r}: expected comma-separated numbers, e.g. 1,2,3,5,7") from None


def run(args) -> int:
    from pathlib import Path

    from finextract.metrics import format_scores
    from finextract.store.folders import prepare
    from finextract.sweep import SPEC_OPTIONS, check_sweep, run_sweep

    from .options import read_image_folder, run_config_from

    methods = (
        args.methods.split(",") if args.methods else (["finextract"] if args.param == "k" else ["finextract", "cfg"])
    )
    param, values, methods = check_sweep(args.param, _values(args.values), methods)  # before any model loads
    config = run_config_from(args)
    folder = prepare(args.out, "sweep")
    train = read_image_folder("--train", args.train)
    extractor = extractor_from(args, config)
    summary = run_sweep(
        extractor,
        args.caption,
        param=param,
        values=values,
        methods=methods,
        out=folder,  # checked: run_sweep does not check it again
        train=train,
        train_as_is=args.train_as_is,
        n0=args.n0,
        num_images=args.num_images,
        w=args.w,
        k=args.k,
        overwrite=args.overwrite,
        spec_options={name: getattr(args, name) for name in SPEC_OPTIONS},
    )
    out = Path(args.out)
    for point in summary["points"]:
        print(
            f"{point['method']:<12} {param}={point['value']:<6g} {format_scores(point)}"
            + ("  (reused)" if point["reused"] else "")
        )
    print(f"plot: {out / 'sweep.png'}; report: {out / 'report.html'}; numbers: {out / 'sweep.json'}")
    return 0
