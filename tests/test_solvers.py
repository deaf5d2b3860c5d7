"""The multistep solvers as step-table rows: the oracle is diffusers' own `DPMSolverMultistepScheduler.step`
and `UniPCMultistepScheduler.step`, fed the same model outputs as our table loop."""

from __future__ import annotations

import itertools

import pytest
import torch

from finextract.engine.config import SCHEDULER_NAMES
from finextract.engine.ddim import DDIMLoop, StepTable
from finextract.engine.solvers import FLOW_SCHEDULERS, HISTORY, SCHEDULERS, history_slots, step_table
from finextract.kernels.guidance_ddim import guided_update
from finextract.zoo.configs import (
    FLUX_SCHEDULER_CONFIG,
    FLUX_SCHNELL_SCHEDULER_CONFIG,
    SD1_SCHEDULER_CONFIG,
    SD3_SCHEDULER_CONFIG,
)
from tests import tolerances

COEFS = (3.0, -2.02)  # FineXtract DreamBooth, Eq. 13: w, 1 - w + k
CHANNELS = 4
CONFIGS = {
    "epsilon": dict(SD1_SCHEDULER_CONFIG),
    "v_prediction": {**SD1_SCHEDULER_CONFIG, "prediction_type": "v_prediction"},
    # the table reads the scheduler's own timesteps and sigmas: other spacings and final sigmas follow
    "v-trailing-sigma-min": {
        **SD1_SCHEDULER_CONFIG,
        "prediction_type": "v_prediction",
        "timestep_spacing": "trailing",
        "final_sigmas_type": "sigma_min",
    },
    "epsilon-karras": {**SD1_SCHEDULER_CONFIG, "use_karras_sigmas": True},
}
# midpoint is DPM-Solver++ 2M's default; heun its other second-order form
SOLVER_OPTIONS = {"dpmpp-2m": {}, "dpmpp-2m-heun": {"solver_type": "heun"}, "unipc": {}}


def diffusers_scheduler(name: str, config: dict, steps: int, image_tokens: int | None = None):
    """diffusers' scheduler as the pipelines build it: from the model's config, with `steps` set. On a
    flow-matching config, its flow form as a user swaps it into the SD3 / FLUX pipelines: use_flow_sigmas,
    prediction_type "flow_prediction", flow_shift the model's shift, and the pipeline's mu (diffusers'
    `calculate_shift` of the image tokens) with dynamic shifting."""
    from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

    flow = config.get("_class_name") == "FlowMatchEulerDiscreteScheduler"
    options = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=config["shift"]) if flow else {}
    if name == "unipc":
        scheduler = UniPCMultistepScheduler.from_config(config, solver_order=2, **options)
    else:
        scheduler = DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", solver_order=2, **options
        )
    kwargs = {}
    if flow and config.get("use_dynamic_shifting"):
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        keys = ("base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift")
        kwargs["mu"] = calculate_shift(image_tokens, *(config[key] for key in keys))
    scheduler.set_timesteps(steps, **kwargs)
    return scheduler


def fake_outputs(x: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Two deterministic stand-ins for UNet outputs: a fixed linear map of x_t plus a t-dependent term, so
    an error in one step changes the next step's outputs, as in real sampling."""
    mix = torch.tensor([[0.5, 0.1, 0.0, -0.1], [0.0, 0.4, 0.1, 0.0], [0.1, 0.0, 0.6, 0.0], [0.0, -0.1, 0.0, 0.5]])
    out_a = torch.einsum("dc,bc...->bd...", mix, x) + t / 1000
    return out_a, -0.25 * x + 0.1 * torch.cos(torch.tensor(t / 100))


def table_step(history: int, bounds: list):
    """The step function of the denoiser (`GuidedDenoiser.step`) on `fake_outputs`; appends each step's
    `tolerances.elementwise` magnitude sum (the terms of every output block) to `bounds`."""

    def step(state, t, weights):
        x = state[:, :CHANNELS]
        past = tuple(state[:, (j + 1) * CHANNELS : (j + 2) * CHANNELS] for j in range(history))
        out_a, out_b = fake_outputs(x, t.item())
        width, blocks, terms = 3 + history, [], 0.0
        for r in range(1 + history):
            row = weights[r * width : (r + 1) * width]
            blocks.append(guided_update(x, out_a, out_b, row, history=past))
            inputs = (x, out_a, out_b, *past)
            terms = max(terms, sum(abs(w) * i.abs().max().item() for w, i in zip(row.tolist(), inputs)))
        bounds.append(terms)
        return torch.cat(blocks, 1)

    return step


def diffusers_run(name: str, config: dict, steps: int, x_T: torch.Tensor, image_tokens: int | None = None):
    """diffusers' own loop on `fake_outputs`, its sigmas widened to float64 (its coefficients then are
    computed in double and rounded once to float32, like our table's). Per step: (x_t before the step,
    its history [m_{i-1}, m_{i-2}] (zeros before they exist), x_t after, the history after)."""
    scheduler = diffusers_scheduler(name, config, steps, image_tokens)
    scheduler.sigmas = scheduler.sigmas.double()
    x, record = x_T.clone(), []

    def history():
        return [m if m is not None else torch.zeros_like(x) for m in reversed(scheduler.model_outputs)]

    for t in scheduler.timesteps:
        before = history()
        out_a, out_b = fake_outputs(x, float(t))
        x_next = scheduler.step(COEFS[0] * out_a + COEFS[1] * out_b, t, x).prev_sample
        record.append((x, before, x_next, history()))
        x = x_next
    return scheduler, record


# The solvers' flow forms on the flow-matching configs: SD3 (shift 3), FLUX.1-dev (dynamic shift, 64 tokens)
FLOW_CONFIGS = {"flow-sd3": ("sd3", SD3_SCHEDULER_CONFIG, None), "flow-flux-dev": ("flux", FLUX_SCHEDULER_CONFIG, 64)}


@pytest.mark.parametrize("steps", [5, 10, 20, 25])
@pytest.mark.parametrize("config_name", [*CONFIGS, *FLOW_CONFIGS])
@pytest.mark.parametrize("solver", list(SOLVER_OPTIONS))
def test_table_equals_diffusers_multistep_step(solver, config_name, steps):
    """Every row == diffusers' `step` on the same state, and our loop == diffusers' loop after every step.

    Tolerance: diffusers' sigmas are widened to float64 so that its coefficients, like our table's, are
    computed in double and rounded once to float32; what differs is float32 elementwise arithmetic. Per
    output element each side rounds at most 32 times (ours: 3 + K products and sums plus the weights' cast
    to float32; diffusers': the data prediction, UniC's corrector and UniP's predictor, ~20 operations),
    each by at most u = 2^-24 times the largest term magnitude T_i of the step (`table_step`):
    - one step from diffusers' own state (x_t and its stored data predictions): |ours - diffusers| <=
      32 u T_i, for the new x_t and the new history alike;
    - the whole loop: to first order the steps' errors add (later steps carry an earlier x_t error with
      weights |w_x| <= 1 and through the data predictions, which the per-step check bounds), so after step
      i the difference is at most 32 u (T_0 + ... + T_i): float32 eps x steps x magnitudes.
    """
    name = "unipc" if solver == "unipc" else "dpmpp-2m"
    family, base_config, tokens = FLOW_CONFIGS.get(config_name, (None, CONFIGS.get(config_name), None))
    config = {**base_config, **SOLVER_OPTIONS[solver]}
    table = step_table(name, config, steps, family=family, image_tokens=tokens)
    x_T = torch.randn(2, CHANNELS, 6, 6, generator=torch.Generator().manual_seed(3))
    scheduler, record = diffusers_run(name, config, steps, x_T, tokens)
    assert list(table.timesteps) == scheduler.timesteps.tolist() and table.history == HISTORY[name]
    weights, history = table.weights(*COEFS), table.history

    terms: list[float] = []
    step = table_step(history, terms)
    for index, (x, before, x_next, after) in enumerate(record):
        state = torch.cat([x, *before[:history]], 1)
        ours = step(state, table.timesteps_tensor()[index], weights[index])
        expected = torch.cat([x_next, *after[:history]], 1)
        error, bound = (ours - expected).abs().max().item(), 32 * tolerances.U * terms[-1]
        assert error <= bound, f"step {index} (t={table.timesteps[index]}): {error:.3g} > {bound:.3g}"

    terms.clear()
    loop = DDIMLoop(step, table.timesteps_tensor(), weights, history=history)
    loop.start(x_T)
    for index in range(steps):
        loop.step(index)
        error, bound = (loop.result() - record[index][2]).abs().max().item(), 32 * tolerances.U * sum(terms)
        assert error <= bound, f"loop step {index} (t={table.timesteps[index]}): {error:.3g} > {bound:.3g}"
    assert (loop.result() - x_T).abs().max().item() > 0.1  # it sampled: not a trivially equal pair


def test_the_step_bound_catches_a_slightly_wrong_weight():
    """The per-step tolerance is tight: a 1e-3 relative change of one history weight (UniPC, 10 steps)
    exceeds it, so the oracle test fails on any real mistake in a row."""
    table = step_table("unipc", SD1_SCHEDULER_CONFIG, 10)
    x_T = torch.randn(2, CHANNELS, 6, 6, generator=torch.Generator().manual_seed(3))
    _, record = diffusers_run("unipc", SD1_SCHEDULER_CONFIG, 10, x_T)
    weights = table.weights(*COEFS)
    weights[:, 3] *= 1 + 1e-3  # block 0's w_h1
    terms: list[float] = []
    step, worst = table_step(2, terms), 0.0
    for index, (x, before, x_next, after) in enumerate(record):
        ours = step(torch.cat([x, *before], 1), table.timesteps_tensor()[index], weights[index])
        error = (ours - torch.cat([x_next, *after], 1)).abs().max().item()
        worst = max(worst, error / (32 * tolerances.U * terms[-1]))
    assert worst > 10


def test_registry_names_history_and_refusals():
    assert tuple(dict.fromkeys((*SCHEDULERS, *FLOW_SCHEDULERS))) == SCHEDULER_NAMES == tuple(HISTORY)
    for name in SCHEDULER_NAMES:
        for config, family in ((SD1_SCHEDULER_CONFIG, None), (SD3_SCHEDULER_CONFIG, "sd3")):
            if name not in (FLOW_SCHEDULERS if family else SCHEDULERS):
                continue
            table = step_table(name, config, 4, family=family)
            assert isinstance(table, StepTable) and table.scheduler == name
            assert table.history == history_slots(name) and table.weights(1.0).shape == (4, table.width)
    with pytest.raises(ValueError, match="--scheduler 'heun'"):
        step_table("heun", SD1_SCHEDULER_CONFIG, 4)
    with pytest.raises(ValueError, match="--scheduler 'heun'"):
        history_slots("heun")
    for name in ("dpmpp-2m", "unipc"):
        with pytest.raises(ValueError, match="thresholding"):
            step_table(name, {**SD1_SCHEDULER_CONFIG, "thresholding": True}, 10)
        with pytest.raises(ValueError, match="timestep_spacing"):
            step_table(name, {**SD1_SCHEDULER_CONFIG, "timestep_spacing": "karras"}, 10)
        with pytest.raises(ValueError, match="steps 0"):
            step_table(name, SD1_SCHEDULER_CONFIG, 0)
    with pytest.raises(ValueError, match="bh2"):
        step_table("unipc", {**SD1_SCHEDULER_CONFIG, "solver_type": "bh1"}, 10)
    with pytest.raises(ValueError, match="disable_corrector"):
        step_table("unipc", {**SD1_SCHEDULER_CONFIG, "disable_corrector": [0]}, 10)


def test_ddim_rows_are_todays_bit_for_bit():
    """K = 0: the step table's weights are DDIMTable's (w_x, w_o * coef_a, w_o * coef_b), equal bits."""
    from finextract.engine.ddim import DDIMTable, _step_weights

    ddim = DDIMTable.from_scheduler_config(SD1_SCHEDULER_CONFIG, 20)
    rows = []
    for a_t, a_prev in zip(ddim.alphas_prod_t, ddim.alphas_prod_t_prev):
        w_x, w_o = _step_weights("epsilon", a_t, a_prev)
        rows.append((w_x, w_o * COEFS[0], w_o * COEFS[1]))
    expected = torch.tensor(rows, dtype=torch.float64).float()
    table = step_table("ddim", SD1_SCHEDULER_CONFIG, 20)
    assert table.history == 0 and torch.equal(table.weights(*COEFS), expected)
    assert table.timesteps == ddim.timesteps


def test_step_table_validates_its_matrices():
    with pytest.raises(ValueError, match="one matrix per timestep"):
        StepTable("ddim", (1, 2), (((1.0, 0.5),),))
    with pytest.raises(ValueError, match="not \\(2, 3\\)"):
        StepTable("x", (2, 1), (((1.0, 0.5, 0.0), (0.0, 1.0, 0.0)), ((1.0, 0.5),)))
    with pytest.raises(ValueError, match="non-finite"):
        StepTable("x", (1,), (((float("inf"), 0.5),),))
    table = StepTable("x", (1,), (((1.0, 0.5, 0.25), (0.0, 2.0, 0.0)),))
    assert table.history == 1 and table.width == 8
    assert table.weights(3.0, -1.0).tolist() == [[1.0, 1.5, -0.5, 0.25, 0.0, 6.0, -2.0, 0.0]]
    with pytest.raises(ValueError, match="finite"):
        table.weights(float("nan"))


def test_loop_packs_and_unpacks_the_history():
    """`start` appends K zero blocks, `result` returns x only; the weights width must be (1+K)(3+K)."""
    table = StepTable("x", (500,), (((1.0, 0.0, 1.0, 0.0), (0.0, 0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0)),))
    seen = []

    def step(state, t, weights):
        seen.append(tuple(state.shape))
        return state + 1

    loop = DDIMLoop(step, table.timesteps_tensor(), table.weights(1.0), history=2)
    x_T = torch.randn(3, CHANNELS, 2, 2)
    assert torch.equal(loop.run(x_T), x_T + 1) and seen == [(3, 3 * CHANNELS, 2, 2)]
    with pytest.raises(ValueError, match=r"\(steps, 8\)"):
        DDIMLoop(step, table.timesteps_tensor(), table.weights(1.0), history=1)


# --- flow matching: the Euler step of SD3 and FLUX.1 --------------------------------------------------

# (family, scheduler config, image tokens): SD3 (shift 3), FLUX.1-dev (dynamic shift) at the tiny zoo's 64
# tokens and at 1024 px (4096 tokens), FLUX.1-schnell (shift 1)
FLOW_CASES = {
    "sd3": ("sd3", SD3_SCHEDULER_CONFIG, 64),
    "flux-dev-32px": ("flux", FLUX_SCHEDULER_CONFIG, 64),
    "flux-dev-1024px": ("flux", FLUX_SCHEDULER_CONFIG, 4096),
    "flux-schnell": ("flux", FLUX_SCHNELL_SCHEDULER_CONFIG, 64),
}


def pipeline_flow_scheduler(family: str, config: dict, steps: int, image_tokens: int):
    """`FlowMatchEulerDiscreteScheduler` with its timesteps set as the family's pipeline sets them: diffusers'
    own `retrieve_timesteps` and `calculate_shift` of that pipeline's module, with its sigmas (FluxPipeline:
    linspace(1, 1 / steps, steps)) and mu (FluxPipeline always, SD3 with dynamic shifting)."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    if family == "flux":
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        kwargs = dict(sigmas=np.linspace(1.0, 1 / steps, steps))
    else:
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
            calculate_shift,
            retrieve_timesteps,
        )

        kwargs = {}
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    if family == "flux" or scheduler.config.use_dynamic_shifting:
        c = scheduler.config
        kwargs["mu"] = calculate_shift(
            image_tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift
        )
    retrieve_timesteps(scheduler, steps, "cpu", **kwargs)
    scheduler.set_begin_index(0)
    return scheduler


@pytest.mark.parametrize("steps", [1, 4, 28])
@pytest.mark.parametrize("case", list(FLOW_CASES))
def test_euler_table_equals_flow_match_euler_step(case, steps):
    """Timesteps == the pipeline's, and every step == `FlowMatchEulerDiscreteScheduler.step` on the same
    velocity outputs, our loop == diffusers' loop.

    Tolerance: the step weight sigma_next - sigma is the float32 difference diffusers takes (exact in
    float64, rounded once), so the rows are the same numbers; each side computes x + dt (c_a v_a + c_b v_b)
    in another float32 order, at most 32 roundings of u times the step's largest term (as for the
    multistep solvers above), and the loop's errors add over the steps.
    """
    family, config, tokens = FLOW_CASES[case]
    table = step_table("euler", config, steps, family=family, image_tokens=tokens)
    scheduler = pipeline_flow_scheduler(family, config, steps, tokens)
    assert list(table.timesteps) == scheduler.timesteps.tolist() and table.history == 0
    sigmas = scheduler.sigmas.tolist()
    assert [row[0][1] for row in table.matrices] == [b - a for a, b in itertools.pairwise(sigmas)]
    weights = table.weights(*COEFS)
    x_T = torch.randn(2, CHANNELS, 6, 6, generator=torch.Generator().manual_seed(3))
    terms: list[float] = []
    step, x = table_step(0, terms), x_T
    for index, t in enumerate(scheduler.timesteps):
        out_a, out_b = fake_outputs(x, float(t))
        expected = scheduler.step(COEFS[0] * out_a + COEFS[1] * out_b, t, x).prev_sample
        ours = step(x, table.timesteps_tensor()[index], weights[index])
        error, bound = (ours - expected).abs().max().item(), 32 * tolerances.U * sum(terms)
        assert error <= bound, f"step {index} (t={table.timesteps[index]}): {error:.3g} > {bound:.3g}"
        x = expected
    assert (x - x_T).abs().max().item() > 0.1  # it sampled


def test_flow_sigmas_follow_shift_and_image_size():
    """The shift moves sigmas up (SD3's 3.0), FLUX.1-dev's dynamic shift grows with the image's tokens
    (mu from 0.5 at 256 tokens to 1.15 at 4096), schnell's shift 1 keeps FluxPipeline's linspace."""
    from finextract.engine.solvers import calculate_shift

    assert calculate_shift(256, FLUX_SCHEDULER_CONFIG) == pytest.approx(0.5)
    assert calculate_shift(4096, FLUX_SCHEDULER_CONFIG) == pytest.approx(1.15)
    small, large = (step_table("euler", FLUX_SCHEDULER_CONFIG, 4, family="flux", image_tokens=n) for n in (64, 4096))
    assert all(a < b for a, b in zip(small.timesteps[1:], large.timesteps[1:]))
    schnell = step_table("euler", FLUX_SCHNELL_SCHEDULER_CONFIG, 4, family="flux")
    assert schnell.timesteps == pytest.approx((1000.0, 750.0, 500.0, 250.0))
    sd3 = step_table("euler", SD3_SCHEDULER_CONFIG, 4, family="sd3")
    assert sd3.timesteps[0] == 1000.0 and sd3.timesteps[1] > 750.0  # shifted towards noise


def test_flow_and_ddpm_schedulers_refuse_each_others_models():
    with pytest.raises(ValueError, match=r"flow-matching model .*use --scheduler euler"):
        step_table("ddim", SD3_SCHEDULER_CONFIG, 4, family="sd3")
    with pytest.raises(ValueError, match=r"--scheduler euler: flow matching's Euler step .*DDIMScheduler"):
        step_table("euler", SD1_SCHEDULER_CONFIG, 4)
    with pytest.raises(ValueError, match="needs a flow family"):
        step_table("euler", SD3_SCHEDULER_CONFIG, 4, family="sd1")
    with pytest.raises(ValueError, match="pass image_tokens"):
        step_table("euler", FLUX_SCHEDULER_CONFIG, 4, family="flux")
    with pytest.raises(ValueError, match="stochastic_sampling"):
        step_table("euler", {**SD3_SCHEDULER_CONFIG, "stochastic_sampling": True}, 4, family="sd3")
