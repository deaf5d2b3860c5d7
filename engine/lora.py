"""LoRA applied per sample: one UNet forward on a 2B batch, the adapters active on one half only.

A `GatedLoRA` wraps a Linear or Conv2d: `y = base(x) + gate[b] * scale * up(down(x))`, with `gate`
a per-sample vector shared by every wrapped module of a UNet. Gate 0 gives the pretrained model,
gate 1 the fine-tune, so FineXtract's two predictions come from one batched call. The low-rank
branch is two explicit small matmuls, which also exports to ONNX with the gate as a graph input.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .pair import LoRALayer


class LoRAGate:
    """The per-sample gate shared by all `GatedLoRA` modules of one model; None = adapters off."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None


class GatedLoRA(nn.Module):
    """`base(x) + gate * scale * up(down(x))` for a Linear or Conv2d `base`.

    The gate broadcasts over every dimension after the first (batch) one.
    """

    def __init__(self, base: nn.Module, layer: LoRALayer, gate: LoRAGate) -> None:
        super().__init__()
        self.base = base
        self.gate = gate
        self.scale = layer.scale
        weight = base.weight
        if isinstance(base, nn.Linear):
            self.down = nn.Linear(base.in_features, layer.rank, bias=False)
            self.up = nn.Linear(layer.rank, base.out_features, bias=False)
        elif isinstance(base, nn.Conv2d):
            self.down = nn.Conv2d(base.in_channels, layer.rank, base.kernel_size, base.stride, base.padding, bias=False)
            self.up = nn.Conv2d(layer.rank, base.out_channels, 1, bias=False)
        else:
            raise TypeError(f"LoRA on {type(base).__name__} is not supported (only Linear and Conv2d)")
        with torch.no_grad():
            self.down.weight.copy_(layer.down.reshape(self.down.weight.shape))
            self.up.weight.copy_(layer.up.reshape(self.up.weight.shape))
        self.to(device=weight.device, dtype=weight.dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base(x, *args, **kwargs)
        gate = self.gate.value
        if gate is None:
            return out
        delta = self.up(self.down(x)) * self.scale
        return out + gate.to(delta.dtype).view(-1, *([1] * (delta.dim() - 1))) * delta


def inject_lora(model: nn.Module, layers: dict[str, LoRALayer]) -> LoRAGate:
    """Replace each named module of `model` by a `GatedLoRA`; return the shared gate (off).

    Args:
        model: a torch module (a diffusers UNet), modified in place.
        layers: module path (as in `model.named_modules()`) -> LoRA adapter.

    Raises:
        KeyError: a path names no module of `model` (the message lists the first few).
    """
    modules = dict(model.named_modules())
    missing = [name for name in layers if name not in modules]
    if missing:
        raise KeyError(f"{len(missing)} LoRA module path(s) match no module, e.g. {missing[:3]}")
    gate = LoRAGate()
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        setattr(parent, child, GatedLoRA(modules[name], layer, gate))
    return gate


def lora_gate_of(model: nn.Module) -> LoRAGate | None:
    """The gate of a model that `inject_lora` adapted, else None."""
    for module in model.modules():
        if isinstance(module, GatedLoRA):
            return module.gate
    return None


@contextmanager
def gated(gate: LoRAGate, value: torch.Tensor | None):
    """Set the gate to `value` (shape (B,): 0 = pretrained, 1 = fine-tuned) for the block's duration."""
    previous, gate.value = gate.value, value
    try:
        yield gate
    finally:
        gate.value = previous


@torch.no_grad()
def merge_lora(model: nn.Module, layers: dict[str, LoRALayer]) -> nn.Module:
    """Add each adapter's delta weight into the named module's weight, in place; return `model`.

    Used for text encoders, which run once per caption and need no per-sample gate.

    Raises:
        KeyError: a path names no module of `model`.
    """
    modules = dict(model.named_modules())
    for name, layer in layers.items():
        if name not in modules:
            raise KeyError(f"LoRA module path {name!r} matches no module of {type(model).__name__}")
        weight = modules[name].weight
        weight += layer.delta().reshape(weight.shape).to(weight.dtype)
    return model
