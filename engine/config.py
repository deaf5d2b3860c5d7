"""The run configuration: every setting that says where and how a run executes, resolved once.

    config = RunConfig.resolve(device="auto", backend="auto", steps=50)   # validated here, and only here
    sampler = Sampler(pair, rule, caption, config)                          # read below, never re-derived

Entry points (the CLI, `Extractor`, `generate`) call `RunConfig.resolve` (or `config.replace`) once; the
layers below read the frozen object. `to_dict()` is the record written into manifests and results.

With 2 cores, a CPU-bound neighbour process can make torch's default threading 100x slower, so the
thread count is part of the configuration and is applied deliberately (`apply_threads`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

THREADS_ENV = "FINEXTRACT_THREADS"
CACHE_ENV = "FINEXTRACT_CACHE"

#: Backend names a run may ask for; "auto" resolves per device with `AUTO_BACKENDS`.
BACKEND_NAMES = ("torch", "onnxruntime", "openvino", "tensorrt")
#: `backend="auto"`: OpenVINO on a CPU (it compiles the same cached ONNX export of the step that
#: onnxruntime runs, about 1.4x faster than onnxruntime on this project's AVX2 CPU, the same images to
#: float32 rounding), torch on CUDA (CUDA graphs + the fused kernel).
AUTO_BACKENDS = {"cpu": "openvino", "cuda": "torch"}
#: The one default, for the API and the CLI alike.
DEFAULT_BACKEND = "auto"

#: Samplers a run may ask for (`--scheduler`); `finextract.engine.solvers.SCHEDULERS` writes their step tables.
SCHEDULER_NAMES = ("ddim", "dpmpp-2m", "unipc", "euler")
#: The one default sampler (the paper's DDIM, eta = 0).
DEFAULT_SCHEDULER = "ddim"

#: Precision names accepted everywhere (CLI `--dtype`, API `dtype=`) -> torch dtype attribute.
DTYPE_NAMES = {
    "fp32": "float32",
    "fp16": "float16",
    "bf16": "bfloat16",
    "float32": "float32",
    "float16": "float16",
    "bfloat16": "bfloat16",
}
_SHORT_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
#: The precision names a command line offers (`--dtype`).
DTYPE_CHOICES = tuple(_SHORT_DTYPE.values())

#: Settings that change the generated images: a run resumed in the same folder (the generation
#: manifest) or an audit row (the fleet's key) must keep them. The device is not one: a run may
#: resume on another GPU, and "auto" names none.
IMAGE_SETTINGS = ("steps", "scheduler", "seed", "dtype", "vae_dtype", "backend")


def default_threads() -> int:
    """Threads for torch and onnxruntime: `$FINEXTRACT_THREADS`, else the number of usable CPU cores.

    Raises:
        ValueError: `$FINEXTRACT_THREADS` is not an integer >= 1.
    """
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
    """Set torch's intra-op threads (inter-op to 1); return the count used (default `default_threads()`)."""
    import torch  # heavy: torch; `import finextract.engine.config` stays torch-free (tests/test_config.py)

    threads = threads or default_threads()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # inter-op threads can be set once per process; harmless
        torch.set_num_interop_threads(1)
    return threads


def resolve_device(device: str | None = None) -> str:
    """'cuda' when available for "auto" / None, else 'cpu'; an explicit device is checked.

    Raises:
        ValueError: an unknown device name, or a CUDA device on a machine without one.
    """
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not (device == "cpu" or device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ValueError(f"--device {device!r}: expected 'cpu', 'cuda', 'cuda:N' or 'auto'")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available here; use --device cpu")
    return device


def dtype_name(dtype) -> str:
    """The short name ("fp32", "fp16", "bf16") of a precision name or torch dtype.

    Raises:
        ValueError: anything else (the message lists the accepted names).
    """
    text = str(dtype).replace("torch.", "")
    if text not in DTYPE_NAMES:
        raise ValueError(f"dtype {dtype!r}: expected one of fp32, fp16, bf16 (or a torch.dtype)")
    return _SHORT_DTYPE[DTYPE_NAMES[text]]


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


def default_cache_dir() -> Path:
    """`$FINEXTRACT_CACHE`, else `~/.cache/finextract`: ONNX exports and TensorRT engines live below it."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "finextract")


@dataclass(frozen=True)
class RunConfig:
    """Where and how a run executes, validated once (`RunConfig.resolve`), then only read.

    The field defaults are `resolve`'s (unresolved: "auto", None); `RunConfig.defaults()` lists them for
    the command-line options and the fleet. Build one with `resolve`, which fills them in.

    Attributes:
        device: "cpu", "cuda" or "cuda:N" (resolved: never "auto").
        dtype: UNet and text-encoder precision, "fp32" | "fp16" | "bf16" (the last two on CUDA only).
        vae_dtype: VAE precision; "fp32" by default, since fp16 VAEs overflow into black images.
        backend: "torch", "onnxruntime", "openvino" or "tensorrt" (resolved: never "auto").
        threads: torch and onnxruntime intra-op threads (inter-op is 1); OpenVINO inference streams
            of one thread each (the batch is split between them).
        batch_size: images per denoising batch, >= 1 (does not change the images).
        steps: sampler steps, >= 1 (the paper uses 50 DDIM steps).
        scheduler: the sampler, "ddim" (eta = 0, the paper's), "dpmpp-2m" (DPM-Solver++ 2M), "unipc"
            (UniPC bh2), or "euler" (flow matching's Euler step, for SD3 / FLUX.1): the rows of one step
            table (`finextract.engine.solvers`).
        seed: image i starts from the standard-normal latent of seed `seed + i`.
        cache_dir: folder of the export / engine cache (`onnx/`, `engines/` below it).
        cuda_graphs: on CUDA, replay each DDIM step as a CUDA graph when the backend allows it.
    """

    device: str = "auto"
    dtype: str = "fp32"
    vae_dtype: str = "fp32"
    backend: str = DEFAULT_BACKEND
    threads: int | None = None
    batch_size: int = 16
    steps: int = 50
    scheduler: str = DEFAULT_SCHEDULER
    seed: int = 0
    cache_dir: str | None = None
    cuda_graphs: bool = True

    @classmethod
    def defaults(cls) -> dict:
        """Every setting's default, unresolved ("auto", None): `resolve`'s keyword defaults, for the
        command-line options (`finextract.commands.options`) and the fleet's row settings."""
        return {field.name: field.default for field in dataclasses.fields(cls)}

    @classmethod
    def resolve(
        cls,
        *,
        device: str | None = "auto",
        dtype: str = "fp32",
        vae_dtype: str = "fp32",
        backend: str = DEFAULT_BACKEND,
        threads: int | None = None,
        batch_size: int = 16,
        steps: int = 50,
        scheduler: str = DEFAULT_SCHEDULER,
        seed: int = 0,
        cache_dir: str | Path | None = None,
        cuda_graphs: bool = True,
    ) -> RunConfig:
        """Resolve "auto" values and defaults, and validate every setting, before any heavy work.

        The keyword defaults are the field defaults (`RunConfig.defaults()`; tests/test_config.py
        keeps them equal).

        Args:
            device: "auto" (CUDA when available), "cpu", "cuda", "cuda:N".
            dtype, vae_dtype: "fp32" | "fp16" | "bf16" (or a torch dtype).
            backend: "auto" (`AUTO_BACKENDS[device type]`), "torch", "onnxruntime", "openvino" or "tensorrt".
            threads: None = `default_threads()` (`$FINEXTRACT_THREADS`, else all cores).
            batch_size, steps: integers >= 1. seed: any integer.
            scheduler: one of `SCHEDULER_NAMES`.
            cache_dir: None = `default_cache_dir()` (`$FINEXTRACT_CACHE` or ~/.cache/finextract).
            cuda_graphs: see the class attributes.

        Returns:
            A frozen `RunConfig`.

        Raises:
            ValueError: the message names the setting and the fix (e.g. fp16 on a CPU, tensorrt
                without CUDA, a batch size of 0).
        """
        device = resolve_device(device)
        is_cuda = device.startswith("cuda")
        names = {}
        for option, value in (("dtype", dtype), ("vae_dtype", vae_dtype)):
            try:
                names[option] = dtype_name(value)
            except ValueError:
                raise ValueError(f"--{option.replace('_', '-')} {value!r}: expected one of fp32, fp16, bf16") from None
            if names[option] != "fp32" and not is_cuda:
                raise ValueError(
                    f"--{option.replace('_', '-')} {names[option]} needs a CUDA device (got {device!r}); "
                    "use fp32 on a CPU"
                )
        if backend == "auto":
            backend = AUTO_BACKENDS["cuda" if is_cuda else "cpu"]
        if backend not in BACKEND_NAMES:
            raise ValueError(f"--backend {backend!r}: expected auto or one of {', '.join(BACKEND_NAMES)}")
        if backend == "tensorrt" and not is_cuda:
            raise ValueError(f"--backend tensorrt needs a CUDA device (got {device!r}); use --backend onnxruntime")
        if backend == "openvino" and (is_cuda or names["dtype"] != "fp32"):
            raise ValueError(
                f"--backend openvino runs fp32 on the CPU (got --device {device}, --dtype {names['dtype']}); "
                "use --device cpu --dtype fp32, or --backend torch on CUDA"
            )
        if backend == "onnxruntime" and names["dtype"] == "bf16":
            raise ValueError("--backend onnxruntime exports fp32 or fp16 graphs; use --dtype fp16 or --backend torch")
        for option, value in (("batch_size", batch_size), ("steps", steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                hint = " (the paper uses 50)" if option == "steps" else ""
                raise ValueError(f"--{option.replace('_', '-')} {value!r}: must be an integer >= 1{hint}")
        if scheduler not in SCHEDULER_NAMES:
            raise ValueError(f"--scheduler {scheduler!r}: expected one of {', '.join(SCHEDULER_NAMES)}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"--seed {seed!r}: must be an integer")
        threads = default_threads() if threads is None else threads
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads={threads!r}: must be an integer >= 1 (or set {THREADS_ENV})")
        return cls(
            device=device,
            dtype=names["dtype"],
            vae_dtype=names["vae_dtype"],
            backend=backend,
            threads=threads,
            batch_size=batch_size,
            steps=steps,
            scheduler=scheduler,
            seed=seed,
            cache_dir=str(Path(cache_dir) if cache_dir is not None else default_cache_dir()),
            cuda_graphs=bool(cuda_graphs),
        )

    def replace(self, **changes) -> RunConfig:
        """A copy with `changes` applied and validated again (same arguments as `resolve`).

        Raises:
            ValueError: as `resolve`, or an unknown setting name.
        """
        unknown = sorted(set(changes) - {field.name for field in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown run setting(s) {', '.join(unknown)}; expected {', '.join(self.to_dict())}")
        return RunConfig.resolve(**{**self.to_dict(), **changes})

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def torch_device(self):
        import torch

        return torch.device(self.device)

    @property
    def torch_dtype(self):
        return torch_dtype(self.dtype)

    @property
    def torch_vae_dtype(self):
        return torch_dtype(self.vae_dtype)

    def apply_threads(self) -> int:
        """Set torch's thread counts to `threads` (onnxruntime sessions read `threads` when built)."""
        return set_threads(self.threads)

    def to_dict(self) -> dict:
        """The JSON record of this configuration (manifests and `result.json`)."""
        return dataclasses.asdict(self)

    def image_settings(self) -> dict:
        """The settings that change the generated images (`IMAGE_SETTINGS`): the resume key's part."""
        return {name: getattr(self, name) for name in IMAGE_SETTINGS}


def run_config(config: RunConfig | None = None, **options) -> RunConfig:
    """`config` with `options` applied, or `RunConfig.resolve(**options)`: the API entry points' one call.

    Raises:
        ValueError: see `RunConfig.resolve`.
    """
    if config is None:
        return RunConfig.resolve(**options)
    return config.replace(**options) if options else config
