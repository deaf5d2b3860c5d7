"""`finextract verify RUN`: re-check a finished extraction (input hashes, regenerated images, scores)."""

from __future__ import annotations

import argparse

from .options import add_command, non_negative_int, options_of


def register(subparsers) -> None:
    from finextract.verify import PIXEL_TOLERANCE, SIMILARITY_TOLERANCE

    p = add_command(
        subparsers,
        "verify",
        run,
        help="re-check an extract run: input hashes, images regenerated from their seeds, AS / A-ESR",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"""Re-check a finished `finextract extract` run from its folder alone, plus its input files.

1. inputs: every checkpoint file (base, fine-tune or LoRA, each file of a folder) and training image
   named in RUN/result.json is re-read at its recorded path (or under --base / --finetuned / --lora /
   --train / --base-config when they moved) and its size and sha256 compared; a file the record does
   not name fails too.
2. images: RUN/extracted/ must hold exactly the images the record names, each with its recorded
   sha256 (every image, whatever K); K of them (--images) are
   regenerated from their seeds with the recorded settings, each inside its original batch (up to
   the recorded --batch-size images generated per checked image), and compared with the saved PNGs:
   bit-identical on the same backend, device, dtypes, machine kind and versions, else within
   --tolerance levels (default {PIXEL_TOLERANCE}: float32 reordering moves a decoded pixel by at most one
   rounding step). The output says which case applied.
3. scores: SSCD similarities, AS and A-ESR0.6 / 0.7 are recomputed from the saved images and the
   training images and compared with the record (within {SIMILARITY_TOLERANCE}; A-ESR exactly).

Prints one line per check (ok / FAIL, naming the file and what differs). Exit status 0 when everything
holds, 1 otherwise.""",
    )
    p.add_argument("run", help="the run folder (`finextract extract --out RUN`)")
    p.add_argument("--base", default=None, help="where the base model is now (default: its recorded path)")
    p.add_argument("--finetuned", default=None, help="where the DreamBooth checkpoint is now")
    p.add_argument("--lora", default=None, help="where the LoRA / adapter file is now")
    p.add_argument("--base-config", default=None, help="where the --base-config folder is now")
    p.add_argument("--train", default=None, help="where the training-image folder is now")
    p.add_argument(
        "--images",
        type=non_negative_int,
        default=None,
        metavar="K",
        help="regenerate the first K extracted images (default: all N0; 0: none)",
    )
    p.add_argument(
        "--tolerance",
        type=non_negative_int,
        default=None,
        help=f"max |pixel difference| (levels of 255) when bit-identity is not expected (default {PIXEL_TOLERANCE})",
    )
    p.add_argument("--sscd", default=None, help="the SSCD model file, when the run did not use the default one")
    p.add_argument(
        "--allow-pickle", action="store_true", help="allow pickle checkpoints (.ckpt/.bin): only for files you trust"
    )


def run(args) -> int:
    from finextract.verify import verify_run

    verification = verify_run(
        args.run,
        **options_of(args, "base", "finetuned", "lora", "train", "base_config", "images", "sscd", "tolerance"),
        allow_pickle=args.allow_pickle,
    )
    for check in verification.checks:
        print(check.line())
    print(verification.case_line())
    failed = len(verification.failures)
    if failed:
        print(f"verify {args.run}: {failed} of {len(verification.checks)} checks FAILED")
        return 1
    print(f"verify {args.run}: all {len(verification.checks)} checks hold")
    return 0
