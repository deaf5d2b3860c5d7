"""`finextract evaluate`: AS and A-ESR (paper Eq. 1, 2) of extracted images against the training set."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from finextract.store.files import write_json

from .options import add_command, add_sscd_options, positive_int, read_image_folder

logger = logging.getLogger("finextract")


def register(subparsers) -> None:
    p = add_command(
        subparsers,
        "evaluate",
        run,
        help="AS / A-ESR of extracted images against training images",
        description="Score extracted images against the real training images (FineXtract Eq. 1, 2). The training "
        "images are compared as the fine-tune saw them: centre-cropped to their largest square and resized to the "
        "model's resolution (--resolution; by default read from the extract output folder the images come from, "
        "else the extracted images' own square size).",
    )
    p.add_argument(
        "--extracted",
        required=True,
        help="folder of extracted images, or an `extract` / `cluster` output folder (exactly the extracted/ images "
        "its result.json records are scored; a folder that disagrees with its record is refused) or a `generate` "
        "folder (all its images)",
    )
    p.add_argument("--train", required=True, help="folder of the real training images")
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--resolution",
        type=positive_int,
        default=None,
        help="side in pixels the training images are centre-cropped and resized to before SSCD (default: the "
        "model's, from result.json beside --extracted, else the extracted images' size)",
    )
    size.add_argument(
        "--train-as-is", action="store_true", help="compare the training images as they are (no crop or resize)"
    )
    p.add_argument("--json", default=None, help="write the metrics (with per-image best matches) to this file")
    add_sscd_options(p)


def infer_resolution(folder: str | Path, images) -> tuple[int, str]:
    """The model resolution for scoring the images of `folder`, and where it was read.

    In order: the `config.models.resolution` of an extract run's `result.json` in `folder` or its
    parent (`run/extracted` -> `run/result.json`); else the images' common side when they are all
    square and of one size (what a model generates, e.g. a `generate` folder).

    Raises:
        ValueError: neither is there (the message asks for --resolution or --train-as-is).
    """
    folder = Path(folder)
    for candidate in (folder / "result.json", folder.parent / "result.json"):
        if candidate.is_file():
            try:
                resolution = json.loads(candidate.read_text()).get("config", {}).get("models", {}).get("resolution")
            except (json.JSONDecodeError, AttributeError):
                resolution = None
            if isinstance(resolution, int) and resolution >= 1:
                return resolution, str(candidate)
    shapes = {tuple(image.shape[:2]) for image in images}
    if len(shapes) == 1:
        ((height, width),) = shapes
        if height == width:
            return int(height), f"the size of the images in {folder}"
    raise ValueError(
        f"--extracted {folder}: cannot tell the model's resolution (no result.json with it, and the images are not "
        f"all one square size: {sorted(shapes)[:4]}); pass --resolution N, or --train-as-is to compare the "
        "training images as they are"
    )


def read_extracted(folder: str) -> tuple[list, list[Path]]:
    """The images `--extracted` names: for an extract / cluster run folder (or its extracted/), exactly
    the files its result.json records (`finextract.store.folders.recorded_extracted`), in clique order;
    else every image of the folder (`read_image_folder`).

    Returns:
        (uint8 (H, W, 3) arrays, their paths).

    Raises:
        ValueError: the run's extracted/ holds an image its record does not name, or lacks one it
            names (the message names the files and the fix); an unreadable image.
        FileNotFoundError: no such folder.
    """
    from finextract.images import read_image
    from finextract.store.folders import recorded_extracted

    try:
        recorded = recorded_extracted(folder)
        if recorded is None:
            return read_image_folder("--extracted", folder, want="extracted")
        logger.info("--extracted %s: scoring the %d images its result.json records", folder, len(recorded))
        return [read_image(path) for path in recorded], recorded
    except ValueError as error:
        if str(error).startswith("--extracted"):
            raise
        raise ValueError(f"--extracted: {error}") from None


def run(args) -> int:
    from finextract.engine.config import RunConfig
    from finextract.evaluation import evaluate_against
    from finextract.metrics import format_scores
    from finextract.sscd import embed_images, load_embedder

    images, paths = read_extracted(args.extracted)
    train = read_image_folder("--train", args.train)  # both read before the embedder loads
    resolution = None
    if not args.train_as_is:
        resolution, source = (
            (args.resolution, "--resolution") if args.resolution else infer_resolution(args.extracted, images)
        )
        logger.info("training images centre-cropped and resized to %d px (from %s)", resolution, source)
    config = RunConfig.resolve(device="cpu")  # SSCD on the CPU; the threads of torch and SSCD
    config.apply_threads()
    embedder = load_embedder(args.sscd, sscd_preset=args.sscd_preset, device=config.device, threads=config.threads)
    metrics, _ = evaluate_against(train, embed_images(embedder, images, "extracted"), embedder, resolution=resolution)
    for match in metrics["best_match"]:
        match["extracted_file"] = paths[match["extracted"]].name
    metrics["sscd"] = embedder.info
    print(format_scores(metrics))
    if args.json:
        write_json(args.json, metrics)
        print(f"metrics and per-image best matches written to {args.json}")
    return 0
