"""The sampler (conditioning, the DDIM loop, decode) and the run configuration it reads, on CPU and (GPU) CUDA."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

from finextract.engine.config import RunConfig
from finextract.engine.ddim import NonFiniteError
from finextract.engine.sampler import Sampler, start_latents
from finextract.rules import rule_for
from tests.pairs import pair_from_parts
from tests.tolerances import assert_same_images

CAPTION = "a photo of sks dog"


def torch_config(**options) -> RunConfig:
    return RunConfig.resolve(device="cpu", backend="torch", threads=1, **options)


def test_start_latents_are_per_seed():
    batch = start_latents([10, 11, 12, 13], (4, 16, 16))
    assert batch.shape == (4, 4, 16, 16) and batch.dtype == torch.float32
    assert torch.equal(start_latents([12], (4, 16, 16))[0], batch[2])
    assert not torch.equal(batch[0], batch[1])


def test_sampler_images_and_batch_split(dreambooth_pair):
    sampler = Sampler(dreambooth_pair, rule_for("finextract", "dreambooth"), CAPTION, torch_config(steps=4))
    images = sampler([0, 1, 2, 3])
    assert images.shape == (4, 32, 32, 3) and images.dtype == torch.uint8 and images.device.type == "cpu"
    assert images.float().std() > 1.0  # not a constant image
    split = torch.cat([sampler([0]), sampler([1, 2, 3])])
    assert_same_images(split, images)  # image i depends on seed i only, whatever the batch
    assert sampler.loop(1) is sampler.loop(7)  # one eager loop serves every batch size
    assert sampler.loop(1).mode == "eager" and not sampler.use_graph


def test_sampler_refuses_a_pair_placed_elsewhere(dreambooth_pair):
    with pytest.raises(ValueError, match=r"pair\.place\(config\)"):
        Sampler(dreambooth_pair, rule_for("direct", "dreambooth"), CAPTION, RunConfig(device="cpu", dtype="bf16"))


def test_non_finite_step_retries_in_fp32(tokenizer_dir, caplog):
    """A NaN in reduced precision reruns the batch on an fp32 copy with a warning; in fp32 it is an error."""
    from finextract.zoo.models import tiny_components

    parts = tiny_components(seed=3, tokenizer_folder=tokenizer_dir)
    pair = pair_from_parts(parts, finetuned_unet=copy.deepcopy(parts["unet"]))
    rule = rule_for("direct", "dreambooth")
    clean = Sampler(pair, rule, CAPTION, torch_config(steps=3))([4, 5])

    class NaNBackend:  # overflows like an fp16 UNet would
        capturable, forwards_per_step = False, 1

        def step(self, x_t, t, weights):
            return torch.full_like(x_t, float("nan"))

    sampler = Sampler(pair, rule, CAPTION, torch_config(steps=3))
    sampler.backend = NaNBackend()
    with pytest.raises(NonFiniteError, match="in fp32"):
        sampler([4, 5])
    # a bf16 run (refused on a CPU by RunConfig.resolve, so built by hand here) falls back to fp32
    pair.to("cpu", torch.bfloat16)
    reduced = Sampler(pair, rule, CAPTION, RunConfig(device="cpu", dtype="bf16", backend="torch", steps=3))
    reduced.backend = NaNBackend()
    with caplog.at_level(logging.WARNING, logger="finextract.engine.sampler"):
        retried = reduced([4, 5])
    assert "retrying seeds 4..5 in fp32" in caplog.text
    # the retry is the fp32 run of (an fp32 copy of) the bf16 weights: the same computation, equal images
    expected = Sampler(copy.deepcopy(pair).to("cpu", torch.float32), rule, CAPTION, torch_config(steps=3))([4, 5])
    assert torch.equal(retried, expected) and clean.shape == retried.shape
    assert pair.base_unet.dtype == torch.bfloat16 and pair.vae.dtype == torch.float32  # the pair is left as is


def test_pair_to_casts_only_when_needed(dreambooth_pair):
    """No diffusers "should be kept in float32" warning for a placement that changes nothing."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    diffusers_logger = logging.getLogger("diffusers.models.modeling_utils")
    diffusers_logger.addHandler(handler)
    try:
        dreambooth_pair.place(torch_config())
    finally:
        diffusers_logger.removeHandler(handler)
    assert not [r for r in records if "float32" in r.getMessage()]
    assert dreambooth_pair.base_unet.dtype == torch.float32


def test_prepare_unet_for_cuda_keeps_the_function(tiny_base):
    from finextract.engine.pair import prepare_unet_for_cuda

    unet = copy.deepcopy(tiny_base["unet"])
    generator = torch.Generator().manual_seed(4)
    sample = torch.randn(2, 4, 16, 16, generator=generator)
    text = torch.randn(2, 5, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        before = unet(sample, 10, encoder_hidden_states=text).sample
        prepared = prepare_unet_for_cuda(unet)  # works on a CPU too: SDPA attention, channels-last weights
        after = prepared(sample, 10, encoder_hidden_states=text).sample
    assert prepared is unet and not any(p.requires_grad for p in unet.parameters())
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    from tests import tolerances

    assert (after - before).abs().max().item() <= tolerances.network(unet, before)


def test_generate_device_images_and_option_plumbing(dreambooth_pair, tmp_path):
    """`images_on_device` returns the same images (here the device is the CPU), resumed chunks included;
    `cuda_graphs` is recorded in the manifest's run record, not in the resume key."""
    from finextract.generation import generate

    out = tmp_path / "gen"
    options = dict(steps=2, batch_size=2, out=out, progress=False, config=torch_config())
    first = generate(dreambooth_pair, CAPTION, 3, **options)
    again = generate(dreambooth_pair, CAPTION, 3, images_on_device=True, cuda_graphs=False, **options)
    assert torch.equal(first.images, again.images) and again.images.device.type == "cpu"
    assert first.manifest["run"]["cuda_graphs"] is True and again.manifest["run"]["cuda_graphs"] is False
    assert again.manifest["config"]["backend"] == "torch" and again.manifest["run"]["batch_size"] == 2


def test_generate_auto_backend_records_resolved_name(dreambooth_pair):
    from finextract.generation import generate

    result = generate(dreambooth_pair, CAPTION, 2, steps=2, batch_size=2, progress=False, backend="auto", threads=1)
    assert result.manifest["config"]["backend"] == "openvino"  # the CPU choice
    reference = generate(dreambooth_pair, CAPTION, 2, progress=False, config=torch_config(steps=2, batch_size=2))
    assert_same_images(result.images, reference.images)


def test_cli_flags_parse_into_one_run_config():
    from finextract.cli import build_parser
    from finextract.commands.options import run_config_from

    parser = build_parser()
    base = ["--base", "b", "--finetuned", "f", "--caption", "c", "--n0", "1", "--out", "o"]
    for command in ("generate", "extract"):
        args = parser.parse_args([command, *base])
        assert args.cuda_graphs is True and args.backend == "auto"
        assert parser.parse_args([command, *base, "--no-cuda-graphs"]).cuda_graphs is False
        config = run_config_from(parser.parse_args([command, *base, "--steps", "7", "--threads", "1"]))
        assert (config.steps, config.threads, config.backend, config.device) == (7, 1, "openvino", "cpu")


# ------------------------------------------------------------------------------------ GPU --


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("pair_name", ["dreambooth_pair", "lora_pair"])
def test_graphed_loop_equals_eager_loop_on_cuda(request, pair_name, dtype):
    """The padded, captured batch == the same batch run eagerly, unpadded (padding changes GEMM blocking)."""
    from tests import tolerances

    config = RunConfig.resolve(device="cuda", dtype=dtype, backend="torch", steps=6, batch_size=4)
    pair = copy.deepcopy(request.getfixturevalue(pair_name)).place(config)
    rule = rule_for("finextract", pair.kind)
    graphed = Sampler(pair, rule, CAPTION, config)
    eager = Sampler(pair, rule, CAPTION, config.replace(cuda_graphs=False))
    x_T = start_latents([0, 1, 2], graphed.latent_shape)
    static, reference = graphed.denoise(x_T), eager.denoise(x_T)
    assert graphed.loop(3).mode == "graph", graphed.loop(3).eager_reason
    # each step's UNet outputs may differ by the network bound (another batch -> other blocking), in
    # fp16 by the storage rounding 2^-11 of every activation instead of u; weighted by the table's
    # largest output weight and accumulated over the 6 steps
    unit = tolerances.U if dtype == "fp32" else 2.0**-11
    layers, longest = tolerances.network_size(pair.base_unet)
    largest = float(graphed.weights[:, 1:].abs().max())
    bound = 6 * largest * layers * longest * unit * reference.abs().max().item()
    assert (static - reference).abs().max().item() <= bound
    assert pair.base_unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.gpu
def test_extract_device_path_equals_cpu_path(dreambooth_pair):
    """Images generated on CUDA stay there; SSCD + clustering on them == on their CPU copy; and the
    CUDA images match the CPU generation to within rounding."""
    from finextract.extraction import cluster_images
    from finextract.generation import generate
    from finextract.sscd import load_embedder

    options = dict(steps=4, batch_size=8, progress=False)
    config = RunConfig.resolve(device="cuda", backend="torch")
    gpu_pair = copy.deepcopy(dreambooth_pair).place(config)
    on_gpu = generate(gpu_pair, CAPTION, 12, config=config, images_on_device=True, **options).images
    assert on_gpu.device.type == "cuda" and on_gpu.dtype == torch.uint8
    on_cpu = generate(dreambooth_pair, CAPTION, 12, config=torch_config(), **options).images
    assert (on_gpu.cpu().int() - on_cpu.int()).abs().max().item() <= 2
    gpu_result = cluster_images(on_gpu, 2, load_embedder(device="cuda"))
    cpu_result = cluster_images(on_gpu.cpu(), 2, load_embedder(device="cpu"))
    assert gpu_result.indices == cpu_result.indices and gpu_result.cliques == cpu_result.cliques
    assert abs(gpu_result.threshold - cpu_result.threshold) < 1e-6
    assert (gpu_result.images == cpu_result.images).all()
