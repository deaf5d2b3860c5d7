"""`load_model_pair`: a base and its fine-tune, checked against each other, into a `ModelPair`.

Order of work: resolve both paths, detect the fine-tune's format, compare configs and state-dict
keys/shapes (cheap: JSON files and safetensors headers), and only then load weights: the base
(`base`), then the fine-tune by its format (`finetunes.LOADERS`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..embeddings import EmbeddingError, add_embeddings, read_embedding_file
from ..families import Family
from ..flux import record_distilled_guidance
from ..formats import check_weights_file
from ..pair import ModelPair
from ..quiet import logged_load
from .base import LoadedBase, base_parts, to_dtype
from .checks import PREDICTION_TYPES, agreed_scheduler, check_adapter_family, check_finite, check_folder_configs
from .detect import FINETUNED_FORMATS, resolve_format
from .files import read_config, resolve_path
from .finetunes import finetuned_models, load_finetune
from .folders import folder_family
from .parents import choice_sources, choose_base, is_bases_folder

logger = logging.getLogger(__name__)


@logged_load("model pair")
def load_model_pair(
    base: str | Path,
    finetuned: str | Path | None = None,
    *,
    lora: str | Path | None = None,
    embeddings: list[str | Path] | tuple = (),
    finetuned_format: str = "auto",
    allow_pickle: bool = False,
    dtype=None,
    device: str = "cpu",
    base_config: str | Path | None = None,
    prediction_type: str | None = None,
    distilled_guidance: float | None = None,
) -> ModelPair:
    """Load a pretrained model (theta) and a checkpoint fine-tuned from it (theta'), of any family
    (SD 1.x, SD 2.x, SDXL, AltDiffusion, SD3: `finextract.engine.families`; SD3 from diffusers folders).

    Args:
        base: a diffusers pipeline folder, a folder of candidate bases (its pipeline folders and
            `.safetensors` / `.ckpt` files: the fine-tune's parent is chosen, `parents.choose_base`, and
            `sources["base_candidates"]` records the ranking, `"base_folder"` the folder and
            `"base_reason"` why its first was chosen), a single-file checkpoint in the original layout
            (`.safetensors`; `.ckpt` with `allow_pickle`) with `base_config`, or a hub id found in
            the local Hugging Face cache, or a `LoadedBase` (`load_base`: loaded once for many
            fine-tunes; `base_config` is then not read).
        finetuned: the fine-tune: a full pipeline folder (its own tokenizers when it ships them), a
            bare `unet/` folder (with or without text encoders), a single-file UNet state dict, a
            single-file original-layout checkpoint (its missing text encoders / VAE taken from the
            base), or any adapter `lora` accepts. None when `lora` is given.
        lora: an adapter checkpoint: LoRA / LoCon / DoRA, LoHa, LoKr, OFT, OFTv2, BOFT, GLoRA, full
            diff (kohya / LyCORIS, diffusers, PEFT, cloneofsimo layouts; SDXL's `lora_te1_` /
            `lora_te2_` / `text_encoder_2.` too), or a textual-inversion embedding file (see
            `lora_formats`).
        embeddings: textual-inversion embedding files added to the fine-tune's tokenizer and text
            encoder (`.safetensors`; pickles with `allow_pickle`; not for SDXL).
        finetuned_format: "auto" or one of `FINETUNED_FORMATS` ("lora" = any adapter layout).
        allow_pickle: allow pickle weights, read with `torch.load(weights_only=True)`.
        dtype: torch dtype (or "fp32"/"fp16"/"bf16") to cast every model to; None keeps float32.
        device: where the models go ("cpu", "cuda", "cuda:N").
        base_config: a local diffusers pipeline folder whose configs, tokenizer and scheduler
            describe a single-file base (of the same family).
        prediction_type: "epsilon", "v_prediction" or "sample" to sample with, overriding what the
            base's and the fine-tune's scheduler configs (and `v_pred` markers) say, e.g. when one
            of them is wrong. None: they must agree.
        distilled_guidance: FLUX.1-dev's distilled guidance value, the same input to both guidance terms
            (`finextract.engine.flux`); None: `FluxPipeline`'s default 3.5. Recorded in
            `sources["distilled_guidance"]`; refused for models without the guidance embedding.

    Returns:
        ModelPair: `family` detected from the base's configs; kind "dreambooth" (two UNets; the
        checkpoint's text encoders and tokenizers when it ships them) or "lora" (an adapter: LoRA /
        LoCon as `unet_lora` low-rank adapters on the base UNet; any other type merged into
        `finetuned_unet`, a copy of the base UNet; text-encoder adapters and embeddings in copies of
        the base text encoders, embeddings' tokens in `finetuned_tokenizer`). `sources` records
        paths, formats, `family`, `prediction_type` (what each side said and what is used),
        `lora_counts` (per component and adapter type), `lora_alpha_assumed`, `unet_adapters` (how
        they run), `embedding_tokens` and the adapter file's sha256.

    Raises:
        FileNotFoundError: a path does not exist; a hub id is not in the local cache ("offline").
        UnknownFamilyError: a base (or fine-tune) of no supported family (a DiT, an inpainting or
            refiner UNet...), naming what it is.
        FamilyMismatchError: a fine-tune or adapter of another family than the base (names both).
        PredictionTypeMismatchError: base and fine-tune predict different quantities (names which
            side says what, and `prediction_type` as the deliberate override).
        NonFiniteWeightsError: NaN or Inf weights in the base or the fine-tune (naming the file, the
            part and the tensor; `checks.check_finite`).
        ValueError: incompatible base and fine-tune (names what differs), a tokenizer without one
            entry per text-encoder row (naming both numbers), unknown format or prediction type, an
            adapter key that matches no module (`LoRAKeyError`), a file that is not weights
            (`CheckpointFormatError`: HTML, git-lfs pointer, text, truncated, a misnamed pickle), a
            refused pickle (`PickleRefusedError`), a partial single-file UNet (naming the missing tensors).
    """
    if finetuned is not None and lora is not None:
        raise ValueError("pass the fine-tune as `finetuned` or as `lora`, not both")
    if finetuned is None and lora is None:
        raise ValueError("no fine-tuned checkpoint: pass `finetuned` (a DreamBooth folder/file or a LoRA) or `lora`")
    if finetuned_format not in FINETUNED_FORMATS:
        raise ValueError(f"finetuned_format {finetuned_format!r}: expected one of {', '.join(FINETUNED_FORMATS)}")
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type {prediction_type!r} (--prediction-type): expected one of {', '.join(PREDICTION_TYPES)}"
        )
    torch_dtype = to_dtype(dtype)
    ft_path = resolve_path(finetuned if finetuned is not None else lora, "fine-tuned checkpoint")
    embedding_paths = [resolve_path(path, "embedding") for path in embeddings]
    fmt = resolve_format(ft_path, finetuned_format, lora is not None)
    # 1. cheap checks on configs and headers before loading weights
    base_path = resolve_path(base, "base")
    ranking = None
    if not isinstance(base, LoadedBase) and is_bases_folder(base_path):  # candidates: pick the parent
        folder = base_path
        base_path, ranking = choose_base(ft_path, folder, adapter=fmt.startswith("lora_"))
        logger.info("base %s chosen among the candidates in %s (%s)", base_path, folder, ranking[0].reason())
        base = base_path
    if base_path.is_file():
        check_weights_file(base_path, "base")
    if base_path.is_dir() and any((base_path / d / "config.json").is_file() for d in ("unet", "transformer")):
        family, _ = folder_family(base_path, f"base {base_path}")
        check_folder_configs(base_path, ft_path, fmt, family)
        if fmt.startswith("lora_"):
            check_adapter_family(ft_path, family, read_config(base_path / family.denoiser))
    # 2. the base
    parts, sources = base_parts(base, base_config, allow_pickle)
    family: Family = parts["family"]
    sources.update(finetuned=str(ft_path), finetuned_format=fmt, family=family.name)
    if ranking is not None:
        sources.update(choice_sources(folder, ranking))
    # 3. the fine-tune, by its format
    tune = load_finetune(ft_path, fmt, parts, sources, allow_pickle=allow_pickle, shared=isinstance(base, LoadedBase))
    check_finite(finetuned_models(tune, parts), f"fine-tune {ft_path}")
    if tune.kind == "dreambooth":
        for name in family.text_encoders:
            sources[name] = "finetuned" if tune.texts[name] is not parts[name] else "base"
    scheduler_config = agreed_scheduler(parts["scheduler_config"], tune.scheduler, prediction_type, sources)
    # 4. textual-inversion embeddings: the adapter file's and the ones passed
    found_embeddings = tune.embeddings
    for path in embedding_paths:
        found_embeddings = found_embeddings + read_embedding_file(path, allow_pickle=allow_pickle)
    if embedding_paths:
        sources["embedding_files"] = [str(path) for path in embedding_paths]
    if found_embeddings:
        if family.name == "sdxl":
            raise EmbeddingError(
                f"textual-inversion embeddings ({found_embeddings[0].source}) on an SDXL base: SDXL embeddings "
                "(clip_l + clip_g) are not supported here; leave them out"
            )
        tune.tokenizers["tokenizer"], tune.texts["text_encoder"] = add_embeddings(
            tune.tokenizers["tokenizer"], tune.texts["text_encoder"], found_embeddings
        )
        sources["embedding_tokens"] = [e.token for e in found_embeddings]
        sources["tokenizer"] = "finetuned"
    pair = ModelPair(
        kind=tune.kind,
        base_unet=tune.base_unet,
        finetuned_unet=tune.unet,
        unet_lora=tune.unet_lora,
        base_text_encoder=parts["text_encoder"],
        finetuned_text_encoder=tune.texts["text_encoder"],
        base_tokenizer=parts["tokenizer"],
        finetuned_tokenizer=tune.tokenizers["tokenizer"],
        vae=tune.vae,
        scheduler_config=scheduler_config,
        sources=sources,
        family=family,
        base_text_encoder_2=parts.get("text_encoder_2"),
        finetuned_text_encoder_2=tune.texts.get("text_encoder_2"),
        base_tokenizer_2=parts.get("tokenizer_2"),
        finetuned_tokenizer_2=tune.tokenizers.get("tokenizer_2"),
        force_zeros_for_empty_prompt=parts["force_zeros_for_empty_prompt"],
        base_text_encoder_3=parts.get("text_encoder_3"),
        finetuned_text_encoder_3=tune.texts.get("text_encoder_3"),
        base_tokenizer_3=parts.get("tokenizer_3"),
        finetuned_tokenizer_3=tune.tokenizers.get("tokenizer_3"),
    )
    record_distilled_guidance(pair, distilled_guidance)
    if torch_dtype is None and str(device) == "cpu":
        return pair  # loaded on the CPU in float32 already
    return pair.to(device, torch_dtype)
