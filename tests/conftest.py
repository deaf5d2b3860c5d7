"""Shared fixtures: tiny seeded SD components and model pairs (no downloads), GPU skipping."""

from __future__ import annotations

import os

import pytest

from tests.pairs import pair_from_parts

# Deterministic and robust on a 2-core machine with busy neighbours: one thread unless told otherwise.
os.environ.setdefault("FINEXTRACT_THREADS", "1")
# ONNX exports (`--backend auto` on a CPU) go to a per-session temporary cache, never ~/.cache.
if "FINEXTRACT_CACHE" not in os.environ:
    import tempfile

    os.environ["FINEXTRACT_CACHE"] = tempfile.mkdtemp(prefix="finextract-test-cache-")


def pytest_configure(config):
    from finextract.engine.config import set_threads

    set_threads()


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


#: The files that take longest (each over a minute of one worker on the CI machine kind), in that
#: order. `make test` hands whole files to its two workers in collection order, so these go first: a
#: long file collected last would run alone at the end while the other core idles.
SLOW_FIRST = ("test_quality.py", "test_fleet.py", "test_families.py", "test_readme.py", "test_adapters.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable: order within a file kept
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine (run bench/device_check.sh on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    from finextract.zoo.tokenizers import write_tokenizer

    return write_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tiny_base(tokenizer_dir):
    """Random tiny SD components (seed 0): unet, vae, text_encoder, tokenizer, scheduler."""
    from finextract.zoo.models import tiny_components

    return tiny_components(seed=0, tokenizer_folder=tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_finetuned(tokenizer_dir):
    """Another random set (seed 100) standing in for a full fine-tune of `tiny_base`."""
    from finextract.zoo.models import tiny_components

    return tiny_components(seed=100, tokenizer_folder=tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """The random tiny zoo, SD 1.x only (`finextract.zoo.build.build_zoo`, seed 0), built once per session."""
    from finextract.zoo.build import build_zoo

    return build_zoo(tmp_path_factory.mktemp("zoo"), seed=0, families=())


@pytest.fixture(scope="session")
def family_zoo(tmp_path_factory):
    """The random tiny zoo with every family (sd2/, sd2-v/, sdxl/, altdiffusion/ beside SD 1.x's)."""
    from finextract.zoo.build import build_zoo

    return build_zoo(tmp_path_factory.mktemp("family_zoo"), seed=0)


def random_unet_lora(unet, rank: int = 4, seed: int = 0, alpha: float | None = None) -> dict:
    """Random LoRA adapters on every attention projection (to_q, to_k, to_v, to_out.0) of `unet`."""
    import torch
    from torch import nn

    from finextract.engine.pair import LoRALayer

    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for name, module in unet.named_modules():
        if isinstance(module, nn.Linear) and name.endswith((".to_q", ".to_k", ".to_v", ".to_out.0")):
            down = torch.randn(rank, module.in_features, generator=generator) * 0.1
            up = torch.randn(module.out_features, rank, generator=generator) * 0.1
            layers[name] = LoRALayer(down=down, up=up, alpha=float(alpha if alpha is not None else rank))
    return layers


@pytest.fixture(scope="session")
def dreambooth_pair(tiny_base, tiny_finetuned):
    """A DreamBooth-kind ModelPair built directly from components (fine-tuned text encoder too)."""
    return pair_from_parts(
        tiny_base, finetuned_unet=tiny_finetuned["unet"], finetuned_text_encoder=tiny_finetuned["text_encoder"]
    )


@pytest.fixture(scope="session")
def lora_pair(tokenizer_dir):
    """A LoRA-kind ModelPair: its own copy of the seed-0 base UNet plus random rank-4 adapters."""
    from finextract.zoo.models import tiny_components

    base = tiny_components(seed=0, tokenizer_folder=tokenizer_dir)
    return pair_from_parts(base, unet_lora=random_unet_lora(base["unet"]))
