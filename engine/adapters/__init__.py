"""The mathematics of every adapter type users publish, one module per family.

Each type reads one module's tensors (suffix -> tensor, LyCORIS / kohya suffixes) and computes the
module's adapted weight; file formats and key names are `finextract.engine.lora_formats`' concern.

| type | module | tensors |
|---|---|---|
| lora (LoRA, LoCon, DoRA) | `lora.py` | lora_down / lora_up / lora_mid, alpha, dora_scale |
| loha | `loha.py` | hada_w1_a ... hada_t2 |
| lokr | `lokr.py` | lokr_w1(_a, _b), lokr_w2(_a, _b), lokr_t2 |
| oft, boft, oftv2 | `oft.py` | oft_blocks (3-D / 4-D), rescale; oft_R.weight |
| glora | `glora.py` | a1, a2, b1, b2 (.weight), bm |
| diff, norm | `full.py` | diff, diff_b; w_norm, b_norm |
"""

from __future__ import annotations

import torch
from torch import nn

from ..pair import LoRALayer
from .base import Adapter, AdapterError, Conventions
from .full import Diff, NormDiff
from .glora import GLoRA
from .loha import LoHa
from .lokr import LoKr
from .lora import LoRA
from .oft import BOFT, OFT, OFTv2

ADAPTER_TYPES: tuple[type[Adapter], ...] = (LoRA, LoHa, LoKr, OFT, BOFT, OFTv2, GLoRA, Diff, NormDiff)
KNOWN_SUFFIXES: frozenset[str] = frozenset().union(*(cls.suffixes for cls in ADAPTER_TYPES))

__all__ = [
    "ADAPTER_TYPES",
    "BOFT",
    "KNOWN_SUFFIXES",
    "OFT",
    "Adapter",
    "AdapterError",
    "Conventions",
    "Diff",
    "GLoRA",
    "LoHa",
    "LoKr",
    "LoRA",
    "NormDiff",
    "OFTv2",
    "adapter_type",
    "as_low_rank",
    "merge_adapters",
    "supports",
]


def adapter_type(tensors: dict[str, torch.Tensor]) -> type[Adapter]:
    """The adapter type of one module's tensors (suffix -> tensor).

    Raises:
        AdapterError: no type claims them, or several do (e.g. `lora_up.weight` beside `hada_w1_a`).
    """
    claims = [cls for cls in ADAPTER_TYPES if cls.claims(tensors)]
    if len(claims) != 1:
        found = "no adapter type" if not claims else "several adapter types (" + ", ".join(c.type for c in claims) + ")"
        raise AdapterError(f"{found} for the tensors {sorted(tensors)}")
    return claims[0]


def supports(cls: type[Adapter], module: nn.Module) -> bool:
    """Whether adapters of type `cls` can adapt `module` (Linear / Conv2d, or a normalisation layer)."""
    if cls.targets == "norm":
        return isinstance(module, (nn.GroupNorm, nn.LayerNorm)) and module.weight is not None
    return isinstance(module, (nn.Linear, nn.Conv2d))


def as_low_rank(adapter: Adapter, module: nn.Module) -> LoRALayer | None:
    """The adapter as a `LoRALayer` shaped for `module` (down (r, in) / up (out, r) for a Linear,
    (r, in, kh, kw) / (out, r, 1, 1) for a Conv2d), or None when it is not a low-rank delta."""
    layer = adapter.low_rank()
    if layer is None:
        return None
    rank = layer.rank
    if isinstance(module, nn.Linear):
        return LoRALayer(down=layer.down.reshape(rank, -1), up=layer.up.reshape(-1, rank), alpha=layer.alpha)
    return LoRALayer(
        down=layer.down.reshape(rank, module.in_channels // module.groups, *module.kernel_size),
        up=layer.up.reshape(-1, rank, 1, 1),
        alpha=layer.alpha,
    )


@torch.no_grad()
def merge_adapters(model: nn.Module, adapters: dict[str, Adapter]) -> nn.Module:
    """Replace each named module's weight (and bias) by its adapted value, in place; return `model`.

    The arithmetic runs in float32 and the result is stored in the module's dtype.

    Raises:
        KeyError: a path names no module of `model`.
    """
    modules = dict(model.named_modules())
    for name, adapter in adapters.items():
        if name not in modules:
            raise KeyError(f"adapter module path {name!r} matches no module of {type(model).__name__}")
        module = modules[name]
        weight = module.weight
        weight.copy_(adapter.merged_weight(weight).to(weight.dtype))
        bias = adapter.merged_bias(module.bias)
        if bias is not None and bias is not module.bias:
            if module.bias is None:
                module.bias = nn.Parameter(bias.to(weight.dtype), requires_grad=False)
            else:
                module.bias.copy_(bias.to(module.bias.dtype))
    return model
