"""Generation that loses nothing: N guided samples written in chunks, resumable after any interruption.

    result = generate(pair, "a photo of sks dog", 500, out="run/")   # run/manifest.json + run/chunk_*.npz

Each chunk (images and their seeds, `.npz`) is written to a temporary file and renamed, then the
manifest (config, versions, seeds, per-chunk status) is rewritten the same way. Re-running with the
same config continues after the last finished chunk and never recomputes one, even after `kill -9`;
a different config in the same folder is refused. Image i always starts from seed `seed + i`, so a
resumed, rechunked or re-batched run gives the same images.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .engine.config import RunConfig, run_config
from .engine.formats import atomic_write, file_sha256
from .records import library_versions
from .runfolder import check_out_folder, differences, prepare  # noqa: F401  (check_out_folder: its old home)

_leaf_differences = differences  # its old name

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "finextract-generate/1"


@dataclass
class GenerationResult:
    """What `generate` returns.

    Attributes:
        images: uint8 tensor (N, H, W, 3) on the CPU, image i from seed `seeds[i]`.
        seeds: the N start-latent seeds (`config.seed + i`).
        manifest: the run's manifest (`config`: what the images depend on, the resume key; `run`: the
            `RunConfig` record; versions, seeds, chunks); also `out/manifest.json`.
    """

    images: torch.Tensor
    seeds: list[int]
    manifest: dict


def generate(
    pair,
    caption: str,
    num_images: int,
    *,
    method: str = "finextract",
    w: float | None = None,
    k: float | None = None,
    config: RunConfig | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    label: str | None = None,
    chunk_size: int | None = None,
    on_chunk: Callable[[int, torch.Tensor], None] | None = None,
    images_on_device: bool = False,
    png: bool = False,
    overwrite: bool = False,
    **run_options,
) -> GenerationResult:
    """Generate `num_images` images with guided DDIM sampling (FineXtract Eq. 13 by default).

    Args:
        pair: a `ModelPair` (`finextract.engine.loading.load_model_pair`), placed on the run's device
            and precision (`pair.place(config)`); it is not changed.
        caption: the training caption c.
        num_images: N (the paper: 50 x N0).
        method: "finextract" (Eq. 13), "finextract-uncond" (Eq. 6), "cfg" or "direct".
        w, k: guidance scale and Eq. 13's correction; None = the paper's default for `pair.kind`
            (see `finextract.rules.rule_for`).
        config: the run's `RunConfig` (device, dtype, backend, threads, batch size, steps, seed, cache);
            None = `RunConfig.resolve(**run_options)`. Image i starts from seed `config.seed + i`; the
            batch size does not change the images.
        out: folder for chunks and the manifest; None keeps everything in memory (nothing resumable).
            Only one process writes a folder at a time (a lock file; a second one is refused).
        progress: show a tqdm bar (images/s). label: the bar's text (default "generate <method>").
        chunk_size: images per chunk file (default `config.batch_size`); fixed by the manifest once written.
        on_chunk: called as `on_chunk(chunk_index, images)` after each newly computed chunk is saved.
        images_on_device: return the images on the run's device (kept there from the VAE decode on, for
            SSCD on the GPU); chunk files are still written from a CPU copy, and resumed chunks are
            moved to the device.
        png: with `out`, also write image i as `out/images/gen{i:05d}.png` as each chunk finishes
            (and any missing PNG of an already finished chunk on resume).
        overwrite: when `out` holds a generation with another config, delete its chunks, manifest
            and images/ and start anew, instead of refusing (`--overwrite`). The same config resumes
            either way.
        **run_options: `RunConfig.resolve` settings (steps=, seed=, batch_size=, backend=, ...),
            applied to `config`.

    Returns:
        `GenerationResult` (images uint8 (N, H, W, 3) on the CPU, or on the device with
        `images_on_device`; seeds; manifest).

    Raises:
        ValueError: invalid arguments or settings, a pair placed elsewhere than the run, `out` holding
            another command's output (`finextract.runfolder.prepare`), or a generation with another
            config without `overwrite` (the message lists what differs).
        RuntimeError: another process is writing `out` (the message names its pid).
        NonFiniteError (a RuntimeError): non-finite latents even in fp32.
    """
    from .rules import rule_for, rule_params

    config = run_config(config, **run_options)
    if num_images < 1:
        raise ValueError(f"num_images={num_images}: must be >= 1 (the paper uses 50 x N0)")
    if out is not None:
        prepare(out, "generate")
    if png and out is None:
        raise ValueError("png=True needs an `out` folder to write images/ into")
    rule = rule_for(method, pair.kind, w, k)
    seeds = [config.seed + i for i in range(num_images)]
    identity = _normalise(
        {
            "method": method,
            "params": rule_params(method, pair.kind, w, k),
            "rule": rule.to_dict(),
            "caption": caption,
            "num_images": num_images,
            **config.image_settings(),
            "sampler": "DDIM eta=0",
            "model": {
                "kind": pair.kind,
                "weights": pair.fingerprint,
                "scheduler": {key: value for key, value in pair.scheduler_config.items() if not key.startswith("_")},
            },
        }
    )
    folder = Path(out) if out is not None else None
    with _folder_lock(folder):
        return _generate(
            pair,
            rule,
            caption,
            config,
            identity=identity,
            seeds=seeds,
            folder=folder,
            chunk_size=chunk_size or config.batch_size,
            progress=progress,
            label=label or f"generate {method}",
            on_chunk=on_chunk,
            images_on_device=images_on_device,
            png=png,
            overwrite=overwrite,
        )


def _generate(
    pair,
    rule,
    caption: str,
    config: RunConfig,
    *,
    identity: dict,
    seeds: list[int],
    folder: Path | None,
    chunk_size: int,
    progress: bool,
    label: str,
    on_chunk,
    images_on_device: bool,
    png: bool,
    overwrite: bool,
) -> GenerationResult:
    """`generate` once its inputs are checked and `folder` (if any) is locked."""
    manifest = _open_manifest(folder, identity, chunk_size, overwrite)
    manifest.update(
        versions=library_versions(),
        seeds=seeds,
        sources=_normalise(pair.sources, default=str),
        run=config.to_dict(),
    )
    chunks = manifest["chunks"]
    results: dict[int, torch.Tensor] = {}
    if folder is not None:
        _adopt_finished(folder, chunks, seeds)
        _write_json(folder / MANIFEST, manifest)
    pending = [chunk for chunk in chunks if chunk["status"] != "done"]
    if len(pending) < len(chunks):
        logger.info("resuming %s: %d of %d chunks already done", folder, len(chunks) - len(pending), len(chunks))

    if pending:
        from tqdm.auto import tqdm

        from .engine.sampler import Sampler

        sampler = Sampler(pair, rule, caption, config, images_on_device=images_on_device)
        done_images = sum(c["stop"] - c["start"] for c in chunks if c["status"] == "done")
        batch_size = config.batch_size
        with tqdm(total=len(seeds), initial=done_images, unit="img", desc=label, disable=not progress) as bar:
            for chunk in pending:
                started = time.perf_counter()
                parts = []
                for start in range(chunk["start"], chunk["stop"], batch_size):
                    batch_seeds = seeds[start : min(start + batch_size, chunk["stop"])]
                    parts.append(sampler(batch_seeds))
                    bar.update(len(batch_seeds))
                images = torch.cat(parts)
                results[chunk["index"]] = images
                chunk.update(status="done", seconds=round(time.perf_counter() - started, 3))
                if folder is not None:
                    chunk["sha256"] = _write_chunk(
                        folder / chunk["file"], images.cpu(), seeds[chunk["start"] : chunk["stop"]]
                    )
                    if png:
                        _write_pngs(folder, images.cpu(), chunk["start"])
                    _write_json(folder / MANIFEST, manifest)
                if on_chunk is not None:
                    on_chunk(chunk["index"], images)

    target = config.torch_device if images_on_device else torch.device("cpu")
    images = torch.cat(
        [
            results[c["index"]] if c["index"] in results else _read_chunk(folder / c["file"])[0].to(target)
            for c in chunks
        ]
    )
    if png:  # chunks finished by an earlier run without --png (or whose PNGs were deleted)
        for chunk in chunks:
            if chunk["index"] not in results and not all(
                (folder / "images" / f"gen{i:05d}.png").is_file() for i in range(chunk["start"], chunk["stop"])
            ):
                _write_pngs(folder, images[chunk["start"] : chunk["stop"]].cpu(), chunk["start"])
    return GenerationResult(images=images, seeds=seeds, manifest=manifest)


LOCK_FILE = ".lock"


@contextlib.contextmanager
def _folder_lock(folder: Path | None):
    """Hold an exclusive lock on `folder/.lock` (flock: released even after kill -9) while writing it.

    Raises:
        RuntimeError: another process holds it (the message names its pid).
    """
    if folder is None:
        yield
        return
    import fcntl

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


def _write_pngs(folder: Path, images: torch.Tensor, start: int) -> None:
    """images/gen{start + j:05d}.png for each uint8 (H, W, 3) image j, each written atomically."""
    from PIL import Image

    (folder / "images").mkdir(exist_ok=True)
    for j, image in enumerate(images.numpy()):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        atomic_write(folder / "images" / f"gen{start + j:05d}.png", buffer.getvalue())


def _open_manifest(folder: Path | None, config: dict, chunk_size: int, overwrite: bool = False) -> dict:
    """Load `folder`'s manifest and check its config, or start a new one (also when the config differs
    and `overwrite`: the old run's chunks, manifest and images/ are deleted first)."""
    path = folder / MANIFEST if folder is not None else None
    if path is not None and path.exists():
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path} is not valid JSON ({error}); move the folder away or use another output folder (--out, out=)"
            ) from None
        if manifest.get("format") != FORMAT:
            raise ValueError(
                f"{path} is not a finextract generation manifest ({FORMAT}); use another output folder (--out, out=)"
            )
        changed = differences(manifest["config"], config)
        if changed and not overwrite:
            shown = "; ".join(changed[:8]) + (f"; and {len(changed) - 8} more" if len(changed) > 8 else "")
            raise ValueError(
                f"{folder} holds a generation with a different config (there -> now: {shown}); "
                "rerun with the original settings to resume it, pass --overwrite (overwrite=True) to replace it, "
                "or choose another output folder (--out, out=)"
            )
        if not changed:
            return manifest
        logger.warning("%s: deleting the generation with another config there (overwrite)", folder)
        _discard(folder, manifest)
    if folder is not None:  # `generate` checked it with check_out_folder
        folder.mkdir(parents=True, exist_ok=True)
    num_images = config["num_images"]
    chunks = [
        {
            "index": i,
            "start": start,
            "stop": min(start + chunk_size, num_images),
            "file": f"chunk_{i:05d}.npz",
            "status": "pending",
        }
        for i, start in enumerate(range(0, num_images, chunk_size))
    ]
    return {"format": FORMAT, "config": config, "chunk_size": chunk_size, "chunks": chunks}


def _discard(folder: Path, manifest: dict) -> None:
    """Delete a generation's manifest, chunk files and images/ (what `generate` wrote into `folder`)."""
    import shutil

    (folder / MANIFEST).unlink()
    for chunk in manifest.get("chunks", []):
        (folder / chunk["file"]).unlink(missing_ok=True)
    shutil.rmtree(folder / "images", ignore_errors=True)


def _adopt_finished(folder: Path, chunks: list[dict], seeds: list[int]) -> None:
    """Reconcile the manifest with the chunk files (a crash can fall between the two renames)."""
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
                images, chunk_seeds = _read_chunk(path)
            except Exception as error:  # a foreign or broken file: regenerate it
                logger.warning("ignoring unreadable chunk file %s (%s)", path, error)
                continue
            if chunk_seeds == seeds[chunk["start"] : chunk["stop"]] and len(images) == len(chunk_seeds):
                chunk.update(status="done", sha256=file_sha256(path))


def _write_chunk(path: Path, images: torch.Tensor, seeds: list[int]) -> str:
    """Write images (uint8 NHWC) and seeds to `path` atomically; return the file's sha256."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, images=images.numpy(), seeds=np.asarray(seeds, dtype=np.int64))
    data = buffer.getbuffer()
    atomic_write(path, data)
    return hashlib.sha256(data).hexdigest()


def _read_chunk(path: Path) -> tuple[torch.Tensor, list[int]]:
    with np.load(path) as data:
        return torch.from_numpy(data["images"].copy()), data["seeds"].tolist()


def _write_json(path: Path, value: dict) -> None:
    atomic_write(path, json.dumps(value, indent=1))


def _normalise(value, default=None):
    """The value as it reads back from JSON (tuples -> lists), so configs compare equal."""
    return json.loads(json.dumps(value, default=default))
