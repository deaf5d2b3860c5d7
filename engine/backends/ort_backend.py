"""The onnxruntime backend: the rule's exported network (engine/export.py) in one session call.

CPU provider here; CUDA (and optionally TensorRT) execution providers where `onnxruntime-gpu` is
installed. Inputs and the output are bound to torch tensors by pointer (I/O binding) on both CPU and
CUDA, so a step copies nothing between torch and onnxruntime.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..export import ExportedModel, constant_inputs, dtype_name, export_cached, lora_gate, spec_for
from .base import Prediction

logger = logging.getLogger(__name__)

NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}
CUDA_PROVIDER, TRT_PROVIDER, CPU_PROVIDER = "CUDAExecutionProvider", "TensorrtExecutionProvider", "CPUExecutionProvider"


def session_options(threads: int | None = None):
    """`onnxruntime.SessionOptions` with deliberate thread counts (`finextract.runtime.default_threads()`).

    Intra-op threads = `threads` or the default; inter-op 1 and sequential execution, because a UNet
    graph is one long chain and extra pools only contend for the cores.
    """
    import onnxruntime as ort

    from finextract.runtime import default_threads

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def providers_for(device: str | torch.device, providers: tuple[str, ...] | None = None) -> list:
    """The execution providers (with options) for `device`.

    Args:
        device: "cpu" or "cuda[:N]".
        providers: provider names to use instead of the default (CPU: CPU; CUDA: CUDA then CPU).
            Add "TensorrtExecutionProvider" first to let onnxruntime build TensorRT engines.

    Returns:
        A list for `InferenceSession(providers=...)`; on CUDA the CUDA provider runs on torch's
        current stream (`user_compute_stream`), so no synchronisation is needed between them.

    Raises:
        RuntimeError: a requested provider is not in this onnxruntime build (the message lists
            the available ones and the package to install).
    """
    import onnxruntime as ort

    device = torch.device(device)
    available = ort.get_available_providers()
    if providers is None:
        providers = (CUDA_PROVIDER, CPU_PROVIDER) if device.type == "cuda" else (CPU_PROVIDER,)
    missing = [name for name in providers if name not in available]
    if missing:
        raise RuntimeError(
            f"onnxruntime {ort.__version__} here has no {', '.join(missing)} (available: {', '.join(available)}); "
            "for CUDA / TensorRT install the GPU build: pip uninstall onnxruntime && pip install onnxruntime-gpu"
        )
    result = []
    for name in providers:
        if name in (CUDA_PROVIDER, TRT_PROVIDER):
            options = {"device_id": device.index or 0}
            if name == CUDA_PROVIDER:
                options["user_compute_stream"] = str(torch.cuda.current_stream(device).cuda_stream)
            result.append((name, options))
        else:
            result.append(name)
    return result


class OnnxRuntimeBackend:
    """Evaluates a `GuidanceRule` with its exported ONNX network in one onnxruntime call per step.

    Two-term rules run the fused pair graph, which returns the combined `eps`; the `Prediction` is
    then `(eps, None, 1.0, 0.0)`. One-term rules run the UNet graph: `(eps, None, coef, 0.0)`.

    Args:
        pair: the `ModelPair`, on CPU in `dtype` for the export (exports are cached, so later runs
            skip tracing).
        rule: the `finextract.rules.GuidanceRule`.
        text_embeddings: `encode_text`'s output, (model, caption) -> (1, L, D).
        device: "cpu" or "cuda[:N]" (needs onnxruntime-gpu).
        dtype: torch.float32, or torch.float16 on CUDA.
        cache_dir: export cache folder (default `finextract.engine.export.default_cache_dir()`).
        providers: onnxruntime provider names (see `providers_for`).
        threads: intra-op threads (default `finextract.runtime.default_threads()`).

    Raises:
        KeyError: `text_embeddings` lacks an embedding a term needs.
        ValueError: fp16 on CPU, or an unknown dtype.
        RuntimeError: the device's provider is not installed, or the export failed.
    """

    name = "onnxruntime"

    def __init__(
        self,
        pair,
        rule,
        text_embeddings: dict,
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        cache_dir: str | Path | None = None,
        providers: tuple[str, ...] | None = None,
        threads: int | None = None,
    ) -> None:
        import onnxruntime as ort

        self.device = torch.device(device)
        if dtype_name(dtype) == "fp16" and self.device.type == "cpu":
            raise ValueError(
                "dtype float16 on device cpu: onnxruntime's CPU provider lacks fp16 kernels; use torch.float32"
            )
        provider_list = providers_for(self.device, providers)  # fail before the export when missing
        self.rule = rule
        self.spec = spec_for(pair, rule, dtype=dtype)
        self._constants = constant_inputs(self.spec, rule, text_embeddings, self.device)  # KeyError before the export
        self.exported: ExportedModel = export_cached(pair, self.spec, cache_dir)
        self.session = ort.InferenceSession(str(self.exported.path), session_options(threads), providers=provider_list)
        self._device_type = "cuda" if self.device.type == "cuda" else "cpu"
        self._gates: dict[int, torch.Tensor] = {}

    @property
    def forwards_per_step(self) -> int:
        """Session calls per denoising step (always 1)."""
        return 1

    def _lora_gate(self, batch: int) -> torch.Tensor:
        """(2B,) gate on the device, cached per batch size (see `finextract.engine.export.lora_gate`)."""
        if batch not in self._gates:
            self._gates[batch] = lora_gate(self.rule, batch).to(self.device)
        return self._gates[batch]

    def _bind(self, binding, name: str, tensor: torch.Tensor, output: bool = False) -> None:
        bind = binding.bind_output if output else binding.bind_input
        bind(
            name,
            self._device_type,
            self.device.index or 0,
            NUMPY_DTYPES[tensor.dtype],
            list(tensor.shape),
            tensor.data_ptr(),
        )

    @torch.inference_mode()
    def predict(self, x_t: torch.Tensor, t: torch.Tensor) -> Prediction:
        """The rule's noise prediction for `x_t` (B, C, h, w) at timestep `t` (0-dim int64).

        Returns:
            `Prediction` with `eps_a` (B, C, h, w) in `x_t`'s dtype on `x_t`'s device: the
            combined eps (coef_a 1, coef_b 0) for two-term rules, the term's eps for one-term rules.
        """
        batch = x_t.shape[0]
        network_dtype = self.spec.torch_dtype
        feeds = dict(self._constants)
        feeds["x_t"] = x_t.to(device=self.device, dtype=network_dtype).contiguous()
        feeds["t"] = t.to(device=self.device, dtype=torch.float32).reshape(-1).expand(batch).contiguous()
        if self.spec.kind == "lora_pair":
            feeds["lora_gate"] = self._lora_gate(batch)
        eps = torch.empty(self.spec.output_shape(batch), dtype=network_dtype, device=self.device)
        binding = self.session.io_binding()
        for name in self.spec.input_names:
            self._bind(binding, name, feeds[name])
        self._bind(binding, "eps", eps, output=True)
        self.session.run_with_iobinding(binding)  # feeds stay referenced until it returns
        eps = eps.to(x_t.dtype)
        if self.spec.kind == "unet":
            return Prediction(eps, None, float(self.rule.terms[0].coef), 0.0)
        return Prediction(eps, None, 1.0, 0.0)
