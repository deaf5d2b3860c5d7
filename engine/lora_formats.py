"""Read LoRA files in the three formats users download into `dict[module_path, LoRALayer]`.

- diffusers: `pytorch_lora_weights.safetensors`, keys `unet.<path>.lora_A.weight` (or the older
  `...processor.to_q_lora.down.weight`, `...lora_linear_layer.down.weight`, normalised with
  diffusers' own `convert_unet_state_dict_to_peft` / `convert_state_dict_to_peft`); alphas from
  the file's `lora_adapter_metadata` or `.alpha` keys.
- PEFT: an adapter folder (`adapter_config.json` + `adapter_model.safetensors`, keys
  `base_model.model.<path>.lora_A.weight`); the UNet's at the top or in `unet/`, the text
  encoder's in `text_encoder/`; alphas from `lora_alpha` / `alpha_pattern` (PEFT's matching).
- kohya-ss: `lora_unet_<path with _>.lora_down.weight` / `.lora_up.weight` / `.alpha` (and
  `lora_te_` for the text encoder), mapped onto the model's own module names; names the map lacks
  (LDM-style `input_blocks_...`) go through diffusers' `_convert_unet_lora_key`.

Every key must land on a Linear or Conv2d of the base model with matching shapes: an unmatched key
is an error naming it (SPEC section 5), never a silent skip. Each module keeps its own alpha and
rank; where a file gives no alpha, alpha = rank is assumed and listed in `alpha_assumed`.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from .formats import load_state_dict, sniff
from .pair import LoRALayer

logger = logging.getLogger(__name__)

LORA_FORMATS = ("diffusers", "peft", "kohya")
COMPONENTS = ("unet", "text_encoder")


class LoRAKeyError(ValueError):
    """A LoRA file holds keys that match no module (or no shape) of the base model."""


@dataclass
class LoRAWeights:
    """The adapters of one LoRA checkpoint, keyed by module path in the base models.

    Attributes:
        unet: module path in the base UNet -> LoRALayer.
        text_encoder: module path in the base text encoder (as `named_modules()` spells it) -> LoRALayer.
        format: "diffusers", "peft" or "kohya".
        alpha_assumed: "component:module" entries whose file gave no alpha (alpha = rank used).
        counts: component -> {"keys": tensors read, "modules": adapters matched, "unmatched": 0}.
    """

    unet: dict[str, LoRALayer]
    text_encoder: dict[str, LoRALayer]
    format: str
    alpha_assumed: list[str] = field(default_factory=list)
    counts: dict = field(default_factory=dict)


# --- format detection ---


def _safetensors_keys(path: Path) -> list[str]:
    from .formats import read_safetensors_header

    header, _ = read_safetensors_header(path)
    return list(header)


def _is_kohya(keys) -> bool:
    return bool(keys) and all(key.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for key in keys)


def _is_lora_keys(keys) -> bool:
    return any(
        re.search(r"(lora_[AB]\.|lora\.(down|up)\.|_lora\.(down|up)\.|lora_linear_layer\.)", key) for key in keys
    )


def detect_lora_format(path: str | Path) -> str | None:
    """ "diffusers", "peft" or "kohya" when `path` is a LoRA checkpoint of that format, else None.

    Reads only folder listings and safetensors headers. Raises the errors of `formats.sniff` for
    a file that is not weights.
    """
    path = Path(path)
    if path.is_dir():
        if any((path / sub / "adapter_config.json").is_file() for sub in ("", "unet", "text_encoder")):
            return "peft"
        files = [path / "pytorch_lora_weights.safetensors", path / "pytorch_lora_weights.bin"]
        return next((detect_lora_format(f) for f in files if f.is_file()), None)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if sniff(path) != "safetensors":
        return "diffusers" if path.name == "pytorch_lora_weights.bin" else None
    keys = _safetensors_keys(path)
    if _is_kohya(keys):
        return "kohya"
    return "diffusers" if _is_lora_keys(keys) else None


# --- matching entries onto modules ---


def _resolve(name: str, modules: dict) -> str | None:
    """The module path `name` denotes: as written, or with CLIP's `text_model.` prefix added or
    dropped (transformers 5 names CLIP modules without it; LoRA files keep it)."""
    for candidate in (name, name.removeprefix("text_model."), "text_model." + name):
        if candidate in modules:
            return candidate
    return None


def _match(component: str, entries: dict, model, source: Path, alpha_assumed: list) -> dict[str, LoRALayer]:
    """Turn file entries {name: {"down", "up", "alpha", "keys"}} into LoRALayers on `model`'s modules."""
    from torch import nn

    modules = dict(model.named_modules())
    layers, unmatched = {}, []
    for name, entry in entries.items():
        path = _resolve(name, modules)
        module = modules.get(path) if path else None
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or "down" not in entry or "up" not in entry:
            unmatched.extend(entry["keys"])
            continue
        down, up = entry["down"], entry["up"]
        rank = down.shape[0]
        if isinstance(module, nn.Linear):
            down, up = down.reshape(rank, -1), up.reshape(up.shape[0], -1)
            expected_in, expected_out = module.in_features, module.out_features
            got_in = down.shape[1]
        else:
            expected_in, expected_out = module.in_channels, module.out_channels
            got_in = down.shape[1] if down.dim() == 4 and down.shape[2:] == module.kernel_size else -1
        if got_in != expected_in or up.shape[0] != expected_out or up.shape[1] != rank:
            raise LoRAKeyError(
                f"{source}: LoRA module {name!r} has down {tuple(entry['down'].shape)} / up {tuple(entry['up'].shape)}, "
                f"but the base {component}'s {path} is {type(module).__name__}({expected_in} -> {expected_out}): "
                "the LoRA was trained for another base model"
            )
        alpha = entry.get("alpha")
        if alpha is None:
            alpha = float(rank)
            alpha_assumed.append(f"{component}:{path}")
        layers[path] = LoRALayer(down=down.float(), up=up.float(), alpha=float(alpha))
    if unmatched:
        raise LoRAKeyError(
            f"{source}: {len(unmatched)} of {sum(len(e['keys']) for e in entries.values())} {component} LoRA keys match "
            f"no Linear/Conv2d module of the base {component}, e.g. {unmatched[:3]}: is the LoRA for another "
            "architecture (SDXL, SD 2.x), or in a format variant not supported here?"
        )
    return layers


def _entry(entries: dict, name: str) -> dict:
    return entries.setdefault(name, {"keys": []})


def _pattern_alpha(name: str, default: float, pattern: dict) -> float:
    """PEFT's rule (`peft.utils.other.get_pattern_key`): a pattern key applies when the module
    path matches `(.*\\.)?(key)$`; the first matching key wins."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return float(value)
    return float(default)


def _config_alpha(config: dict, name: str, rank: int) -> float:
    if config.get("use_dora"):
        raise ValueError("DoRA adapters (use_dora=True) are not supported: use a plain LoRA checkpoint")
    alpha = _pattern_alpha(name, config.get("lora_alpha", rank), config.get("alpha_pattern"))
    # rsLoRA scales by alpha / sqrt(rank); LoRALayer scales by alpha / rank
    return alpha * rank**0.5 if config.get("use_rslora") else alpha


def _peft_entries(state: dict, config: dict | None, strip: str = "") -> tuple[dict, list]:
    """Group `<module>.lora_A.weight` / `.lora_B.weight` keys; alphas from a PEFT-style config."""
    entries, unrecognised = {}, []
    for key, tensor in state.items():
        stripped = key.removeprefix(strip)
        found = re.fullmatch(r"(.+)\.lora_([AB])(?:\.default)?\.weight", stripped)
        if found is None:
            if stripped.endswith(".alpha"):
                _entry(entries, stripped[: -len(".alpha")])["alpha"] = float(tensor.item())
                _entry(entries, stripped[: -len(".alpha")])["keys"].append(key)
                continue
            unrecognised.append(key)
            continue
        entry = _entry(entries, found.group(1))
        entry["down" if found.group(2) == "A" else "up"] = tensor
        entry["keys"].append(key)
    if config is not None:
        for name, entry in entries.items():
            if "down" in entry and entry.get("alpha") is None:
                entry["alpha"] = _config_alpha(config, name, entry["down"].shape[0])
    return entries, unrecognised


def _unrecognised_error(source: Path, keys: list) -> LoRAKeyError:
    return LoRAKeyError(
        f"{source}: {len(keys)} key(s) are not LoRA down/up/alpha tensors of a known layout, e.g. {keys[:3]} "
        "(LoHa/LoKr/DoRA and embedding adapters are not supported)"
    )


# --- the three readers: each returns {component: entries} ---


def _read_diffusers(path: Path, allow_pickle: bool) -> dict:
    from diffusers.utils.state_dict_utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    file = path / "pytorch_lora_weights.safetensors" if path.is_dir() else path
    if path.is_dir() and not file.is_file():
        file = path / "pytorch_lora_weights.bin"
    state = load_state_dict(file, allow_pickle=allow_pickle)
    metadata = {}
    if sniff(file) == "safetensors":
        from .formats import read_safetensors_header

        raw = read_safetensors_header(file)[1].get("lora_adapter_metadata")
        metadata = json.loads(raw) if raw else {}
    split = {"unet": {}, "text_encoder": {}}
    unrecognised = []
    for key, tensor in state.items():
        component, _, rest = key.partition(".")
        if component in split:
            split[component][rest] = tensor
        elif component in ("text_encoder_2", "transformer"):
            raise LoRAKeyError(f"{file}: key {key!r} is for an SDXL / DiT model ({component}), not an SD 1.x/2.x base")
        elif re.match(r"(down_blocks|mid_block|up_blocks|conv_in|conv_out|time_embedding)\b", key):
            split["unet"][key] = tensor  # old attention-processor files carry no `unet.` prefix
        else:
            unrecognised.append(key)
    if unrecognised:
        raise _unrecognised_error(file, unrecognised)
    split["unet"] = convert_unet_state_dict_to_peft(split["unet"])
    if any("lora_linear_layer" in k or "to_out_lora" in k for k in split["text_encoder"]):
        split["text_encoder"] = convert_state_dict_to_peft(split["text_encoder"])
    result = {}
    for component, part in split.items():
        # diffusers' metadata packs each component's LoraConfig as "<component>.<field>"
        config = {k.split(".", 1)[1]: v for k, v in metadata.items() if k.startswith(component + ".")} or None
        entries, bad = _peft_entries(part, config)
        if bad:
            raise _unrecognised_error(file, [f"{component}.{k}" for k in bad])
        result[component] = (entries, file)
    return result


def _read_peft(path: Path, allow_pickle: bool) -> dict:
    result = {}
    for sub in ("", "unet", "text_encoder"):
        folder = path / sub if sub else path
        if not (folder / "adapter_config.json").is_file():
            continue
        config = json.loads((folder / "adapter_config.json").read_text())
        if config.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"{folder}: PEFT adapter type {config['peft_type']!r} is not LoRA")
        weights = folder / "adapter_model.safetensors"
        if not weights.is_file():
            weights = folder / "adapter_model.bin"
        if not weights.is_file():
            raise FileNotFoundError(f"{folder}: adapter_config.json but no adapter_model.safetensors")
        entries, bad = _peft_entries(load_state_dict(weights, allow_pickle=allow_pickle), config, "base_model.model.")
        if bad:
            raise _unrecognised_error(weights, bad)
        component = sub or (
            "text_encoder" if all(n.startswith(("text_model.", "encoder.layers")) for n in entries) else "unet"
        )
        if component in result:
            raise ValueError(f"{path}: two PEFT adapters for the {component}; keep one")
        result[component] = (entries, weights)
    return result


def _kohya_names(model, prefix: str) -> dict[str, str]:
    """kohya name -> module path: kohya writes the module path with '.' replaced by '_'."""
    names = {}
    for name, _ in model.named_modules():
        names[prefix + name.replace(".", "_")] = name
        if not name.startswith("text_model."):
            names[prefix + "text_model_" + name.replace(".", "_")] = name
    return names


def _kohya_fallback(lora_name: str) -> str | None:
    """diffusers' heuristic for LDM-style kohya names (input_blocks_...), normalised to a module path."""
    try:
        from diffusers.loaders.lora_conversion_utils import _convert_unet_lora_key
        from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
    except ImportError:  # private helper: absent in some diffusers versions
        return None
    converted = _convert_unet_lora_key(lora_name + ".lora_down.weight")
    key = next(iter(convert_unet_state_dict_to_peft({converted: None})))
    return key.removesuffix(".lora_A.weight") if key.endswith(".lora_A.weight") else None


def _read_kohya(path: Path, allow_pickle: bool, unet, text_encoder) -> dict:
    state = load_state_dict(path, allow_pickle=allow_pickle)
    maps = {"unet": _kohya_names(unet, "lora_unet_"), "text_encoder": _kohya_names(text_encoder, "lora_te_")}
    entries = {"unet": {}, "text_encoder": {}}
    unrecognised = []
    for key, tensor in state.items():
        lora_name, _, suffix = key.partition(".")
        if lora_name.startswith("lora_te2_"):
            raise LoRAKeyError(f"{path}: key {key!r} adapts SDXL's second text encoder; the base is SD 1.x/2.x")
        if lora_name.startswith("lora_te1_"):
            lora_name = "lora_te_" + lora_name.removeprefix("lora_te1_")
        component = "unet" if lora_name.startswith("lora_unet_") else "text_encoder"
        module = maps[component].get(lora_name)
        if module is None and component == "unet":
            module = _kohya_fallback(lora_name)
        entry = _entry(entries[component], module or lora_name)
        entry["keys"].append(key)
        if suffix == "lora_down.weight":
            entry["down"] = tensor
        elif suffix == "lora_up.weight":
            entry["up"] = tensor
        elif suffix == "alpha":
            entry["alpha"] = float(tensor.item())
        else:
            unrecognised.append(key)
    if unrecognised:
        raise _unrecognised_error(path, unrecognised)
    return {component: (part, path) for component, part in entries.items()}


def read_lora(path: str | Path, unet, text_encoder, *, format: str = "auto", allow_pickle: bool = False) -> LoRAWeights:
    """Read a LoRA checkpoint and match it onto the base UNet and text encoder.

    Args:
        path: a diffusers LoRA file (or the folder holding `pytorch_lora_weights.safetensors`), a
            PEFT adapter folder, or a kohya-ss `.safetensors` file.
        unet: the base `UNet2DConditionModel` (read only: module names and shapes).
        text_encoder: the base `CLIPTextModel` (read only).
        format: "auto" (detect), "diffusers", "peft" or "kohya".
        allow_pickle: allow `.bin`/`.pt` weights (read with `torch.load(weights_only=True)`).

    Returns:
        LoRAWeights with float32 down/up tensors: down (rank, in) / up (out, rank) for Linear
        modules, (rank, in, kh, kw) / (out, rank, 1, 1) for Conv2d; delta W = alpha / rank * up @ down.

    Raises:
        LoRAKeyError: a key matches no module of the base (named in the message), or a shape differs.
        ValueError: unknown `format`, or not a LoRA checkpoint.
        CheckpointFormatError / PickleRefusedError / FileNotFoundError: see `formats.load_state_dict`.
    """
    path = Path(path)
    detected = detect_lora_format(path)
    if format == "auto":
        if detected is None:
            raise ValueError(f"{path}: not a LoRA checkpoint in a known format ({', '.join(LORA_FORMATS)})")
        format = detected
    elif format not in LORA_FORMATS:
        raise ValueError(f"LoRA format {format!r}: expected 'auto' or one of {', '.join(LORA_FORMATS)}")
    if format == "diffusers":
        parts = _read_diffusers(path, allow_pickle)
    elif format == "peft":
        parts = _read_peft(path, allow_pickle)
    else:
        parts = _read_kohya(path, allow_pickle, unet, text_encoder)
    models = {"unet": unet, "text_encoder": text_encoder}
    weights = LoRAWeights(unet={}, text_encoder={}, format=format)
    for component in COMPONENTS:
        entries, source = parts.get(component, ({}, path))
        layers = _match(component, entries, models[component], source, weights.alpha_assumed)
        setattr(weights, component, layers)
        weights.counts[component] = {
            "keys": sum(len(e["keys"]) for e in entries.values()),
            "modules": len(layers),
            "unmatched": 0,
        }
    if not weights.unet and not weights.text_encoder:
        raise ValueError(f"{path}: the LoRA checkpoint holds no adapters")
    if weights.alpha_assumed:
        logger.info("%s: no alpha for %d module(s); assumed alpha = rank", path, len(weights.alpha_assumed))
    return weights
