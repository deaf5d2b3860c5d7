"""FLUX.1 adapter files for the tiny zoo: one set of LoRA adapters on a `FluxTransformer2DModel` (and its CLIP
text encoder) written in each layout FLUX trainers publish (`finextract.engine.lora_flux`): diffusers /
ai-toolkit, kohya-ss sd-scripts (BFL's module names, fused q/k/v), XLabs-AI, OneTrainer and ComfyUI (BFL's
dotted names)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from finextract.engine.lora import LoRALayer

from .configs import LORA_ALPHA, LORA_RANK
from .writers import _file_text_names, _peft_config, _peft_tensors

# diffusers' fused-in-BFL projections: (diffusers attention submodules sharing one down projection)
_QKV = ("to_q", "to_k", "to_v")
_ADDED_QKV = ("add_q_proj", "add_k_proj", "add_v_proj")
_TEXT_TARGETS = ("encoder.layers.0.self_attn.q_proj", "encoder.layers.0.self_attn.v_proj")


def zoo_flux_lora(transformer, text_encoder, seed: int = 0) -> dict[str, dict[str, LoRALayer]]:
    """The zoo's random FLUX LoRA: {"transformer": path -> LoRALayer, "text_encoder": path -> LoRALayer}.

    Transformer: every attention projection of the double blocks (`to_q`, `to_k`, `to_v`, `to_out.0`,
    `add_q_proj`, `add_k_proj`, `add_v_proj`, `to_add_out`) and of the single blocks (`to_q`, `to_k`,
    `to_v`), and each single block's `proj_out`: the modules every FLUX layout names (BFL's `img_attn.qkv`,
    `txt_attn.qkv`, `img_attn.proj`, `txt_attn.proj`, `linear2`). The three projections BFL fuses into one
    `qkv` share one down projection and alpha, as a LoRA trained on the fused module does. Rank
    `LORA_RANK`, alpha `LORA_ALPHA`. Text encoder: the first layer's `q_proj` and `v_proj`. Deterministic
    for a seed.
    """
    generator = torch.Generator().manual_seed(seed)

    def random(out_features: int, in_features: int, down: torch.Tensor | None = None) -> LoRALayer:
        if down is None:
            down = torch.randn(LORA_RANK, in_features, generator=generator) * 0.1
        return LoRALayer(down, torch.randn(out_features, LORA_RANK, generator=generator) * 0.1, LORA_ALPHA)

    modules = dict(transformer.named_modules())
    layers: dict[str, LoRALayer] = {}
    for name in modules:
        if not re.fullmatch(r"(single_)?transformer_blocks\.\d+", name):
            continue
        fused = [_QKV] if name.startswith("single_") else [_QKV, _ADDED_QKV]
        for group in fused:
            first = modules[f"{name}.attn.{group[0]}"]
            shared = random(first.out_features, first.in_features).down
            for part in group:
                linear = modules[f"{name}.attn.{part}"]
                # equal values, own storage (safetensors refuses tensors sharing memory)
                layers[f"{name}.attn.{part}"] = random(linear.out_features, linear.in_features, shared.clone())
        singles = ["proj_out"] if name.startswith("single_") else ["attn.to_out.0", "attn.to_add_out"]
        for part in singles:
            linear = modules[f"{name}.{part}"]
            layers[f"{name}.{part}"] = random(linear.out_features, linear.in_features)
    text_modules = dict(text_encoder.named_modules())
    text = {}
    for name, module in text_modules.items():
        if name.removeprefix("text_model.") in _TEXT_TARGETS:
            text[name] = random(module.out_features, module.in_features)
    return {"transformer": layers, "text_encoder": text}


def write_flux_lora_diffusers(folder: str | Path, layers: dict) -> Path:
    """`pytorch_lora_weights.safetensors` as `FluxPipeline.save_lora_weights` writes it (ai-toolkit writes the
    same names): `transformer.<path>.lora_A.weight` / `lora_B.weight`, `text_encoder.text_model.<path>...`,
    ranks and alphas in the `lora_adapter_metadata`. Returns the file."""
    from diffusers import FluxPipeline  # heavy: loaded when a file is written

    text = _file_text_names(layers.get("text_encoder", {}))
    FluxPipeline.save_lora_weights(
        str(folder),
        transformer_lora_layers=_peft_tensors(layers["transformer"]),
        text_encoder_lora_layers=_peft_tensors(text) or None,
        transformer_lora_adapter_metadata=_peft_config(layers["transformer"]),
        text_encoder_lora_adapter_metadata=_peft_config(text) if text else None,
    )
    return Path(folder) / "pytorch_lora_weights.safetensors"


def _fused(layers: dict, paths: tuple[str, ...], owner: str) -> LoRALayer:
    """One LoRA on BFL's fused projection from the per-projection layers sharing its down projection."""
    parts = [layers[path] for path in paths]
    if any(not torch.equal(p.down, parts[0].down) or p.alpha != parts[0].alpha for p in parts):
        raise ValueError(f"{owner}: {paths} must share one down projection and alpha to be written fused")
    return LoRALayer(parts[0].down, torch.cat([p.up for p in parts]), parts[0].alpha)


def _bfl_layers(layers: dict) -> dict[str, LoRALayer]:
    """BFL's module names (as kohya and XLabs write them, '.'-separated) -> LoRALayer, from diffusers' paths:
    `transformer_blocks.<i>` is `double_blocks.<i>` (`img_attn.qkv`, `img_attn.proj`, `txt_attn.qkv`,
    `txt_attn.proj`), `single_transformer_blocks.<i>` is `single_blocks.<i>` (`linear2` for `proj_out`; the
    q/k/v written as `linear1`'s first three parts only by XLabs)."""
    bfl = {}
    blocks = sorted({m.group(0) for path in layers if (m := re.match(r"(single_)?transformer_blocks\.\d+", path))})
    for block in blocks:
        index = block.rsplit(".", 1)[1]
        if block.startswith("single_"):
            bfl[f"single_blocks.{index}.qkv"] = _fused(layers, tuple(f"{block}.attn.{p}" for p in _QKV), block)
            bfl[f"single_blocks.{index}.linear2"] = layers[f"{block}.proj_out"]
            continue
        bfl[f"double_blocks.{index}.img_attn.qkv"] = _fused(layers, tuple(f"{block}.attn.{p}" for p in _QKV), block)
        bfl[f"double_blocks.{index}.txt_attn.qkv"] = _fused(
            layers, tuple(f"{block}.attn.{p}" for p in _ADDED_QKV), block
        )
        bfl[f"double_blocks.{index}.img_attn.proj"] = layers[f"{block}.attn.to_out.0"]
        bfl[f"double_blocks.{index}.txt_attn.proj"] = layers[f"{block}.attn.to_add_out"]
    return bfl


def _kohya_tensors(prefix: str, layers: dict) -> dict:
    tensors = {}
    for name, layer in layers.items():
        key = prefix + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = layer.down.contiguous()
        tensors[f"{key}.lora_up.weight"] = layer.up.contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(float(layer.alpha))
    return tensors


#: sd-scripts' metadata for a FLUX.1-dev LoRA
KOHYA_FLUX_METADATA = {"ss_base_model_version": "flux1", "modelspec.architecture": "flux-1-dev/lora"}


def write_flux_lora_kohya(path: str | Path, layers: dict) -> Path:
    """A kohya-ss sd-scripts FLUX LoRA: BFL's module names, `lora_unet_double_blocks_<i>_img_attn_qkv`
    (q, k, v fused: one down projection, the up projections stacked), `..._img_attn_proj`, `txt_attn_*`,
    `lora_unet_single_blocks_<i>_linear2`, each with `.lora_down.weight`, `.lora_up.weight`, `.alpha`; CLIP
    as `lora_te1_text_model_encoder_...`. A single block's q, k, v are not written: sd-scripts fuses them
    with the MLP input into `linear1`, which diffusers' converter splits only at FLUX.1's widths.
    Returns the path."""
    tensors = _kohya_tensors("lora_unet_", _kohya_modules(layers))
    tensors |= _kohya_tensors("lora_te1_", _file_text_names(layers.get("text_encoder", {})))
    save_file(tensors, str(path), metadata={"format": "pt", **KOHYA_FLUX_METADATA})
    return Path(path)


def _kohya_modules(layers: dict) -> dict[str, LoRALayer]:
    """The BFL-named modules kohya writes: all but a single block's q, k, v (sd-scripts fuses them into linear1)."""
    bfl = _bfl_layers(layers["transformer"])
    return {name: layer for name, layer in bfl.items() if not (name.startswith("single_") and name.endswith(".qkv"))}


def write_flux_lora_bfl(path: str | Path, layers: dict) -> Path:
    """A FLUX LoRA under BFL's dotted module names as ComfyUI writes it: `diffusion_model.double_blocks.<i>.img_attn.qkv`,
    `...single_blocks.<i>.linear2`, each `.lora_down.weight`, `.lora_up.weight`, `.alpha`; CLIP as
    `text_encoders.clip_l.transformer.text_model.<path>`. The modules of `write_flux_lora_kohya`. Returns the path."""
    tensors = {}
    text = _file_text_names(layers.get("text_encoder", {}))
    for prefix, group in (("diffusion_model.", _kohya_modules(layers)), ("text_encoders.clip_l.transformer.", text)):
        for name, layer in group.items():
            tensors[f"{prefix}{name}.lora_down.weight"] = layer.down.contiguous()
            tensors[f"{prefix}{name}.lora_up.weight"] = layer.up.contiguous()
            tensors[f"{prefix}{name}.alpha"] = torch.tensor(float(layer.alpha))
    save_file(tensors, str(path), metadata={"format": "pt"})
    return Path(path)


def write_flux_lora_xlabs(path: str | Path, layers: dict) -> Path:
    """An XLabs-AI (x-flux) FLUX LoRA: `double_blocks.<i>.processor.qkv_lora1` (image q/k/v), `qkv_lora2`
    (text), `proj_lora1`, `proj_lora2`, `single_blocks.<i>.processor.qkv_lora`, `proj_lora`, each `.down.weight`
    / `.up.weight`. The format has no alpha (scale 1): alpha / rank is folded into `up`. No text encoder.
    Returns the path."""
    names = {
        "img_attn.qkv": "qkv_lora1",
        "txt_attn.qkv": "qkv_lora2",
        "img_attn.proj": "proj_lora1",
        "txt_attn.proj": "proj_lora2",
        "qkv": "qkv_lora",
        "linear2": "proj_lora",
    }
    tensors = {}
    for name, layer in _bfl_layers(layers["transformer"]).items():
        kind, index, module = name.split(".", 2)
        key = f"{kind}.{index}.processor.{names[module]}"
        tensors[f"{key}.down.weight"] = layer.down.contiguous()
        tensors[f"{key}.up.weight"] = (layer.up * layer.scale).contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})
    return Path(path)


def write_flux_lora_onetrainer(path: str | Path, layers: dict) -> Path:
    """A OneTrainer FLUX LoRA: diffusers' module paths with '_' for '.', `lora_transformer_<path>` and CLIP's
    `lora_te1_<path>`, each `.lora_down.weight`, `.lora_up.weight`, `.alpha`. The attention projections only:
    diffusers' OneTrainer converter maps no other module (a single block's `proj_out` would land on the block).
    Returns the path."""
    attention = {name: layer for name, layer in layers["transformer"].items() if ".attn." in name}
    tensors = _kohya_tensors("lora_transformer_", attention)
    tensors |= _kohya_tensors("lora_te1_", _file_text_names(layers.get("text_encoder", {})))
    save_file(tensors, str(path), metadata={"format": "pt"})
    return Path(path)


def write_flux_adapters(out: str | Path, transformer, text_encoder, seed: int = 0) -> dict[str, Path]:
    """Write `zoo_flux_lora`'s adapters into `out` in every FLUX layout: `lora/` (diffusers),
    `lora_kohya.safetensors`, `lora_xlabs.safetensors`, `lora_onetrainer.safetensors`, `lora_comfyui.safetensors`
    (BFL's names, format "bfl").

    Returns:
        format -> path.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    layers = zoo_flux_lora(transformer, text_encoder, seed)
    return {
        "diffusers": write_flux_lora_diffusers(out / "lora", layers),
        "kohya": write_flux_lora_kohya(out / "lora_kohya.safetensors", layers),
        "xlabs": write_flux_lora_xlabs(out / "lora_xlabs.safetensors", layers),
        "onetrainer": write_flux_lora_onetrainer(out / "lora_onetrainer.safetensors", layers),
        "bfl": write_flux_lora_bfl(out / "lora_comfyui.safetensors", layers),
    }


# --- BFL's original FLUX.1 transformer file ---


def _swap_halves(weight: torch.Tensor) -> torch.Tensor:
    """BFL's final AdaLayerNorm projects (shift, scale), diffusers' (scale, shift): the halves swapped."""
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def bfl_flux_state(transformer) -> dict[str, torch.Tensor]:
    """A `FluxTransformer2DModel`'s tensors under BFL's original names (the `flux` package's `Flux` model, as
    `flux1-dev.safetensors` stores them): the inverse of diffusers'
    `convert_flux_transformer_checkpoint_to_diffusers` (q, k, v concatenated into `img_attn.qkv` /
    `txt_attn.qkv`, a single block's q, k, v and MLP input into `linear1`, the final norm's halves swapped).

    Raises:
        ValueError: a tensor of the model with no BFL name (another architecture).
    """
    state = transformer.state_dict()
    used: set[str] = set()

    def take(*names: str) -> torch.Tensor:
        used.update(names)
        return torch.cat([state[name] for name in names])

    out = {}
    fixed = {
        "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
        "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
        "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
        "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
        "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
        "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
        "txt_in": "context_embedder",
        "img_in": "x_embedder",
        "final_layer.linear": "proj_out",
    }
    double = {
        "img_mod.lin": "norm1.linear",
        "txt_mod.lin": "norm1_context.linear",
        "img_mlp.0": "ff.net.0.proj",
        "img_mlp.2": "ff.net.2",
        "txt_mlp.0": "ff_context.net.0.proj",
        "txt_mlp.2": "ff_context.net.2",
        "img_attn.proj": "attn.to_out.0",
        "txt_attn.proj": "attn.to_add_out",
    }
    double_norms = {
        "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
        "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
        "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
        "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
    }
    single = {"modulation.lin": "norm.linear", "linear2": "proj_out"}
    single_norms = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}
    for kind in ("weight", "bias"):
        for bfl, ours in fixed.items():
            if f"{ours}.{kind}" in state:  # schnell has no guidance embedding
                out[f"{bfl}.{kind}"] = take(f"{ours}.{kind}")
        out[f"final_layer.adaLN_modulation.1.{kind}"] = _swap_halves(take(f"norm_out.linear.{kind}"))
        for i in range(len(transformer.transformer_blocks)):
            block = f"transformer_blocks.{i}"
            for bfl, ours in double.items():
                out[f"double_blocks.{i}.{bfl}.{kind}"] = take(f"{block}.{ours}.{kind}")
            for name, parts in (("img_attn.qkv", ("to_q", "to_k", "to_v")), ("txt_attn.qkv", _ADDED_QKV)):
                out[f"double_blocks.{i}.{name}.{kind}"] = take(*(f"{block}.attn.{p}.{kind}" for p in parts))
        for i in range(len(transformer.single_transformer_blocks)):
            block = f"single_transformer_blocks.{i}"
            for bfl, ours in single.items():
                out[f"single_blocks.{i}.{bfl}.{kind}"] = take(f"{block}.{ours}.{kind}")
            parts = (*(f"{block}.attn.{p}.{kind}" for p in _QKV), f"{block}.proj_mlp.{kind}")
            out[f"single_blocks.{i}.linear1.{kind}"] = take(*parts)
    for i in range(len(transformer.transformer_blocks)):
        out.update({f"double_blocks.{i}.{b}": take(f"transformer_blocks.{i}.{o}") for b, o in double_norms.items()})
    for i in range(len(transformer.single_transformer_blocks)):
        out.update(
            {f"single_blocks.{i}.{b}": take(f"single_transformer_blocks.{i}.{o}") for b, o in single_norms.items()}
        )
    left = sorted(set(state) - used)
    if left:
        raise ValueError(f"bfl_flux_state: no BFL name for {left[:5]}: not a FLUX.1 transformer")
    return {key: value.contiguous() for key, value in out.items()}


def write_flux_transformer_file(path: str | Path, transformer, *, prefix: str = "") -> Path:
    """Write a FLUX.1 transformer as BFL's original single file (`bfl_flux_state`), its keys under `prefix`
    ("" as BFL publishes `flux1-dev.safetensors`; "model.diffusion_model." as some trainers save it).
    Returns the path."""
    save_file({prefix + key: value for key, value in bfl_flux_state(transformer).items()}, str(path))
    return Path(path)
