"""Load a pretrained model and its fine-tune, in any format users download, into a `ModelPair`.

Order of work: resolve both paths, detect the fine-tune's format, compare configs and state-dict
keys/shapes (cheap: JSON files and safetensors headers), and only then load weights. Nothing is
downloaded: hub ids resolve from the local Hugging Face cache only. Pickles are refused unless
`allow_pickle=True` (see `formats`).
"""

from __future__ import annotations

import copy
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from .formats import PickleRefusedError, file_sha256, read_safetensors_header, sniff, state_dict_keys
from .pair import ModelPair

logger = logging.getLogger(__name__)

FINETUNED_FORMATS = (
    "auto",
    "pipeline",
    "unet_folder",
    "unet_file",
    "checkpoint",
    "lora",
    "lora_diffusers",
    "lora_peft",
    "lora_kohya",
)
# UNet config entries that change the architecture (sample_size and the like do not)
_UNET_ARCH_KEYS = (
    "in_channels",
    "out_channels",
    "cross_attention_dim",
    "block_out_channels",
    "layers_per_block",
    "down_block_types",
    "up_block_types",
    "mid_block_type",
    "attention_head_dim",
    "num_attention_heads",
    "transformer_layers_per_block",
    "use_linear_projection",
    "norm_num_groups",
    "addition_embed_type",
    "class_embed_type",
    "time_cond_proj_dim",
)
_TEXT_ARCH_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
    "max_position_embeddings",
)
_FAMILY_BY_CROSS_ATTENTION = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}
# detected full fine-tune formats in plain words, for "this is not a LoRA" messages
_FULL_FINETUNE_WORDS = {
    "pipeline": "a full fine-tuned (DreamBooth) pipeline folder",
    "unet_folder": "a full fine-tuned (DreamBooth) UNet folder",
    "unet_file": "a full fine-tuned (DreamBooth) UNet state dict",
    "checkpoint": "a full fine-tuned (DreamBooth) single-file Stable Diffusion checkpoint",
}


# --- paths ---


def _resolve_path(spec: str | Path, what: str) -> Path:
    """A local path, or a hub id ("org/name") resolved from the local Hugging Face cache only."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    text = str(spec)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text) and not text.startswith((".", "/")) and not path.suffix:
        from huggingface_hub import snapshot_download
        from huggingface_hub.constants import HF_HUB_CACHE

        try:
            return Path(snapshot_download(text, local_files_only=True))
        except Exception as error:  # LocalEntryNotFoundError, or a cache entry without a snapshot
            raise FileNotFoundError(
                f"{what} {text!r}: no such local path, and as a hub id: offline: not in the local Hugging Face cache "
                f"({HF_HUB_CACHE}) and nothing is downloaded here ({type(error).__name__}); pass a local folder or file"
            ) from None
    raise FileNotFoundError(f"{what} {text!r}: no such file or folder")


def _check_weight_files(folder: Path, allow_pickle: bool) -> bool:
    """Sniff the weight files of a model folder; return whether to load safetensors.

    Raises CheckpointFormatError for an HTML page / git-lfs pointer / truncated file saved as
    weights, PickleRefusedError when only pickles exist and `allow_pickle` is False.
    """
    safetensors = sorted(folder.glob("*.safetensors"))
    for file in safetensors:
        read_safetensors_header(file)
    if safetensors:
        return True
    pickles = sorted(p for p in folder.iterdir() if p.suffix in (".bin", ".ckpt", ".pt", ".pth"))
    if not pickles:
        raise FileNotFoundError(f"{folder}: no weights file (*.safetensors) in this model folder")
    if not allow_pickle:
        raise PickleRefusedError(
            f"{folder} holds only pickle weights ({pickles[0].name}), which can run code when loaded: refused. "
            "Use a safetensors version, or pass allow_pickle=True (CLI --allow-pickle) if you trust its source"
        )
    for file in pickles:
        if sniff(file) not in ("pickle", "pickle-zip"):
            from .formats import _not_weights_message

            raise ValueError(_not_weights_message(file, sniff(file)))
    return False


def _read_config(folder: Path) -> dict:
    file = folder / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected a diffusers/transformers model folder)")
    return json.loads(file.read_text())


# --- compatibility ---


def _norm(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def check_unet_configs(base: dict, finetuned: dict, where: str = "fine-tuned UNet") -> None:
    """Compare the architecture entries of two UNet configs.

    Args:
        base, finetuned: `config.json` contents (diffusers `UNet2DConditionModel`).
        where: how to name the fine-tuned side in the message.

    Raises:
        ValueError: an entry differs; the message names every differing entry and, for
            cross_attention_dim, the model family each value belongs to (768 SD 1.x, 1024 SD 2.x,
            2048 SDXL).
    """
    problems = []
    for key in _UNET_ARCH_KEYS:
        a, b = _norm(base.get(key)), _norm(finetuned.get(key))
        if a != b:
            message = f"{where} has {key} {b}, base has {a}"
            if key == "cross_attention_dim" and b in _FAMILY_BY_CROSS_ATTENTION:
                message += f": is the base {_FAMILY_BY_CROSS_ATTENTION[b]}?"
            problems.append(message)
    if problems:
        raise ValueError("incompatible base and fine-tune: " + "; ".join(problems))


def check_text_configs(base: dict, finetuned: dict, where: str = "fine-tuned text encoder") -> None:
    """Like `check_unet_configs` for CLIP text-encoder configs (a vocab_size change means added tokens)."""
    problems = [
        f"{where} has {key} {finetuned.get(key)}, base has {base.get(key)}"
        for key in _TEXT_ARCH_KEYS
        if base.get(key) != finetuned.get(key)
    ]
    if problems:
        raise ValueError("incompatible base and fine-tune: " + "; ".join(problems))


def check_state_dict(expected: dict, found: dict, where: str) -> None:
    """Compare tensor names and shapes (name -> shape tuples).

    Raises:
        ValueError: naming the count and first few missing, unexpected and mis-shaped tensors.
    """
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [
        f"{k} {tuple(found[k])} vs base {tuple(expected[k])}"
        for k in sorted(set(expected) & set(found))
        if tuple(found[k]) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} base tensor(s) missing, e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[:3]}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es), e.g. {shapes[:3]}")
    if problems:
        raise ValueError(f"{where} does not match the base UNet: " + "; ".join(problems))


# --- format detection ---


def detect_finetuned_format(path: Path) -> str:
    """The fine-tune's format from its folder listing or file header (no weights loaded).

    Returns one of "pipeline", "unet_folder", "unet_file", "checkpoint" (a single-file SD
    checkpoint in the original LDM layout), "lora_diffusers", "lora_peft", "lora_kohya".

    Raises:
        ValueError: nothing recognisable, with what was expected.
    """
    from .formats import CheckpointFormatError, _not_weights_message
    from .lora_formats import detect_lora_format

    if path.is_file():  # sniff first: an HTML page or text file under a weights name is named as such
        kind = sniff(path)
        if kind not in ("safetensors", "pickle", "pickle-zip"):
            raise CheckpointFormatError(_not_weights_message(path, kind))
    lora = detect_lora_format(path)
    if lora:
        return f"lora_{lora}"
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return "pipeline"
        if (path / "unet" / "config.json").is_file():
            return "unet_folder"
        if (path / "config.json").is_file() and "UNet" in _read_config(path).get("_class_name", ""):
            return "unet_folder"
        raise ValueError(
            f"{path}: not a recognised fine-tune folder (expected model_index.json, unet/config.json, "
            "adapter_config.json or pytorch_lora_weights.safetensors)"
        )
    keys = state_dict_keys(path) if sniff(path) == "safetensors" else None
    if keys is None:  # a pickle: its format is known only after loading, which allow_pickle governs
        return "unet_file"
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "checkpoint"
    if "conv_in.weight" in keys or "unet.conv_in.weight" in keys:
        return "unet_file"
    raise ValueError(
        f"{path}: a safetensors file of neither a UNet, an SD checkpoint nor a LoRA (e.g. key {next(iter(keys), None)!r})"
    )


# --- loading parts ---


def _load_folder_parts(folder: Path, allow_pickle: bool, parts: tuple[str, ...]) -> dict:
    """Load the named parts ("unet", "text_encoder", "vae", "tokenizer") of a pipeline folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    loaded = {}
    for part in parts:
        sub = folder / part
        if part == "tokenizer":
            loaded[part] = CLIPTokenizer.from_pretrained(str(sub))
            continue
        use_safetensors = _check_weight_files(sub, allow_pickle)
        cls = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}[part]
        loaded[part] = cls.from_pretrained(str(sub), use_safetensors=use_safetensors).eval()
    return loaded


def _load_single_file(path: Path, config: Path | None, allow_pickle: bool, what: str):
    """A single-file SD checkpoint through diffusers' `from_single_file`, offline."""
    from diffusers import StableDiffusionPipeline

    if sniff(path) in ("pickle", "pickle-zip") and not allow_pickle:
        raise PickleRefusedError(
            f"{what} {path} is a pickle checkpoint, which can run code when loaded: refused. Use a .safetensors "
            "version, or pass allow_pickle=True (CLI --allow-pickle) if you trust its source"
        )
    if sniff(path) == "safetensors":
        read_safetensors_header(path)
    try:
        return StableDiffusionPipeline.from_single_file(
            str(path),
            config=str(config) if config else None,
            local_files_only=True,
            safety_checker=None,
            requires_safety_checker=False,
        )
    except Exception as error:
        hint = (
            "pass base_config=<a local diffusers pipeline folder of the same architecture> (CLI --base-config)"
            if config is None
            else f"check that {config} is a pipeline folder of the same architecture"
        )
        raise RuntimeError(
            f"{what} {path}: diffusers' from_single_file failed offline ({type(error).__name__}: {error}); "
            f"its diffusers config must be local: {hint}"
        ) from None


def _to_dtype(dtype):
    from finextract.engine.config import torch_dtype

    return None if dtype is None else torch_dtype(dtype)


@dataclass(frozen=True, eq=False)
class LoadedBase:
    """A pretrained model loaded once (`load_base`), to pair with many fine-tunes without reading it again.

    `load_model_pair(loaded_base, finetuned or lora=...)` uses its models as they are: a DreamBooth
    pair shares them (a pair changes no model), and a LoRA pair with UNet adapters gets its own copy
    of the base UNet's module tree holding the same weight tensors (`copy_sharing_weights`: the
    adapters are hooks on that UNet's modules, and a UNet serves one pair; a full `copy.deepcopy` of
    an SD 1.x UNet took 5x longer than loading it again from the page cache). The pair's `sources`
    and fingerprint are the same as when the base is loaded from disk.

    Attributes:
        spec: the base as given (path or hub id); `str()` and `os.fspath()` give its resolved path.
        parts: unet, text_encoder, vae, tokenizer, scheduler_config (as `load_model_pair` loads them).
        sources: where the base came from (`base`, `base_format`, ...).
        folder: its pipeline folder (or the `base_config` folder of a single-file base), or None.
    """

    spec: str
    parts: dict
    sources: dict
    folder: Path | None

    def __fspath__(self) -> str:
        return self.sources["base"]

    def __str__(self) -> str:
        return self.spec


def copy_sharing_weights(module):
    """A copy of `module`'s module tree (its own submodules, hooks and attributes) whose parameters and
    buffers are the very tensors of `module`: no weight is copied, so it costs milliseconds at SD size.

    Hooks added to the copy (a LoRA pair's gated adapters) leave `module` untouched; an in-place change
    to a weight changes both.
    """
    import itertools

    memo = {id(tensor): tensor for tensor in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo)


def load_base(
    base: str | Path,
    *,
    base_config: str | Path | None = None,
    allow_pickle: bool = False,
    device: str = "cpu",
    dtype=None,
) -> LoadedBase:
    """Load a pretrained model once, for `load_model_pair(LoadedBase, ...)` with many fine-tunes.

    Args:
        base, base_config, allow_pickle: as `load_model_pair`.
        device: where the UNet, text encoder and VAE go. dtype: the UNet and text-encoder precision
            (None keeps float32); the VAE keeps float32 (`ModelPair.place` sets the run's VAE precision).

    Returns:
        LoadedBase.

    Raises:
        FileNotFoundError / ValueError / RuntimeError: as `load_model_pair` for its base.
    """
    parts, sources, folder = _load_base(base, base_config, allow_pickle)
    torch_dtype = _to_dtype(dtype)
    for name in ("unet", "text_encoder", "vae"):
        parts[name].to(device)
        if name != "vae" and torch_dtype is not None and parts[name].dtype != torch_dtype:
            parts[name].to(dtype=torch_dtype)
    return LoadedBase(spec=str(base), parts=parts, sources=sources, folder=folder)


def _load_base(base, base_config, allow_pickle: bool) -> tuple[dict, dict, Path | None]:
    """Base parts (unet, text_encoder, vae, tokenizer, scheduler_config), sources, and its pipeline folder."""
    if isinstance(base, LoadedBase):  # loaded already: its models, shared (see LoadedBase)
        return dict(base.parts), dict(base.sources), base.folder
    path = _resolve_path(base, "base")
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"base {path}: not a diffusers pipeline folder (no model_index.json)")
        parts = _load_folder_parts(path, allow_pickle, ("unet", "text_encoder", "vae", "tokenizer"))
        parts["scheduler_config"] = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        fmt = "pipeline" if Path(base).expanduser().exists() else "hub-cache"
        return parts, {"base": str(path), "base_format": fmt}, path
    config = _resolve_path(base_config, "base_config") if base_config else None
    pipeline = _load_single_file(path, config, allow_pickle, "base")
    parts = dict(
        unet=pipeline.unet.eval(),
        text_encoder=pipeline.text_encoder.eval(),
        vae=pipeline.vae.eval(),
        tokenizer=pipeline.tokenizer,
        scheduler_config=dict(pipeline.scheduler.config),
    )
    return (
        parts,
        {"base": str(path), "base_format": "single-file", "base_config": str(config) if config else None},
        config,
    )


def load_model_pair(
    base: str | Path,
    finetuned: str | Path | None = None,
    *,
    lora: str | Path | None = None,
    finetuned_format: str = "auto",
    allow_pickle: bool = False,
    dtype=None,
    device: str = "cpu",
    base_config: str | Path | None = None,
) -> ModelPair:
    """Load a pretrained model (theta) and a checkpoint fine-tuned from it (theta').

    Args:
        base: a diffusers pipeline folder, a single-file SD checkpoint (`.safetensors`; `.ckpt`
            with `allow_pickle`), a hub id found in the local Hugging Face cache, or a `LoadedBase`
            (`load_base`: loaded once for many fine-tunes; `base_config` is then not read).
        finetuned: the fine-tune: a full pipeline folder, a bare `unet/` folder (with or without
            `text_encoder/`), a single-file UNet state dict, a single-file SD checkpoint, or a LoRA
            (diffusers file/folder, PEFT adapter folder, kohya file). None when `lora` is given.
        lora: a LoRA checkpoint (same as passing it as `finetuned`).
        finetuned_format: "auto" or one of `FINETUNED_FORMATS` ("lora" = any LoRA format).
        allow_pickle: allow pickle weights, read with `torch.load(weights_only=True)`.
        dtype: torch dtype (or "fp32"/"fp16"/"bf16") to cast every model to; None keeps float32.
        device: where the models go ("cpu", "cuda", "cuda:N").
        base_config: a local diffusers pipeline folder whose configs describe a single-file base
            (diffusers' `from_single_file(config=...)`), needed offline when the hub cache lacks it.

    Returns:
        ModelPair: kind "dreambooth" (two UNets; the checkpoint's text encoder when it ships one)
        or "lora" (base UNet plus `unet_lora` adapters, not merged; a text-encoder LoRA is merged
        into a copy of the base text encoder). `sources` records paths, formats, the LoRA key
        counts, `lora_alpha_assumed` and the LoRA file's sha256.

    Raises:
        FileNotFoundError: a path does not exist; a hub id is not in the local cache ("offline").
        ValueError: incompatible base and fine-tune (names what differs), unknown format, a LoRA
            key matching no module (`LoRAKeyError`), a file that is not weights
            (`CheckpointFormatError`: HTML, git-lfs pointer, truncated), a refused pickle
            (`PickleRefusedError`).
        RuntimeError: diffusers could not convert a single-file checkpoint offline.
    """
    if finetuned is not None and lora is not None:
        raise ValueError("pass the fine-tune as `finetuned` or as `lora`, not both")
    if finetuned is None and lora is None:
        raise ValueError("no fine-tuned checkpoint: pass `finetuned` (a DreamBooth folder/file or a LoRA) or `lora`")
    if finetuned_format not in FINETUNED_FORMATS:
        raise ValueError(f"finetuned_format {finetuned_format!r}: expected one of {', '.join(FINETUNED_FORMATS)}")
    torch_dtype = _to_dtype(dtype)
    ft_path = _resolve_path(finetuned if finetuned is not None else lora, "fine-tuned checkpoint")
    fmt = finetuned_format
    if lora is not None and fmt == "auto":
        fmt = "lora"
    if fmt in ("auto", "lora"):
        if fmt == "lora" and ft_path.is_file() and sniff(ft_path) in ("pickle", "pickle-zip"):
            fmt = "lora_diffusers"  # a pickle's keys are known only after loading, which allow_pickle governs
        else:
            detected = detect_finetuned_format(ft_path)
            if fmt == "lora" and not detected.startswith("lora_"):
                raise ValueError(
                    f"{ft_path} is {_FULL_FINETUNE_WORDS[detected]}, not a LoRA checkpoint: pass it as --finetuned "
                    "(finetuned=...) instead of --lora"
                )
            fmt = detected
    elif not fmt.startswith("lora"):
        from .lora_formats import detect_lora_format

        if detect_lora_format(ft_path):
            raise ValueError(
                f"{ft_path} is a LoRA checkpoint, not a full fine-tune ({fmt}): pass it as --lora (lora=...), "
                "or leave finetuned_format='auto'"
            )
    # 1. cheap checks on configs and headers before loading weights
    base_path = _resolve_path(base, "base")
    if base_path.is_dir() and (base_path / "unet" / "config.json").is_file():
        base_unet_config = _read_config(base_path / "unet")
        ft_unet_dir = None
        if fmt == "pipeline" or (fmt == "unet_folder" and (ft_path / "unet").is_dir()):
            ft_unet_dir = ft_path / "unet"
        elif fmt == "unet_folder":
            ft_unet_dir = ft_path
        if ft_unet_dir is not None:
            check_unet_configs(base_unet_config, _read_config(ft_unet_dir))
        ft_text_dir = ft_path / "text_encoder" if fmt in ("pipeline", "unet_folder") else None
        if ft_text_dir is not None and ft_text_dir.is_dir():
            check_text_configs(_read_config(base_path / "text_encoder"), _read_config(ft_text_dir))
    # 2. the base
    parts, sources, base_folder = _load_base(base, base_config, allow_pickle)
    sources.update(finetuned=str(ft_path), finetuned_format=fmt)
    base_unet, base_text = parts["unet"], parts["text_encoder"]
    finetuned_unet, unet_lora, ft_text, vae = None, None, base_text, parts["vae"]
    # 3. the fine-tune
    if fmt.startswith("lora_"):
        from .lora import merge_lora
        from .lora_formats import read_lora

        weights = read_lora(ft_path, base_unet, base_text, format=fmt.removeprefix("lora_"), allow_pickle=allow_pickle)
        unet_lora = weights.unet or None
        if unet_lora and isinstance(base, LoadedBase):  # the adapters hook this pair's own UNet modules
            base_unet = copy_sharing_weights(base_unet)
        if weights.text_encoder:
            ft_text = merge_lora(copy.deepcopy(base_text), weights.text_encoder)
        sources.update(lora_format=weights.format, lora_counts=weights.counts, lora_alpha_assumed=weights.alpha_assumed)
        if ft_path.is_file():
            sources["lora_sha256"] = file_sha256(ft_path)
        kind = "lora"
    else:
        kind = "dreambooth"
        if fmt in ("pipeline", "unet_folder"):
            unet_dir = ft_path / "unet" if (ft_path / "unet").is_dir() else ft_path
            finetuned_unet = _load_unet_dir(unet_dir, allow_pickle)
            check_unet_configs(dict(base_unet.config), dict(finetuned_unet.config))
            if unet_dir != ft_path and (ft_path / "text_encoder").is_dir():
                ft_text = _load_folder_parts(ft_path, allow_pickle, ("text_encoder",))["text_encoder"]
                check_text_configs(base_text.config.to_dict(), ft_text.config.to_dict())
            if fmt == "pipeline" and (ft_path / "vae").is_dir():
                vae = _load_folder_parts(ft_path, allow_pickle, ("vae",))["vae"]
        elif fmt == "unet_file":
            finetuned_unet = _load_unet_file(ft_path, base_unet, allow_pickle)
        else:  # "checkpoint": single-file SD checkpoint, converted with the base's configs
            if base_folder is None:
                raise ValueError(f"{ft_path}: a single-file fine-tune needs a base pipeline folder for its configs")
            pipeline = _load_single_file(ft_path, base_folder, allow_pickle, "fine-tuned checkpoint")
            check_unet_configs(dict(base_unet.config), dict(pipeline.unet.config))
            finetuned_unet, ft_text = pipeline.unet.eval(), pipeline.text_encoder.eval()
        sources["text_encoder"] = "finetuned" if ft_text is not base_text else "base"
    pair = ModelPair(
        kind=kind,
        base_unet=base_unet,
        finetuned_unet=finetuned_unet,
        unet_lora=unet_lora,
        base_text_encoder=base_text,
        finetuned_text_encoder=ft_text,
        base_tokenizer=parts["tokenizer"],
        vae=vae,
        scheduler_config=parts["scheduler_config"],
        sources=sources,
    )
    if torch_dtype is None and str(device) == "cpu":
        return pair  # loaded on the CPU in float32 already
    return pair.to(device, torch_dtype)


def _load_unet_dir(folder: Path, allow_pickle: bool):
    from diffusers import UNet2DConditionModel

    use_safetensors = _check_weight_files(folder, allow_pickle)
    return UNet2DConditionModel.from_pretrained(str(folder), use_safetensors=use_safetensors).eval()


def _load_unet_file(path: Path, base_unet, allow_pickle: bool):
    """A single-file UNet state dict (diffusers names, optionally prefixed `unet.`) on the base's config."""
    from diffusers import UNet2DConditionModel

    from .formats import load_state_dict

    expected = {k: tuple(v.shape) for k, v in base_unet.state_dict().items()}
    if sniff(path) == "safetensors":  # check names/shapes from the header before reading tensors
        found = {k.removeprefix("unet."): v for k, v in state_dict_keys(path).items()}
        check_state_dict(expected, found, f"fine-tuned UNet file {path}")
    state = {k.removeprefix("unet."): v for k, v in load_state_dict(path, allow_pickle=allow_pickle).items()}
    if any(k.startswith("model.diffusion_model.") for k in state):
        raise ValueError(
            f"{path}: an LDM-layout SD checkpoint, not a UNet state dict: pass finetuned_format='checkpoint'"
        )
    check_state_dict(expected, {k: tuple(v.shape) for k, v in state.items()}, f"fine-tuned UNet file {path}")
    unet = UNet2DConditionModel.from_config(base_unet.config)
    unet.load_state_dict(state, strict=True)
    return unet.eval()
