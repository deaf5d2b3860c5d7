"""Checkpoint writers: the same adapters as diffusers, PEFT, kohya and cloneofsimo LoRA files, and
original-layout (LDM / SGM) single-file checkpoints."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from .configs import LORA_ALPHA, LORA_RANK


def _file_text_names(layers: dict) -> dict:
    """Text-encoder layers under the names LoRA files use: CLIP modules as `text_model.encoder...` (the
    names of CLIP's original checkpoints), whatever the installed transformers calls them; XLM-R's
    modules and `text_projection` as they are."""
    clip = ("encoder.layers.", "embeddings.", "final_layer_norm")
    return {"text_model." + name if name.startswith(clip) else name: layer for name, layer in layers.items()}


def _peft_config(layers: dict) -> dict:
    """A PEFT LoraConfig (as keyword arguments) describing `layers`: default rank/alpha plus patterns."""
    return dict(
        r=LORA_RANK,
        lora_alpha=LORA_ALPHA,
        target_modules=sorted(layers),
        rank_pattern={name: layer.rank for name, layer in layers.items() if layer.rank != LORA_RANK},
        alpha_pattern={name: layer.alpha for name, layer in layers.items() if layer.alpha != LORA_ALPHA},
    )


def _peft_tensors(layers: dict, prefix: str = "") -> dict:
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{prefix}{name}.lora_A.weight"] = layer.down.contiguous()
        tensors[f"{prefix}{name}.lora_B.weight"] = layer.up.contiguous()
    return tensors


def write_lora_diffusers(
    folder: str | Path, unet_layers: dict, text_layers: dict, text_layers_2: dict | None = None
) -> Path:
    """Write `pytorch_lora_weights.safetensors` the way diffusers' `save_lora_weights` does.

    Keys `unet.<path>.lora_A.weight` / `.lora_B.weight` (and `text_encoder.`, with `text_layers_2`
    SDXL's `text_encoder_2.`, written by `StableDiffusionXLPipeline.save_lora_weights`); ranks and
    alphas in the file's `lora_adapter_metadata` (diffusers >= 0.34). Returns the file's path.
    """
    # heavy: diffusers and peft take seconds; loaded when a file is written
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    text_layers = _file_text_names(text_layers)
    options = dict(
        unet_lora_layers=_peft_tensors(unet_layers),
        text_encoder_lora_layers=_peft_tensors(text_layers),
        unet_lora_adapter_metadata=_peft_config(unet_layers),
        text_encoder_lora_adapter_metadata=_peft_config(text_layers),
    )
    if text_layers_2:
        text_layers_2 = _file_text_names(text_layers_2)
        options.update(
            text_encoder_2_lora_layers=_peft_tensors(text_layers_2),
            text_encoder_2_lora_adapter_metadata=_peft_config(text_layers_2),
        )
        StableDiffusionXLPipeline.save_lora_weights(str(folder), **options)
    else:
        StableDiffusionPipeline.save_lora_weights(str(folder), **options)
    return Path(folder) / "pytorch_lora_weights.safetensors"


def write_lora_peft(
    folder: str | Path, unet_layers: dict, text_layers: dict, text_layers_2: dict | None = None
) -> Path:
    """Write a PEFT adapter folder: the UNet adapter at the top, the text encoder's in `text_encoder/`
    (and SDXL's second one in `text_encoder_2/`).

    Each holds `adapter_config.json` (peft's `LoraConfig.save_pretrained`) and
    `adapter_model.safetensors` with `base_model.model.<path>.lora_A.weight` keys, as
    `PeftModel.save_pretrained` writes them. Returns the folder.
    """
    from peft import LoraConfig

    folder = Path(folder)
    targets = [(folder, unet_layers), (folder / "text_encoder", _file_text_names(text_layers))]
    if text_layers_2:
        targets.append((folder / "text_encoder_2", _file_text_names(text_layers_2)))
    for target, layers in targets:
        target.mkdir(parents=True, exist_ok=True)
        LoraConfig(**_peft_config(layers)).save_pretrained(str(target))
        save_file(
            _peft_tensors(layers, "base_model.model."),
            str(target / "adapter_model.safetensors"),
            metadata={"format": "pt"},
        )
    return folder


#: kohya-ss metadata (`ss_base_model_version`, and `modelspec.architecture` of the model-spec
#: standard sd-scripts writes) per zoo family
KOHYA_METADATA = {
    "sd1": {"ss_base_model_version": "sd_v1", "modelspec.architecture": "stable-diffusion-v1/lora"},
    "sd2": {"ss_base_model_version": "sd_v2", "modelspec.architecture": "stable-diffusion-v2-512/lora"},
    "sd2-v": {"ss_base_model_version": "sd_v2", "modelspec.architecture": "stable-diffusion-v2-768-v/lora"},
    "sdxl": {"ss_base_model_version": "sdxl_base_v1-0", "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"},
}


def write_lora_kohya(
    path: str | Path,
    unet_layers: dict,
    text_layers: dict,
    no_alpha: tuple[str, ...] = (),
    *,
    text_layers_2: dict | None = None,
    unet_config: dict | None = None,
    metadata: dict | None = None,
) -> Path:
    """Write a kohya-ss (sd-scripts) LoRA file: `lora_unet_<path with _>.lora_down.weight`,
    `.lora_up.weight`, `.alpha` (and `lora_te_` for the text encoder). Modules named in `no_alpha`
    get no `.alpha` key (readers then assume alpha = rank). Returns the path.

    SDXL, as sd-scripts trains it (`text_layers_2` given): UNet modules under their original (SGM)
    names (`lora_unet_input_blocks_4_1_...`, from `unet_config`), the text encoders as `lora_te1_` /
    `lora_te2_` (with `lora_te2_text_projection`). `metadata` is stored in the file's header.
    """
    unet_names = {name: name for name in unet_layers}
    if text_layers_2 is not None:
        if unet_config is None:
            raise ValueError("write_lora_kohya: SDXL names (text_layers_2) need the UNet's unet_config")
        weights = {f"{name}.weight": None for name in unet_layers}
        unet_names = {
            k.removesuffix(".weight"): v.removesuffix(".weight")
            for k, v in _ldm_unet_names(unet_config, weights).items()
        }
    groups = [("lora_unet_", {unet_names[name]: layer for name, layer in unet_layers.items()})]
    if text_layers_2 is None:
        groups.append(("lora_te_", _file_text_names(text_layers)))
    else:
        groups += [("lora_te1_", _file_text_names(text_layers)), ("lora_te2_", _file_text_names(text_layers_2))]
    tensors = {}
    for prefix, layers in groups:
        for name, layer in layers.items():
            key = prefix + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = layer.down.contiguous()
            tensors[f"{key}.lora_up.weight"] = layer.up.contiguous()
            if name not in no_alpha and name.removeprefix("text_model.") not in no_alpha:
                tensors[f"{key}.alpha"] = torch.tensor(float(layer.alpha))
    save_file(tensors, str(path), metadata={"format": "pt", **(metadata or {})})
    return Path(path)


# --- writers of further checkpoint layouts, for tests (not part of `build_zoo`) ---


def write_lora_cloneofsimo(path: str | Path, modules: dict[str, list], embeddings: dict | None = None) -> Path:
    """Write a cloneofsimo (`lora_diffusion`, `save_safeloras_with_embeds`) safetensors file.

    Args:
        path: the file to write.
        modules: component ("unet", "text_encoder") -> (targets, layers): the module classes the
            LoRA was injected under (stored as the component's metadata), and the LoRALayers in the
            order `lora_diffusion` enumerates their modules (written as `<component>:<i>:up` with
            the scale folded into `up`, and `<component>:<i>:down`).
        embeddings: token (e.g. "<s1>") -> (dim,) vector, flagged "<embed>" in the metadata.

    Returns:
        `path` as a Path.
    """
    tensors, metadata = {}, {}
    for component, (targets, layers) in modules.items():
        metadata[component] = json.dumps(list(targets))
        for i, layer in enumerate(layers):
            metadata[f"{component}:{i}:rank"] = str(layer.rank)
            tensors[f"{component}:{i}:up"] = (layer.up * layer.scale).contiguous()
            tensors[f"{component}:{i}:down"] = layer.down.contiguous()
    for token, vector in (embeddings or {}).items():
        metadata[token] = "<embed>"
        tensors[token] = vector.contiguous()
    save_file(tensors, str(path), metadata)
    return Path(path)


def _ldm_unet_names(config: dict, names) -> dict[str, str]:
    """diffusers UNet tensor name -> original SD (LDM) name, the inverse of diffusers'
    `convert_ldm_unet_checkpoint` for `UNet2DConditionModel` configs."""
    per_block = config["layers_per_block"]
    fixed = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",  # SDXL's added (text_time) embedding
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    resnet = {
        "norm1": "in_layers.0",
        "conv1": "in_layers.2",
        "norm2": "out_layers.0",
        "conv2": "out_layers.3",
        "time_emb_proj": "emb_layers.1",
        "conv_shortcut": "skip_connection",
    }
    up_has_attention = {i: "CrossAttn" in kind for i, kind in enumerate(config["up_block_types"])}
    mapping = {}
    for name in names:
        module, _, leaf = name.rpartition(".")
        parts = module.split(".")
        if module in fixed:
            new = fixed[module]
        elif parts[0] == "down_blocks":
            i, kind = int(parts[1]), parts[2]
            if kind == "downsamplers":
                new = f"input_blocks.{(i + 1) * (per_block + 1)}.0.op"
            else:
                j, rest = int(parts[3]), parts[4:]
                index = 1 + i * (per_block + 1) + j
                rest = [resnet.get(rest[0], rest[0]), *rest[1:]] if kind == "resnets" else rest
                new = ".".join([f"input_blocks.{index}.{0 if kind == 'resnets' else 1}", *rest])
        elif parts[0] == "mid_block":
            index = 2 * int(parts[2]) if parts[1] == "resnets" else 1
            rest = parts[3:]
            rest = [resnet.get(rest[0], rest[0]), *rest[1:]] if parts[1] == "resnets" else rest
            new = ".".join([f"middle_block.{index}", *rest])
        else:  # up_blocks
            i, kind = int(parts[1]), parts[2]
            if kind == "upsamplers":
                new = f"output_blocks.{i * (per_block + 1) + per_block}.{2 if up_has_attention[i] else 1}.conv"
            else:
                j, rest = int(parts[3]), parts[4:]
                rest = [resnet.get(rest[0], rest[0]), *rest[1:]] if kind == "resnets" else rest
                new = ".".join([f"output_blocks.{i * (per_block + 1) + j}.{0 if kind == 'resnets' else 1}", *rest])
        mapping[name] = f"{new}.{leaf}"
    return mapping


def _ldm_vae_names(config: dict, names) -> dict[str, str]:
    """diffusers AutoencoderKL tensor name -> LDM name (the inverse of `convert_ldm_vae_checkpoint`)."""
    blocks = len(config["up_block_types"])
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    mapping = {}
    for name in names:
        new = name.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        new = re.sub(
            r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{blocks - 1 - int(m[1])}.block.", new
        )
        new = re.sub(
            r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
            lambda m: f"decoder.up.{blocks - 1 - int(m[1])}.upsample.",
            new,
        )
        new = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", new)
        for diffusers_name, ldm_name in attention.items():
            new = new.replace(f"mid_block.attentions.0.{diffusers_name}.", f"mid.attn_1.{ldm_name}.")
        mapping[name] = new
    return mapping


def _openclip_state(text_encoder) -> dict:
    """A CLIP text encoder's tensors under OpenCLIP's names (SD 2.x's `cond_stage_model.model.*`, SDXL's
    `conditioner.embedders.1.model.*`): the inverse of diffusers' `convert_open_clip_checkpoint`
    (q, k, v projections joined into `attn.in_proj_*`, `text_projection` stored transposed)."""
    state = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    fixed = {
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
    }
    out = {}
    for name, value in state.items():
        if name in fixed:
            out[fixed[name]] = value
        elif name == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif name.startswith("encoder.layers.") and ".self_attn." in name and "out_proj" not in name:
            continue  # joined below
        elif name.startswith("encoder.layers."):
            new = "transformer.resblocks." + name.removeprefix("encoder.layers.")
            for a, b in (
                ("layer_norm1", "ln_1"),
                ("layer_norm2", "ln_2"),
                (".mlp.fc1.", ".mlp.c_fc."),
                (".mlp.fc2.", ".mlp.c_proj."),
            ):
                new = new.replace(a, b)
            out[new.replace(".self_attn.", ".attn.")] = value
        elif not name.endswith("position_ids"):
            raise ValueError(f"_openclip_state: no OpenCLIP name for {name}")
    layers = {int(n.split(".")[2]) for n in state if n.startswith("encoder.layers.")}
    for i in sorted(layers):
        for kind in ("weight", "bias"):
            parts = [state[f"encoder.layers.{i}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(parts).contiguous()
    return out


def write_ldm_checkpoint(
    path: str | Path,
    unet,
    text_encoder=None,
    vae=None,
    *,
    drop: tuple[str, ...] = (),
    text_encoder_2=None,
    text_layout: str = "clip",
    markers: tuple[str, ...] = (),
) -> Path:
    """Write models as one original-Stable-Diffusion-layout (LDM / CompVis, SGM for SDXL) `.safetensors`
    file: `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE; attention projections as 1x1
    convolutions, as the original VAE stores them) and the text encoder(s):

    - `text_layout="clip"` (SD 1.x): `cond_stage_model.transformer.text_model.*` (CLIP's names);
    - `text_layout="openclip"` (SD 2.x): `cond_stage_model.model.*` (OpenCLIP's names);
    - with `text_encoder_2` (SDXL): `conditioner.embedders.0.transformer.text_model.*` (CLIP) and
      `conditioner.embedders.1.model.*` (OpenCLIP bigG, with `text_projection`).

    `drop` removes LDM tensor names (a partial file); `markers` adds empty marker tensors
    (`v_pred`, `ztsnr`) as trainers of v-prediction / zero-terminal-SNR models write them.
    Returns the path.
    """
    tensors = {}
    state = unet.state_dict()
    for name, ldm in _ldm_unet_names(dict(unet.config), state).items():
        tensors["model.diffusion_model." + ldm] = state[name]

    def clip(prefix: str, model) -> None:
        for name, value in model.state_dict().items():
            full = name if name.startswith("text_model.") else "text_model." + name
            tensors[prefix + full] = value

    if text_encoder_2 is not None:
        clip("conditioner.embedders.0.transformer.", text_encoder)
        for name, value in _openclip_state(text_encoder_2).items():
            tensors["conditioner.embedders.1.model." + name] = value
    elif text_encoder is not None and text_layout == "openclip":
        for name, value in _openclip_state(text_encoder).items():
            tensors["cond_stage_model.model." + name] = value
    elif text_encoder is not None:
        clip("cond_stage_model.transformer.", text_encoder)
    if vae is not None:
        state = vae.state_dict()
        for name, ldm in _ldm_vae_names(dict(vae.config), state).items():
            value = state[name]
            if ".mid.attn_1." in ldm and value.dim() == 2:
                value = value[:, :, None, None]
            tensors["first_stage_model." + ldm] = value
    for name in drop:
        del tensors[name]
    for name in markers:
        tensors[name] = torch.zeros(0)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return Path(path)


def _sd3_names(state: dict, layers: int) -> dict[str, list[str]]:
    """SAI's MMDiT tensor name -> the diffusers `SD3Transformer2DModel` names it holds (three for a fused qkv),
    the inverse of diffusers' `convert_sd3_transformer_checkpoint_to_diffusers`."""
    fixed = {
        "pos_embed": "pos_embed.pos_embed",
        "x_embedder.proj": "pos_embed.proj",
        "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
        "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
        "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
        "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
        "context_embedder": "context_embedder",
        "final_layer.linear": "proj_out",
        "final_layer.adaLN_modulation.1": "norm_out.linear",
    }
    per_block = {
        "x_block.attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
        "context_block.attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
        "x_block.attn.ln_q": ["attn.norm_q"],
        "x_block.attn.ln_k": ["attn.norm_k"],
        "context_block.attn.ln_q": ["attn.norm_added_q"],
        "context_block.attn.ln_k": ["attn.norm_added_k"],
        "x_block.attn.proj": ["attn.to_out.0"],
        "context_block.attn.proj": ["attn.to_add_out"],
        "x_block.adaLN_modulation.1": ["norm1.linear"],
        "context_block.adaLN_modulation.1": ["norm1_context.linear"],
        "x_block.mlp.fc1": ["ff.net.0.proj"],
        "x_block.mlp.fc2": ["ff.net.2"],
        "context_block.mlp.fc1": ["ff_context.net.0.proj"],
        "context_block.mlp.fc2": ["ff_context.net.2"],
    }
    names = {old: [new] for old, new in fixed.items()}
    for i in range(layers):
        names.update(
            {f"joint_blocks.{i}.{old}": [f"transformer_blocks.{i}.{n}" for n in new] for old, new in per_block.items()}
        )
    mapping = {}
    for old, new in names.items():
        for suffix in ("", ".weight", ".bias"):
            if all(n + suffix in state for n in new) and (suffix or old == "pos_embed"):
                mapping[old + suffix] = [n + suffix for n in new]
    return mapping


def write_sd3_checkpoint(path: str | Path, transformer, vae=None, text_encoders: dict | None = None) -> Path:
    """Write an SD3 transformer as Stability AI's single file (`sd3_medium.safetensors`, SD3.5's
    `sd3.5_*.safetensors` layout): `model.diffusion_model.*` in SAI's MMDiT names (`joint_blocks.{i}.x_block`
    / `context_block`, fused `attn.qkv`, `adaLN_modulation`; the last block's context and the final layer's
    modulation with shift and scale swapped, as diffusers' converter undoes), `first_stage_model.*` (the VAE,
    LDM names) and `text_encoders.{clip_l,clip_g,t5xxl}.transformer.*` (transformers' names) for the text
    encoders given (keys "clip_l", "clip_g", "t5xxl"). Returns the path.

    Raises:
        ValueError: a transformer with SD3.5's dual attention layers (not written here).
    """
    state = transformer.state_dict()
    if any(".attn2." in key for key in state):
        raise ValueError("write_sd3_checkpoint: dual attention (attn2) layers are not written")
    layers = transformer.config.num_layers
    tensors = {}
    for old, new in _sd3_names(state, layers).items():
        value = torch.cat([state[n] for n in new])
        if old.startswith(("final_layer.adaLN", f"joint_blocks.{layers - 1}.context_block.adaLN")):
            shift, scale = value.chunk(2, dim=0)
            value = torch.cat([scale, shift])
        tensors["model.diffusion_model." + old] = value
    if vae is not None:
        vae_state = vae.state_dict()
        for name, ldm in _ldm_vae_names(dict(vae.config), vae_state).items():
            value = vae_state[name]
            tensors["first_stage_model." + ldm] = (
                value[:, :, None, None] if ".mid.attn_1." in ldm and value.dim() == 2 else value
            )
    for key, model in (text_encoders or {}).items():
        for name, value in model.state_dict().items():
            if key == "t5xxl" and name == "encoder.embed_tokens.weight":
                continue  # tied to `shared.weight`, which the file holds
            full = (
                name
                if key == "t5xxl" or name.startswith("text_model.") or name == "text_projection.weight"
                else "text_model." + name
            )
            tensors[f"text_encoders.{key}.transformer.{full}"] = value
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return Path(path)
