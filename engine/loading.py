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
from .quiet import logged_load

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
    "lora_cloneofsimo",
    "lora_embedding",
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
# vocab_size may differ: a fine-tune may add tokens (its tokenizer is then checked against it)
_TEXT_ARCH_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
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
    """Like `check_unet_configs` for CLIP text-encoder configs. `vocab_size` is not compared: a
    fine-tune may add tokens, and `load_model_pair` checks it against the fine-tune's tokenizer."""
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
    """

    spec: str
    parts: dict
    sources: dict

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


@logged_load("base")
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
    parts, sources = _load_base(base, base_config, allow_pickle)
    torch_dtype = _to_dtype(dtype)
    for name in ("unet", "text_encoder", "vae"):
        parts[name].to(device)
        if name != "vae" and torch_dtype is not None and parts[name].dtype != torch_dtype:
            parts[name].to(dtype=torch_dtype)
    return LoadedBase(spec=str(base), parts=parts, sources=sources)


def _load_base(base, base_config, allow_pickle: bool) -> tuple[dict, dict]:
    """Base parts (unet, text_encoder, vae, tokenizer, scheduler_config) and their sources.

    A folder is a diffusers pipeline; a single file (sniffed before any library parses it) an
    original-SD-layout checkpoint converted on `base_config`'s configs.
    """
    if isinstance(base, LoadedBase):  # loaded already: its models, shared (see LoadedBase)
        return dict(base.parts), dict(base.sources)
    from .formats import check_weights_file
    from .single_file import load_ldm_parts

    path = _resolve_path(base, "base")
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"base {path}: not a diffusers pipeline folder (no model_index.json)")
        parts = _load_folder_parts(path, allow_pickle, ("unet", "text_encoder", "vae", "tokenizer"))
        parts["scheduler_config"] = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
        fmt = "pipeline" if Path(base).expanduser().exists() else "hub-cache"
        return parts, {"base": str(path), "base_format": fmt}
    check_weights_file(path, "base")
    if base_config is None:
        raise ValueError(
            f"base {path} is a single-file checkpoint: pass base_config=<a local diffusers pipeline folder of the same "
            "architecture> (CLI --base-config) for its configs, tokenizer and scheduler (nothing is downloaded)"
        )
    config = _resolve_path(base_config, "base_config")
    if not (config / "model_index.json").is_file():
        raise ValueError(f"base_config {config}: not a diffusers pipeline folder (no model_index.json)")
    template = _load_folder_parts(config, allow_pickle, ("text_encoder", "tokenizer"))
    converted = load_ldm_parts(
        path,
        {
            "unet": _read_config(config / "unet"),
            "text_encoder": template["text_encoder"],
            "vae": _read_config(config / "vae"),
        },
        allow_pickle=allow_pickle,
        what="base",
    )
    missing = [part for part in ("text_encoder", "vae") if converted[part] is None]
    if missing:
        raise ValueError(f"base {path} lacks its {' and '.join(missing)}: a base checkpoint must be complete")
    parts = dict(
        converted,
        tokenizer=template["tokenizer"],
        scheduler_config=json.loads((config / "scheduler" / "scheduler_config.json").read_text()),
    )
    return parts, {"base": str(path), "base_format": "single-file", "base_config": str(config)}


def _check_tokenizer(tokenizer, text_encoder, where: str) -> None:
    """The tokenizer must have one entry per token-embedding row of the text encoder it feeds."""
    rows = text_encoder.get_input_embeddings().num_embeddings
    if len(tokenizer) != rows:
        raise ValueError(
            f"{where}: the text encoder has {rows} token-embedding rows but the tokenizer has {len(tokenizer)} entries; "
            "a fine-tune that adds tokens (e.g. a DreamBooth identifier) must ship its tokenizer/ and text_encoder/ "
            "folders together"
        )


def _finetuned_tokenizer(ft_path: Path, base_tokenizer):
    """The fine-tune's own tokenizer (its `tokenizer/` folder), else the base's; and which it is."""
    folder = ft_path / "tokenizer"
    if ft_path.is_dir() and (folder / "tokenizer_config.json").is_file():
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(str(folder)), "finetuned"
    return base_tokenizer, "base"


def _adapter_unet(base_unet, adapters: dict, sources: dict):
    """(unet_lora, finetuned_unet): LoRA / LoCon stay a per-sample low-rank branch; any other type
    (or DoRA) is merged, with the low-rank ones, into a copy of the base UNet."""
    import copy

    from .adapters import as_low_rank, merge_adapters

    if not adapters:
        return None, None
    modules = dict(base_unet.named_modules())
    low_rank = {path: as_low_rank(adapter, modules[path]) for path, adapter in adapters.items()}
    if all(layer is not None for layer in low_rank.values()):
        sources["unet_adapters"] = "low-rank branch (per sample, on the base UNet)"
        return low_rank, None
    sources["unet_adapters"] = "merged into a copy of the base UNet"
    return None, merge_adapters(copy.deepcopy(base_unet), adapters)


@logged_load("model pair")
def load_model_pair(
    base: str | Path,
    finetuned: str | Path | None = None,
    *,
    lora: str | Path | None = None,
    embeddings: list[str | Path] | tuple = (),
    finetuned_format: str = "auto",
    allow_pickle: bool = False,
    dtype=None,
    device: str = "cpu",
    base_config: str | Path | None = None,
) -> ModelPair:
    """Load a pretrained model (theta) and a checkpoint fine-tuned from it (theta').

    Args:
        base: a diffusers pipeline folder, a single-file SD checkpoint in the original layout
            (`.safetensors`; `.ckpt` with `allow_pickle`) with `base_config`, or a hub id found in
            the local Hugging Face cache, or a `LoadedBase` (`load_base`: loaded once for many
            fine-tunes; `base_config` is then not read).
        finetuned: the fine-tune: a full pipeline folder (its own tokenizer when it ships one), a
            bare `unet/` folder (with or without `text_encoder/`), a single-file UNet state dict, a
            single-file SD checkpoint (`model.diffusion_model.*`, its missing text encoder / VAE
            taken from the base), or any adapter `lora` accepts. None when `lora` is given.
        lora: an adapter checkpoint: LoRA / LoCon / DoRA, LoHa, LoKr, OFT, OFTv2, BOFT, GLoRA, full
            diff (kohya / LyCORIS, diffusers, PEFT, cloneofsimo layouts), or a textual-inversion
            embedding file (see `lora_formats`).
        embeddings: textual-inversion embedding files added to the fine-tune's tokenizer and text
            encoder (`.safetensors`; pickles with `allow_pickle`).
        finetuned_format: "auto" or one of `FINETUNED_FORMATS` ("lora" = any adapter layout).
        allow_pickle: allow pickle weights, read with `torch.load(weights_only=True)`.
        dtype: torch dtype (or "fp32"/"fp16"/"bf16") to cast every model to; None keeps float32.
        device: where the models go ("cpu", "cuda", "cuda:N").
        base_config: a local diffusers pipeline folder whose configs, tokenizer and scheduler
            describe a single-file base.

    Returns:
        ModelPair: kind "dreambooth" (two UNets; the checkpoint's text encoder and tokenizer when
        it ships them) or "lora" (an adapter: LoRA / LoCon as `unet_lora` low-rank adapters on the
        base UNet; any other type merged into `finetuned_unet`, a copy of the base UNet; text-encoder
        adapters and embeddings in a copy of the base text encoder, embeddings' tokens in
        `finetuned_tokenizer`). `sources` records paths, formats, `lora_counts` (per component and
        adapter type), `lora_alpha_assumed`, `unet_adapters` (how they run), `embedding_tokens` and
        the adapter file's sha256.

    Raises:
        FileNotFoundError: a path does not exist; a hub id is not in the local cache ("offline").
        ValueError: incompatible base and fine-tune (names what differs), a tokenizer without one
            entry per text-encoder row (naming both numbers), unknown format, an adapter key that
            matches no module (`LoRAKeyError`), a file that is not weights (`CheckpointFormatError`:
            HTML, git-lfs pointer, text, truncated, a misnamed pickle), a refused pickle
            (`PickleRefusedError`), a partial single-file UNet (naming the missing tensors).
    """
    if finetuned is not None and lora is not None:
        raise ValueError("pass the fine-tune as `finetuned` or as `lora`, not both")
    if finetuned is None and lora is None:
        raise ValueError("no fine-tuned checkpoint: pass `finetuned` (a DreamBooth folder/file or a LoRA) or `lora`")
    if finetuned_format not in FINETUNED_FORMATS:
        raise ValueError(f"finetuned_format {finetuned_format!r}: expected one of {', '.join(FINETUNED_FORMATS)}")
    torch_dtype = _to_dtype(dtype)
    ft_path = _resolve_path(finetuned if finetuned is not None else lora, "fine-tuned checkpoint")
    embedding_paths = [_resolve_path(path, "embedding") for path in embeddings]
    fmt = _finetuned_format(ft_path, finetuned_format, lora is not None)
    # 1. cheap checks on configs and headers before loading weights
    base_path = _resolve_path(base, "base")
    if base_path.is_file():
        from .formats import check_weights_file

        check_weights_file(base_path, "base")
    if base_path.is_dir() and (base_path / "unet" / "config.json").is_file():
        _check_folder_configs(base_path, ft_path, fmt)
    # 2. the base
    parts, sources = _load_base(base, base_config, allow_pickle)
    sources.update(finetuned=str(ft_path), finetuned_format=fmt)
    base_unet, base_text, base_tokenizer = parts["unet"], parts["text_encoder"], parts["tokenizer"]
    finetuned_unet, unet_lora, ft_text, ft_tokenizer, vae = None, None, base_text, base_tokenizer, parts["vae"]
    found_embeddings = []
    # 3. the fine-tune
    if fmt.startswith("lora_"):
        from .adapters import merge_adapters
        from .lora_formats import read_lora

        weights = read_lora(ft_path, base_unet, base_text, format=fmt.removeprefix("lora_"), allow_pickle=allow_pickle)
        unet_lora, finetuned_unet = _adapter_unet(base_unet, weights.unet, sources)
        if unet_lora and isinstance(base, LoadedBase):  # the hooks go on this pair's own UNet modules
            base_unet = copy_sharing_weights(base_unet)
        if weights.text_encoder:
            ft_text = merge_adapters(copy.deepcopy(base_text), weights.text_encoder)
        found_embeddings = weights.embeddings
        sources.update(
            finetuned_format=f"lora_{weights.format}",
            lora_format=weights.format,
            lora_counts=weights.counts,
            lora_alpha_assumed=weights.alpha_assumed,
        )
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
            ft_tokenizer, sources["tokenizer"] = _finetuned_tokenizer(ft_path, base_tokenizer)
            _check_tokenizer(ft_tokenizer, ft_text, f"fine-tune {ft_path}")
            if fmt == "pipeline" and (ft_path / "vae").is_dir():
                vae = _load_folder_parts(ft_path, allow_pickle, ("vae",))["vae"]
        elif fmt == "unet_file":
            finetuned_unet, converted = _load_unet_file(ft_path, base_unet, base_text, parts["vae"], allow_pickle)
            if converted is not None:  # a pickle that held an original-SD-layout checkpoint
                sources["finetuned_format"] = "checkpoint"
                ft_text, vae = _reuse_missing(converted, base_text, parts["vae"], ft_path, sources)
        else:  # "checkpoint": original SD layout, converted on the base's configs
            from .single_file import load_ldm_parts

            converted = load_ldm_parts(
                ft_path,
                {"unet": dict(base_unet.config), "text_encoder": base_text, "vae": dict(parts["vae"].config)},
                allow_pickle=allow_pickle,
                what="fine-tuned checkpoint",
            )
            finetuned_unet = converted["unet"]
            ft_text, vae = _reuse_missing(converted, base_text, parts["vae"], ft_path, sources)
        sources["text_encoder"] = "finetuned" if ft_text is not base_text else "base"
    # 4. textual-inversion embeddings: the adapter file's and the ones passed
    if embedding_paths:
        from .embeddings import read_embedding_file

        for path in embedding_paths:
            found_embeddings = found_embeddings + read_embedding_file(path, allow_pickle=allow_pickle)
        sources["embedding_files"] = [str(path) for path in embedding_paths]
    if found_embeddings:
        from .embeddings import add_embeddings

        ft_tokenizer, ft_text = add_embeddings(ft_tokenizer, ft_text, found_embeddings)
        sources["embedding_tokens"] = [e.token for e in found_embeddings]
        sources["tokenizer"] = "finetuned"
    pair = ModelPair(
        kind=kind,
        base_unet=base_unet,
        finetuned_unet=finetuned_unet,
        unet_lora=unet_lora,
        base_text_encoder=base_text,
        finetuned_text_encoder=ft_text,
        base_tokenizer=base_tokenizer,
        finetuned_tokenizer=ft_tokenizer,
        vae=vae,
        scheduler_config=parts["scheduler_config"],
        sources=sources,
    )
    if torch_dtype is None and str(device) == "cpu":
        return pair  # loaded on the CPU in float32 already
    return pair.to(device, torch_dtype)


def _finetuned_format(ft_path: Path, finetuned_format: str, as_lora: bool) -> str:
    """The fine-tune's format: `finetuned_format` checked against what the files are, or detected."""
    fmt = finetuned_format
    if as_lora and fmt == "auto":
        fmt = "lora"
    if fmt in ("auto", "lora"):
        if fmt == "lora" and ft_path.is_file() and sniff(ft_path) in ("pickle", "pickle-zip"):
            return "lora_auto"  # a pickle's keys are known only after loading, which allow_pickle governs
        detected = detect_finetuned_format(ft_path)
        if fmt == "lora" and not detected.startswith("lora_"):
            raise ValueError(
                f"{ft_path} is {_FULL_FINETUNE_WORDS[detected]}, not a LoRA checkpoint: pass it as --finetuned "
                "(finetuned=...) instead of --lora"
            )
        return detected
    if not fmt.startswith("lora"):
        from .lora_formats import detect_lora_format

        if detect_lora_format(ft_path):
            raise ValueError(
                f"{ft_path} is a LoRA checkpoint, not a full fine-tune ({fmt}): pass it as --lora (lora=...), "
                "or leave finetuned_format='auto'"
            )
    return fmt


def _check_folder_configs(base_path: Path, ft_path: Path, fmt: str) -> None:
    """Config and tokenizer checks of a folder fine-tune against a base folder, before any weights load."""
    base_unet_config = _read_config(base_path / "unet")
    ft_unet_dir = None
    if fmt == "pipeline" or (fmt == "unet_folder" and (ft_path / "unet").is_dir()):
        ft_unet_dir = ft_path / "unet"
    elif fmt == "unet_folder":
        ft_unet_dir = ft_path
    if ft_unet_dir is not None:
        check_unet_configs(base_unet_config, _read_config(ft_unet_dir))
    if fmt not in ("pipeline", "unet_folder"):
        return
    ft_text_dir = ft_path / "text_encoder"
    text_config = _read_config(ft_text_dir if ft_text_dir.is_dir() else base_path / "text_encoder")
    if ft_text_dir.is_dir():
        check_text_configs(_read_config(base_path / "text_encoder"), text_config)
    tokenizer_dir = ft_path / "tokenizer" if (ft_path / "tokenizer" / "tokenizer_config.json").is_file() else None
    if tokenizer_dir is not None or text_config.get("vocab_size") != _read_config(base_path / "text_encoder").get(
        "vocab_size"
    ):
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir or base_path / "tokenizer"))
        if len(tokenizer) != text_config.get("vocab_size"):
            which = "its own" if tokenizer_dir else "the base's: the fine-tune ships none"
            raise ValueError(
                f"fine-tune {ft_path}: the text encoder has {text_config.get('vocab_size')} token-embedding rows "
                f"but the tokenizer ({which}) has {len(tokenizer)} entries; a fine-tune that adds tokens (e.g. a "
                "DreamBooth identifier) must ship its tokenizer/ and text_encoder/ folders together"
            )


def _reuse_missing(converted: dict, base_text, base_vae, ft_path: Path, sources: dict):
    """The converted text encoder and VAE of a single-file fine-tune, the base's where it has none."""
    text, vae = converted["text_encoder"], converted["vae"]
    for part, model in (("text encoder", text), ("VAE", vae)):
        if model is None:
            logger.info("%s holds no %s: using the base's", ft_path, part)
    sources["single_file_parts"] = ["unet"] + [name for name, m in (("text_encoder", text), ("vae", vae)) if m]
    return text if text is not None else base_text, vae if vae is not None else base_vae


def _load_unet_dir(folder: Path, allow_pickle: bool):
    from diffusers import UNet2DConditionModel

    use_safetensors = _check_weight_files(folder, allow_pickle)
    return UNet2DConditionModel.from_pretrained(str(folder), use_safetensors=use_safetensors).eval()


def _load_unet_file(path: Path, base_unet, base_text, base_vae, allow_pickle: bool):
    """A single-file UNet state dict (diffusers names, optionally prefixed `unet.`) on the base's
    config; (unet, None), or (unet, converted parts) for a pickle that held an original-SD-layout
    checkpoint (its layout is known only once it is read)."""
    from diffusers import UNet2DConditionModel

    from .formats import load_state_dict

    expected = {k: tuple(v.shape) for k, v in base_unet.state_dict().items()}
    if sniff(path) == "safetensors":  # check names/shapes from the header before reading tensors
        found = {k.removeprefix("unet."): v for k, v in state_dict_keys(path).items()}
        check_state_dict(expected, found, f"fine-tuned UNet file {path}")
    state = {k.removeprefix("unet."): v for k, v in load_state_dict(path, allow_pickle=allow_pickle).items()}
    if any(k.startswith("model.diffusion_model.") for k in state):
        from .single_file import load_ldm_parts

        converted = load_ldm_parts(
            path,
            {"unet": dict(base_unet.config), "text_encoder": base_text, "vae": dict(base_vae.config)},
            allow_pickle=allow_pickle,
            what="fine-tuned checkpoint",
        )
        return converted["unet"], converted
    check_state_dict(expected, {k: tuple(v.shape) for k, v in state.items()}, f"fine-tuned UNet file {path}")
    unet = UNet2DConditionModel.from_config(base_unet.config)
    unet.load_state_dict(state, strict=True)
    return unet.eval(), None
