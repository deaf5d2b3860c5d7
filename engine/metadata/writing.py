"""The metadata `finextract finetune` writes: the keys the popular trainers use, so that any tool that
reads kohya's or the model spec's keys (and `read_metadata` / `training_record`) finds what was trained."""

from __future__ import annotations

from pathlib import Path

# kohya's `ss_base_model_version` (`model_util.get_model_version_str_for_sd1_sd2`, sdxl_model_util)
# and the model spec's architecture id, per family and prediction type
_KOHYA_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0", "altdiffusion": "sd_v1"}
_MODELSPEC_ARCHITECTURE = {
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2-512",
    "sdxl": "stable-diffusion-xl-v1-base",
    "altdiffusion": "stable-diffusion-v1",
}


def caption_tags(caption: str) -> list[str]:
    """kohya's tags of one caption (`BaseDataset.set_tag_frequency`): split at commas, stripped,
    lower-cased, empty ones dropped."""
    return [tag.strip().lower() for tag in caption.split(",") if tag.strip()]


def finetune_metadata(
    *,
    method: str,
    caption: str,
    num_images: int,
    image_folder: str,
    steps: int,
    lr: float,
    batch_size: int,
    rank: int,
    alpha: float,
    resolution: int,
    seed: int,
    dtype: str,
    base_name: str,
    base_hashes: dict[str, str],
    family: str = "sd1",
    prediction_type: str = "epsilon",
) -> dict[str, str]:
    """The safetensors metadata of a fine-tune, in kohya-ss sd-scripts' `ss_*` keys and Stability's
    `modelspec.*` keys (every value a string, as safetensors metadata requires).

    Each image is seen once per epoch (kohya's repeats = 1), so `ss_num_train_images` equals N0 here;
    `ss_dataset_dirs` holds the image folder's name and count, `ss_tag_frequency` the caption's tags
    counted once per image (`caption_tags`), `modelspec.trigger_phrase` the caption as given.

    Args:
        method: "dreambooth" or "lora". caption: the instance prompt. num_images: N0, distinct images.
        image_folder: the training folder's name (a name only, never a path).
        steps, lr, batch_size, rank, alpha, resolution (px), seed, dtype ("fp32" / "fp16" / "bf16"): the run.
        base_name: the base model's folder name. base_hashes: `kohya_model_hashes` of its UNet weights file
            ({"ss_sd_model_hash", "ss_new_sd_model_hash"}), or {} when it has none.
        family: the base's family name. prediction_type: "epsilon" / "v_prediction".

    Returns:
        {key: str}.
    """
    import json

    v_suffix = "_v" if prediction_type == "v_prediction" and family in ("sd1", "sd2") else ""
    architecture = _MODELSPEC_ARCHITECTURE.get(family, family) + ("/lora" if method == "lora" else "")
    values = {
        "ss_training_comment": f"finextract finetune --method {method}",
        "ss_sd_model_name": base_name,
        **base_hashes,
        "ss_base_model_version": _KOHYA_VERSION.get(family, family) + v_suffix,
        "ss_v2": family == "sd2",
        "ss_num_train_images": num_images,  # images x repeats, repeats = 1
        "ss_num_reg_images": 0,
        "ss_dataset_dirs": json.dumps({image_folder: {"n_repeats": 1, "img_count": num_images}}),
        "ss_tag_frequency": json.dumps({image_folder: {tag: num_images for tag in caption_tags(caption)}}),
        "ss_steps": steps,
        "ss_max_train_steps": steps,
        "ss_learning_rate": lr,
        "ss_batch_size_per_device": batch_size,
        "ss_resolution": f"({resolution}, {resolution})",  # kohya writes str() of its (w, h) tuple
        "ss_seed": seed,
        "ss_mixed_precision": {"fp32": "no"}.get(dtype, dtype),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture,
        "modelspec.implementation": "diffusers",
        "modelspec.title": f"finextract {method}: {caption}",
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.trigger_phrase": caption,
        "modelspec.prediction_type": prediction_type,
    }
    if method == "lora":
        values |= {"ss_network_dim": rank, "ss_network_alpha": alpha}
    return {key: str(value) for key, value in values.items()}


def add_safetensors_metadata(file: str | Path, metadata: dict[str, str]) -> None:
    """Rewrite a safetensors file with `metadata` added to its header metadata (added keys win); the
    tensors are written back unchanged, bit for bit, in the file's own order.

    Raises:
        OSError / safetensors errors: the file cannot be read or written.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ..formats import atomic_write

    with safe_open(str(file), framework="pt") as handle:
        existing = handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    file = Path(file)
    staged = file.with_name(f".{file.name}.metadata")
    save_file(tensors, str(staged), metadata={**existing, **{k: str(v) for k, v in metadata.items()}})
    atomic_write(file, staged.read_bytes())
    staged.unlink()
