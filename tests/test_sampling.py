"""The torch backend's fused calls and the sampler, against separate UNet calls and diffusers."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from finextract.engine.backends.base import Prediction
from finextract.engine.backends.torch_backend import TorchBackend
from finextract.engine.lora import merge_lora
from finextract.kernels.guidance_ddim import guided_ddim_step

from finextract.rules import rule_for
from finextract.sampling import NonFiniteError, Sampler, encode_text, make_scheduler, resolve_dtype, start_latents

CAPTION = "a photo of sks dog"


class ForwardCounter:
    """Counts forwards and the batch sizes each UNet sees."""

    def __init__(self, *modules):
        self.batches: list[int] = []
        self.handles = [m.register_forward_pre_hook(self._hook) for m in modules]

    def _hook(self, module, args):
        self.batches.append(args[0].shape[0])

    def close(self):
        for handle in self.handles:
            handle.remove()


def _batched(embedding, x_t):
    return embedding.expand(x_t.shape[0], -1, -1)


def _one_step_by_hand(unets, embeddings, rule, x_t, t, scheduler):
    """DDIMScheduler.step on eps = sum(coef * separate UNet call), the definition of one step."""
    eps = sum(
        term.coef * unets[term.model](x_t, t, encoder_hidden_states=_batched(embeddings[term.key], x_t)).sample
        for term in rule.terms
    )
    return scheduler.step(eps, t, x_t, eta=0.0).prev_sample


def _one_fused_step(backend, x_t, t, scheduler):
    stride = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    prev = int(t) - stride
    alpha_prev = scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod
    prediction = backend.predict(x_t, t)
    assert isinstance(prediction, Prediction)
    return guided_ddim_step(
        x_t,
        prediction.eps_a,
        prediction.eps_b,
        prediction.coef_a,
        prediction.coef_b,
        scheduler.alphas_cumprod[t].item(),
        float(alpha_prev),
    )


@pytest.mark.parametrize(
    "method, params, forwards",
    [
        ("finextract", {"w": 3.0, "k": -0.3}, [2, 2]),  # Eq. 13 with k != 0: two UNets back to back
        ("finextract-uncond", {"w": 2.0}, [2, 2]),
        ("cfg", {"w": 3.0}, [4]),  # one forward on 2B
        ("direct", {}, [2]),
    ],
)
@torch.inference_mode()
def test_dreambooth_step_equals_separate_unet_calls(dreambooth_pair, method, params, forwards):
    pair = dreambooth_pair
    rule = rule_for(method, "dreambooth", **params)
    embeddings = encode_text(pair, rule, CAPTION)
    backend = TorchBackend(pair, rule, embeddings)
    scheduler = make_scheduler(pair.scheduler_config, 50)
    x_t = start_latents([0, 1], (4, 16, 16))
    t = scheduler.timesteps[10]
    counter = ForwardCounter(pair.base_unet, pair.finetuned_unet)
    fused = _one_fused_step(backend, x_t, t, scheduler)
    counter.close()
    assert counter.batches == forwards
    unets = {"base": pair.base_unet, "finetuned": pair.finetuned_unet}
    expected = _one_step_by_hand(unets, embeddings, rule, x_t, t, scheduler)
    assert (fused - expected).abs().max().item() < 1e-5
    assert (fused - x_t).abs().max().item() > 1e-3  # the step moved: not a trivially equal pair


@pytest.mark.parametrize("method", ["finextract", "cfg"])
@torch.inference_mode()
def test_lora_fused_batch_equals_base_and_merged_calls(lora_pair, tiny_base, method):
    """ONE forward on 2B with gates (0 | 1) == base UNet without LoRA and a LoRA-merged copy."""
    pair = lora_pair
    rule = rule_for(method, "lora", k=0.1) if method == "finextract" else rule_for(method, "lora")
    embeddings = encode_text(pair, rule, CAPTION)
    backend = TorchBackend(pair, rule, embeddings)
    scheduler = make_scheduler(pair.scheduler_config, 50)
    x_t = start_latents([5, 6, 7], (4, 16, 16))
    t = scheduler.timesteps[25]
    counter = ForwardCounter(pair.base_unet)
    prediction = backend.predict(x_t, t)
    counter.close()
    assert counter.batches == [6]
    base_unet = tiny_base["unet"]  # the same seed-0 weights, never adapted
    merged = merge_lora(copy.deepcopy(base_unet), pair.unet_lora)
    unets = {"base": base_unet, "finetuned": merged}
    for term, eps in zip(rule.terms, (prediction.eps_a, prediction.eps_b)):
        separate = unets[term.model](x_t, t, encoder_hidden_states=_batched(embeddings[term.key], x_t)).sample
        assert (eps - separate).abs().max().item() < 1e-5
    fused = _one_fused_step(backend, x_t, t, scheduler)
    expected = _one_step_by_hand(unets, embeddings, rule, x_t, t, scheduler)
    assert (fused - expected).abs().max().item() < 1e-5
    # the adapters matter (else this test would pass trivially) and are off outside the fused call
    plain = base_unet(x_t, t, encoder_hidden_states=_batched(embeddings[rule.terms[0].key], x_t)).sample
    assert (prediction.eps_a - plain).abs().max().item() > 1e-4
    assert (
        pair.base_unet(x_t, t, encoder_hidden_states=_batched(embeddings[rule.terms[0].key], x_t)).sample - plain
    ).abs().max() < 1e-5


def test_encode_text_uses_each_sides_encoder(dreambooth_pair):
    rule = rule_for("finextract", "dreambooth")
    embeddings = encode_text(dreambooth_pair, rule, CAPTION)
    assert set(embeddings) == {("finetuned", "prompt"), ("base", "empty")}
    tokens = dreambooth_pair.base_tokenizer(CAPTION, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.inference_mode():
        expected = dreambooth_pair.finetuned_text_encoder(tokens)[0]
    assert embeddings[("finetuned", "prompt")].shape == (1, 77, 32)
    assert torch.allclose(embeddings[("finetuned", "prompt")], expected)


def test_start_latents_are_per_seed():
    batch = start_latents([10, 11, 12, 13], (4, 16, 16))
    assert batch.shape == (4, 4, 16, 16) and batch.dtype == torch.float32
    assert torch.equal(start_latents([12], (4, 16, 16))[0], batch[2])
    assert not torch.equal(batch[0], batch[1])


def test_sampler_images_and_batch_split(dreambooth_pair):
    sampler = Sampler(dreambooth_pair, rule_for("finextract", "dreambooth"), CAPTION, steps=4)
    images = sampler([0, 1, 2, 3])
    assert images.shape == (4, 32, 32, 3) and images.dtype == torch.uint8 and images.device.type == "cpu"
    assert images.float().std() > 1.0  # not a constant image
    split = torch.cat([sampler([0]), sampler([1, 2, 3])])
    assert_same_images(split, images)


def assert_same_images(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal up to BLAS/oneDNN blocking, which varies with the batch size: |diff| <= 1 level, rare.

    The latents agree to ~1e-5 across batch sizes; after rounding to uint8 a handful of values can
    land on the other side of a .5 boundary, never further.
    """
    assert a.shape == b.shape and a.dtype == b.dtype == torch.uint8
    diff = (a.int() - b.int()).abs()
    assert diff.max().item() <= 1
    assert (diff > 0).float().mean().item() < 0.01


def test_dtype_rules():
    assert resolve_dtype("fp32", "cpu") is torch.float32
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_dtype("fp16", "cpu")
    with pytest.raises(ValueError, match="expected one of"):
        resolve_dtype("int8", "cpu")


def test_non_finite_step_retries_in_fp32(tokenizer_dir, caplog):
    """A NaN in reduced precision reruns the batch in fp32 with a warning; in fp32 it is an error."""
    from finextract.engine.pair import ModelPair

    from finextract.zoo import tiny_components

    parts = tiny_components(seed=3, tokenizer_folder=tokenizer_dir)
    pair = ModelPair(
        kind="dreambooth",
        base_unet=parts["unet"],
        finetuned_unet=copy.deepcopy(parts["unet"]),
        unet_lora=None,
        base_text_encoder=parts["text_encoder"],
        finetuned_text_encoder=parts["text_encoder"],
        base_tokenizer=parts["tokenizer"],
        vae=parts["vae"],
        scheduler_config=dict(parts["scheduler"].config),
    )
    sampler = Sampler(pair, rule_for("direct", "dreambooth"), CAPTION, steps=3)
    clean = sampler([4, 5])

    class NaNBackend:  # overflows like an fp16 UNet would
        def predict(self, x_t, t):
            return Prediction(torch.full_like(x_t, float("nan")), None, 1.0, 0.0)

    sampler.backend = NaNBackend()
    with pytest.raises(NonFiniteError, match="in fp32"):
        sampler([4, 5])
    sampler.dtype = torch.bfloat16  # pretend the run is in bf16 (CPU refuses it for real runs)
    with caplog.at_level(logging.WARNING, logger="finextract.sampling"):
        retried = sampler([4, 5])
    assert "retrying seeds 4..5 in fp32" in caplog.text
    assert torch.equal(retried, clean)
    assert pair.base_unet.dtype == torch.bfloat16 and pair.vae.dtype == torch.float32  # cast back after
