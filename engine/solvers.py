"""The schedulers a run may sample with, each written as `StepTable` rows: DDIM, two multistep solvers, and
flow matching's Euler step.

    table = step_table("dpmpp-2m", pair.scheduler_config, steps=20)
    table.history                      # K: 0 for ddim and euler, 1 for dpmpp-2m, 2 for unipc
    table = step_table("euler", pair.scheduler_config, steps=28, family=pair.family, image_tokens=4096)

A multistep solver's step is linear in x_t, the model output and the data predictions (x0) of earlier
steps, so it is a `StepTable` matrix over [x_t, output, h_1..h_K] with the history h_j = m_{i-j}, the
previous data predictions (`finextract.engine.ddim`). The coefficients are diffusers' own: each builder
makes the scheduler `from_config(model scheduler config)`, calls `set_timesteps(steps)` as the pipelines
do (the model's timestep spacing, steps offset and final sigma), reads its timesteps and sigmas, and
writes out in float64 what its `step` computes, step by step (first steps at lower order while the
history fills, `lower_order_final` on the last ones). tests/test_solvers.py checks every table against
`DPMSolverMultistepScheduler.step` / `UniPCMultistepScheduler.step` on the same model outputs.

Flow-matching models (SD3, FLUX.1: a `FlowMatchEulerDiscreteScheduler` config, the model predicts the
velocity v) sample with `euler`, the pipelines' own step x_prev = x_t + (sigma_next - sigma) v: a K = 0
row (1, sigma_next - sigma) over sigmas set as the family's pipeline sets them (`flow_set_timesteps`:
the shift, FLUX's sigmas and its dynamic shift by image size). `dpmpp-2m` and `unipc` on a flow model are
diffusers' flow forms of those solvers (`use_flow_sigmas`, `prediction_type="flow_prediction"`, `flow_shift`
= the model's shift, mu with dynamic shifting): alpha_t = 1 - sigma, sigma_t = sigma, x0 = x_t - sigma v.
`ddim` on a flow model, and `euler` on a DDPM model, are refused.

Refused, with the option to change: anything not linear in the model output (thresholding), stochastic
variants (SDE, flow matching's stochastic_sampling), and options this module does not write out (solver
orders other than 2, UniPC's bh1 or disabled correctors, flow sigmas in a DDPM model's config).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from .config import SCHEDULER_NAMES
from .ddim import DDIMTable, StepTable, check_linear, check_steps_and_spacing
from .families import get_family

#: The scheduler class of flow-matching models' configs (SD3, FLUX.1).
FLOW_SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"


def _alpha_sigma(sigma: float, flow: bool = False) -> tuple[float, float]:
    """(alpha_t, sigma_t) of a DDPM sigma = sqrt((1 - a) / a), or of a flow sigma (alpha_t = 1 - sigma,
    sigma_t = sigma: x_t = (1 - sigma) x0 + sigma noise): diffusers' `_sigma_to_alpha_sigma_t`."""
    if flow:
        return 1.0 - sigma, sigma
    alpha = 1.0 / math.sqrt(sigma * sigma + 1.0)
    return alpha, sigma * alpha


def _lambda(sigma: float, flow: bool = False) -> float:
    """The half log-SNR log(alpha_t) - log(sigma_t) (sigma > 0)."""
    alpha, sigma_t = _alpha_sigma(sigma, flow)
    return math.log(alpha) - math.log(sigma_t)


def _data_prediction(prediction_type: str, sigma: float, flow: bool = False) -> np.ndarray:
    """(x weight, output weight) of the data prediction x0 from x_t and the model output at `sigma`
    (diffusers' `convert_model_output` for data-predicting solvers; "flow_prediction": x0 = x_t - sigma v)."""
    if prediction_type == "flow_prediction":
        return np.array([1.0, -sigma])
    alpha, sigma_t = _alpha_sigma(sigma, flow)
    if prediction_type == "epsilon":  # x0 = (x_t - sigma_t eps) / alpha_t
        return np.array([1.0 / alpha, -sigma_t / alpha])
    if prediction_type == "v_prediction":  # x0 = alpha_t x_t - sigma_t v
        return np.array([alpha, -sigma_t])
    return np.array([0.0, 1.0])  # "sample": the output is x0


def _make(scheduler_class, scheduler_config: dict, steps: int, name: str, set_timesteps=None, **overrides):
    """diffusers' `scheduler_class.from_config(config, **overrides)` with `steps` timesteps set, checked.

    A flow-matching model's config (`is_flow_config`) gives the solver's flow form, as diffusers has it:
    `use_flow_sigmas=True`, `prediction_type="flow_prediction"`, `flow_shift` = the model's `shift`, and
    `set_timesteps(steps, **set_timesteps)` (mu with dynamic shifting, `flow_set_timesteps`).

    Raises:
        ValueError: `steps` < 1, or a config option the table cannot reproduce (named, with the fix).
    """
    check_steps_and_spacing(scheduler_config, steps, name)
    flow = is_flow_config(scheduler_config)
    if flow:
        overrides.update(use_flow_sigmas=True, prediction_type="flow_prediction")
        overrides.setdefault("flow_shift", scheduler_config.get("shift", 1.0))
    scheduler = scheduler_class.from_config(scheduler_config, **overrides)
    config = scheduler.config
    if not flow:
        check_linear(config, name)
    if config.get("use_flow_sigmas", False) and not flow:
        raise ValueError(f"scheduler use_flow_sigmas=True: --scheduler {name} samples DDPM models; use a DDPM config")
    if config.thresholding:
        check_linear(config, name)  # names the setting
    scheduler.set_timesteps(steps, **(set_timesteps or {}))
    return scheduler


def _sigmas(scheduler) -> list[float]:
    """The scheduler's sigmas (steps + 1; the last is the final sigma, 0 by default) as Python floats."""
    return [float(sigma) for sigma in scheduler.sigmas.tolist()]


def ddim_table(scheduler_config: dict, steps: int) -> StepTable:
    """DDIM (eta = 0): `DDIMTable.from_scheduler_config(...).step_table()` (K = 0)."""
    return DDIMTable.from_scheduler_config(scheduler_config, steps).step_table()


def dpmpp_2m_table(scheduler_config: dict, steps: int, set_timesteps: dict | None = None) -> StepTable:
    """DPM-Solver++ 2M (Lu et al. 2022, Alg. 2), K = 1: `DPMSolverMultistepScheduler` with
    algorithm_type "dpmsolver++" and solver_order 2, the model's other settings.

    Step i from sigma_s to sigma_t, with m_i the data prediction and h = lambda_t - lambda_s:
    first order (the first step, and the last when lower_order_final or a zero final sigma applies)
        x_prev = (sigma_t / sigma_s) x - alpha_t (e^-h - 1) m_i
    second order, r = h_{i-1} / h, D1 = (m_i - m_{i-1}) / r:
        midpoint: x_prev = (sigma_t / sigma_s) x - alpha_t (e^-h - 1) (m_i + D1 / 2)
        heun:     x_prev = (sigma_t / sigma_s) x - alpha_t (e^-h - 1) m_i + alpha_t ((e^-h - 1) / h + 1) D1
    and the new history is m_i.

    Raises:
        ValueError: see `_make`; an algorithm_type or solver_type the table does not write out.
    """
    from diffusers import DPMSolverMultistepScheduler  # heavy: seconds to import

    scheduler = _make(
        DPMSolverMultistepScheduler,
        scheduler_config,
        steps,
        "dpmpp-2m",
        set_timesteps,
        algorithm_type="dpmsolver++",
        solver_order=2,
    )
    config = scheduler.config
    flow = bool(config.use_flow_sigmas)
    if config.solver_type not in ("midpoint", "heun"):
        raise ValueError(f"scheduler solver_type={config.solver_type!r}: dpmpp-2m supports midpoint and heun")
    if config.variance_type is not None:
        raise ValueError(f"scheduler variance_type={config.variance_type!r}: dpmpp-2m needs a plain UNet output")
    sigmas, n = _sigmas(scheduler), len(scheduler.timesteps)
    matrices, lower_order_nums = [], 0
    for i in range(n):
        lower_order_final = i == n - 1 and (
            config.euler_at_final or (config.lower_order_final and n < 15) or config.final_sigmas_type == "zero"
        )
        # basis: [x, output, h1 = m_{i-1}]
        m = np.array([*_data_prediction(config.prediction_type, sigmas[i], flow), 0.0])
        history = np.array([0.0, 0.0, 1.0])
        alpha_t, sigma_t = _alpha_sigma(sigmas[i + 1], flow)
        alpha_s, sigma_s = _alpha_sigma(sigmas[i], flow)
        ratio = sigma_t / sigma_s
        # e^-h = (sigma_t / alpha_t) / (sigma_s / alpha_s): exact (0) at a zero final sigma, where h = inf
        # (a DDPM sigma is sigma_t / alpha_t itself)
        exp_neg_h = (sigma_t / alpha_t) / (sigma_s / alpha_s) if flow else sigmas[i + 1] / sigmas[i]
        x_new = ratio * np.array([1.0, 0.0, 0.0]) - alpha_t * (exp_neg_h - 1.0) * m
        if not (lower_order_nums < 1 or lower_order_final):  # diffusers' second-order branch (order 2 is the top)
            h = _lambda(sigmas[i + 1], flow) - _lambda(sigmas[i], flow)
            r = (_lambda(sigmas[i], flow) - _lambda(sigmas[i - 1], flow)) / h
            d1 = (m - history) / r
            if config.solver_type == "midpoint":
                x_new = x_new - 0.5 * alpha_t * (exp_neg_h - 1.0) * d1
            else:
                x_new = x_new + alpha_t * ((exp_neg_h - 1.0) / h + 1.0) * d1
        lower_order_nums = min(lower_order_nums + 1, 2)
        matrices.append((tuple(x_new.tolist()), tuple(m.tolist())))
    return StepTable("dpmpp-2m", tuple(int(t) for t in scheduler.timesteps.tolist()), tuple(matrices))


def _unipc_coefficients(h: float, order: int, rk: float | None) -> tuple[float, float, np.ndarray]:
    """(h_phi_1, B_h, rhos_c) of UniPC bh2 (Zhao et al. 2023) over a step of log-SNR length h, as
    `UniPCMultistepScheduler` computes them with predict_x0: hh = -h, h_phi_1 = e^hh - 1, B_h = e^hh - 1,
    and the corrector's rhos solving R rho = b (order 1: rho = 0.5)."""
    hh = -h
    h_phi_1 = math.expm1(hh) if math.isfinite(h) else -1.0
    b_h = h_phi_1
    if order == 1:
        return h_phi_1, b_h, np.array([0.5])
    rks = np.array([rk, 1.0])
    h_phi_k, factorial, rows, b = h_phi_1 / hh - 1.0, 1, [], []
    for i in range(1, order + 1):
        rows.append(rks ** (i - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return h_phi_1, b_h, np.linalg.solve(np.stack(rows), np.array(b))


def unipc_table(scheduler_config: dict, steps: int, set_timesteps: dict | None = None) -> StepTable:
    """UniPC (bh2, order 2, predictor and corrector; diffusers' defaults), K = 2:
    `UniPCMultistepScheduler` with solver_order 2, the model's other settings.

    diffusers' step i evaluates the model at the predicted x_i, corrects it with the new data prediction
    m_i (UniC), then predicts x_{i+1} from the corrected sample (UniP). The corrector and the previous
    predictor share their first terms, so the corrected sample is x_i plus a combination of m_i, m_{i-1},
    m_{i-2}: the state needs x_i and the history h_1 = m_{i-1}, h_2 = m_{i-2}, nothing more.

    Raises:
        ValueError: see `_make`; solver_type, predict_x0 or disable_corrector settings the table does not
            write out.
    """
    from diffusers import UniPCMultistepScheduler  # heavy: seconds to import

    scheduler = _make(UniPCMultistepScheduler, scheduler_config, steps, "unipc", set_timesteps, solver_order=2)
    config = scheduler.config
    flow = bool(config.use_flow_sigmas)
    if config.solver_type != "bh2" or not config.predict_x0 or list(config.disable_corrector):
        raise ValueError(
            f"scheduler solver_type={config.solver_type!r}, predict_x0={config.predict_x0}, disable_corrector="
            f"{list(config.disable_corrector)}: --scheduler unipc writes out bh2 with predict_x0 and the corrector "
            "on every step (diffusers' defaults); remove these keys from the model's scheduler_config.json"
        )
    sigmas, n = _sigmas(scheduler), len(scheduler.timesteps)
    lam = [_lambda(sigma, flow) if sigma > 0 else math.inf for sigma in sigmas]
    x, o, h1, h2 = np.eye(4)  # basis: [x, output, h1 = m_{i-1}, h2 = m_{i-2}]
    matrices, lower_order_nums, previous_order = [], 0, 0
    for i in range(n):
        to_x0 = _data_prediction(config.prediction_type, sigmas[i], flow)
        m = to_x0[0] * x + to_x0[1] * o
        corrected = x
        if i > 0:  # UniC over (i-1 -> i), order = the previous predictor's, minus that predictor's last terms
            alpha_t, _ = _alpha_sigma(sigmas[i], flow)
            h = lam[i] - lam[i - 1]
            rk = (lam[i - 2] - lam[i - 1]) / h if previous_order == 2 else None
            _, b_h, rhos_c = _unipc_coefficients(h, previous_order, rk)
            d1 = (h2 - h1) / rk if previous_order == 2 else 0.0 * x
            correction = rhos_c[:-1].sum() * d1 + rhos_c[-1] * (m - h1)  # rhos_c[:-1] has 0 or 1 entry
            predicted = 0.5 * d1 if previous_order == 2 else 0.0 * x  # the predictor's rhos_p = 0.5 at order 2
            corrected = x - alpha_t * b_h * (correction - predicted)
        order = min(2, n - i) if config.lower_order_final else 2
        order = min(order, lower_order_nums + 1)
        # UniP over (i -> i+1) from the corrected sample
        alpha_t, sigma_t = _alpha_sigma(sigmas[i + 1], flow)
        _, sigma_s = _alpha_sigma(sigmas[i], flow)
        h = lam[i + 1] - lam[i]
        h_phi_1, b_h, _ = _unipc_coefficients(h, 1, None)
        x_new = (sigma_t / sigma_s) * corrected - alpha_t * h_phi_1 * m
        if order == 2:
            rk = (lam[i - 1] - lam[i]) / h
            x_new = x_new - alpha_t * b_h * 0.5 * (h1 - m) / rk
        lower_order_nums, previous_order = min(lower_order_nums + 1, 2), order
        matrices.append((tuple(x_new.tolist()), tuple(m.tolist()), tuple(h1.tolist())))
    return StepTable("unipc", tuple(int(t) for t in scheduler.timesteps.tolist()), tuple(matrices))


def is_flow_config(scheduler_config: dict) -> bool:
    """True for a flow-matching model's scheduler config (`_class_name` FlowMatchEulerDiscreteScheduler)."""
    return scheduler_config.get("_class_name") == FLOW_SCHEDULER_CLASS


def calculate_shift(image_tokens: int, scheduler_config: dict) -> float:
    """mu of the dynamic shift: linear in the image's token count from (base_image_seq_len, base_shift) to
    (max_image_seq_len, max_shift), as diffusers' `calculate_shift` of the FLUX and SD3 pipelines (defaults
    256, 4096, 0.5, 1.15 where the config lacks a key)."""
    base_len = scheduler_config.get("base_image_seq_len", 256)
    max_len = scheduler_config.get("max_image_seq_len", 4096)
    base_shift = scheduler_config.get("base_shift", 0.5)
    max_shift = scheduler_config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_tokens * slope + (base_shift - slope * base_len)


def flow_set_timesteps(
    family, scheduler_config: dict, steps: int, image_tokens: int | None, *, flow_sigmas: bool = False
) -> dict:
    """The keyword arguments the family's pipeline passes to `scheduler.set_timesteps(steps, ...)`.

    FluxPipeline passes sigmas = linspace(1, 1 / steps, steps) (`Family.linspace_sigmas`; none to a
    scheduler with `use_flow_sigmas`, `flow_sigmas`: the multistep solvers' flow forms) and always mu;
    StableDiffusion3Pipeline passes no sigmas (the scheduler's own linspace of timesteps) and mu only with
    `use_dynamic_shifting`. mu = `calculate_shift(image_tokens)`; the scheduler applies it only with
    dynamic shifting (else its fixed `shift`).

    Args:
        family: a flow family (a `Family` or its name).
        scheduler_config: the model's `FlowMatchEulerDiscreteScheduler` config.
        steps: sampler steps, >= 1.
        image_tokens: the transformer's image sequence length (latent height x width / 4: FLUX's 2 x 2
            packing, SD3's patch 2); needed with dynamic shifting.

    Raises:
        ValueError: not a flow family, or dynamic shifting without `image_tokens`.
    """
    family = get_family(family) if family is not None else None
    if family is None or not family.flow_matching:
        raise ValueError(
            f"a flow-matching scheduler config ({FLOW_SCHEDULER_CLASS}) needs a flow family (sd3, flux); got "
            f"{family.name if family else None}: pass family= the model's"
        )
    kwargs: dict = {}
    if family.linspace_sigmas and not flow_sigmas:
        kwargs["sigmas"] = np.linspace(1.0, 1.0 / steps, steps).tolist()
    if scheduler_config.get("use_dynamic_shifting", False):
        if image_tokens is None:
            raise ValueError(
                "scheduler use_dynamic_shifting=True shifts sigmas by the image size: pass image_tokens "
                "(the transformer's image sequence length)"
            )
        kwargs["mu"] = calculate_shift(image_tokens, scheduler_config)  # only with dynamic shifting: diffusers'
    return kwargs  # multistep solvers refuse a mu without it


def euler_table(scheduler_config: dict, steps: int, set_timesteps: dict | None = None) -> StepTable:
    """Flow matching's Euler step, K = 0: `FlowMatchEulerDiscreteScheduler.step`,
    x_prev = x_t + (sigma_next - sigma) v, one row (1, sigma_next - sigma) per step.

    The scheduler is built `from_config(model config)` and `set_timesteps(steps, **set_timesteps)`
    (`flow_set_timesteps`: the pipeline's sigmas and mu), so sigmas carry the shift (SD3's 3.0) or the
    dynamic shift (FLUX.1-dev's, by image size). sigma_next - sigma is taken from the scheduler's float32
    sigmas exactly (their float64 difference, rounded once: diffusers' float32 subtraction); timesteps are
    the scheduler's float32 `timesteps` (sigma x 1000) as the pipelines hand them on (FLUX's transformer
    then reads t / 1000: the denoiser's job).

    Raises:
        ValueError: steps < 1; stochastic_sampling, invert_sigmas or a shift_terminal-free option the table
            does not write out (named, with the fix).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler  # heavy: seconds to import

    if steps < 1:
        raise ValueError(f"--steps {steps}: must be >= 1")
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    config = scheduler.config
    for key in ("stochastic_sampling", "invert_sigmas"):
        if config.get(key, False):
            raise ValueError(
                f"scheduler {key}=True: --scheduler euler writes out the deterministic flow Euler step; remove "
                f"{key} from the model's scheduler_config.json"
            )
    scheduler.set_timesteps(steps, **(set_timesteps or {}))
    sigmas = [float(sigma) for sigma in scheduler.sigmas.tolist()]
    matrices = tuple(((1.0, sigmas[i + 1] - sigmas[i]),) for i in range(steps))
    return StepTable("euler", tuple(float(t) for t in scheduler.timesteps.tolist()), matrices)


#: Scheduler name -> table builder `(scheduler_config, steps) -> StepTable` for DDPM models (epsilon, v,
#: sample); names are `RunConfig`'s `SCHEDULER_NAMES` with the flow ones (tests/test_solvers.py keeps them equal).
SCHEDULERS: dict[str, Callable[[dict, int], StepTable]] = {
    "ddim": ddim_table,
    "dpmpp-2m": dpmpp_2m_table,
    "unipc": unipc_table,
}
#: Scheduler name -> table builder `(scheduler_config, steps, set_timesteps kwargs) -> StepTable` for
#: flow-matching models.
FLOW_SCHEDULERS: dict[str, Callable[[dict, int, dict], StepTable]] = {
    "euler": euler_table,
    "dpmpp-2m": dpmpp_2m_table,
    "unipc": unipc_table,
}
#: K, the history tensors each scheduler's state carries (the export's input shapes depend on it).
HISTORY = {"ddim": 0, "dpmpp-2m": 1, "unipc": 2, "euler": 0}


def step_table(
    scheduler: str, scheduler_config: dict, steps: int, *, family=None, image_tokens: int | None = None
) -> StepTable:
    """The `StepTable` of `scheduler` ("ddim", "dpmpp-2m", "unipc", "euler") on the model's scheduler config.

    Args:
        scheduler: the sampler's name (`SCHEDULER_NAMES`).
        scheduler_config: the model's scheduler config.
        steps: sampler steps, >= 1.
        family: the model's family (a `Family` or name); needed for flow-matching models, whose pipelines
            set sigmas their own way (`flow_set_timesteps`).
        image_tokens: a flow transformer's image sequence length (for dynamic shifting).

    Raises:
        ValueError: an unknown scheduler name; a DDPM sampler on a flow model or `euler` on a DDPM model
            (naming the ones that fit); or what its builder refuses (see `_make`, `make_scheduler`).
    """
    if scheduler not in HISTORY:
        raise ValueError(f"--scheduler {scheduler!r}: expected one of {', '.join(SCHEDULER_NAMES)}")
    if is_flow_config(scheduler_config):
        if scheduler not in FLOW_SCHEDULERS:
            raise ValueError(
                f"--scheduler {scheduler}: the model is a flow-matching model ({FLOW_SCHEDULER_CLASS}; it predicts "
                f"a velocity), which {scheduler} does not sample; use --scheduler euler (the SD3 / FLUX pipelines' own "
                "step), or dpmpp-2m / unipc (diffusers' flow forms)"
            )
        kwargs = flow_set_timesteps(family, scheduler_config, steps, image_tokens, flow_sigmas=scheduler != "euler")
        return FLOW_SCHEDULERS[scheduler](scheduler_config, steps, kwargs)
    if scheduler not in SCHEDULERS:
        raise ValueError(
            f"--scheduler {scheduler}: flow matching's Euler step samples flow-matching models (SD3, FLUX.1); this "
            f"model's scheduler is {scheduler_config.get('_class_name', 'a DDPM scheduler')}: use "
            f"--scheduler {' or '.join(SCHEDULERS)}"
        )
    return SCHEDULERS[scheduler](scheduler_config, steps)


def history_slots(scheduler: str) -> int:
    """K of `scheduler` without building its table (export specs). Raises ValueError for an unknown name."""
    if scheduler not in HISTORY:
        raise ValueError(f"--scheduler {scheduler!r}: expected one of {', '.join(SCHEDULER_NAMES)}")
    return HISTORY[scheduler]
