"""`finextract cluster`: cluster an existing folder of images into N0 cliques (SSCD + clique search)."""

from __future__ import annotations

from finextract.clustering.selection import SELECTIONS

from .options import (
    add_command,
    add_device_option,
    add_overwrite_option,
    add_sscd_options,
    n0_or_auto,
    positive_int,
    read_image_folder,
    run_config_from,
)


def register(subparsers) -> None:
    p = add_command(
        subparsers,
        "cluster",
        run,
        help="cluster a folder of images into N0 cliques",
        description="Embed images with SSCD and return N0 of them: the representatives of the N0 largest cliques "
        "(FineXtract Sec. 4.3), or by another --selection rule.",
    )
    p.add_argument(
        "--images",
        required=True,
        help="folder of generated images (PNG/JPEG), or the output folder of `finextract generate` or of "
        "`extract` (its generation/ is read)",
    )
    p.add_argument(
        "--n0",
        type=n0_or_auto,
        required=True,
        help="N0: number of images to extract, or 'auto' to estimate it from the images (at least 50)",
    )
    p.add_argument("--out", required=True, help="output folder (extracted/, result.json, report.html)")
    add_sscd_options(p)
    p.add_argument("--budget", type=positive_int, default=None, help="clustering search budget per threshold")
    p.add_argument(
        "--selection",
        choices=SELECTIONS,
        default="size",
        help="which N0 images are returned: size (the paper's, the default here: the N0 largest cliques), modes "
        "(extract's default: the N0 images with the most similar neighbours, none a near-copy of another), "
        "density or merged (see `finextract extract --help`)",
    )
    add_device_option(p)
    add_overwrite_option(p, "a cluster or extract run (other --images or --n0)")


def run(args) -> int:
    import logging
    from pathlib import Path

    from finextract.extraction import cluster_images
    from finextract.output import extraction_config, write_output
    from finextract.sscd import load_embedder
    from finextract.store.folders import prepare, run_entry

    folder = prepare(args.out, "cluster", overwrite=args.overwrite)  # before reading the images
    config = run_config_from(args)  # --device; the threads of torch and SSCD
    config.apply_threads()
    images, paths = read_image_folder("--images", args.images, want="generated")
    images_folder, out = Path(args.images).resolve(), Path(args.out).resolve()
    if images_folder == out or out in images_folder.parents:
        raise ValueError(f"--out {args.out} holds --images {args.images}: write the clusters to another folder")
    # what defines this run: a re-run into --out with other images or N0 is refused unless --overwrite
    settings = {"images": str(images_folder), "files": [p.name for p in paths], "n0": args.n0}
    if args.selection != "size":  # absent: the paper's rule, as in runs made before the option
        settings["selection"] = args.selection
    prepare(folder, "cluster", settings, overwrite=args.overwrite)  # the settings only: --out was checked
    embedder = load_embedder(args.sscd, sscd_preset=args.sscd_preset, device=config.device, threads=config.threads)
    result = cluster_images(images, args.n0, embedder, budget=args.budget, selection=args.selection)
    result.config = extraction_config(
        n0=result.n0_estimate.n0 if result.n0_estimate is not None else args.n0,
        num_images=len(images),
        embedder=embedder,
        budget=args.budget,
        inputs={"images": str(args.images), "files": [p.name for p in paths]},
    )
    result.config["clustering"] = {"selection": args.selection}  # as extract records it
    record = {
        "method": "cluster",
        "extracted_sources": [paths[i].name for i in result.indices],
        "run_folder": run_entry("cluster", settings),
    }
    write_output(args.out, result, record)
    logging.getLogger("finextract").info("%s -> %s", result.selection_summary(), args.out)
    return 0
