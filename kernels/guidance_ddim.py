"""Guidance combination + DDIM (eta = 0) update in one function: the reference of the CUDA kernel.

    eps    = coef_a * eps_a + coef_b * eps_b                                  (the guidance rule)
    x0     = (x_t - sqrt(1 - alpha_prod_t) * eps) / sqrt(alpha_prod_t)         (DDIM Eq. 12, "predicted x0")
    x_prev = sqrt(alpha_prod_t_prev) * x0 + sqrt(1 - alpha_prod_t_prev) * eps  (eta = 0: no noise term)

This is what `diffusers.DDIMScheduler.step(eps, t, x_t, eta=0)` computes when `prediction_type` is
"epsilon" and neither clipping nor thresholding is on. The torch reference below defines the
result; on CUDA tensors `impl="auto"` dispatches to `finextract.kernels.cuda_guidance`, which does
the same in one elementwise pass instead of about six framework kernels.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

IMPLS = ("auto", "cuda", "reference")

_cuda_step = None  # the CUDA kernel's entry point, loaded on first CUDA use
_cuda_error: Exception | None = None


def _load_cuda():
    """Import the CUDA kernel once; remember a failure so "auto" falls back without retrying."""
    global _cuda_step, _cuda_error
    if _cuda_step is None and _cuda_error is None:
        try:
            from .cuda_guidance import guided_ddim_step_cuda

            _cuda_step = guided_ddim_step_cuda
        except Exception as error:  # no CuPy, no compiler, kernel not built: the reference still works
            _cuda_error = error
            logger.info("CUDA guidance kernel unavailable (%s); using the torch reference", error)
    return _cuda_step


def guided_ddim_step_reference(
    x_t: torch.Tensor,
    eps_a: torch.Tensor,
    eps_b: torch.Tensor | None,
    coef_a: float,
    coef_b: float,
    alpha_prod_t: float | torch.Tensor,
    alpha_prod_t_prev: float | torch.Tensor,
) -> torch.Tensor:
    """Torch reference of `guided_ddim_step` (arithmetic in float32, result in `x_t.dtype`)."""
    alpha_prod_t = torch.as_tensor(alpha_prod_t, dtype=torch.float32, device=x_t.device)
    alpha_prod_t_prev = torch.as_tensor(alpha_prod_t_prev, dtype=torch.float32, device=x_t.device)
    # 1. the rule's noise prediction
    eps = coef_a * eps_a.float()
    if eps_b is not None and coef_b != 0.0:
        eps = eps + coef_b * eps_b.float()
    # 2. predicted original sample ("x0"), DDIM Eq. 12
    beta_prod_t = 1.0 - alpha_prod_t
    pred_original_sample = (x_t.float() - beta_prod_t.sqrt() * eps) / alpha_prod_t.sqrt()
    # 3. direction pointing to x_t, eta = 0 so no random term
    pred_sample_direction = (1.0 - alpha_prod_t_prev).sqrt() * eps
    x_prev = alpha_prod_t_prev.sqrt() * pred_original_sample + pred_sample_direction
    return x_prev.to(x_t.dtype)


def guided_ddim_step(
    x_t: torch.Tensor,
    eps_a: torch.Tensor,
    eps_b: torch.Tensor | None,
    coef_a: float,
    coef_b: float,
    alpha_prod_t: float | torch.Tensor,
    alpha_prod_t_prev: float | torch.Tensor,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """One DDIM (eta = 0) step on the guided noise prediction `eps = coef_a*eps_a + coef_b*eps_b`.

    Args:
        x_t: noisy latents (B, C, h, w), fp32/fp16/bf16, any device.
        eps_a: first noise prediction, same shape, device and dtype as `x_t`.
        eps_b: second noise prediction like `eps_a`, or None (then `coef_b` is ignored).
        coef_a, coef_b: the rule's coefficients (`GuidanceRule.coefs`; e.g. Eq. 13: w, 1 - w + k).
        alpha_prod_t: cumulative product of alphas at timestep t (`scheduler.alphas_cumprod[t]`),
            a float or 0-dim tensor in (0, 1].
        alpha_prod_t_prev: the same at the previous timestep t - T/steps (`final_alpha_cumprod`
            past the end), in (0, 1].
        impl: "auto" (the CUDA kernel on CUDA tensors when it loads, else the reference),
            "cuda" (the kernel, or an error) or "reference" (torch).

    Returns:
        x_prev: latents at the previous timestep, shape and dtype of `x_t`. The reference does the
        arithmetic in float32, as diffusers' DDIM step does on fp32 input.

    Raises:
        ValueError: mismatched shapes or an unknown `impl`.
        RuntimeError: `impl="cuda"` on CPU tensors or when the kernel cannot be loaded.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: expected one of {', '.join(IMPLS)}")
    if eps_a.shape != x_t.shape or (eps_b is not None and eps_b.shape != x_t.shape):
        shapes = (tuple(x_t.shape), tuple(eps_a.shape), None if eps_b is None else tuple(eps_b.shape))
        raise ValueError(f"x_t, eps_a, eps_b must share one shape; got {shapes}")
    if impl == "reference" or (impl == "auto" and not x_t.is_cuda):
        return guided_ddim_step_reference(x_t, eps_a, eps_b, coef_a, coef_b, alpha_prod_t, alpha_prod_t_prev)
    if not x_t.is_cuda:
        raise RuntimeError("guided_ddim_step(impl='cuda') needs CUDA tensors; use impl='auto' or 'reference'")
    kernel = _load_cuda()
    if kernel is None:
        if impl == "cuda":
            raise RuntimeError(f"the CUDA guidance kernel could not be loaded: {_cuda_error}")
        return guided_ddim_step_reference(x_t, eps_a, eps_b, coef_a, coef_b, alpha_prod_t, alpha_prod_t_prev)
    return kernel(x_t, eps_a, eps_b, coef_a, coef_b, alpha_prod_t, alpha_prod_t_prev, out=None)
