"""Tiny Stable-Diffusion-format models, built offline and deterministically from a seed.

No weights can be downloaded where this project is tested, so it builds its own SD 1.x-shaped
models: a tiny UNet (16x16x4 latents), a slim x2 VAE (32x32 RGB), a tiny CLIP text encoder and
SD 1.x's own CLIP tokenizer (CLIP's BPE vocabulary, read from the file `open_clip` ships). They are
saved with `save_pretrained` and loaded back by the same code that loads real checkpoints.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

# SD 1.x scheduler: scaled-linear betas 0.00085..0.012 over 1000 training steps (diffusers' config
# of runwayml/stable-diffusion-v1-5, DDIM flavour).
SD1_SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}

TINY_UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=32,
)

TINY_VAE_CONFIG = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    norm_num_groups=32,
)

TINY_TEXT_CONFIG = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    projection_dim=32,
)

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# OpenAI CLIP's BPE file (as open_clip ships it): a header line, then merges; CLIP uses the first
# 49152 - 256 - 2 of them, so that bytes (256, twice) + merges + BOS/EOS make 49,408 tokens.
CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_MERGES = 49152 - 256 - 2
CLIP_VOCAB_SIZE = 49408


def _byte_characters() -> list[str]:
    """GPT-2's reversible byte -> unicode characters (the alphabet CLIP's BPE works on), in CLIP's order."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def clip_bpe_path() -> Path:
    """The CLIP BPE merges file shipped inside the `open_clip` package (`open_clip_torch` on PyPI).

    Found without importing `open_clip` (its package import needs torchvision and more; only the
    data file is used, so it is installed with `pip install --no-deps open_clip_torch`).

    Raises:
        FileNotFoundError: open_clip is not installed, or ships no BPE file (the message gives the fix).
    """
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / CLIP_BPE_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"CLIP's BPE vocabulary ({CLIP_BPE_FILE}) was not found: install it with "
        "`pip install --no-deps open_clip_torch` (data only; `make install` does this)"
    )


def clip_vocabulary() -> tuple[list[str], list[str]]:
    """CLIP's tokens and BPE merges, built from the BPE file the way CLIP's `SimpleTokenizer` does.

    Tokens: the 256 byte characters, the same with the end-of-word suffix `</w>`, one token per merge
    (its two halves joined), then `<|startoftext|>`, `<|endoftext|>`: 49,408 tokens, so token ids
    equal SD 1.x's tokenizer (`openai/clip-vit-large-patch14`): "a</w>" 320, BOS 49406, EOS 49407.

    Returns:
        (tokens in id order, merges as "left right" lines in priority order).
    """
    import gzip

    with gzip.open(clip_bpe_path(), "rt", encoding="utf-8") as file:
        lines = file.read().split("\n")
    merges = lines[1 : CLIP_MERGES + 1]  # line 0 is the version header
    characters = _byte_characters()
    tokens = characters + [c + "</w>" for c in characters] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    if len(tokens) != CLIP_VOCAB_SIZE or len(set(tokens)) != CLIP_VOCAB_SIZE:
        raise ValueError(f"{clip_bpe_path()}: not CLIP's BPE file ({len(set(tokens))} distinct tokens, expected 49408)")
    return tokens, merges


def write_tokenizer(folder: str | Path) -> Path:
    """Write SD 1.x's CLIP tokenizer (vocab.json, merges.txt, configs) into `folder`; return it.

    The vocabulary and merges are CLIP's own (`clip_vocabulary`), so captions tokenise exactly as in
    Stable Diffusion 1.x ("sks" is one token, 48136); the files are those of the Hugging Face
    `CLIPTokenizer` (merges.txt with its `#version: 0.2` header), padded with EOS to 77 tokens.

    Raises:
        FileNotFoundError: the BPE file is not installed (see `clip_bpe_path`).
    """
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokens, merges = clip_vocabulary()
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=EOS)
    tokenizer.model_max_length = TINY_TEXT_CONFIG["max_position_embeddings"]
    tokenizer.save_pretrained(folder)
    return folder


def tiny_components(seed: int = 0, tokenizer_folder: str | Path | None = None) -> dict:
    """Random tiny SD components: `unet`, `vae`, `text_encoder`, `tokenizer`, `scheduler`.

    Deterministic for a given seed (weights are drawn on the CPU generator). The tokenizer is
    written to `tokenizer_folder` (a temporary folder when None) and loaded back.
    """
    import tempfile

    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if tokenizer_folder is None:
        tokenizer_folder = tempfile.mkdtemp(prefix="finextract-tokenizer-")
    write_tokenizer(tokenizer_folder)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    torch.manual_seed(seed + 2)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_TEXT_CONFIG,
    )
    text_encoder = CLIPTextModel(text_config)
    scheduler = DDIMScheduler.from_config(SD1_SCHEDULER_CONFIG)
    return dict(
        unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, scheduler=scheduler
    )


def save_pipeline(components: dict, folder: str | Path) -> Path:
    """Save components as a diffusers `StableDiffusionPipeline` folder (safetensors); return it."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipeline.save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def build_base(folder: str | Path, seed: int = 0) -> Path:
    """Write a random tiny base pipeline folder that `StableDiffusionPipeline.from_pretrained` loads."""
    folder = Path(folder)
    return save_pipeline(tiny_components(seed, tokenizer_folder=folder / "tokenizer"), folder)


# --- the fine-tuned variants: every format users download, from one base (see `build_zoo`) ---

ZOO_CAPTION = "a photo of sks object"
LORA_RANK, LORA_ALPHA = 4, 8.0
# Per-module exceptions, so readers must honour each module's own rank and alpha:
LORA_RANK_PATTERN = {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": 2}
LORA_ALPHA_PATTERN = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": 1.0,
    # the kohya file stores no alpha for this module; readers then assume alpha = rank
    "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v": float(LORA_RANK),
}
LORA_NO_ALPHA_MODULE = "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v"
_UNET_LORA_TARGETS = (".to_q", ".to_k", ".to_v", ".to_out.0")
_TEXT_LORA_TARGETS = ("encoder.layers.0.self_attn.q_proj", "encoder.layers.0.self_attn.v_proj")


def perturbed_copy(model, seed: int, relative_scale: float = 0.05):
    """A deep copy of `model` with every parameter moved by seeded Gaussian noise.

    The noise on a tensor has standard deviation `relative_scale` times the tensor's own (0.01 for
    constant tensors), so a "fine-tune" differs from its base everywhere, deterministically.
    """
    import copy

    import torch

    generator = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in model.parameters():
            spread = parameter.std().item() if parameter.numel() > 1 else 0.0
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
            parameter += (relative_scale * (spread or 0.2) * noise).to(parameter.dtype)
    return model


def zoo_lora(unet, text_encoder, seed: int = 0) -> tuple[dict, dict]:
    """The zoo's random LoRA adapters: (UNet layers, text-encoder layers), module path -> LoRALayer.

    UNet: every attention projection (to_q, to_k, to_v, to_out.0), rank 4, alpha 8, except the
    modules in `LORA_RANK_PATTERN` / `LORA_ALPHA_PATTERN`. Text encoder: the first layer's q_proj and
    v_proj. Deterministic for a seed; every format the zoo writes holds exactly these adapters.
    """
    import torch

    from finextract.engine.pair import LoRALayer

    generator = torch.Generator().manual_seed(seed)

    def adapters(model, names):
        layers = {}
        modules = dict(model.named_modules())
        for name in names:
            module = modules[name]
            rank = LORA_RANK_PATTERN.get(name, LORA_RANK)
            down = torch.randn(rank, module.in_features, generator=generator) * 0.1
            up = torch.randn(module.out_features, rank, generator=generator) * 0.1
            layers[name] = LoRALayer(down=down, up=up, alpha=LORA_ALPHA_PATTERN.get(name, LORA_ALPHA))
        return layers

    unet_names = [
        name for name, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and name.endswith(_UNET_LORA_TARGETS)
    ]
    # transformers 5 names CLIP modules `encoder.layers...`, older ones `text_model.encoder.layers...`
    text_names = [name for name, _ in text_encoder.named_modules() if name.endswith(_TEXT_LORA_TARGETS)]
    return adapters(unet, unet_names), adapters(text_encoder, text_names)


def _file_text_names(layers: dict) -> dict:
    """Text-encoder layers under the names LoRA files use (`text_model.encoder...`, as in CLIP's
    original checkpoints), whatever the installed transformers calls the modules."""
    return {name if name.startswith("text_model.") else "text_model." + name: layer for name, layer in layers.items()}


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


def write_lora_diffusers(folder: str | Path, unet_layers: dict, text_layers: dict) -> Path:
    """Write `pytorch_lora_weights.safetensors` the way diffusers' `save_lora_weights` does.

    Keys `unet.<path>.lora_A.weight` / `.lora_B.weight` (and `text_encoder.`); ranks and alphas in
    the file's `lora_adapter_metadata` (diffusers >= 0.34). Returns the file's path.
    """
    from diffusers import StableDiffusionPipeline

    text_layers = _file_text_names(text_layers)
    StableDiffusionPipeline.save_lora_weights(
        str(folder),
        unet_lora_layers=_peft_tensors(unet_layers),
        text_encoder_lora_layers=_peft_tensors(text_layers),
        unet_lora_adapter_metadata=_peft_config(unet_layers),
        text_encoder_lora_adapter_metadata=_peft_config(text_layers),
    )
    return Path(folder) / "pytorch_lora_weights.safetensors"


def write_lora_peft(folder: str | Path, unet_layers: dict, text_layers: dict) -> Path:
    """Write a PEFT adapter folder: the UNet adapter at the top, the text encoder's in `text_encoder/`.

    Each holds `adapter_config.json` (peft's `LoraConfig.save_pretrained`) and
    `adapter_model.safetensors` with `base_model.model.<path>.lora_A.weight` keys, as
    `PeftModel.save_pretrained` writes them. Returns the folder.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    folder = Path(folder)
    for target, layers in ((folder, unet_layers), (folder / "text_encoder", _file_text_names(text_layers))):
        target.mkdir(parents=True, exist_ok=True)
        LoraConfig(**_peft_config(layers)).save_pretrained(str(target))
        save_file(
            _peft_tensors(layers, "base_model.model."),
            str(target / "adapter_model.safetensors"),
            metadata={"format": "pt"},
        )
    return folder


def write_lora_kohya(path: str | Path, unet_layers: dict, text_layers: dict, no_alpha: tuple[str, ...] = ()) -> Path:
    """Write a kohya-ss (sd-scripts) LoRA file: `lora_unet_<path with _>.lora_down.weight`,
    `.lora_up.weight`, `.alpha` (and `lora_te_` for the text encoder). Modules named in `no_alpha`
    get no `.alpha` key (readers then assume alpha = rank). Returns the path.
    """
    import torch
    from safetensors.torch import save_file

    tensors = {}
    for prefix, layers in (("lora_unet_", unet_layers), ("lora_te_", _file_text_names(text_layers))):
        for name, layer in layers.items():
            key = prefix + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = layer.down.contiguous()
            tensors[f"{key}.lora_up.weight"] = layer.up.contiguous()
            if name not in no_alpha and name.removeprefix("text_model.") not in no_alpha:
                tensors[f"{key}.alpha"] = torch.tensor(float(layer.alpha))
    save_file(tensors, str(path), metadata={"format": "pt"})
    return Path(path)


def build_zoo(out: str | Path, seed: int = 0) -> Path:
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
    The fine-tune is the base perturbed by seeded noise (`perturbed_copy`); "trained" weights are
    another issue's.

    Args:
        out: folder to create or fill (existing files are overwritten).
        seed: seed of every random weight.

    Returns:
        `out` as a Path.
    """
    import logging

    from safetensors.torch import save_file

    log = logging.getLogger(__name__)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log.info("zoo: base (seed %d)", seed)
    base = tiny_components(seed, tokenizer_folder=out / "base" / "tokenizer")
    save_pipeline(base, out / "base")

    log.info("zoo: DreamBooth variants")
    unet = perturbed_copy(base["unet"], seed + 1000)
    text_encoder = perturbed_copy(base["text_encoder"], seed + 1001)
    save_pipeline({**base, "unet": unet, "text_encoder": text_encoder}, out / "dreambooth")
    unet.save_pretrained(out / "dreambooth_unet" / "unet")
    text_encoder.save_pretrained(out / "dreambooth_unet" / "text_encoder")
    unet.save_pretrained(out / "dreambooth_unet_only" / "unet")
    state = {key: value.contiguous() for key, value in unet.state_dict().items()}
    save_file(state, str(out / "dreambooth_unet.safetensors"), metadata={"format": "pt"})

    log.info("zoo: LoRA in diffusers, PEFT and kohya formats")
    unet_layers, text_layers = zoo_lora(base["unet"], base["text_encoder"], seed + 2000)
    write_lora_diffusers(out / "lora", unet_layers, text_layers)
    write_lora_peft(out / "lora_peft", unet_layers, text_layers)
    write_lora_kohya(out / "lora_kohya.safetensors", unet_layers, text_layers, no_alpha=(LORA_NO_ALPHA_MODULE,))
    (out / "caption.txt").write_text(ZOO_CAPTION + "\n")
    return out


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
    from safetensors.torch import save_file

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


def write_ldm_checkpoint(path: str | Path, unet, text_encoder=None, vae=None, *, drop: tuple[str, ...] = ()) -> Path:
    """Write models as one original-Stable-Diffusion-layout (LDM / CompVis) `.safetensors` file:
    `model.diffusion_model.*` (UNet), `cond_stage_model.transformer.text_model.*` (CLIP, the
    names of the original checkpoints), `first_stage_model.*` (VAE; attention projections as 1x1
    convolutions, as the original VAE stores them). `drop` removes LDM tensor names (a partial file).
    Returns the path.
    """
    from safetensors.torch import save_file

    tensors = {}
    state = unet.state_dict()
    for name, ldm in _ldm_unet_names(dict(unet.config), state).items():
        tensors["model.diffusion_model." + ldm] = state[name]
    if text_encoder is not None:
        for name, value in text_encoder.state_dict().items():
            full = name if name.startswith("text_model.") else "text_model." + name
            tensors["cond_stage_model.transformer." + full] = value
    if vae is not None:
        state = vae.state_dict()
        for name, ldm in _ldm_vae_names(dict(vae.config), state).items():
            value = state[name]
            if ".mid.attn_1." in ldm and value.dim() == 2:
                value = value[:, :, None, None]
            tensors["first_stage_model." + ldm] = value
    for name in drop:
        del tensors[name]
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return Path(path)
