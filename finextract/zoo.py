"""Tiny Stable-Diffusion-format models of every family, built offline and deterministically from a seed.

No weights can be downloaded where this project is tested, so it builds its own models: a tiny UNet
(16x16x4 latents), a slim x2 VAE (32x32 RGB), tiny text encoders and their tokenizers (SD 1.x's own
CLIP BPE vocabulary, read from the file `open_clip` ships; a minimal XLM-R-style one for
AltDiffusion). They are saved with `save_pretrained` and loaded back by the same code that loads
real checkpoints. Each family (`ZOO_FAMILIES`) keeps the markers its released models have,
at tiny size:

| zoo family | UNet | text encoder(s) | tokenizer | scheduler |
|---|---|---|---|---|
| `sd1` | conv projections, cross-attention 32 | CLIP, quick_gelu (OpenAI CLIP) | CLIP BPE (SD 1.x's own) | SD 1.5's (epsilon) |
| `sd2` | linear projections, per-block heads, cross-attention 48 | CLIP, gelu (OpenCLIP) | CLIP BPE | SD 2.1-base's (epsilon) |
| `sd2-v` | as `sd2` | as `sd2` | CLIP BPE | v-prediction, trailing spacing, zero-terminal-SNR betas |
| `sdxl` | SDXL's block layout, `text_time` added embedding (6 time ids), cross-attention 64 = 32 + 32 | CLIP (quick_gelu) + CLIP with projection (gelu, OpenCLIP bigG) | two CLIP BPE (the second pads with "!") | SDXL's (epsilon, leading) |
| `altdiffusion` | as `sd1` | XLM-R (`RobertaSeriesModelWithTransformation`, pre-transformation) | XLM-R-style Unigram, characters | SD 1.5's |

The XLM-R-style tokenizer is minimal (no package ships XLM-R's 250k-piece SentencePiece model): a
Unigram vocabulary of XLM-R's special tokens and single characters of several scripts (each also
with SentencePiece's word-start marker), built with `transformers.XLMRobertaTokenizer(vocab=...)`.
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

# SD 2.x: linear transformer projections and per-block head counts, an OpenCLIP-style (gelu) encoder
TINY_SD2_UNET_CONFIG = dict(
    TINY_UNET_CONFIG, cross_attention_dim=48, use_linear_projection=True, attention_head_dim=(2, 4)
)
TINY_SD2_TEXT_CONFIG = dict(
    TINY_TEXT_CONFIG, hidden_size=48, intermediate_size=96, hidden_act="gelu", projection_dim=48
)
# SDXL base: no attention in the first block, more transformer layers deeper, the text_time added
# embedding of 6 time ids x 8 + the pooled width 32 = 80, cross-attention 32 + 32 (both encoders)
TINY_SDXL_UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2),
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 32,
    cross_attention_dim=64,
    norm_num_groups=32,
)
TINY_SDXL_TEXT_CONFIG_2 = dict(TINY_TEXT_CONFIG, hidden_act="gelu", projection_dim=32)
TINY_XLMR_TEXT_CONFIG = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=80,  # XLM-R's positions start after the padding index: 77 + 2 needed
    type_vocab_size=1,
    project_dim=32,
    has_pre_transformation=True,  # AltDiffusion's: penultimate states, layer norm, projection
    # XLM-R's init (std 0.02) makes a tiny random encoder whose captions barely move the images (CFG and
    # Direct 4 levels apart at 3 steps); at 0.3 they move them as the tiny CLIP encoders do (20 levels)
    initializer_range=0.3,
)
SD2_SCHEDULER_CONFIG = dict(SD1_SCHEDULER_CONFIG)
# SD 2.1-v with the zero-terminal-SNR recipe (Lin et al. 2024): trailing spacing, rescaled betas
SD2_V_SCHEDULER_CONFIG = dict(
    SD1_SCHEDULER_CONFIG, prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True
)
SDXL_SCHEDULER_CONFIG = dict(SD1_SCHEDULER_CONFIG, timestep_spacing="leading")
#: zoo family -> (finextract family, scheduler config); "sd2-v" is SD 2.x with v-prediction
ZOO_FAMILIES = {
    "sd1": ("sd1", SD1_SCHEDULER_CONFIG),
    "sd2": ("sd2", SD2_SCHEDULER_CONFIG),
    "sd2-v": ("sd2", SD2_V_SCHEDULER_CONFIG),
    "sdxl": ("sdxl", SDXL_SCHEDULER_CONFIG),
    "altdiffusion": ("altdiffusion", SD1_SCHEDULER_CONFIG),
}


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


def _xlmr_characters() -> list[str]:
    """Single characters of several scripts for the minimal XLM-R-style vocabulary (ASCII, Latin-1,
    Greek, Cyrillic, kana and the first CJK ideographs), in a fixed order."""
    ranges = [(0x21, 0x7E), (0xA1, 0xFF), (0x391, 0x3C9), (0x410, 0x44F), (0x3041, 0x3096), (0x30A1, 0x30FA)]
    ranges.append((0x4E00, 0x4EFF))
    return [chr(code) for low, high in ranges for code in range(low, high + 1)]


def write_xlmr_tokenizer(folder: str | Path) -> Path:
    """Write a minimal XLM-R-style tokenizer (AltDiffusion's kind) into `folder` and return it.

    A Unigram model (what XLM-R's SentencePiece model is) whose vocabulary is XLM-R's special tokens
    in XLM-R's order (`<s>` 0, `<pad>` 1, `</s>` 2, `<unk>` 3, `<mask>` last), the word-start marker
    and every character of `_xlmr_characters` alone and after the marker; characters outside it
    become `<unk>`. `model_max_length` 77, as AltDiffusion's tokenizer.
    """
    from transformers import XLMRobertaTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    characters = _xlmr_characters()
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + c, -2.5) for c in characters] + [(c, -3.0) for c in characters] + [("<mask>", 0.0)]
    tokenizer = XLMRobertaTokenizer(vocab=vocab, model_max_length=TINY_TEXT_CONFIG["max_position_embeddings"])
    tokenizer.save_pretrained(folder)
    return folder


def _clip_text_encoder(tokenizer, config: dict, with_projection: bool = False):
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
    import tempfile

    import torch
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
    from finextract.engine.families import get_family

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


def _random_adapters(model, names, generator) -> dict:
    import torch

    from finextract.engine.pair import LoRALayer

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
    import torch

    generator = torch.Generator().manual_seed(seed)
    unet_names = [
        name for name, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and name.endswith(_UNET_LORA_TARGETS)
    ]
    text_names = [name for name, _ in text_encoder.named_modules() if name.endswith(_TEXT_LORA_TARGETS)]
    return _random_adapters(unet, unet_names, generator), _random_adapters(text_encoder, text_names, generator)


def zoo_family_lora(components: dict, seed: int = 0) -> dict[str, dict]:
    """`zoo_lora` for a family's components: component ("unet", "text_encoder", SDXL's
    "text_encoder_2": its first layer's q_proj / v_proj and its `text_projection`) -> module path -> LoRALayer."""
    import torch

    unet_layers, text_layers = zoo_lora(components["unet"], components["text_encoder"], seed)
    layers = {"unet": unet_layers, "text_encoder": text_layers}
    if "text_encoder_2" in components:
        model = components["text_encoder_2"]
        names = [name for name, _ in model.named_modules() if name.endswith(_TEXT_2_LORA_TARGETS)]
        layers["text_encoder_2"] = _random_adapters(model, names, torch.Generator().manual_seed(seed + 1))
    return layers


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
    from safetensors.torch import save_file

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
    import torch
    from safetensors.torch import save_file

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
    The fine-tune is the base perturbed by seeded noise (`perturbed_copy`); "trained" weights are
    another issue's.

    Args:
        out: folder to create or fill (existing files are overwritten).
        seed: seed of every random weight.
        families: the other zoo families to write (default all of `ZOO_FAMILIES` but "sd1").

    Returns:
        `out` as a Path.

    Raises:
        ValueError: an unknown family in `families`.
    """
    import logging

    from safetensors.torch import save_file

    log = logging.getLogger(__name__)
    families = tuple(name for name in ZOO_FAMILIES if name != "sd1") if families is None else tuple(families)
    unknown = [name for name in families if name not in ZOO_FAMILIES or name == "sd1"]
    if unknown:
        raise ValueError(
            f"zoo families {unknown}: expected some of {', '.join(n for n in ZOO_FAMILIES if n != 'sd1')} "
            "(SD 1.x is always written, at the top level)"
        )
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
    for family in families:
        log.info("zoo: %s family", family)
        build_family_zoo(out / family, family, seed)
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
    import torch

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
    import torch
    from safetensors.torch import save_file

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
