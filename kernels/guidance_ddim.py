"""Guidance combination + sampler update in one elementwise function: the reference of the CUDA kernel.

    x_prev = w_x * x_t + w_a * output_a + w_b * output_b + w_h1 * h_1 + ... + w_hK * h_K

`output_a`, `output_b` are a guidance rule's two UNet outputs, `h_1..h_K` a multistep solver's history
(K = 0 for DDIM, 1 for DPM-Solver++ 2M, 2 for UniPC) and `(w_x, w_a, w_b, w_h1..w_hK)` one output
block's row of the per-step weights table (`finextract.engine.ddim.StepTable.weights`), which folds the
rule's coefficients, the scheduler's sigmas and the model's prediction type into 3 + K numbers in double
precision. For DDIM and an epsilon model that row is DDIM's update (Song et al. 2021, Eq. 12, eta = 0)
of `eps = coef_a * output_a + coef_b * output_b`, what `diffusers.DDIMScheduler.step` computes.

The torch reference below defines the result; on CUDA tensors `impl="auto"` runs
`finextract.kernels.cuda_guidance.guided_update_cuda`, the same arithmetic in one pass instead of
about five framework kernels. Both read the same table row.
"""

from __future__ import annotations

import logging

import torch

from .cuda_guidance import guided_update_cuda, load_module

logger = logging.getLogger(__name__)

IMPLS = ("auto", "cuda", "reference")
#: History tensors the update (and the CUDA kernel) takes at most: UniPC's two previous data predictions.
MAX_HISTORY = 2

_cuda_update = None  # the CUDA kernel's entry point, loaded on first CUDA use
_cuda_error: Exception | None = None


def _load_cuda():
    """Import the CUDA kernel once; remember a failure so "auto" falls back without retrying."""
    global _cuda_update, _cuda_error
    if _cuda_update is None and _cuda_error is None:
        try:
            load_module(torch.device("cuda", torch.cuda.current_device()))
            _cuda_update = guided_update_cuda
        except Exception as error:  # no CuPy, no compiler, kernel not built: the reference still works
            _cuda_error = error
            logger.warning("fused CUDA guidance kernel unavailable (%s); using the torch reference", error)
    return _cuda_update


def guided_update_reference(
    x_t: torch.Tensor,
    output_a: torch.Tensor,
    output_b: torch.Tensor | None,
    weights: torch.Tensor,
    history: tuple[torch.Tensor, ...] = (),
) -> torch.Tensor:
    """`w_x * x_t + w_a * output_a + w_b * output_b + sum_j w_hj * h_j` in float32 arithmetic, in `x_t`'s dtype.

    The reference that defines `guided_update` (and the CUDA kernel); traced as plain tensor ops
    into exported graphs. The terms are added left to right.
    """
    weights = weights.to(device=x_t.device, dtype=torch.float32)
    x_prev = x_t.float() * weights[0] + output_a.float() * weights[1]
    if output_b is not None:
        x_prev = x_prev + output_b.float() * weights[2]
    for index, h in enumerate(history):
        x_prev = x_prev + h.float() * weights[3 + index]
    return x_prev.to(x_t.dtype)


def guided_update(
    x_t: torch.Tensor,
    output_a: torch.Tensor,
    output_b: torch.Tensor | None,
    weights: torch.Tensor,
    *,
    history: tuple[torch.Tensor, ...] = (),
    impl: str = "auto",
) -> torch.Tensor:
    """One output block of a guided sampler step from a rule's UNet outputs, the history and a table row.

    Args:
        x_t: latents (B, C, h, w) (any shape: elementwise), float32 / float16 / bfloat16, any device.
        output_a: the rule's first UNet output, same shape, device and dtype as `x_t`.
        output_b: the second output like `output_a`, or None for a one-term rule (then `w_b` is unused).
        weights: float32 tensor of 3 + K elements (w_x, w_a, w_b, w_h1..w_hK) on `x_t`'s device: one
            output block of a row of `finextract.engine.ddim.StepTable.weights(coef_a, coef_b)`.
        history: the K history tensors h_1..h_K (K <= 2), each like `x_t` (empty for DDIM).
        impl: "auto" (the CUDA kernel on CUDA tensors when it loads and nothing is being traced, else
            the reference), "cuda" (the kernel, or an error) or "reference" (torch ops).

    Returns:
        The block (for DDIM x_prev, the latents at the previous timestep), shape and dtype of `x_t`
        (float32 arithmetic).

    Raises:
        ValueError: mismatched shapes, `weights` not of 3 + K elements, K > 2, or an unknown `impl`.
        RuntimeError: `impl="cuda"` on CPU tensors or when the kernel cannot be loaded.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: expected one of {', '.join(IMPLS)}")
    history = tuple(history)
    others = (output_a, output_b, *history)
    if any(other is not None and other.shape != x_t.shape for other in others):
        shapes = [tuple(x_t.shape)] + [None if other is None else tuple(other.shape) for other in others]
        raise ValueError(f"x_t, output_a, output_b and the history must share one shape; got {shapes}")
    if len(history) > MAX_HISTORY:
        raise ValueError(f"{len(history)} history tensors; the update takes at most {MAX_HISTORY} (UniPC's)")
    if weights.numel() != 3 + len(history):
        raise ValueError(
            f"weights has {weights.numel()} elements; expected 3 + {len(history)} (w_x, w_a, w_b and one per "
            "history tensor), one output block of a StepTable row"
        )
    tracing = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
    if impl == "reference" or (impl == "auto" and (not x_t.is_cuda or tracing)):
        return guided_update_reference(x_t, output_a, output_b, weights, history)
    if not x_t.is_cuda:
        raise RuntimeError("guided_update(impl='cuda') needs CUDA tensors; use impl='auto' or 'reference'")
    kernel = _load_cuda()
    if kernel is None:
        if impl == "cuda":
            raise RuntimeError(f"the CUDA guidance kernel could not be loaded: {_cuda_error}")
        return guided_update_reference(x_t, output_a, output_b, weights, history)
    return kernel(x_t, output_a, output_b, weights, history=history)
