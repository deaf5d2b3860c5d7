"""Flow-matching training: the noising against diffusers' `FlowMatchEulerDiscreteScheduler.scale_noise`, the
DDPM form against `DDPMScheduler.add_noise`, SD3's caption conditioning against
`StableDiffusion3Pipeline.encode_prompt`, and `finextract finetune` on an SD3 folder: its LoRA file read by
diffusers' `load_lora_weights` and by finextract give the same images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from finextract.engine.sampler import start_latents
from finextract.generation import generate
from finextract.zoo.configs import SD1_SCHEDULER_CONFIG, SD3_SCHEDULER_CONFIG, ZOO_CAPTION


def _flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER_CONFIG)


def test_flow_matching_noising_is_scale_noise_at_logit_normal_sigmas():
    from finextract.objectives import flow_matching_noising

    scheduler = _flow_scheduler()
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(4000, 4, 2, 2, generator=generator), torch.randn(4000, 4, 2, 2, generator=generator)
    x_t, timesteps, target = flow_matching_noising(scheduler, latents, noise, torch.Generator().manual_seed(1))
    assert timesteps.dtype == torch.float32 and target.equal(noise - latents)  # v = eps - x0, exactly
    reference = torch.cat(
        [scheduler.scale_noise(latents[i : i + 1], timesteps[i : i + 1], noise[i : i + 1]) for i in range(0, 4000, 97)]
    )
    # the same float32 products and one sum (in the other order, which is exact), so equal to rounding
    torch.testing.assert_close(x_t[::97], reference, rtol=0, atol=1e-6)
    # logit-normal u has median 1/2: index 500, the shifted sigma 3 s / (1 + 2 s) at s = 1/2 is 0.75. The
    # sample median's standard error at n = 4000 is 1 / (2 f(1/2) sqrt(n)) = 0.005 in u (f(1/2) = 1.60),
    # x dsigma/du = 0.75: 0.004; 0.02 is 5 of them.
    sigmas = timesteps / 1000
    assert abs(sigmas.median().item() - 0.75) < 0.02
    assert sigmas.min() > 0 and sigmas.max() <= 1


def test_ddpm_noising_is_add_noise_and_the_loss_regresses_onto_eps():
    from diffusers import DDPMScheduler

    from finextract.objectives import ddpm_noising, denoising_loss

    scheduler = DDPMScheduler.from_config(SD1_SCHEDULER_CONFIG)
    latents, noise = torch.randn(8, 4, 2, 2), torch.randn(8, 4, 2, 2)
    x_t, timesteps, target = ddpm_noising(scheduler, latents, noise, torch.Generator().manual_seed(0))
    assert target is noise and timesteps.dtype == torch.int64
    assert x_t.equal(scheduler.add_noise(latents, noise, timesteps))

    class Oracle(torch.nn.Module):  # predicts the noise exactly: the loss is 0
        def forward(self, x, t, states):
            alpha = scheduler.alphas_cumprod[t].reshape(-1, 1, 1, 1)
            return type("Out", (), {"sample": (x - alpha.sqrt() * latents) / (1 - alpha).sqrt()})

    generator = torch.Generator().manual_seed(0)
    # the loss draws its noise, then the timesteps, from the generator: an oracle given the same x0 scores ~0
    loss = denoising_loss(Oracle(), scheduler, latents, None, generator)
    assert loss.item() < 1e-8  # float32 (x - a x0) / b against eps: ~1e-7 per element, squared


@pytest.fixture(scope="module")
def sd3_no_t5(tmp_path_factory):
    from finextract.zoo.models import save_pipeline, tiny_components

    components = tiny_components(0, tmp_path_factory.mktemp("sd3") / "tokenizer", family="sd3")
    t5 = components["text_encoder_3"], components["tokenizer_3"]
    components = dict(components, text_encoder_3=None, tokenizer_3=None)
    root = tmp_path_factory.mktemp("sd3_base")
    return components, save_pipeline(components, root / "base"), *t5


@pytest.mark.parametrize("t5", [False, True])
def test_sd3_conditioning_is_the_pipelines(sd3_no_t5, t5):
    from diffusers import StableDiffusion3Pipeline

    from finextract.training_parts import sd3_conditioning

    components = sd3_no_t5[0]
    if t5:
        components = dict(components, text_encoder_3=sd3_no_t5[2], tokenizer_3=sd3_no_t5[3])
    pipeline = StableDiffusion3Pipeline(**components)
    captions = [ZOO_CAPTION, ""]
    names = ("text_encoder", "text_encoder_2", "text_encoder_3")[: 2 + t5]
    with torch.no_grad():
        embeds, _, pooled, _ = pipeline.encode_prompt(captions, captions, captions, do_classifier_free_guidance=False)
        ours = sd3_conditioning(
            [components[name] for name in names],
            [components[name.replace("text_encoder", "tokenizer")] for name in names],
            captions,
            components["transformer"].config.joint_attention_dim,
        )
    # the same modules on the same ids: bit-equal
    assert ours["encoder_hidden_states"].equal(embeds) and ours["pooled_projections"].equal(pooled)


def test_finetune_trains_an_sd3_lora_that_diffusers_and_finextract_read_alike(sd3_no_t5, tmp_path):
    """`finetune` on an SD3 folder: the LoRA file is diffusers' (`load_lora_weights` reads every key), and
    finextract's CFG on the (base, LoRA) pair equals StableDiffusion3Pipeline with that LoRA fused."""
    from diffusers import StableDiffusion3Pipeline

    from finextract.engine.loading import load_model_pair
    from finextract.finetuning import finetune

    base = sd3_no_t5[1]
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    out = finetune(base, list(images), ZOO_CAPTION, out=tmp_path / "lora", method="lora", steps=4, lr=0.05,
                   rank=2, device="cpu", progress=False)  # fmt: skip
    record = json.loads((out / "finetune.json").read_text())
    assert record["base_family"] == "sd3" and record["lora_modules"] == "locon"
    pipeline = StableDiffusion3Pipeline.from_pretrained(base, text_encoder_3=None, tokenizer_3=None)
    pipeline.load_lora_weights(out / "pytorch_lora_weights.safetensors")
    pipeline.fuse_lora()
    pipeline.set_progress_bar_config(disable=True)
    latents = start_latents([0, 1], (16, 16, 16))
    with torch.no_grad():
        theirs = pipeline([ZOO_CAPTION] * 2, negative_prompt=[""] * 2, num_inference_steps=3, guidance_scale=4.0,
                          latents=latents, height=32, width=32, output_type="np").images  # fmt: skip
    theirs = torch.from_numpy((theirs * 255).round().astype(np.uint8))
    pair = load_model_pair(base, out / "pytorch_lora_weights.safetensors")
    assert pair.kind == "lora" and pair.unet_lora  # the gated adapters, not a merged copy
    ours = generate(pair, ZOO_CAPTION, 2, method="cfg", w=4.0, steps=3, scheduler="euler", seed=0, batch_size=2,
                    backend="torch", progress=False).images  # fmt: skip
    # fused W + s B A against the gated W x + s B (A x): the same function in another float32 order, so a
    # pixel may round to the next level; a LoRA read wrongly (or not at all) moves pixels by tens
    assert (ours.int() - theirs.int()).abs().max().item() <= 2
    base_only = generate(pair, ZOO_CAPTION, 2, method="direct", steps=3, scheduler="euler", seed=0, batch_size=2,
                         backend="torch", progress=False).images  # fmt: skip
    assert (base_only.int() - ours.int()).abs().max().item() > 10


def test_finetune_dreambooth_on_sd3_saves_a_pipeline_with_the_trained_transformer(sd3_no_t5, tmp_path):
    from finextract.engine.loading import load_model_pair
    from finextract.finetuning import finetune
    from finextract.training_parts import load_parts

    base = sd3_no_t5[1]
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    out = finetune(base, list(images), ZOO_CAPTION, out=tmp_path / "db", method="dreambooth", steps=4, lr=1e-3,
                   device="cpu", progress=False)  # fmt: skip
    tuned, original = load_parts(out).denoiser, load_parts(base).denoiser
    changed = [not torch.equal(a, b) for a, b in zip(tuned.parameters(), original.parameters())]
    assert all(changed[:3]) and (out / "transformer").is_dir() and not (out / "unet").exists()
    assert json.loads((out / "model_index.json").read_text())["text_encoder_3"] == [None, None]
    pair = load_model_pair(base, out)
    assert pair.family.name == "sd3" and pair.kind == "dreambooth"
    with pytest.raises(ValueError, match="SD3 fine-tunes here train the transformer only"):
        finetune(base, list(images), ZOO_CAPTION, out=tmp_path / "te", train_text_encoder=True, device="cpu")


def test_a_4_channel_sd3_transformer_is_sd3_and_an_inpainting_one_refused():
    from finextract.engine.families import UnknownFamilyError, detect_family

    config = {"_class_name": "SD3Transformer2DModel", "in_channels": 4, "out_channels": 4}
    assert detect_family(None, transformer_config=config).name == "sd3"
    with pytest.raises(UnknownFamilyError, match="takes 33 input channels"):
        detect_family(None, transformer_config=dict(config, in_channels=33, out_channels=16))
