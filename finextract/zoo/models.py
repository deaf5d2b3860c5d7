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
    FLOW_ZOO_FAMILIES,
    LORA_ALPHA,
    LORA_ALPHA_PATTERN,
    LORA_RANK,
    LORA_RANK_PATTERN,
    TINY_FLOW_VAE_CONFIG,
    TINY_SD2_TEXT_CONFIG,
    TINY_SD2_UNET_CONFIG,
    TINY_SDXL_TEXT_CONFIG_2,
    TINY_SDXL_UNET_CONFIG,
    TINY_T5_CONFIG,
    TINY_TEXT_CONFIG,
    TINY_UNET_CONFIG,
    TINY_VAE_CONFIG,
    TINY_XLMR_TEXT_CONFIG,
    ZOO_FAMILIES,
)
from .tokenizers import write_t5_tokenizer, write_tokenizer, write_xlmr_tokenizer


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
    """Random tiny components of a zoo family (`ZOO_FAMILIES` or `FLOW_ZOO_FAMILIES`): the keyword
    arguments of the family's diffusers pipeline. UNet families: `unet`, `vae`, `text_encoder`,
    `tokenizer`, `scheduler`, and for SDXL `text_encoder_2`, `tokenizer_2`; flow families: see
    `tiny_flow_components`.

    Deterministic for a given seed (weights are drawn on the CPU generator). The tokenizer is
    written to `tokenizer_folder` (a temporary folder when None; the second and third ones beside it,
    in `<folder>_2`, `<folder>_3`) and loaded back.

    Raises:
        ValueError: an unknown `family`.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTokenizer

    if family in FLOW_ZOO_FAMILIES:
        return tiny_flow_components(seed, tokenizer_folder, family)
    if family not in ZOO_FAMILIES:
        raise ValueError(f"zoo family {family!r}: expected one of {', '.join([*ZOO_FAMILIES, *FLOW_ZOO_FAMILIES])}")
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


def _t5_encoder(tokenizer):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **TINY_T5_CONFIG,
    )
    return T5EncoderModel(config)


def tiny_flow_components(seed: int = 0, tokenizer_folder: str | Path | None = None, family: str = "sd3") -> dict:
    """Random tiny components of a flow-matching zoo family (`FLOW_ZOO_FAMILIES`: "sd3", "flux",
    "flux-schnell"), the keyword arguments of `StableDiffusion3Pipeline` / `FluxPipeline`:

    - sd3: `transformer` (`SD3Transformer2DModel`), `vae` (16 channels), `scheduler`
      (`FlowMatchEulerDiscreteScheduler`), `text_encoder` / `text_encoder_2`
      (`CLIPTextModelWithProjection`, the second with OpenCLIP's gelu and "!" padding),
      `text_encoder_3` (`T5EncoderModel`), `tokenizer`, `tokenizer_2`, `tokenizer_3` (`T5TokenizerFast`).
    - flux, flux-schnell: `transformer` (`FluxTransformer2DModel`, with / without the guidance
      embedding), `vae`, `scheduler`, `text_encoder` (`CLIPTextModel`), `text_encoder_2` (T5),
      `tokenizer`, `tokenizer_2` (T5).

    Seeds: transformer `seed`, VAE `seed + 1`, CLIP encoders `seed + 2`, `seed + 3`, T5 `seed + 4`.
    Images are 32 px (16 x 16 latents; FLUX packs them into 8 x 8 tokens of 64 values).

    Raises:
        ValueError: an unknown `family`.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTokenizer, T5TokenizerFast

    if family not in FLOW_ZOO_FAMILIES:
        raise ValueError(f"flow zoo family {family!r}: expected one of {', '.join(FLOW_ZOO_FAMILIES)}")
    name, scheduler_config, transformer_config, vae_factors = FLOW_ZOO_FAMILIES[family]
    folder = Path(tokenizer_folder or tempfile.mkdtemp(prefix="finextract-tokenizer-"))
    sibling = folder.with_name  # the second and third tokenizers live beside the first
    denoiser = get_family(name).denoiser_class_object()
    torch.manual_seed(seed)
    transformer = denoiser(**transformer_config)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**TINY_FLOW_VAE_CONFIG, **vae_factors)
    write_tokenizer(folder)
    clip_tokenizer = CLIPTokenizer.from_pretrained(folder)
    t5_folder = write_t5_tokenizer(sibling(folder.name + ("_3" if name == "sd3" else "_2")))
    t5_tokenizer = T5TokenizerFast.from_pretrained(t5_folder)
    torch.manual_seed(seed + 4)
    t5 = _t5_encoder(t5_tokenizer).eval()
    components = dict(
        transformer=transformer.eval(),
        vae=vae.eval(),
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler_config),
        tokenizer=clip_tokenizer,
    )
    torch.manual_seed(seed + 2)
    if name == "flux":
        components["text_encoder"] = _clip_text_encoder(clip_tokenizer, TINY_TEXT_CONFIG).eval()
        return dict(components, text_encoder_2=t5, tokenizer_2=t5_tokenizer)
    components["text_encoder"] = _clip_text_encoder(clip_tokenizer, TINY_TEXT_CONFIG, with_projection=True).eval()
    second = sibling(folder.name + "_2")
    write_tokenizer(second)
    tokenizer_2 = CLIPTokenizer.from_pretrained(second, pad_token="!")  # as SD3's OpenCLIP bigG tokenizer pads
    tokenizer_2.save_pretrained(second)
    torch.manual_seed(seed + 3)
    text_encoder_2 = _clip_text_encoder(tokenizer_2, TINY_SDXL_TEXT_CONFIG_2, with_projection=True).eval()
    return dict(
        components,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=t5,
        tokenizer_3=t5_tokenizer,
    )


def family_of_components(components: dict) -> str:
    """The finextract family of a component dict (`tiny_components`), from its denoiser and text encoders."""
    if "transformer" in components:
        return "sd3" if "text_encoder_3" in components else "flux"
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
    if family.flow_matching:
        options = {}
    return family.pipeline()(**components, **options)


def save_pipeline(components: dict, folder: str | Path) -> Path:
    """Save components as their family's diffusers pipeline folder (safetensors): `StableDiffusionPipeline`,
    `StableDiffusionXLPipeline`, `AltDiffusionPipeline`, `StableDiffusion3Pipeline` or `FluxPipeline`; return it."""
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
