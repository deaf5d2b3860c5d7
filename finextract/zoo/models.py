"""Random tiny models: a family's components, its diffusers pipeline, perturbed fine-tunes and
random LoRA adapters."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch

from finextract.engine.families import get_family
from finextract.engine.pair import LoRALayer

from .configs import (
    LORA_ALPHA,
    LORA_ALPHA_PATTERN,
    LORA_RANK,
    LORA_RANK_PATTERN,
    TINY_SD2_TEXT_CONFIG,
    TINY_SD2_UNET_CONFIG,
    TINY_SDXL_TEXT_CONFIG_2,
    TINY_SDXL_UNET_CONFIG,
    TINY_TEXT_CONFIG,
    TINY_UNET_CONFIG,
    TINY_VAE_CONFIG,
    TINY_XLMR_TEXT_CONFIG,
    ZOO_FAMILIES,
)
from .tokenizers import write_tokenizer, write_xlmr_tokenizer


def _clip_text_encoder(tokenizer, config: dict, with_projection: bool = False):
    # heavy: transformers and diffusers take seconds; loaded when a tiny model is built
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **config,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(text_config)


def tiny_components(seed: int = 0, tokenizer_folder: str | Path | None = None, family: str = "sd1") -> dict:
    """Random tiny components of a zoo family (`ZOO_FAMILIES`): `unet`, `vae`, `text_encoder`,
    `tokenizer`, `scheduler`, and for SDXL `text_encoder_2`, `tokenizer_2`: the keyword arguments of
    the family's diffusers pipeline.

    Deterministic for a given seed (weights are drawn on the CPU generator). The tokenizer is
    written to `tokenizer_folder` (a temporary folder when None; SDXL's second one beside it, in
    `<folder>_2`) and loaded back.

    Raises:
        ValueError: an unknown `family`.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTokenizer

    if family not in ZOO_FAMILIES:
        raise ValueError(f"zoo family {family!r}: expected one of {', '.join(ZOO_FAMILIES)}")
    name, scheduler_config = ZOO_FAMILIES[family]
    if tokenizer_folder is None:
        tokenizer_folder = tempfile.mkdtemp(prefix="finextract-tokenizer-")
    tokenizer_folder = Path(tokenizer_folder)
    if name == "altdiffusion":
        from transformers import XLMRobertaTokenizer

        tokenizer = XLMRobertaTokenizer.from_pretrained(write_xlmr_tokenizer(tokenizer_folder))
    else:
        write_tokenizer(tokenizer_folder)
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_folder)
    unet_config = {"sd2": TINY_SD2_UNET_CONFIG, "sdxl": TINY_SDXL_UNET_CONFIG}.get(name, TINY_UNET_CONFIG)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    torch.manual_seed(seed + 2)
    extra = {}
    if name == "altdiffusion":
        from diffusers.pipelines.deprecated.alt_diffusion.modeling_roberta_series import (
            RobertaSeriesConfig,
            RobertaSeriesModelWithTransformation,
        )

        text_encoder = RobertaSeriesModelWithTransformation(
            RobertaSeriesConfig(vocab_size=len(tokenizer), **TINY_XLMR_TEXT_CONFIG)
        )
    else:
        text_encoder = _clip_text_encoder(tokenizer, TINY_SD2_TEXT_CONFIG if name == "sd2" else TINY_TEXT_CONFIG)
    if name == "sdxl":
        second = tokenizer_folder.with_name(tokenizer_folder.name + "_2")
        write_tokenizer(second)
        tokenizer_2 = CLIPTokenizer.from_pretrained(second, pad_token="!")  # as SDXL's OpenCLIP tokenizer pads
        tokenizer_2.save_pretrained(second)
        torch.manual_seed(seed + 3)
        extra = dict(
            text_encoder_2=_clip_text_encoder(tokenizer_2, TINY_SDXL_TEXT_CONFIG_2, with_projection=True).eval(),
            tokenizer_2=tokenizer_2,
        )
    scheduler = DDIMScheduler.from_config(scheduler_config)
    return dict(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        scheduler=scheduler,
        **extra,
    )


def family_of_components(components: dict) -> str:
    """The finextract family of a component dict (`tiny_components`), from its text encoders."""
    if "text_encoder_2" in components:
        return "sdxl"
    if type(components["text_encoder"]).__name__ == "RobertaSeriesModelWithTransformation":
        return "altdiffusion"
    return "sd2" if components["unet"].config.use_linear_projection else "sd1"


def diffusers_pipeline(components: dict):
    """The family's diffusers pipeline on `components` (no safety checker, no watermark)."""
    family = get_family(family_of_components(components))
    options = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if family.name == "sdxl":
        options = dict(force_zeros_for_empty_prompt=True, add_watermarker=False)
    return family.pipeline()(**components, **options)


def save_pipeline(components: dict, folder: str | Path) -> Path:
    """Save components as their family's diffusers pipeline folder (safetensors): `StableDiffusionPipeline`,
    `StableDiffusionXLPipeline` or `AltDiffusionPipeline`; return it."""
    diffusers_pipeline(components).save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def build_base(folder: str | Path, seed: int = 0) -> Path:
    """Write a random tiny base pipeline folder that `StableDiffusionPipeline.from_pretrained` loads."""
    folder = Path(folder)
    return save_pipeline(tiny_components(seed, tokenizer_folder=folder / "tokenizer"), folder)


_UNET_LORA_TARGETS = (".to_q", ".to_k", ".to_v", ".to_out.0")
# CLIP's first layer (transformers 5 names it `encoder.layers...`, older ones `text_model.encoder...`),
# and XLM-R's (AltDiffusion)
_TEXT_LORA_TARGETS = (
    "encoder.layers.0.self_attn.q_proj",
    "encoder.layers.0.self_attn.v_proj",
    "encoder.layer.0.attention.self.query",
    "encoder.layer.0.attention.self.value",
)
# SDXL's second text encoder: its first layer and the pooled projection (`text_projection`)
_TEXT_2_LORA_TARGETS = ("encoder.layers.0.self_attn.q_proj", "encoder.layers.0.self_attn.v_proj", "text_projection")


def perturbed_copy(model, seed: int, relative_scale: float = 0.05):
    """A deep copy of `model` with every parameter moved by seeded Gaussian noise.

    The noise on a tensor has standard deviation `relative_scale` times the tensor's own (0.01 for
    constant tensors), so a "fine-tune" differs from its base everywhere, deterministically.
    """
    generator = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in model.parameters():
            spread = parameter.std().item() if parameter.numel() > 1 else 0.0
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
            parameter += (relative_scale * (spread or 0.2) * noise).to(parameter.dtype)
    return model


def _random_adapters(model, names, generator) -> dict:
    layers = {}
    modules = dict(model.named_modules())
    for name in names:
        module = modules[name]
        rank = LORA_RANK_PATTERN.get(name, LORA_RANK)
        down = torch.randn(rank, module.in_features, generator=generator) * 0.1
        up = torch.randn(module.out_features, rank, generator=generator) * 0.1
        layers[name] = LoRALayer(down=down, up=up, alpha=LORA_ALPHA_PATTERN.get(name, LORA_ALPHA))
    return layers


def zoo_lora(unet, text_encoder, seed: int = 0) -> tuple[dict, dict]:
    """The zoo's random LoRA adapters: (UNet layers, text-encoder layers), module path -> LoRALayer.

    UNet: every attention projection (to_q, to_k, to_v, to_out.0), rank 4, alpha 8, except the
    modules in `LORA_RANK_PATTERN` / `LORA_ALPHA_PATTERN`. Text encoder: the first layer's query and
    value projections (CLIP's q_proj / v_proj, XLM-R's query / value). Deterministic for a seed;
    every format the zoo writes holds exactly these adapters.
    """
    generator = torch.Generator().manual_seed(seed)
    unet_names = [
        name for name, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and name.endswith(_UNET_LORA_TARGETS)
    ]
    text_names = [name for name, _ in text_encoder.named_modules() if name.endswith(_TEXT_LORA_TARGETS)]
    return _random_adapters(unet, unet_names, generator), _random_adapters(text_encoder, text_names, generator)


def zoo_family_lora(components: dict, seed: int = 0) -> dict[str, dict]:
    """`zoo_lora` for a family's components: component ("unet", "text_encoder", SDXL's
    "text_encoder_2": its first layer's q_proj / v_proj and its `text_projection`) -> module path -> LoRALayer."""
    unet_layers, text_layers = zoo_lora(components["unet"], components["text_encoder"], seed)
    layers = {"unet": unet_layers, "text_encoder": text_layers}
    if "text_encoder_2" in components:
        model = components["text_encoder_2"]
        names = [name for name, _ in model.named_modules() if name.endswith(_TEXT_2_LORA_TARGETS)]
        layers["text_encoder_2"] = _random_adapters(model, names, torch.Generator().manual_seed(seed + 1))
    return layers
