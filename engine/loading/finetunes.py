"""The fine-tune of a pair, one loader per format (`LOADERS`), each on the already loaded base.

Every loader takes (path, base parts, sources) and returns a `FineTune`: what the fine-tune replaces
of the base, the base's models everywhere else. `sources` gains what each format records.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..adapters import as_low_rank, merge_adapters
from ..families import check_family, checkpoint_evidence
from ..formats import file_sha256, load_state_dict, sniff, state_dict_keys
from ..lora_formats import read_adapters
from .base import copy_sharing_weights
from .checks import check_adapter_family, check_state_dict, check_text_configs, check_tokenizer, check_unet_configs
from .files import read_scheduler_config
from .folders import finetuned_tokenizer, load_folder_parts, load_unet_dir
from .single_file import load_ldm_parts

logger = logging.getLogger(__name__)


@dataclass
class FineTune:
    """What a fine-tune replaces of its base (the base's models where it replaces nothing).

    Attributes:
        kind: "dreambooth" (a second UNet) or "lora" (adapters on the base).
        texts, tokenizers: name -> text encoder / tokenizer ("text_encoder", SDXL also "text_encoder_2").
        vae: the VAE the pair decodes with.
        base_unet: the base UNet of the pair (a LoRA's hooks go on a weight-sharing copy of a shared one).
        unet: the fine-tuned UNet; None for LoRA / LoCon adapters run as `unet_lora` branches.
        unet_lora: module path -> `LoRALayer`, or None.
        scheduler: (scheduler config, where it came from) the fine-tune ships, or None.
        embeddings: textual-inversion embeddings found in an adapter file.
    """

    kind: str
    texts: dict
    tokenizers: dict
    vae: object
    base_unet: object
    unet: object = None
    unet_lora: dict | None = None
    scheduler: tuple | None = None
    embeddings: list = field(default_factory=list)


def _unchanged(base: dict, kind: str) -> FineTune:
    family = base["family"]
    return FineTune(
        kind,
        texts={name: base[name] for name in family.text_encoders},
        tokenizers={name: base[name] for name in family.tokenizers},
        vae=base["vae"],
        base_unet=base["unet"],
    )


def load_adapter(path: Path, base: dict, sources: dict, *, fmt: str, allow_pickle: bool, shared: bool) -> FineTune:
    """Any adapter layout `lora_formats.read_adapters` reads; `shared`: the base is a `LoadedBase`."""
    family, base_unet = base["family"], base["unet"]
    tune = _unchanged(base, "lora")
    check_adapter_family(path, family, dict(base_unet.config))
    weights = read_adapters(
        path,
        {
            "unet": base_unet,
            **{name: model for name, model in tune.texts.items() if model is not None},
        },  # SD3's T5 is optional
        format=fmt.removeprefix("lora_"),
        allow_pickle=allow_pickle,
        family=family,
    )
    tune.unet_lora, tune.unet = _adapter_unet(base_unet, weights.unet, sources)
    if tune.unet_lora and shared:  # the hooks go on this pair's own UNet modules
        tune.base_unet = copy_sharing_weights(base_unet)
    for name in family.text_encoders:
        if weights.adapters.get(name):
            tune.texts[name] = merge_adapters(copy.deepcopy(base[name]), weights.adapters[name])
    tune.embeddings = weights.embeddings
    sources.update(
        finetuned_format=f"lora_{weights.format}",
        lora_format=weights.format,
        lora_counts=weights.counts,
        lora_alpha_assumed=weights.alpha_assumed,
    )
    if path.is_file():
        sources["lora_sha256"] = file_sha256(path)
    return tune


def _adapter_unet(base_unet, adapters: dict, sources: dict):
    """(unet_lora, finetuned_unet): LoRA / LoCon stay a per-sample low-rank branch; any other type
    (or DoRA) is merged, with the low-rank ones, into a copy of the base UNet."""
    if not adapters:
        return None, None
    modules = dict(base_unet.named_modules())
    low_rank = {path: as_low_rank(adapter, modules[path]) for path, adapter in adapters.items()}
    if all(layer is not None for layer in low_rank.values()):
        sources["unet_adapters"] = "low-rank branch (per sample, on the base UNet)"
        return low_rank, None
    sources["unet_adapters"] = "merged into a copy of the base UNet"
    return None, merge_adapters(copy.deepcopy(base_unet), adapters)


def load_folder(path: Path, base: dict, sources: dict, *, fmt: str, allow_pickle: bool, shared: bool) -> FineTune:
    """A pipeline folder or a bare `unet/` folder: its UNet, and its text encoders, tokenizers, VAE and
    scheduler config where it ships them."""
    family = base["family"]
    tune = _unchanged(base, "dreambooth")
    unet_dir = path / family.denoiser if (path / family.denoiser).is_dir() else path
    tune.unet = load_unet_dir(unet_dir, allow_pickle, family)
    check_unet_configs(dict(base["unet"].config), dict(tune.unet.config))
    for name, tokenizer_name in zip(family.text_encoders, family.tokenizers):
        if base[name] is None:  # an optional text encoder the base runs without (SD3's T5)
            continue
        if unet_dir != path and (path / name).is_dir():
            tune.texts[name] = load_folder_parts(path, allow_pickle, (name,), family)[name]
            check_text_configs(base[name].config.to_dict(), tune.texts[name].config.to_dict(), f"fine-tuned {name}")
        tune.tokenizers[tokenizer_name], sources[tokenizer_name] = finetuned_tokenizer(
            path, base[tokenizer_name], family, tokenizer_name
        )
        check_tokenizer(tune.tokenizers[tokenizer_name], tune.texts[name], f"fine-tune {path} ({name})")
    if fmt == "pipeline" and (path / "vae").is_dir():
        tune.vae = load_folder_parts(path, allow_pickle, ("vae",), family)["vae"]
    if (path / "scheduler" / "scheduler_config.json").is_file():
        tune.scheduler = (read_scheduler_config(path), path / "scheduler" / "scheduler_config.json")
    return tune


def load_unet_file(path: Path, base: dict, sources: dict, *, fmt: str, allow_pickle: bool, shared: bool) -> FineTune:
    """A single-file UNet state dict (diffusers names, optionally prefixed `unet.`) on the base's config;
    a pickle that holds an original-layout checkpoint (known only once read) goes to `load_checkpoint`."""
    base_unet, family = base["unet"], base["family"]
    expected = {k: tuple(v.shape) for k, v in base_unet.state_dict().items()}
    what = f"fine-tuned UNet file {path}"

    def check(found: dict) -> None:
        check_family(
            family,
            base_unet.config.cross_attention_dim,
            checkpoint_evidence(found),
            f"the {what}",
            "pass the base model the fine-tune was trained from",
            relation="is",
        )
        check_state_dict(expected, found, what)

    if sniff(path) == "safetensors":  # check names/shapes from the header before reading tensors
        check({k.removeprefix("unet."): v for k, v in state_dict_keys(path).items()})
    state = {k.removeprefix("unet."): v for k, v in load_state_dict(path, allow_pickle=allow_pickle).items()}
    if any(k.startswith("model.diffusion_model.") for k in state):
        sources["finetuned_format"] = "checkpoint"
        return load_checkpoint(path, base, sources, fmt="checkpoint", allow_pickle=allow_pickle, shared=shared)
    check({k: tuple(v.shape) for k, v in state.items()})
    from diffusers import UNet2DConditionModel  # heavy: imported when a UNet is built

    tune = _unchanged(base, "dreambooth")
    tune.unet = UNet2DConditionModel.from_config(base_unet.config)
    tune.unet.load_state_dict(state, strict=True)
    tune.unet.eval()
    return tune


def load_checkpoint(path: Path, base: dict, sources: dict, *, fmt: str, allow_pickle: bool, shared: bool) -> FineTune:
    """An original-layout single-file checkpoint, converted on the base's configs; the text encoders and
    VAE it lacks are the base's, its `v_pred` marker becomes the fine-tune's scheduler config."""
    tune = _unchanged(base, "dreambooth")
    converted = load_ldm_parts(
        path,
        {"unet": dict(base["unet"].config), **tune.texts, "vae": dict(tune.vae.config)},
        family=base["family"],
        allow_pickle=allow_pickle,
        what="fine-tuned checkpoint",
        fix="pass the base model the fine-tune was trained from",
    )
    tune.unet = converted["unet"]
    texts = {name: converted.get(name) for name in tune.texts}
    vae = converted["vae"]
    for part, model in [*texts.items(), ("VAE", vae)]:
        if model is None:
            logger.info("%s holds no %s: using the base's", path, part.replace("_", " "))
    sources["single_file_parts"] = ["unet"] + [name for name, m in (*texts.items(), ("vae", vae)) if m is not None]
    evidence = converted.get("evidence")
    if evidence is not None and evidence.prediction_type:
        tune.scheduler = ({"prediction_type": evidence.prediction_type}, f"its v_pred marker tensor in {path}")
    if evidence is not None and evidence.zero_terminal_snr:
        sources["finetuned_markers"] = ["ztsnr"]
    tune.texts = {name: model if model is not None else tune.texts[name] for name, model in texts.items()}
    tune.vae = vae if vae is not None else tune.vae
    return tune


def finetuned_models(tune: FineTune, base: dict) -> dict:
    """What `tune` loaded of its own (not the base's models): part name -> module, or a dict of its UNet
    LoRA tensors; for `loading.checks.check_finite`."""
    models = {"unet": tune.unet, "vae": tune.vae if tune.vae is not base["vae"] else None}
    models.update({name: text for name, text in tune.texts.items() if text is not base[name]})
    if tune.unet_lora:
        models["unet LoRA"] = {
            f"{path}.{side}": getattr(layer, side) for path, layer in tune.unet_lora.items() for side in ("down", "up")
        }
    return models


Loader = Callable[..., FineTune]
# fine-tune format (`detect.FINETUNED_FORMATS`, resolved) -> its loader; every "lora_*" is `load_adapter`
LOADERS: dict[str, Loader] = {
    "pipeline": load_folder,
    "unet_folder": load_folder,
    "unet_file": load_unet_file,
    "checkpoint": load_checkpoint,
}


def load_finetune(path: Path, fmt: str, base: dict, sources: dict, *, allow_pickle: bool, shared: bool) -> FineTune:
    """The fine-tune at `path` in format `fmt` on `base` (the base's parts, `base.base_parts`)."""
    loader = load_adapter if fmt.startswith("lora_") else LOADERS[fmt]
    return loader(path, base, sources, fmt=fmt, allow_pickle=allow_pickle, shared=shared)
