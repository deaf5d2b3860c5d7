"""What every record of a run names: the library versions that change the answer."""

from __future__ import annotations

import platform


def library_versions() -> dict:
    """Versions of finextract, Python and every library that changes generated images or their scores.

    Returns:
        name -> version string for finextract, python, torch, diffusers, transformers, numpy, onnx,
        onnxruntime (the exported graphs and the default SSCD model run in it) and openvino (the CPU
        default backend compiles the same graphs).
    """
    import diffusers
    import numpy
    import onnx
    import onnxruntime
    import openvino
    import torch
    import transformers

    from . import __version__

    return {
        "finextract": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "openvino": openvino.__version__,
    }
