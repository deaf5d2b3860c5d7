"""Read adapter checkpoints, in every layout users download, into per-module `Adapter`s.

Layouts (detected from folder listings and safetensors headers; a pickle only once allowed and read):
- kohya-ss / LyCORIS: `<prefix><module path with '_' for '.'>.<suffix>` with the prefixes of
  `KOHYA_PREFIXES` (`lora_unet_`, `lora_te_`, `lora_te1_`, `lycoris_`) and every LyCORIS suffix
  (`lora_down.weight`, `hada_w1_a`, `lokr_w1`, `oft_blocks`, `a1.weight`, `diff`, `dora_scale`, ...).
  Names are mapped onto the model's own modules; LDM-style UNet names (`input_blocks_...`) go
  through diffusers' `_convert_unet_lora_key`. Bundled embeddings: `bundle_emb.<token>.*`.
- diffusers: `pytorch_lora_weights.safetensors`, `unet.<path>.lora_A.weight` / `lora_B.weight` /
  `lora_magnitude_vector` (DoRA) / `oft_R.weight` (and `text_encoder.`); older attention-processor
  names are normalised with diffusers' `convert_unet_state_dict_to_peft` / `convert_state_dict_to_peft`;
  alphas from the `lora_adapter_metadata` or `.alpha` keys. A folder may hold embedding files too.
- PEFT adapter folders (`adapter_config.json` + `adapter_model.safetensors`, keys
  `base_model.model.<path>.<suffix>`): LORA (DoRA with `use_dora`, rsLoRA) and OFT (OFTv2); the
  UNet's at the top or in `unet/`, the text encoder's in `text_encoder/`.
- cloneofsimo (`lora_diffusion`): `unet:<i>:up` / `down` and `text_encoder:<i>:...`, the i-th
  Linear (and Conv2d) under the module classes the metadata lists, in `named_modules` order; scale 1;
  embeddings as keys flagged `<embed>` in the metadata.
- textual-inversion embedding files (see `finextract.engine.embeddings`).

PEFT / diffusers suffixes are renamed to LyCORIS' before the adapter is built
(`lora_A.weight` -> `lora_down.weight`, ...), so each type's mathematics lives in one place,
`finextract.engine.adapters`. Every key must land on a module of the base model with matching
shapes: an unmatched key, an unknown suffix, or two keys naming one module is an error naming
them, never a silent skip. Each module keeps its own alpha / rank; where a file gives none,
alpha = rank is assumed and listed in `alpha_assumed`.

Components are named by the prefix tables below and the `models` mapping the caller passes
("unet", "text_encoder", and for SDXL "text_encoder_2": kohya's `lora_te1_` / `lora_te2_`, including
`lora_te2_text_projection`, diffusers' `text_encoder_2.`, PEFT's `text_encoder_2/`). kohya-ss writes
SDXL's UNet under its original (SGM) module names (`lora_unet_input_blocks_4_1_...`): they are mapped
with diffusers' `_maybe_map_sgm_blocks_to_diffusers` on the base UNet's config, as diffusers' own
SDXL LoRA loader does.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .adapters import KNOWN_SUFFIXES, Adapter, AdapterError, Conventions, adapter_type, supports
from .adapters.base import FLOAT32_EPS
from .embeddings import Embedding, EmbeddingError, embeddings_from_state, is_embedding_header
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
_COMPONENT_WORDS = {"text_encoder_2": "SDXL's second text encoder (text_encoder_2)"}
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
_CLONEOFSIMO_KEY = re.compile(r"(unet|text_encoder):(\d+):(up|down)")
_PEFT_CONVENTIONS = Conventions(dora_eps=0.0, dora_on_output=True)  # PEFT's DoRA: per output row, no eps
_LYCORIS_CONVENTIONS = Conventions(dora_eps=FLOAT32_EPS)


class LoRAKeyError(ValueError):
    """An adapter file holds keys that match no module (or no shape) of the base model, an unknown
    tensor suffix, or the same module twice."""


@dataclass
class AdapterWeights:
    """The adapters and embeddings of one adapter checkpoint, matched onto the base models.

    Attributes:
        adapters: component ("unet", "text_encoder") -> module path (as `named_modules()` spells it)
            -> `Adapter`.
        embeddings: textual-inversion embeddings the file carries (or the folder's embedding files).
        format: one of `LORA_FORMATS`.
        alpha_assumed: "component:module" entries whose file gave no alpha (alpha = rank used).
        counts: component -> {"keys": tensors read, "modules": adapters matched, "unmatched": 0,
            "types": {type: {"modules", "keys"}}}; plus "embeddings": {"tokens", "vectors"}.
    """

    adapters: dict[str, dict[str, Adapter]]
    embeddings: list[Embedding]
    format: str
    alpha_assumed: list[str] = field(default_factory=list)
    counts: dict = field(default_factory=dict)

    @property
    def unet(self) -> dict[str, Adapter]:
        return self.adapters.get("unet", {})

    @property
    def text_encoder(self) -> dict[str, Adapter]:
        return self.adapters.get("text_encoder", {})


@dataclass
class _Group:
    """One module's tensors as a file names it: suffix (LyCORIS') -> tensor, and the file keys."""

    component: str
    name: str
    tensors: dict = field(default_factory=dict)
    keys: dict = field(default_factory=dict)

    def add(self, suffix: str, tensor, key: str) -> None:
        self.tensors[suffix] = tensor
        self.keys[suffix] = key


@dataclass
class _Parsed:
    """What a reader found: groups, how their names resolve, conventions, embeddings, source file."""

    groups: list[_Group]
    naming: str  # "kohya", "dotted" or "path" (already module paths)
    conventions: Conventions
    source: Path
    embeddings: list[Embedding] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)  # keys with an unknown suffix


# --- format detection ---


def _format_of_keys(shapes: dict[str, tuple], metadata: dict) -> str | None:
    """The layout of a single adapter file from its tensor names and shapes (None: not an adapter)."""
    keys = list(shapes)
    if not keys:
        return None
    kohya = tuple(KOHYA_PREFIXES) + tuple(p for p in OTHER_MODEL_PREFIXES if p.endswith("_")) + ("bundle_emb.",)
    if all(key.startswith(kohya) for key in keys):
        return "kohya"
    if any(_CLONEOFSIMO_KEY.fullmatch(key) for key in keys) or any(metadata.get(k) == "<embed>" for k in keys):
        return "cloneofsimo"
    if any(
        re.search(
            r"(lora_[AB]\.|lora\.(down|up)\.|_lora\.(down|up)\.|lora_linear_layer\.|lora_magnitude_vector|\.oft_R\.)", k
        )
        for k in keys
    ):
        return "diffusers"
    if is_embedding_header(shapes):
        return "embedding"
    return None


def detect_lora_format(path: str | Path) -> str | None:
    """The adapter layout of `path` (one of `LORA_FORMATS`), or None when it is not an adapter.

    Reads only folder listings and safetensors headers: a pickle file's layout is known only once
    it is read (`read_adapters` does that when pickles are allowed), so this returns None for it,
    except for diffusers' `pytorch_lora_weights.bin`. Raises the errors of `formats.sniff` for a
    file that is not weights.
    """
    path = Path(path)
    if path.is_dir():
        if any(
            (path / sub / "adapter_config.json").is_file() for sub in ("", "unet", "text_encoder", "text_encoder_2")
        ):
            return "peft"
        files = [path / "pytorch_lora_weights.safetensors", path / "pytorch_lora_weights.bin"]
        return next((detect_lora_format(f) for f in files if f.is_file()), None)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if sniff(path) != "safetensors":
        return "diffusers" if path.name == "pytorch_lora_weights.bin" else None
    header, metadata = read_safetensors_header(path)
    return _format_of_keys({k: tuple(v["shape"]) for k, v in header.items()}, metadata)


# --- reading files ---


def _read_weights(path: Path, allow_pickle: bool) -> tuple[dict, dict]:
    """(state, safetensors metadata) of one file; a pickle's raw dict (nested containers kept)."""
    if sniff(path) in ("pickle", "pickle-zip"):
        state = read_pickle(path, allow_pickle=allow_pickle)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise LoRAKeyError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
        return state, {}
    return load_state_dict(path), read_safetensors_header(path)[1]


def _split_dotted(key: str) -> tuple[str, str] | None:
    """(module name, suffix) of a dotted key ending in a known suffix, else None."""
    for suffix in _DOTTED_SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], PEFT_SUFFIXES.get(suffix, suffix)
    return None


def _group_dotted(state: dict, component_of, unknown: list) -> dict:
    """Group dotted keys `<module>.<suffix>` by module; `component_of(key)` gives (component, rest)."""
    groups: dict[tuple[str, str], _Group] = {}
    for key, tensor in state.items():
        component, rest = component_of(key)
        split = _split_dotted(rest)
        if split is None:
            unknown.append(key)
            continue
        name, suffix = split
        groups.setdefault((component, name), _Group(component, name)).add(suffix, tensor, key)
    return groups


def _read_kohya(path: Path, state: dict, metadata: dict) -> _Parsed:
    groups: dict[tuple[str, str], _Group] = {}
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
        groups.setdefault((component, lora_name), _Group(component, lora_name)).add(suffix, tensor, key)
    embeddings = [
        embedding
        for token, parts in bundled.items()
        for embedding in embeddings_from_state(parts, Path(path.parent / token))
    ]
    for embedding in embeddings:
        embedding.source = f"{path}[bundle_emb.{embedding.token}]"
    return _Parsed(list(groups.values()), "kohya", _LYCORIS_CONVENTIONS, path, embeddings, unknown)


def _read_diffusers(path: Path, allow_pickle: bool) -> _Parsed:
    from diffusers.utils.state_dict_utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    folder = path if path.is_dir() else None
    file = path
    if folder is not None:
        file = path / "pytorch_lora_weights.safetensors"
        if not file.is_file():
            file = path / "pytorch_lora_weights.bin"
    state, metadata = _read_weights(file, allow_pickle)
    raw = metadata.get("lora_adapter_metadata")
    configs = json.loads(raw) if raw else {}
    split = {"unet": {}, "text_encoder": {}, "text_encoder_2": {}}
    unknown = []
    for key, tensor in state.items():
        component, _, rest = key.partition(".")
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
    return _Parsed(groups, "dotted", _PEFT_CONVENTIONS, file, embeddings, unknown)


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


def _with_config_alphas(groups, config: dict | None) -> list[_Group]:
    """Give LoRA groups without an `alpha` tensor the alpha of a PEFT-style config (`lora_alpha`,
    `alpha_pattern`; rsLoRA's alpha / sqrt(rank) expressed as an alpha for alpha / rank)."""
    import torch

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


def _read_peft(path: Path, allow_pickle: bool) -> _Parsed:
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
        state, _ = _read_weights(weights, allow_pickle)
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
    return _Parsed(groups, "dotted", conventions, source, [], unknown)


def _cloneofsimo_modules(model, targets: list[str], convolutions: bool) -> list[str]:
    """Module paths in cloneofsimo's order (`lora_diffusion.lora._find_modules_v2`): for each module
    whose class is in `targets` (in `model.modules()` order), its Linear (and Conv2d) descendants in
    `named_modules()` order."""
    from torch import nn

    classes = (nn.Linear, nn.Conv2d) if convolutions else (nn.Linear,)
    paths = []
    for ancestor_path, ancestor in model.named_modules():
        if type(ancestor).__name__ not in targets:
            continue
        for name, module in ancestor.named_modules():
            if name and isinstance(module, classes):
                paths.append(f"{ancestor_path}.{name}" if ancestor_path else name)
    return paths


def _read_cloneofsimo(path: Path, state: dict, metadata: dict, models: dict) -> _Parsed:
    import torch

    defaults = {"unet": ["CrossAttention", "Attention", "GEGLU"], "text_encoder": ["CLIPAttention"]}
    indexed: dict[str, dict[int, dict]] = {}
    embeddings, unknown = [], []
    for key, tensor in state.items():
        found = _CLONEOFSIMO_KEY.fullmatch(key)
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
            group = _Group(component, paths[index])
            for direction, suffix in (("up", "lora_up.weight"), ("down", "lora_down.weight")):
                if direction in entry:
                    group.add(suffix, entry[direction][1], entry[direction][0])
            if "down" in entry:  # the format's scale is 1 (`up` already holds it): alpha = rank
                group.tensors["alpha"] = torch.tensor(float(entry["down"][1].shape[0]))
            groups.append(group)
    return _Parsed(groups, "path", _LYCORIS_CONVENTIONS, path, embeddings, unknown)


# --- matching groups onto modules ---


def _kohya_names(model, prefixes: list[str]) -> dict[str, str]:
    """kohya name -> module path: kohya writes the module path with '.' replaced by '_' (CLIP
    modules with or without transformers' `text_model.` prefix, which transformers 5 dropped)."""
    names = {}
    for name, _ in model.named_modules():
        for prefix in prefixes:
            names.setdefault(prefix + name.replace(".", "_"), name)
            if not name.startswith("text_model."):
                names.setdefault(prefix + "text_model_" + name.replace(".", "_"), name)
    return names


def _kohya_fallback(lora_name: str, unet_config) -> str | None:
    """diffusers' conversion of LDM / SGM-style kohya names (`input_blocks_4_1_...`, as sd-scripts names
    SDXL's UNet) to a module path: `_maybe_map_sgm_blocks_to_diffusers` on the base UNet's config (the
    block numbering depends on `layers_per_block`), then `_convert_unet_lora_key`."""
    try:
        from diffusers.loaders.lora_conversion_utils import (
            _convert_unet_lora_key,
            _maybe_map_sgm_blocks_to_diffusers,
        )
        from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
    except ImportError:  # private helpers: absent in some diffusers versions
        return None
    for prefix in ("lora_unet_", "lycoris_"):
        if lora_name.startswith(prefix):
            lora_name = "lora_unet_" + lora_name.removeprefix(prefix)
    try:
        (lora_name,) = _maybe_map_sgm_blocks_to_diffusers({lora_name: None}, unet_config)
    except (ValueError, IndexError):  # not a name the SGM mapping knows: no module
        return None
    converted = _convert_unet_lora_key(lora_name + ".lora_down.weight")
    key = next(iter(convert_unet_state_dict_to_peft({converted: None})))
    return key.removesuffix(".lora_A.weight") if key.endswith(".lora_A.weight") else None


def _resolver(parsed: _Parsed, component: str, model):
    """name in the file -> module path in `model` (or None)."""
    modules = dict(model.named_modules())
    if parsed.naming == "path":
        return lambda name: name if name in modules else None
    if parsed.naming == "kohya":
        names = _kohya_names(model, [p for p, c in KOHYA_PREFIXES.items() if c == component])
        if component == "unet":
            return lambda name: names.get(name) or _kohya_fallback(name, model.config)
        return names.get

    def dotted(name: str) -> str | None:
        for candidate in (name, name.removeprefix("text_model."), "text_model." + name):
            if candidate in modules:
                return candidate
        return None

    return dotted


def _first_key(group: _Group) -> str:
    return next(iter(group.keys.values()), group.name)


def _match(
    parsed: _Parsed, component: str, model, alpha_assumed: list, base_label: str = "the base"
) -> tuple[dict[str, Adapter], dict]:
    """The adapters of `component` keyed by module path, and their counts; raises LoRAKeyError."""
    groups = [g for g in parsed.groups if g.component == component]
    modules = dict(model.named_modules())
    resolve = _resolver(parsed, component, model)
    adapters, owner, unmatched = {}, {}, []
    types: Counter = Counter()
    type_keys: Counter = Counter()
    for group in groups:
        path = resolve(group.name)
        module = modules.get(path) if path else None
        try:
            cls = adapter_type(group.tensors)
        except AdapterError as error:
            raise LoRAKeyError(f"{parsed.source}: module {group.name!r} ({_first_key(group)!r}): {error}") from None
        if module is None or not supports(cls, module):
            unmatched.extend(group.keys.values())
            continue
        if path in owner:
            raise LoRAKeyError(
                f"{parsed.source}: the {component} module {path} is adapted twice, by {_first_key(owner[path])!r} and "
                f"{_first_key(group)!r} (e.g. text-encoder keys written with and without `text_model`): keep one"
            )
        owner[path] = group
        try:
            adapter = cls.from_tensors(group.tensors, parsed.conventions)
            problem = adapter.check(tuple(module.weight.shape))
        except AdapterError as error:
            problem = str(error)
        if problem:
            raise LoRAKeyError(
                f"{parsed.source}: {cls.type} module {group.name!r}: {problem}, the base {component}'s {path} is "
                f"{type(module).__name__}{tuple(module.weight.shape)} ({base_label}): the adapter was trained for another "
                "base model"
            )
        if cls.uses_alpha and "alpha" not in group.tensors:
            alpha_assumed.append(f"{component}:{path}")
        adapters[path] = adapter
        types[cls.type] += 1
        type_keys[cls.type] += len(group.keys)
    total = sum(len(g.keys) for g in groups)
    if unmatched:
        raise LoRAKeyError(
            f"{parsed.source}: {len(unmatched)} of {total} {component} LoRA keys match no module of the base {component} "
            f"that their type adapts ({base_label}), e.g. {unmatched[:3]}: is the adapter for another family or "
            "architecture, or in a format variant not supported here?"
        )
    counts = {
        "keys": total,
        "modules": len(adapters),
        "unmatched": 0,
        "types": {name: {"modules": types[name], "keys": type_keys[name]} for name in sorted(types)},
    }
    return adapters, counts


def read_adapters(
    path: str | Path, models: dict, *, format: str = "auto", allow_pickle: bool = False, family=None
) -> AdapterWeights:
    """Read an adapter checkpoint and match it onto the base models.

    Args:
        path: an adapter file (kohya / LyCORIS, diffusers, cloneofsimo, embedding), a diffusers
            LoRA folder (`pytorch_lora_weights.safetensors`, with embedding files beside it), or a
            PEFT adapter folder.
        models: component name -> base model (read only: module names and shapes), e.g.
            {"unet": UNet2DConditionModel, "text_encoder": CLIPTextModel} (SDXL: also "text_encoder_2").
        family: the base's family (a `finextract.engine.families.Family` or name), named in messages.
        format: "auto" (detect) or one of `LORA_FORMATS`.
        allow_pickle: allow `.bin` / `.pt` files (read with `torch.load(weights_only=True)`).

    Returns:
        AdapterWeights (float32 tensors on the CPU).

    Raises:
        LoRAKeyError: a key matching no module, an unknown suffix, a module adapted twice, or
            shapes of another base model (each named in the message).
        EmbeddingError: an embedding of another width or a token already in the tokenizer.
        ValueError: unknown `format`, or not an adapter checkpoint.
        CheckpointFormatError / PickleRefusedError / FileNotFoundError: see `formats.load_state_dict`.
    """
    path = Path(path)
    if format != "auto" and format not in LORA_FORMATS:
        raise ValueError(f"LoRA format {format!r}: expected 'auto' or one of {', '.join(LORA_FORMATS)}")
    detected = detect_lora_format(path)
    state = metadata = None
    if path.is_file() and (detected is None or (detected == "diffusers" and path.suffix != ".safetensors")):
        state, metadata = _read_weights(path, allow_pickle)  # a pickle: its layout shows once read
        tensors = {k: v for k, v in state.items() if hasattr(v, "shape")}
        if "string_to_param" in state:
            detected = "embedding"
        else:
            detected = _format_of_keys({k: tuple(v.shape) for k, v in tensors.items()}, metadata)
    if format == "auto":
        if detected is None:
            raise ValueError(f"{path}: not an adapter checkpoint in a known format ({', '.join(LORA_FORMATS)})")
        format = detected
    if format in ("peft", "diffusers") or path.is_dir():
        parsed = _read_peft(path, allow_pickle) if format == "peft" else _read_diffusers(path, allow_pickle)
    else:
        if state is None:
            state, metadata = _read_weights(path, allow_pickle)
        if format == "kohya":
            parsed = _read_kohya(path, state, metadata)
        elif format == "cloneofsimo":
            parsed = _read_cloneofsimo(path, state, metadata, models)
        else:
            parsed = _Parsed([], "path", _LYCORIS_CONVENTIONS, path, embeddings_from_state(state, path))
    unknown = {key: key.rpartition(".")[2] for key in parsed.unknown}
    for group in parsed.groups:
        unknown.update({key: suffix for suffix, key in group.keys.items() if suffix not in KNOWN_SUFFIXES})
    if unknown:
        suffixes = ", ".join(repr(s) for s in sorted(set(unknown.values())))
        raise LoRAKeyError(
            f"{parsed.source}: unknown adapter tensor suffix {suffixes} in {len(unknown)} key(s), e.g. "
            f"{list(unknown)[:3]}: an adapter type not supported here (known suffixes: "
            f"{', '.join(sorted(KNOWN_SUFFIXES | set(PEFT_SUFFIXES)))})"
        )
    base_label = "the base"
    if family is not None:
        from .families import get_family

        base_label = f"the base is {get_family(family).label}"
    stray = sorted({g.component for g in parsed.groups} - set(models))
    if stray:
        words = ", ".join(_COMPONENT_WORDS.get(name, name) for name in stray)
        hint = ": the LoRA is for SDXL" if "text_encoder_2" in stray else ""
        raise LoRAKeyError(
            f"{parsed.source}: adapters for {words}, which the base model does not have ({base_label}){hint}"
        )
    weights = AdapterWeights(adapters={}, embeddings=parsed.embeddings, format=format)
    for component, model in models.items():
        weights.adapters[component], weights.counts[component] = _match(
            parsed, component, model, weights.alpha_assumed, base_label
        )
    tokens = [e.token for e in weights.embeddings]
    duplicates = sorted(t for t, n in Counter(tokens).items() if n > 1)
    if duplicates:
        raise EmbeddingError(f"{path}: the embedding token(s) {duplicates} come twice")
    weights.counts["embeddings"] = {
        "tokens": tokens,
        "vectors": sum(int(e.vectors.shape[0]) for e in weights.embeddings),
    }
    if not any(weights.adapters.values()) and not weights.embeddings:
        raise ValueError(f"{path}: the adapter checkpoint holds no adapters")
    _log(path, weights)
    return weights


def _log(path: Path, weights: AdapterWeights) -> None:
    parts = []
    for component, counts in weights.counts.items():
        if component == "embeddings" or not counts["modules"]:
            continue
        types = ", ".join(f"{name} {c['modules']}" for name, c in counts["types"].items())
        parts.append(f"{component}: {counts['modules']} modules ({types}) from {counts['keys']} keys")
    if weights.embeddings:
        parts.append("embeddings: " + ", ".join(weights.counts["embeddings"]["tokens"]))
    logger.info("%s (%s): %s; 0 keys unmatched", path, weights.format, "; ".join(parts))
    if weights.alpha_assumed:
        logger.info("%s: no alpha for %d module(s); assumed alpha = rank", path, len(weights.alpha_assumed))


def read_lora(
    path: str | Path, unet, text_encoder, *, format: str = "auto", allow_pickle: bool = False
) -> AdapterWeights:
    """`read_adapters` for a pair of models with one text encoder (SD 1.x, SD 2.x, AltDiffusion)."""
    return read_adapters(path, {"unet": unet, "text_encoder": text_encoder}, format=format, allow_pickle=allow_pickle)
