"""Process-wide runtime settings: thread counts, devices and dtype names.

With 2 cores, a CPU-bound neighbour process can make torch's default threading 100x slower, so
every entry point (CLI, tests, benchmarks) sets thread counts deliberately through this module.
"""

from __future__ import annotations

import contextlib
import os

THREADS_ENV = "FINEXTRACT_THREADS"


def default_threads() -> int:
    """Threads for torch and onnxruntime: `$FINEXTRACT_THREADS`, else the number of CPU cores."""
    value = os.environ.get(THREADS_ENV)
    if value:
        try:
            threads = int(value)
        except ValueError:
            raise ValueError(f"{THREADS_ENV}={value!r} is not an integer; set it to e.g. 2") from None
        if threads < 1:
            raise ValueError(f"{THREADS_ENV}={threads} must be >= 1")
        return threads
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def set_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads (and inter-op to 1); return the count used.

    onnxruntime sessions read `default_threads()` when they are created.
    """
    import torch

    threads = threads or default_threads()
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # already set once in this process; harmless
        torch.set_num_interop_threads(1)
    return threads


def resolve_device(device: str | None = None) -> str:
    """'cuda' when available and not overridden, else 'cpu'. Raises ValueError on an unknown device."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available here; use --device cpu")
    if not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"--device {device!r}: expected 'cpu', 'cuda', 'cuda:N' or 'auto'")
    return device


#: Precision names accepted everywhere (CLI `--dtype`, API `dtype=`) -> torch dtype attribute.
DTYPE_NAMES = {
    "fp32": "float32",
    "fp16": "float16",
    "bf16": "bfloat16",
    "float32": "float32",
    "float16": "float16",
    "bfloat16": "bfloat16",
}


def torch_dtype(dtype):
    """The torch dtype a precision name stands for; a torch dtype passes through unchanged.

    Args:
        dtype: "fp32" / "fp16" / "bf16" (or "float32" / "float16" / "bfloat16"), or a `torch.dtype`.

    Returns:
        torch.float32, torch.float16 or torch.bfloat16 (or the given `torch.dtype`).

    Raises:
        ValueError: an unknown name (the message lists the accepted ones).
    """
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype {dtype!r}: expected one of fp32, fp16, bf16 (or a torch.dtype)")
    return getattr(torch, DTYPE_NAMES[dtype])
