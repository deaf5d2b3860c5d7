"""Adapter files written by the libraries that produce them (LyCORIS, PEFT), with the producer's own
adapted models kept as references.

Each producer adapts deep copies of the base UNet and text encoder, its trainable tensors are moved
off their (mostly zero) initial values by seeded noise, as training would, and its file is saved
the way its users save it (`LycorisNetworkKohya.save_weights`, `PeftModel.save_pretrained`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

# LyCORIS' "full" preset minus the targets of other architectures: its default list holds
# "TimestepEmbedding" beside the name "time_embedding.linear_1", which names one diffusers module twice
LYCORIS_PRESET = """
enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]
text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]
text_encoder_target_name = []
"""

# (case id, LyCORIS algo, options): every type and variant the loader reads from LyCORIS files
LYCORIS_CASES = [
    ("lora", "lora", {}),
    ("locon-tucker", "locon", {"use_tucker": True}),
    ("dora", "locon", {"dora_wd": True}),
    ("dora-input-axis", "locon", {"dora_wd": True, "wd_on_output": False}),
    ("loha", "loha", {}),
    ("loha-tucker", "loha", {"use_tucker": True}),
    ("loha-dora", "loha", {"dora_wd": True}),
    ("lokr", "lokr", {}),
    ("lokr-decomposed", "lokr", {"decompose_both": True, "dim": 2}),  # rank 2: w1 of 64-wide layers is (8, 8)
    ("lokr-tucker", "lokr", {"use_tucker": True, "factor": 4}),
    ("oft", "diag-oft", {}),
    ("oft-constrained-rescaled", "diag-oft", {"constraint": 1e-3, "rescaled": True}),
    ("boft", "boft", {"constraint": 1e-3, "rescaled": True}),
    ("glora", "glora", {}),
    ("full", "full", {}),
    ("lora-norms", "lora", {"train_norm": True}),
]


@dataclass
class Produced:
    """An adapter file and the producing library's own adapted models (references)."""

    path: Path
    unet: torch.nn.Module
    text_encoder: torch.nn.Module


@torch.no_grad()
def _perturb(parameters, seed: int, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(seed)
    for parameter in parameters:
        parameter.add_(scale * torch.randn(parameter.shape, generator=generator).to(parameter.dtype))


def write_lycoris(
    folder: Path, unet, text_encoder, algo: str, options: dict, *, seed: int = 0, name: str | None = None
) -> Produced:
    """A LyCORIS file (kohya layout, `lora_unet_` / `lora_te_` keys) for `algo`, rank 4 (or
    `options["dim"]`), alpha 2 (alpha != rank, so the scale matters), convolutions too."""
    from lycoris.kohya import create_network

    folder.mkdir(parents=True, exist_ok=True)
    preset = folder / "lycoris_preset.toml"
    preset.write_text(LYCORIS_PRESET)
    unet, text_encoder = copy.deepcopy(unet), copy.deepcopy(text_encoder)
    options = dict(options)
    dim = options.pop("dim", 4)
    network = create_network(
        1.0, dim, 2.0, None, text_encoder, unet, algo=algo, preset=str(preset), conv_dim=dim, conv_alpha=2.0, **options
    )
    network.apply_to(text_encoder, unet, apply_text_encoder=True, apply_unet=True)
    _perturb(network.parameters(), seed)
    path = folder / f"{name or algo}.safetensors"
    network.save_weights(str(path), torch.float32, {})
    return Produced(path, unet.eval(), text_encoder.eval())


def write_peft(folder: Path, unet, config, *, seed: int = 0) -> Produced:
    """A PEFT adapter folder (`PeftModel.save_pretrained`) of `config` on the UNet; the references
    are PEFT's own merged models (`merge_and_unload`)."""
    from peft import get_peft_model

    model = get_peft_model(copy.deepcopy(unet), config)
    _perturb([p for n, p in model.named_parameters() if p.requires_grad], seed)
    model.save_pretrained(str(folder))
    merged = model.merge_and_unload().eval()
    return Produced(folder, merged, None)
