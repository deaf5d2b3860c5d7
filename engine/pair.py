"""The model pair FineXtract needs: a pretrained model (theta) and its fine-tune (theta')."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch


@dataclass
class LoRALayer:
    """One LoRA adapter on one module: delta W = (alpha / rank) * up @ down.

    Attributes:
        down: (rank, in_features) for a Linear, (rank, in_channels, kh, kw) for a Conv2d.
        up: (out_features, rank) for a Linear, (out_channels, rank, 1, 1) for a Conv2d.
        alpha: the file's alpha; equals rank when the file has none (recorded in
            `ModelPair.sources["lora_alpha_assumed"]`).
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def delta(self) -> torch.Tensor:
        """delta W = (alpha / rank) * up @ down in float32, (out, in * kh * kw): reshape to the weight."""
        return self.scale * self.up.flatten(1).float() @ self.down.flatten(1).float()


@dataclass
class ModelPair:
    """A pretrained model and a checkpoint fine-tuned from it, ready for guided sampling.

    `eps_base` uses `base_unet` with `base_text_encoder`; `eps_ft` uses the fine-tuned UNet
    (`finetuned_unet`, or `base_unet` with `unet_lora` applied) with `finetuned_text_encoder`
    (the checkpoint's own when it has one, else the pretrained one: SPEC section 1).

    Attributes:
        kind: what was fine-tuned, which selects the method's defaults: "dreambooth" (a full
            fine-tune) or "lora" (an adapter of any type). How it runs follows from the fields below:
            two UNets when `finetuned_unet` is set (DreamBooth, or an adapter merged into a copy of
            the base), one UNet with per-sample low-rank branches when `unet_lora` is set.
        base_unet: the pretrained `diffusers.UNet2DConditionModel`.
        finetuned_unet: the fine-tuned UNet (DreamBooth, or a merged adapter); None with `unet_lora`.
        unet_lora: low-rank adapters keyed by module path in `base_unet`, applied per sample; None
            with `finetuned_unet`.
        base_text_encoder: `transformers.CLIPTextModel` of the pretrained model.
        finetuned_text_encoder: the fine-tune's text encoder (LoRA merged in when the LoRA file
            adapts it); the same object as `base_text_encoder` when the checkpoint has none.
        base_tokenizer: the pretrained model's `transformers.CLIPTokenizer` (for `eps_base`).
        finetuned_tokenizer: the fine-tune's own tokenizer (for `eps_ft`; it may add tokens such as a
            DreamBooth identifier or textual-inversion embeddings); None means `base_tokenizer`.
        vae: `diffusers.AutoencoderKL` of the pretrained model (the fine-tune's if it ships one).
        scheduler_config: the model's own scheduler config (dict, diffusers format).
        sources: where each part came from, file formats, hashes, and loading notes.
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

    def __post_init__(self) -> None:
        if self.finetuned_tokenizer is None:
            self.finetuned_tokenizer = self.base_tokenizer
        if self.kind == "dreambooth" and self.finetuned_unet is None:
            raise ValueError("a DreamBooth pair needs finetuned_unet")
        if self.finetuned_unet is not None and self.unet_lora:
            raise ValueError("a pair has either a fine-tuned UNet or UNet LoRA adapters, not both; merge the adapters")
        if (
            self.kind == "lora"
            and not self.unet_lora
            and self.finetuned_unet is None
            and self.finetuned_text_encoder is self.base_text_encoder
        ):
            raise ValueError("a LoRA pair needs unet_lora, a merged finetuned_unet or an adapted text encoder")

    def to(
        self, device: str | torch.device, dtype: torch.dtype | None = None, *, vae_dtype: torch.dtype | None = None
    ) -> ModelPair:
        """Move every model and the LoRA tensors to `device` in place; return self.

        Args:
            device: target device.
            dtype: dtype of the UNets, text encoders and LoRA tensors; None keeps theirs.
            vae_dtype: dtype of the VAE; None means `dtype` (the VAE is usually kept in fp32, since
                an fp16 VAE overflows into black images).

        Models are cast only when their device or dtype differs, and `.to()` gets a `dtype` only
        when it changes one: diffusers warns on every `.to(dtype=...)`, even a no-op one.
        """
        device = torch.device(device)
        vae_dtype = vae_dtype or dtype
        models = [self.base_unet, self.finetuned_unet, self.base_text_encoder, self.finetuned_text_encoder]
        for model in {id(m): m for m in models if m is not None}.values():
            _move(model, device, dtype)
        _move(self.vae, device, vae_dtype)
        for layer in (self.unet_lora or {}).values():
            layer.down = layer.down.to(device=device, dtype=dtype)
            layer.up = layer.up.to(device=device, dtype=dtype)
        return self


def _move(model, device: torch.device, dtype: torch.dtype | None) -> None:
    if model.device != device:
        model.to(device)
    if dtype is not None and model.dtype != dtype:
        model.to(dtype=dtype)
