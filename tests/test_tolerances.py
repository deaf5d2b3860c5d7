"""The tolerances are strict enough to catch real bugs: a wrong table row, a wrong step weight and a swapped
coefficient each break the comparisons the suite makes (`tests/test_ddim.py`, `tests/test_denoiser.py`)."""

from __future__ import annotations

import math

import torch

from finextract.engine.conditioning import encode_conditioning
from finextract.engine.ddim import DDIMTable, make_scheduler
from finextract.engine.denoiser import GuidedDenoiser
from finextract.engine.sampler import start_latents
from finextract.kernels.guidance_ddim import guided_update_reference
from finextract.rules import rule_for
from tests import tolerances
from tests.test_denoiser import CAPTION, STEPS, diffusers_step, separate_outputs, step_tolerance


def _off_by_one_weights(table: DDIMTable, scheduler, coefs) -> torch.Tensor:
    """The epsilon table with alphas_cumprod looked up one timestep too late: a plausible indexing bug."""
    rows = []
    for t, a_prev in zip(table.timesteps, table.alphas_prod_t_prev):
        a_t = float(scheduler.alphas_cumprod[t + 1])
        c = math.sqrt(1 - a_prev) - math.sqrt(a_prev * (1 - a_t) / a_t)
        rows.append((math.sqrt(a_prev / a_t), c * coefs[0], c * coefs[1]))
    return torch.tensor(rows, dtype=torch.float64).float()


@torch.inference_mode()
def test_each_deliberate_bug_exceeds_the_tolerance(dreambooth_pair):
    pair = dreambooth_pair
    rule = rule_for("finextract", "dreambooth")
    conditioning = encode_conditioning(pair, rule, CAPTION)
    denoiser = GuidedDenoiser(pair, rule)
    scheduler = make_scheduler(pair.scheduler_config, STEPS)
    table = DDIMTable.from_scheduler(scheduler)
    weights = table.weights(*rule.coefs)
    x_t = start_latents([0, 1], (4, 16, 16))
    unets = {"base": pair.base_unet, "finetuned": pair.finetuned_unet}
    wrong_weights = _off_by_one_weights(table, scheduler, rule.coefs)
    swapped_weights = table.weights(rule.coefs[1], rule.coefs[0])
    for index in (5, 25, 45):  # early, middle and late steps
        t = table.timesteps_tensor()[index]
        outputs = separate_outputs(unets, conditioning, rule, x_t, t)
        expected = diffusers_step(pair.scheduler_config, outputs, rule, x_t, table.timesteps[index])
        bound = step_tolerance(pair.base_unet, outputs, rule, weights[index])
        right = denoiser.step(x_t, t, weights[index], *conditioning)
        assert (right - expected).abs().max().item() <= bound  # the comparison itself holds
        breaks = {
            "wrong row": denoiser.step(x_t, t, weights[index + 1], *conditioning),
            "wrong step weight": denoiser.step(x_t, t, wrong_weights[index], *conditioning),
            "swapped coefficients": denoiser.step(x_t, t, swapped_weights[index], *conditioning),
        }
        for name, broken in breaks.items():
            error = (broken - expected).abs().max().item()
            assert error > bound, f"{name} at step {index}: error {error:.2e} vs tolerance {bound:.2e}"

    # the table comparison (tests/test_ddim.py) is stricter still: the same three bugs, on random outputs
    generator = torch.Generator().manual_seed(1)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    for index in (5, 25, 45):
        x, out_a, out_b = (torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64) for _ in range(3))
        t = scheduler.timesteps[index]
        expected = scheduler.step(rule.coefs[0] * out_a + rule.coefs[1] * out_b, t, x, eta=0.0).prev_sample
        w = weights[index].double()
        bound = tolerances.elementwise(w[0] * x, w[1] * out_a, w[2] * out_b, operations=5)
        assert ((guided_update_reference(x, out_a, out_b, weights[index]) - expected).abs() <= bound).all()
        for name, row in {
            "wrong row": weights[index + 1],
            "wrong step weight": wrong_weights[index],
            "swapped coefficients": swapped_weights[index],
        }.items():
            broken = guided_update_reference(x, out_a, out_b, row)
            assert ((broken - expected).abs() > 3 * bound).any(), f"{name} at step {index}"
