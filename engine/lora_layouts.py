"""The adapter file layouts' readers: each layout's keys grouped per module (`Group`), with the
suffixes renamed to LyCORIS' and the layout's conventions, for `lora_formats` to match onto modules.

Layouts: kohya-ss / LyCORIS (underscored module names), diffusers (`pytorch_lora_weights.safetensors`),
PEFT adapter folders and cloneofsimo files (see `lora_formats` for each one's keys).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .adapters import KNOWN_SUFFIXES, Conventions
from .adapters.base import FLOAT32_EPS
from .embeddings import Embedding, embeddings_from_state, is_embedding_header
from .formats import load_state_dict, read_pickle, read_safetensors_header, sniff

logger = logging.getLogger(__name__)

LORA_FORMATS = ("diffusers", "peft", "kohya", "cloneofsimo", "embedding")
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# file-key prefix -> component, for kohya's underscored module names and for dotted ones
KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lycoris_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
DOTTED_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}
# prefixes of models no family finextract runs has
OTHER_MODEL_PREFIXES = {
    "transformer.": "a DiT model (SD3, Flux)",
    "lora_transformer_": "a DiT model (SD3, Flux)",
}
COMPONENT_WORDS = {"text_encoder_2": "SDXL's second text encoder (text_encoder_2)"}
# PEFT / diffusers tensor suffixes -> LyCORIS'
PEFT_SUFFIXES = {
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora_A.default.weight": "lora_down.weight",
    "lora_B.default.weight": "lora_up.weight",
    "lora_magnitude_vector": "dora_scale",
    "lora_magnitude_vector.weight": "dora_scale",
    "lora_magnitude_vector.default.weight": "dora_scale",
}
_DOTTED_SUFFIXES = sorted(set(PEFT_SUFFIXES) | KNOWN_SUFFIXES, key=len, reverse=True)
CLONEOFSIMO_KEY = re.compile(r"(unet|text_encoder):(\d+):(up|down)")
_PEFT_CONVENTIONS = Conventions(dora_eps=0.0, dora_on_output=True)  # PEFT's DoRA: per output row, no eps
LYCORIS_CONVENTIONS = Conventions(dora_eps=FLOAT32_EPS)


class LoRAKeyError(ValueError):
    """An adapter file holds keys that match no module (or no shape) of the base model, an unknown
    tensor suffix, or the same module twice."""


@dataclass
class Group:
    """One module's tensors as a file names it: suffix (LyCORIS') -> tensor, and the file keys."""

    component: str
    name: str
    tensors: dict = field(default_factory=dict)
    keys: dict = field(default_factory=dict)

    def add(self, suffix: str, tensor, key: str) -> None:
        self.tensors[suffix] = tensor
        self.keys[suffix] = key


@dataclass
class Parsed:
    """What a reader found: groups, how their names resolve, conventions, embeddings, source file."""

    groups: list[Group]
    naming: str  # "kohya", "dotted" or "path" (already module paths)
    conventions: Conventions
    source: Path
    embeddings: list[Embedding] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)  # keys with an unknown suffix


def read_weights(path: Path, allow_pickle: bool) -> tuple[dict, dict]:
    """(state, safetensors metadata) of one file; a pickle's raw dict (nested containers kept)."""
    if sniff(path) in ("pickle", "pickle-zip"):
        state = read_pickle(path, allow_pickle=allow_pickle)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise LoRAKeyError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
        return state, {}
    return load_state_dict(path), read_safetensors_header(path)[1]


def split_dotted(key: str) -> tuple[str, str] | None:
    """(module name, suffix) of a dotted key ending in a known suffix, else None."""
    for suffix in _DOTTED_SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], PEFT_SUFFIXES.get(suffix, suffix)
    return None


def _group_dotted(state: dict, component_of, unknown: list) -> dict:
    """Group dotted keys `<module>.<suffix>` by module; `component_of(key)` gives (component, rest)."""
    groups: dict[tuple[str, str], Group] = {}
    for key, tensor in state.items():
        component, rest = component_of(key)
        split = split_dotted(rest)
        if split is None:
            unknown.append(key)
            continue
        name, suffix = split
        groups.setdefault((component, name), Group(component, name)).add(suffix, tensor, key)
    return groups


def read_kohya(path: Path, state: dict, metadata: dict) -> Parsed:
    groups: dict[tuple[str, str], Group] = {}
    bundled: dict[str, dict] = {}
    unknown = []
    for key, tensor in state.items():
        if key.startswith("bundle_emb."):  # bundle_emb.<token>.emb_params | .string_to_param.<x>
            token, _, rest = key.removeprefix("bundle_emb.").partition(".")
            bundled.setdefault(token, {})[rest.split(".")[0]] = tensor
            continue
        lora_name, _, suffix = key.partition(".")
        prefix = next((p for p in OTHER_MODEL_PREFIXES if lora_name.startswith(p)), None)
        if prefix:
            raise LoRAKeyError(
                f"{path}: key {key!r} adapts {OTHER_MODEL_PREFIXES[prefix]}, which finextract does not run"
            )
        prefix = next((p for p in KOHYA_PREFIXES if lora_name.startswith(p)), None)
        if prefix is None or not suffix:
            unknown.append(key)
            continue
        component = KOHYA_PREFIXES[prefix]
        groups.setdefault((component, lora_name), Group(component, lora_name)).add(suffix, tensor, key)
    embeddings = [
        embedding
        for token, parts in bundled.items()
        for embedding in embeddings_from_state(parts, Path(path.parent / token))
    ]
    for embedding in embeddings:
        embedding.source = f"{path}[bundle_emb.{embedding.token}]"
    return Parsed(list(groups.values()), "kohya", LYCORIS_CONVENTIONS, path, embeddings, unknown)


def read_diffusers(path: Path, allow_pickle: bool) -> Parsed:
    # heavy: diffusers, only for the PEFT key conversion
    from diffusers.utils.state_dict_utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    folder = path if path.is_dir() else None
    file = path
    if folder is not None:
        file = path / "pytorch_lora_weights.safetensors"
        if not file.is_file():
            file = path / "pytorch_lora_weights.bin"
    state, metadata = read_weights(file, allow_pickle)
    raw = metadata.get("lora_adapter_metadata")
    configs = json.loads(raw) if raw else {}
    split = {"unet": {}, "text_encoder": {}, "text_encoder_2": {}}
    unknown = []
    for key, tensor in state.items():
        component, _, rest = key.partition(".")
        if component == "transformer":  # SD3's denoiser (`save_lora_weights`): the pair's denoiser slot
            split["unet"][rest] = tensor
            continue
        other = next((p for p in OTHER_MODEL_PREFIXES if key.startswith(p)), None)
        if other:
            raise LoRAKeyError(
                f"{file}: key {key!r} adapts {OTHER_MODEL_PREFIXES[other]}, which finextract does not run"
            )
        if component in split:
            split[component][rest] = tensor
        elif re.match(r"(down_blocks|mid_block|up_blocks|conv_in|conv_out|time_embedding)\b", key):
            split["unet"][key] = tensor  # old attention-processor files carry no `unet.` prefix
        else:
            unknown.append(key)
    split["unet"] = convert_unet_state_dict_to_peft(split["unet"])
    for component in ("text_encoder", "text_encoder_2"):
        if any("lora_linear_layer" in k or "to_out_lora" in k for k in split[component]):
            split[component] = convert_state_dict_to_peft(split[component])
    groups = []
    for component, part in split.items():
        prefixed = {f"{component}.{key}": tensor for key, tensor in part.items()}
        found = _group_dotted(prefixed, lambda key: tuple(key.split(".", 1)), unknown)
        # diffusers' metadata packs each component's LoraConfig as "<component>.<field>"
        config = {k.split(".", 1)[1]: v for k, v in configs.items() if k.startswith(component + ".")} or None
        groups.extend(_with_config_alphas(found.values(), config))
    embeddings = _folder_embeddings(folder, {file}, allow_pickle) if folder else []
    return Parsed(groups, "dotted", _PEFT_CONVENTIONS, file, embeddings, unknown)


def _folder_embeddings(folder: Path, skip: set, allow_pickle: bool) -> list[Embedding]:
    """The embedding files beside an adapter in its folder (`.safetensors`; pickles when allowed)."""
    found = []
    for file in sorted(folder.iterdir()):
        if not file.is_file() or file in skip or file.name.startswith("."):
            continue
        if file.suffix == ".safetensors":
            header, _ = read_safetensors_header(file)
            if is_embedding_header({k: tuple(v["shape"]) for k, v in header.items()}):
                found.extend(embeddings_from_state(load_state_dict(file), file))
            else:
                logger.warning("%s: not an embedding file; ignored beside the adapter in %s", file.name, folder)
        elif file.suffix in (".pt", ".bin"):
            if not allow_pickle:
                logger.warning("%s: a pickle, not read (pass --allow-pickle if it is an embedding you trust)", file)
                continue
            state = read_pickle(file, allow_pickle=True)
            if isinstance(state, dict):
                found.extend(embeddings_from_state(state, file))
    return found


def _pattern_value(name: str, default, pattern: dict | None):
    """PEFT's rule (`peft.utils.other.get_pattern_key`): a pattern key applies when the module
    path matches `(.*\\.)?(key)$`; the first matching key wins."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _with_config_alphas(groups, config: dict | None) -> list[Group]:
    """Give LoRA groups without an `alpha` tensor the alpha of a PEFT-style config (`lora_alpha`,
    `alpha_pattern`; rsLoRA's alpha / sqrt(rank) expressed as an alpha for alpha / rank)."""
    groups = list(groups)
    if config is None:
        return groups
    for group in groups:
        down = group.tensors.get("lora_down.weight")
        if down is None or "alpha" in group.tensors:
            continue
        rank = down.shape[0]
        alpha = float(_pattern_value(group.name, config.get("lora_alpha", rank), config.get("alpha_pattern")))
        if config.get("use_rslora"):
            alpha *= rank**0.5
        group.tensors["alpha"] = torch.tensor(alpha)
    return groups


def read_peft(path: Path, allow_pickle: bool) -> Parsed:
    groups, conventions, source = [], _PEFT_CONVENTIONS, path
    seen = {}
    unknown = []
    for sub in ("", "unet", "text_encoder", "text_encoder_2"):
        folder = path / sub if sub else path
        if not (folder / "adapter_config.json").is_file():
            continue
        config = json.loads((folder / "adapter_config.json").read_text())
        peft_type = str(config.get("peft_type", "LORA")).upper()
        if peft_type not in ("LORA", "OFT"):
            raise ValueError(f"{folder}: PEFT adapter type {config['peft_type']!r} is not supported (LORA, OFT)")
        if peft_type == "OFT":
            conventions = Conventions(
                dora_eps=0.0,
                dora_on_output=True,
                oft_cayley_neumann=bool(config.get("use_cayley_neumann", True)),
                oft_neumann_terms=int(config.get("num_cayley_neumann_terms", 5)),
                oft_coft=bool(config.get("coft", False)),
                oft_coft_eps=float(config.get("eps", 6e-5)),
            )
        weights = folder / "adapter_model.safetensors"
        if not weights.is_file():
            weights = folder / "adapter_model.bin"
        if not weights.is_file():
            raise FileNotFoundError(f"{folder}: adapter_config.json but no adapter_model.safetensors")
        state, _ = read_weights(weights, allow_pickle)
        names = [k.removeprefix("base_model.model.") for k in state]
        component = sub or (
            "text_encoder" if all(n.startswith(("text_model.", "encoder.layers")) for n in names) else "unet"
        )
        if component in seen:
            raise ValueError(f"{path}: two PEFT adapters for the {component} ({seen[component]}, {folder}); keep one")
        seen[component] = folder
        found = _group_dotted(state, lambda key, c=component: (c, key.removeprefix("base_model.model.")), unknown)
        groups.extend(_with_config_alphas(found.values(), config if peft_type == "LORA" else None))
        source = weights
    return Parsed(groups, "dotted", conventions, source, [], unknown)


def _cloneofsimo_modules(model, targets: list[str], convolutions: bool) -> list[str]:
    """Module paths in cloneofsimo's order (`lora_diffusion.lora._find_modules_v2`): for each module
    whose class is in `targets` (in `model.modules()` order), its Linear (and Conv2d) descendants in
    `named_modules()` order."""
    classes = (nn.Linear, nn.Conv2d) if convolutions else (nn.Linear,)
    paths = []
    for ancestor_path, ancestor in model.named_modules():
        if type(ancestor).__name__ not in targets:
            continue
        for name, module in ancestor.named_modules():
            if name and isinstance(module, classes):
                paths.append(f"{ancestor_path}.{name}" if ancestor_path else name)
    return paths


def read_cloneofsimo(path: Path, state: dict, metadata: dict, models: dict) -> Parsed:
    defaults = {"unet": ["CrossAttention", "Attention", "GEGLU"], "text_encoder": ["CLIPAttention"]}
    indexed: dict[str, dict[int, dict]] = {}
    embeddings, unknown = [], []
    for key, tensor in state.items():
        found = CLONEOFSIMO_KEY.fullmatch(key)
        if found:
            component, index, direction = found.group(1), int(found.group(2)), found.group(3)
            indexed.setdefault(component, {}).setdefault(index, {})[direction] = (key, tensor)
        elif metadata.get(key) == "<embed>" or (tensor.dim() in (1, 2) and ":" not in key):
            embeddings.append(Embedding(key, tensor.float().reshape(-1, tensor.shape[-1]), f"{path}[{key}]"))
        else:
            unknown.append(key)
    groups = []
    for component, entries in indexed.items():
        targets = json.loads(metadata[component]) if component in metadata else defaults[component]
        convolutions = any(entry.get("down", (None, torch.zeros(1)))[1].dim() == 4 for entry in entries.values())
        paths = _cloneofsimo_modules(models[component], targets, convolutions)
        for index, entry in sorted(entries.items()):
            if index >= len(paths):
                raise LoRAKeyError(
                    f"{path}: cloneofsimo key {component}:{index} but the base {component} has only {len(paths)} "
                    f"modules under {targets}: the LoRA is for another architecture"
                )
            group = Group(component, paths[index])
            for direction, suffix in (("up", "lora_up.weight"), ("down", "lora_down.weight")):
                if direction in entry:
                    group.add(suffix, entry[direction][1], entry[direction][0])
            if "down" in entry:  # the format's scale is 1 (`up` already holds it): alpha = rank
                group.tensors["alpha"] = torch.tensor(float(entry["down"][1].shape[0]))
            groups.append(group)
    return Parsed(groups, "path", LYCORIS_CONVENTIONS, path, embeddings, unknown)
