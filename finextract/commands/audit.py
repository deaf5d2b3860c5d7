"""`finextract audit`: extract every checkpoint of a manifest, on Ray (local by default) or in this process."""

from __future__ import annotations

import argparse

from .options import (
    add_command,
    add_overwrite_option,
    add_runtime_options,
    add_sscd_options,
    add_step_options,
    options_of,
    positive_int,
)

_DESCRIPTION = """\
Run FineXtract on every checkpoint of a manifest (CSV or JSON, one row per checkpoint) and sum them up.

Columns: id, base, finetuned or lora, caption (empty: Eq. 6, unconditional), n0; optional train
(folder of the real training images: adds AS / A-ESR), method, w, k, num_images, steps, seed.
base "auto" with bases (a folder of candidate bases): the parent is chosen when the manifest is read.
Relative paths are read from the manifest's folder.

Exit status: 0 when every row was attempted and at least one finished (failed rows are listed in
the summary with their error); 1 when every row failed (the most common error is printed once: a
cause shared by all rows lies in the environment or the settings, not in the checkpoints) or on an
error before any row runs (the manifest cannot be parsed, invalid settings); 130 on Ctrl-C (finished
rows and chunks are kept: rerun the same command to continue).

Each row writes the usual extract output to OUT/<id>/; OUT/summary.csv, OUT/summary.json and
OUT/index.html sum them up. Rerunning the same command skips finished rows and resumes cut-off ones
from their generation chunks. A bad row (missing field, missing file, duplicate id, a checkpoint that
does not load) is recorded in the summary and the other rows go on.
"""


def register(subparsers) -> None:
    p = add_command(
        subparsers,
        "audit",
        run,
        help="extract many checkpoints from a manifest (Ray: many GPUs / machines; resumable)",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("manifest", help="CSV or JSON manifest, one row per checkpoint")
    p.add_argument("--out", required=True, help="output folder (on a cluster: a path every node sees)")
    p.add_argument(
        "--executor",
        choices=("ray", "local"),
        default="ray",
        help="ray (default: a local Ray instance, or the cluster of --ray-address) or local (rows one after "
        "another in this process, same outputs; no Ray needed)",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        metavar="auto|HOST:PORT",
        help="join a running Ray cluster (started with `ray start --head`); default: start Ray on this machine",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        help="Ray workers (default: one per GPU; on CPUs, the cluster's CPUs / --threads)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=2,
        help="how often Ray retries a row whose worker process died (default 2; the retry resumes its chunks)",
    )
    add_step_options(p, note="; a row's own wins")
    add_runtime_options(p)
    add_sscd_options(p)
    p.add_argument(
        "--allow-pickle", action="store_true", help="allow pickle checkpoints (.ckpt/.bin): only for files you trust"
    )
    p.add_argument("--save-generated", action="store_true", help="also write all N images to OUT/<id>/generated/")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the per-row log lines remain)")
    add_overwrite_option(p, "a row's run (OUT/<id>/)")


def run(args) -> int:
    import logging

    from finextract.fleet import audit
    from finextract.fleet.summary import common_failure

    try:
        summary = audit(
            args.manifest,
            args.out,
            embedder=args.sscd,
            progress=not args.no_progress,
            **options_of(args, "executor", "ray_address", "workers", "retries", "sscd_preset", "allow_pickle"),
            **options_of(args, "save_generated", "overwrite", "device", "dtype", "backend", "threads"),
            **options_of(args, "batch_size", "steps", "scheduler", "seed", "cuda_graphs"),
        )
    except KeyboardInterrupt:
        logging.getLogger("finextract").warning("stopped by Ctrl-C; %s/summary.json lists what finished", args.out)
        return 130
    failure = common_failure(summary["rows"])
    if failure is not None:
        count, error = failure
        rows = len(summary["rows"])
        shared = "every row failed with" if count == rows else f"every row failed; {count} of {rows} with"
        logging.getLogger("finextract").error("%s: %s (%s/summary.json lists each row)", shared, error, args.out)
        return 1
    # failed rows beside finished ones are results (in the summary with their errors), not a failed command
    return 0
