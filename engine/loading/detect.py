"""Which format a fine-tune is, from its folder listing or file header (no weights loaded)."""

from __future__ import annotations

from pathlib import Path

from ..formats import CheckpointFormatError, not_weights_message, sniff, state_dict_keys
from ..lora_formats import detect_lora_format, refuse_sai_sd3
from .files import read_config
from .flux_file import is_flux_transformer_file

FINETUNED_FORMATS = (
    "auto",
    "pipeline",
    "unet_folder",
    "unet_file",
    "checkpoint",
    "lora",
    "lora_diffusers",
    "lora_peft",
    "lora_kohya",
    "lora_cloneofsimo",
    "lora_embedding",
    "lora_xlabs",
    "lora_onetrainer",
    "lora_bfl",
)
# detected full fine-tune formats in plain words, for "this is not a LoRA" messages
_FULL_FINETUNE_WORDS = {
    "pipeline": "a full fine-tuned (DreamBooth) pipeline folder",
    "unet_folder": "a full fine-tuned (DreamBooth) UNet folder",
    "unet_file": "a full fine-tuned (DreamBooth) UNet state dict",
    "checkpoint": "a full fine-tuned (DreamBooth) single-file checkpoint (original SD layout, or BFL's FLUX.1)",
}


def detect_finetuned_format(path: Path) -> str:
    """The fine-tune's format from its folder listing or file header (no weights loaded).

    Returns one of "pipeline", "unet_folder", "unet_file", "checkpoint" (a single-file SD
    checkpoint in the original LDM layout, or BFL's FLUX.1 transformer file), or "lora_<format>"
    (`lora_formats.LORA_FORMATS`).

    Raises:
        ValueError: nothing recognisable, with what was expected.
    """
    if path.is_file():  # sniff first: an HTML page or text file under a weights name is named as such
        kind = sniff(path)
        if kind not in ("safetensors", "pickle", "pickle-zip"):
            raise CheckpointFormatError(not_weights_message(path, kind))
    lora = detect_lora_format(path)
    if lora:
        return f"lora_{lora}"
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return "pipeline"
        if (path / "unet" / "config.json").is_file() or (path / "transformer" / "config.json").is_file():
            return "unet_folder"  # a bare denoiser folder: a UNet, or a flow family's transformer
        if (path / "config.json").is_file() and any(
            word in read_config(path).get("_class_name", "") for word in ("UNet", "Transformer2DModel")
        ):
            return "unet_folder"
        raise ValueError(
            f"{path}: not a recognised fine-tune folder (expected model_index.json, unet/config.json, "
            "adapter_config.json or pytorch_lora_weights.safetensors)"
        )
    keys = state_dict_keys(path) if sniff(path) == "safetensors" else None
    if keys is None:  # a pickle: its format is known only after loading, which allow_pickle governs
        return "unet_file"
    if any(k.startswith("model.diffusion_model.") for k in keys) or is_flux_transformer_file(keys):
        return "checkpoint"  # an original-layout SD checkpoint, or BFL's FLUX.1 transformer file
    if "conv_in.weight" in keys or "unet.conv_in.weight" in keys:
        return "unet_file"
    refuse_sai_sd3(path)  # an SD3 LoRA under Stability AI's names: refused with its format named
    raise ValueError(
        f"{path}: a safetensors file of neither a UNet, an SD checkpoint nor a LoRA (e.g. key {next(iter(keys), None)!r})"
    )


def resolve_format(ft_path: Path, finetuned_format: str, as_lora: bool) -> str:
    """The fine-tune's format: `finetuned_format` checked against what the files are, or detected."""
    fmt = finetuned_format
    if as_lora and fmt == "auto":
        fmt = "lora"
    if fmt in ("auto", "lora"):
        if fmt == "lora" and ft_path.is_file() and sniff(ft_path) in ("pickle", "pickle-zip"):
            return "lora_auto"  # a pickle's keys are known only after loading, which allow_pickle governs
        detected = detect_finetuned_format(ft_path)
        if fmt == "lora" and not detected.startswith("lora_"):
            raise ValueError(
                f"{ft_path} is {_FULL_FINETUNE_WORDS[detected]}, not a LoRA checkpoint: pass it as --finetuned "
                "(finetuned=...) instead of --lora"
            )
        return detected
    if not fmt.startswith("lora") and detect_lora_format(ft_path):
        raise ValueError(
            f"{ft_path} is a LoRA checkpoint, not a full fine-tune ({fmt}): pass it as --lora (lora=...), "
            "or leave finetuned_format='auto'"
        )
    return fmt
