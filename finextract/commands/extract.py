"""`finextract extract`: generate with model guidance, cluster, and write the extracted images."""

from __future__ import annotations

from .options import (
    add_model_options,
    add_overwrite_option,
    add_runtime_options,
    add_sampling_options,
    extractor_from,
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "extract",
        help="extract fine-tuning images (generate + SSCD + cliques)",
        description="FineXtract: generate N = 50 x N0 guided images, cluster them, write N0 extracted images.",
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
    p.add_argument("--sscd", default="default", help="SSCD model: 'default' or a TorchScript/ONNX file")
    p.add_argument("--preset", choices=("sscd", "paper"), default=None, help="SSCD preprocessing (default sscd)")
    p.add_argument("--out", required=True, help="output folder")
    add_overwrite_option(p, "an extract or cluster run (its generation chunks included)")
    p.set_defaults(func=run)


def run(args) -> int:
    import logging

    config, folder, train = _check_inputs(args)  # before loading models or generating anything
    extractor = extractor_from(args, config)
    result = extractor.extract(
        args.caption,
        args.n0,
        num_images=args.num_images,
        method=args.method,
        w=args.w,
        k=args.k,
        out=folder,  # checked: extract does not check it again
        train=train,
        train_as_is=args.train_as_is,
        save_generated=args.save_generated,
        overwrite=args.overwrite,
    )
    log = logging.getLogger("finextract")
    recovery = result.config.get("caption_recovery") or {}
    if recovery.get("source") == "recovered":
        log.info("recovered caption %r (score %.3f)", recovery["caption"], recovery["score"])
    if result.n0_estimate is not None:
        e = result.n0_estimate
        log.info("estimated N0 = %d (interval %d..%d, confidence %.2f)", e.n0, *e.interval, e.confidence)
    log.info("threshold %.2f, clique sizes %s -> %s", result.threshold, [len(c) for c in result.cliques], args.out)
    if result.metrics:
        from finextract.metrics import format_scores

        log.info("%s", format_scores(result.metrics))
    return 0


def _check_inputs(args):
    """Everything that needs no model, before any model loads: the run settings, N0 <= N, --out (a
    writable folder holding no other run: `finextract.store.folders.prepare`) and --train (a folder with
    at least one readable image, read once).

    Returns:
        (RunConfig, the checked `RunFolder` of --out, the training images as `read_images` returns them
        or None).
    """
    from finextract.extract import AUTO, AUTO_NUM_IMAGES, IMAGES_PER_N0, run_settings
    from finextract.store.folders import prepare

    from .options import read_image_folder, run_config_from

    config = run_config_from(args)
    if args.n0 == AUTO:
        from finextract.clustering.n0 import MIN_IMAGES

        num_images = args.num_images if args.num_images is not None else AUTO_NUM_IMAGES
        if num_images < MIN_IMAGES:
            raise ValueError(f"--num-images {num_images}: estimating N0 (--n0 auto) needs at least {MIN_IMAGES} images")
    else:
        num_images = args.num_images if args.num_images is not None else IMAGES_PER_N0 * args.n0
        if num_images < args.n0:
            raise ValueError(
                f"--num-images {num_images} is below --n0 {args.n0}: generate at least N0 images (the paper: 50 x N0)"
            )
    models = {"base": args.base, "finetuned": args.finetuned, "lora": args.lora}
    settings = run_settings(
        models, args.caption, args.n0, num_images, args.method, args.w, args.k, config.steps, config.seed
    )
    folder = prepare(args.out, "extract", settings, overwrite=args.overwrite)
    return config, folder, read_image_folder("--train", args.train) if args.train is not None else None
