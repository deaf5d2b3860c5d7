"""`build_zoo`: the random tiny zoo, every format users download, from one seeded base (seconds)."""

from __future__ import annotations

import logging
from pathlib import Path

from safetensors.torch import save_file

from .configs import FLOW_ZOO_FAMILIES, KOHYA_METADATA, LORA_NO_ALPHA_MODULE, ZOO_CAPTION, ZOO_FAMILIES
from .flux_writers import write_flux_adapters, write_flux_transformer_file
from .models import perturbed_copy, save_pipeline, tiny_components, zoo_family_lora, zoo_lora
from .sd3_writers import write_sd3_adapters
from .writers import write_ldm_checkpoint, write_lora_diffusers, write_lora_kohya, write_lora_peft, write_sd3_checkpoint

logger = logging.getLogger(__name__)


def build_zoo(out: str | Path, seed: int = 0, families: tuple[str, ...] | None = None) -> Path:
    """Write the random tiny model zoo into `out`, deterministically from `seed` (a few seconds).

    Layout (others rely on it):
        base/                         pipeline folder (`StableDiffusionPipeline.from_pretrained` loads it)
        dreambooth/                   full pipeline folder: fine-tuned UNet and text encoder
        dreambooth_unet/              bare `unet/` + `text_encoder/` folders
        dreambooth_unet_only/         bare `unet/` folder only
        dreambooth_unet.safetensors   the fine-tuned UNet's state dict, one file
        lora/pytorch_lora_weights.safetensors   diffusers LoRA: UNet attention + 2 text-encoder layers
        lora_peft/                    the same adapters as PEFT adapter folders (UNet; text_encoder/)
        lora_kohya.safetensors        the same adapters, kohya keys, one module without `.alpha`
        caption.txt                   the fine-tuning caption
        sd2/, sd2-v/, sdxl/, altdiffusion/   the other families (`build_family_zoo`), each with its
                                      base, DreamBooth and LoRA variants (SD 1.x is the top level)
        sd3/, flux/, flux-schnell/    the flow-matching families, when asked for (`build_flow_family_zoo`)
    The fine-tune is the base perturbed by seeded noise (`perturbed_copy`); "trained" weights are
    another issue's.

    Args:
        out: folder to create or fill (existing files are overwritten).
        seed: seed of every random weight.
        families: the other zoo families to write (default all of `ZOO_FAMILIES` but "sd1"; the flow
            families of `FLOW_ZOO_FAMILIES` only when named).

    Returns:
        `out` as a Path.

    Raises:
        ValueError: an unknown family in `families`.
    """
    families = tuple(name for name in ZOO_FAMILIES if name != "sd1") if families is None else tuple(families)
    known = [*(n for n in ZOO_FAMILIES if n != "sd1"), *FLOW_ZOO_FAMILIES]
    unknown = [name for name in families if name not in known]
    if unknown:
        raise ValueError(
            f"zoo families {unknown}: expected some of {', '.join(known)} (SD 1.x is always written, at the top level)"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    logger.info("zoo: base (seed %d)", seed)
    base = tiny_components(seed, tokenizer_folder=out / "base" / "tokenizer")
    save_pipeline(base, out / "base")

    logger.info("zoo: DreamBooth variants")
    unet = perturbed_copy(base["unet"], seed + 1000)
    text_encoder = perturbed_copy(base["text_encoder"], seed + 1001)
    save_pipeline({**base, "unet": unet, "text_encoder": text_encoder}, out / "dreambooth")
    unet.save_pretrained(out / "dreambooth_unet" / "unet")
    text_encoder.save_pretrained(out / "dreambooth_unet" / "text_encoder")
    unet.save_pretrained(out / "dreambooth_unet_only" / "unet")
    state = {key: value.contiguous() for key, value in unet.state_dict().items()}
    save_file(state, str(out / "dreambooth_unet.safetensors"), metadata={"format": "pt"})

    logger.info("zoo: LoRA in diffusers, PEFT and kohya formats")
    unet_layers, text_layers = zoo_lora(base["unet"], base["text_encoder"], seed + 2000)
    write_lora_diffusers(out / "lora", unet_layers, text_layers)
    write_lora_peft(out / "lora_peft", unet_layers, text_layers)
    write_lora_kohya(out / "lora_kohya.safetensors", unet_layers, text_layers, no_alpha=(LORA_NO_ALPHA_MODULE,))
    (out / "caption.txt").write_text(ZOO_CAPTION + "\n")
    for family in families:
        logger.info("zoo: %s family", family)
        (build_flow_family_zoo if family in FLOW_ZOO_FAMILIES else build_family_zoo)(out / family, family, seed)
    return out


def build_flow_family_zoo(out: str | Path, family: str, seed: int = 0) -> Path:
    """Write one flow-matching zoo family's (`FLOW_ZOO_FAMILIES`: sd3, flux, flux-schnell) tiny random
    models into `out`:

        base/          the family's pipeline folder (`StableDiffusion3Pipeline` / `FluxPipeline` loads it)
        dreambooth/    full pipeline folder: the transformer perturbed (`perturbed_copy`), the rest the base's
        base.safetensors, dreambooth.safetensors   (SD3) Stability AI's single-file layout
                       (`write_sd3_checkpoint`): the base's transformer and VAE (as SD3's released files,
                       without text encoders), the DreamBooth transformer with the VAE and all three encoders
        lora/          (SD3) LoRA adapters on the transformer and both CLIP encoders, as
                       `StableDiffusion3Pipeline.save_lora_weights` writes them (`write_sd3_adapters`)
        caption.txt
    and for FLUX.1 (flux, flux-schnell):
        lora/, lora_kohya.safetensors, lora_xlabs.safetensors, lora_onetrainer.safetensors,
        lora_comfyui.safetensors     one set of LoRA adapters in each FLUX layout (`write_flux_adapters`)
        base.safetensors, dreambooth.safetensors   the transformers as BFL's original single files

    Raises:
        ValueError: an unknown flow zoo family.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = tiny_components(seed, tokenizer_folder=out / "base" / "tokenizer", family=family)
    save_pipeline(base, out / "base")
    tuned = perturbed_copy(base["transformer"], seed + 1000)
    save_pipeline(dict(base, transformer=tuned), out / "dreambooth")
    if family == "sd3":
        write_sd3_checkpoint(out / "base.safetensors", base["transformer"], base["vae"])
        encoders = dict(clip_l=base["text_encoder"], clip_g=base["text_encoder_2"], t5xxl=base["text_encoder_3"])
        write_sd3_checkpoint(out / "dreambooth.safetensors", tuned, base["vae"], encoders)
        write_sd3_adapters(out, base, seed + 2000)
    elif family.startswith("flux"):
        write_flux_adapters(out, base["transformer"], base["text_encoder"], seed + 2000)
        write_flux_transformer_file(out / "base.safetensors", base["transformer"])
        write_flux_transformer_file(out / "dreambooth.safetensors", tuned)
    (out / "caption.txt").write_text(ZOO_CAPTION + "\n")
    return out


def build_family_zoo(out: str | Path, family: str, seed: int = 0) -> Path:
    """Write one zoo family's tiny random models into `out` (seconds):

        base/                        the family's pipeline folder (`<Pipeline>.from_pretrained` loads it)
        dreambooth/                  full pipeline folder: fine-tuned UNet and text encoder(s)
        lora/pytorch_lora_weights.safetensors   diffusers LoRA: UNet attention + text-encoder layers
        lora_kohya.safetensors       the same adapters, kohya keys (SDXL: SGM UNet names, lora_te1_/te2_)
        lora_peft/                   (SDXL) the same adapters as PEFT adapter folders
        base.safetensors, dreambooth.safetensors   (SD 2.x, SDXL) original-layout single files; the
                                     sd2-v fine-tune carries the `v_pred` and `ztsnr` markers
        caption.txt

    Raises:
        ValueError: an unknown zoo family (`ZOO_FAMILIES`).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = tiny_components(seed, tokenizer_folder=out / "base" / "tokenizer", family=family)
    save_pipeline(base, out / "base")
    tuned = dict(base)
    for offset, part in enumerate(("unet", "text_encoder", "text_encoder_2")):
        if part in base:
            tuned[part] = perturbed_copy(base[part], seed + 1000 + offset)
    save_pipeline(tuned, out / "dreambooth")
    layers = zoo_family_lora(base, seed + 2000)
    second = layers.get("text_encoder_2")
    write_lora_diffusers(out / "lora", layers["unet"], layers["text_encoder"], second)
    write_lora_kohya(
        out / "lora_kohya.safetensors",
        layers["unet"],
        layers["text_encoder"],
        text_layers_2=second,
        unet_config=dict(base["unet"].config),
        metadata=KOHYA_METADATA.get(family),
    )
    if second is not None:
        write_lora_peft(out / "lora_peft", layers["unet"], layers["text_encoder"], second)
    if family in ("sd2", "sd2-v", "sdxl"):
        layout = "openclip" if family.startswith("sd2") else "clip"
        for name, parts, markers in (
            ("base", base, ()),
            ("dreambooth", tuned, ("v_pred", "ztsnr") if family == "sd2-v" else ()),
        ):
            write_ldm_checkpoint(
                out / f"{name}.safetensors",
                parts["unet"],
                parts["text_encoder"],
                parts["vae"],
                text_encoder_2=parts.get("text_encoder_2"),
                text_layout=layout,
                markers=markers,
            )
    (out / "caption.txt").write_text(ZOO_CAPTION + "\n")
    return out
