"""The folder of a resumable generation (`finextract generate`, an extraction's generation/): its
manifest, chunk files, PNGs and lock; the one writer and reader of that format (no torch).

    folder/manifest.json          FORMAT; config (the resume key), chunk_size, chunks (index, start,
                                  stop, file, status "pending" | "done", seconds, sha256), and what
                                  `finextract.generation` adds (versions, seeds, sources, run)
    folder/chunk_00000.npz        images uint8 (n, H, W, 3) and their seeds int64 (n,)
    folder/images/gen00000.png    with png=True: image i as `png_name(i)`
    folder/.lock                  held (flock) by the one process writing the folder; holds its pid

Each chunk is written to a temporary file and renamed, then the manifest is rewritten the same way, so
a crash between the two leaves a finished chunk the manifest calls pending (`adopt_finished` takes it).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from finextract.engine.formats import atomic_write, file_sha256

from .files import differences, load_json, shown, write_json, write_png

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "finextract-generate/1"
LOCK_FILE = ".lock"
IMAGES = "images"


def chunk_name(index: int) -> str:
    """The file of chunk `index`: chunk_00012.npz."""
    return f"chunk_{index:05d}.npz"


def png_name(index: int) -> str:
    """The PNG of image `index` in images/: gen00012.png (`image_name` without the suffix)."""
    return f"{image_name(index)}.png"


def image_name(index: int) -> str:
    """The name of image `index` of a generation: gen00012 (read from a chunk, it has no file)."""
    return f"gen{index:05d}"


def read_manifest(folder: Path, fix: str) -> dict | None:
    """`folder/manifest.json`, or None when there is none.

    Args:
        folder: a generation folder.
        fix: what the user should do about a broken or foreign manifest (ends the error message).

    Raises:
        ValueError: it is not valid JSON, or not a finextract generation manifest (`FORMAT`).
    """
    path = Path(folder) / MANIFEST
    manifest = load_json(path, fix)
    if manifest is None:
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a finextract generation manifest ({FORMAT}); {fix}")
    return manifest


def write_manifest(folder: Path, manifest: dict) -> None:
    """Rewrite `folder/manifest.json` atomically."""
    write_json(Path(folder) / MANIFEST, manifest, indent=1)


def open_manifest(folder: Path | None, config: dict, chunk_size: int, overwrite: bool = False) -> dict:
    """The manifest of a generation with `config` into `folder`: the one there (to resume) when its
    config is the same, else a new one with every chunk pending (nothing written yet).

    Args:
        folder: the generation folder (created), or None for a generation kept in memory.
        config: what the images depend on (JSON values, `num_images` among them).
        chunk_size: images per chunk of a new manifest (a resumed one keeps its own).
        overwrite: when `folder` holds a generation with another config, delete it (`discard`) and start
            anew instead of refusing.

    Raises:
        ValueError: the manifest there is broken or foreign, or (without `overwrite`) has another config;
            the message lists what differs.
    """
    if folder is not None:
        manifest = read_manifest(folder, "move the folder away or use another output folder (--out, out=)")
        if manifest is not None:
            changed = differences(manifest["config"], config)
            if not changed:
                return manifest
            if not overwrite:
                raise ValueError(
                    f"{folder} holds a generation with a different config (there -> now: {'; '.join(shown(changed))}); "
                    "rerun with the original settings to resume it, pass --overwrite (overwrite=True) to replace it, "
                    "or choose another output folder (--out, out=)"
                )
            logger.warning("%s: deleting the generation with another config there (overwrite)", folder)
            discard(folder, manifest)
        folder.mkdir(parents=True, exist_ok=True)
    num_images = config["num_images"]
    chunks = [
        {
            "index": i,
            "start": start,
            "stop": min(start + chunk_size, num_images),
            "file": chunk_name(i),
            "status": "pending",
        }
        for i, start in enumerate(range(0, num_images, chunk_size))
    ]
    return {"format": FORMAT, "config": config, "chunk_size": chunk_size, "chunks": chunks}


def discard(folder: Path, manifest: dict) -> None:
    """Delete a generation's manifest, chunk files and images/ (what a generation wrote into `folder`)."""
    (folder / MANIFEST).unlink()
    for chunk in manifest.get("chunks", []):
        (folder / chunk["file"]).unlink(missing_ok=True)
    shutil.rmtree(folder / IMAGES, ignore_errors=True)


def write_chunk(path: Path, images: np.ndarray, seeds: list[int]) -> str:
    """Write images (uint8 (n, H, W, 3)) and their seeds to `path` atomically; returns the file's sha256."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, images=np.asarray(images), seeds=np.asarray(seeds, dtype=np.int64))
    data = buffer.getbuffer()
    atomic_write(path, data)
    return hashlib.sha256(data).hexdigest()


def read_chunk(path: Path) -> tuple[np.ndarray, list[int]]:
    """A chunk file's images (uint8 (n, H, W, 3), writable) and seeds."""
    with np.load(path) as data:
        return data["images"].copy(), data["seeds"].tolist()


def write_pngs(folder: Path, images, start: int) -> None:
    """images/gen{start + j:05d}.png for each uint8 (H, W, 3) image j (ndarray or CPU tensor), each atomically."""
    for j, image in enumerate(images):
        write_png(image, folder / IMAGES / png_name(start + j))


def pngs_complete(folder: Path, chunk: dict) -> bool:
    """Whether images/ holds the PNG of every image of `chunk`."""
    return all((folder / IMAGES / png_name(i)).is_file() for i in range(chunk["start"], chunk["stop"]))


def adopt_finished(folder: Path, chunks: list[dict], seeds: list[int]) -> None:
    """Reconcile the manifest's chunks with the chunk files (a crash can fall between the two renames):
    a done chunk whose file is missing or changed is pending again; a pending chunk whose file holds
    the right seeds is done."""
    for chunk in chunks:
        path = folder / chunk["file"]
        if chunk["status"] == "done":
            if not path.exists():
                logger.warning("chunk file %s is missing; regenerating it", path)
                chunk["status"] = "pending"
            elif chunk.get("sha256") and file_sha256(path) != chunk["sha256"]:
                logger.warning("chunk file %s does not match its manifest sha256; regenerating it", path)
                chunk["status"] = "pending"
        elif path.exists():
            try:
                images, chunk_seeds = read_chunk(path)
            except Exception as error:  # a foreign or broken file: regenerate it
                logger.warning("ignoring unreadable chunk file %s (%s)", path, error)
                continue
            if chunk_seeds == seeds[chunk["start"] : chunk["stop"]] and len(images) == len(chunk_seeds):
                chunk.update(status="done", sha256=file_sha256(path))


def finished(folder: Path, manifest: dict) -> list[dict]:
    """The manifest's done chunks whose file exists, in image order."""
    chunks = sorted(manifest.get("chunks", []), key=lambda c: c.get("start", 0))
    return [c for c in chunks if c.get("status") == "done" and (folder / c.get("file", "")).is_file()]


def finished_count(folder: Path) -> int:
    """How many chunks of the generation in `folder` are finished (0 without a readable manifest)."""
    try:
        manifest = read_manifest(folder, "")
    except (OSError, ValueError):
        return 0
    return 0 if manifest is None else len(finished(folder, manifest))


def read_generation(folder: Path) -> tuple[list[np.ndarray], list[Path]]:
    """The images of a generation folder, from its finished chunks in index order.

    Returns:
        (images: uint8 (H, W, 3) arrays, names: `folder/gen00012`-style paths, which are not files).

    Raises:
        ValueError: the manifest is broken or foreign, or no chunk is finished.
    """
    manifest = read_manifest(folder, "remove it to read the folder's image files")
    chunks = manifest.get("chunks", []) if manifest is not None else []
    done = finished(folder, manifest) if manifest is not None else []
    if len(done) < len(chunks):
        logger.warning(
            "%s: %d of %d chunks are unfinished; reading the %d finished ones (rerun the same "
            "`finextract generate` command to finish)",
            folder,
            len(chunks) - len(done),
            len(chunks),
            len(done),
        )
    images, paths = [], []
    for chunk in done:
        batch, _ = read_chunk(folder / chunk["file"])
        for j, image in enumerate(batch):
            images.append(image)
            paths.append(folder / image_name(chunk["start"] + j))
    if not images:
        raise ValueError(f"no finished chunk in {folder}; run `finextract generate` into it first")
    return images, paths


@contextlib.contextmanager
def lock(folder: Path | None):
    """Hold an exclusive lock on `folder/.lock` (flock: released even after kill -9) while writing it;
    None: nothing to lock.

    Raises:
        RuntimeError: another process holds it (the message names its pid).
    """
    if folder is None:
        yield
        return
    import fcntl  # optional: fcntl is POSIX only

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise RuntimeError(
                f"{folder} is being written by another finextract process (pid {holder}, lock file "
                f"{folder / LOCK_FILE}); wait for it to finish, or write to another output folder (--out, out=)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
