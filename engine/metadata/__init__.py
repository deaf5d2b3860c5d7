"""What a checkpoint's trainer recorded: read the metadata (`read_metadata`), then the training record an
auditor needs (`training_record`), each value with the key it came from.

Producers read, with the keys and value formats they write:

| producer | where | keys |
|---|---|---|
| kohya-ss sd-scripts (and LyCORIS trained through it) | safetensors metadata | `ss_*`: every value a string; `ss_dataset_dirs` JSON `{folder: {"n_repeats", "img_count"}}`, `ss_tag_frequency` JSON `{folder: {tag: count}}` (captions split at commas, stripped, lower-cased), `ss_resolution` `"(512, 512)"`, `ss_sd_model_hash` (sha256 of the 64 KiB at 1 MiB, 8 hex digits), `ss_new_sd_model_hash` (sha256 of the whole file), `ss_base_model_version` (`sd_v1`, `sd_v2_v`, `sdxl_base_v1-0`, ...) |
| Stability's model spec | safetensors metadata | `modelspec.*` (`architecture` e.g. `stable-diffusion-v1/lora`, `resolution` `"512x512"`, `trigger_phrase`, `title`, ...) |
| PEFT | `adapter_config.json` | `r`, `lora_alpha`, `target_modules`, `base_model_name_or_path`, `peft_type`, `rank_pattern`, `alpha_pattern` |
| diffusers `save_lora_weights` | safetensors metadata `lora_adapter_metadata` | JSON of each component's LoraConfig fields as `"<component>.<field>"` (`unet.r`, `unet.lora_alpha`, ...) |
| finextract `finetune` | `finetune.json` in the fine-tune's folder (its parent for a `unet/` folder) | `caption`, `num_images`, `steps`, `lr`, `rank`, `resolution`, `base_name`, `base_unet_sha256`, ... (`FINETUNE_RECORD`) |

N0 is the number of distinct training images: the `img_count`s of `ss_dataset_dirs` summed. kohya's
`ss_num_train_images` counts each image once per repeat, so it is never read as N0. `sshs_model_hash` /
`sshs_legacy_hash` are the adapter file's own hashes (sd-webui-additional-networks), not the parent's.

Metadata is data: nothing in it is executed, imported or used as a path. A value that is not what its
producer writes (not JSON, a wrong type, a count out of range, more than `MAX_VALUE_CHARS` characters)
gives a warning and is left out; the rest of the record stands. Keys no producer above defines are
kept raw in `TrainingRecord.unknown`. Importing this module loads no torch.

| module | what it does |
|---|---|
| `files` | `read_metadata` (files, headers; never a pickle), `header_keys` (their safetensors keys merged), `kohya_model_hashes` (the parent hashes kohya writes) |
| `record` | `training_record`: `TrainingRecord` of `Field(value, source)`s, per producer |
| `writing` | `finetune_metadata` (the `ss_*` / `modelspec.*` keys `finextract finetune` writes), `add_safetensors_metadata` |
"""

from .files import FINETUNE_RECORD, MAX_VALUE_CHARS, header_keys, kohya_model_hashes, read_metadata
from .record import Field, TrainingRecord, training_record, trigger_words
from .writing import add_safetensors_metadata, caption_tags, finetune_metadata

__all__ = [
    "FINETUNE_RECORD",
    "MAX_VALUE_CHARS",
    "Field",
    "TrainingRecord",
    "add_safetensors_metadata",
    "caption_tags",
    "finetune_metadata",
    "header_keys",
    "kohya_model_hashes",
    "read_metadata",
    "training_record",
    "trigger_words",
]
