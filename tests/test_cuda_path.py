"""The fast CUDA path's logic: backend choice, padding, static-shape loops, device images, quiet CLI.

CPU tests run the static-shape loop's eager twin (the same bookkeeping as the CUDA graph path);
`gpu`-marked tests check the graphed loop and the on-device extract against the eager / CPU paths.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from finextract.rules import rule_for
from finextract.sampling import Sampler, pad_batch, resolve_backend, start_latents

CAPTION = "a photo of sks dog"


def test_resolve_backend_auto_per_device():
    assert resolve_backend("auto", "cpu") == "onnxruntime"
    assert resolve_backend("auto", "cuda") == "torch" and resolve_backend("auto", "cuda:1") == "torch"
    assert resolve_backend("tensorrt", "cuda") == "tensorrt" and resolve_backend("torch", "cpu") == "torch"
    with pytest.raises(ValueError, match="expected auto or one of"):
        resolve_backend("jax", "cpu")


def test_pad_batch():
    x = torch.randn(3, 4, 2, 2)
    padded = pad_batch(x, 5)
    assert padded.shape == (5, 4, 2, 2) and torch.equal(padded[:3], x) and not padded[3:].any()
    assert pad_batch(x, 3) is x
    with pytest.raises(ValueError, match="exceeds the static batch 2"):
        pad_batch(x, 2)


@pytest.mark.parametrize("pair_name, method", [("dreambooth_pair", "finextract"), ("lora_pair", "finextract")])
def test_static_loop_equals_eager_loop_with_padding(request, pair_name, method):
    """The static-shape loop (the CUDA graph path's bookkeeping, eager on a CPU) == the eager loop."""
    pair = request.getfixturevalue(pair_name)
    sampler = Sampler(pair, rule_for(method, pair.kind), CAPTION, steps=4, static_batch=4)
    assert not sampler.cuda_graphs  # a CPU run never takes the graph path
    x_T = start_latents([0, 1, 2], sampler.latent_shape)
    eager = sampler.denoise(x_T)
    static = sampler.denoise_static(x_T)  # padded to 4
    assert static.shape == eager.shape == (3, 4, 16, 16)
    # the fused update's weights are precomputed in float64: equal to float32 rounding (|x| ~ 10)
    assert torch.allclose(static, eager, rtol=1e-5, atol=1e-5)
    assert (eager - x_T).abs().max().item() > 1e-2  # the loop moved the latents
    loop = sampler.static_loop(3)
    assert loop.static_x.shape[0] == 4 and loop.mode == "eager" and loop.eager_reason == "not a CUDA device"
    # one loop per static shape: batches up to 4 share it, a larger batch gets its own
    assert sampler.static_loop(4) is loop and len(sampler._loops) == 1
    big = sampler.denoise_static(start_latents(range(6), sampler.latent_shape))
    assert len(sampler._loops) == 2 and sampler.static_loop(6).static_x.shape[0] == 6
    assert torch.allclose(big[:3], eager, rtol=1e-5, atol=1e-5)  # image i depends on seed i only


def test_graphed_loop_step_by_step_equals_run(dreambooth_pair):
    """`prepare` + `step(i)` (what the bench times) walks the same schedule as `run`."""
    sampler = Sampler(dreambooth_pair, rule_for("cfg", "dreambooth"), CAPTION, steps=3, static_batch=2)
    loop = sampler.static_loop(2)
    x_T = start_latents([7, 8], sampler.latent_shape)
    with torch.inference_mode():
        expected = loop.run(x_T)
        loop.prepare(x_T)
        for index in range(3):
            loop.step(index)
        assert torch.equal(loop.static_x, expected)
    with pytest.raises(ValueError, match="static batch"):
        loop.prepare(start_latents([1], sampler.latent_shape))


def test_sampler_non_finite_in_static_loop_is_reported(dreambooth_pair):
    from finextract.engine.backends.base import Prediction

    from finextract.sampling import NonFiniteError

    sampler = Sampler(dreambooth_pair, rule_for("direct", "dreambooth"), CAPTION, steps=2, static_batch=2)

    class NaNBackend:
        def predict(self, x_t, t):
            return Prediction(torch.full_like(x_t, float("nan")), None, 1.0, 0.0)

    sampler.backend = NaNBackend()
    with pytest.raises(NonFiniteError, match="2-step DDIM loop"):
        sampler.denoise_static(start_latents([0], sampler.latent_shape))


def test_generate_device_images_and_option_plumbing(dreambooth_pair, tmp_path):
    """`images_on_device` returns the same images (here the device is the CPU), resumed chunks included;
    `cuda_graphs` is recorded in the manifest's last run, not in the config (it must not block a resume)."""
    from finextract.generate import generate

    out = tmp_path / "gen"
    first = generate(dreambooth_pair, CAPTION, 3, steps=2, batch_size=2, out=out, progress=False, backend="torch")
    again = generate(
        dreambooth_pair,
        CAPTION,
        3,
        steps=2,
        batch_size=2,
        out=out,
        progress=False,
        backend="torch",
        images_on_device=True,
        cuda_graphs=False,
    )
    assert torch.equal(first.images, again.images) and again.images.device.type == "cpu"
    assert first.manifest["last_run"]["cuda_graphs"] is True and again.manifest["last_run"]["cuda_graphs"] is False
    assert again.manifest["config"]["backend"] == "torch"


def test_generate_auto_backend_records_resolved_name(dreambooth_pair):
    from finextract.generate import generate

    result = generate(dreambooth_pair, CAPTION, 2, steps=2, batch_size=2, progress=False, backend="auto")
    assert result.manifest["config"]["backend"] == "onnxruntime"  # the CPU choice
    reference = generate(dreambooth_pair, CAPTION, 2, steps=2, batch_size=2, progress=False, backend="torch")
    assert (result.images.int() - reference.images.int()).abs().max().item() <= 1  # ONNX parity (< 1e-4 per step)


def test_pair_to_casts_only_when_needed(dreambooth_pair):
    """No diffusers "should be kept in float32" warning for a placement that changes nothing."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    diffusers_logger = logging.getLogger("diffusers.models.modeling_utils")
    diffusers_logger.addHandler(handler)
    try:
        dreambooth_pair.to("cpu", torch.float32, vae_dtype=torch.float32)
    finally:
        diffusers_logger.removeHandler(handler)
    assert not [r for r in records if "float32" in r.getMessage()]
    assert dreambooth_pair.base_unet.dtype == torch.float32


def test_cli_quiets_only_empty_fp32_warning():
    from finextract.cli import _NoOpCastWarning

    noise = logging.LogRecord(
        "diffusers",
        logging.WARNING,
        "",
        0,
        "There are modules in X that should be kept in float32: []. Casting directly ...",
        None,
        None,
    )
    real = logging.LogRecord(
        "diffusers",
        logging.WARNING,
        "",
        0,
        "There are modules in X that should be kept in float32: ['norm']. Casting directly ...",
        None,
        None,
    )
    assert _NoOpCastWarning().filter(noise) is False and _NoOpCastWarning().filter(real) is True


def test_cli_cuda_graphs_flag_parses():
    from finextract.cli import build_parser

    parser = build_parser()
    base = ["--base", "b", "--finetuned", "f", "--caption", "c", "--n0", "1", "--out", "o"]
    for command in ("generate", "extract"):
        args = parser.parse_args([command, *base])
        assert args.cuda_graphs is True and args.backend == "auto"
        assert parser.parse_args([command, *base, "--no-cuda-graphs"]).cuda_graphs is False


# ------------------------------------------------------------------------------------ GPU --


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("pair_name", ["dreambooth_pair", "lora_pair"])
def test_graphed_loop_equals_eager_loop_on_cuda(request, pair_name, dtype):
    pair = copy.deepcopy(request.getfixturevalue(pair_name))
    rule = rule_for("finextract", pair.kind)
    graphed = Sampler(pair, rule, CAPTION, steps=6, device="cuda", dtype=dtype, static_batch=4)
    x_T = start_latents([0, 1, 2], graphed.latent_shape)
    with torch.inference_mode():
        eager = graphed.denoise(x_T)
        static = graphed.denoise_static(x_T)  # padded to 4, one graph replay per step
    assert graphed.cuda_graphs and graphed.static_loop(3).mode == "graph", graphed.static_loop(3).eager_reason
    tolerance = 1e-4 if dtype == "fp32" else 2e-2
    assert torch.allclose(static, eager, rtol=tolerance, atol=tolerance)
    unet = pair.base_unet
    assert unet.dtype == {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.gpu
def test_extract_device_path_equals_cpu_path(dreambooth_pair):
    """Images generated on CUDA stay there; SSCD + clustering on them == on their CPU copy; and the
    CUDA images match the CPU generation to within rounding."""
    from finextract.extract import cluster_images
    from finextract.generate import generate
    from finextract.sscd import load_embedder

    gpu_pair = copy.deepcopy(dreambooth_pair)
    on_gpu = generate(
        gpu_pair,
        CAPTION,
        12,
        steps=4,
        batch_size=8,
        device="cuda",
        backend="torch",
        progress=False,
        images_on_device=True,
    ).images
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.uint8
    on_cpu = generate(
        copy.deepcopy(dreambooth_pair),
        CAPTION,
        12,
        steps=4,
        batch_size=8,
        device="cpu",
        backend="torch",
        progress=False,
    ).images
    assert (on_gpu.cpu().int() - on_cpu.int()).abs().max().item() <= 2
    gpu_result = cluster_images(on_gpu, 2, load_embedder(device="cuda"))
    cpu_result = cluster_images(on_gpu.cpu(), 2, load_embedder(device="cpu"))
    assert gpu_result.indices == cpu_result.indices and gpu_result.cliques == cpu_result.cliques
    assert abs(gpu_result.threshold - cpu_result.threshold) < 1e-6
    assert (gpu_result.images == cpu_result.images).all()
