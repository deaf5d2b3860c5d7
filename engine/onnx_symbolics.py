"""ONNX forms of the torch operators our networks use that opset 17 lacks, for the TorchScript exporter.

- `aten::rms_norm` (`torch.nn.RMSNorm`: FLUX.1's query / key norms): ONNX has RMSNormalization only from
  opset 23, so it is written out as torch defines it, y = x / sqrt(mean(x^2 over the normalised dims) + eps)
  * weight (eps None: float32's machine epsilon, torch's default for float32 inputs).
"""

from __future__ import annotations

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
