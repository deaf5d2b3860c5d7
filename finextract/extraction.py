"""What an extraction found, from images on: SSCD descriptors -> cliques -> the N0 extracted images.

`cluster_images(images, n0, embedder)` is the stage after generation (and all of `finextract cluster`):
constant images dropped, SSCD descriptors, the clique search of `finextract.clustering`, the clique
representatives; `ExtractionResult` is what it (and `finextract.extract.Extractor.extract`) returns.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from finextract.clustering import ClusteringResult, cluster_descriptors
from finextract.clustering.n0 import MIN_IMAGES, estimate_n0
from finextract.images import degenerate_mask
from finextract.metrics import similarity_histogram
from finextract.spec import AUTO
from finextract.sscd import embed_images

logger = logging.getLogger(__name__)


@dataclass
class ExtractionResult:
    """What `Extractor.extract` (or `cluster_images`) found.

    Attributes:
        images: uint8 (N0, H, W, 3) ndarray, the extracted images (clique representatives).
        indices: their indices into the generated images (length N0).
        cliques: N0 index lists into the generated images, in the selection rule's order
            (`finextract.clustering.selection`): "size" largest first, "density" and "merged" by their
            scores; "modes" each pick with its near-copies, densest pick first (not by size).
        threshold: the clustering threshold ("modes": its near-copy radius). timings: seconds per stage.
        config: everything that changes the answer (models, method, seeds, SSCD model hash + SSCD preset,
            clustering budget and selection).
        metrics: AS / A-ESR0.6 / A-ESR0.7 and best matches when training images were given, else None.
        clustering: the full ClusteringResult. num_degenerate: generated images excluded (constant).
        n0_estimate: the `finextract.clustering.n0.N0Estimate` when N0 was estimated (n0="auto"), else None.
        n0_source: {"source": "metadata", "key", "file", "n0"} when n0="auto" was read from the
            fine-tune's trainer metadata (`finextract.inspection.metadata_first`), else None.
        base_choice: when the base was a folder of candidates: {"folder", "chosen", "why", "ranking"
            (`BaseCandidate.to_dict()`s, best first)} (`engine.loading.load_model_pair`'s sources), else None.
        descriptors: float32 (N0, D) SSCD descriptors of `images` (what the metrics compare), or None.
        generated_descriptors: float32 (M, D) tensor, the SSCD descriptors of the M usable (non-degenerate)
            generated images, as computed for the clustering, on the device they were computed on.
        generated_indices: the M indices into the generated images of those rows.
        similarity_histogram: `finextract.metrics.similarity_histogram` of `generated_descriptors` (the
            off-diagonal values of the matrix the clustering thresholded), or None.
        evidence: what the result was computed from (`finextract.evidence`): {"inputs": every input
            file's path, size and sha256, "environment": Python, machine, versions, "command": command
            line and API call}, or None (clustering existing images).
        work: the generation's counted work (`finextract.generation.count_work`: UNet evaluations,
            wall and CPU seconds), or an empty dict (clustering existing images).
        adaptive: with adaptive N, the rounds (`finextract.adaptive.RoundTracker.record`: images so far,
            extracted indices, stable or not, per round; where it stopped), else None.
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
    work: dict = field(default_factory=dict)
    n0_source: dict | None = None
    adaptive: dict | None = None
    base_choice: dict | None = None

    def selection_summary(self) -> str:
        """One line on what the selection found: "threshold t, clique sizes [...]", or for "modes"
        "modes picks, near-copy groups of sizes [...] (radius r)" (no threshold sweep, no cliques)."""
        sizes = [len(c) for c in self.cliques]
        if self.config.get("clustering", {}).get("selection") == "modes":
            return f"modes picks, near-copy groups of sizes {sizes} (radius {self.threshold:.2f})"
        return f"threshold {self.threshold:.2f}, clique sizes {sizes}"

    def adaptive_summary(self) -> str:
        """One line on the adaptive rounds: "stopped at M of cap images after R rounds (stable|cap)"."""
        a = self.adaptive
        why = "stable" if a["stable"] else "cap reached, not stable"
        return f"stopped at {a['stopped_at']} of {a['cap']} images after {len(a['rounds'])} rounds ({why})"


def degenerate_causes(precision: tuple[str, str] | None) -> str:
    """What likely made generated images constant, for the messages of `cluster_images`.

    Args:
        precision: (UNet and text-encoder dtype, VAE dtype) of the generation; None: unknown (images
            read from a folder).
    """
    causes = (
        "the model pair is broken: a corrupt fine-tune (NaN/Inf weights are refused when it loads, but finite "
        "garbage is not), a fine-tune paired with a --base it was not trained from, or a wrong "
        "--prediction-type"
    )
    if precision is None:
        return f"If they were generated, {causes}"
    fixes = {"UNet": "--dtype fp32", "VAE": "vae_dtype='fp32'"}
    reduced = [(part, dtype) for part, dtype in zip(fixes, precision) if dtype != "fp32"]
    if reduced:  # a NaN in reduced precision is rerun in fp32 (`Sampler`), but saturated values are not NaN
        named = ", ".join(f"{part} in {dtype}: rerun with {fixes[part]}" for part, dtype in reduced)
        return f"Likely causes: overflow ({named}), or {causes}"
    return f"These were generated in fp32 (no overflow), so {causes}"


def cluster_images(
    images,
    n0: int | str,
    embedder,
    *,
    budget: int | None = None,
    step: float = 0.01,
    time_limit: float = 30.0,
    timings: dict | None = None,
    precision: tuple[str, str] | None = None,
    on_budget: str = "skip",
    selection: str = "size",
) -> ExtractionResult:
    """Embed images with SSCD and cluster them into N0 cliques, excluding degenerate images.

    Args:
        images: uint8 (N, H, W, 3) tensor/ndarray, or a list of uint8 (H, W, 3) arrays.
        n0: N0, number of images to extract, or "auto" to estimate it from the descriptors
            (`finextract.clustering.n0.estimate_n0`; needs at least its `MIN_IMAGES` usable images).
        embedder: an `finextract.sscd.Embedder`.
        budget, step, time_limit, on_budget, selection: see `finextract.clustering.cluster_similarity`.
        timings: dict to add "embed", "cluster" and "histogram" seconds to.
        precision: (UNet and text-encoder dtype, VAE dtype) the images were generated in ("fp32", "fp16",
            "bf16"), for what the messages about constant images blame; None for images read from a folder.

    Returns:
        ExtractionResult (no metrics); indices refer to the input images; it keeps every usable image's
        descriptor (`generated_descriptors`) and the similarity histogram for reports and metrics.

    Raises:
        ValueError: every image is constant (naming the likely causes, `degenerate_causes`), fewer
            usable (non-constant) images than N0 (or than an estimate needs), or no clique larger than
            chance to estimate N0 from.
    """
    timings = timings if timings is not None else {}
    array_list = images if isinstance(images, list) else None
    on_device = _is_device_tensor(images)
    degenerate = degenerate_mask(images)
    keep = np.flatnonzero(~degenerate)
    if len(images) and not len(keep):
        raise ValueError(
            f"all {len(images)} images are constant (one colour each): nothing to cluster, and more images or a "
            f"lower --n0 will not help. {degenerate_causes(precision)}"
        )
    excluded = f" ({int(degenerate.sum())} constant images excluded)" if degenerate.any() else ""
    if degenerate.any():
        logger.warning(
            "%d of %d images are constant and are excluded from clustering; %s",
            int(degenerate.sum()),
            len(degenerate),
            degenerate_causes(precision),
        )
    if n0 == AUTO:
        if len(keep) < MIN_IMAGES:
            raise ValueError(
                f"only {len(keep)} usable images{excluded}: estimating N0 needs at least {MIN_IMAGES}; generate "
                "more (--num-images) or give --n0"
            )
    elif len(keep) < n0:
        raise ValueError(
            f"only {len(keep)} usable images{excluded} for n0={n0}; generate more (--num-images) or lower --n0"
        )
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
        start = time.perf_counter()
        estimate = estimate_n0(descriptors, step=step, budget=budget, time_limit=time_limit)
        timings["estimate_n0"] = time.perf_counter() - start
        n0 = estimate.n0
        logger.info("estimated N0 = %d (interval %s, confidence %.2f)", n0, estimate.interval, estimate.confidence)
    start = time.perf_counter()
    clustering = cluster_descriptors(
        descriptors, n0, step=step, budget=budget, time_limit=time_limit, on_budget=on_budget, selection=selection
    )
    timings["cluster"] = time.perf_counter() - start
    return result_of(images, keep, descriptors, clustering, int(degenerate.sum()), timings, estimate)


def result_of(
    images, keep, descriptors, clustering: ClusteringResult, num_degenerate: int, timings: dict, estimate=None
):
    """The `ExtractionResult` of a clustering of the usable images' descriptors (no metrics, no config).

    Args:
        images: what `cluster_images` takes. keep: (M,) indices of the usable images into `images`.
        descriptors: their (M, D) SSCD descriptors. clustering: the clustering of those M rows.
        num_degenerate: images left out as constant. timings: gets "histogram" seconds.
        estimate: the `N0Estimate`, or None.
    """
    array_list = images if isinstance(images, list) else None
    on_device = _is_device_tensor(images)
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
        num_degenerate=num_degenerate,
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
    # heavy: torch and diffusers load with the models; the fleet driver imports extract.py torch-free
    import torch

    return torch.as_tensor(np.asarray(indices, dtype=np.int64), device=device)
