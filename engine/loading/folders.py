"""Diffusers folders: a pipeline's parts with its family's classes, a bare `unet/`, a fine-tune's tokenizers."""

from __future__ import annotations

import json
from pathlib import Path

from ..families import Family, detect_family
from ..formats import PICKLE_SUFFIXES, load_state_dict
from .files import check_weight_files, optional_config


def load_folder_parts(folder: Path, allow_pickle: bool, parts: tuple[str, ...], family: Family) -> dict:
    """Load the named parts ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "vae", "tokenizer",
    "tokenizer_2", "tokenizer_3") of a pipeline folder, with the family's classes. "unet" is the family's
    denoiser (a flow family's `transformer/` folder and class); an optional text encoder the folder lacks
    (SD3 saved without T5) and its tokenizer are None."""
    # heavy: diffusers takes seconds to import; loaded when a model is built
    from diffusers import AutoencoderKL

    loaded = {}
    optional = {
        name
        for encoder in family.optional_text_encoders
        for name in (encoder, encoder.replace("text_encoder", "tokenizer"))
    }
    for part in parts:
        sub = folder / (family.denoiser if part == "unet" else part)
        if part in optional and not sub.is_dir():
            loaded[part] = None
            continue
        if part.startswith("tokenizer"):
            loaded[part] = family.tokenizer_class_object(family.tokenizers.index(part)).from_pretrained(str(sub))
            continue
        if part.startswith("text_encoder"):
            cls = family.text_encoder_class(family.text_encoders.index(part))
        else:
            cls = {"unet": family.denoiser_class_object(), "vae": AutoencoderKL}[part]
        loaded[part] = load_part(cls, sub, allow_pickle)
    return loaded


def load_part(cls, folder: Path, allow_pickle: bool):
    """A diffusers or transformers model of class `cls` from a model folder, in eval mode: safetensors
    through the library's `from_pretrained`; pickles (`allow_pickle`) through our restricted reader
    (`pickle_part`), since the libraries' own readers refuse old training state with a generic error
    and diffusers initialises a UNet at random from a `.bin` that nests its weights."""
    if check_weight_files(folder, allow_pickle):
        return cls.from_pretrained(str(folder), use_safetensors=True).eval()
    return pickle_part(cls, folder)


def pickle_files(folder: Path) -> list[Path]:
    """The pickle weights of a model folder: the shards its `*.bin.index.json` lists, else the library's
    file name (`diffusion_pytorch_model.bin`, `pytorch_model.bin`), else its only pickle.

    Raises:
        FileNotFoundError: an index lists a missing shard.
        ValueError: several pickles and none of the library's names (naming them and the fix).
    """
    indexes = sorted(folder.glob("*.bin.index.json"))
    if indexes:
        shards = sorted(set(json.loads(indexes[0].read_text()).get("weight_map", {}).values()))
        missing = [name for name in shards if not (folder / Path(name).name).is_file()]
        if missing:
            raise FileNotFoundError(f"{indexes[0]} lists shard(s) {missing} that {folder} lacks; download them")
        return [folder / Path(name).name for name in shards]
    for name in ("diffusion_pytorch_model.bin", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if len(pickles) != 1:
        raise ValueError(
            f"{folder} holds {len(pickles)} pickle weight files ({', '.join(p.name for p in pickles)}) and none is "
            "named diffusion_pytorch_model.bin / pytorch_model.bin: keep the one that is the model's weights"
        )
    return pickles


def pickle_part(cls, folder: Path):
    """`cls` built from `folder`'s config.json with the tensors of its pickle weights (`pickle_files`), read
    by `formats.load_state_dict` (restricted unpickler; a nested "state_dict" unwrapped), in eval mode.

    Raises:
        ValueError: the tensors do not fit the config (missing, unexpected or mis-shaped tensors, naming
            the files); the errors of `formats.load_state_dict`.
    """
    from .checks import check_state_dict  # checks imports this module

    files = pickle_files(folder)
    state = {}
    for file in files:
        state.update(load_state_dict(file, allow_pickle=True))
    where = f"{', '.join(str(file) for file in files)} (pickle weights of {folder})"
    if hasattr(cls, "load_config"):  # diffusers: an exact fit, checked before loading
        model = cls.from_config(cls.load_config(str(folder)))
        expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
        check_state_dict(expected, {key: tuple(value.shape) for key, value in state.items()}, where)
        model.load_state_dict(state, strict=True)
        return model.eval()
    config = cls.config_class.from_pretrained(str(folder))  # transformers: its own key renames, then checked
    model, info = cls.from_pretrained(None, config=config, state_dict=state, output_loading_info=True)
    problems = {name: info.get(name) for name in ("missing_keys", "mismatched_keys") if info.get(name)}
    if problems:
        raise ValueError(
            f"{where} does not fit its config.json: "
            + "; ".join(f"{len(v)} {k.replace('_', ' ')}, e.g. {sorted(v)[:3]}" for k, v in problems.items())
        )
    return model.eval()


def folder_family(folder: Path, where: str) -> tuple[Family, dict]:
    """The family of a diffusers folder (a pipeline, or a bare `unet/` with or without text encoders),
    and its `model_index.json` (empty when it has none), from configs only.

    Raises:
        UnknownFamilyError: see `finextract.engine.families.detect_family`.
    """
    index = json.loads((folder / "model_index.json").read_text()) if (folder / "model_index.json").is_file() else {}
    unet_dir = folder / "unet" if (folder / "unet").is_dir() else folder
    transformer_dir = folder / "transformer" if (folder / "transformer").is_dir() else folder
    transformer_config = optional_config(transformer_dir)
    if transformer_config is not None and "Transformer" not in transformer_config.get("_class_name", ""):
        transformer_config = None
    family = detect_family(
        None if transformer_config is not None else optional_config(unet_dir),
        optional_config(folder / "text_encoder"),
        text_encoder_2_config=optional_config(folder / "text_encoder_2"),
        pipeline_class=index.get("_class_name"),
        requires_aesthetics_score=bool(index.get("requires_aesthetics_score")),
        transformer_config=transformer_config,
        where=where,
    )
    return family, index


def family_parts(family: Family, *names: str) -> tuple[str, ...]:
    """The pipeline parts to load for a family: `names` with the family's text encoders and tokenizers."""
    parts = []
    for name in names:
        parts += list(
            family.text_encoders if name == "text_encoders" else family.tokenizers if name == "tokenizers" else [name]
        )
    return tuple(parts)


def load_unet_dir(folder: Path, allow_pickle: bool, family: Family | None = None):
    """The family's denoiser (`UNet2DConditionModel`; SD3 / FLUX.1's transformer) of a model folder
    (config.json and weights), in eval mode."""
    from diffusers import UNet2DConditionModel

    cls = family.denoiser_class_object() if family is not None else UNet2DConditionModel
    return load_part(cls, folder, allow_pickle)


def finetuned_tokenizer(ft_path: Path, base_tokenizer, family: Family, name: str = "tokenizer"):
    """The fine-tune's own tokenizer (its `tokenizer/` or `tokenizer_2/` folder), else the base's; and which it is."""
    folder = ft_path / name
    if ft_path.is_dir() and (folder / "tokenizer_config.json").is_file():
        return family.tokenizer_class_object(family.tokenizers.index(name)).from_pretrained(str(folder)), "finetuned"
    return base_tokenizer, "base"
