"""The onnxruntime backend against the torch backend (the reference), for every rule and both kinds of pair."""

from __future__ import annotations

import pytest
import torch

from finextract.engine.backends import get_backend_factory
from finextract.engine.backends.ort_backend import OnnxRuntimeBackend, providers_for
from finextract.engine.conditioning import encode_conditioning
from finextract.engine.config import RunConfig
from finextract.engine.denoiser import GuidedDenoiser
from finextract.rules import METHODS, rule_for
from tests import tolerances
from tests.steps import assert_step_matches, backends, step_row

CAPTION = "a photo of sks dog"


@pytest.fixture(scope="session")
def ort_config(tmp_path_factory):
    return RunConfig.resolve(device="cpu", backend="onnxruntime", threads=1, cache_dir=tmp_path_factory.mktemp("ort"))


def _backends(pair, rule, config):
    return backends(OnnxRuntimeBackend, pair, rule, config, CAPTION)


@pytest.mark.parametrize("pair_name", ["dreambooth_pair", "lora_pair"])
@pytest.mark.parametrize("method", METHODS)
def test_step_matches_torch(request, ort_config, pair_name, method):
    pair = request.getfixturevalue(pair_name)
    rule = rule_for(method, pair.kind)
    ours, reference = _backends(pair, rule, ort_config)
    assert_step_matches(ours, reference, pair.base_unet, pair, rule)


@pytest.mark.parametrize("scheduler", ["dpmpp-2m", "unipc"])
def test_multistep_step_matches_torch(dreambooth_pair, ort_config, scheduler):
    """The K = 1 / K = 2 export (the state packs x_t and the history) steps as the torch backend does."""
    rule = rule_for("finextract", "dreambooth")
    ours, reference = _backends(dreambooth_pair, rule, ort_config.replace(scheduler=scheduler))
    assert ours.spec.state_shape == (4 * (1 + ours.spec.history), 16, 16) and ours.spec.history > 0
    assert_step_matches(ours, reference, dreambooth_pair.base_unet, dreambooth_pair, rule, scheduler)


def test_batch_size_can_change_between_calls(lora_pair, ort_config):
    rule = rule_for("finextract", "lora")
    backend, _ = _backends(lora_pair, rule, ort_config)
    x_t = torch.randn(5, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    t, weights = step_row(lora_pair, rule, 40)
    full = backend.step(x_t, t, weights)
    part = backend.step(x_t[:2].clone(), t, weights)
    bound = 2 * float(weights[1:].abs().sum()) * tolerances.network(lora_pair.base_unet, full)
    assert (full[:2] - part).abs().max().item() <= bound


def test_registry_and_errors(dreambooth_pair, ort_config):
    assert get_backend_factory("onnxruntime") is OnnxRuntimeBackend
    rule = rule_for("finextract", "dreambooth")
    denoiser = GuidedDenoiser(dreambooth_pair, rule)
    with pytest.raises(ValueError, match="1 conditioning tensors"):
        OnnxRuntimeBackend(denoiser, encode_conditioning(dreambooth_pair, rule, CAPTION)[:1], ort_config)
    with pytest.raises(ValueError, match="lacks fp16 kernels"):
        OnnxRuntimeBackend(denoiser, (), RunConfig(device="cpu", dtype="fp16", backend="onnxruntime"))
    with pytest.raises(ValueError, match="--backend 'jax'"):
        get_backend_factory("jax")


def test_missing_gpu_provider_says_what_to_install():
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider; the error path cannot be reached")
    with pytest.raises(RuntimeError, match="pip install onnxruntime-gpu"):
        providers_for("cuda")
    assert providers_for("cpu") == ["CPUExecutionProvider"]


@pytest.mark.parametrize("pair_name", ["dreambooth_pair", "lora_pair"])
def test_generate_end_to_end_matches_torch(request, ort_config, pair_name):
    """A small run through `generate`: the same uint8 images from the torch and onnxruntime backends."""
    from finextract.generation import generate

    pair = request.getfixturevalue(pair_name)
    options = dict(method="finextract", steps=4, batch_size=3, seed=7, progress=False)
    ours = generate(pair, CAPTION, 3, config=ort_config, **options)
    reference = generate(pair, CAPTION, 3, config=ort_config.replace(backend="torch"), **options)
    assert ours.images.shape == reference.images.shape == (3, 32, 32, 3)
    tolerances.assert_same_images(ours.images, reference.images)


@pytest.mark.gpu
def test_cuda_io_binding_matches_torch(dreambooth_pair, ort_config):
    """CUDA provider with I/O binding on torch's stream, fp32, against the torch backend on CUDA."""
    import copy

    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime here has no CUDA provider: pip install onnxruntime-gpu")
    config = ort_config.replace(device="cuda")
    pair = copy.deepcopy(dreambooth_pair).place(config)
    rule = rule_for("finextract", "dreambooth")
    ours, reference = _backends(pair, rule, config)
    t, weights = (v.cuda() for v in step_row(pair, rule))
    x_t = torch.randn(4, 4, 16, 16, device="cuda")
    result = ours.step(x_t, t, weights)
    assert result.device.type == "cuda"
    expected = reference.step(x_t, t, weights)
    bound = 2 * float(weights[1:].abs().sum()) * tolerances.network(pair.base_unet, expected)
    assert (result - expected).abs().max().item() <= bound
