"""The one question a backend answers per denoising step: the next latents.

A backend is built once per run from a `GuidedDenoiser` (one pair, one rule), the run's conditioning
(encoded once) and the `RunConfig`, and then called once per sampler step on a whole batch:

    state = backend.step(state, t, weights)

with `t` and `weights` the step's rows of the `StepTable` (`finextract.engine.ddim`) and the state x_t
(DDIM) or x_t with the solver's K history tensors packed after it along the channels (`config.scheduler`:
the exported graphs' shapes depend on K). Every backend
computes the same function, the denoiser's `step`: the torch backend runs the module, onnxruntime and
TensorRT run its export. The result means the same on every backend.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Backend(Protocol):
    """Runs a guided denoiser's step for a batch of latents in one fused call.

    Attributes:
        name: the backend's name ("torch", "onnxruntime", "tensorrt").
        capturable: whether `step` may be captured in a CUDA graph (it never synchronises the host).
        forwards_per_step: UNet forwards (or session runs / engine launches) per step.
    """

    name: str
    capturable: bool
    forwards_per_step: int

    def step(self, x_t: torch.Tensor, t: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The next state (B, (1 + K) * C, h, w) float32 from the state `x_t` of that shape, `t` (1,) float32
        and `weights` ((1 + K) * (3 + K),) float32 (DDIM: (w_x, w_a, w_b)), all on the backend's device."""
        ...
