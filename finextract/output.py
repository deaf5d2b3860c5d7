"""The extract / cluster output folder and its records: `write_output` (extracted/, generated/,
result.json, report.html), the result.json record of what changes the answer (`extraction_config`),
what defines a run (`run_settings`) and the evidence records of its inputs (`model_inputs`,
`training_input`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from finextract.engine.config import RunConfig
from finextract.evidence import HashCache, input_record, train_record
from finextract.records import library_versions
from finextract.report import write_report
from finextract.spec import AUTO, ExtractionSpec
from finextract.store.files import write_png
from finextract.store.folders import commit, stage, write_record

if TYPE_CHECKING:  # the result type lives with the Extractor, which imports this module
    from finextract.extraction import ExtractionResult


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
    the previous run's whole (`finextract.store.folders.commit`): a re-run with fewer images, or without
    `save_generated`, leaves none of the old ones; result.json is written atomically.

    Args:
        out: the output folder (created); check it with `finextract.store.folders.prepare` first.
        result: the extraction; its `config` (`extraction_config`), metrics and similarity histogram
            go into result.json.
        record: what only the caller knows (e.g. {"method": ...}, "run_folder":
            `finextract.store.folders.run_entry`), merged first. A cluster run's record also removes an
            earlier extract run's generation/ (only reachable with --overwrite).
        generated: every generated image, uint8 (N, H, W, 3) tensor/ndarray (or a list of arrays): the
            report shows each training image's best match among them.
        save_generated: also write them all to `generated/` (N PNGs).
        train_data: (the training images as compared, their paths), from `finextract.evaluation.evaluate_against`.

    Returns:
        `out`.
    """
    out = Path(out)
    start = time.perf_counter()
    names = [f"{rank:03d}_gen{index:05d}.png" for rank, index in enumerate(result.indices)]
    staged = {"extracted": stage(out / "extracted"), "generated": None}
    # each saved PNG's sha256: `finextract verify` checks every one, however few it regenerates
    digests = {
        f"extracted/{name}": write_png(image, staged["extracted"] / name) for name, image in zip(names, result.images)
    }
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
        "extracted_sha256": digests,
        "num_degenerate": result.num_degenerate,
        "n0_estimate": result.n0_estimate.to_dict()
        if result.n0_estimate is not None
        else result.n0_source or {"source": "given"},
        "timings": result.timings,
        "config": result.config,
    }
    if result.base_choice is not None:
        record["base_choice"] = result.base_choice
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
    if result.work:
        record["work"] = result.work
    if result.adaptive is not None:
        record["adaptive"] = result.adaptive
    if result.evidence is not None:
        record["evidence"] = result.evidence
    write_record(out, record)
    write_report(out, record, paths, train_data, generated=generated)
    return out


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


def run_settings(models: dict, spec: ExtractionSpec, config: RunConfig) -> dict:
    """What defines an extract run, as given (w, k None = the paper's defaults): its output folder
    refuses a re-run with other settings unless --overwrite (`finextract.store.folders.prepare`).

    Args:
        models: base / finetuned / lora paths (`Extractor.models`, or the CLI's options); existing
            paths are made absolute, so a re-run from another working folder matches.
        spec: the extraction (caption as given: "auto", None or the text; n0 an int or "auto").
        config: the run's `RunConfig` (its steps, scheduler and seed).

    Returns:
        A JSON-ready dict.
    """

    def where(path):
        return None if path is None else str(Path(path).resolve()) if Path(path).exists() else str(path)

    return {
        "models": {name: where(models.get(name)) for name in ("base", "finetuned", "lora")},
        "caption": spec.caption,
        "method": spec.method,
        "w": spec.w,
        "k": spec.k,
        "n0": spec.n0,
        # N not given with N0 "auto": decided at run time (50 x a recorded N0, else AUTO_NUM_IMAGES)
        "num_images": AUTO if spec.n0 == AUTO and not spec.num_images_given else spec.num_images,
        "steps": config.steps,
        "scheduler": config.scheduler,
        "seed": config.seed,
        **({} if spec.use_metadata else {"use_metadata": False}),  # absent: the default, as runs before it
        # set only when not the default, so that the settings of earlier runs still match
        **(
            {"adaptive": {"round_images": spec.round_images, "stable_rounds": spec.stable_rounds}}
            if spec.adaptive
            else {}
        ),
        **({"selection": spec.selection} if spec.selection != "size" else {}),
        **({"on_budget": spec.on_budget} if spec.on_budget != "skip" else {}),
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
