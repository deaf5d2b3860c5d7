"""Guidance combination + DDIM (eta = 0) update in one elementwise function: the reference of the CUDA kernel.

    x_prev = w_x * x_t + w_a * output_a + w_b * output_b

`output_a`, `output_b` are a guidance rule's two UNet outputs and `(w_x, w_a, w_b)` is one row of
the per-step weights table (`finextract.engine.ddim.DDIMTable.weights`), which folds the rule's
coefficients, the scheduler's alphas_cumprod and the model's prediction type into three numbers in
double precision. For an epsilon model that row is DDIM's update (Song et al. 2021, Eq. 12, eta = 0)
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
    x_t: torch.Tensor, output_a: torch.Tensor, output_b: torch.Tensor | None, weights: torch.Tensor
) -> torch.Tensor:
    """`w_x * x_t + w_a * output_a + w_b * output_b` with float32 arithmetic, in `x_t`'s dtype.

    The reference that defines `guided_update` (and the CUDA kernel); traced as plain tensor ops
    into exported graphs.
    """
    weights = weights.to(device=x_t.device, dtype=torch.float32)
    x_prev = x_t.float() * weights[0] + output_a.float() * weights[1]
    if output_b is not None:
        x_prev = x_prev + output_b.float() * weights[2]
    return x_prev.to(x_t.dtype)


def guided_update(
    x_t: torch.Tensor,
    output_a: torch.Tensor,
    output_b: torch.Tensor | None,
    weights: torch.Tensor,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """One guided DDIM (eta = 0) step from a rule's UNet outputs and the step's table row.

    Args:
        x_t: latents (B, C, h, w) (any shape: elementwise), float32 / float16 / bfloat16, any device.
        output_a: the rule's first UNet output, same shape, device and dtype as `x_t`.
        output_b: the second output like `output_a`, or None for a one-term rule (then `w_b` is unused).
        weights: float32 tensor of 3 elements (w_x, w_a, w_b) on `x_t`'s device: a row of
            `finextract.engine.ddim.DDIMTable.weights(coef_a, coef_b)`.
        impl: "auto" (the CUDA kernel on CUDA tensors when it loads and nothing is being traced, else
            the reference), "cuda" (the kernel, or an error) or "reference" (torch ops).

    Returns:
        x_prev: latents at the previous timestep, shape and dtype of `x_t` (float32 arithmetic).

    Raises:
        ValueError: mismatched shapes, `weights` not of 3 elements, or an unknown `impl`.
        RuntimeError: `impl="cuda"` on CPU tensors or when the kernel cannot be loaded.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: expected one of {', '.join(IMPLS)}")
    if output_a.shape != x_t.shape or (output_b is not None and output_b.shape != x_t.shape):
        shapes = (tuple(x_t.shape), tuple(output_a.shape), None if output_b is None else tuple(output_b.shape))
        raise ValueError(f"x_t, output_a, output_b must share one shape; got {shapes}")
    if weights.numel() != 3:
        raise ValueError(f"weights has {weights.numel()} elements; expected (w_x, w_a, w_b), a DDIMTable row")
    tracing = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
    if impl == "reference" or (impl == "auto" and (not x_t.is_cuda or tracing)):
        return guided_update_reference(x_t, output_a, output_b, weights)
    if not x_t.is_cuda:
        raise RuntimeError("guided_update(impl='cuda') needs CUDA tensors; use impl='auto' or 'reference'")
    kernel = _load_cuda()
    if kernel is None:
        if impl == "cuda":
            raise RuntimeError(f"the CUDA guidance kernel could not be loaded: {_cuda_error}")
        return guided_update_reference(x_t, output_a, output_b, weights)
    return kernel(x_t, output_a, output_b, weights)
