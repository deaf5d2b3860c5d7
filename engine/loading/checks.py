"""Compatibility checks of a base and its fine-tune, before weights load: families, architecture
config entries, tensor names and shapes, tokenizer sizes, adapter headers and prediction types."""

from __future__ import annotations

import logging
from pathlib import Path

from ..families import Evidence, Family, adapter_evidence, check_family, detect_family
from ..formats import read_safetensors_header, sniff
from .files import read_config
from .folders import folder_family

logger = logging.getLogger(__name__)

# UNet config entries that change the architecture (sample_size and the like do not)
_UNET_ARCH_KEYS = (
    "in_channels",
    "out_channels",
    "cross_attention_dim",
    "block_out_channels",
    "layers_per_block",
    "down_block_types",
    "up_block_types",
    "mid_block_type",
    "attention_head_dim",
    "num_attention_heads",
    "transformer_layers_per_block",
    "use_linear_projection",
    "norm_num_groups",
    "addition_embed_type",
    "class_embed_type",
    "time_cond_proj_dim",
)
# vocab_size may differ: a fine-tune may add tokens (its tokenizer is then checked against it)
_TEXT_ARCH_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "projection_dim",
    "project_dim",
    # T5 (SD3, FLUX.1): its own names for the same
    "d_model",
    "d_kv",
    "d_ff",
    "num_layers",
    "num_heads",
    "feed_forward_proj",
)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class NonFiniteWeightsError(ValueError):
    """A loaded model holds NaN or Inf weights (a broken checkpoint: a diverged training, a bad conversion)."""


def nonfinite_tensors(named) -> list[tuple[str, int, int]]:
    """The tensors holding NaN or Inf among `named` ((name, tensor) pairs; integer and empty tensors skipped).

    One `torch.aminmax` per tensor (a single read, exact: NaN propagates into both, an Inf is the
    minimum or the maximum); the count is taken only for a broken tensor. Cost on one CPU core:
    about 0.2 s per GB, float32 or float16 (0.6 s for an SD 1.x UNet in float32, 3.44 GB; a float32
    sum was 0.1 s/GB but falls back to a 2.7 s/GB element check wherever float16 sums overflow):
    `FINEXTRACT_THREADS=1 python bench/bench_finite.py` (`--dtype fp16`).

    Returns:
        (name, non-finite count, element count) per broken tensor, in `named`'s order.
    """
    import torch

    broken = []
    for name, tensor in named:
        if not tensor.is_floating_point() or not tensor.numel():
            continue
        if bool(torch.isfinite(torch.stack(torch.aminmax(tensor))).all()):
            continue
        broken.append((name, int(tensor.numel() - torch.isfinite(tensor).sum()), tensor.numel()))
    return broken


def check_finite(models: dict, where: str) -> None:
    """Refuse models with NaN or Inf weights, at load time (else sampling fails at its first DDIM step).

    Args:
        models: part name ("unet", "text_encoder", "vae", "unet LoRA") -> a `torch.nn.Module` (its
            parameters and buffers) or a dict of name -> tensor; None entries are skipped.
        where: how to name the file or folder in the message ("fine-tune /path").

    Raises:
        NonFiniteWeightsError: naming `where`, the part and tensor, and how many values are NaN/Inf.
    """
    broken = []
    for part, model in models.items():
        if model is None:
            continue
        named = model.items() if isinstance(model, dict) else [*model.named_parameters(), *model.named_buffers()]
        broken += [(f"{part} {name}", count, total) for name, count, total in nonfinite_tensors(named)]
    if broken:
        listed = "; ".join(f"{name} ({count} of {total} values)" for name, count, total in broken[:3])
        raise NonFiniteWeightsError(
            f"{where}: {len(broken)} tensor(s) hold NaN or Inf: {listed}. The checkpoint is broken (a training that "
            "diverged, or a conversion that overflowed): get an intact copy of it"
        )


class PredictionTypeMismatchError(ValueError):
    """Base and fine-tune predict different quantities (epsilon / v / x0), so their outputs cannot be mixed."""


def _norm(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def check_unet_configs(base: dict, finetuned: dict, where: str = "fine-tuned UNet") -> None:
    """Compare the architecture entries of two UNet configs.

    Args:
        base, finetuned: `config.json` contents (diffusers `UNet2DConditionModel`).
        where: how to name the fine-tuned side in the message.

    Raises:
        FamilyMismatchError: the two configs are of different families (names both, with their
            cross-attention widths).
        ValueError: another entry differs; the message names every differing entry.
    """
    if "Transformer" in str(base.get("_class_name", "")):  # a flow family's transformer: every entry is architecture
        _compare_configs(base, finetuned, sorted(k for k in {*base, *finetuned} if not k.startswith("_")), where)
        return
    base_family, ft_family = detect_family(base, where="the base"), detect_family(finetuned, where=where)
    check_family(
        base_family,
        base.get("cross_attention_dim"),
        config_evidence(ft_family, finetuned),
        f"the {where}",
        "pass the base model the fine-tune was trained from",
        relation="is",
    )
    problems = []
    for key in _UNET_ARCH_KEYS:
        a, b = _norm(base.get(key)), _norm(finetuned.get(key))
        if a != b:
            problems.append(f"{where} has {key} {b}, base has {a}")
    if problems:
        raise ValueError("incompatible base and fine-tune: " + "; ".join(problems))


def config_evidence(family: Family, unet_config: dict) -> Evidence:
    """The family evidence of a UNet config (for `check_family` messages)."""
    return Evidence(family, unet_config.get("cross_attention_dim"), "its configs")


def check_text_configs(base: dict, finetuned: dict, where: str = "fine-tuned text encoder") -> None:
    """Like `check_unet_configs` for CLIP and T5 text-encoder configs. `vocab_size` is not compared: a
    fine-tune may add tokens, and `load_model_pair` checks it against the fine-tune's tokenizer."""
    _compare_configs(base, finetuned, _TEXT_ARCH_KEYS, where)


def _compare_configs(base: dict, finetuned: dict, keys, where: str) -> None:
    """Raise ValueError naming every entry of `keys` in which the two configs differ."""
    problems = [
        f"{where} has {k} {finetuned.get(k)}, base has {base.get(k)}" for k in keys if base.get(k) != finetuned.get(k)
    ]
    if problems:
        raise ValueError("incompatible base and fine-tune: " + "; ".join(problems))


def check_state_dict(expected: dict, found: dict, where: str) -> None:
    """Compare tensor names and shapes (name -> shape tuples).

    Raises:
        ValueError: naming the count and first few missing, unexpected and mis-shaped tensors.
    """
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [
        f"{k} {tuple(found[k])} vs base {tuple(expected[k])}"
        for k in sorted(set(expected) & set(found))
        if tuple(found[k]) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} base tensor(s) missing, e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[:3]}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es), e.g. {shapes[:3]}")
    if problems:
        raise ValueError(f"{where} does not match the base UNet: " + "; ".join(problems))


def tokenizer_fits(entries: int, rows: int, model_type: str) -> bool:
    """A tokenizer of `entries` feeds an embedding of `rows`: equal, or (T5, whose rows are padded to a
    multiple of 128 beyond its tokenizer's 32,100 entries) not more entries than rows."""
    return entries == rows or (model_type in ("t5", "umt5") and entries <= rows)


def check_tokenizer(tokenizer, text_encoder, where: str) -> None:
    """The tokenizer must have one entry per token-embedding row of the text encoder it feeds (T5's rows are
    padded to a multiple of 128 beyond its tokenizer's 32,100 entries: there the tokenizer must fit in them)."""
    rows = text_encoder.get_input_embeddings().num_embeddings
    if not tokenizer_fits(len(tokenizer), rows, getattr(text_encoder.config, "model_type", "")):
        raise ValueError(
            f"{where}: the text encoder has {rows} token-embedding rows but the tokenizer has {len(tokenizer)} entries; "
            "a fine-tune that adds tokens (e.g. a DreamBooth identifier) must ship its tokenizer/ and text_encoder/ "
            "folders together"
        )


def adapter_headers(path: Path) -> tuple[dict, dict]:
    """(tensor name -> shape, metadata) of an adapter's safetensors files, from headers only: the file, a
    diffusers folder's `pytorch_lora_weights.safetensors`, or a PEFT folder's `adapter_model.safetensors`
    files (their keys prefixed by the component folder, e.g. `text_encoder_2.`); empty for pickles."""
    files = []
    if path.is_file():
        files = [("", path)]
    elif path.is_dir():
        files = [("", path / "pytorch_lora_weights.safetensors")]
        files += [
            (f"{sub}." if sub else "", path / sub / "adapter_model.safetensors")
            for sub in ("", "unet", "text_encoder", "text_encoder_2")
        ]
    shapes, metadata = {}, {}
    for prefix, file in files:
        if file.is_file() and sniff(file) == "safetensors":
            header, meta = read_safetensors_header(file)
            shapes.update({prefix + key: tuple(info["shape"]) for key, info in header.items()})
            metadata.update(meta)
    return shapes, metadata


def check_adapter_family(path: Path, family: Family, unet_config: dict) -> None:
    """Refuse an adapter whose metadata, components or shapes say another family (headers only)."""
    evidence = adapter_evidence(*adapter_headers(path))
    check_family(
        family,
        unet_config.get("cross_attention_dim"),
        evidence,
        f"the LoRA {path}",
        f"pass the {evidence.family.label if evidence.family else 'matching'} base model it was trained on",
    )


def agreed_scheduler(base: dict, finetuned, override: str | None, sources: dict) -> dict:
    """The scheduler config the pair samples with: the base's, with one prediction type both sides
    agree on (or `override`).

    Args:
        base: the base's scheduler config (markers applied).
        finetuned: (config, where it came from) of the fine-tune, or None when it ships none.
        override: the deliberate `prediction_type`, or None.
        sources: `sources["prediction_type"]` records {"base", "finetuned", "used", "override"}.

    Raises:
        PredictionTypeMismatchError: the two sides differ and there is no override.
    """
    if base.get("_class_name") == "FlowMatchEulerDiscreteScheduler":  # flow matching: the velocity, no choice
        if override is not None:
            raise ValueError(
                f"--prediction-type {override}: the model is a flow-matching model (SD3 / FLUX.1), which predicts the "
                "velocity; leave --prediction-type out"
            )
        sources["prediction_type"] = {"base": "flow", "finetuned": "flow" if finetuned else None, "used": "flow"}
        sources["prediction_type"]["override"] = False
        return dict(base)
    said_base = base.get("prediction_type", "epsilon")
    said_ft = finetuned[0].get("prediction_type", "epsilon") if finetuned else None
    record = {"base": said_base, "finetuned": said_ft, "used": override or said_base, "override": override is not None}
    sources["prediction_type"] = record
    if override is None and said_ft is not None and said_ft != said_base:
        raise PredictionTypeMismatchError(
            f"prediction-type mismatch: the base's scheduler says {said_base!r} ({sources.get('base')}) but the "
            f"fine-tune's says {said_ft!r} ({finetuned[1]}); the guidance rule mixes their outputs, so both must predict "
            f"the same quantity. If one of them is wrong, pass --prediction-type {said_ft} (or {said_base}) "
            "(prediction_type=...) to sample both with that one"
        )
    if (override is not None and override != said_base) or (override and said_ft and override != said_ft):
        logger.warning(
            "sampling with prediction_type %s (--prediction-type): the base says %s%s",
            override,
            said_base,
            f", the fine-tune says {said_ft}" if said_ft else "",
        )
    return dict(base, prediction_type=override or said_base)


def check_folder_configs(base_path: Path, ft_path: Path, fmt: str, family: Family) -> None:
    """Family, config and tokenizer checks of a folder fine-tune against a base folder, before any weights load."""
    base_unet_config = read_config(base_path / family.denoiser)
    ft_unet_dir, ft_family = None, None
    if fmt in ("pipeline", "unet_folder") and ft_path.is_dir():
        ft_family, _ = folder_family(ft_path, f"fine-tune {ft_path}")
    if fmt == "pipeline" or (fmt == "unet_folder" and (ft_path / ft_family.denoiser).is_dir()):
        ft_unet_dir = ft_path / ft_family.denoiser
    elif fmt == "unet_folder":
        ft_unet_dir = ft_path
    if ft_unet_dir is not None:
        if ft_path.is_dir() and ft_unet_dir != ft_path:
            check_family(
                family,
                base_unet_config.get("cross_attention_dim"),
                config_evidence(ft_family, read_config(ft_unet_dir)),
                f"the fine-tune {ft_path}",
                "pass the base model the fine-tune was trained from",
                relation="is",
            )
        check_unet_configs(base_unet_config, read_config(ft_unet_dir))
    if fmt not in ("pipeline", "unet_folder"):
        return
    for name, tokenizer_name in zip(family.text_encoders, family.tokenizers):
        if name in family.optional_text_encoders and not (base_path / name).is_dir():
            continue  # the base runs without it (SD3 without T5)
        ft_text_dir = ft_path / name
        text_config = read_config(ft_text_dir if ft_text_dir.is_dir() else base_path / name)
        base_text_config = read_config(base_path / name)
        if ft_text_dir.is_dir():
            check_text_configs(base_text_config, text_config, f"fine-tuned {name}")
        folder = ft_path / tokenizer_name
        tokenizer_dir = folder if (folder / "tokenizer_config.json").is_file() else None
        if tokenizer_dir is None and text_config.get("vocab_size") == base_text_config.get("vocab_size"):
            continue
        index = family.tokenizers.index(tokenizer_name)
        tokenizer = family.tokenizer_class_object(index).from_pretrained(
            str(tokenizer_dir or base_path / tokenizer_name)
        )
        if not tokenizer_fits(len(tokenizer), text_config.get("vocab_size"), text_config.get("model_type", "")):
            which = "its own" if tokenizer_dir else "the base's: the fine-tune ships none"
            raise ValueError(
                f"fine-tune {ft_path}: the {name} has {text_config.get('vocab_size')} token-embedding rows "
                f"but the {tokenizer_name} ({which}) has {len(tokenizer)} entries; a fine-tune that adds tokens (e.g. "
                f"a DreamBooth identifier) must ship its {tokenizer_name}/ and {name}/ folders together"
            )
