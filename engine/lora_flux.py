"""FLUX.1 adapter files: the layouts FLUX trainers write, told apart by their keys and converted to module
paths of diffusers' `FluxTransformer2DModel` (component "transformer") and FLUX's CLIP text encoder
("text_encoder").

| format | written by | keys |
|---|---|---|
| `diffusers` | diffusers, ai-toolkit, PEFT | `transformer.<path>.lora_A.weight` / `lora_B.weight`, `text_encoder.` |
| `kohya` | kohya-ss sd-scripts | BFL's module names: `lora_unet_double_blocks_<i>_img_attn_qkv.lora_down.weight`, `lora_unet_single_blocks_<i>_linear1`, ..., `.alpha`; CLIP `lora_te1_` |
| `xlabs` | XLabs-AI x-flux | `double_blocks.<i>.processor.qkv_lora1.down.weight`, `single_blocks.<i>.processor.proj_lora.up.weight` |
| `onetrainer` | OneTrainer | diffusers' module paths with '_' for '.': `lora_transformer_transformer_blocks_0_attn_to_q.lora_down.weight`, `.alpha`; CLIP `lora_te1_` |
| `bfl` | ComfyUI, fal | BFL's dotted module names: `diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight`, `base_model.model.double_blocks...lora_A.weight` |

The `kohya`, `xlabs` and `bfl` files name BFL's fused projections (a double block's `img_attn.qkv`, a single
block's `linear1` = q, k, v and the MLP input): diffusers' own converter (`FluxLoraLoaderMixin.lora_state_dict`,
which `FluxPipeline.load_lora_weights` calls) splits them, the down projection copied to each part and the
up projection cut by rows, with alpha / rank folded into the two factors. Its key names are used as they
come, so each of these files is read exactly as diffusers reads it. Where diffusers refuses or drops part
of a file (a T5 adapter, `lora_te2_`; a `single_blocks` `linear1` of another width than FLUX.1's 3072, which
its converter assumes), the file is refused with its format named. `onetrainer` files already name
diffusers' modules and are matched like kohya's underscored names (`lora_formats`).
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager

FLUX_FORMATS = ("kohya", "xlabs", "onetrainer", "bfl")
#: how messages name each FLUX layout
FLUX_FORMAT_LABELS = {
    "diffusers": "diffusers / ai-toolkit",
    "kohya": "kohya-ss (sd-scripts) FLUX",
    "xlabs": "XLabs-AI (x-flux)",
    "onetrainer": "OneTrainer FLUX",
    "bfl": "BFL-named (ComfyUI / fal)",
}
# BFL's top-level FLUX module names, as kohya writes them after `lora_unet_`
_BFL_MODULES = r"(double_blocks|single_blocks|img_in|txt_in|time_in|vector_in|guidance_in|final_layer)_"
KOHYA_FLUX_KEY = re.compile(rf"^lora_unet_{_BFL_MODULES}")
XLABS_KEY = re.compile(r"^(diffusion_model\.)?(double|single)_blocks\.\d+\.processor\.")
ONETRAINER_PREFIX = "lora_transformer_"
# BFL's dotted module names with LoRA suffixes, bare or under ComfyUI's `diffusion_model.` / fal's PEFT prefix
BFL_KEY = re.compile(r"^(diffusion_model\.|base_model\.model\.)?(double_blocks|single_blocks)\.\d+\..*lora")
# diffusers' top-level FLUX modules its kohya converter leaves without the `transformer.` prefix
_UNPREFIXED = ("x_embedder.", "context_embedder.", "time_text_embed.", "norm_out.", "proj_out.")
# what diffusers' FLUX converters log when they leave keys out of the converted state dict
_DROPPED = re.compile(r"unsupported|filter out|purge", re.I)


def flux_format_of_keys(keys) -> str | None:
    """The FLUX adapter layout ("kohya", "xlabs", "onetrainer") of a file's keys, or None.

    Only the layouts whose keys differ from diffusers' are told here; `transformer.`-prefixed diffusers
    keys are the "diffusers" format (`lora_formats` detects those).
    """
    keys = list(keys)
    if any(XLABS_KEY.match(key) for key in keys):
        return "xlabs"
    if any(key.startswith(ONETRAINER_PREFIX) for key in keys):
        return "onetrainer"
    if any(KOHYA_FLUX_KEY.match(key) for key in keys):
        return "kohya"
    if any(BFL_KEY.match(key) for key in keys):
        return "bfl"
    return None


class _Dropped(logging.Handler):
    """Collects what diffusers' converters log about keys they leave out."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if _DROPPED.search(message):
            self.messages.append(message)


@contextmanager
def _watching(logger_name: str):
    logger = logging.getLogger(logger_name)
    handler, level = _Dropped(), logger.level
    logger.addHandler(handler)
    logger.setLevel(min(level or logging.WARNING, logging.INFO))
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def convert_flux_state(state: dict, fmt: str, source) -> dict:
    """A kohya, XLabs or BFL-named FLUX adapter state dict in diffusers' keys, converted by diffusers' FLUX LoRA loader.

    Args:
        state: the file's tensors (not modified).
        fmt: "kohya", "xlabs" or "bfl" (`flux_format_of_keys`).
        source: the file, named in messages.

    Returns:
        {"transformer.<path>.lora_A.weight" | "lora_B.weight": tensor, "text_encoder.<path>...": ...} with
        alpha / rank folded into the factors (no alpha keys: scale 1); diffusers' older text-encoder names
        (`to_q_lora.down`, `lora_linear_layer.up`) converted to PEFT's. Converted keys that diffusers leaves
        without a component prefix (kohya's `img_in`, `txt_in`, `time_in`, `vector_in`, `guidance_in`,
        `final_layer`, which `FluxPipeline.load_lora_weights` then ignores) get `transformer.`: they name
        transformer modules.

    Raises:
        LoRAKeyError: the file adapts FLUX's T5 encoder, or diffusers' converter fails on it, leaves keys
            out or unconverted (naming the format and diffusers' words).
    """
    # heavy: diffusers, only when a FLUX adapter file is read
    from diffusers.loaders import FluxLoraLoaderMixin
    from diffusers.utils.state_dict_utils import StateDictType, convert_state_dict_to_peft

    from .lora_layouts import LoRAKeyError

    label = FLUX_FORMAT_LABELS[fmt]
    t5 = [key for key in state if key.startswith(("lora_te2_", "text_encoders.t5xxl."))]
    if t5:
        raise LoRAKeyError(
            f"{source}: a {label} LoRA that adapts FLUX's T5 text encoder ({len(t5)} keys, e.g. {t5[0]!r}), which "
            "diffusers' FLUX LoRA loader does not read: not supported (use a LoRA of the transformer and CLIP only)"
        )
    with _watching("diffusers.loaders.lora_conversion_utils") as dropped:
        try:
            converted = FluxLoraLoaderMixin.lora_state_dict(dict(state))
        except (AssertionError, ValueError, KeyError, NotImplementedError, IndexError, RuntimeError) as error:
            hint = ""
            if fmt == "kohya" and any(re.match(r"lora_unet_single_blocks_\d+_linear1\.", k) for k in state):
                hint = (
                    " (its converter splits a single block's linear1 at FLUX.1's widths 3072, 3072, 3072, 12288: "
                    "the LoRA is for a FLUX model of another size)"
                )
            raise LoRAKeyError(
                f"{source}: a {label} LoRA that diffusers' FLUX LoRA loader cannot read: "
                f"{type(error).__name__}: {error}{hint}"
            ) from None
    if dropped.messages:
        raise LoRAKeyError(
            f"{source}: a {label} LoRA of which diffusers' FLUX LoRA loader leaves keys out "
            f"({'; '.join(dropped.messages)}): not supported"
        )
    transformer, text, left = {}, {}, []
    for key, tensor in converted.items():
        component, _, rest = key.partition(".")
        if component == "text_encoder":
            text[rest] = tensor
        elif component == "transformer" or key.startswith(_UNPREFIXED):
            transformer[rest if component == "transformer" else key] = tensor
        else:
            left.append(key)
    if left:
        raise LoRAKeyError(
            f"{source}: a {label} LoRA whose keys diffusers' FLUX LoRA loader does not convert ({len(left)} keys, "
            f"e.g. {left[:3]}): not supported"
        )
    if text:
        text = convert_state_dict_to_peft(text, original_type=StateDictType.DIFFUSERS_OLD)
    return {
        **{f"transformer.{key}": value for key, value in transformer.items()},
        **{f"text_encoder.{key}": value for key, value in text.items()},
    }
