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

This module detects the layout and matches the read groups onto modules; each layout's reader is in
`lora_layouts`.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .adapters import KNOWN_SUFFIXES, Adapter, AdapterError, adapter_type, supports
from .embeddings import Embedding, EmbeddingError, embeddings_from_state, is_embedding_header
from .families import get_family
from .formats import read_safetensors_header, sniff
from .lora_flux import FLUX_FORMAT_LABELS, convert_flux_state, flux_format_of_keys
from .lora_layouts import (
    CLONEOFSIMO_KEY,
    COMPONENT_WORDS,
    KOHYA_PREFIXES,
    LORA_FORMATS,
    LYCORIS_CONVENTIONS,
    PEFT_SUFFIXES,
    Group,
    LoRAKeyError,
    Parsed,
    read_cloneofsimo,
    read_diffusers,
    read_kohya,
    read_peft,
    read_weights,
)

logger = logging.getLogger(__name__)


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


# --- format detection ---


def _format_of_keys(shapes: dict[str, tuple], metadata: dict) -> str | None:
    """The layout of a single adapter file from its tensor names and shapes (None: not an adapter)."""
    keys = list(shapes)
    if not keys:
        return None
    flux = flux_format_of_keys(keys)
    if flux is not None:
        return flux
    if all(key.startswith((*KOHYA_PREFIXES, "bundle_emb.")) for key in keys):
        return "kohya"
    if any(CLONEOFSIMO_KEY.fullmatch(key) for key in keys) or any(metadata.get(k) == "<embed>" for k in keys):
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
        from diffusers.loaders.lora_conversion_utils import (  # heavy: diffusers, only for the kohya key fallback
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


def _resolver(parsed: Parsed, component: str, model):
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


def _first_key(group: Group) -> str:
    return next(iter(group.keys.values()), group.name)


def _match(
    parsed: Parsed, component: str, model, alpha_assumed: list, base_label: str = "the base"
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


# SD3's MMDiT under Stability AI's names, as kohya-ss sd-scripts (`lora_unet_joint_blocks_0_x_block_attn_qkv`) and
# ComfyUI (`diffusion_model.joint_blocks.0.x_block.attn.qkv`) write SD3 LoRAs
_SAI_SD3_KEY = re.compile(r"^(lora_unet_|diffusion_model\.|lora_transformer_)?joint_blocks[._]\d")


def refuse_sai_sd3(path: Path) -> None:
    """Raise LoRAKeyError for an SD3 LoRA under Stability AI's module names (headers only): diffusers' SD3 LoRA
    loader (`SD3LoraLoaderMixin.lora_state_dict`, which `StableDiffusion3Pipeline.load_lora_weights` calls) has
    no converter for them and reads `transformer.`-prefixed diffusers / PEFT keys only."""
    if not path.is_file() or sniff(path) != "safetensors":
        return
    header, _ = read_safetensors_header(path)
    key = next((k for k in sorted(header) if _SAI_SD3_KEY.match(k)), None)
    if key is not None:
        kind = "kohya-ss (sd-scripts)" if key.startswith("lora_") else "ComfyUI"
        raise LoRAKeyError(
            f"{path}: a {kind} SD3 LoRA (Stability AI's MMDiT names, e.g. {key!r}), which diffusers' SD3 LoRA loader "
            "(StableDiffusion3Pipeline.load_lora_weights) does not read: not supported (use the LoRA in diffusers' "
            "format, `transformer.<path>.lora_A.weight`, as StableDiffusion3Pipeline.save_lora_weights writes it)"
        )


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
    refuse_sai_sd3(path)
    detected = detect_lora_format(path)
    state = metadata = None
    if path.is_file() and (detected is None or (detected == "diffusers" and path.suffix != ".safetensors")):
        state, metadata = read_weights(path, allow_pickle)  # a pickle: its layout shows once read
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
        parsed = read_peft(path, allow_pickle) if format == "peft" else read_diffusers(path, allow_pickle)
    else:
        if state is None:
            state, metadata = read_weights(path, allow_pickle)
        if format in ("xlabs", "bfl") or (format == "kohya" and flux_format_of_keys(state) == "kohya"):
            parsed = read_diffusers(path, allow_pickle, state=convert_flux_state(state, format, path))
        elif format in ("kohya", "onetrainer"):
            parsed = read_kohya(path, state, metadata)
        elif format == "cloneofsimo":
            parsed = read_cloneofsimo(path, state, metadata, models)
        else:
            parsed = Parsed([], "path", LYCORIS_CONVENTIONS, path, embeddings_from_state(state, path))
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
        base_label = f"the base is {get_family(family).label}"
        t5 = [_first_key(g) for g in parsed.groups if g.component == "text_encoder_2"]
        if get_family(family).name == "flux" and t5:
            raise LoRAKeyError(
                f"{parsed.source}: a {FLUX_FORMAT_LABELS.get(format, format)} LoRA that adapts FLUX's T5 text encoder "
                f"({len(t5)} modules, e.g. {t5[0]!r}), which diffusers' FLUX LoRA loader does not read: not supported "
                "(use a LoRA of the transformer and CLIP only)"
            )
    stray = sorted({g.component for g in parsed.groups} - set(models))
    if stray:
        words = ", ".join(COMPONENT_WORDS.get(name, name) for name in stray)
        hint = ""
        if "transformer" in stray:
            hint = ": the LoRA is for a diffusion transformer (FLUX.1 or SD 3)"
        elif "text_encoder_2" in stray:
            hint = ": the LoRA is for SDXL"
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
