"""ONNX export of the guidance networks, one spec per network, cached by a key over everything.

Three networks serve every guidance rule (`eps = coef_a * eps_a + coef_b * eps_b`, SPEC section 1):

- `unet`: one UNet alone, for one-term rules (direct text-to-image). For a LoRA pair the adapters
  are explicit low-rank branches with the gate fixed on, so no merged copy of the weights is made.
- `dreambooth_pair`: both UNets and the combination in one graph; the coefficients are inputs, so
  one graph serves every `w`, `k`. When both terms use the same UNet (CFG) it runs once on 2B.
- `lora_pair`: one UNet on a 2B batch whose LoRA branches are scaled by a per-sample `lora_gate`
  input (engine/lora.py), so the base and fine-tuned halves share weights and run in one call.

An `ExportSpec` (STYLE item 6) holds names, shapes, dynamic axes, TensorRT profiles and sample
inputs; export, engine build and both runtimes read it. Exports live under a cache folder, keyed by a
hash of the weights, the spec and the library versions, with a `meta.json` checked on load.
"""

from __future__ import annotations

import copy
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
from typing import Literal

import torch
from torch import nn

from .lora import LoRAGate, inject_lora, lora_gate_of

logger = logging.getLogger(__name__)

EXPORT_FORMAT = 1  # bump when wrappers or names change: old cache entries then stop matching
ONNX_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
META_FILE = "meta.json"
PROTOBUF_LIMIT = 2 * 1024**3  # ONNX protobuf files cannot exceed 2 GB: weights go to external data
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}

Kind = Literal["unet", "dreambooth_pair", "lora_pair"]
Model = Literal["base", "finetuned"]


@dataclass(frozen=True)
class ExportSpec:
    """Everything that defines one exported network: names, shapes, dtypes, axes, profiles.

    Attributes:
        kind: "unet", "dreambooth_pair" or "lora_pair" (module docstring).
        models: the model of each rule term, e.g. ("finetuned", "base") for FineXtract (Eq. 13);
            one entry for kind "unet", two otherwise.
        latent_shape: (C, h, w) of `x_t`, e.g. (4, 64, 64) for SD 1.x at 512 px.
        text_shape: (L, D) of one text embedding, e.g. (77, 768) for SD 1.x.
        dtype: "fp32" or "fp16" (weights, `x_t`, text embeddings and `eps`); `t`, the coefficients
            and `lora_gate` are always float32, and the combination is accumulated in float32.
        opset: ONNX opset, >= 17.
        batch_sizes: the batch sizes B TensorRT builds one static optimization profile for; the
            ONNX graph itself has a dynamic batch.
    """

    kind: Kind
    models: tuple[Model, ...]
    latent_shape: tuple[int, int, int]
    text_shape: tuple[int, int]
    dtype: str = "fp32"
    opset: int = 17
    batch_sizes: tuple[int, ...] = (8, 16)

    def __post_init__(self) -> None:
        if self.kind not in ("unet", "dreambooth_pair", "lora_pair"):
            raise ValueError(f"ExportSpec.kind {self.kind!r}: expected 'unet', 'dreambooth_pair' or 'lora_pair'")
        expected = 1 if self.kind == "unet" else 2
        if len(self.models) != expected or any(m not in ("base", "finetuned") for m in self.models):
            raise ValueError(
                f"ExportSpec.models {self.models!r}: kind {self.kind!r} needs {expected} of 'base'/'finetuned'"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"ExportSpec.dtype {self.dtype!r}: expected one of {', '.join(DTYPES)}")
        if self.opset < 17:
            raise ValueError(f"ExportSpec.opset {self.opset}: needs 17 or newer (LayerNormalization, SDPA patterns)")
        if not self.batch_sizes or any(int(b) < 1 for b in self.batch_sizes):
            raise ValueError(f"ExportSpec.batch_sizes {self.batch_sizes!r}: need positive batch sizes, e.g. (8, 16)")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def input_names(self) -> tuple[str, ...]:
        if self.kind == "unet":
            return ("x_t", "t", "text_embedding")
        gate = ("lora_gate",) if self.kind == "lora_pair" else ()
        return ("x_t", "t", "text_embedding_a", "text_embedding_b") + gate + ("coef_a", "coef_b")

    @property
    def output_names(self) -> tuple[str, ...]:
        return ("eps",)

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes = {"x_t": {0: "batch"}, "t": {0: "batch"}, "eps": {0: "batch"}}
        if self.kind == "lora_pair":
            axes["lora_gate"] = {0: "batch2"}
        return axes

    def input_shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        """Shape of every input at batch size `batch` (text embeddings stay (1, L, D))."""
        shapes = {"x_t": (batch, *self.latent_shape), "t": (batch,)}
        for name in self.input_names:
            if name.startswith("text_embedding"):
                shapes[name] = (1, *self.text_shape)
            elif name == "lora_gate":
                shapes[name] = (2 * batch,)
            elif name.startswith("coef_"):
                shapes[name] = (1,)
        return shapes

    def input_dtypes(self) -> dict[str, torch.dtype]:
        """torch dtype of every input: the network dtype for `x_t` and embeddings, else float32."""
        return {
            name: (self.torch_dtype if name == "x_t" or name.startswith("text_embedding") else torch.float32)
            for name in self.input_names
        }

    def output_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, *self.latent_shape)

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
            "t": torch.randint(0, 1000, (batch,), generator=generator).float(),
            "coef_a": torch.tensor([3.0]),
            "coef_b": torch.tensor([-2.02]),
            "lora_gate": torch.cat([torch.ones(batch), torch.zeros(batch)]),
        }
        for name in self.input_names:
            if name.startswith("text_embedding"):
                values[name] = torch.randn(shapes[name], generator=generator)
        return tuple(values[name].to(device=device, dtype=dtypes[name]) for name in self.input_names)


def spec_for(
    pair,
    rule,
    *,
    dtype: str | torch.dtype = "fp32",
    opset: int = 17,
    batch_sizes: tuple[int, ...] = (8, 16),
) -> ExportSpec:
    """The network that evaluates `rule` on `pair` in one call.

    Args:
        pair: a `ModelPair` ("dreambooth" or "lora").
        rule: a `GuidanceRule` (1 or 2 terms, each with `.model` "base"/"finetuned").
        dtype: "fp32"/"fp16" or torch.float32/torch.float16.
        opset: ONNX opset (>= 17).
        batch_sizes: TensorRT profile batch sizes.

    Returns:
        The `ExportSpec`; shapes come from the base UNet's config (latent C, sample size,
        cross_attention_dim) and the tokenizer's `model_max_length`.

    Raises:
        ValueError: a rule with no or more than two terms, or an unknown dtype.
    """
    dtype = dtype_name(dtype)
    models = tuple(term.model for term in rule.terms)
    if not 1 <= len(models) <= 2:
        raise ValueError(f"rule {getattr(rule, 'name', rule)!r} has {len(models)} terms; the engine fuses 1 or 2")
    config = pair.base_unet.config
    size = config.sample_size if isinstance(config.sample_size, int) else tuple(config.sample_size)
    h, w = (size, size) if isinstance(size, int) else size
    length = int(getattr(pair.base_tokenizer, "model_max_length", 77))
    text_shape = (length, int(config.cross_attention_dim))
    if len(models) == 1:
        kind = "unet"
    else:
        kind = "lora_pair" if pair.unet_lora else "dreambooth_pair"
    return ExportSpec(
        kind, models, (int(config.in_channels), int(h), int(w)), text_shape, dtype, opset, tuple(batch_sizes)
    )


def constant_inputs(
    spec: ExportSpec, rule, text_embeddings: dict, device: str | torch.device
) -> dict[str, torch.Tensor]:
    """The inputs of `spec`'s network that stay fixed for a whole run, made once on `device`.

    Args:
        spec: the network's `ExportSpec` (from `spec_for(pair, rule)`).
        rule: the `GuidanceRule`; term i feeds `text_embedding` (kind "unet") or `text_embedding_a/_b`.
        text_embeddings: `finextract.sampling.encode_text`'s output, (model, caption) -> (1, L, D).
        device: where the network runs.

    Returns:
        Name -> contiguous tensor: the text embeddings (1, L, D) in the network dtype and, for the
        two-term kinds, `coef_a` / `coef_b` as float32 (1,) (e.g. Eq. 13: w, 1 - w + k).

    Raises:
        KeyError: `text_embeddings` lacks an embedding a term needs.
    """
    dtypes = spec.input_dtypes()
    names = ("text_embedding",) if spec.kind == "unet" else ("text_embedding_a", "text_embedding_b")
    constants = {}
    for name, term in zip(names, rule.terms):
        if term.key not in text_embeddings:
            raise KeyError(f"text_embeddings has no {term.key}; build it with encode_text(pair, rule, caption)")
        constants[name] = text_embeddings[term.key].to(device=device, dtype=dtypes[name]).contiguous()
    if spec.kind != "unet":
        for name, coef in zip(("coef_a", "coef_b"), rule.coefs):
            constants[name] = torch.tensor([coef], dtype=torch.float32, device=device)
    return constants


def lora_gate(rule, batch: int) -> torch.Tensor:
    """The `lora_gate` input (2B,) float32 on the CPU: term a's model on the first B rows, term b's on
    the rest (1 = adapters on, the fine-tuned model; 0 = the base model)."""
    values = [1.0 if term.model == "finetuned" else 0.0 for term in rule.terms]
    return torch.tensor(values, dtype=torch.float32).repeat_interleave(batch)


def dtype_name(dtype: str | torch.dtype) -> str:
    """'fp32' / 'fp16' for a name or a torch dtype. Raises ValueError for anything else."""
    for name, value in DTYPES.items():
        if dtype in (name, value):
            return name
    raise ValueError(f"dtype {dtype!r}: the engine exports fp32 or fp16 (torch.float32 / torch.float16)")


# --- wrappers: small adapters around the diffusers UNet (STYLE item 2) -------------------------


def _combine(eps_a, eps_b, coef_a, coef_b):
    """coef_a * eps_a + coef_b * eps_b accumulated in float32 (the kernels' contract), cast back."""
    eps = coef_a * eps_a.float() + coef_b * eps_b.float()
    return eps.to(eps_a.dtype)


def _eps(unet, x_t, t, text_embedding):
    encoder_hidden_states = text_embedding.expand(x_t.shape[0], -1, -1)
    return unet(x_t, t, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class UNetEps(nn.Module):
    """eps = UNet(x_t, t, text_embedding); with a LoRA gate, the adapters are on for every sample."""

    def __init__(self, unet: nn.Module, gate: LoRAGate | None = None) -> None:
        super().__init__()
        self.unet, self.gate = unet, gate

    def forward(self, x_t, t, text_embedding):
        """x_t (B, 4, h, w), t (B,) float32 timesteps, text_embedding (1, L, D) -> eps (B, 4, h, w)."""
        if self.gate is None:
            return _eps(self.unet, x_t, t, text_embedding)
        self.gate.value = torch.ones_like(t)
        try:
            return _eps(self.unet, x_t, t, text_embedding)
        finally:
            self.gate.value = None


class DreamBoothPairEps(nn.Module):
    """coef_a * UNet_a(x_t, t, e_a) + coef_b * UNet_b(x_t, t, e_b); one 2B call when UNet_a is UNet_b."""

    def __init__(self, unet_a: nn.Module, unet_b: nn.Module) -> None:
        super().__init__()
        self.unet_a = unet_a
        self.unet_b = None if unet_b is unet_a else unet_b

    def forward(self, x_t, t, text_embedding_a, text_embedding_b, coef_a, coef_b):
        """x_t (B, 4, h, w), t (B,) float32, embeddings (1, L, D), coef_a / coef_b (1,) float32 -> combined eps (B, 4, h, w)."""
        batch = x_t.shape[0]
        if self.unet_b is None:
            text = torch.cat([text_embedding_a.expand(batch, -1, -1), text_embedding_b.expand(batch, -1, -1)])
            eps = _eps(self.unet_a, torch.cat([x_t, x_t]), torch.cat([t, t]), text)
            eps_a, eps_b = eps[:batch], eps[batch:]
        else:
            eps_a = _eps(self.unet_a, x_t, t, text_embedding_a)
            eps_b = _eps(self.unet_b, x_t, t, text_embedding_b)
        return _combine(eps_a, eps_b, coef_a, coef_b)


class LoRAPairEps(nn.Module):
    """One gated-LoRA UNet call on [x_t; x_t]: `lora_gate` (2B,) picks base (0) or fine-tune (1) per sample."""

    def __init__(self, unet: nn.Module, gate: LoRAGate) -> None:
        super().__init__()
        self.unet, self.gate = unet, gate

    def forward(self, x_t, t, text_embedding_a, text_embedding_b, lora_gate, coef_a, coef_b):
        """As `DreamBoothPairEps.forward`, plus `lora_gate` (2B,): 0 = pretrained, 1 = fine-tuned per sample."""
        batch = x_t.shape[0]
        text = torch.cat([text_embedding_a.expand(batch, -1, -1), text_embedding_b.expand(batch, -1, -1)])
        self.gate.value = lora_gate
        try:
            eps = _eps(self.unet, torch.cat([x_t, x_t]), torch.cat([t, t]), text)
        finally:
            self.gate.value = None
        return _combine(eps[:batch], eps[batch:], coef_a, coef_b)


def _gated_unet(pair) -> tuple[nn.Module, LoRAGate]:
    """A copy of the base UNet with the pair's LoRA as gated branches (the pair's UNet is untouched)."""
    unet = copy.deepcopy(pair.base_unet)
    gate = lora_gate_of(unet)
    if gate is None:
        gate = inject_lora(unet, pair.unet_lora)
    return unet, gate


def _plain_unet(pair, model: Model) -> nn.Module:
    if model == "finetuned" and pair.finetuned_unet is not None:
        return pair.finetuned_unet
    return pair.base_unet


def build_module(pair, spec: ExportSpec) -> nn.Module:
    """The torch module whose `forward(*spec.sample_inputs())` the export traces (eval mode).

    Raises:
        ValueError: `spec.kind` "lora_pair" for a pair without UNet LoRA adapters.
    """
    has_lora = bool(pair.unet_lora)
    if spec.kind == "unet":
        (model,) = spec.models
        if has_lora and model == "finetuned":
            unet, gate = _gated_unet(pair)
            module = UNetEps(unet, gate)
        else:
            module = UNetEps(_plain_unet(pair, model))
    elif spec.kind == "dreambooth_pair":
        module = DreamBoothPairEps(_plain_unet(pair, spec.models[0]), _plain_unet(pair, spec.models[1]))
    else:
        if not has_lora:
            raise ValueError("spec kind 'lora_pair' needs a LoRA pair with UNet adapters (pair.unet_lora)")
        module = LoRAPairEps(*_gated_unet(pair))
    return module.eval()


# --- cache key ---------------------------------------------------------------------------------


def weights_hash(module: nn.Module) -> str:
    """sha256 over every parameter and buffer of `module`: names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict(keep_vars=False).items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def export_versions() -> dict[str, str]:
    """Versions that change an exported graph: torch, onnx, diffusers."""
    import diffusers
    import onnx

    return {"torch": torch.__version__, "onnx": onnx.__version__, "diffusers": diffusers.__version__}


def cache_key(spec: ExportSpec, weights: str, versions: dict[str, str]) -> str:
    """sha256 of the spec, the weights hash, the library versions and the export format (STYLE item 8)."""
    payload = {"format": EXPORT_FORMAT, "spec": dataclasses.asdict(spec), "weights": weights, "versions": versions}
    # batch_sizes only shape TensorRT profiles, never the ONNX graph: leave them out of the ONNX key
    payload["spec"].pop("batch_sizes")
    if spec.kind == "lora_pair":  # the lora_gate input picks each half's model: one graph serves every rule
        payload["spec"].pop("models")
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def default_cache_dir() -> Path:
    """`$FINEXTRACT_CACHE/onnx`, else `~/.cache/finextract/onnx`."""
    root = os.environ.get("FINEXTRACT_CACHE") or Path.home() / ".cache" / "finextract"
    return Path(root) / "onnx"


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
        module: from `build_module`, on the device and in the dtype of `spec` (fp16 tracing
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
        try:
            with torch.no_grad(), warnings.catch_warnings():
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
                f"ONNX export of {spec.kind} ({spec.dtype}, opset {spec.opset}) failed: {error}"
            ) from error
        # Re-save once: one graph file, and one external data file when asked (the exporter may
        # otherwise scatter one file per tensor for models above 2 GB).
        model = onnx.load(str(raw), load_external_data=True)
        for stale in (path, path.with_name(path.name + ".data")):
            stale.unlink(missing_ok=True)
        if external:
            onnx.save_model(
                model,
                str(path),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=path.name + ".data",
                size_threshold=1024,
            )
        else:
            onnx.save_model(model, str(path))
    return path


def export_cached(
    pair,
    spec: ExportSpec,
    cache_dir: str | Path | None = None,
    *,
    external_data: bool | None = None,
) -> ExportedModel:
    """The export of `spec` for `pair`: reused when its meta.json matches the key, else (re)built.

    Args:
        pair: the `ModelPair`, on the device and in the dtype the export should trace in.
        spec: from `spec_for`.
        cache_dir: folder holding one sub-folder per export (default `default_cache_dir()`).
        external_data: see `export_onnx`.

    Returns:
        `ExportedModel`; `meta` holds key, spec, weights hash, versions, file sizes and
        whether it was `reused`.

    Raises:
        RuntimeError: the export failed.
    """
    module = build_module(pair, spec)
    weights, versions = weights_hash(module), export_versions()
    key = cache_key(spec, weights, versions)
    folder = Path(cache_dir or default_cache_dir()) / f"{spec.kind}-{spec.dtype}-{key[:16]}"
    meta = read_valid_meta(folder, key)
    if meta is not None:
        logger.info("reusing ONNX export %s", folder)
        return ExportedModel(folder / ONNX_FILE, spec, {**meta, "reused": True})
    if folder.exists():
        logger.warning("ONNX export %s is stale or incomplete; exporting again", folder)
        shutil.rmtree(folder)
    logger.info("exporting %s (%s) to %s", spec.kind, spec.dtype, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; a shared cache should stay readable
    try:
        export_onnx(module, spec, staging / ONNX_FILE, external_data=external_data)
        meta = {
            "format": EXPORT_FORMAT,
            "key": key,
            "spec": dataclasses.asdict(spec),
            "weights_sha256": weights,
            "versions": versions,
            "files": {p.name: p.stat().st_size for p in sorted(staging.iterdir())},
            "pair_sources": _jsonable(getattr(pair, "sources", {})),
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
