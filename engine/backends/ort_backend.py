"""The onnxruntime backend: the guided denoiser's exported step graph (engine/export.py), one session run per step.

CPU provider here; CUDA (and optionally TensorRT) execution providers where `onnxruntime-gpu` is
installed. Inputs and the output are bound to torch tensors by pointer (I/O binding) on both CPU and
CUDA, so a step copies nothing between torch and onnxruntime.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from ..export import ExportedModel, ExportSpec, export_cached
from ..solvers import history_slots

logger = logging.getLogger(__name__)

NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}
CUDA_PROVIDER, TRT_PROVIDER, CPU_PROVIDER = "CUDAExecutionProvider", "TensorrtExecutionProvider", "CPUExecutionProvider"


def session_options(threads: int):
    """`onnxruntime.SessionOptions` with deliberate thread counts.

    Intra-op threads = `threads`; inter-op 1 and sequential execution, because a UNet graph is one
    long chain and extra pools only contend for the cores.
    """
    import onnxruntime as ort  # heavy: onnxruntime loads only when this backend is chosen

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
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
    """Runs the exported `GuidedDenoiser.step` graph in onnxruntime: one `run_with_iobinding` per step.

    Args:
        denoiser: the `GuidedDenoiser` of the run's pair and rule, on the run's device and precision
            (traced once for the export; exports are cached, so later runs skip tracing).
        conditioning: `encode_conditioning(pair, rule, caption)`: bound once as constant inputs.
        config: the run's `RunConfig` (device, dtype fp32 or fp16 on CUDA, threads, cache_dir).
        providers: onnxruntime provider names (see `providers_for`).

    Raises:
        ValueError: fp16 on CPU, or an unknown dtype.
        RuntimeError: the device's provider is not installed, or the export failed.
    """

    name = "onnxruntime"
    capturable = False  # a session run synchronises the host
    forwards_per_step = 1

    def __init__(self, denoiser, conditioning: tuple[torch.Tensor, ...], config, *, providers=None) -> None:
        import onnxruntime as ort

        self.device = torch.device(config.device)
        if config.dtype == "fp16" and self.device.type == "cpu":
            raise ValueError("dtype fp16 on device cpu: onnxruntime's CPU provider lacks fp16 kernels; use fp32")
        provider_list = providers_for(self.device, providers)  # fail before the export when missing
        self.spec = ExportSpec.of(denoiser, conditioning, dtype=config.dtype, history=history_slots(config.scheduler))
        dtypes = self.spec.input_dtypes()
        names = [name for name, _ in self.spec.conditioning]
        self._constants = {
            name: tensor.to(device=self.device, dtype=dtypes[name]).contiguous()
            for name, tensor in zip(names, conditioning)
        }
        started = time.perf_counter()
        self.exported: ExportedModel = export_cached(denoiser, self.spec, config.cache_dir)
        self.session = ort.InferenceSession(
            str(self.exported.path), session_options(config.threads), providers=provider_list
        )
        logger.info("onnxruntime backend ready in %.1f s", time.perf_counter() - started)
        self._device_type = "cuda" if self.device.type == "cuda" else "cpu"

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
    def step(self, x_t: torch.Tensor, t: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The next state (B, (1 + K) * C, h, w) float32 (see `finextract.engine.backends.base.Backend.step`)."""
        feeds = dict(self._constants)
        feeds["x_t"] = x_t.to(device=self.device, dtype=torch.float32).contiguous()
        feeds["t"] = t.to(device=self.device, dtype=torch.float32).reshape(1).contiguous()
        feeds["weights"] = weights.to(device=self.device, dtype=torch.float32).contiguous()
        x_prev = torch.empty(self.spec.output_shape(x_t.shape[0]), dtype=torch.float32, device=self.device)
        binding = self.session.io_binding()
        for name in self.spec.input_names:
            self._bind(binding, name, feeds[name])
        self._bind(binding, "x_prev", x_prev, output=True)
        self.session.run_with_iobinding(binding)  # feeds stay referenced until it returns
        return x_prev
