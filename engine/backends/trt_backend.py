"""The TensorRT backend: the guided denoiser's exported step graph as a TensorRT 10 engine, on the caller's stream.

Built from the same export spec as the onnxruntime backend (engine/export.py) by
`finextract.engine.tensorrt`. Runtime: one execution context per optimization profile (one per batch
size), all sharing one device memory block; input and output buffers are allocated once per
profile and bound by name (`set_tensor_address`), so a step is copy-in, `execute_async_v3` on the
current torch stream, copy-out, with no host synchronisation: the DDIM loop can capture it in a CUDA
graph like the torch backend's step.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..export import ExportSpec, export_cached
from ..solvers import history_slots
from ..tensorrt import BuildConfig, build_unet_engine, load_engine, require_tensorrt

logger = logging.getLogger(__name__)


class _Profile:
    """One optimization profile's execution context with its static input / output buffers."""

    def __init__(self, engine, index: int, batch: int, spec, constants: dict, memory: torch.Tensor, stream) -> None:
        trt = require_tensorrt()
        self.batch = batch
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        self.context = engine.create_execution_context(strategy)
        self.context.set_optimization_profile_async(index, stream.cuda_stream)
        if hasattr(self.context, "set_device_memory"):  # TensorRT >= 10.1 takes the size too
            self.context.set_device_memory(memory.data_ptr(), memory.numel())
        else:
            self.context.device_memory = memory.data_ptr()
        device, shapes, dtypes = memory.device, spec.input_shapes(batch), spec.input_dtypes()
        self.buffers = {}
        for name in spec.input_names:
            if name in constants:
                self.buffers[name] = constants[name]
            else:
                self.buffers[name] = torch.zeros(shapes[name], dtype=dtypes[name], device=device)
        self.buffers["x_prev"] = torch.empty(spec.output_shape(batch), dtype=torch.float32, device=device)
        for name in spec.input_names:
            self.context.set_input_shape(name, tuple(self.buffers[name].shape))
        for name, tensor in self.buffers.items():
            self.context.set_tensor_address(name, tensor.data_ptr())

    def launch(self, stream) -> None:
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution failed at batch {self.batch}")


class TensorRTBackend:
    """Runs the denoiser's step as a TensorRT engine of its exported graph, one launch per step.

    Args:
        denoiser: the `GuidedDenoiser` on CUDA (needed for the export when no engine is cached).
        conditioning: `encode_conditioning(pair, rule, caption)`: copied once into the engine's inputs.
        config: the run's `RunConfig` (CUDA device; dtype fp16 (default for engines) or fp32;
            cache_dir: ONNX exports in `onnx/`, engines in `engines/` below it).
        engine_dir: engine folder instead of `<cache_dir>/engines`.
        batch_sizes: one profile per batch size; a batch is padded up to the smallest profile that
            holds it (default: the run's batch size).

    Raises:
        RuntimeError: TensorRT is not importable (with how to install it), no CUDA device, or the
            engine build fails.
    """

    name = "tensorrt"
    capturable = True
    forwards_per_step = 1

    def __init__(
        self,
        denoiser,
        conditioning: tuple[torch.Tensor, ...],
        config,
        *,
        engine_dir: str | Path | None = None,
        batch_sizes: tuple[int, ...] | None = None,
    ) -> None:
        require_tensorrt()
        self.device = torch.device(config.device)
        if self.device.type != "cuda" or not torch.cuda.is_available():
            raise RuntimeError(
                f"--backend tensorrt needs a CUDA device (got {config.device!r}); use --backend onnxruntime on a CPU"
            )
        batch_sizes = tuple(batch_sizes or (config.batch_size,))
        history = history_slots(config.scheduler)
        self.spec = ExportSpec.of(denoiser, conditioning, dtype=config.dtype, batch_sizes=batch_sizes, history=history)
        dtypes = self.spec.input_dtypes()
        names = [name for name, _ in self.spec.conditioning]
        self._constants = {
            name: tensor.to(device=self.device, dtype=dtypes[name]).contiguous()
            for name, tensor in zip(names, conditioning)
        }
        exported = export_cached(denoiser, self.spec, config.cache_dir)
        engine_dir = Path(engine_dir) if engine_dir else Path(config.cache_dir) / "engines"
        self.artifact = build_unet_engine(exported, BuildConfig(self.spec.dtype, batch_sizes), engine_dir)
        self.engine = load_engine(self.artifact.path)
        self._memory = self._shared_memory()
        self._profiles: dict[int, _Profile] = {}

    def _shared_memory(self) -> torch.Tensor:
        """One activation block for every profile's context (they never run concurrently)."""
        size = getattr(self.engine, "device_memory_size_v2", None) or self.engine.device_memory_size
        return torch.empty(int(size), dtype=torch.uint8, device=self.device)

    def _profile(self, batch: int) -> _Profile:
        sizes = sorted(self.spec.batch_sizes)
        fitting = [b for b in sizes if b >= batch]
        if not fitting:
            raise ValueError(
                f"batch {batch} exceeds the engine's largest profile {sizes[-1]}; "
                f"rebuild with --batch-sizes including {batch} or lower --batch-size"
            )
        size = fitting[0]
        if size not in self._profiles:
            stream = torch.cuda.current_stream(self.device)
            self._profiles[size] = _Profile(
                self.engine, sizes.index(size), size, self.spec, self._constants, self._memory, stream
            )
        return self._profiles[size]

    @torch.inference_mode()
    def step(self, x_t: torch.Tensor, t: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The next state (B, (1 + K) * C, h, w) float32 (see `finextract.engine.backends.base.Backend.step`)."""
        batch = x_t.shape[0]
        profile = self._profile(batch)
        buffers = profile.buffers
        buffers["x_t"][:batch].copy_(x_t)
        if batch < profile.batch:
            buffers["x_t"][batch:].zero_()  # padding rows: computed, then dropped
        buffers["t"].copy_(t.reshape(1))
        buffers["weights"].copy_(weights)
        profile.launch(torch.cuda.current_stream(self.device))
        return buffers["x_prev"][:batch].clone()  # the buffer is overwritten next step
