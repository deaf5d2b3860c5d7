"""Reading images and folders of images (PNGs are written by `finextract.store.files.write_png`)."""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .store import chunks
from .store.folders import RECORD

logger = logging.getLogger(__name__)


# Transparent pixels are composited on white: the colour image viewers (and most shops' product
# shots) show behind them; training scripts' `convert("RGB")` would keep whatever colour the
# transparent pixels happen to store, often black.
ALPHA_BACKGROUND = (255, 255, 255)
# Images over this many pixels are downscaled while decoding (JPEG by Pillow's `draft`, which
# decodes at 1/2, 1/4 or 1/8 scale; other formats by `reduce` after decoding); the models see
# at most 1024 x 1024 anyway. Over `MAX_DECODED_PIXELS` a file is refused as too large.
MAX_PIXELS = 40_000_000
MAX_DECODED_PIXELS = 16 * MAX_PIXELS


def read_image(path: str | Path) -> np.ndarray:
    """Decode one image file as an RGB uint8 array: the one image reader of finextract.

    On the way: the EXIF orientation is applied (as viewers show the photo); 16-bit images are
    scaled to 8 bits (x 255 / 65535); palette, CMYK, 1-bit and grey images are converted to RGB;
    transparency is composited on `ALPHA_BACKGROUND` (white), with a log line; images over
    `MAX_PIXELS` (40 MP) are downscaled while decoding, with a log line (Pillow's decompression-bomb
    warning is not shown: the size is handled here).

    Args:
        path: any file Pillow opens (PNG, JPEG, WebP, BMP, TIFF, ...).

    Returns:
        uint8 ndarray (H, W, 3).

    Raises:
        FileNotFoundError: `path` does not exist.
        ValueError: Pillow cannot read it, or it is over `MAX_DECODED_PIXELS` (the message names
            the file and the reason).
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, MAX_DECODED_PIXELS
            try:
                with Image.open(path) as image:
                    return _to_rgb(_decoded(image, path), path)
            finally:
                Image.MAX_IMAGE_PIXELS = limit
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} does not exist") from None
    except Image.DecompressionBombError:
        raise ValueError(
            f"{path} is not a readable image (too large: over {MAX_DECODED_PIXELS // 10**6} MP); downscale it first"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise ValueError(
            f"{path} is not a readable image ({type(error).__name__}: {error}); remove or re-save it"
        ) from None


def _decoded(image, path: Path):
    """The decoded image, oriented as its EXIF tag says, downscaled below `MAX_PIXELS` if needed."""
    width, height = image.size
    if width * height > MAX_PIXELS:
        factor = math.ceil(math.sqrt(width * height / MAX_PIXELS))
        if image.format == "JPEG":  # decoded at 1/2 .. 1/8 scale: never held at full size
            image.draft(image.mode, (math.ceil(width / factor), math.ceil(height / factor)))
        image.load()
        remaining = math.ceil(math.sqrt(image.width * image.height / MAX_PIXELS))
        if remaining > 1:
            image = image.reduce(remaining)
        logger.info(
            "%s: %dx%d (%.0f MP) downscaled to %dx%d while decoding (over %d MP)",
            path.name,
            width,
            height,
            width * height / 1e6,
            image.width,
            image.height,
            MAX_PIXELS // 10**6,
        )
    return ImageOps.exif_transpose(image)


def _to_rgb(image, path: Path) -> np.ndarray:
    """uint8 RGB of any Pillow mode: 16- and 32-bit integer grey scaled to 8 bits, transparency
    composited on `ALPHA_BACKGROUND`, palette / CMYK / 1-bit / grey converted."""
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        grey = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if image.mode == "F":  # floating-point grey: 0..1 if it fits, else 0..255
        values = np.asarray(image, dtype=np.float64)
        values = values * 255.0 if values.max() <= 1.0 else values
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if (image.mode == "P" and "transparency" in image.info) or image.mode in ("PA", "LA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        alpha = np.asarray(image.getchannel("A"))
        if alpha.min() < 255:
            logger.info("%s: transparent pixels composited on white %s", path.name, ALPHA_BACKGROUND)
            background = Image.new("RGBA", image.size, (*ALPHA_BACKGROUND, 255))
            image = Image.alpha_composite(background, image)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def center_crop_resize(image: np.ndarray, resolution: int) -> np.ndarray:
    """The largest centred square of `image`, resized to `resolution` x `resolution` (bicubic).

    The transform of diffusers' DreamBooth / LoRA training scripts (`CenterCrop` after a resize of the
    short side; cropping first, as here, then resizing gives the same square up to resampling).

    Args:
        image: uint8 (H, W, 3) ndarray.
        resolution: output side in pixels, >= 1.

    Returns:
        uint8 ndarray (resolution, resolution, 3).
    """
    pil = Image.fromarray(np.asarray(image, dtype=np.uint8))
    side = min(pil.size)
    left, top = (pil.width - side) // 2, (pil.height - side) // 2
    square = pil.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
    return np.asarray(square, dtype=np.uint8)


def read_images(folder: str | Path) -> tuple[list[np.ndarray], list[Path]]:
    """Read every image file in `folder` (sorted by name) as RGB uint8 arrays.

    A `finextract generate` output folder (with its `manifest.json`) is read from its chunk files,
    in image-index order, image i named `gen{i:05d}` (the name `extract` gives generated images).
    Hidden files (`.DS_Store`, `._x.png`) are ignored silently; other unreadable or non-image files
    are listed in one warning and skipped, never a crash halfway.

    Args:
        folder: directory of images (PNG, JPEG, ... anything Pillow opens; not recursive), or a
            `generate` output folder.

    Returns:
        (images: list of uint8 (H, W, 3) arrays, paths: the files they came from; for a generate
        folder `folder/gen00012`-style names, which are not files).

    Raises:
        FileNotFoundError: `folder` is not a directory. ValueError: it holds no readable image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist or is not a directory")
    if (folder / chunks.MANIFEST).is_file():
        return chunks.read_generation(folder)
    images, paths, bad = [], [], []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            images.append(read_image(path))
            paths.append(path)
        except ValueError as error:
            bad.append(f"{path.name} ({str(error).rpartition(' (')[2].split(':')[0]})")
    if not images:
        skipped = f" (unreadable: {', '.join(bad)})" if bad else ""
        raise ValueError(f"no readable image in {folder}{skipped}; expected PNG/JPEG files")
    if bad:
        logger.warning("skipped %d unreadable or non-image file(s) in %s: %s", len(bad), folder, ", ".join(bad))
    return images, paths


# where an `extract` / `cluster` output folder keeps which images
_EXTRACT_SUBFOLDERS = {"extracted": ("extracted",), "generated": ("generation", "generated")}


def image_folder(folder: str | Path, want: str) -> Path:
    """The folder that holds the images wanted from `folder`, which may be an output folder of
    `finextract generate` or `extract` / `cluster` (or any folder of images).

    - a `generate` folder (its `manifest.json`): `folder` itself, whatever is wanted;
    - an `extract` / `cluster` folder (its `result.json`): `extracted/` for "extracted"; for
      "generated" its generation chunks `generation/` (a `generate` folder), else the PNGs of
      `--save-generated` in `generated/`;
    - any other folder: itself.

    Args:
        folder: the folder given by the user.
        want: "extracted" (the N0 extracted images) or "generated" (all N generated ones).

    Returns:
        The folder to pass to `read_images`.

    Raises:
        ValueError: `want` is neither, or `folder` is an extract / cluster output without the images
            wanted (the message lists what it has).
    """
    if want not in _EXTRACT_SUBFOLDERS:
        raise ValueError(f"want={want!r}: expected 'extracted' or 'generated'")
    folder = Path(folder)
    if (folder / chunks.MANIFEST).is_file() or not (folder / RECORD).is_file():
        return folder
    for name in _EXTRACT_SUBFOLDERS[want]:
        if (folder / name).is_dir():
            return folder / name
    has = sorted(p.name + "/" for p in folder.iterdir() if p.is_dir()) or ["no subfolder"]
    raise ValueError(
        f"{folder} is an extract / cluster output folder without {want} images (looked for "
        f"{' or '.join(n + '/' for n in _EXTRACT_SUBFOLDERS[want])}; it has {', '.join(has)})"
        + ("; `cluster` keeps no generated images: pass the folder it clustered" if want == "generated" else "")
    )


def degenerate_mask(images) -> np.ndarray:
    """True for images that are constant (a broken model pair, or overflow in fp16); bool (B,) ndarray (SPEC section 5).

    Args:
        images: uint8 (B, H, W, 3) torch tensor (any device) or ndarray, or a list of (H, W, 3)
            arrays of any sizes. A tensor is reduced where it lives: only B booleans leave a GPU.
    """
    if isinstance(images, list):
        return np.array([image.min() == image.max() for image in images], dtype=bool)
    if hasattr(images, "amin"):  # torch tensor
        flat = images.reshape(len(images), -1)
        return (flat.amin(1) == flat.amax(1)).cpu().numpy()
    flat = np.asarray(images).reshape(len(images), -1)
    return flat.min(1) == flat.max(1)
