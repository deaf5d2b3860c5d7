"""The `Extractor` API: load -> generate -> embed (SSCD) -> cluster -> (evaluate) -> write the output folder.

Output folder: `extracted/` (N0 PNGs), optional `generated/` (N PNGs), `generation/` (the resumable
chunks), `result.json` (everything that changes the answer, timings, metrics) and `report.html`.
What an extraction asks for is an `finextract.spec.ExtractionSpec`; what it found (`ExtractionResult`,
and `cluster_images`, the stage after generation) lives in `finextract.extraction`, scoring in
`finextract.evaluation`, the output folder and its records in `finextract.output`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from finextract.adaptive import RoundTracker
from finextract.engine.config import RunConfig, run_config
from finextract.evaluation import evaluate_against, model_resolution
from finextract.evidence import command_record, environment_record, jsonable
from finextract.extraction import ExtractionResult, cluster_images, result_of
from finextract.images import read_images
from finextract.inspection import metadata_first
from finextract.output import extraction_config, model_inputs, run_settings, training_input, write_output
from finextract.spec import AUTO, DEFAULT_PRESET, ExtractionSpec, preset_record, preset_run_options
from finextract.sscd import Embedder, embed_images, load_embedder
from finextract.store.folders import prepare, run_entry

logger = logging.getLogger(__name__)


class Extractor:
    """FineXtract end to end: `Extractor(base, finetuned).extract(caption, n0, out="run")`, or
    `.extract(spec=ExtractionSpec.resolve(caption, n0, ...), out="run")`.

    Args:
        base: pretrained model (diffusers folder or what `load_model_pair` accepts, a `LoadedBase`
            from `finextract.engine.loading.load_base` included: loaded once for many Extractors).
        finetuned: DreamBooth checkpoint (folder or single file), or None with `lora`.
        lora: LoRA weights (diffusers / PEFT / kohya), instead of `finetuned`.
        config: the `RunConfig` for every extraction (device, dtype, VAE dtype, backend, threads, batch
            size, steps, seed, cache folder); None = `RunConfig.resolve(**run_options)` with the default
            procedure preset's run settings (`finextract.spec.preset_run_options`) where not given. The default
            backend is "auto", as in the CLI: openvino on a CPU (the ONNX export of each pair is cached
            under `cache_dir`, default `~/.cache/finextract` or `$FINEXTRACT_CACHE`), torch on CUDA.
            Pass `backend="torch"` to write no export (the folder still gets `hashes.json`, the
            input files' sha256 cached for the evidence records: `finextract.evidence.HashCache`).
        embedder: "default" (sscd_disc_mixup ONNX), an SSCD TorchScript / ONNX file, or an
            `finextract.sscd.Embedder` loaded already (`load_embedder`; shared by many Extractors).
        sscd_preset: SSCD preprocessing preset ("sscd" / "paper"); None = "sscd" (a loaded Embedder keeps its own).
        allow_pickle: allow loading pickled (.bin/.ckpt) checkpoints; only for files you trust.
        budget: clustering search budget per threshold (None: `clustering.default_budget(N)`).
        base_config: for a single-file `base`, a local diffusers pipeline folder supplying its configs.
        prediction_type: "epsilon" / "v_prediction" / "sample": sample both models as this, overriding
            their scheduler configs (when they disagree; see `load_model_pair`). None: read from them.
        distilled_guidance: FLUX.1-dev's distilled guidance input (`load_model_pair`); None: the pipeline's 3.5.
        **run_options: `RunConfig.resolve` settings (device=, dtype=, backend=, steps=, ...).

    On CUDA the generated images stay on the GPU from the VAE decode through SSCD and the similarity
    matrix; only the N0 extracted images (and `generated/` when asked) are copied to the host.

    `resolution` (attribute): the side in pixels of the images the pair generates
    (`finextract.evaluation.model_resolution`), to which training images are centre-cropped and resized
    before they are scored. `inputs`: the checkpoints' evidence records (`finextract.output.model_inputs`:
    each file's path, size and sha256, hashed once per file and cached), and `call` this constructor's
    arguments: both go into every result's `evidence`.

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
        sscd_preset=None,
        allow_pickle=False,
        budget: int | None = None,
        base_config=None,
        prediction_type: str | None = None,
        distilled_guidance: float | None = None,
        **run_options,
    ):
        from finextract.engine.loading import load_model_pair  # torch and diffusers

        if finetuned is None and lora is None:
            raise ValueError("pass a fine-tuned checkpoint (finetuned=...) or LoRA weights (lora=...)")
        if isinstance(embedder, Embedder) and sscd_preset is not None:
            raise ValueError(
                "sscd_preset= applies when the Extractor loads the SSCD model; a loaded Embedder keeps its own"
            )
        self.config = run_config(
            config, **(run_options if config is not None else preset_run_options(None, **run_options))
        )
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
            distilled_guidance=distilled_guidance,
        ).place(self.config)
        if isinstance(embedder, Embedder):
            self.embedder = embedder
        else:
            self.embedder = load_embedder(
                embedder, sscd_preset=sscd_preset, device=self.config.device, threads=self.config.threads
            )
        self.load_seconds = time.perf_counter() - start
        self.finetuned_path = Path(finetuned if finetuned is not None else lora)  # its metadata: --caption/--n0 auto
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
                    "sscd_preset": sscd_preset,
                    "allow_pickle": allow_pickle,
                    "budget": budget,
                    "base_config": base_config,
                    "prediction_type": prediction_type,
                    "distilled_guidance": distilled_guidance,
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
        caption: str | None = None,
        n0: int | str | None = None,
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
        spec: ExtractionSpec | None = None,
        preset: str | None = None,
        **run_options,
    ) -> ExtractionResult:
        """Generate N images with guidance, cluster their SSCD descriptors and return N0 extracted images.

        What to extract is an `ExtractionSpec` (`spec=`), or the keywords it is built from
        (`ExtractionSpec.resolve(caption, n0, num_images=, method=, w=, k=, train=, train_as_is=, preset=)`):

        Args:
            caption: the training caption c; "auto" reads it from the fine-tune's trainer metadata
                (`finextract.inspection.metadata_first`), else recovers it from its cross-attention
                weight deltas first (`finextract.caption.recover_caption`; the caption, where it came
                from, its score and the runner-ups go into `config["caption_recovery"]` and result.json); None
                when it is unknown: then only "finextract-uncond" (Eq. 6, the default then) applies.
            n0: N0 >= 1, or "auto": the fine-tune's trainer metadata when it records N0 (`result.n0_source`),
                else estimated from the generated images' SSCD descriptors
                (`finextract.clustering.n0.estimate_n0`: the estimate, its interval and confidence go
                into `result.n0_estimate` and result.json). num_images: N (default the preset's images per
                N0 x N0, `finextract.spec.default_num_images`: 20 x N0, `preset="paper"` 50 x N0; with
                n0="auto", that x the metadata's N0, else `finextract.spec.AUTO_NUM_IMAGES`).
            method: "finextract" | "finextract-uncond" | "cfg" | "direct"; None = "finextract", or
                "finextract-uncond" when `caption` is None. w, k: guidance scale and correction
                (None: FineXtract's w is the preset's per fine-tune kind, every other the paper's).
            out: output folder to write (extracted/, generation/, result.json, report.html), or None; a
                `RunFolder` that `finextract.store.folders.prepare` checked (the CLI's) is not checked again.
            train: the real training images, to add AS / A-ESR metrics: a folder, a list of uint8
                (H, W, 3) arrays, or the (images, paths) pair `read_images` returns. They are compared
                as the fine-tune saw them: centre-cropped and resized to `self.resolution`
                (`finextract.evaluation.read_training_images`; the transform is recorded in
                `metrics["train_transform"]`).
            train_as_is: compare the training images as they are, without that crop and resize.
            preset: the procedure preset (`finextract.spec.PRESETS`: "paper", "default"; None = the
                default): its N and run settings where the keywords do not give them (see `spec`).
            spec: the `ExtractionSpec` instead of the keywords above (giving both is an error). A spec
                naming a procedure preset other than the default sets that preset's run settings
                (`finextract.spec.RUN_PRESET_SETTINGS`: steps) over the Extractor's `config`; the same
                settings given here in `**run_options` override the preset (recorded in result.json's
                `config["preset"]["overrides"]`, `finextract.spec.preset_record`). Its
                sscd_preset, when set, must be the Extractor's.
            save_generated: also write all N generated images to out/generated/.
            progress: show progress bars. label: the generation bar's text.
            recovery: keyword arguments for `finextract.caption.recover_caption` with caption="auto"
                (e.g. max_tokens=, vocabulary=); None = its defaults.
            overwrite: replace a run in `out` made with other settings (`finextract.output.run_settings`),
                its generation chunks included, instead of refusing it (`--overwrite`). A re-run with the
                same settings resumes the chunks and replaces extracted/, generated/, result.json
                and report.html whole either way.
            **run_options: settings of this extraction that differ from the Extractor's `config`
                (steps=, seed=, batch_size=, backend=, threads=, cuda_graphs=); the device and
                precisions are fixed when the models load.

        Returns:
            ExtractionResult.

        Raises:
            ValueError: invalid settings (`ExtractionSpec.resolve`, `RunConfig.resolve`), `out` is a
                file or holds another command's output or (without `overwrite`) a run with other
                settings, `train` holds no readable image, a non-square model without `train_as_is`,
                or too few usable generations (all but the last checked before generating).
            finextract.caption.CaptionRecoveryError (a ValueError): `caption="auto"` on a fine-tune that
                changes no `attn2.to_k` / `attn2.to_v` (nothing is generated).
            FileNotFoundError: `train` is not a folder.
        """
        from finextract.generation import generate

        fixed = sorted(set(run_options) & {"device", "dtype", "vae_dtype"})
        if fixed:
            raise ValueError(
                f"{', '.join(fixed)} are fixed when the Extractor loads the models; build another Extractor"
            )
        if spec is None:
            if n0 is None:
                raise ValueError("give n0 (N0 >= 1 or 'auto') and the caption, or spec=ExtractionSpec.resolve(...)")
            spec = ExtractionSpec.resolve(
                caption,
                n0,
                num_images=num_images,
                method=method,
                w=w,
                k=k,
                train=train,
                train_as_is=train_as_is,
                preset=preset,
            )
        elif train_as_is or any(value is not None for value in (caption, n0, num_images, method, w, k, train, preset)):
            raise ValueError(
                "give spec= or caption, n0, num_images, method, w, k, train, train_as_is, preset; not both"
            )
        if spec.preset != DEFAULT_PRESET:  # the default's run settings are the Extractor's config already
            run_options = preset_run_options(spec.preset, **run_options)
        config = run_config(self.config, **run_options)
        overrides = preset_record(spec, config, self.pair.kind)["overrides"]
        logger.info("preset %s (overridden: %s)", spec.preset, overrides or "nothing")
        if spec.sscd_preset is not None and spec.sscd_preset != self.embedder.sscd_preset.name:
            raise ValueError(
                f"--sscd-preset {spec.sscd_preset}: this Extractor's SSCD model uses "
                f"{self.embedder.sscd_preset.name!r}; it is fixed when the Extractor loads SSCD (Extractor(sscd_preset=...))"
            )
        caption, n0, train = spec.caption, spec.n0, spec.train
        settings = run_settings(self.models, spec, config)
        # checked once: a RunFolder the CLI checked already is passed through, and generation/ is its part
        folder = prepare(out, "extract", settings, overwrite=overwrite) if out is not None else None
        resolution = None if spec.train_as_is else self.resolution
        if train is not None and resolution is None and not spec.train_as_is:
            raise ValueError(
                "the model generates non-square images: pass train_as_is=True (--train-as-is) and crop the "
                "training images as the fine-tune saw them yourself"
            )
        given = {"caption": caption, "n0": n0}
        caption, metadata_caption, n0, n0_source = metadata_first(
            self.finetuned_path if spec.use_metadata else None,
            caption,
            n0,
            spec.num_images if spec.num_images_given else None,
        )
        if n0_source is not None:  # N0 known before generating: N follows it (50 x N0) unless given
            spec = spec.with_n0(n0)
        call = jsonable(
            {
                **given,
                "num_images": spec.num_images,
                "method": spec.method,
                "w": spec.w,
                "k": spec.k,
                "out": out,
                "train": train,
                "train_as_is": spec.train_as_is,
                "preset": spec.preset,
                "save_generated": save_generated,
                "recovery": recovery,
                **run_options,
                **{  # the adaptive and clustering fields of the spec, when not their defaults
                    name: getattr(spec, name)
                    for name in ("adaptive", "round_images", "stable_rounds", "selection", "on_budget")
                    if getattr(spec, name) != getattr(ExtractionSpec, name)
                },
            }
        )
        train_folder = Path(train) if isinstance(train, (str, Path)) else None
        if isinstance(train, (str, Path)):  # read (and so check) the training images before generating
            train = read_images(train)
        timings = {"load": self.load_seconds}
        caption_record = {"source": "given" if caption is not None else "none", "caption": caption}
        if metadata_caption is not None:
            caption_record = metadata_caption
        elif caption == AUTO:
            from finextract.caption import recover_caption

            options = {"seed": config.seed, **(recovery or {})}
            recovered = recover_caption(self.pair, progress=progress, **options)
            timings["caption"] = recovered.seconds
            caption = recovered.caption
            caption_record = {"source": "recovered", "by": "weight-delta recovery", **recovered.to_dict()}
        start = time.perf_counter()
        clustering = {"budget": self.budget, "on_budget": spec.on_budget, "selection": spec.selection}
        tracker = None
        if spec.adaptive:  # embeds and clusters at each round's end, from inside the generation
            tracker = RoundTracker(
                n0,
                spec.round_images,
                spec.num_images,
                embed=lambda batch: embed_images(self.embedder, batch, "generated"),
                clustering=clustering,
                stable_rounds=spec.stable_rounds,
            )
        generation = generate(
            self.pair,
            "" if caption is None else caption,
            spec.num_images,
            method=spec.method,
            w=spec.guidance_w(self.pair.kind),
            k=spec.k,
            config=config,
            progress=progress,
            label=label,
            images_on_device=config.is_cuda,
            out=None if folder is None else folder.part("generation", "generate"),  # resumable chunks
            overwrite=overwrite,
            until=None if tracker is None else tracker.add,
            # rounds end on chunk ends (a resumed folder keeps its manifest's chunks; then the last chunk
            # of a round may hold a few images more, generated, counted and unused)
            chunk_size=None
            if tracker is None
            else max(d for d in range(1, config.batch_size + 1) if spec.round_images % d == 0),
        )
        timings["generate"] = time.perf_counter() - start
        work = generation.work
        logger.info(
            "%d %s evaluations (%d images x %d steps x %d per step; %d computed now) in %.1f s wall, %.1f s CPU",
            work["unet_evaluations"],  # the key counts a flow family's transformer forwards too
            "UNet" if self.pair.family.denoiser == "unet" else "transformer",
            len(generation.seeds),
            work["per_image"]["steps"],
            work["per_image"]["terms"],
            work["unet_evaluations_computed"],
            work["wall_s"],
            work["cpu_s"],
        )
        images = generation.images
        if tracker is None:
            num_images = spec.num_images
            result = cluster_images(
                images, n0, self.embedder, timings=timings, precision=(config.dtype, config.vae_dtype), **clustering
            )
        else:
            num_images = tracker.rounds[-1].images  # the last chunk may hold a few more, unused
            images = images[:num_images]
            timings["rounds"] = sum(r.seconds for r in tracker.rounds)  # embedding + clustering, within "generate"
            keep = np.asarray(tracker.usable, dtype=np.int64)
            result = result_of(images, keep, tracker.descriptors, tracker.result, tracker.num_degenerate, timings)
            result.adaptive = tracker.record()
            logger.info("adaptive N: %s", result.adaptive_summary())
        result.work = work
        result.n0_source = n0_source
        sources = self.pair.sources
        if "base_candidates" in sources:
            result.base_choice = {"folder": sources["base_folder"], "chosen": sources["base"]}
            result.base_choice |= {"why": sources["base_reason"], "ranking": sources["base_candidates"]}
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
                "method": spec.method,
                "preset": preset_record(spec, config, self.pair.kind),
                "w": params.get("w"),
                "k": params.get("k"),
                "seeds": list(generation.seeds[:num_images]),
                "run": config.to_dict(),
                "manifest": generation.manifest,
            },
        )
        inputs = list(self.inputs)
        if train is not None:
            inputs.append(training_input(train, train_folder, config))
        if tracker is not None:
            result.config["adaptive"] = {key: result.adaptive[key] for key in ("round_images", "cap", "stable_rounds")}
        # always recorded (results written before the default became "modes" hold them only when not
        # "size" / "skip"; readers take an absent one as those)
        result.config["clustering"].update(selection=spec.selection, on_budget=spec.on_budget)
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
                {"method": spec.method, "caption": caption_record, "run_folder": run_entry("extract", settings)},
                generated=images,
                save_generated=save_generated,
                train_data=train_data,
            )
        return result
