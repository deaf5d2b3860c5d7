"""`finextract extract`: generate with model guidance, cluster, and write the extracted images."""

from __future__ import annotations

from .options import (
    DEFAULT_N,
    PAPER_N,
    add_command,
    add_model_options,
    add_overwrite_option,
    add_runtime_options,
    add_sampling_options,
    add_sscd_options,
    extractor_from,
)


def register(subparsers) -> None:
    p = add_command(
        subparsers,
        "extract",
        run,
        help="extract fine-tuning images (generate + SSCD + cliques)",
        description=f"FineXtract: generate N guided images (the default preset: {DEFAULT_N}; --preset paper: {PAPER_N}), "
        "cluster them, write N0 extracted images.",
    )
    add_model_options(p)
    add_sampling_options(p)
    add_runtime_options(p)
    p.add_argument(
        "--train",
        default=None,
        help="folder of the real training images: adds AS / A-ESR (compared as the fine-tune saw them: centre-"
        "cropped and resized to the model's resolution)",
    )
    p.add_argument(
        "--train-as-is",
        action="store_true",
        help="compare the --train images as they are, without the centre crop and resize",
    )
    p.add_argument("--save-generated", action="store_true", help="also write all N images to OUT/generated/")
    add_selection_options(p)
    add_sscd_options(p)
    p.add_argument("--out", required=True, help="output folder")
    add_overwrite_option(p, "an extract or cluster run (its generation chunks included)")


def add_selection_options(p) -> None:
    """--adaptive, --round-images, --stable-rounds (adaptive N), --selection, --on-budget (the clustering)."""
    from finextract.clustering.selection import ON_BUDGET, SELECTIONS
    from finextract.spec import DEFAULT_PRESET, PRESETS, ROUND_PER_N0, STABLE_ROUNDS

    from .options import positive_int

    p.add_argument(
        "--adaptive",
        action="store_true",
        help="generate in rounds and stop once the N0 extracted cliques are stable; --num-images is then the cap "
        "(default the paper's 50 x N0)",
    )
    p.add_argument(
        "--round-images",
        type=positive_int,
        default=None,
        help=f"with --adaptive: images per round (default {ROUND_PER_N0} x N0)",
    )
    p.add_argument(
        "--stable-rounds",
        type=positive_int,
        default=STABLE_ROUNDS,
        help=f"with --adaptive: consecutive stable rounds that stop it (default {STABLE_ROUNDS})",
    )
    p.add_argument(
        "--selection",
        choices=SELECTIONS,
        default=None,
        help="which N0 images are extracted: modes (no cliques: the N0 images with the most similar neighbours, "
        "none a near-copy of another), size (the paper's: the N0 largest cliques), density (size x mean "
        "similarity), merged (cliques with similar representatives merged first); default: the preset's "
        f"({PRESETS[DEFAULT_PRESET]['selection']}; --preset paper: {PRESETS['paper']['selection']})",
    )
    p.add_argument(
        "--on-budget",
        choices=ON_BUDGET,
        default="skip",
        help="a threshold whose clique search runs out of work budget: skip it (the paper's) or keep the cliques "
        "found (recorded as approximate)",
    )


def run(args) -> int:
    import logging

    from finextract.spec import RUN_PRESET_SETTINGS

    config, folder, spec = _check_inputs(args)  # before loading models or generating anything
    extractor = extractor_from(args, config)
    # out=folder: checked already, extract does not check it again; the preset's run settings as the
    # options resolved them (an explicit --steps overrides --preset): given, so extract keeps them
    resolved = {name: getattr(config, name) for name in RUN_PRESET_SETTINGS}
    result = extractor.extract(
        spec=spec, out=folder, save_generated=args.save_generated, overwrite=args.overwrite, **resolved
    )
    log = logging.getLogger("finextract")
    recovery = result.config.get("caption_recovery") or {}
    if recovery.get("source") == "recovered":
        log.info("recovered caption %r (score %.3f)", recovery["caption"], recovery["score"])
    if result.n0_estimate is not None:
        e = result.n0_estimate
        log.info("estimated N0 = %d (interval %d..%d, confidence %.2f)", e.n0, *e.interval, e.confidence)
    log.info("%s -> %s", result.selection_summary(), args.out)
    if result.metrics:
        from finextract.metrics import format_scores

        log.info("%s", format_scores(result.metrics))
    return 0


def _check_inputs(args):
    """Everything that needs no model, before any model loads: the run settings, the extraction
    (`ExtractionSpec`: N0 <= N, the method's caption, ...), --out (a writable folder holding no other
    run: `finextract.store.folders.prepare`) and --train (a folder with at least one readable image,
    read once: the spec carries the images).

    Returns:
        (RunConfig, the checked `RunFolder` of --out, ExtractionSpec).
    """
    import dataclasses

    from finextract.output import run_settings
    from finextract.spec import ExtractionSpec
    from finextract.store.folders import prepare

    from .options import read_image_folder, run_config_from

    config = run_config_from(args)
    spec = ExtractionSpec.from_attributes(args)  # --caption, --n0, ..., --train, --train-as-is, --sscd-preset, --preset
    models = {"base": args.base, "finetuned": args.finetuned, "lora": args.lora}
    folder = prepare(args.out, "extract", run_settings(models, spec, config), overwrite=args.overwrite)
    if args.train is not None:
        spec = dataclasses.replace(spec, train=read_image_folder("--train", args.train))
    return config, folder, spec
