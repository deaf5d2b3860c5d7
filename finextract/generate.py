"""Generation that loses nothing: N guided samples written in chunks, resumable after any interruption.

    result = generate(pair, "a photo of sks dog", 500, out="run/")   # run/manifest.json + run/chunk_*.npz

Each chunk (images and their seeds, `.npz`) is written to a temporary file and renamed, then the
manifest (config, versions, seeds, per-chunk status) is rewritten the same way. Re-running with the
same config continues after the last finished chunk and never recomputes one, even after `kill -9`;
a different config in the same folder is refused. Image i always starts from seed `seed + i`, so a
resumed, rechunked or re-batched run gives the same images.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .engine.formats import atomic_write, file_sha256

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "finextract-generate/1"


@dataclass
class GenerationResult:
    """What `generate` returns.

    Attributes:
        images: uint8 tensor (N, H, W, 3) on the CPU, image i from seed `seeds[i]`.
        seeds: the N start-latent seeds (`seed + i`).
        manifest: the run's manifest (config, versions, seeds, chunks); also `out/manifest.json`.
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
    steps: int = 50,
    batch_size: int = 16,
    seed: int = 0,
    device: str = "cpu",
    dtype: str = "fp32",
    backend: str = "torch",
    out: str | Path | None = None,
    progress: bool = True,
    chunk_size: int | None = None,
    on_chunk: Callable[[int, torch.Tensor], None] | None = None,
    cuda_graphs: bool = True,
    images_on_device: bool = False,
    png: bool = False,
) -> GenerationResult:
    """Generate `num_images` images with guided DDIM sampling (FineXtract Eq. 13 by default).

    Args:
        pair: a `ModelPair` (`finextract.engine.loading.load_model_pair`); moved to `device` in place.
        caption: the training caption c.
        num_images: N (the paper: 50 x N0).
        method: "finextract" (Eq. 13), "finextract-uncond" (Eq. 6), "cfg" or "direct".
        w, k: guidance scale and Eq. 13's correction; None = the paper's default for `pair.kind`
            (see `finextract.rules.rule_for`).
        steps: DDIM steps (eta = 0), with the model's own scheduler config.
        batch_size: images per sampler call; does not change the images.
        seed: image i starts from the latent of seed `seed + i`.
        device: "cpu", "cuda", "cuda:N" or "auto".
        dtype: UNet precision "fp32" | "fp16" | "bf16" (the last two on CUDA). The VAE decodes in fp32.
        backend: "torch" (reference), "onnxruntime", "tensorrt", or "auto" (onnxruntime on a CPU,
            torch on CUDA: `finextract.sampling.resolve_backend`); the manifest records the resolved name.
        out: folder for chunks and the manifest; None keeps everything in memory (nothing resumable).
        progress: show a tqdm bar (images/s).
        chunk_size: images per chunk file (default `batch_size`); fixed by the manifest once written.
        on_chunk: called as `on_chunk(chunk_index, images)` after each newly computed chunk is saved.
        cuda_graphs: on CUDA with the torch backend, replay each DDIM step as a CUDA graph on a
            static batch of `batch_size` (the last batch padded); False runs the steps eagerly.
        images_on_device: return the images on `device` (kept there from the VAE decode on, for SSCD
            on the GPU); chunk files are still written from a CPU copy, and resumed chunks are moved
            to `device`.
        png: with `out`, also write image i as `out/images/gen{i:05d}.png` as each chunk finishes
            (and any missing PNG of an already finished chunk on resume).

    Returns:
        `GenerationResult` (images uint8 (N, H, W, 3) on the CPU, or on `device` with
        `images_on_device`; seeds; manifest).

    Raises:
        ValueError: invalid arguments, fp16/bf16 on a CPU, or `out` holding a run with another config
            (the message lists what differs).
        NonFiniteError (a RuntimeError): non-finite latents even in fp32.
    """
    from .rules import rule_for, rule_params
    from .runtime import resolve_device
    from .sampling import resolve_backend, resolve_dtype

    if num_images < 1:
        raise ValueError(f"num_images={num_images}: must be >= 1 (the paper uses 50 x N0)")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    if steps < 1:
        raise ValueError(f"steps={steps}: must be >= 1 (the paper uses 50)")
    if out is not None:
        check_out_folder(out)
    if png and out is None:
        raise ValueError("png=True needs an `out` folder to write images/ into")
    device = resolve_device(device)
    resolve_dtype(dtype, device)
    backend = resolve_backend(backend, device)
    rule = rule_for(method, pair.kind, w, k)
    seeds = [seed + i for i in range(num_images)]
    config = _normalise(
        {
            "method": method,
            "params": rule_params(method, pair.kind, w, k),
            "rule": rule.to_dict(),
            "caption": caption,
            "num_images": num_images,
            "steps": steps,
            "seed": seed,
            "dtype": dtype,
            "backend": backend,
            "sampler": "DDIM eta=0",
            "model": {
                "kind": pair.kind,
                "weights": weights_fingerprint(pair),
                "scheduler": {key: value for key, value in pair.scheduler_config.items() if not key.startswith("_")},
            },
        }
    )
    folder = Path(out) if out is not None else None
    manifest = _open_manifest(folder, config, chunk_size or batch_size)
    manifest.update(
        versions=library_versions(),
        seeds=seeds,
        sources=_normalise(pair.sources, default=str),
        last_run={"device": device, "batch_size": batch_size, "cuda_graphs": bool(cuda_graphs)},
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

        from .sampling import Sampler

        sampler = Sampler(
            pair,
            rule,
            caption,
            steps=steps,
            device=device,
            dtype=dtype,
            backend=backend,
            cuda_graphs=cuda_graphs,
            static_batch=batch_size,
            images_on_device=images_on_device,
        )
        done_images = sum(c["stop"] - c["start"] for c in chunks if c["status"] == "done")
        with tqdm(total=num_images, initial=done_images, unit="img", desc="generate", disable=not progress) as bar:
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

    target = torch.device(device) if images_on_device else torch.device("cpu")
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


def check_out_folder(out: str | Path) -> Path:
    """Check that `out` can be a folder (it, or its nearest existing parent, is a folder), before heavy work.

    Returns:
        `out` as a Path.

    Raises:
        ValueError: `out` or one of its parents is an existing file; the message names it.
    """
    out = Path(out)
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                where = "" if path == out else f" (its parent {path} is a file)"
                raise ValueError(f"--out {out}: not a folder{where}; give a folder path (it is created if missing)")
            break
    return out


def _write_pngs(folder: Path, images: torch.Tensor, start: int) -> None:
    """images/gen{start + j:05d}.png for each uint8 (H, W, 3) image j, each written atomically."""
    from PIL import Image

    (folder / "images").mkdir(exist_ok=True)
    for j, image in enumerate(images.numpy()):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        atomic_write(folder / "images" / f"gen{start + j:05d}.png", buffer.getvalue())


def _leaf_differences(old, new, prefix: str = "") -> list[str]:
    """`key.path[i]: old -> new` for every differing leaf of two JSON values (added/removed keys too)."""
    if isinstance(old, dict) and isinstance(new, dict):
        lines = []
        for key in sorted(set(old) | set(new), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                lines.append(f"{path}: (absent) -> {new[key]!r}")
            elif key not in new:
                lines.append(f"{path}: {old[key]!r} -> (absent)")
            else:
                lines += _leaf_differences(old[key], new[key], path)
        return lines
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [line for i, (a, b) in enumerate(zip(old, new)) for line in _leaf_differences(a, b, f"{prefix}[{i}]")]
    if old == new:
        return []
    show = lambda value: value if isinstance(value, (int, float, bool)) or value is None else repr(value)  # noqa: E731
    if isinstance(old, str) and isinstance(new, str) and len(old) < 80 and len(new) < 80:
        show = str  # plain words for short strings: "kind: dreambooth -> lora"
    return [f"{prefix}: {show(old)} -> {show(new)}"]


def weights_fingerprint(pair) -> str:
    """A sha256 identifying the pair's weights, cached in `pair.sources["weights_fingerprint"]`.

    Hashes every model's parameter shapes and first 1024 values (float32) and the LoRA tensors:
    cheap for SD-sized models, and different for any other checkpoint in practice. Computed before
    any dtype change; the adapters `inject_lora` adds are skipped, so it is stable within a run.
    """
    if "weights_fingerprint" in pair.sources:
        return pair.sources["weights_fingerprint"]
    from .engine.lora import GatedLoRA

    digest = hashlib.sha256(pair.kind.encode())
    models = [pair.base_unet, pair.finetuned_unet, pair.base_text_encoder, pair.finetuned_text_encoder, pair.vae]
    for model in models:
        if model is None:
            digest.update(b"none")
            continue
        adapters = {
            id(p)
            for m in model.modules()
            if isinstance(m, GatedLoRA)
            for p in (*m.down.parameters(), *m.up.parameters())
        }
        for parameter in model.parameters():
            if id(parameter) not in adapters:
                digest.update(str(tuple(parameter.shape)).encode())
                digest.update(parameter.detach().flatten()[:1024].float().cpu().numpy().tobytes())
    for name, layer in sorted((pair.unet_lora or {}).items()):
        digest.update(f"{name}:{layer.alpha}".encode())
        for tensor in (layer.down, layer.up):
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
    pair.sources["weights_fingerprint"] = digest.hexdigest()
    return pair.sources["weights_fingerprint"]


def _open_manifest(folder: Path | None, config: dict, chunk_size: int) -> dict:
    """Load `folder`'s manifest and check its config, or start a new one."""
    path = folder / MANIFEST if folder is not None else None
    if path is not None and path.exists():
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error}); move the folder away or use another --out") from None
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{path} is not a finextract generation manifest ({FORMAT}); use another --out")
        differences = _leaf_differences(manifest["config"], config)
        if differences:
            shown = "; ".join(differences[:8]) + (f"; and {len(differences) - 8} more" if len(differences) > 8 else "")
            raise ValueError(
                f"{folder} holds a generation with a different config (there -> now: {shown}); "
                "rerun with the original settings to resume it, or choose another --out folder"
            )
        return manifest
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


def library_versions() -> dict:
    """Versions of finextract and the libraries that change generated images (recorded in manifests)."""
    import diffusers
    import transformers

    from . import __version__

    return {
        "finextract": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
