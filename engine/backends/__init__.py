"""Backends by name, imported only when asked for: `torch`, `onnxruntime`, `openvino`, `tensorrt`.

Each entry is "module:factory"; the factory takes `(denoiser, conditioning, config, **options)` and
returns an object following `finextract.engine.backends.base.Backend`.
"""

from __future__ import annotations

import importlib

BACKENDS = {
    "torch": "finextract.engine.backends.torch_backend:TorchBackend",
    "onnxruntime": "finextract.engine.backends.ort_backend:OnnxRuntimeBackend",
    "openvino": "finextract.engine.backends.openvino_backend:OpenVINOBackend",
    "tensorrt": "finextract.engine.backends.trt_backend:TensorRTBackend",
}


def get_backend_factory(name: str):
    """The factory of backend `name`. Raises ValueError for an unknown name."""
    if name not in BACKENDS:
        raise ValueError(f"--backend {name!r}: expected one of {', '.join(BACKENDS)}")
    module, _, attribute = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), attribute)
