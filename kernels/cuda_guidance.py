"""CuPy loader and launcher of `guidance_ddim.cu`: guidance combination + DDIM update, one pass.

The kernel computes, elementwise and in fp32 whatever the storage type,

    x_prev = w_x * x_t + w_a * eps_a + w_b * eps_b
    w_x = sqrt(a_prev / a_t),  w_a = c_eps * coef_a,  w_b = c_eps * coef_b,
    c_eps = sqrt(1 - a_prev) - sqrt(a_prev * (1 - a_t) / a_t)

which is DDIM with eta = 0 (Song et al. 2021, Eq. 12) on `eps = coef_a * eps_a + coef_b * eps_b`.
Its definition is the torch reference `finextract.kernels.guidance_ddim.guided_ddim_step`
(impl="reference"), whose dispatcher calls `guided_ddim_step_cuda` for CUDA tensors.

CuPy is imported on the first CUDA call, never at import time; the compiled module is built once per
(source hash, compute capability) and kept for the process (CuPy also caches the binary on disk).
Launches go to torch's current stream on the tensors' own memory (`data_ptr()`), so they are
ordered with torch's work and can be captured in a torch CUDA graph.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
from functools import lru_cache
from pathlib import Path

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


def kernel_name(dtype: torch.dtype, has_eps_b: bool) -> str:
    """Entry point of `guidance_ddim.cu` for a storage dtype; the `_a` variant reads no `eps_b`.

    Raises:
        ValueError: `dtype` is not float32, float16 or bfloat16.
    """
    if dtype not in KERNEL_STEMS:
        raise ValueError(f"guided_ddim_step_cuda: dtype {dtype} is not supported; use float32, float16 or bfloat16")
    return KERNEL_STEMS[dtype] + ("" if has_eps_b else "_a")


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


def ddim_weights(
    coef_a: float, coef_b: float, alpha_prod_t: float, alpha_prod_t_prev: float
) -> tuple[float, float, float]:
    """The three per-step weights (w_x, w_a, w_b) of the fused update, computed in float64.

    Args:
        coef_a, coef_b: the guidance rule's coefficients (e.g. FineXtract Eq. 13: w and 1 - w + k).
        alpha_prod_t: alphas_cumprod at t, in (0, 1].
        alpha_prod_t_prev: alphas_cumprod at the previous timestep (or the final alpha), in (0, 1].

    Returns:
        (w_x, w_a, w_b) with x_prev = w_x * x_t + w_a * eps_a + w_b * eps_b (DDIM, eta = 0).

    Raises:
        ValueError: an alpha outside (0, 1] or a non-finite coefficient.
    """
    a_t, a_prev = float(alpha_prod_t), float(alpha_prod_t_prev)
    for name, value in (("alpha_prod_t", a_t), ("alpha_prod_t_prev", a_prev)):
        if not (0.0 < value <= 1.0):
            raise ValueError(f"guided_ddim_step_cuda: {name}={value} must be in (0, 1] (an alphas_cumprod entry)")
    coef_a, coef_b = float(coef_a), float(coef_b)
    if not (math.isfinite(coef_a) and math.isfinite(coef_b)):
        raise ValueError(f"guided_ddim_step_cuda: coefficients must be finite, got coef_a={coef_a}, coef_b={coef_b}")
    w_x = math.sqrt(a_prev / a_t)
    c_eps = math.sqrt(1.0 - a_prev) - math.sqrt(a_prev * (1.0 - a_t) / a_t)
    return w_x, c_eps * coef_a, c_eps * coef_b


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


def check_inputs(x_t, eps_a, eps_b, out, weights=None) -> None:
    """Validate the tensors of a fused step before touching the GPU.

    Inputs may have any strides (`guided_ddim_step_cuda` makes them dense like x_t); `out` must
    already be dense and ordered like x_t, since it is written in place.

    Raises:
        TypeError: an argument that is not a torch.Tensor.
        ValueError: shapes, dtypes or devices that differ; an unsupported dtype; `out` not dense
            like x_t or overlapping an input; `weights` not a float32 tensor of 3 elements on x_t's
            device; tensors not on a CUDA device.
    """
    named = {"x_t": x_t, "eps_a": eps_a, "eps_b": eps_b, "out": out}
    named = {name: tensor for name, tensor in named.items() if tensor is not None}
    for name, tensor in named.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"guided_ddim_step_cuda: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    kernel_name(x_t.dtype, eps_b is not None)  # dtype supported
    for name, tensor in named.items():
        if tensor.shape != x_t.shape:
            raise ValueError(
                f"guided_ddim_step_cuda: {name} has shape {tuple(tensor.shape)}, x_t {tuple(x_t.shape)}; they must match"
            )
        if tensor.dtype != x_t.dtype:
            raise ValueError(
                f"guided_ddim_step_cuda: {name} is {tensor.dtype}, x_t {x_t.dtype}; cast them to one dtype"
            )
        if tensor.device != x_t.device:
            raise ValueError(
                f"guided_ddim_step_cuda: {name} is on {tensor.device}, x_t on {x_t.device}; move them to one device"
            )
    if out is not None and not (_dense(out) and _dense(x_t) and _layout_key(out) == _layout_key(x_t)):
        raise ValueError(
            "guided_ddim_step_cuda: out must be dense and laid out like x_t; allocate it with "
            "torch.empty_like(x_t) (after x_t.contiguous() if x_t is a strided view)"
        )
    if out is not None and x_t.numel():
        span = x_t.numel() * x_t.element_size()
        for name in ("x_t", "eps_a", "eps_b"):
            other = named.get(name)
            if other is not None and abs(out.data_ptr() - other.data_ptr()) < span:
                raise ValueError(f"guided_ddim_step_cuda: out overlaps {name}; pass a separate output buffer")
    if weights is not None and (
        not isinstance(weights, torch.Tensor)
        or weights.dtype != torch.float32
        or weights.numel() != 3
        or not weights.is_contiguous()
        or weights.device != x_t.device
    ):
        raise ValueError(
            "guided_ddim_step_cuda: weights must be a contiguous float32 tensor of 3 elements "
            "(w_x, w_a, w_b) on x_t's device; build it with ddim_weights_table()"
        )
    if x_t.device.type != "cuda":
        raise ValueError(
            f"guided_ddim_step_cuda: tensors are on {x_t.device}; it needs CUDA tensors "
            "(use guided_ddim_step(..., impl='reference') on the CPU)"
        )


def _import_cupy():
    try:
        import cupy
    except ImportError as error:
        raise RuntimeError(
            "the fused CUDA kernel needs CuPy: pip install cupy-cuda13x (or cupy-cuda12x to match "
            "your CUDA), or use guided_ddim_step(..., impl='reference')"
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


def _launch(x_t, eps_a, eps_b, out, scalars, weights) -> None:
    import numpy as np

    cupy = _import_cupy()
    device = x_t.device
    index = device.index if device.index is not None else torch.cuda.current_device()
    kernel = load_module(device).get_function(kernel_name(x_t.dtype, eps_b is not None))
    tensors = [out, x_t, eps_a] + ([eps_b] if eps_b is not None else [])
    numel = x_t.numel()
    head, n_vec = vector_plan([tensor.data_ptr() for tensor in tensors], numel, x_t.element_size())
    scalar_items = numel - n_vec * vector_elements(x_t.dtype)
    blocks = grid_blocks(max(n_vec, scalar_items), _multiprocessors(index))
    args = [np.uint64(tensor.data_ptr()) for tensor in tensors]
    args += [np.int64(numel), np.int64(head), np.int64(n_vec)]
    args += [np.float32(value) for value in scalars]
    args.append(np.uint64(weights.data_ptr() if weights is not None else 0))
    stream = torch.cuda.current_stream(device)
    with cupy.cuda.Device(index), cupy.cuda.ExternalStream(stream.cuda_stream, index):
        kernel((blocks,), (BLOCK_THREADS,), tuple(args))


def guided_ddim_step_cuda(
    x_t: torch.Tensor,
    eps_a: torch.Tensor,
    eps_b: torch.Tensor | None,
    coef_a: float,
    coef_b: float,
    alpha_prod_t: float,
    alpha_prod_t_prev: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """DDIM (eta = 0) step on the guided noise prediction, fused into one CUDA kernel.

    x_prev = sqrt(a_prev/a_t) * x_t + (sqrt(1 - a_prev) - sqrt(a_prev (1 - a_t) / a_t)) * eps with
    eps = coef_a * eps_a + coef_b * eps_b (DDIM, Song et al. 2021, Eq. 12, eta = 0; the same update as
    diffusers' `DDIMScheduler.step`). Arithmetic in fp32 for every storage type.

    Args:
        x_t: (B, C, h, w) latents (any shape works: elementwise), float32 / float16 / bfloat16, CUDA.
            Any strides: inputs not dense in x_t's element order are copied first (NCHW or
            channels-last inputs that match x_t are used in place).
        eps_a, eps_b: noise predictions with x_t's shape, dtype and device; eps_b may be None (then
            coef_b is ignored and the kernel reads two inputs instead of three).
        coef_a, coef_b: the rule's coefficients (Python floats: no device synchronisation).
        alpha_prod_t, alpha_prod_t_prev: alphas_cumprod at t and at the previous timestep, in (0, 1]
            (Python floats or CPU scalars; a CUDA tensor here would synchronise the host).
        out: optional output buffer, dense and laid out like x_t, overlapping no input; allocated
            with `torch.empty_like(x_t)` when None.

    Returns:
        x_prev: `out` (or a new tensor) with x_t's shape and dtype, written on torch's current stream.

    Raises:
        ValueError / TypeError: see `check_inputs` and `ddim_weights`.
        RuntimeError: CuPy is missing or the kernel does not compile.
    """
    check_inputs(x_t, eps_a, eps_b, out)
    w_x, w_a, w_b = ddim_weights(coef_a, coef_b, alpha_prod_t, alpha_prod_t_prev)
    x_t = match_layout(x_t)
    eps_a = match_layout(eps_a, x_t)
    eps_b = match_layout(eps_b, x_t) if eps_b is not None else None
    if out is None:
        out = torch.empty_like(x_t)
    if x_t.numel():
        _launch(x_t, eps_a, eps_b, out, (w_x, w_a, w_b), None)
    return out


def guided_ddim_step_cuda_weights(
    x_t: torch.Tensor, eps_a: torch.Tensor, eps_b: torch.Tensor | None, weights: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """The fused step with its weights read from device memory: one CUDA graph serves every timestep.

    Args:
        x_t, eps_a, eps_b, out: as in `guided_ddim_step_cuda` (`out` required: a static buffer).
        weights: float32 CUDA tensor of 3 elements (w_x, w_a, w_b), usually a row of
            `ddim_weights_table(...)` copied into a static buffer before each replay.

    Returns:
        `out`, written on torch's current stream.

    Raises:
        ValueError / TypeError: see `check_inputs`.
        RuntimeError: CuPy is missing or the kernel does not compile.
    """
    if out is None:
        raise ValueError("guided_ddim_step_cuda_weights: out is required (a static buffer like x_t)")
    check_inputs(x_t, eps_a, eps_b, out, weights)
    eps_a = match_layout(eps_a, x_t)
    eps_b = match_layout(eps_b, x_t) if eps_b is not None else None
    if x_t.numel():
        _launch(x_t, eps_a, eps_b, out, (0.0, 0.0, 0.0), weights)
    return out


def ddim_weights_table(coef_a: float, coef_b: float, alphas_prod_t, alphas_prod_t_prev, device="cpu") -> torch.Tensor:
    """Per-step weights (w_x, w_a, w_b) for a whole schedule, computed once in float64.

    Args:
        coef_a, coef_b: the rule's coefficients.
        alphas_prod_t, alphas_prod_t_prev: sequences (length = number of steps) of alphas_cumprod at
            each step's t and previous timestep, in (0, 1].
        device: where the table lives (the sampler's device: rows are copied on the device).

    Returns:
        float32 tensor (steps, 3) on `device`.
    """
    rows = [
        ddim_weights(coef_a, coef_b, a_t, a_prev) for a_t, a_prev in zip(alphas_prod_t, alphas_prod_t_prev, strict=True)
    ]
    return torch.tensor(rows, dtype=torch.float64).to(device=device, dtype=torch.float32)
