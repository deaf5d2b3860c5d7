"""The one DDIM loop: its weights table against diffusers' `DDIMScheduler.step`, eager and graphed runs."""

from __future__ import annotations

import pytest
import torch

from finextract.engine.ddim import DDIMLoop, DDIMTable, NonFiniteError, make_scheduler, pad_batch
from finextract.kernels.guidance_ddim import guided_update, guided_update_reference
from finextract.zoo.configs import SD1_SCHEDULER_CONFIG
from tests import tolerances

# SD 1.x's own scheduler, SD 2.x-style ones (v-prediction, trailing spacing, zero terminal SNR) and x0-prediction
CONFIGS = {
    "sd1-epsilon": dict(SD1_SCHEDULER_CONFIG),
    "v-prediction": {**SD1_SCHEDULER_CONFIG, "prediction_type": "v_prediction"},
    "v-trailing-zero-snr": {
        **SD1_SCHEDULER_CONFIG,
        "prediction_type": "v_prediction",
        "timestep_spacing": "trailing",
        "rescale_betas_zero_snr": True,
    },
    "epsilon-offset": {**SD1_SCHEDULER_CONFIG, "steps_offset": 1, "set_alpha_to_one": True},
    "sample": {**SD1_SCHEDULER_CONFIG, "prediction_type": "sample"},
}
COEFS = (3.0, -2.02)  # FineXtract DreamBooth, Eq. 13: w, 1 - w + k


def scheduler_loop(config: dict, steps: int, x_T: torch.Tensor, outputs, coefs=COEFS) -> list[torch.Tensor]:
    """diffusers' own DDIM loop (eta = 0) on `model_output = coef_a * out_a + coef_b * out_b`: every x_t."""
    scheduler = make_scheduler(config, steps)
    x, trajectory = x_T.clone(), []
    for t in scheduler.timesteps:
        out_a, out_b = outputs(x, float(t))
        x = scheduler.step(coefs[0] * out_a + coefs[1] * out_b, t, x, eta=0.0).prev_sample
        trajectory.append(x)
    return trajectory


def linear_outputs(x: torch.Tensor, t: float):
    """A deterministic stand-in for two UNet outputs that depend on x_t and the timestep."""
    return 0.5 * x + t / 1000, -0.25 * x + 0.1


@pytest.mark.parametrize("name", list(CONFIGS))
def test_table_step_equals_diffusers_step_at_every_timestep(name):
    """One guided update with table row i == `DDIMScheduler.step` at step i, for every prediction type."""
    config, steps = CONFIGS[name], 50
    scheduler = make_scheduler(config, steps)
    table = DDIMTable.from_scheduler(scheduler)
    # diffusers' own step, run in float64: its alphas are float32 by default, and their float32 square
    # roots (before the eps coefficient's cancellation) would dominate the comparison
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    scheduler.final_alpha_cumprod = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64)
    weights = table.weights(*COEFS).double()
    assert table.timesteps == tuple(int(t) for t in scheduler.timesteps)
    generator = torch.Generator().manual_seed(1)
    for index, t in enumerate(scheduler.timesteps):
        x_t, out_a, out_b = (torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64) for _ in range(3))
        reference = scheduler.step(COEFS[0] * out_a + COEFS[1] * out_b, t, x_t, eta=0.0).prev_sample
        ours = guided_update_reference(x_t, out_a, out_b, weights[index])
        w_x, w_a, w_b = weights[index]
        # ours is float32 arithmetic: each term meets at most 5 roundings (its input and its weight cast
        # to float32, the product, two sums); diffusers' float64 step adds ~1e-16 relative: negligible
        bound = tolerances.elementwise(w_x * x_t, w_a * out_a, w_b * out_b, operations=5) + 1e-12
        assert ((ours - reference).abs() <= bound).all(), f"step {index} (t={int(t)})"


@pytest.mark.parametrize("name", ["sd1-epsilon", "v-trailing-zero-snr"])
def test_eager_loop_equals_diffusers_loop(name):
    """The DDIMLoop with the reference update == diffusers' loop, x_t after every step (float32)."""
    config, steps = CONFIGS[name], 8
    table = DDIMTable.from_scheduler_config(config, steps)
    x_T = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(3))
    calls = []

    def step(x, t, weights):
        calls.append(int(t.item()))
        return guided_update(x, *linear_outputs(x, t.item()), weights)

    loop = DDIMLoop(step, table.timesteps_tensor(), table.weights(*COEFS))
    loop.start(x_T)
    expected = scheduler_loop(config, steps, x_T, linear_outputs)
    for index in range(steps):
        loop.step(index)
        x = loop.result()
        # each step: the reference's 5 float32 roundings vs diffusers' ~12, on |x| ~ 5; 20 u per step, grown
        # by at most the largest |w_x| (<= 1.1 here) over the steps so far
        bound = 20 * tolerances.U * (index + 1) * (x.abs().max().item() + 1)
        assert (x - expected[index]).abs().max().item() <= bound, f"step {index}"
    assert calls == list(table.timesteps) and loop.mode == "eager"  # one call per row, in order
    assert loop.eager_reason == "not a CUDA device"
    assert torch.equal(loop.run(x_T), x)  # run() is start + every step


def test_table_rejects_unsupported_configs_and_bad_alphas():
    with pytest.raises(ValueError, match="thresholding"):
        make_scheduler({**SD1_SCHEDULER_CONFIG, "thresholding": True}, 10)
    with pytest.raises(ValueError, match="steps 0"):
        make_scheduler(SD1_SCHEDULER_CONFIG, 0)
    with pytest.raises(ValueError, match="prediction_type"):
        DDIMTable("flow", (1,), (0.5,), (0.6,))
    with pytest.raises(ValueError, match="one length"):
        DDIMTable("epsilon", (10, 0), (0.5,), (0.6, 0.7))
    with pytest.raises(ValueError, match="alphas_cumprod"):
        DDIMTable("epsilon", (999,), (0.0,), (0.5,)).weights(1.0)
    with pytest.raises(ValueError, match="finite"):
        DDIMTable("epsilon", (1,), (0.5,), (0.6,)).weights(float("nan"))
    table = DDIMTable.from_scheduler_config(SD1_SCHEDULER_CONFIG, 5)
    weights = table.weights(1.0, device="cpu")
    assert weights.shape == (5, 3) and weights.dtype == torch.float32 and not weights[:, 2].any()
    assert table.timesteps_tensor().shape == (5, 1)


def test_clip_sample_is_turned_off_with_a_warning(caplog):
    with caplog.at_level("WARNING", logger="finextract.engine.ddim"):
        scheduler = make_scheduler({**SD1_SCHEDULER_CONFIG, "clip_sample": True}, 5)
    assert not scheduler.config.clip_sample and "clip_sample=True" in caplog.text


def test_pad_batch():
    x = torch.randn(3, 4, 2, 2)
    padded = pad_batch(x, 5)
    assert padded.shape == (5, 4, 2, 2) and torch.equal(padded[:3], x) and not padded[3:].any()
    assert pad_batch(x, 3) is x
    with pytest.raises(ValueError, match="exceeds the static batch 2"):
        pad_batch(x, 2)


def test_non_finite_latents_are_reported_at_their_step():
    table = DDIMTable.from_scheduler_config(SD1_SCHEDULER_CONFIG, 4)

    def step(x, t, weights):
        return x * float("nan") if t.item() < 500 else x

    loop = DDIMLoop(step, table.timesteps_tensor(), table.weights(1.0), check_every_step=True)
    with pytest.raises(NonFiniteError, match=r"step 2 \(t=251\)"):
        loop.run(torch.ones(1, 4, 2, 2))
    quiet = DDIMLoop(step, table.timesteps_tensor(), table.weights(1.0))
    with pytest.raises(NonFiniteError, match="4-step DDIM loop"):
        quiet.run(torch.ones(1, 4, 2, 2))  # checked once, at the end


def test_loop_rejects_mismatched_tables():
    table = DDIMTable.from_scheduler_config(SD1_SCHEDULER_CONFIG, 4)
    with pytest.raises(ValueError, match="one device"):
        DDIMLoop(lambda x, t, w: x, table.timesteps_tensor()[:3], table.weights(1.0))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_graphed_loop_on_gpu_equals_eager(dtype):
    """The captured step replayed per timestep == the same step run eagerly (the same kernels: equal)."""
    table = DDIMTable.from_scheduler_config(SD1_SCHEDULER_CONFIG, 6)
    timesteps, weights = table.timesteps_tensor("cuda"), table.weights(*COEFS, device="cuda")

    def step(x, t, row):
        out_a = (0.5 * x + t / 1000).to(dtype)
        out_b = (-0.25 * x).to(dtype)
        return guided_update(x, out_a.float(), out_b.float(), row)

    x_T = torch.randn(4, 4, 32, 32, generator=torch.Generator().manual_seed(7)).cuda()
    graphed = DDIMLoop(step, timesteps, weights, graph=True)
    eager = DDIMLoop(step, timesteps, weights)
    first, second, reference = graphed.run(x_T), graphed.run(x_T), eager.run(x_T)
    assert graphed.mode == "graph", graphed.eager_reason
    assert torch.equal(first, second)  # replays are deterministic and restart from x_T
    assert torch.equal(first, reference)  # the same kernels on the same inputs
    with pytest.raises(ValueError, match="pad the batch"):
        graphed.run(x_T[:1])


@pytest.mark.gpu
def test_graphed_multistep_loop_on_gpu_equals_eager():
    """K = 2 (UniPC): the packed state (x_t and two history tensors) replays in a graph as it runs eagerly."""
    from finextract.engine.solvers import step_table

    table = step_table("unipc", SD1_SCHEDULER_CONFIG, 6)
    timesteps, weights = table.timesteps_tensor("cuda"), table.weights(*COEFS, device="cuda")

    def step(state, t, row):
        x, past = state[:, :4], (state[:, 4:8], state[:, 8:])
        out_a, out_b = 0.5 * x + t / 1000, -0.25 * x
        return torch.cat([guided_update(x, out_a, out_b, row[5 * r : 5 * r + 5], history=past) for r in range(3)], 1)

    x_T = torch.randn(4, 4, 32, 32, generator=torch.Generator().manual_seed(7)).cuda()
    graphed = DDIMLoop(step, timesteps, weights, history=2, graph=True)
    eager = DDIMLoop(step, timesteps, weights, history=2)
    first, reference = graphed.run(x_T), eager.run(x_T)
    assert graphed.mode == "graph", graphed.eager_reason
    assert first.shape == x_T.shape and torch.equal(first, reference)
