"""SD3 adapter files for the tiny zoo: one set of LoRA adapters on an `SD3Transformer2DModel` and its two CLIP
text encoders, written as diffusers' `StableDiffusion3Pipeline.save_lora_weights` writes them (the layout
diffusers' SD3 LoRA loader reads; `finextract.engine.lora_formats`)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from finextract.engine.lora import LoRALayer

from .configs import LORA_ALPHA, LORA_RANK
from .writers import _file_text_names, _peft_config, _peft_tensors

# the projections diffusers' SD3 DreamBooth LoRA script adapts in each joint block (the last block of SD3 has
# no `to_add_out`: its context stream ends there)
_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
_TEXT_TARGETS = ("encoder.layers.0.self_attn.q_proj", "encoder.layers.0.self_attn.v_proj")


def zoo_sd3_lora(transformer, text_encoder, text_encoder_2, seed: int = 0) -> dict[str, dict[str, LoRALayer]]:
    """The zoo's random SD3 LoRA: {"transformer" | "text_encoder" | "text_encoder_2": path -> LoRALayer}.

    Transformer: every attention projection of every joint block that has it (`_ATTENTION`); text encoders:
    the first layer's `q_proj` and `v_proj` of each CLIP. Rank `LORA_RANK`, alpha `LORA_ALPHA`, factors
    N(0, 0.1^2). Deterministic for a seed.
    """
    generator = torch.Generator().manual_seed(seed)

    def random(linear) -> LoRALayer:
        down = torch.randn(LORA_RANK, linear.in_features, generator=generator) * 0.1
        return LoRALayer(down, torch.randn(linear.out_features, LORA_RANK, generator=generator) * 0.1, LORA_ALPHA)

    modules = dict(transformer.named_modules())
    layers = {}
    for name in modules:
        if re.fullmatch(r"transformer_blocks\.\d+", name):
            for part in _ATTENTION:
                if f"{name}.attn.{part}" in modules:
                    layers[f"{name}.attn.{part}"] = random(modules[f"{name}.attn.{part}"])
    out = {"transformer": layers}
    for component, model in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        text = dict(model.named_modules())
        out[component] = {n: random(m) for n, m in text.items() if n.removeprefix("text_model.") in _TEXT_TARGETS}
    return out


def write_sd3_lora_diffusers(folder: str | Path, layers: dict) -> Path:
    """`pytorch_lora_weights.safetensors` as `StableDiffusion3Pipeline.save_lora_weights` writes it:
    `transformer.<path>.lora_A.weight` / `lora_B.weight`, `text_encoder.text_model.<path>...`,
    `text_encoder_2.text_model.<path>...`, ranks and alphas in the `lora_adapter_metadata`. Returns the file."""
    from diffusers import StableDiffusion3Pipeline  # heavy: loaded when a file is written

    texts = {name: _file_text_names(layers.get(name, {})) for name in ("text_encoder", "text_encoder_2")}
    StableDiffusion3Pipeline.save_lora_weights(
        str(folder),
        transformer_lora_layers=_peft_tensors(layers["transformer"]),
        text_encoder_lora_layers=_peft_tensors(texts["text_encoder"]) or None,
        text_encoder_2_lora_layers=_peft_tensors(texts["text_encoder_2"]) or None,
        transformer_lora_adapter_metadata=_peft_config(layers["transformer"]),
        text_encoder_lora_adapter_metadata=_peft_config(texts["text_encoder"]) if texts["text_encoder"] else None,
        text_encoder_2_lora_adapter_metadata=_peft_config(texts["text_encoder_2"]) if texts["text_encoder_2"] else None,
    )
    return Path(folder) / "pytorch_lora_weights.safetensors"


def write_sd3_adapters(out: str | Path, components: dict, seed: int = 0) -> dict[str, Path]:
    """Write `zoo_sd3_lora`'s adapters on `components` (`tiny_components(family="sd3")`) into `out/lora/`
    (diffusers). Returns {"diffusers": the file}."""
    layers = zoo_sd3_lora(components["transformer"], components["text_encoder"], components["text_encoder_2"], seed)
    return {"diffusers": write_sd3_lora_diffusers(Path(out) / "lora", layers)}
