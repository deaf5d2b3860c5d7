"""The onnxruntime backend against the torch reference, for every rule and both kinds of pair."""

from __future__ import annotations

import pytest
import torch
from finextract.engine.backends import get_backend_factory
from finextract.engine.backends.ort_backend import OnnxRuntimeBackend, providers_for
from finextract.engine.backends.torch_backend import TorchBackend
from finextract.kernels.guidance_ddim import guided_ddim_step

from finextract.rules import METHODS, rule_for
from finextract.sampling import encode_text

CAPTION = "a photo of sks dog"


@pytest.fixture(scope="session")
def ort_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("ort_cache")


def _combined(prediction):
    eps = prediction.coef_a * prediction.eps_a
    return eps if prediction.eps_b is None else eps + prediction.coef_b * prediction.eps_b


@pytest.mark.parametrize("pair_name", ["dreambooth_pair", "lora_pair"])
@pytest.mark.parametrize("method", METHODS)
def test_prediction_and_ddim_step_match_torch(request, ort_cache, pair_name, method):
    pair = request.getfixturevalue(pair_name)
    rule = rule_for(method, pair.kind)
    embeddings = encode_text(pair, rule, CAPTION)
    ort_backend = OnnxRuntimeBackend(pair, rule, embeddings, cache_dir=ort_cache, threads=1)
    torch_backend = TorchBackend(pair, rule, embeddings)
    x_t = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(801)
    ours, reference = ort_backend.predict(x_t, t), torch_backend.predict(x_t, t)
    assert ours.eps_a.shape == x_t.shape and ours.eps_a.dtype == torch.float32 and ours.eps_b is None
    if len(rule.terms) == 2:
        assert (ours.coef_a, ours.coef_b) == (1.0, 0.0)
    assert (_combined(ours) - _combined(reference)).abs().max() < 1e-4
    # one whole DDIM step (alpha_prod values of SD 1.x at t = 801 and 781)
    step = dict(alpha_prod_t=0.0769, alpha_prod_t_prev=0.0914)
    x_ours = guided_ddim_step(x_t, ours.eps_a, ours.eps_b, ours.coef_a, ours.coef_b, **step)
    x_ref = guided_ddim_step(x_t, reference.eps_a, reference.eps_b, reference.coef_a, reference.coef_b, **step)
    assert (x_ours - x_ref).abs().max() < 1e-4


def test_coefficients_are_inputs_not_constants(dreambooth_pair, ort_cache):
    """Two rules that differ only in w, k share one export and still give their own eps."""
    embeddings = encode_text(dreambooth_pair, rule_for("finextract", "dreambooth"), CAPTION)
    a = OnnxRuntimeBackend(
        dreambooth_pair, rule_for("finextract", "dreambooth", w=3.0, k=-0.02), embeddings, cache_dir=ort_cache
    )
    b = OnnxRuntimeBackend(
        dreambooth_pair, rule_for("finextract", "dreambooth", w=7.0, k=0.5), embeddings, cache_dir=ort_cache
    )
    assert a.exported.path == b.exported.path
    x_t, t = torch.randn(2, 4, 16, 16), torch.tensor(501)
    reference = TorchBackend(dreambooth_pair, rule_for("finextract", "dreambooth", w=7.0, k=0.5), embeddings).predict(
        x_t, t
    )
    assert (b.predict(x_t, t).eps_a - _combined(reference)).abs().max() < 1e-4
    assert (a.predict(x_t, t).eps_a - b.predict(x_t, t).eps_a).abs().max() > 1e-2


def test_batch_size_can_change_between_calls(lora_pair, ort_cache):
    rule = rule_for("finextract", "lora")
    embeddings = encode_text(lora_pair, rule, CAPTION)
    backend = OnnxRuntimeBackend(lora_pair, rule, embeddings, cache_dir=ort_cache)
    x_t = torch.randn(5, 4, 16, 16)
    full = backend.predict(x_t, torch.tensor(41)).eps_a
    part = backend.predict(x_t[:2].clone(), torch.tensor(41)).eps_a
    assert (full[:2] - part).abs().max() < 1e-5


def test_registry_and_errors(dreambooth_pair, ort_cache):
    assert get_backend_factory("onnxruntime") is OnnxRuntimeBackend
    rule = rule_for("finextract", "dreambooth")
    embeddings = encode_text(dreambooth_pair, rule, CAPTION)
    with pytest.raises(KeyError, match="encode_text"):
        OnnxRuntimeBackend(
            dreambooth_pair, rule, {k: v for k, v in embeddings.items() if k[0] == "base"}, cache_dir=ort_cache
        )
    with pytest.raises(ValueError, match="float32"):
        OnnxRuntimeBackend(dreambooth_pair, rule, embeddings, dtype=torch.float16, cache_dir=ort_cache)


def test_missing_gpu_provider_says_what_to_install():
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider; the error path cannot be reached")
    with pytest.raises(RuntimeError, match="pip install onnxruntime-gpu"):
        providers_for("cuda")
    assert providers_for("cpu") == ["CPUExecutionProvider"]


@pytest.mark.parametrize("pair_name", ["dreambooth_pair", "lora_pair"])
def test_generate_end_to_end_matches_torch(request, ort_cache, monkeypatch, pair_name):
    """A small run through `generate`: the same uint8 images from the torch and onnxruntime backends."""
    from finextract.generate import generate

    monkeypatch.setenv("FINEXTRACT_CACHE", str(ort_cache))  # generate builds the backend with the default cache
    dreambooth_pair = request.getfixturevalue(pair_name)
    kwargs = dict(method="finextract", steps=4, batch_size=3, seed=7, progress=False)
    ours = generate(dreambooth_pair, CAPTION, 3, backend="onnxruntime", **kwargs)
    reference = generate(dreambooth_pair, CAPTION, 3, backend="torch", **kwargs)
    assert ours.images.shape == reference.images.shape == (3, 32, 32, 3)
    difference = (ours.images.int() - reference.images.int()).abs()
    assert difference.max() <= 1 and (difference == 0).float().mean() > 0.99


@pytest.mark.gpu
def test_cuda_io_binding_matches_torch(dreambooth_pair, ort_cache):
    """CUDA provider with I/O binding on torch's stream, fp32, against the torch backend on CUDA."""
    import copy

    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime here has no CUDA provider: pip install onnxruntime-gpu")
    pair = copy.deepcopy(dreambooth_pair).to("cuda")
    rule = rule_for("finextract", "dreambooth")
    embeddings = encode_text(pair, rule, CAPTION)
    ours = OnnxRuntimeBackend(pair, rule, embeddings, device="cuda", cache_dir=ort_cache)
    x_t = torch.randn(4, 4, 16, 16, device="cuda")
    prediction = ours.predict(x_t, torch.tensor(501, device="cuda"))
    assert prediction.eps_a.device.type == "cuda"
    reference = TorchBackend(pair, rule, embeddings, device="cuda").predict(x_t, torch.tensor(501, device="cuda"))
    assert (prediction.eps_a - _combined(reference)).abs().max() < 1e-3
