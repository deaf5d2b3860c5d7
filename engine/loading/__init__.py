"""Load a pretrained model and its fine-tune, in any format users download, into a `ModelPair`.

Nothing is downloaded: hub ids resolve from the local Hugging Face cache only. Pickles are refused
unless `allow_pickle=True` (see `finextract.engine.formats`). One module per job:

| module | what it does |
|---|---|
| `assemble` | `load_model_pair`: checks, the base, the fine-tune by its format, embeddings, the `ModelPair` |
| `base` | the base (pipeline folder or single file on a `base_config`), `load_base` / `LoadedBase` |
| `finetunes` | one loader per fine-tune format (`LOADERS`): folders, UNet files, checkpoints, adapters |
| `detect` | which format a fine-tune is, from its listing or header |
| `checks` | base / fine-tune compatibility: families, configs, tensor shapes, tokenizers, prediction types; NaN/Inf weights |
| `folders` | diffusers folders: parts with the family's classes (pickled parts through the restricted reader), tokenizers |
| `single_file` | original-layout (LDM / SGM) checkpoints, converted offline |
| `files` | paths, hub-cache ids, weight-file sniffing, config files |
| `parents` | which of several candidate bases a fine-tune was trained from (`rank_bases`, `choose_base`) |
"""

from .assemble import load_model_pair
from .base import LoadedBase, copy_sharing_weights, load_base
from .checks import (
    PREDICTION_TYPES,
    NonFiniteWeightsError,
    PredictionTypeMismatchError,
    check_state_dict,
    check_text_configs,
    check_unet_configs,
)
from .detect import FINETUNED_FORMATS, detect_finetuned_format
from .folders import folder_family
from .parents import BaseCandidate, choose_base, rank_bases

__all__ = [
    "FINETUNED_FORMATS",
    "PREDICTION_TYPES",
    "BaseCandidate",
    "LoadedBase",
    "NonFiniteWeightsError",
    "PredictionTypeMismatchError",
    "check_state_dict",
    "check_text_configs",
    "check_unet_configs",
    "choose_base",
    "copy_sharing_weights",
    "detect_finetuned_format",
    "folder_family",
    "load_base",
    "load_model_pair",
    "rank_bases",
]
