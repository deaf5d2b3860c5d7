"""Generation that loses nothing: N guided samples written in chunks, resumable after any interruption.

    result = generate(pair, "a photo of sks dog", 500, out="run/")   # run/manifest.json + run/chunk_*.npz

Each chunk (images and their seeds, `.npz`) is written to a temporary file and renamed, then the
manifest (config, versions, seeds, per-chunk status) is rewritten the same way (the folder's format:
`finextract.store.chunks`). Re-running with the
same config continues after the last finished chunk and never recomputes one, even after `kill -9`;
a different config in the same folder is refused. Image i always starts from seed `seed + i`, so a
resumed, rechunked or re-batched run gives the same images.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .engine.config import RunConfig, run_config
from .engine.sampler import Sampler
from .records import library_versions
from .rules import rule_for, rule_params
from .store import chunks
from .store.folders import RunFolder, prepare

logger = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    """What `generate` returns.

    Attributes:
        images: uint8 tensor (M, H, W, 3) on the CPU, image i from seed `seeds[i]`; M = N unless `until`
            ended the generation early.
        seeds: the M start-latent seeds (`config.seed + i`).
        manifest: the run's manifest (`config`: what the images depend on, the resume key; `run`: the
            `RunConfig` record; versions, seeds, chunks); also `out/manifest.json`.
        work: the counted work (`count_work`): "unet_evaluations", the (image, step, model) UNet forward
            evaluations the M images cost, N x steps x the rule's terms; "unet_evaluations_computed",
            those this call ran (resumed chunks cost none); "wall_s" and "cpu_s" (this process's CPU
            seconds, all threads) of the sampling this call ran.
    """

    images: torch.Tensor
    seeds: list[int]
    manifest: dict
    work: dict = field(default_factory=dict)


def count_work(num_images: int, computed_images: int, steps: int, terms: int, wall_s: float, cpu_s: float) -> dict:
    """The work record of a generation: UNet evaluations counted, seconds measured.

    Args:
        num_images: N, the images generated (fewer than planned when adaptive N stopped early).
        computed_images: those sampled by this call (N less the resumed ones).
        steps: sampler steps, any scheduler (one UNet evaluation per model term per step). terms: the rule's model terms
            (2 for FineXtract, CFG and Eq. 6; 1 for Direct): a fused 2B LoRA forward counts as 2.
        wall_s, cpu_s: wall-clock and process CPU seconds of the sampling.
    """
    per_image = steps * terms
    return {
        "images": num_images,
        "unet_evaluations": num_images * per_image,
        "unet_evaluations_computed": computed_images * per_image,
        "per_image": {"steps": steps, "terms": terms},
        "wall_s": round(wall_s, 3),
        "cpu_s": round(cpu_s, 3),
    }


def generate(
    pair,
    caption: str,
    num_images: int,
    *,
    method: str = "finextract",
    w: float | None = None,
    k: float | None = None,
    config: RunConfig | None = None,
    out: str | Path | RunFolder | None = None,
    progress: bool = True,
    label: str | None = None,
    chunk_size: int | None = None,
    on_chunk: Callable[[int, torch.Tensor], None] | None = None,
    until: Callable[[int, torch.Tensor], bool] | None = None,
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
            Only one process writes a folder at a time (a lock file; a second one is refused). A
            `RunFolder` that `finextract.store.folders.prepare` checked for "generate" is not checked again.
        progress: show a tqdm bar (images/s). label: the bar's text (default "generate <method>").
        chunk_size: images per chunk file (default `config.batch_size`); fixed by the manifest once written.
        on_chunk: called as `on_chunk(chunk_index, images)` after each newly computed chunk is saved.
        until: called as `until(stop, images)` after each chunk in order, resumed or computed, with the
            number of images so far and the chunk's images; True ends the generation there (adaptive N,
            `finextract.adaptive`): later chunks stay pending in the manifest, and the result holds
            only the images so far.
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
        `images_on_device`, fewer when `until` ended it; seeds; manifest; work).

    Raises:
        ValueError: invalid arguments or settings, a pair placed elsewhere than the run, `out` holding
            another command's output (`finextract.store.folders.prepare`), or a generation with another
            config without `overwrite` (the message lists what differs).
        RuntimeError: another process is writing `out` (the message names its pid).
        NonFiniteError (a RuntimeError): non-finite latents even in fp32.
    """
    config = run_config(config, **run_options)
    if num_images < 1:
        raise ValueError(f"num_images={num_images}: must be >= 1 (the paper uses 50 x N0)")
    if out is not None:
        out = prepare(out, "generate")
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
            "model": {
                "kind": pair.kind,
                "weights": pair.fingerprint,
                "scheduler": {key: value for key, value in pair.scheduler_config.items() if not key.startswith("_")},
            },
        }
    )
    folder = out.path if out is not None else None
    with chunks.lock(folder):
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
            until=until,
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
    until,
    images_on_device: bool,
    png: bool,
    overwrite: bool,
) -> GenerationResult:
    """`generate` once its inputs are checked and `folder` (if any) is locked."""
    manifest = chunks.open_manifest(folder, identity, chunk_size, overwrite)
    manifest.update(
        versions=library_versions(),
        seeds=seeds,
        sources=_normalise(pair.sources, default=str),
        run=config.to_dict(),
    )
    planned = manifest["chunks"]
    if folder is not None:
        chunks.adopt_finished(folder, planned, seeds)
        chunks.write_manifest(folder, manifest)
    pending = [chunk for chunk in planned if chunk["status"] != "done"]
    clock, cpu_clock = time.perf_counter(), time.process_time()
    if len(pending) < len(planned):
        logger.info("resuming %s: %d of %d chunks already done", folder, len(planned) - len(pending), len(planned))

    target = config.torch_device if images_on_device else torch.device("cpu")
    sampler = None
    parts, computed, stop = [], 0, 0
    done_images = sum(c["stop"] - c["start"] for c in planned if c["status"] == "done")
    with tqdm(total=len(seeds), initial=done_images, unit="img", desc=label, disable=not progress) as bar:
        for chunk in planned:  # in order: `until` sees images 0, 1, ... whether resumed or computed
            if chunk["status"] == "done":
                images = torch.from_numpy(chunks.read_chunk(folder / chunk["file"])[0]).to(target)
                if png and not chunks.pngs_complete(folder, chunk):  # finished earlier without --png
                    chunks.write_pngs(folder, images.cpu().numpy(), chunk["start"])
            else:
                if sampler is None:
                    sampler = Sampler(pair, rule, caption, config, images_on_device=images_on_device)
                images = _sample_chunk(sampler, seeds, chunk, config.batch_size, bar)
                computed += chunk["stop"] - chunk["start"]
                if folder is not None:
                    on_cpu = images.cpu().numpy()
                    chunk["sha256"] = chunks.write_chunk(
                        folder / chunk["file"], on_cpu, seeds[chunk["start"] : chunk["stop"]]
                    )
                    if png:
                        chunks.write_pngs(folder, on_cpu, chunk["start"])
                    chunks.write_manifest(folder, manifest)
                if on_chunk is not None:
                    on_chunk(chunk["index"], images)
            parts.append(images)
            stop = chunk["stop"]
            if until is not None and until(stop, images):
                break
    images = torch.cat(parts)
    work = count_work(
        stop,
        computed,
        config.steps,
        len(rule.terms),
        time.perf_counter() - clock,
        time.process_time() - cpu_clock,
    )
    return GenerationResult(images=images, seeds=seeds[:stop], manifest=manifest, work=work)


def _sample_chunk(sampler, seeds: list[int], chunk: dict, batch_size: int, bar) -> torch.Tensor:
    """Sample one chunk's images (uint8 (n, H, W, 3)), batch by batch; records its seconds in `chunk`."""
    started = time.perf_counter()
    parts = []
    for start in range(chunk["start"], chunk["stop"], batch_size):
        batch_seeds = seeds[start : min(start + batch_size, chunk["stop"])]
        parts.append(sampler(batch_seeds))
        bar.update(len(batch_seeds))
    chunk.update(status="done", seconds=round(time.perf_counter() - started, 3))
    return torch.cat(parts)


def _normalise(value, default=None):
    """The value as it reads back from JSON (tuples -> lists), so configs compare equal."""
    return json.loads(json.dumps(value, default=default))
