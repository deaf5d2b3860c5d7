"""TensorRT engines from the exported denoiser step graphs (TensorRT 10 Python API).

One engine per exported graph, with one static optimization profile per batch size (the export
spec's `profile_shapes`), a timing cache shared by every build in the engine folder, and a
metadata JSON beside each engine (model hashes, TensorRT version, GPU name and compute capability,
shapes). A cached engine is reused only when its metadata matches the key of everything that
changes it; otherwise it is rebuilt.

Everything except `build_engine` / `load_engine` is plain Python and runs without TensorRT.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .formats import atomic_write

logger = logging.getLogger(__name__)

ENGINE_FORMAT = 1
TIMING_CACHE_FILE = "timing.cache"
PRECISIONS = ("fp16", "fp32")
INSTALL_HINT = (
    "TensorRT's Python package is not importable here. It needs an NVIDIA GPU with a CUDA 12 driver and "
    "NVIDIA's package index: pip install --extra-index-url https://pypi.nvidia.com tensorrt-cu12 "
    "(or use a TensorRT NGC container). Without it, use --backend onnxruntime or --backend torch."
)


def require_tensorrt():
    """Import and return the `tensorrt` module.

    Raises:
        RuntimeError: it is not importable (the message says what is missing and how to install it),
            or its version is older than 10 (the named-tensor API this module uses).
    """
    try:
        import tensorrt  # optional: TensorRT is an optional install
    except ImportError as error:
        raise RuntimeError(f"{INSTALL_HINT} (import error: {error})") from None
    major = int(str(tensorrt.__version__).split(".")[0])
    if major < 10:
        raise RuntimeError(
            f"TensorRT {tensorrt.__version__} is too old: the engine needs TensorRT 10 or newer ({INSTALL_HINT})"
        )
    return tensorrt


@dataclass(frozen=True)
class BuildConfig:
    """How an engine is built.

    Attributes:
        precision: "fp16" or "fp32". The UNet graphs are exported in this precision and built as
            strongly typed networks (types come from the graph, as TensorRT 10 recommends).
        batch_sizes: one static optimization profile per batch size B.
        workspace_gib: cap on the builder's scratch memory (None: TensorRT's default, all free memory).
        optimization_level: the builder's optimization level, 0..5 (3 is TensorRT's default).
    """

    precision: str = "fp16"
    batch_sizes: tuple[int, ...] = (8, 16)
    workspace_gib: float | None = None
    optimization_level: int = 3

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision {self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        if not self.batch_sizes or any(int(b) < 1 for b in self.batch_sizes):
            raise ValueError(f"--batch-sizes {self.batch_sizes!r}: need positive batch sizes, e.g. 8 16")
        if not 0 <= self.optimization_level <= 5:
            raise ValueError(f"optimization_level {self.optimization_level}: expected 0..5")


@dataclass(frozen=True)
class EngineArtifact:
    """A built (or reused) engine: `path` (.plan), its metadata and whether it was `reused`."""

    path: Path
    meta: dict
    reused: bool


def gpu_identity(device: int = 0) -> dict:
    """Name and compute capability of CUDA device `device` (engines are specific to both)."""
    import torch  # heavy: torch; the engine-cache bookkeeping above is torch-free

    if not torch.cuda.is_available():
        raise RuntimeError("building or loading a TensorRT engine needs a CUDA GPU; none is visible here")
    major, minor = torch.cuda.get_device_capability(device)
    return {"name": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}"}


def engine_key(source: dict, profiles: dict, config: BuildConfig, tensorrt_version: str, gpu: dict) -> str:
    """sha256 of everything that changes an engine.

    Args:
        source: identifies the ONNX graph, e.g. {"onnx_key": ...} (the export's cache key, which
            already hashes the weights) or {"onnx_sha256": ...}.
        profiles: batch size -> input name -> (min, opt, max) shapes.
        config: the `BuildConfig`.
        tensorrt_version: `tensorrt.__version__`.
        gpu: `gpu_identity()`.
    """
    payload = {
        "format": ENGINE_FORMAT,
        "source": source,
        "profiles": _shapes_json(profiles),
        "config": asdict(config),
        "tensorrt": tensorrt_version,
        "gpu": gpu,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _shapes_json(profiles: dict) -> dict:
    return {str(b): {name: [list(s) for s in shapes] for name, shapes in p.items()} for b, p in profiles.items()}


def unet_profiles(spec, batch_sizes) -> dict:
    """Batch size -> the export spec's static profile at that batch size."""
    return {int(b): spec.profile_shapes(int(b)) for b in sorted(set(batch_sizes))}


def read_engine_meta(engine_path: str | Path, key: str) -> dict | None:
    """The engine's metadata when it matches `key` and the engine file has the recorded size; else None."""
    engine_path = Path(engine_path)
    try:
        meta = json.loads(engine_path.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("format") != ENGINE_FORMAT or meta.get("key") != key:
        return None
    if not engine_path.is_file() or engine_path.stat().st_size != meta.get("size"):
        return None
    return meta


# --- TensorRT proper ---------------------------------------------------------------------------


def _logger(trt):
    return trt.Logger(trt.Logger.WARNING)


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    profiles: dict,
    config: BuildConfig,
    *,
    strongly_typed: bool = True,
    int8: bool = False,
    timing_cache: str | Path | None = None,
) -> Path:
    """Parse `onnx_path` and build a serialized engine into `engine_path`.

    Args:
        onnx_path: the ONNX file (external data beside it is found by the parser).
        engine_path: the .plan file to write.
        profiles: batch size -> input name -> (min, opt, max); one optimization profile each, in
            increasing batch order (profile i serves `sorted(profiles)[i]`).
        config: precision and builder settings. With `strongly_typed`, types come from the graph
            (export the graph in the wanted precision); otherwise `precision` "fp16" sets the FP16 flag.
        strongly_typed: build a strongly typed network.
        int8: allow INT8 tactics (explicit quantization of a QDQ graph such as SSCD's).
        timing_cache: file to read the timing cache from and write it back to (shared across builds).

    Returns:
        `engine_path`.

    Raises:
        RuntimeError: TensorRT missing, the ONNX fails to parse (the parser's errors are listed) or
            the build fails.
    """
    trt = require_tensorrt()
    log = _logger(trt)
    builder = trt.Builder(log)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    builder_config = builder.create_builder_config()
    builder_config.builder_optimization_level = config.optimization_level
    if config.workspace_gib:
        builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(config.workspace_gib * 1024**3))
    if not strongly_typed:
        if config.precision == "fp16":
            builder_config.set_flag(trt.BuilderFlag.FP16)
        if int8:
            builder_config.set_flag(trt.BuilderFlag.INT8)
    for batch in sorted(profiles):
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in profiles[batch].items():
            profile.set_shape(name, low, opt, high)
        builder_config.add_optimization_profile(profile)
    cache_bytes = Path(timing_cache).read_bytes() if timing_cache and Path(timing_cache).is_file() else b""
    cache = builder_config.create_timing_cache(cache_bytes)
    builder_config.set_timing_cache(cache, ignore_mismatch=False)
    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, builder_config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see the TensorRT log above)")
    engine_path = Path(engine_path)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(engine_path, memoryview(serialized))
    if timing_cache:
        atomic_write(Path(timing_cache), memoryview(builder_config.get_timing_cache().serialize()))
    logger.info("built %s in %.0f s", engine_path, time.perf_counter() - started)
    return engine_path


def load_engine(engine_path: str | Path):
    """Deserialize a .plan file into an `ICudaEngine`. Raises RuntimeError when TensorRT rejects it."""
    trt = require_tensorrt()
    runtime = trt.Runtime(_logger(trt))
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise RuntimeError(f"TensorRT could not load {engine_path}; rebuild it with build_engines.py")
    return engine


def _build_cached(
    name: str, onnx_path, source: dict, profiles: dict, config: BuildConfig, out_dir, extra: dict, **options
) -> EngineArtifact:
    trt = require_tensorrt()
    gpu = gpu_identity()
    # strongly_typed / int8 change the engine as much as the config does, so they are part of its key
    source = {**source, "build_options": dict(sorted(options.items()))}
    key = engine_key(source, profiles, config, trt.__version__, gpu)
    out_dir = Path(out_dir)
    engine_path = out_dir / f"{name}-{config.precision}.plan"
    meta = read_engine_meta(engine_path, key)
    if meta is not None:
        logger.info("reusing TensorRT engine %s", engine_path)
        return EngineArtifact(engine_path, meta, True)
    if engine_path.exists():
        logger.warning(
            "TensorRT engine %s is stale (model, shapes, precision, TensorRT or GPU changed); rebuilding", engine_path
        )
    started = time.perf_counter()
    build_engine(onnx_path, engine_path, profiles, config, timing_cache=out_dir / TIMING_CACHE_FILE, **options)
    meta = {
        "format": ENGINE_FORMAT,
        "key": key,
        "source": source,
        "onnx": str(onnx_path),
        "tensorrt": trt.__version__,
        "gpu": gpu,
        "config": asdict(config),
        "profiles": _shapes_json(profiles),
        "batch_sizes": sorted(profiles),
        "size": engine_path.stat().st_size,
        "build_seconds": round(time.perf_counter() - started, 1),
        **extra,
    }
    atomic_write(engine_path.with_suffix(".json"), json.dumps(meta, indent=2, sort_keys=True).encode())
    return EngineArtifact(engine_path, meta, False)


def build_unet_engine(exported, config: BuildConfig, out_dir: str | Path) -> EngineArtifact:
    """The engine of an exported denoiser step graph, reused when its metadata matches, else (re)built.

    Args:
        exported: an `ExportedModel` from `finextract.engine.export.export_cached`, exported in
            `config.precision`.
        config: the `BuildConfig` (one profile per batch size).
        out_dir: the engine folder (engines, metadata JSON and the shared timing cache).

    Returns:
        `EngineArtifact`; its meta records the export key, the denoiser's fingerprint, spec, TensorRT
        version, GPU and shapes.

    Raises:
        ValueError: the export's dtype differs from `config.precision`.
        RuntimeError: TensorRT or a GPU is missing, or the build fails.
    """
    spec = exported.spec
    if spec.dtype != config.precision:
        raise ValueError(
            f"the ONNX export is {spec.dtype} but --precision is {config.precision}; export it in {config.precision}"
        )
    profiles = unet_profiles(spec, config.batch_sizes)
    source = {"onnx_key": exported.meta["key"]}
    extra = {
        "denoiser_fingerprint": exported.meta.get("denoiser_fingerprint"),
        "spec": exported.meta.get("spec"),
        "inputs": list(spec.input_names),
        "outputs": list(spec.output_names),
    }
    name = f"denoiser-{exported.meta['key'][:16]}"
    return _build_cached(name, exported.path, source, profiles, config, out_dir, extra, strongly_typed=True)
