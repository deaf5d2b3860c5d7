"""The guided denoiser: one fused call per (pair, rule), against separate UNet calls and diffusers' DDIM step."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from finextract.engine.conditioning import encode_conditioning
from finextract.engine.ddim import DDIMTable, make_scheduler
from finextract.engine.denoiser import GuidedDenoiser
from finextract.engine.lora import GatedLoRA, merge_lora
from finextract.engine.sampler import start_latents
from finextract.rules import rule_for
from tests import tolerances

CAPTION = "a photo of sks dog"


def _hooks(unet) -> int:
    """The gated LoRA hooks a UNet carries."""
    return sum(isinstance(hook, GatedLoRA) for module in unet.modules() for hook in module._forward_hooks.values())


STEPS = 50


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


def separate_outputs(unets: dict, conditioning, rule, x_t, t):
    """Each term's output from its own plain UNet call (no fusion, no gates): the definition."""
    return [
        unets[term.model](x_t, t, encoder_hidden_states=cond.expand(x_t.shape[0], -1, -1)).sample
        for term, cond in zip(rule.terms, conditioning)
    ]


def diffusers_step(scheduler_config, outputs, rule, x_t, t, steps=STEPS):
    """`DDIMScheduler.step` (eta = 0) on the rule's combined output: diffusers' own update."""
    scheduler = make_scheduler(scheduler_config, steps)
    combined = sum(term.coef * output for term, output in zip(rule.terms, outputs))
    return scheduler.step(combined, t, x_t, eta=0.0).prev_sample


def step_tolerance(unet, outputs, rule, weights_row) -> float:
    """Bound on ours - diffusers for one step: each term's UNet output may differ by `tolerances.network`
    (another batch layout), weighted by |w_a|, |w_b| in the update, plus the update's own roundings
    (~12 per element on |x| <= 5: negligible next to it, covered by the factor 2)."""
    w_terms = weights_row[1 : 1 + len(outputs)].abs()
    return 2 * sum(w * tolerances.network(unet, output) for w, output in zip(w_terms.tolist(), outputs))


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
def test_dreambooth_step_equals_separate_unet_calls_and_diffusers(dreambooth_pair, method, params, forwards):
    pair = dreambooth_pair
    rule = rule_for(method, "dreambooth", **params)
    conditioning = encode_conditioning(pair, rule, CAPTION)
    denoiser = GuidedDenoiser(pair, rule)
    table = DDIMTable.from_scheduler_config(pair.scheduler_config, STEPS)
    weights = table.weights(*rule.coefs)
    index = 10
    t, row = table.timesteps_tensor()[index], weights[index]
    x_t = start_latents([0, 1], (4, 16, 16))
    counter = ForwardCounter(pair.base_unet, pair.finetuned_unet)
    fused = denoiser.step(x_t, t, row, *conditioning)
    counter.close()
    assert counter.batches == forwards
    unets = {"base": pair.base_unet, "finetuned": pair.finetuned_unet}
    outputs = separate_outputs(unets, conditioning, rule, x_t, t)
    expected = diffusers_step(pair.scheduler_config, outputs, rule, x_t, table.timesteps[index])
    assert (fused - expected).abs().max().item() <= step_tolerance(pair.base_unet, outputs, rule, row)
    assert (fused - x_t).abs().max().item() > 1e-3  # the step moved: not a trivially equal pair
    # forward() is the combined output the step's update is applied to
    combined = denoiser(x_t, t, *conditioning)
    reference = sum(term.coef * output for term, output in zip(rule.terms, outputs))
    assert (combined - reference).abs().max().item() <= 2 * sum(
        abs(term.coef) * tolerances.network(pair.base_unet, output) for term, output in zip(rule.terms, outputs)
    )


@pytest.mark.parametrize("method", ["finextract", "cfg", "finextract-uncond", "direct"])
@torch.inference_mode()
def test_lora_fused_batch_equals_base_and_merged_calls(lora_pair, tiny_base, method):
    """ONE forward on n*B with gates (1 | 0) == the base UNet without LoRA and a LoRA-merged copy."""
    pair = lora_pair
    rule = rule_for(method, "lora", k=0.1) if method == "finextract" else rule_for(method, "lora")
    conditioning = encode_conditioning(pair, rule, CAPTION)
    denoiser = GuidedDenoiser(pair, rule)
    x_t = start_latents([5, 6, 7], (4, 16, 16))
    t = torch.tensor([501.0])
    counter = ForwardCounter(pair.base_unet)
    outputs = denoiser.term_outputs(x_t, t, *conditioning)
    counter.close()
    assert counter.batches == [3 * len(rule.terms)]
    base_unet = tiny_base["unet"]  # the same seed-0 weights, never adapted
    merged = merge_lora(copy.deepcopy(base_unet), pair.unet_lora)
    unets = {"base": base_unet, "finetuned": merged}
    for output, reference in zip(outputs, separate_outputs(unets, conditioning, rule, x_t, t)):
        # the gated branch adds (alpha/r) up(down(x)) where the merged copy adds it into W: one more
        # product and sum per adapted layer, inside the network bound
        assert (output - reference).abs().max().item() <= tolerances.network(base_unet, reference)
    # the adapters matter (else this test would pass trivially) and are off outside the fused call
    plain = base_unet(x_t, t, encoder_hidden_states=conditioning[0].expand(3, -1, -1)).sample
    finetuned = next(o for term, o in zip(rule.terms, outputs) if term.model == "finetuned")
    assert (finetuned - plain).abs().max().item() > 1e-3
    after = pair.base_unet(x_t, t, encoder_hidden_states=conditioning[0].expand(3, -1, -1)).sample
    assert torch.equal(after, plain)


def test_conditioning_uses_each_sides_encoder_and_tokenizer(dreambooth_pair):
    rule = rule_for("finextract", "dreambooth")
    conditioning = encode_conditioning(dreambooth_pair, rule, CAPTION)
    assert len(conditioning) == 2 and conditioning[0].shape == (1, 77, 32)
    tokenizer = dreambooth_pair.finetuned_tokenizer
    tokens = tokenizer(CAPTION, padding="max_length", max_length=77, return_tensors="pt").input_ids
    empty = dreambooth_pair.base_tokenizer("", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.inference_mode():
        assert torch.equal(conditioning[0], dreambooth_pair.finetuned_text_encoder(tokens)[0])
        assert torch.equal(conditioning[1], dreambooth_pair.base_text_encoder(empty)[0])


def test_long_caption_is_truncated_with_one_warning(dreambooth_pair, caplog):
    rule = rule_for("cfg", "dreambooth")
    long_caption = " ".join(["sks"] * 200)
    with caplog.at_level("WARNING", logger="finextract.engine.conditioning"):
        conditioning = encode_conditioning(dreambooth_pair, rule, long_caption)
    assert caplog.text.count("reads only the first 77") == 1
    assert conditioning[0].shape == (1, 77, 32)


@torch.inference_mode()
def test_building_denoisers_and_backends_leaves_the_pair_unchanged(lora_pair, tmp_path):
    """A LoRA pair is prepared when it is built; denoisers and backends never change it, so two backends
    from one pair give what each gives alone."""
    from finextract.engine.backends import get_backend_factory
    from finextract.engine.config import RunConfig

    pair = lora_pair
    gated = _hooks(pair.base_unet)
    assert gated == len(pair.unet_lora) and pair.lora_gate is not None
    fingerprint = pair.fingerprint
    rule = rule_for("finextract", "lora")
    conditioning = encode_conditioning(pair, rule, CAPTION)
    table = DDIMTable.from_scheduler_config(pair.scheduler_config, STEPS)
    t, row = table.timesteps_tensor()[20], table.weights(*rule.coefs)[20]
    x_t = start_latents([1, 2], (4, 16, 16))
    results = {}
    for name in ("torch", "onnxruntime"):
        config = RunConfig.resolve(device="cpu", backend=name, threads=1, cache_dir=tmp_path)
        backend = get_backend_factory(name)(GuidedDenoiser(pair, rule), conditioning, config)
        results[name] = backend.step(x_t, t, row)
    alone = GuidedDenoiser(pair, rule).step(x_t, t, row, *conditioning)
    assert torch.equal(results["torch"], alone)
    bound = 2 * float(row[1:].abs().sum()) * tolerances.network(pair.base_unet, x_t)
    assert (results["onnxruntime"] - alone).abs().max().item() <= bound
    assert _hooks(pair.base_unet) == gated
    assert pair.lora_gate.value is None  # adapters off outside a call
    assert pair.__dict__.pop("fingerprint") == fingerprint  # recomputed: the weights did not change
    assert pair.fingerprint == fingerprint


def test_one_unet_cannot_serve_two_lora_pairs(lora_pair):
    with pytest.raises(ValueError, match="already carries the gated LoRA adapters"):
        dataclasses.replace(lora_pair)  # a second pair on the same UNet and adapters


def test_conditioning_count_is_checked(dreambooth_pair):
    denoiser = GuidedDenoiser(dreambooth_pair, rule_for("finextract", "dreambooth"))
    assert denoiser.conditioning_names == ("encoder_hidden_states_a", "encoder_hidden_states_b")
    with pytest.raises(ValueError, match="needs 2"):
        denoiser.term_outputs(torch.zeros(1, 4, 16, 16), torch.tensor([1.0]), torch.zeros(1, 77, 32))
