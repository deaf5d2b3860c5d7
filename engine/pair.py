"""The model pair FineXtract needs: a pretrained model (theta) and its fine-tune (theta').

A pair is prepared once, when it is built: a LoRA pair's adapters are attached to its base UNet as
gated forward hooks (off unless a denoiser turns them on per sample), and `to()` puts every model on its
device, precision and, on CUDA, its fast layout. Nothing downstream (denoisers, backends, the loop)
changes a pair, so any number of backends can be built from one pair in one process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import torch

from .families import get_family
from .fingerprint import pair_fingerprint
from .lora import LoRALayer, inject_lora

__all__ = ["LoRALayer", "ModelPair", "prepare_unet_for_cuda"]


@dataclass
class ModelPair:
    """A pretrained model and a checkpoint fine-tuned from it, ready for guided sampling.

    `eps_base` uses `base_unet` with `base_text_encoder`; `eps_ft` uses the fine-tuned UNet
    (`finetuned_unet`, or `base_unet` with `unet_lora` applied) with `finetuned_text_encoder`
    (the checkpoint's own when it has one, else the pretrained one).

    Attributes:
        kind: what was fine-tuned, which selects the method's defaults: "dreambooth" (a full
            fine-tune) or "lora" (an adapter of any type). How it runs follows from the fields below:
            two UNets when `finetuned_unet` is set (DreamBooth, or an adapter merged into a copy of
            the base), one UNet with per-sample low-rank branches when `unet_lora` is set.
        base_unet: the pretrained denoiser: `diffusers.UNet2DConditionModel`, or the flow families'
            transformer (`SD3Transformer2DModel`, `FluxTransformer2DModel`); "UNet" below means either.
        finetuned_unet: the fine-tuned UNet (DreamBooth, or a merged adapter); None with `unet_lora`.
        unet_lora: low-rank adapters keyed by module path in `base_unet`, applied per sample; None
            with `finetuned_unet`.
        base_text_encoder: `transformers.CLIPTextModel` of the pretrained model.
        finetuned_text_encoder: the fine-tune's text encoder (LoRA merged in when the LoRA file
            adapts it); the same object as `base_text_encoder` when the checkpoint has none.
        base_tokenizer: the pretrained model's tokenizer (`transformers.CLIPTokenizer`; AltDiffusion's
            `XLMRobertaTokenizer`), for `eps_base`.
        finetuned_tokenizer: the fine-tune's own tokenizer (for `eps_ft`; it may add tokens such as a
            DreamBooth identifier or textual-inversion embeddings); None means `base_tokenizer`.
        vae: `diffusers.AutoencoderKL` of the pretrained model (the fine-tune's if it ships one).
        scheduler_config: the model's own scheduler config (dict, diffusers format).
        sources: where each part came from, file formats, hashes, and loading notes.
        family: the model family (`finextract.engine.families`: "sd1", "sd2", "sdxl",
            "altdiffusion", or a `Family`); stored as a `Family`. It says which text encoders the
            pair has and which conditioning its UNets read.
        base_text_encoder_2, finetuned_text_encoder_2: SDXL's second text encoder
            (`CLIPTextModelWithProjection`, OpenCLIP bigG: its penultimate states and pooled
            projection); the fine-tune's defaults to the base's. None for the other families.
        base_tokenizer_2, finetuned_tokenizer_2: SDXL's second tokenizer; the fine-tune's defaults
            to the base's. (FLUX.1: the T5 encoder and its tokenizer.)
        base_text_encoder_3, finetuned_text_encoder_3, base_tokenizer_3, finetuned_tokenizer_3: SD3's T5
            encoder (`T5EncoderModel`) and tokenizer; None for the other families, and for an SD3 run
            without T5 (its pipeline then uses zeros in T5's place).
        force_zeros_for_empty_prompt: SDXL's pipeline option (`model_index.json`): the empty caption
            is encoded as zeros (embeddings and pooled embedding), as `StableDiffusionXLPipeline`
            does for its unconditional half. None: the family's default (True for SDXL, False otherwise).
        lora_gate: set when the pair is built with `unet_lora`: the per-sample gate shared by the
            gated adapters inserted into `base_unet` (`finextract.engine.lora`); None otherwise.

    Raises:
        ValueError: a DreamBooth pair without `finetuned_unet`, both `finetuned_unet` and `unet_lora`,
            a LoRA pair that adapts nothing, a `base_unet` that already carries another pair's adapters,
            or second text encoders / tokenizers that do not fit the family.
        UnknownFamilyError: an unknown `family` name.
    """

    kind: Literal["dreambooth", "lora"]
    base_unet: Any
    finetuned_unet: Any | None
    unet_lora: dict[str, LoRALayer] | None
    base_text_encoder: Any
    finetuned_text_encoder: Any
    base_tokenizer: Any
    vae: Any
    scheduler_config: dict
    sources: dict = field(default_factory=dict)
    finetuned_tokenizer: Any = None
    family: Any = "sd1"
    base_text_encoder_2: Any = None
    finetuned_text_encoder_2: Any = None
    base_tokenizer_2: Any = None
    finetuned_tokenizer_2: Any = None
    force_zeros_for_empty_prompt: bool | None = None
    base_text_encoder_3: Any = None
    finetuned_text_encoder_3: Any = None
    base_tokenizer_3: Any = None
    finetuned_tokenizer_3: Any = None

    def __post_init__(self) -> None:
        self.family = get_family(self.family)
        for suffix in ("", "_2", "_3"):  # the fine-tune's text encoders and tokenizers default to the base's
            for part in ("text_encoder", "tokenizer"):
                if getattr(self, f"finetuned_{part}{suffix}") is None:
                    setattr(self, f"finetuned_{part}{suffix}", getattr(self, f"base_{part}{suffix}"))
        if self.force_zeros_for_empty_prompt is None:
            self.force_zeros_for_empty_prompt = self.family.name == "sdxl"
        for index, name in enumerate(("text_encoder", "text_encoder_2", "text_encoder_3")):
            suffix = name[len("text_encoder") :]
            present = [getattr(self, f"base_{part}{suffix}") is not None for part in ("text_encoder", "tokenizer")]
            if index >= len(self.family.text_encoders) and any(present):
                raise ValueError(
                    f"an {self.family.label} pair has {len(self.family.text_encoders)} text encoder(s); "
                    f"base_{name} must be None"
                )
            if index < len(self.family.text_encoders) and not all(present):
                if name in self.family.optional_text_encoders and not any(present):
                    continue
                raise ValueError(f"an {self.family.label} pair needs base_{name} and base_tokenizer{suffix}")
        if self.kind == "dreambooth" and self.finetuned_unet is None:
            raise ValueError("a DreamBooth pair needs finetuned_unet")
        if self.finetuned_unet is not None and self.unet_lora:
            raise ValueError("a pair has either a fine-tuned UNet or UNet LoRA adapters, not both; merge the adapters")
        if (
            self.kind == "lora"
            and not self.unet_lora
            and self.finetuned_unet is None
            and self.finetuned_text_encoder is self.base_text_encoder
            and self.finetuned_text_encoder_2 is self.base_text_encoder_2
            and self.finetuned_text_encoder_3 is self.base_text_encoder_3
        ):
            raise ValueError("a LoRA pair needs unet_lora, a merged finetuned_unet or an adapted text encoder")
        self.lora_gate = None
        if self.unet_lora:
            self.lora_gate = inject_lora(self.base_unet, self.unet_lora)

    def text_encoders_for(self, model: str) -> tuple[tuple[Any, Any], ...]:
        """(text encoder, tokenizer) of each of the family's text encoders for `model` ("base" or
        "finetuned"), in the family's order (SDXL: the CLIP ViT-L one, then OpenCLIP bigG; SD3: then T5,
        (None, None) when the pair runs without it)."""
        side = "base" if model == "base" else "finetuned"
        pairs = tuple(
            (getattr(self, f"{side}_text_encoder{suffix}"), getattr(self, f"{side}_tokenizer{suffix}"))
            for suffix in ("", "_2", "_3")
        )
        return pairs[: len(self.family.text_encoders)]

    def unet_for(self, model: str):
        """The UNet module that evaluates `model` ("base" or "finetuned"): the fine-tuned UNet when the
        pair has one, else the base UNet (whose gated adapters give the fine-tune per sample)."""
        if model == "finetuned" and self.finetuned_unet is not None:
            return self.finetuned_unet
        return self.base_unet

    @property
    def device(self) -> torch.device:
        return next(self.base_unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The UNets' precision."""
        return next(self.base_unet.parameters()).dtype

    @cached_property
    def fingerprint(self) -> str:
        """A hash of every byte of every weight, tokenizer and config of the pair (`pair_fingerprint`),
        computed once (cheap at SD size: xxh3-128 runs at several GB/s); `to()` with a new dtype resets it."""
        return pair_fingerprint(self)

    def to(
        self, device: str | torch.device, dtype: torch.dtype | None = None, *, vae_dtype: torch.dtype | None = None
    ) -> ModelPair:
        """Move every model and the LoRA tensors to `device` in place; return self.

        Args:
            device: target device. On CUDA the UNets also get their fast inference form
                (`prepare_unet_for_cuda`: SDPA attention, channels-last weights).
            dtype: dtype of the UNets, text encoders and LoRA tensors; None keeps theirs.
            vae_dtype: dtype of the VAE; None keeps its own (float32 as loaded: an fp16 VAE overflows
                into black images).

        Models are cast only when their device or dtype differs, and `.to()` gets a `dtype` only
        when it changes one: diffusers warns on every `.to(dtype=...)`, even a no-op one.
        """
        device = torch.device(device)
        if dtype is not None and dtype != self.dtype:
            self.__dict__.pop("fingerprint", None)  # the bytes change with the dtype
        models = [self.base_unet, self.finetuned_unet, self.base_text_encoder, self.finetuned_text_encoder]
        models += [self.base_text_encoder_2, self.finetuned_text_encoder_2]
        models += [self.base_text_encoder_3, self.finetuned_text_encoder_3]
        for model in {id(m): m for m in models if m is not None}.values():
            _move(model, device, dtype)
        _move(self.vae, device, vae_dtype)
        for layer in (self.unet_lora or {}).values():
            layer.down = layer.down.to(device=device, dtype=dtype)
            layer.up = layer.up.to(device=device, dtype=dtype)
        if device.type == "cuda":
            for unet in {id(u): u for u in (self.base_unet, self.finetuned_unet) if u is not None}.values():
                prepare_unet_for_cuda(unet)
        return self

    def place(self, config) -> ModelPair:
        """`to(config.device, config.torch_dtype, vae_dtype=config.torch_vae_dtype)`: where a run's
        `finextract.engine.config.RunConfig` says the models live; return self."""
        return self.to(config.device, config.torch_dtype, vae_dtype=config.torch_vae_dtype)


def prepare_unet_for_cuda(unet: torch.nn.Module, *, channels_last: bool = True) -> torch.nn.Module:
    """Put a diffusers UNet (already on CUDA) in its fast inference form, in place; return it.

    eval mode, no gradients, SDPA attention (diffusers' `AttnProcessor2_0`, set again in case a loader
    changed it) and channels-last 4-D weights (cuDNN's fastest layout for fp16/bf16 convolutions;
    inputs may stay NCHW, the first convolution converts). Gated LoRA modules are kept.
    """
    unet.eval().requires_grad_(False)
    if hasattr(unet, "set_attn_processor"):
        # heavy: diffusers; engine.pair imports without it (a UNet passed in has loaded it already)
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    return unet


def _move(model, device: torch.device, dtype: torch.dtype | None) -> None:
    if model.device != device:
        model.to(device)
    if dtype is not None and model.dtype != dtype:
        model.to(dtype=dtype)
