"""ONNX export of the guided denoiser's step: one spec, one graph per (pair, rule structure), cached by a key.

The exported network is `GuidedDenoiser.step` unchanged (`finextract.engine.denoiser`): inputs `x_t`
(the loop's state: x_t, then a multistep solver's K history tensors along the channels), `t`, the
step's `weights` row and the run's conditioning; output `x_prev` (the next state). The rule's coefficients
live in the weights row, so one graph serves every w, k; the conditioning is an input, so one graph
serves every caption. A LoRA pair's graph holds one UNet with gated low-rank branches, a full fine-tune
pair's graph both UNets.

An `ExportSpec` holds names, shapes, dtypes, dynamic axes, TensorRT profiles and sample inputs; export,
engine build and both runtimes read it. Exports live under a cache folder, keyed by a hash of the
denoiser's fingerprint (the pair's weights and the rule's structure), the spec and the library
versions, with a `meta.json` checked on load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .onnx_symbolics import register_symbolics, traceable_rotary

logger = logging.getLogger(__name__)

EXPORT_FORMAT = 3  # bump when the exported module or its names change: old cache entries then stop matching
ONNX_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
META_FILE = "meta.json"
PROTOBUF_LIMIT = 2 * 1024**3  # ONNX protobuf files cannot exceed 2 GB: weights go to external data
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
FLOAT32_INPUTS = ("x_t", "t", "weights")  # the loop's tensors stay float32 whatever the UNet precision


@dataclass(frozen=True)
class ExportSpec:
    """Everything that defines one exported step graph: names, shapes, dtypes, axes, profiles.

    Attributes:
        latent_shape: (C, h, w) of `x_t`, e.g. (4, 64, 64) for SD 1.x at 512 px.
        conditioning: (input name, shape) of each conditioning input, in order, e.g.
            (("encoder_hidden_states_a", (1, 77, 768)), ("encoder_hidden_states_b", (1, 77, 768))).
        dtype: "fp32" or "fp16": the UNet weights and the conditioning inputs. `x_t`, `t`, `weights`
            and `x_prev` are always float32 (the update is accumulated in float32).
        opset: ONNX opset, >= 17.
        batch_sizes: the batch sizes B TensorRT builds one static optimization profile for; the
            ONNX graph itself has a dynamic batch.
        history: K, the solver's history tensors in the state (`finextract.engine.solvers.history_slots`;
            0 for DDIM): `x_t` and `x_prev` are (B, (1 + K) * C, h, w), `weights` ((1 + K) * (3 + K),).
    """

    latent_shape: tuple[int, int, int]
    conditioning: tuple[tuple[str, tuple[int, ...]], ...]
    dtype: str = "fp32"
    opset: int = 17
    batch_sizes: tuple[int, ...] = (8, 16)
    history: int = 0

    def __post_init__(self) -> None:
        if self.history not in (0, 1, 2):
            raise ValueError(f"ExportSpec.history {self.history!r}: expected 0 (DDIM), 1 (dpmpp-2m) or 2 (unipc)")
        if self.dtype not in DTYPES:
            raise ValueError(f"ExportSpec.dtype {self.dtype!r}: expected one of {', '.join(DTYPES)}")
        if self.opset < 17:
            raise ValueError(f"ExportSpec.opset {self.opset}: needs 17 or newer (LayerNormalization, SDPA patterns)")
        if not self.batch_sizes or any(int(b) < 1 for b in self.batch_sizes):
            raise ValueError(f"ExportSpec.batch_sizes {self.batch_sizes!r}: need positive batch sizes, e.g. (8, 16)")
        if not self.conditioning:
            raise ValueError("ExportSpec.conditioning is empty: a step graph needs one conditioning input per term")

    @classmethod
    def of(
        cls,
        denoiser,
        conditioning,
        *,
        dtype: str | torch.dtype = "fp32",
        opset: int = 17,
        batch_sizes: tuple[int, ...] = (8, 16),
        history: int = 0,
    ) -> ExportSpec:
        """The spec of `denoiser`'s step graph for a run's `conditioning` (shapes from the tensors).

        Args:
            denoiser: a `GuidedDenoiser`.
            conditioning: `encode_conditioning(pair, rule, caption)` (only shapes are read).
            dtype: "fp32" / "fp16" (or the torch dtypes): the UNet precision.
            opset, batch_sizes, history: see the attributes.

        Raises:
            ValueError: an unknown dtype, or a conditioning count that does not fit the denoiser.
        """
        names = denoiser.conditioning_names
        if len(names) != len(conditioning):
            raise ValueError(f"{len(conditioning)} conditioning tensors for inputs {names}; use encode_conditioning")
        shapes = tuple((name, tuple(int(d) for d in tensor.shape)) for name, tensor in zip(names, conditioning))
        return cls(tuple(denoiser.latent_shape), shapes, dtype_name(dtype), opset, tuple(batch_sizes), int(history))

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def input_names(self) -> tuple[str, ...]:
        return FLOAT32_INPUTS + tuple(name for name, _ in self.conditioning)

    @property
    def output_names(self) -> tuple[str, ...]:
        return ("x_prev",)

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {"x_t": {0: "batch"}, "x_prev": {0: "batch"}}

    @property
    def state_shape(self) -> tuple[int, int, int]:
        """((1 + K) * C, h, w): one latent's state (x_t, then the K history tensors)."""
        channels, h, w = self.latent_shape
        return ((1 + self.history) * channels, h, w)

    @property
    def weights_size(self) -> int:
        """(1 + K) * (3 + K): floats in a step's weights row."""
        return (1 + self.history) * (3 + self.history)

    def input_shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        """Shape of every input at batch size `batch` (conditioning keeps its leading 1)."""
        shapes = {"x_t": (batch, *self.state_shape), "t": (1,), "weights": (self.weights_size,)}
        return {**shapes, **dict(self.conditioning)}

    def input_dtypes(self) -> dict[str, torch.dtype]:
        """torch dtype of every input: float32 for `x_t`, `t`, `weights`; the network dtype for conditioning."""
        return {name: torch.float32 if name in FLOAT32_INPUTS else self.torch_dtype for name in self.input_names}

    def output_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, *self.state_shape)

    def profile_shapes(self, batch: int) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """TensorRT optimization profile for batch `batch`: name -> (min, opt, max), all equal (static)."""
        return {name: (shape, shape, shape) for name, shape in self.input_shapes(batch).items()}

    def sample_inputs(
        self, batch: int = 2, device: str | torch.device = "cpu", seed: int = 0
    ) -> tuple[torch.Tensor, ...]:
        """Deterministic inputs in `input_names` order (tracing, parity tests, engine warm-up)."""
        generator = torch.Generator().manual_seed(seed)
        shapes, dtypes = self.input_shapes(batch), self.input_dtypes()
        values = {
            "x_t": torch.randn(shapes["x_t"], generator=generator),
            "t": torch.tensor([500.0]),
            # DDIM: a typical row; K > 0: every block that row plus small history weights
            "weights": torch.tensor([1.02, -0.3, 0.2])
            if not self.history
            else torch.tensor(
                [[1.02, -0.3, 0.2] + [0.1 * (j + 1) for j in range(self.history)]] * (1 + self.history)
            ).reshape(-1),
        }
        for name, shape in self.conditioning:
            values[name] = torch.randn(shape, generator=generator)
        return tuple(values[name].to(device=device, dtype=dtypes[name]) for name in self.input_names)


def dtype_name(dtype: str | torch.dtype) -> str:
    """'fp32' / 'fp16' for a name or a torch dtype. Raises ValueError for anything else."""
    for name, value in DTYPES.items():
        if dtype in (name, value):
            return name
    raise ValueError(f"dtype {dtype!r}: the engine exports fp32 or fp16 (torch.float32 / torch.float16)")


class StepGraph(nn.Module):
    """The module the exporter traces: `forward` is `GuidedDenoiser.step` (no second definition)."""

    def __init__(self, denoiser) -> None:
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x_t, t, weights, *conditioning):
        """state (B, (1 + K) * C, h, w) float32, t (1,) float32, weights ((1 + K) * (3 + K),) float32,
        conditioning -> the next state, float32."""
        return self.denoiser.step(x_t, t, weights, *conditioning)


# --- cache key ---------------------------------------------------------------------------------


def export_versions() -> dict[str, str]:
    """Versions that change an exported graph: torch, onnx, diffusers."""
    import diffusers  # heavy: diffusers and onnx load only when a graph is exported
    import onnx

    return {"torch": torch.__version__, "onnx": onnx.__version__, "diffusers": diffusers.__version__}


def cache_key(spec: ExportSpec, denoiser_fingerprint: str, versions: dict[str, str]) -> str:
    """sha256 of the spec, the denoiser's fingerprint (weights + rule structure), the library versions
    and the export format: everything that changes the exported graph."""
    payload = {
        "format": EXPORT_FORMAT,
        "spec": dataclasses.asdict(spec),
        "denoiser": denoiser_fingerprint,
        "versions": versions,
    }
    # batch_sizes only shape TensorRT profiles, never the ONNX graph: leave them out of the ONNX key
    payload["spec"].pop("batch_sizes")
    if not spec.history:  # DDIM's graph is unchanged by the history field: its cached exports stay valid
        payload["spec"].pop("history")
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# --- export ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportedModel:
    """An exported network: `path` (model.onnx, with model.onnx.data beside it when external), its spec and meta."""

    path: Path
    spec: ExportSpec
    meta: dict


def export_onnx(module: nn.Module, spec: ExportSpec, path: str | Path, *, external_data: bool | None = None) -> Path:
    """Trace `module` with the TorchScript-based exporter (`dynamo=False`) into `path`.

    Args:
        module: a `StepGraph` (or any module taking `spec.input_names`), on the device and in the dtype of `spec` (fp16 tracing
            usually needs CUDA).
        spec: names, dynamic axes, opset and sample inputs.
        path: the .onnx file to write (its folder is created).
        external_data: store weights in `<path>.data` beside the graph; None = only when the
            parameters exceed 2 GB (the protobuf limit).

    Returns:
        `path`.

    Raises:
        RuntimeError: the export failed (the message names the spec).
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    device = next(module.parameters()).device
    nbytes = sum(p.numel() * p.element_size() for p in module.parameters())
    external = nbytes > PROTOBUF_LIMIT * 0.95 if external_data is None else external_data
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        raw = Path(scratch) / ONNX_FILE
        register_symbolics(spec.opset)  # aten::rms_norm (FLUX.1's query / key norms) at opset 17
        try:
            with torch.no_grad(), warnings.catch_warnings(), traceable_rotary():
                warnings.simplefilter("ignore")  # tracer warnings about Python-side shape checks
                torch.onnx.export(
                    module,
                    spec.sample_inputs(2, device),
                    str(raw),
                    dynamo=False,
                    input_names=list(spec.input_names),
                    output_names=list(spec.output_names),
                    dynamic_axes=spec.dynamic_axes,
                    opset_version=spec.opset,
                    do_constant_folding=True,
                )
        except Exception as error:  # surface which network failed, keep the cause
            raise RuntimeError(
                f"ONNX export of the denoiser step ({spec.dtype}, opset {spec.opset}) failed: {error}"
            ) from error
        # Re-save once: one graph file, and one external data file when asked (the exporter may
        # otherwise scatter one file per tensor for models above 2 GB).
        for stale in (path, path.with_name(path.name + ".data")):
            stale.unlink(missing_ok=True)
        if external:
            save_with_one_data_file(raw, path)
        else:
            onnx.save_model(onnx.load(str(raw), load_external_data=True), str(path))
    return path


def _graph_tensors(graph):
    """Every tensor a graph holds: initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _graph_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _graph_tensors(subgraph)


def save_with_one_data_file(source: str | Path, path: str | Path, *, size_threshold: int = 1024) -> Path:
    """Save the ONNX model at `source` as `path` with every tensor above `size_threshold` bytes in `<path>.data`.

    The tensors' bytes are streamed one at a time, from `source`'s external data files (the exporter
    writes one per tensor above 2 GB) or from the graph itself, so memory never holds a second copy
    of the weights (`onnx.load(..., load_external_data=True)` then `onnx.save_model` would: 3.4 GB
    for an SD 1.x UNet). Offsets are 4 KiB-aligned, as onnx's own writer aligns them for mmap.

    Returns:
        `path`.
    """
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    source, path = Path(source), Path(path)
    model = onnx.load(str(source), load_external_data=False)
    data_name = path.name + ".data"
    offset = 0
    with open(path.with_name(data_name), "wb") as data:
        for tensor in _graph_tensors(model.graph):
            if uses_external_data(tensor):
                info = ExternalDataInfo(tensor)
                with open(source.parent / info.location, "rb") as handle:
                    handle.seek(info.offset or 0)
                    payload = handle.read(info.length) if info.length else handle.read()
            elif len(tensor.raw_data) > size_threshold:
                payload = tensor.raw_data
            else:
                continue
            padding = -offset % 4096
            data.write(b"\0" * padding)
            offset += padding
            data.write(payload)
            del tensor.external_data[:]
            for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(payload)))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            tensor.data_location = onnx.TensorProto.EXTERNAL
            tensor.ClearField("raw_data")
            offset += len(payload)
    onnx.save_model(model, str(path))
    return path


def export_cached(
    denoiser,
    spec: ExportSpec,
    cache_dir: str | Path,
    *,
    external_data: bool | None = None,
) -> ExportedModel:
    """The export of `denoiser`'s step graph: reused when its meta.json matches the key, else (re)built.

    Args:
        denoiser: the `GuidedDenoiser`, on the device and in the dtype the export should trace in.
        spec: from `ExportSpec.of`.
        cache_dir: the run's cache folder (`RunConfig.cache_dir`); exports go to its `onnx/` sub-folder.
        external_data: see `export_onnx`.

    Returns:
        `ExportedModel`; `meta` holds key, spec, the denoiser's fingerprint and structure, versions,
        file sizes and whether it was `reused`.

    Raises:
        RuntimeError: the export failed.
    """
    fingerprint, versions = denoiser.fingerprint, export_versions()
    key = cache_key(spec, fingerprint, versions)
    folder = Path(cache_dir) / "onnx" / f"denoiser-{spec.dtype}-{key[:16]}"
    meta = read_valid_meta(folder, key)
    if meta is not None:
        logger.info("reusing the ONNX export %s", folder)
        return ExportedModel(folder / ONNX_FILE, spec, {**meta, "reused": True})
    if folder.exists():
        logger.warning("ONNX export %s is stale or incomplete; exporting again", folder)
        shutil.rmtree(folder)
    logger.info(
        "exporting the %s denoiser step (%s) to %s (once; later runs reuse it)", denoiser.rule.name, spec.dtype, folder
    )
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; a shared cache should stay readable
    try:
        export_onnx(StepGraph(denoiser).eval(), spec, staging / ONNX_FILE, external_data=external_data)
        meta = {
            "format": EXPORT_FORMAT,
            "key": key,
            "spec": dataclasses.asdict(spec),
            "denoiser_fingerprint": fingerprint,
            "structure": denoiser.structure,
            "versions": versions,
            "files": {p.name: p.stat().st_size for p in sorted(staging.iterdir())},
            "pair_sources": _jsonable(getattr(denoiser.pair, "sources", {})),
        }
        (staging / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        os.replace(staging, folder)  # atomic: a half-written export is never seen as valid
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportedModel(folder / ONNX_FILE, spec, {**meta, "reused": False})


def read_valid_meta(folder: str | Path, key: str) -> dict | None:
    """The folder's meta.json when it matches `key` and every recorded file has its recorded size."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    if meta.get("format") != EXPORT_FORMAT or meta.get("key") != key:
        return None
    for name, size in meta.get("files", {}).items():
        file = folder / name
        if not file.is_file() or file.stat().st_size != size:
            return None
    return meta


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except TypeError:
        return json.loads(json.dumps(value, default=str))
