"""CuPy loader and launcher of `guidance_ddim.cu`: guidance combination + sampler update, one pass.

The kernel computes, elementwise and in fp32 whatever the storage type,

    out = w_x * x_t + w_a * output_a + w_b * output_b + w_h1 * h_1 + ... + w_hK * h_K   (K <= 2)

with `(w_x, w_a, w_b, w_h1..w_hK)` read from 3 + K floats in device memory: one output block of a row
of the per-step weights table (`finextract.engine.ddim.StepTable.weights`; K history tensors for a
multistep solver, none for DDIM), so a captured CUDA graph serves every timestep. Its
definition is the torch reference `finextract.kernels.guidance_ddim.guided_update_reference`, whose
dispatcher `guided_update` calls `guided_update_cuda` for CUDA tensors.

CuPy is imported on the first CUDA call, never at import time; the compiled module is built once per
(source hash, compute capability) and kept for the process (CuPy also caches the binary on disk).
Launches go to torch's current stream on the tensors' own memory (`data_ptr()`), so they are
ordered with torch's work and can be captured in a torch CUDA graph.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

KERNEL_SOURCE = Path(__file__).with_name("guidance_ddim.cu")
# NVRTC options; CuPy adds -arch for the current device itself (a second -arch is an NVRTC error).
NVRTC_OPTIONS = ("--std=c++14",)
BLOCK_THREADS = 256
VECTOR_BYTES = 16
# One storage type for all tensors of a call -> entry-point stem in the .cu file.
KERNEL_STEMS = {torch.float32: "guided_ddim_f32", torch.float16: "guided_ddim_f16", torch.bfloat16: "guided_ddim_bf16"}

_modules: dict[tuple[str, tuple[int, int]], object] = {}
_modules_lock = threading.Lock()


def kernel_name(dtype: torch.dtype, has_output_b: bool, history: int = 0) -> str:
    """Entry point of `guidance_ddim.cu` for a storage dtype; the `_a` variant reads no `output_b`, the
    `_h1` / `_h2` variants one or two history tensors.

    Raises:
        ValueError: `dtype` is not float32, float16 or bfloat16, or `history` is not 0, 1 or 2.
    """
    if dtype not in KERNEL_STEMS:
        raise ValueError(f"guided_update_cuda: dtype {dtype} is not supported; use float32, float16 or bfloat16")
    if history not in (0, 1, 2):
        raise ValueError(f"guided_update_cuda: {history} history tensors; the kernel takes 0, 1 or 2")
    return KERNEL_STEMS[dtype] + ("" if has_output_b else "_a") + (f"_h{history}" if history else "")


def vector_elements(dtype: torch.dtype) -> int:
    """Elements per 16-byte vector for a storage dtype (4 for fp32, 8 for fp16/bf16)."""
    return VECTOR_BYTES // torch.empty((), dtype=dtype).element_size()


@lru_cache(maxsize=4)
def _source_and_hash(path: str, mtime_ns: int) -> tuple[str, str]:
    source = Path(path).read_text()
    return source, source_hash(source)


def source_hash(source: str, options: tuple[str, ...] = NVRTC_OPTIONS) -> str:
    """SHA-256 (hex) of the kernel source and its compiler options: the compiled-module cache key."""
    digest = hashlib.sha256(source.encode())
    for option in options:
        digest.update(b"\0" + option.encode())
    return digest.hexdigest()


def kernel_source() -> tuple[str, str]:
    """(source text, source hash) of `guidance_ddim.cu`, re-read when the file changes."""
    return _source_and_hash(str(KERNEL_SOURCE), KERNEL_SOURCE.stat().st_mtime_ns)


def vector_plan(pointers: list[int], numel: int, element_size: int) -> tuple[int, int]:
    """Split `numel` elements into a scalar head, a 16-byte vector body and a scalar tail.

    Vector access needs every pointer 16-byte aligned at the body's start, so the body exists only when
    all pointers share one offset modulo 16; the head is the elements before that boundary.

    Args:
        pointers: device addresses (bytes) of every tensor the kernel touches.
        numel: elements per tensor.
        element_size: bytes per element (4 or 2).

    Returns:
        (head, n_vec): elements before the body, 16-byte vectors in the body (0 means all scalar).
    """
    offsets = {pointer % VECTOR_BYTES for pointer in pointers}
    if len(offsets) != 1:
        return 0, 0
    offset = offsets.pop()
    if offset % element_size:
        return 0, 0
    head = min(numel, ((VECTOR_BYTES - offset) % VECTOR_BYTES) // element_size)
    return head, (numel - head) // (VECTOR_BYTES // element_size)


def grid_blocks(work_items: int, multiprocessors: int, blocks_per_sm: int = 8) -> int:
    """Blocks for a grid-stride launch: enough to cover the work, capped at a few waves of the GPU."""
    needed = max(1, -(-work_items // BLOCK_THREADS))
    return max(1, min(needed, multiprocessors * blocks_per_sm))


def _dense(tensor: torch.Tensor) -> bool:
    return tensor.is_contiguous() or (tensor.dim() == 4 and tensor.is_contiguous(memory_format=torch.channels_last))


def _layout_key(tensor: torch.Tensor) -> tuple[int, ...]:
    """Strides of the dimensions longer than 1: equal keys on dense tensors = same element order in memory."""
    return tuple(stride for stride, size in zip(tensor.stride(), tensor.shape) if size > 1)


def match_layout(tensor: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """`tensor` itself when it is dense and ordered in memory like `like`, else a dense copy that is.

    The kernel walks the four tensors' memory as flat arrays, which is right whenever they are dense
    and share one element order (NCHW-contiguous, or channels-last as a channels-last UNet returns).

    Args:
        tensor: any strided tensor.
        like: the layout to follow (x_t); None means "any dense layout".

    Returns:
        A dense tensor with `like`'s element order (a copy only when needed).
    """
    if like is None:
        return tensor if _dense(tensor) else tensor.contiguous()
    if _dense(tensor) and _layout_key(tensor) == _layout_key(like):
        return tensor
    channels_last = (
        like.dim() == 4 and not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last)
    )
    return tensor.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def check_inputs(x_t, output_a, output_b, out, weights, history=()) -> None:
    """Validate the tensors of a fused step before touching the GPU.

    Inputs may have any strides (`guided_update_cuda` makes them dense like x_t); `out` must
    already be dense and ordered like x_t, since it is written in place.

    Raises:
        TypeError: an argument that is not a torch.Tensor.
        ValueError: shapes, dtypes or devices that differ; an unsupported dtype; more than 2 history
            tensors; `out` not dense like x_t or overlapping an input; `weights` not a float32 tensor of
            3 + K elements on x_t's device; tensors not on a CUDA device.
    """
    history = tuple(history)
    named = {"x_t": x_t, "output_a": output_a, "output_b": output_b, "out": out}
    named.update({f"history[{index}]": h for index, h in enumerate(history)})
    named = {name: tensor for name, tensor in named.items() if tensor is not None}
    for name, tensor in named.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"guided_update_cuda: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    kernel_name(x_t.dtype, output_b is not None, len(history))  # dtype and history count supported
    for name, tensor in named.items():
        if tensor.shape != x_t.shape:
            raise ValueError(
                f"guided_update_cuda: {name} has shape {tuple(tensor.shape)}, x_t {tuple(x_t.shape)}; they must match"
            )
        if tensor.dtype != x_t.dtype:
            raise ValueError(f"guided_update_cuda: {name} is {tensor.dtype}, x_t {x_t.dtype}; cast them to one dtype")
        if tensor.device != x_t.device:
            raise ValueError(
                f"guided_update_cuda: {name} is on {tensor.device}, x_t on {x_t.device}; move them to one device"
            )
    if out is not None and not (_dense(out) and _dense(x_t) and _layout_key(out) == _layout_key(x_t)):
        raise ValueError(
            "guided_update_cuda: out must be dense and laid out like x_t; allocate it with "
            "torch.empty_like(x_t) (after x_t.contiguous() if x_t is a strided view)"
        )
    if out is not None and x_t.numel():
        span = x_t.numel() * x_t.element_size()
        for name, other in named.items():
            if name == "out":
                continue
            if other is not None and abs(out.data_ptr() - other.data_ptr()) < span:
                raise ValueError(f"guided_update_cuda: out overlaps {name}; pass a separate output buffer")
    if (
        not isinstance(weights, torch.Tensor)
        or weights.dtype != torch.float32
        or weights.numel() != 3 + len(history)
        or not weights.is_contiguous()
        or weights.device != x_t.device
    ):
        raise ValueError(
            f"guided_update_cuda: weights must be a contiguous float32 tensor of {3 + len(history)} elements "
            "(w_x, w_a, w_b, one per history tensor) on x_t's device: an output block of StepTable.weights(...)"
        )
    if x_t.device.type != "cuda":
        raise ValueError(
            f"guided_update_cuda: tensors are on {x_t.device}; it needs CUDA tensors "
            "(use guided_update(..., impl='reference') on the CPU)"
        )


def _import_cupy():
    try:
        import cupy  # optional: CuPy, imported on the first CUDA call only (tests/test_kernels.py)
    except ImportError as error:
        raise RuntimeError(
            "the fused CUDA kernel needs CuPy: pip install cupy-cuda13x (or cupy-cuda12x to match "
            "your CUDA), or use guided_update(..., impl='reference')"
        ) from error
    return cupy


def load_module(device: torch.device):
    """The compiled CuPy `RawModule` for `device`, built once per (source hash, compute capability).

    Raises:
        RuntimeError: CuPy is missing or the source does not compile (NVRTC's log in the message).
    """
    cupy = _import_cupy()
    capability = torch.cuda.get_device_capability(device)
    source, digest = kernel_source()
    key = (digest, capability)
    module = _modules.get(key)
    if module is not None:
        return module
    with _modules_lock:
        module = _modules.get(key)
        if module is None:
            with cupy.cuda.Device(device.index if device.index is not None else torch.cuda.current_device()):
                module = cupy.RawModule(code=source, options=NVRTC_OPTIONS)
                try:
                    module.compile()
                except Exception as error:  # CuPy raises its CompileException with NVRTC's log
                    raise RuntimeError(
                        f"{KERNEL_SOURCE.name} failed to compile for sm_{capability[0]}{capability[1]}: {error}"
                    ) from error
            logger.info("compiled %s for sm_%d%d (source %s)", KERNEL_SOURCE.name, *capability, digest[:12])
            _modules[key] = module
    return module


@lru_cache(maxsize=16)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _launch(x_t, output_a, output_b, out, weights, history=()) -> None:
    cupy = _import_cupy()
    device = x_t.device
    index = device.index if device.index is not None else torch.cuda.current_device()
    kernel = load_module(device).get_function(kernel_name(x_t.dtype, output_b is not None, len(history)))
    tensors = [out, x_t, output_a] + ([output_b] if output_b is not None else []) + list(history)
    numel = x_t.numel()
    head, n_vec = vector_plan([tensor.data_ptr() for tensor in tensors], numel, x_t.element_size())
    scalar_items = numel - n_vec * vector_elements(x_t.dtype)
    blocks = grid_blocks(max(n_vec, scalar_items), _multiprocessors(index))
    args = [np.uint64(tensor.data_ptr()) for tensor in tensors]
    args += [np.int64(numel), np.int64(head), np.int64(n_vec), np.uint64(weights.data_ptr())]
    stream = torch.cuda.current_stream(device)
    with cupy.cuda.Device(index), cupy.cuda.ExternalStream(stream.cuda_stream, index):
        kernel((blocks,), (BLOCK_THREADS,), tuple(args))


def guided_update_cuda(
    x_t: torch.Tensor,
    output_a: torch.Tensor,
    output_b: torch.Tensor | None,
    weights: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    history: tuple[torch.Tensor, ...] = (),
) -> torch.Tensor:
    """`w_x * x_t + w_a * output_a + w_b * output_b + sum_j w_hj * h_j`, fused into one CUDA kernel (fp32 arithmetic).

    Args:
        x_t: (B, C, h, w) latents (any shape works: elementwise), float32 / float16 / bfloat16, CUDA.
            Any strides: inputs not dense in x_t's element order are copied first (NCHW or
            channels-last inputs that match x_t are used in place).
        output_a, output_b: the rule's UNet outputs with x_t's shape, dtype and device; output_b may
            be None (the kernel then reads two inputs instead of three and ignores w_b).
        weights: contiguous float32 CUDA tensor of 3 + K elements (w_x, w_a, w_b, w_h1..w_hK) on x_t's
            device, an output block of a `StepTable.weights(...)` row (read on the device: no host
            synchronisation).
        out: optional output buffer, dense and laid out like x_t, overlapping no input; allocated
            with `torch.empty_like(x_t)` when None.
        history: K <= 2 history tensors like output_a (a multistep solver's; none for DDIM).

    Returns:
        x_prev: `out` (or a new tensor) with x_t's shape and dtype, written on torch's current stream.

    Raises:
        ValueError / TypeError: see `check_inputs`.
        RuntimeError: CuPy is missing or the kernel does not compile.
    """
    history = tuple(history)
    check_inputs(x_t, output_a, output_b, out, weights, history)
    x_t = match_layout(x_t)
    output_a = match_layout(output_a, x_t)
    output_b = match_layout(output_b, x_t) if output_b is not None else None
    history = tuple(match_layout(h, x_t) for h in history)
    if out is None:
        out = torch.empty_like(x_t)
    if x_t.numel():
        _launch(x_t, output_a, output_b, out, weights, history)
    return out
