"""LoRA applied per sample: one UNet forward on an n*B batch, the adapters active on chosen rows only.

A LoRA pair's base UNet gets, once when the pair is built, a forward hook on every adapted Linear or
Conv2d: `y = base(x) + gate[b] * (alpha / rank) * up(down(x))`, with `gate` a per-sample vector shared
by every hook of the UNet. Gate 0 gives the pretrained model, gate 1 the fine-tune, so FineXtract's two
predictions come from one batched call; with no gate set (the default) the UNet is the plain base model.
Hooks leave the UNet's modules and state dict exactly as diffusers loaded them, and the low-rank branch
is two explicit small products, which the ONNX exporter traces like any other op.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LoRALayer:
    """One LoRA adapter on one module: delta W = (alpha / rank) * up @ down.

    Attributes:
        down: (rank, in_features) for a Linear, (rank, in_channels, kh, kw) for a Conv2d.
        up: (out_features, rank) for a Linear, (out_channels, rank, 1, 1) for a Conv2d.
        alpha: the file's alpha; equals rank when the file has none (recorded in
            `ModelPair.sources["lora_alpha_assumed"]`).
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank

    def delta(self) -> torch.Tensor:
        """delta W = (alpha / rank) * up @ down in float32, (out, in * kh * kw): reshape to the weight."""
        return self.scale * self.up.flatten(1).float() @ self.down.flatten(1).float()


class LoRAGate:
    """The per-sample gate shared by all `GatedLoRA` hooks of one model; None = adapters off."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None


class GatedLoRA:
    """The forward hook `output + gate * scale * up(down(input))` of one Linear or Conv2d.

    The gate broadcasts over every dimension after the first (batch) one. The adapter's tensors are read
    from its `LoRALayer` at each call, so moving the pair (`ModelPair.to`) moves them too.
    """

    def __init__(self, module: nn.Module, layer: LoRALayer, gate: LoRAGate) -> None:
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"LoRA on {type(module).__name__} is not supported (only Linear and Conv2d)")
        self.layer, self.gate = layer, gate
        self.conv = isinstance(module, nn.Conv2d)

    def __call__(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        gate = self.gate.value
        if gate is None:
            return output
        x, layer = inputs[0], self.layer
        if self.conv:
            hidden = F.conv2d(x, layer.down, None, module.stride, module.padding, module.dilation)
            delta = F.conv2d(hidden, layer.up.reshape(layer.up.shape[0], -1, 1, 1))
        else:
            delta = F.linear(F.linear(x, layer.down.flatten(1)), layer.up.flatten(1))
        delta = delta * layer.scale
        return output + gate.to(delta.dtype).view(-1, *([1] * (delta.dim() - 1))) * delta


def inject_lora(model: nn.Module, layers: dict[str, LoRALayer]) -> LoRAGate:
    """Register a `GatedLoRA` hook on each named module of `model`; return the shared gate (off).

    Args:
        model: a torch module (a diffusers UNet); its modules and weights are not changed.
        layers: module path (as in `model.named_modules()`) -> LoRA adapter, on the module's device and dtype.

    Raises:
        KeyError: a path names no module of `model` (the message lists the first few).
        ValueError: `model` already carries gated adapters (one UNet cannot serve two LoRA pairs).
        TypeError: a path names a module that is not a Linear or Conv2d.
    """
    if lora_gate_of(model) is not None:
        raise ValueError(
            "this UNet already carries the gated LoRA adapters of another ModelPair; give each LoRA pair its "
            "own base UNet (e.g. copy.deepcopy(unet))"
        )
    modules = dict(model.named_modules())
    missing = [name for name in layers if name not in modules]
    if missing:
        raise KeyError(f"{len(missing)} LoRA module path(s) match no module, e.g. {missing[:3]}")
    gate = LoRAGate()
    for name, layer in layers.items():
        modules[name].register_forward_hook(GatedLoRA(modules[name], layer, gate))
    return gate


def lora_gate_of(model: nn.Module) -> LoRAGate | None:
    """The gate of a model that `inject_lora` adapted, else None."""
    for module in model.modules():
        for hook in module._forward_hooks.values():
            if isinstance(hook, GatedLoRA):
                return hook.gate
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
