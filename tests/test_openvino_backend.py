"""The OpenVINO backend against the torch backend (the reference): every rule, both kinds of pair, one or two streams."""

from __future__ import annotations

import pytest
import torch

from finextract.engine.backends import get_backend_factory
from finextract.engine.backends.openvino_backend import OpenVINOBackend
from finextract.engine.conditioning import encode_conditioning
from finextract.engine.config import RunConfig
from finextract.engine.denoiser import GuidedDenoiser
from finextract.rules import rule_for
from tests import tolerances
from tests.steps import assert_step_matches, backends, step_bound, step_row

CAPTION = "a photo of sks dog"


@pytest.fixture(scope="session")
def ov_config():
    # the session's export cache (tests/conftest.py): the graphs are those onnxruntime runs, exported once
    return RunConfig.resolve(device="cpu", backend="openvino", threads=1)


def _backends(pair, rule, config):
    return backends(OpenVINOBackend, pair, rule, config, CAPTION)


# the graphs are the onnxruntime backend's (tested for every rule there): one and two UNets, gated or not
@pytest.mark.parametrize(
    "pair_name, method",
    [
        ("dreambooth_pair", "finextract"),
        ("dreambooth_pair", "cfg"),
        ("lora_pair", "finextract"),
        ("lora_pair", "direct"),
    ],
)
def test_step_matches_torch(request, ov_config, pair_name, method):
    pair = request.getfixturevalue(pair_name)
    rule = rule_for(method, pair.kind)
    ours, reference = _backends(pair, rule, ov_config)
    assert_step_matches(ours, reference, reference.denoiser.unets[0], pair, rule)


@pytest.mark.parametrize("scheduler", ["dpmpp-2m", "unipc"])
def test_multistep_step_matches_torch(lora_pair, ov_config, scheduler):
    """The K = 1 / K = 2 graph (the state packs x_t and the history), compiled by OpenVINO, two streams."""
    rule = rule_for("finextract", "lora")
    ours, reference = _backends(lora_pair, rule, ov_config.replace(scheduler=scheduler, threads=2))
    assert_step_matches(ours, reference, reference.denoiser.unets[0], lora_pair, rule, scheduler)


def test_two_streams_split_the_batch(lora_pair, ov_config):
    """threads=2: the batch runs as two concurrent parts (3 + 2 rows here), each row as with one stream."""
    rule = rule_for("finextract", "lora")
    one, reference = _backends(lora_pair, rule, ov_config)
    two, _ = _backends(lora_pair, rule, ov_config.replace(threads=2))
    x_t = torch.randn(5, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    t, weights = step_row(lora_pair, rule, 40)
    bound = step_bound(reference.denoiser.unets[0], reference, x_t, t, weights)
    split, whole = two.step(x_t, t, weights), one.step(x_t, t, weights)
    assert (split - reference.step(x_t, t, weights)).abs().max().item() <= bound
    assert (split - whole).abs().max().item() <= bound
    # another batch size compiles another static shape; a batch of 1 runs on one stream
    assert (two.step(x_t[:1].clone(), t, weights) - whole[:1]).abs().max().item() <= bound


def test_compiled_models_are_cached(dreambooth_pair, ov_config):
    """A second backend of the same pair reuses the ONNX export and imports OpenVINO's compiled model."""
    import os
    from pathlib import Path

    rule = rule_for("finextract", "dreambooth")
    first, _ = _backends(dreambooth_pair, rule, ov_config)
    x_t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    first.step(x_t, *step_row(dreambooth_pair, rule))
    blobs = set(os.listdir(Path(ov_config.cache_dir) / "openvino"))
    second, _ = _backends(dreambooth_pair, rule, ov_config)
    assert second.exported.meta["reused"]
    assert torch.equal(
        second.step(x_t, *step_row(dreambooth_pair, rule)), first.step(x_t, *step_row(dreambooth_pair, rule))
    )
    assert blobs and set(os.listdir(Path(ov_config.cache_dir) / "openvino")) == blobs  # imported, not recompiled


def test_generate_end_to_end_matches_torch(dreambooth_pair, ov_config):
    """A small run through `generate`: the same uint8 images from the torch and OpenVINO backends."""
    from finextract.generation import generate

    options = dict(method="finextract", steps=4, batch_size=3, seed=7, progress=False)
    ours = generate(dreambooth_pair, CAPTION, 3, config=ov_config, **options)
    reference = generate(dreambooth_pair, CAPTION, 3, config=ov_config.replace(backend="torch"), **options)
    tolerances.assert_same_images(ours.images, reference.images)


def test_registry_and_errors(dreambooth_pair, ov_config):
    assert get_backend_factory("openvino") is OpenVINOBackend
    rule = rule_for("finextract", "dreambooth")
    denoiser = GuidedDenoiser(dreambooth_pair, rule)
    with pytest.raises(ValueError, match="1 conditioning tensors"):
        OpenVINOBackend(denoiser, encode_conditioning(dreambooth_pair, rule, CAPTION)[:1], ov_config)
    with pytest.raises(ValueError, match="runs on the CPU"):
        OpenVINOBackend(denoiser, (), RunConfig(device="cuda", backend="openvino"))
    with pytest.raises(ValueError, match="fp32 graphs on the CPU"):
        OpenVINOBackend(denoiser, (), RunConfig(device="cpu", dtype="fp16", backend="openvino"))


def test_missing_openvino_says_what_to_install(monkeypatch):
    import sys

    from finextract.engine.backends.openvino_backend import require_openvino

    monkeypatch.setitem(sys.modules, "openvino", None)  # import fails as if not installed
    with pytest.raises(RuntimeError, match="pip install openvino"):
        require_openvino()
