"""Scoring against the real training images: the training images brought to the form the fine-tune saw
(centre crop and resize to the model's side), then AS / A-ESR (paper Eq. 1, 2) of the extracted images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from finextract.engine.conditioning import image_size
from finextract.images import center_crop_resize, read_images
from finextract.metrics import extraction_metrics
from finextract.sscd import embed_images


def model_resolution(pair) -> int | None:
    """Side in pixels of the images a model pair generates (and of the images it was fine-tuned on by
    `finetune` and the usual DreamBooth / LoRA scripts): the latent size times the VAE's downsampling
    factor (`finextract.engine.conditioning.image_size`), as diffusers' pipelines compute their default
    height and width. None when the latent is not square.
    """
    height, width = image_size(pair)
    return height if height == width else None


def train_transform(resolution: int | None) -> dict:
    """The record of what is done to the training images before SSCD (`metrics["train_transform"]`).

    Args:
        resolution: side of `finextract.images.center_crop_resize`, or None for the images as they are.
    """
    if resolution is None:
        return {"name": "as-is"}
    return {
        "name": "center_crop_resize",
        "resolution": int(resolution),
        "crop": "largest centred square",
        "resample": "bicubic",
    }


def read_training_images(train, resolution: int | None) -> tuple[list[np.ndarray], list[Path], list[list[int]]]:
    """Training images as the fine-tune saw them: each centre-cropped to its largest square and resized
    to `resolution` (`finextract.images.center_crop_resize`, the transform of `finetune` and of
    diffusers' DreamBooth / LoRA scripts), or as they are when `resolution` is None.

    Args:
        train: a folder, a list of uint8 (H, W, 3) arrays, or the (images, paths) pair `read_images`
            returns.
        resolution: the model's image side (`model_resolution`), or None to keep the originals.

    Returns:
        (images as compared: uint8 (H, W, 3) arrays, their paths (`train_000.png`... for arrays),
        the originals' [height, width]).

    Raises:
        FileNotFoundError: `train` is not a folder. ValueError: it holds no readable image, or
        `resolution` < 1.
    """
    if isinstance(train, (str, Path)):
        images, paths = read_images(train)
    elif isinstance(train, tuple) and len(train) == 2 and isinstance(train[1], list):  # (images, paths) read already
        images, paths = train
    else:
        images = [np.asarray(image, dtype=np.uint8) for image in train]
        paths = [Path(f"train_{i:03d}.png") for i in range(len(images))]
    if not images:
        raise ValueError("no training images given")
    sizes = [[int(image.shape[0]), int(image.shape[1])] for image in images]
    if resolution is not None:
        if resolution < 1:
            raise ValueError(f"resolution={resolution}: must be >= 1 (or None to compare the originals)")
        images = [center_crop_resize(image, resolution) for image in images]
    return list(images), list(paths), sizes


def evaluate_against(
    train,
    extracted_descriptors,
    embedder,
    *,
    resolution: int | None,
    generated_descriptors=None,
    generated_indices=None,
) -> tuple[dict, tuple]:
    """AS / A-ESR (paper Eq. 1, 2) of extracted images against the real training images.

    The training images are first brought to the form the fine-tune saw (`read_training_images`):
    a 32 px model's generations compared with 1000 px non-square originals score near 0 even when
    they are the training images.

    Args:
        train: a folder, a list of uint8 (H, W, 3) arrays, or the (images, paths) pair `read_images`
            returns.
        extracted_descriptors: (M, D) SSCD descriptors of the extracted images.
        embedder: the `finextract.sscd.Embedder` that made them.
        resolution: the model's image side (`model_resolution(pair)`, `Extractor.resolution`): the
            centre crop and resize applied to the training images; None compares them as they are.
        generated_descriptors, generated_indices: optionally every usable generated image's descriptor
            (`ExtractionResult.generated_descriptors`) and their image indices: adds `metrics["generated"]`,
            each training image's best match among all of them (indices into the generated images).

    Returns:
        (metrics: `finextract.metrics.extraction_metrics` plus "train_transform" (`train_transform`),
        each best match's "train_file" and "train_size" (the original's [height, width]);
        (the training images as compared, their paths)).

    Raises:
        FileNotFoundError / ValueError: as `read_training_images`; mismatched descriptors.
    """
    images, paths, sizes = read_training_images(train, resolution)
    metrics = extraction_metrics(
        embed_images(embedder, images, "training"), extracted_descriptors, generated_descriptors
    )
    metrics["train_transform"] = train_transform(resolution)
    matches = metrics["best_match"] + metrics.get("generated", {}).get("best_match", [])
    for match in matches:
        match["train_file"] = paths[match["train"]].name
        match["train_size"] = sizes[match["train"]]
    if generated_indices is not None and "generated" in metrics:
        for match in metrics["generated"]["best_match"]:
            match["generated"] = int(generated_indices[match["generated"]])
    return metrics, (images, paths)
