"""The TensorRT backend: the rule's fused network as a TensorRT 10 engine, on the caller's CUDA stream.

Built from the same export spec as the onnxruntime backend (engine/export.py) by
`finextract.engine.tensorrt`. Runtime: one execution context per optimization profile (one per batch
size), all sharing one device memory block; input and output buffers are allocated once per
profile and bound by name (`set_tensor_address`), so a step is copy-in, `execute_async_v3` on the
current torch stream, copy-out, with no host synchronisation. Optionally each profile's launch is
captured once into a CUDA graph and replayed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..export import constant_inputs, default_cache_dir, dtype_name, export_cached, lora_gate, spec_for
from ..tensorrt import BuildConfig, build_unet_engine, load_engine, require_tensorrt
from .base import Prediction

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
        self.buffers["eps"] = torch.empty(spec.output_shape(batch), dtype=spec.torch_dtype, device=device)
        for name in spec.input_names:
            self.context.set_input_shape(name, tuple(self.buffers[name].shape))
        for name, tensor in self.buffers.items():
            self.context.set_tensor_address(name, tensor.data_ptr())
        self.graph: torch.cuda.CUDAGraph | None = None

    def launch(self, stream) -> None:
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution failed at batch {self.batch}")

    def capture(self, stream) -> None:
        """Record this profile's launch into a CUDA graph (after one ordinary warm-up launch)."""
        self.launch(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.launch(torch.cuda.current_stream())
        self.graph = graph


class TensorRTBackend:
    """Evaluates a `GuidanceRule` with a TensorRT engine of its fused network, one launch per step.

    Args:
        pair: the `ModelPair` on CUDA in `dtype` (needed for the export when no engine is cached).
        rule: the `finextract.rules.GuidanceRule`.
        text_embeddings: `encode_text`'s output, (model, caption) -> (1, L, D).
        device: "cuda" or "cuda:N".
        dtype: torch.float16 (default) or torch.float32: the engine's precision.
        cache_dir: ONNX export cache (default `finextract.engine.export.default_cache_dir()`).
        engine_dir: engine folder (default: `engines/` beside the ONNX cache).
        batch_sizes: one profile per batch size; a batch is padded up to the smallest profile that
            holds it.
        cuda_graph: capture each profile's launch into a CUDA graph on first use and replay it.

    Raises:
        RuntimeError: TensorRT is not importable (with how to install it), no CUDA device, or the
            engine build fails.
        KeyError: `text_embeddings` lacks an embedding a term needs.
    """

    name = "tensorrt"

    def __init__(
        self,
        pair,
        rule,
        text_embeddings: dict,
        *,
        device: str = "cuda",
        dtype: torch.dtype = torch.float16,
        cache_dir: str | Path | None = None,
        engine_dir: str | Path | None = None,
        batch_sizes: tuple[int, ...] = (8, 16),
        cuda_graph: bool = False,
    ) -> None:
        require_tensorrt()
        self.device = torch.device(device)
        if self.device.type != "cuda" or not torch.cuda.is_available():
            raise RuntimeError(
                f"--backend tensorrt needs a CUDA device (got {device!r}); use --backend onnxruntime on a CPU"
            )
        precision = dtype_name(dtype)
        self.rule = rule
        self.spec = spec_for(pair, rule, dtype=precision, batch_sizes=tuple(batch_sizes))
        self._constants = constant_inputs(self.spec, rule, text_embeddings, self.device)  # KeyError before the build
        exported = export_cached(pair, self.spec, cache_dir)
        engine_dir = Path(engine_dir) if engine_dir else Path(cache_dir or default_cache_dir()).parent / "engines"
        self.artifact = build_unet_engine(exported, BuildConfig(precision, tuple(batch_sizes)), engine_dir)
        self.engine = load_engine(self.artifact.path)
        self.cuda_graph = cuda_graph
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
            profile = _Profile(self.engine, sizes.index(size), size, self.spec, self._constants, self._memory, stream)
            if self.spec.kind == "lora_pair":
                profile.buffers["lora_gate"].copy_(lora_gate(self.rule, size))
            if self.cuda_graph:
                profile.capture(stream)
            self._profiles[size] = profile
        return self._profiles[size]

    @property
    def forwards_per_step(self) -> int:
        return 1

    @torch.inference_mode()
    def predict(self, x_t: torch.Tensor, t: torch.Tensor) -> Prediction:
        """The rule's noise prediction for `x_t` (B, C, h, w) on CUDA at timestep `t` (0-dim int64).

        Returns:
            `Prediction` with `eps_a` (B, C, h, w) in `x_t`'s dtype: combined eps (coef 1, 0) for
            two-term rules, the term's eps for one-term rules.
        """
        batch = x_t.shape[0]
        profile = self._profile(batch)
        buffers = profile.buffers
        buffers["x_t"][:batch].copy_(x_t)
        if batch < profile.batch:
            buffers["x_t"][batch:].zero_()  # padding rows: computed, then dropped
        t = t.to(self.device, torch.float32).reshape(-1)
        buffers["t"][:batch].copy_(t.expand(batch) if t.numel() == 1 else t)  # padding rows keep old values
        stream = torch.cuda.current_stream(self.device)
        if profile.graph is not None:
            profile.graph.replay()
        else:
            profile.launch(stream)
        eps = buffers["eps"][:batch].to(x_t.dtype, copy=True)  # the buffer is overwritten next step
        if self.spec.kind == "unet":
            return Prediction(eps, None, float(self.rule.terms[0].coef), 0.0)
        return Prediction(eps, None, 1.0, 0.0)
