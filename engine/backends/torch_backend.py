"""The torch backend: runs the guided denoiser module itself, on CPU or CUDA (the reference backend)."""

from __future__ import annotations

import torch


class TorchBackend:
    """Runs `GuidedDenoiser.step` with torch: one fused forward per UNet group, then the fused update.

    On CUDA the update is the fused kernel and the step can be captured in a CUDA graph (it never
    synchronises the host).

    Args:
        denoiser: the `finextract.engine.denoiser.GuidedDenoiser` of the run's pair and rule.
        conditioning: `encode_conditioning(pair, rule, caption)`, on the pair's device in the UNet dtype.
        config: the run's `finextract.engine.config.RunConfig` (device and dtype are the pair's).
    """

    name = "torch"

    def __init__(self, denoiser, conditioning: tuple[torch.Tensor, ...], config) -> None:
        self.denoiser = denoiser
        self.conditioning = tuple(conditioning)
        self.capturable = config.is_cuda

    @property
    def forwards_per_step(self) -> int:
        """UNet forwards per step: 1 for LoRA, CFG and Direct; 2 for a full fine-tune with FineXtract."""
        return len(self.denoiser.groups)

    @torch.inference_mode()
    def step(self, x_t: torch.Tensor, t: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The next state (B, (1 + K) * C, h, w) float32 (see `finextract.engine.backends.base.Backend.step`)."""
        return self.denoiser.step(x_t, t, weights, *self.conditioning)
