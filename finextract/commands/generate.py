"""`finextract generate`: N guided samples (the preset's N x N0) into a resumable chunked folder.

    finextract generate --base BASE (--finetuned FT | --lora LORA) --caption TEXT --n0 K --out DIR

Rerunning the same command after an interruption continues from the last finished chunk.
"""

from __future__ import annotations

from .options import add_command, add_model_options, add_overwrite_option, add_runtime_options, add_sampling_options


def register(subparsers) -> None:
    parser = add_command(
        subparsers,
        "generate",
        run,
        help="generate N guided samples (FineXtract Eq. 13 by default), resumable",
        description="Generate N images guided from the pretrained towards the fine-tuned model, written in "
        "chunks with a manifest; rerun the same command to resume after an interruption.",
    )
    add_model_options(parser)
    add_sampling_options(parser, n0_required=False)
    add_runtime_options(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--png", action="store_true", help="also write each image as OUT/images/gen00012.png, as each chunk finishes"
    )
    parser.add_argument("--out", required=True, help="output folder (chunks + manifest.json); reuse it to resume")
    add_overwrite_option(parser, "a generation (its chunks and images/ are deleted)")


def run(args) -> int:
    from finextract.generation import generate
    from finextract.spec import default_num_images, preset_guidance_w
    from finextract.store.folders import prepare

    from .options import model_pair_from, run_config_from

    if args.n0 is None and args.num_images is None:
        raise ValueError("give --n0 (N = the preset's N x N0 images) or --num-images N")
    num_images = args.num_images if args.num_images is not None else default_num_images(args.n0, args.preset)
    folder = prepare(args.out, "generate")  # before loading anything; the manifest is compared once the model is known
    out = folder.path
    config = run_config_from(args)  # refuses e.g. fp16 on a CPU before loading anything
    config.apply_threads()
    pair = model_pair_from(args, device=config.device, dtype=config.dtype).place(config)
    caption = args.caption
    if caption == "auto" and args.use_metadata:
        from finextract.inspection import metadata_first

        caption = metadata_first(args.finetuned or args.lora, caption, None, num_images)[0]  # logs its key
    if caption == "auto":
        from finextract.caption import recover_caption

        recovery = recover_caption(pair, seed=config.seed, progress=not args.no_progress)
        caption = recovery.caption
        print(
            f"recovered caption {caption!r} (score {recovery.score:.3f}; runner-ups: "
            + ", ".join(repr(c["caption"]) for c in recovery.candidates[1:])
            + ")"
        )
    result = generate(
        pair,
        caption,
        num_images,
        method=args.method,
        w=preset_guidance_w(args.preset, args.method, pair.kind, args.w),
        k=args.k,
        config=config,
        out=folder,  # checked: generate does not check it again
        progress=not args.no_progress,
        png=args.png,
        overwrite=args.overwrite,
    )
    seconds = sum(chunk.get("seconds", 0.0) for chunk in result.manifest["chunks"])
    pngs = f", PNGs in {out / 'images'}" if args.png else ""
    print(
        f"{len(result.seeds)} images ({result.manifest['config']['method']}, {pair.kind}) in {out}{pngs}; "
        f"{seconds:.1f} s of sampling recorded in {out / 'manifest.json'}"
    )
    return 0
