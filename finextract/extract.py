"""The `Extractor` API: load -> generate -> embed (SSCD) -> cluster -> (evaluate) -> write the output folder.

Output folder: `extracted/` (N0 PNGs), optional `generated/` (N PNGs), `generation/` (the resumable
chunks), `result.json` (everything that changes the answer, timings, metrics) and `report.html`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from finextract.clustering import ClusteringResult, cluster_descriptors
from finextract.engine.config import RunConfig, run_config
from finextract.evidence import HashCache, command_record, environment_record, input_record, jsonable, train_record
from finextract.records import library_versions

logger = logging.getLogger(__name__)

#: The paper generates N = 50 x N0 images.
IMAGES_PER_N0 = 50
#: `caption` / `n0` value asking for it to be recovered / estimated from the fine-tune.
AUTO = "auto"
#: N generated when N0 is estimated and N is not given: the paper's 50 x N0 for N0 up to 10.
AUTO_NUM_IMAGES = 500


@dataclass
class ExtractionResult:
    """What `Extractor.extract` (or `cluster_images`) found.

    Attributes:
        images: uint8 (N0, H, W, 3) ndarray, the extracted images (clique representatives).
        indices: their indices into the generated images (length N0).
        cliques: N0 index lists into the generated images, largest first.
        threshold: the clustering threshold. timings: seconds per stage. config: everything that
        changes the answer (models, method, seeds, SSCD model hash + preset, clustering budget).
        metrics: AS / A-ESR0.6 / A-ESR0.7 and best matches when training images were given, else None.
        clustering: the full ClusteringResult. num_degenerate: generated images excluded (constant).
        n0_estimate: the `finextract.clustering.n0.N0Estimate` when N0 was estimated (n0="auto"), else None.
        descriptors: float32 (N0, D) SSCD descriptors of `images` (what the metrics compare), or None.
        generated_descriptors: float32 (M, D) tensor, the SSCD descriptors of the M usable (non-degenerate)
            generated images, as computed for the clustering, on the device they were computed on.
        generated_indices: the M indices into the generated images of those rows.
        similarity_histogram: `finextract.metrics.similarity_histogram` of `generated_descriptors` (the
            off-diagonal values of the matrix the clustering thresholded), or None.
        evidence: what the result was computed from (`finextract.evidence`): {"inputs": every input
            file's path, size and sha256, "environment": Python, machine, versions, "command": command
            line and API call}, or None (clustering existing images).
    """

    images: np.ndarray
    indices: list[int]
    cliques: list[list[int]]
    threshold: float
    timings: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    metrics: dict | None = None
    clustering: ClusteringResult | None = None
    num_degenerate: int = 0
    descriptors: object = None
    generated_descriptors: object = None
    generated_indices: list[int] = field(default_factory=list)
    similarity_histogram: dict | None = None
    n0_estimate: object = None
    evidence: dict | None = None


def embed_images(embedder, images, label: str, batch_size: int = 32):
    """SSCD descriptors of a list of uint8 (H, W, 3) arrays of possibly different sizes; (B, D) float32 tensor.

    `label` names the set in the log line ("extracted", "training", "generated"), so two calls in one
    command say which images each was about.
    """
    import time

    import torch

    started = time.perf_counter()
    if not isinstance(images, list):
        descriptors = embedder.embed(images, batch_size=batch_size)
        logger.info("SSCD descriptors of %d %s images in %.1f s", len(images), label, time.perf_counter() - started)
        return descriptors
    out = [None] * len(images)
    by_shape: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        by_shape.setdefault(image.shape, []).append(i)
    for idx in by_shape.values():
        descriptors = embedder.embed(np.stack([images[i] for i in idx]), batch_size=batch_size)
        for i, d in zip(idx, descriptors):
            out[i] = d
    logger.info("SSCD descriptors of %d %s images in %.1f s", len(images), label, time.perf_counter() - started)
    return torch.stack(out)


def cluster_images(
    images,
    n0: int | str,
    embedder,
    *,
    budget: int | None = None,
    step: float = 0.01,
    time_limit: float = 30.0,
    timings: dict | None = None,
) -> ExtractionResult:
    """Embed images with SSCD and cluster them into N0 cliques, excluding degenerate images.

    Args:
        images: uint8 (N, H, W, 3) tensor/ndarray, or a list of uint8 (H, W, 3) arrays.
        n0: N0, number of images to extract, or "auto" to estimate it from the descriptors
            (`finextract.clustering.n0.estimate_n0`; needs at least its `MIN_IMAGES` usable images).
        embedder: an `finextract.sscd.Embedder`.
        budget, step, time_limit: see `finextract.clustering.cluster_similarity`.
        timings: dict to add "embed", "cluster" and "histogram" seconds to.

    Returns:
        ExtractionResult (no metrics); indices refer to the input images; it keeps every usable image's
        descriptor (`generated_descriptors`) and the similarity histogram for reports and metrics.

    Raises:
        ValueError: fewer usable (non-constant) images than N0 (or than an estimate needs), or no
            clique larger than chance to estimate N0 from.
    """
    from finextract.images import degenerate_mask
    from finextract.metrics import similarity_histogram

    timings = timings if timings is not None else {}
    array_list = images if isinstance(images, list) else None
    on_device = _is_device_tensor(images)
    degenerate = degenerate_mask(images)
    keep = np.flatnonzero(~degenerate)
    if degenerate.any():
        logger.warning(
            "%d of %d images are degenerate (constant, e.g. NaN/black from fp16 overflow) and are "
            "excluded from clustering",
            int(degenerate.sum()),
            len(degenerate),
        )
    if n0 == AUTO:
        from finextract.clustering.n0 import MIN_IMAGES

        if len(keep) < MIN_IMAGES:
            raise ValueError(
                f"only {len(keep)} usable images: estimating N0 needs at least {MIN_IMAGES}; generate more "
                "(--num-images) or give --n0"
            )
    elif len(keep) < n0:
        raise ValueError(f"only {len(keep)} usable images for n0={n0}; generate more (--num-images) or lower --n0")
    start = time.perf_counter()
    if array_list is not None:
        usable = [array_list[i] for i in keep]
    elif on_device:  # stays on the GPU: SSCD and the similarity matrix run there
        usable = images if len(keep) == len(images) else images[_index(keep, images.device)]
    else:
        usable = images[keep]
    descriptors = embed_images(embedder, usable, "generated")
    timings["embed"] = time.perf_counter() - start
    estimate = None
    if n0 == AUTO:
        from finextract.clustering.n0 import estimate_n0

        start = time.perf_counter()
        estimate = estimate_n0(descriptors, step=step, budget=budget, time_limit=time_limit)
        timings["estimate_n0"] = time.perf_counter() - start
        n0 = estimate.n0
        logger.info("estimated N0 = %d (interval %s, confidence %.2f)", n0, estimate.interval, estimate.confidence)
    start = time.perf_counter()
    clustering = cluster_descriptors(descriptors, n0, step=step, budget=budget, time_limit=time_limit)
    timings["cluster"] = time.perf_counter() - start
    start = time.perf_counter()
    histogram = similarity_histogram(descriptors) if len(descriptors) > 1 else None
    timings["histogram"] = time.perf_counter() - start
    cliques = [[int(keep[i]) for i in c] for c in clustering.cliques]
    indices = [int(keep[i]) for i in clustering.representatives]
    if array_list is not None:
        picked = [array_list[i] for i in indices]
        if len({image.shape for image in picked}) == 1:
            picked = np.stack(picked)
    elif on_device:
        picked = images[_index(indices, images.device)].cpu().numpy()
    else:
        picked = np.asarray(images[indices])
    return ExtractionResult(
        images=picked,
        indices=indices,
        cliques=cliques,
        threshold=clustering.threshold,
        timings=timings,
        clustering=clustering,
        num_degenerate=int(degenerate.sum()),
        descriptors=descriptors[list(clustering.representatives)],
        generated_descriptors=descriptors,
        generated_indices=[int(i) for i in keep],
        similarity_histogram=histogram,
        n0_estimate=estimate,
    )


def _is_device_tensor(images) -> bool:
    """True for a torch tensor that lives on an accelerator (the images stay there for SSCD)."""
    return hasattr(images, "device") and getattr(images.device, "type", "cpu") != "cpu"


def _index(indices, device):
    import torch

    return torch.as_tensor(np.asarray(indices, dtype=np.int64), device=device)


def model_resolution(pair) -> int | None:
    """Side in pixels of the images a model pair generates (and of the images it was fine-tuned on by
    `finetune` and the usual DreamBooth / LoRA scripts): the UNet's latent `sample_size` times the VAE's
    downsampling factor `2 ** (len(vae.config.block_out_channels) - 1)`, as diffusers' pipelines
    compute their default height and width. None when the latent is not square.
    """
    size = pair.base_unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if height != width:
        return None
    return int(height) * 2 ** (len(pair.vae.config.block_out_channels) - 1)


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
    from finextract.images import center_crop_resize, read_images

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
    from finextract.metrics import extraction_metrics

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


def write_output(
    out: str | Path,
    result: ExtractionResult,
    record: dict,
    *,
    generated=None,
    save_generated: bool = False,
    train_data: tuple | None = None,
) -> Path:
    """Write `extracted/`, optional `generated/`, `result.json` and `report.html` into `out`, replacing
    the previous run's whole (`finextract.runfolder.commit`): a re-run with fewer images, or without
    `save_generated`, leaves none of the old ones; result.json is written atomically.

    Args:
        out: the output folder (created); check it with `finextract.runfolder.prepare` first.
        result: the extraction; its `config` (`extraction_config`), metrics and similarity histogram
            go into result.json.
        record: what only the caller knows (e.g. {"method": ...}, "run_folder":
            `finextract.runfolder.run_entry`), merged first. A cluster run's record also removes an
            earlier extract run's generation/ (only reachable with --overwrite).
        generated: every generated image, uint8 (N, H, W, 3) tensor/ndarray (or a list of arrays): the
            report shows each training image's best match among them.
        save_generated: also write them all to `generated/` (N PNGs).
        train_data: (the training images as compared, their paths), from `evaluate_against`.

    Returns:
        `out`.
    """
    from finextract.images import write_png
    from finextract.report import write_report
    from finextract.runfolder import commit, stage, write_record

    out = Path(out)
    start = time.perf_counter()
    names = [f"{rank:03d}_gen{index:05d}.png" for rank, index in enumerate(result.indices)]
    staged = {"extracted": stage(out / "extracted"), "generated": None}
    for name, image in zip(names, result.images):
        write_png(image, staged["extracted"] / name)
    if generated is not None and save_generated:
        staged["generated"] = stage(out / "generated")
        if hasattr(generated, "cpu"):  # one device-to-host copy, not one per image
            generated = generated.cpu()
        for i, image in enumerate(generated):
            write_png(image, staged["generated"] / f"{i:05d}.png")
    if record.get("run_folder", {}).get("command") == "cluster":
        staged["generation"] = None  # an extract run's chunks, replaced by this cluster run (--overwrite)
    commit(out, staged)
    paths = [out / "extracted" / name for name in names]
    result.timings["write"] = time.perf_counter() - start
    record = {
        **record,
        "n0": result.config.get("n0"),
        "num_images": result.config.get("num_images"),
        "threshold": result.threshold,
        "cliques": result.cliques,
        "clique_sizes": [len(c) for c in result.cliques],
        "extracted": result.indices,
        "extracted_files": [str(p.relative_to(out)) for p in paths],
        "num_degenerate": result.num_degenerate,
        "n0_estimate": result.n0_estimate.to_dict() if result.n0_estimate is not None else {"source": "given"},
        "timings": result.timings,
        "config": result.config,
    }
    if result.clustering is not None:
        c = result.clustering
        record["clustering"] = {
            "start_threshold": c.start_threshold,
            "skipped": c.skipped,
            "budget": c.budget,
            "num_cliques": c.num_cliques,
            "thresholds_tried": c.thresholds_tried,
            "work": c.work,
            "representatives": result.indices,
        }
        record["skipped"] = c.skipped
    if result.similarity_histogram is not None:
        record["similarity_histogram"] = result.similarity_histogram
    if result.metrics is not None:
        record["metrics"] = result.metrics
    if result.evidence is not None:
        record["evidence"] = result.evidence
    write_record(out, record)
    write_report(out, record, paths, train_data, generated=generated)
    return out


class Extractor:
    """FineXtract end to end: `Extractor(base, finetuned).extract(caption, n0, out="run")`.

    Args:
        base: pretrained model (diffusers folder or what `load_model_pair` accepts, a `LoadedBase`
            from `finextract.engine.loading.load_base` included: loaded once for many Extractors).
        finetuned: DreamBooth checkpoint (folder or single file), or None with `lora`.
        lora: LoRA weights (diffusers / PEFT / kohya), instead of `finetuned`.
        config: the `RunConfig` for every extraction (device, dtype, VAE dtype, backend, threads, batch
            size, steps, seed, cache folder); None = `RunConfig.resolve(**run_options)`. The default
            backend is "auto", as in the CLI: openvino on a CPU (the ONNX export of each pair is cached
            under `cache_dir`, default `~/.cache/finextract` or `$FINEXTRACT_CACHE`), torch on CUDA.
            Pass `backend="torch"` to write no export (the folder still gets `hashes.json`, the
            input files' sha256 cached for the evidence records: `finextract.evidence.HashCache`).
        embedder: "default" (sscd_disc_mixup ONNX), an SSCD TorchScript / ONNX file, or an
            `finextract.sscd.Embedder` loaded already (`load_embedder`; shared by many Extractors).
        preset: SSCD preprocessing preset ("sscd" / "paper"); None = "sscd" (a loaded Embedder keeps its own).
        allow_pickle: allow loading pickled (.bin/.ckpt) checkpoints; only for files you trust.
        budget: clustering search budget per threshold (None: `clustering.default_budget(N)`).
        base_config: for a single-file `base`, a local diffusers pipeline folder supplying its configs.
        prediction_type: "epsilon" / "v_prediction" / "sample": sample both models as this, overriding
            their scheduler configs (when they disagree; see `load_model_pair`). None: read from them.
        **run_options: `RunConfig.resolve` settings (device=, dtype=, backend=, steps=, ...).

    On CUDA the generated images stay on the GPU from the VAE decode through SSCD and the similarity
    matrix; only the N0 extracted images (and `generated/` when asked) are copied to the host.

    `resolution` (attribute): the side in pixels of the images the pair generates (`model_resolution`),
    to which training images are centre-cropped and resized before they are scored. `inputs`: the
    checkpoints' evidence records (`model_inputs`: each file's path, size and sha256, hashed once per
    file and cached), and `call` this constructor's arguments: both go into every result's `evidence`.

    Raises:
        ValueError / FileNotFoundError: invalid settings, or from loading (incompatible or missing
            checkpoints). OSError: a checkpoint file cannot be read for its sha256.
    """

    def __init__(
        self,
        base,
        finetuned=None,
        *,
        lora=None,
        config: RunConfig | None = None,
        embedder="default",
        preset=None,
        allow_pickle=False,
        budget: int | None = None,
        base_config=None,
        prediction_type: str | None = None,
        **run_options,
    ):
        from finextract.engine.loading import load_model_pair
        from finextract.sscd import Embedder, load_embedder

        if finetuned is None and lora is None:
            raise ValueError("pass a fine-tuned checkpoint (finetuned=...) or LoRA weights (lora=...)")
        if isinstance(embedder, Embedder) and preset is not None:
            raise ValueError("preset= applies when the Extractor loads the SSCD model; a loaded Embedder keeps its own")
        self.config = run_config(config, **run_options)
        self.config.apply_threads()
        self.budget = budget
        start = time.perf_counter()
        self.pair = load_model_pair(
            base,
            finetuned,
            lora=lora,
            allow_pickle=allow_pickle,
            device=self.config.device,
            dtype=self.config.dtype,
            base_config=base_config,
            prediction_type=prediction_type,
        ).place(self.config)
        if isinstance(embedder, Embedder):
            self.embedder = embedder
        else:
            self.embedder = load_embedder(embedder, preset=preset, device=self.config.device)
        self.load_seconds = time.perf_counter() - start
        self.resolution = model_resolution(self.pair)
        self.inputs = model_inputs(
            self.pair.sources, lora=lora is not None, base_config=base_config, config=self.config
        )
        self.call = {
            "function": "finextract.Extractor",
            "arguments": jsonable(
                {
                    "base": base,
                    "finetuned": finetuned,
                    "lora": lora,
                    "config": self.config.to_dict(),
                    "embedder": embedder,
                    "preset": preset,
                    "allow_pickle": allow_pickle,
                    "budget": budget,
                    "base_config": base_config,
                    "prediction_type": prediction_type,
                }
            ),
        }
        self.models = {
            "base": str(base),
            "finetuned": None if finetuned is None else str(finetuned),
            "lora": None if lora is None else str(lora),
            "kind": self.pair.kind,
            "resolution": self.resolution,
            "family": self.pair.family.name,
            "prediction_type": self.pair.scheduler_config.get("prediction_type", "epsilon"),
        }

    def extract(
        self,
        caption: str | None,
        n0: int | str,
        *,
        num_images: int | None = None,
        method: str | None = None,
        w: float | None = None,
        k: float | None = None,
        out=None,
        train=None,
        train_as_is: bool = False,
        save_generated: bool = False,
        progress: bool = True,
        label: str | None = None,
        recovery: dict | None = None,
        overwrite: bool = False,
        **run_options,
    ) -> ExtractionResult:
        """Generate N images with guidance, cluster their SSCD descriptors and return N0 extracted images.

        Args:
            caption: the training caption c; "auto" recovers it from the fine-tune's cross-attention
                weight deltas first (`finextract.caption.recover_caption`; the recovered caption, its
                score and the runner-ups go into `config["caption_recovery"]` and result.json); None
                when it is unknown: then only "finextract-uncond" (Eq. 6, the default then) applies.
            n0: N0 >= 1, or "auto" to estimate it from the generated images' SSCD descriptors
                (`finextract.clustering.n0.estimate_n0`: the estimate, its interval and confidence go
                into `result.n0_estimate` and result.json). num_images: N (default 50 x N0; with
                n0="auto" `AUTO_NUM_IMAGES`).
            method: "finextract" | "finextract-uncond" | "cfg" | "direct"; None = "finextract", or
                "finextract-uncond" when `caption` is None. w, k: guidance scale and correction
                (None = paper defaults per model kind).
            out: output folder to write (extracted/, generation/, result.json, report.html), or None.
            train: the real training images, to add AS / A-ESR metrics: a folder, a list of uint8
                (H, W, 3) arrays, or the (images, paths) pair `read_images` returns. They are compared
                as the fine-tune saw them: centre-cropped and resized to `self.resolution`
                (`read_training_images`; the transform is recorded in `metrics["train_transform"]`).
            train_as_is: compare the training images as they are, without that crop and resize.
            save_generated: also write all N generated images to out/generated/.
            progress: show progress bars. label: the generation bar's text.
            recovery: keyword arguments for `finextract.caption.recover_caption` with caption="auto"
                (e.g. max_tokens=, vocabulary=); None = its defaults.
            overwrite: replace a run in `out` made with other settings (`run_settings`), its
                generation chunks included, instead of refusing it (`--overwrite`). A re-run with the
                same settings resumes the chunks and replaces extracted/, generated/, result.json
                and report.html whole either way.
            **run_options: settings of this extraction that differ from the Extractor's `config`
                (steps=, seed=, batch_size=, backend=, threads=, cuda_graphs=); the device and
                precisions are fixed when the models load.

        Returns:
            ExtractionResult.

        Raises:
            ValueError: n0 < 1, num_images < n0, invalid settings, `out` is a file or holds another
                command's output or (without `overwrite`) a run with other settings, `train` holds no
                readable image, a non-square model without `train_as_is`, a method that needs a caption
                with `caption=None`, or too few usable generations (all but the last checked before
                generating).
            finextract.caption.CaptionRecoveryError (a ValueError): `caption="auto"` on a fine-tune that
                changes no `attn2.to_k` / `attn2.to_v` (nothing is generated).
            FileNotFoundError: `train` is not a folder.
        """
        from finextract.generation import generate
        from finextract.images import read_images
        from finextract.rules import rule_for
        from finextract.runfolder import prepare, run_entry

        fixed = sorted(set(run_options) & {"device", "dtype", "vae_dtype"})
        if fixed:
            raise ValueError(
                f"{', '.join(fixed)} are fixed when the Extractor loads the models; build another Extractor"
            )
        config = run_config(self.config, **run_options)
        if n0 == AUTO:
            from finextract.clustering.n0 import MIN_IMAGES

            num_images = AUTO_NUM_IMAGES if num_images is None else num_images
            if num_images < MIN_IMAGES:
                raise ValueError(f"num_images={num_images}: estimating N0 needs at least {MIN_IMAGES} images")
        elif not isinstance(n0, int) or n0 < 1:
            raise ValueError(f"n0={n0!r}: must be an int >= 1 or 'auto'")
        num_images = IMAGES_PER_N0 * n0 if num_images is None else num_images
        if n0 != AUTO and num_images < n0:
            raise ValueError(f"num_images={num_images}: must be >= n0={n0}")
        method = method or ("finextract-uncond" if caption is None else "finextract")
        settings = run_settings(self.models, caption, n0, num_images, method, w, k, config.steps, config.seed)
        if out is not None:
            prepare(out, "extract", settings, overwrite=overwrite)
        resolution = None if train_as_is else self.resolution
        if train is not None and resolution is None and not train_as_is:
            raise ValueError(
                "the model generates non-square images: pass train_as_is=True (--train-as-is) and crop the "
                "training images as the fine-tune saw them yourself"
            )
        if caption is None and any(term.caption == "prompt" for term in rule_for(method, self.pair.kind).terms):
            raise ValueError(
                f"method {method!r} needs the training caption: give caption=... (CLI --caption TEXT), "
                "caption='auto' to recover it from the weights, or use method 'finextract-uncond' (Eq. 6)"
            )
        call = jsonable(
            {
                "caption": caption,
                "n0": n0,
                "num_images": num_images,
                "method": method,
                "w": w,
                "k": k,
                "out": out,
                "train": train,
                "train_as_is": train_as_is,
                "save_generated": save_generated,
                "recovery": recovery,
                **run_options,
            }
        )
        train_folder = Path(train) if isinstance(train, (str, Path)) else None
        if isinstance(train, (str, Path)):  # read (and so check) the training images before generating
            train = read_images(train)
        timings = {"load": self.load_seconds}
        caption_record = {"source": "given" if caption is not None else "none", "caption": caption}
        if caption == AUTO:
            from finextract.caption import recover_caption

            options = {"seed": config.seed, **(recovery or {})}
            recovered = recover_caption(self.pair, progress=progress, **options)
            timings["caption"] = recovered.seconds
            caption = recovered.caption
            caption_record = {"source": "recovered", **recovered.to_dict()}
        start = time.perf_counter()
        generation = generate(
            self.pair,
            "" if caption is None else caption,
            num_images,
            method=method,
            w=w,
            k=k,
            config=config,
            progress=progress,
            label=label,
            images_on_device=config.is_cuda,
            out=None if out is None else Path(out) / "generation",  # resumable chunks
            overwrite=overwrite,
        )
        timings["generate"] = time.perf_counter() - start
        images = generation.images
        result = cluster_images(images, n0, self.embedder, budget=self.budget, timings=timings)
        params = generation.manifest["config"]["params"]  # the rule's w, k with the paper's defaults filled in
        result.config = extraction_config(
            n0=result.n0_estimate.n0 if result.n0_estimate is not None else n0,
            num_images=num_images,
            embedder=self.embedder,
            budget=self.budget,
            models=self.models,
            generation={
                "caption": caption,
                "caption_recovery": caption_record,
                "method": method,
                "w": params.get("w"),
                "k": params.get("k"),
                "seeds": list(generation.seeds),
                "run": config.to_dict(),
                "manifest": generation.manifest,
            },
        )
        inputs = list(self.inputs)
        if train is not None:
            inputs.append(training_input(train, train_folder, config))
        result.evidence = {
            "inputs": inputs,
            "environment": environment_record(),
            "command": command_record({**self.call, "then": {"function": "extract", "arguments": call}}),
        }
        train_data = None
        if train is not None:
            start = time.perf_counter()
            result.metrics, train_data = evaluate_against(
                train,
                result.descriptors,
                self.embedder,
                resolution=resolution,
                generated_descriptors=result.generated_descriptors,
                generated_indices=result.generated_indices,
            )
            timings["evaluate"] = time.perf_counter() - start
        if out is not None:
            write_output(
                out,
                result,
                {"method": method, "caption": caption_record, "run_folder": run_entry("extract", settings)},
                generated=generation.images,
                save_generated=save_generated,
                train_data=train_data,
            )
        return result


def model_inputs(sources: dict, *, lora: bool, base_config=None, config: RunConfig) -> list[dict]:
    """`finextract.evidence.input_record`s of a loaded pair's checkpoints: base, base_config (when
    given), and the fine-tune (role "lora" for an adapter). Hashes come from the hash cache under
    `config.cache_dir` (each file is read once per (path, size, mtime)).

    Args:
        sources: `ModelPair.sources` (the resolved "base" and "finetuned" paths).
        lora: the fine-tune is an adapter. base_config: the `--base-config` folder, or None.
        config: the run's `RunConfig`.

    Raises:
        OSError: a checkpoint file cannot be read.
    """
    cache = HashCache(config.cache_dir)
    inputs = [input_record("base", sources["base"], cache)]
    if base_config is not None and Path(base_config).exists():
        inputs.append(input_record("base_config", base_config, cache))
    inputs.append(input_record("lora" if lora else "finetuned", sources["finetuned"], cache))
    cache.save()
    return inputs


def training_input(train, folder: Path | None, config: RunConfig) -> dict:
    """The `finextract.evidence.train_record` of `Extractor.extract`'s `train` (a folder read already,
    the (images, paths) pair of `read_images`, or a list of arrays), hashed through the hash cache."""
    if isinstance(train, tuple) and len(train) == 2 and isinstance(train[1], list):
        images, paths = train
        parents = {Path(p).parent for p in paths}
        if folder is None and len(parents) == 1 and all(Path(p).is_file() for p in paths):
            folder = parents.pop()
    else:
        images = list(train)
        paths = [Path(f"train_{i:03d}.png") for i in range(len(images))]
    cache = HashCache(config.cache_dir)
    record = train_record(images, paths, folder, cache)
    cache.save()
    return record


def run_settings(models: dict, caption, n0, num_images: int, method: str, w, k, steps: int, seed: int) -> dict:
    """What defines an extract run, as given (w, k None = the paper's defaults): its output folder
    refuses a re-run with other settings unless --overwrite (`finextract.runfolder.prepare`).

    Args:
        models: base / finetuned / lora paths (`Extractor.models`, or the CLI's options); existing
            paths are made absolute, so a re-run from another working folder matches.
        caption: as given ("auto", None or the text). n0: int or "auto". num_images: N as resolved.
        method, w, k, steps, seed: as the extraction uses them.

    Returns:
        A JSON-ready dict.
    """

    def where(path):
        return None if path is None else str(Path(path).resolve()) if Path(path).exists() else str(path)

    return {
        "models": {name: where(models.get(name)) for name in ("base", "finetuned", "lora")},
        "caption": caption,
        "method": method,
        "w": w,
        "k": k,
        "n0": n0,
        "num_images": num_images,
        "steps": steps,
        "seed": seed,
    }


def extraction_config(
    *,
    n0: int,
    num_images: int,
    embedder,
    budget,
    models: dict | None = None,
    generation: dict | None = None,
    inputs: dict | None = None,
) -> dict:
    """The record of everything that changes an extraction's answer (`ExtractionResult.config`, result.json).

    Args:
        n0, num_images: N0 and N.
        embedder: the SSCD `Embedder` (its model hash and preprocessing preset are recorded).
        budget: the clustering search budget (None = automatic).
        models: base / fine-tune paths and kind (extract), or None (clustering existing images).
        generation: caption, method, w, k, seeds, the `RunConfig` record and the generation manifest
            (extract), or None.
        inputs: what was clustered when nothing was generated (the `cluster` command's folder and files).

    Returns:
        A JSON-ready dict.
    """
    record = {"n0": n0, "num_images": num_images}
    if models is not None:
        record["models"] = models
    if generation is not None:
        record.update(generation)
    if inputs is not None:
        record["inputs"] = inputs
    record["sscd"] = embedder.info
    record["clustering"] = {"step": 0.01, "budget": budget or "auto"}
    record["versions"] = library_versions()
    return record
