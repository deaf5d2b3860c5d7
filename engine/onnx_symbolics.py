"""ONNX forms of the torch operators our networks use that opset 17 lacks, for the TorchScript exporter.

- `aten::rms_norm` (`torch.nn.RMSNorm`: FLUX.1's query / key norms): ONNX has RMSNormalization only from
  opset 23, so it is written out as torch defines it, y = x / sqrt(mean(x^2 over the normalised dims) + eps)
  * weight (eps None: float32's machine epsilon, torch's default for float32 inputs).
- diffusers' FLUX.1 rotary embedding (`apply_rotary_emb`, `x.reshape(*x.shape[:-1], -1, 2)`): the TorchScript
  tracer records that unpacked shape as constants, so the graph would run only at the traced batch size;
  `traceable_rotary` swaps in the same arithmetic with `unflatten`, whose shape stays dynamic.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

_REGISTERED = False


def _rms_norm(g, x, normalized_shape, weight, eps):
    from torch.onnx import symbolic_helper

    dims = symbolic_helper._get_const(normalized_shape, "is", "normalized_shape")
    value = None if symbolic_helper._is_none(eps) else symbolic_helper._maybe_get_const(eps, "f")
    value = torch.finfo(torch.float32).eps if value is None else float(value)
    mean = g.op("ReduceMean", g.op("Mul", x, x), axes_i=list(range(-len(dims), 0)), keepdims_i=1)
    epsilon = g.op("CastLike", g.op("Constant", value_t=torch.tensor(value, dtype=torch.float32)), x)
    y = g.op("Div", x, g.op("Sqrt", g.op("Add", mean, epsilon)))
    return y if symbolic_helper._is_none(weight) else g.op("Mul", y, weight)


def register_symbolics(opset: int = 17) -> None:
    """Register the forms above with `torch.onnx` for `opset` (once per process; a later call is a no-op)."""
    global _REGISTERED
    if _REGISTERED:
        return
    torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm, opset)
    _REGISTERED = True


def _rotary(x, freqs_cis, use_real=True, use_real_unbind_dim=-1, sequence_dim=2):
    """diffusers' `apply_rotary_emb` for FLUX.1 (use_real, pairs interleaved on the last axis), the same float
    operations in the same order, the pair split written as `unflatten` (a batch-dynamic Reshape)."""
    from diffusers.models.embeddings import apply_rotary_emb

    if not use_real or use_real_unbind_dim != -1 or sequence_dim not in (1, 2):
        return apply_rotary_emb(x, freqs_cis, use_real, use_real_unbind_dim, sequence_dim)
    cos, sin = freqs_cis  # [S, D]
    index = (None, slice(None), None) if sequence_dim == 1 else (None, None, slice(None))
    cos, sin = cos[index].to(x.device), sin[index].to(x.device)
    x_real, x_imag = x.unflatten(-1, (-1, 2)).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
    return (x.float() * cos + x_rotated.float() * sin).to(x.dtype)


@contextmanager
def traceable_rotary():
    """While exporting: FLUX.1's attention processors call `_rotary` instead of diffusers' `apply_rotary_emb`."""
    from diffusers.models.transformers import transformer_flux

    original = transformer_flux.apply_rotary_emb
    transformer_flux.apply_rotary_emb = _rotary
    try:
        yield
    finally:
        transformer_flux.apply_rotary_emb = original
