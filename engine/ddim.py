"""The one sampling loop: a per-step weights table, and one step function run eagerly or as a CUDA graph.

    table = step_table("ddim", pair.scheduler_config, steps=50)     # finextract.engine.solvers
    loop = DDIMLoop(backend.step, table.timesteps_tensor(device), table.weights(*rule.coefs, device=device),
                    history=table.history)
    x_0 = loop.run(x_T)

Every step of a guidance rule with UNet outputs `out_a`, `out_b` is linear in them, in `x_t` and in the
solver's history `h_1..h_K` (K = 0 for DDIM, 1 for DPM-Solver++ 2M, 2 for UniPC):

    x_prev = w_x * x_t + w_a * out_a + w_b * out_b + sum_j w_hj * h_j

and so is each new history tensor. A `StepTable` holds, per step, the (1 + K) x (3 + K) matrix of
these weights (one row per output block: x_prev, then the new h_1..h_K), computed once in float64 from
the model's own scheduler config and its prediction type; the step function (a backend's
`step(state, t, weights)`) and the CUDA kernel read the same rows. The loop's state packs x and the
history along the channel dimension, (B, (1 + K) * C, h, w), so K = 0 is DDIM's (B, C, h, w) and one
loop serves every solver. `DDIMTable` writes DDIM's rows; `finextract.engine.solvers` the multistep ones.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

#: Model parameterisations the table folds into the update (diffusers' `prediction_type`).
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
#: Timestep spacings `DDIMScheduler.set_timesteps` implements.
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")

StepFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class StepTable:
    """The per-step constants of one sampler: timesteps and the linear update of each step.

    Attributes:
        scheduler: the sampler's name ("ddim", "dpmpp-2m", "unipc", "euler": `finextract.engine.solvers`).
        timesteps: the denoiser's timestep at each step, in sampling order (length = steps): integers for
            DDPM schedulers, float32 values (sigma x 1000) for flow matching.
        matrices: per step, (1 + K) rows of 2 + K float64 weights over [x_t, output, h_1..h_K], where
            `output` is the rule's combined model output in the model's parameterisation; row 0 gives
            x_prev, row 1 + j the new h_j. K = 0 (DDIM): one row (w_x, w_o).
    """

    scheduler: str
    timesteps: tuple[float, ...]
    matrices: tuple[tuple[tuple[float, ...], ...], ...]

    def __post_init__(self) -> None:
        if not self.timesteps or len(self.timesteps) != len(self.matrices):
            raise ValueError(
                f"StepTable: {len(self.timesteps)} timesteps and {len(self.matrices)} matrices; "
                "need one matrix per timestep, and at least one"
            )
        blocks = len(self.matrices[0])
        for index, matrix in enumerate(self.matrices):
            if len(matrix) != blocks or any(len(row) != blocks + 1 for row in matrix):
                raise ValueError(f"StepTable: step {index}'s matrix is not ({blocks}, {blocks + 1}) like step 0's")
            if not all(math.isfinite(value) for row in matrix for value in row):
                raise ValueError(
                    f"StepTable: step {index} (t={self.timesteps[index]}) has a non-finite weight; check the "
                    "scheduler config (final sigma, lower_order_final)"
                )

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def history(self) -> int:
        """K, the history tensors the loop's state carries besides x (0 for DDIM)."""
        return len(self.matrices[0]) - 1

    @property
    def width(self) -> int:
        """Floats per step in `weights`: (1 + K) * (3 + K)."""
        return (1 + self.history) * (3 + self.history)

    def weights(self, coef_a: float, coef_b: float = 0.0, *, device: str | torch.device = "cpu") -> torch.Tensor:
        """Per-step weights of the guided update, computed in float64, stored as float32.

        The rule combines the UNet outputs in the model's own parameterisation (as diffusers' pipelines
        apply guidance), `output = coef_a * out_a + coef_b * out_b`, so a row (w_x, w_o, w_h1..) of a step's
        matrix becomes (w_x, w_o * coef_a, w_o * coef_b, w_h1..).

        Args:
            coef_a, coef_b: the rule's coefficients (`GuidanceRule.coefs`; Eq. 13: w, 1 - w + k).
            device: where the table lives (the loop copies rows on the device).

        Returns:
            float32 tensor (steps, (1 + K) * (3 + K)) on `device`: per step the output blocks' rows, one
            after the other (K = 0: (steps, 3), (w_x, w_a, w_b)).

        Raises:
            ValueError: a non-finite coefficient.
        """
        coef_a, coef_b = float(coef_a), float(coef_b)
        if not (math.isfinite(coef_a) and math.isfinite(coef_b)):
            raise ValueError(f"guidance coefficients must be finite, got coef_a={coef_a}, coef_b={coef_b}")
        rows = [
            [value for w_x, w_o, *w_h in matrix for value in (w_x, w_o * coef_a, w_o * coef_b, *w_h)]
            for matrix in self.matrices
        ]
        return torch.tensor(rows, dtype=torch.float64).to(device=device, dtype=torch.float32)

    def timesteps_tensor(self, device: str | torch.device = "cpu") -> torch.Tensor:
        """The timesteps as a float32 tensor (steps, 1): row i is the step's `t` input."""
        return torch.tensor(self.timesteps, dtype=torch.float32, device=device).reshape(-1, 1)


def check_steps_and_spacing(scheduler_config: dict, steps: int, name: str) -> None:
    """Refuse `steps` < 1 and a timestep spacing diffusers' schedulers do not implement (`--scheduler name`).

    Raises:
        ValueError: naming the setting and the fix.
    """
    if steps < 1:
        raise ValueError(f"--steps {steps}: must be >= 1 (the paper uses 50)")
    spacing = scheduler_config.get("timestep_spacing", "leading")
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(
            f"scheduler timestep_spacing={spacing!r}: --scheduler {name} (diffusers' scheduler) spaces timesteps as "
            f"{', '.join(TIMESTEP_SPACINGS)}; set one of them in the model's scheduler_config.json (SD's own: leading)"
        )


def check_linear(config, name: str) -> None:
    """Refuse a built scheduler's config whose step a table cannot reproduce: an unknown prediction type, or
    dynamic thresholding (not linear in the UNet output).

    Raises:
        ValueError: naming the setting and the fix.
    """
    if config.prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"scheduler prediction_type={config.prediction_type!r}: --scheduler {name} supports "
            f"{', '.join(PREDICTION_TYPES)}; fix the model's scheduler_config.json"
        )
    if config.thresholding:
        raise ValueError(
            f"scheduler thresholding=True (dynamic thresholding) is not linear in the UNet output, so --scheduler "
            f"{name} cannot reproduce it; set thresholding to false in the model's scheduler_config.json"
        )


def make_scheduler(scheduler_config: dict, steps: int):
    """A `diffusers.DDIMScheduler` from the model's own config, with `steps` timesteps set.

    Takes `timestep_spacing`, `steps_offset`, `rescale_betas_zero_snr`, `set_alpha_to_one` and the beta
    schedule from the config, as diffusers' pipelines do.

    Raises:
        ValueError: `steps` < 1, or a config the fused DDIM step cannot reproduce (dynamic
            thresholding, an unknown prediction type, timestep spacing or beta schedule).
    """
    # heavy: diffusers takes seconds to import; only the scheduler config check needs it
    from diffusers import DDIMScheduler

    check_steps_and_spacing(scheduler_config, steps, "ddim")
    beta_schedule = scheduler_config.get("beta_schedule", "linear")
    if "trained_betas" not in scheduler_config and beta_schedule not in BETA_SCHEDULES:
        raise ValueError(
            f"scheduler beta_schedule={beta_schedule!r}: DDIM supports {', '.join(BETA_SCHEDULES)} (or trained_betas); "
            "fix the model's scheduler_config.json"
        )
    scheduler = DDIMScheduler.from_config(scheduler_config)
    config = scheduler.config
    check_linear(config, "ddim")
    if config.clip_sample:
        logger.warning(
            "the model's scheduler config sets clip_sample=True; sampling without clipping (the SD default), "
            "since clipping the predicted x0 is not linear in the UNet output"
        )
        scheduler = DDIMScheduler.from_config(scheduler_config, clip_sample=False)
    scheduler.set_timesteps(steps)
    return scheduler


def _step_weights(prediction_type: str, a_t: float, a_prev: float) -> tuple[float, float]:
    """(x weight, output weight) of one DDIM step, eta = 0, in float64: x_prev = w_x * x_t + w_o * output.

    The step `diffusers.DDIMScheduler.step` takes (Song et al. 2021, Eq. 12), written out for each
    parameterisation of the model output:
    - epsilon: x0 = (x_t - sqrt(1-a_t) eps) / sqrt(a_t), x_prev = sqrt(a_prev) x0 + sqrt(1-a_prev) eps;
    - v_prediction: x0 = sqrt(a_t) x_t - sqrt(1-a_t) v, eps = sqrt(a_t) v + sqrt(1-a_t) x_t;
    - sample: eps = (x_t - sqrt(a_t) x0) / sqrt(1-a_t).
    """
    if prediction_type == "epsilon":
        return math.sqrt(a_prev / a_t), math.sqrt(1.0 - a_prev) - math.sqrt(a_prev * (1.0 - a_t) / a_t)
    if prediction_type == "v_prediction":
        return (
            math.sqrt(a_prev * a_t) + math.sqrt((1.0 - a_prev) * (1.0 - a_t)),
            math.sqrt((1.0 - a_prev) * a_t) - math.sqrt(a_prev * (1.0 - a_t)),
        )
    ratio = math.sqrt((1.0 - a_prev) / (1.0 - a_t))  # "sample": needs a_t < 1
    return ratio, math.sqrt(a_prev) - ratio * math.sqrt(a_t)


@dataclass(frozen=True)
class DDIMTable:
    """The per-step constants of one DDIM (eta = 0) schedule; `step_table()` writes them as `StepTable` rows.

    Attributes:
        prediction_type: "epsilon", "v_prediction" or "sample" (the model's scheduler config).
        timesteps: the timesteps in sampling order (length = steps), as `DDIMScheduler.timesteps`.
        alphas_prod_t: alphas_cumprod at each step's timestep.
        alphas_prod_t_prev: alphas_cumprod at the previous timestep t - T/steps (the scheduler's
            `final_alpha_cumprod` past the end), as `DDIMScheduler.step` looks it up.
    """

    prediction_type: str
    timesteps: tuple[int, ...]
    alphas_prod_t: tuple[float, ...]
    alphas_prod_t_prev: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {self.prediction_type!r}: expected one of {', '.join(PREDICTION_TYPES)}")
        if not (len(self.timesteps) == len(self.alphas_prod_t) == len(self.alphas_prod_t_prev)) or not self.timesteps:
            raise ValueError(
                f"DDIMTable: timesteps ({len(self.timesteps)}), alphas_prod_t ({len(self.alphas_prod_t)}) and "
                f"alphas_prod_t_prev ({len(self.alphas_prod_t_prev)}) must be non-empty and of one length"
            )

    @classmethod
    def from_scheduler(cls, scheduler) -> DDIMTable:
        """The table of a `diffusers.DDIMScheduler` whose timesteps are set (`set_timesteps`)."""
        stride = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        timesteps, a_t, a_prev = [], [], []
        for t in scheduler.timesteps.tolist():
            prev = t - stride
            timesteps.append(int(t))
            a_t.append(float(scheduler.alphas_cumprod[t]))
            a_prev.append(float(scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod))
        return cls(scheduler.config.prediction_type, tuple(timesteps), tuple(a_t), tuple(a_prev))

    @classmethod
    def from_scheduler_config(cls, scheduler_config: dict, steps: int) -> DDIMTable:
        """The table of the model's own scheduler config at `steps` steps (see `make_scheduler`).

        Raises:
            ValueError: see `make_scheduler`.
        """
        return cls.from_scheduler(make_scheduler(scheduler_config, steps))

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def weights(self, coef_a: float, coef_b: float = 0.0, *, device: str | torch.device = "cpu") -> torch.Tensor:
        """Per-step weights (w_x, w_a, w_b), float32 (steps, 3): `step_table().weights(...)`.

        The DDIM step of the combined output is `x_prev = w_x * x_t + w_o * output`, so
        `w_a = w_o * coef_a`, `w_b = w_o * coef_b`.

        Raises:
            ValueError: see `step_table` and `StepTable.weights`.
        """
        return self.step_table().weights(coef_a, coef_b, device=device)

    def step_table(self) -> StepTable:
        """The schedule as `StepTable` rows (K = 0): per step the one row (w_x, w_o), in float64.

        Raises:
            ValueError: an alpha outside (0, 1] (or a_t = 1 for "sample").
        """
        rows = []
        for t, a_t, a_prev in zip(self.timesteps, self.alphas_prod_t, self.alphas_prod_t_prev, strict=True):
            valid = 0.0 < a_t <= 1.0 and 0.0 < a_prev <= 1.0 and not (self.prediction_type == "sample" and a_t >= 1.0)
            if self.prediction_type == "v_prediction":  # zero-terminal-SNR schedules reach a_t = 0 with v
                valid = 0.0 <= a_t <= 1.0 and 0.0 < a_prev <= 1.0
            if not valid:
                raise ValueError(
                    f"alphas_cumprod at t={t} is {a_t} (previous {a_prev}): a {self.prediction_type} DDIM step "
                    "needs values in (0, 1]; check the scheduler config (beta schedule, rescale_betas_zero_snr)"
                )
            rows.append((_step_weights(self.prediction_type, a_t, a_prev),))
        return StepTable("ddim", self.timesteps, tuple(rows))

    def timesteps_tensor(self, device: str | torch.device = "cpu") -> torch.Tensor:
        """The timesteps as a float32 tensor (steps, 1): row i is the step's `t` input."""
        return torch.tensor(self.timesteps, dtype=torch.float32, device=device).reshape(-1, 1)


def pad_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """Pad a batch of latents with zero rows up to the static batch `size` (a CUDA graph's fixed shape).

    Args:
        x: (B, C, h, w) latents with B <= size.
        size: the static batch size.

    Returns:
        (size, C, h, w) tensor on `x`'s device and dtype; rows B.. are zeros (computed, then dropped).
        `x` itself when B == size.

    Raises:
        ValueError: B > size.
    """
    batch = x.shape[0]
    if batch > size:
        raise ValueError(f"batch of {batch} latents exceeds the static batch {size}; raise the static batch size")
    if batch == size:
        return x
    return torch.cat([x, x.new_zeros((size - batch, *x.shape[1:]))])


class NonFiniteError(RuntimeError):
    """Latents or images became NaN/Inf (typically fp16 overflow)."""


class DDIMLoop:
    """`state <- step(state, t_i, weights_i)` for every row of a `StepTable`, eagerly or replayed as a CUDA graph.

    Named for its first table; it runs every solver's. The state is x_t for DDIM (K = 0) and x_t with
    the solver's K history tensors packed after it along the channels for a multistep solver: `start`
    packs x_T with zero history (the first step's rows do not read it), `result` unpacks x.

    The eager loop and the graphed loop run the same `step` on the same rows: the graphed one records
    one call of `step` on static buffers (the whole rule's UNet work and the fused update) and replays it
    for every timestep after copying the step's `t` and weights row into those buffers on the device,
    so the loop issues no host synchronisation and no Python per kernel.

        loop.start(x_T); loop.step(0); ...; loop.step(steps - 1); x_0 = loop.result()   # == loop.run(x_T)

    Args:
        step: `step(state (B, (1 + K) * C, h, w) float32, t (1,) float32, weights ((1 + K) * (3 + K),)
            float32) -> the next state`, a backend's `step`. For capture it must not synchronise the host.
        timesteps: float32 (steps, 1) tensor on the loop's device (`StepTable.timesteps_tensor`).
        weights: float32 (steps, (1 + K) * (3 + K)) tensor on the same device (`StepTable.weights`).
        history: K, the table's history tensors (`StepTable.history`; 0 for DDIM).
        graph: capture the step in a CUDA graph (CUDA tensors only); the batch is then fixed by the first
            `start` (pad smaller batches to it with `pad_batch`).
        pool: optional CUDA graph memory pool shared with other graphs (`torch.cuda.graph_pool_handle()`).
        check_every_step: check the latents for NaN/Inf after every step (the eager CPU habit; on CUDA
            this would synchronise the host every step, so `result()` checks once instead).
        warmup: eager steps on a side stream before capture (kernel compilation, cuBLAS workspaces).

    Raises:
        ValueError: tables of different lengths or on different devices, or weights rows that are not
            (1 + K) * (3 + K) wide.
    """

    def __init__(
        self,
        step: StepFunction,
        timesteps: torch.Tensor,
        weights: torch.Tensor,
        *,
        history: int = 0,
        graph: bool = False,
        pool=None,
        check_every_step: bool = False,
        warmup: int = 2,
    ) -> None:
        width = (1 + history) * (3 + history)
        if (
            timesteps.shape[0] != weights.shape[0]
            or timesteps.device != weights.device
            or weights.shape[1:] != (width,)
        ):
            raise ValueError(
                f"DDIMLoop: timesteps {tuple(timesteps.shape)} on {timesteps.device} and weights "
                f"{tuple(weights.shape)} on {weights.device} must be (steps, 1) and (steps, {width}) on one device "
                f"(K = {history} history tensors)"
            )
        self.history = history
        self.step_function = step
        self.timesteps, self.weights = timesteps, weights
        self.device = weights.device
        self.use_graph = graph and self.device.type == "cuda"
        self.pool = pool
        self.check_every_step = check_every_step
        self.warmup = warmup
        self.mode = "eager"
        # why the loop runs eagerly (None once a graph is captured); recorded in the sampler's log
        self.eager_reason: str | None = None
        if self.device.type != "cuda":
            self.eager_reason = "not a CUDA device"
        elif not graph:
            self.eager_reason = "CUDA graphs turned off"
        self.x: torch.Tensor | None = None
        self._graph = None
        self._static: dict[str, torch.Tensor] | None = None
        self._index = 0

    @property
    def steps(self) -> int:
        return int(self.timesteps.shape[0])

    def start(self, x_T: torch.Tensor) -> None:
        """Load the start latents (B, C, h, w) (copied onto the loop's device as float32), with zero history."""
        x_T = x_T.to(device=self.device, dtype=torch.float32)
        if self.history:
            x_T = torch.cat([x_T, x_T.new_zeros((x_T.shape[0], self.history * x_T.shape[1], *x_T.shape[2:]))], 1)
        self._index = 0
        if not self.use_graph:
            self.x = x_T
            return
        if self._static is None:
            self._capture(x_T)
            if not self.use_graph:  # capture failed: the same step, eagerly
                self.x = x_T
                return
        elif tuple(x_T.shape) != tuple(self._static["x"].shape):
            raise ValueError(
                f"DDIMLoop: the state has shape {tuple(x_T.shape)}, the captured static batch is "
                f"{tuple(self._static['x'].shape)}; pad the batch to it (pad_batch) or build a loop for this shape"
            )
        self._static["x"].copy_(x_T)

    def step(self, index: int) -> None:
        """Advance the state by step `index` (0 = the first, noisiest timestep)."""
        with torch.inference_mode():
            if self._graph is None:
                self.x = self.step_function(self.x, self.timesteps[index], self.weights[index])
                if self.check_every_step and not torch.isfinite(self.x).all():
                    t = int(self.timesteps[index].item())
                    raise NonFiniteError(f"latents became non-finite at {self.label} step {index} (t={t})")
            else:
                self._static["t"].copy_(self.timesteps[index])
                self._static["weights"].copy_(self.weights[index])
                self._graph.replay()
        self._index = index + 1

    @property
    def label(self) -> str:
        """ "DDIM", or the multistep solver's history size, for messages."""
        return "DDIM" if not self.history else f"multistep (K = {self.history})"

    def result(self) -> torch.Tensor:
        """The current latents x (a new tensor, float32, unpacked from the state); after the last step, x_0.

        Raises:
            NonFiniteError: the state holds NaN/Inf (the loop's only host synchronisation on CUDA).
        """
        state = self.x if self._graph is None else self._static["x"]
        if not torch.isfinite(state).all():
            raise NonFiniteError(
                f"latents became non-finite during the {self.steps}-step {self.label} loop ({self.mode} mode)"
            )
        return state[:, : state.shape[1] // (1 + self.history)].clone()

    def run(self, x_T: torch.Tensor) -> torch.Tensor:
        """Denoise `x_T` (B, C, h, w) through every timestep; returns x_0 (float32, on the loop's device).

        Raises:
            NonFiniteError: non-finite latents (see `check_every_step`).
            ValueError: in graph mode, `x_T` does not have the captured batch.
        """
        self.start(x_T)
        for index in range(self.steps):
            self.step(index)
        return self.result()

    def _capture(self, x_T: torch.Tensor) -> None:
        """Static buffers, a warm-up on a side stream, then one captured step; on failure stay eager."""
        static = {"x": x_T.clone(), "t": self.timesteps[0].clone(), "weights": self.weights[0].clone()}
        self._static = static
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.inference_mode(), torch.cuda.stream(side):
            for _ in range(max(1, self.warmup)):
                self.step_function(static["x"], static["t"], static["weights"])
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.inference_mode(), torch.cuda.graph(graph, pool=self.pool):
                static["x"].copy_(self.step_function(static["x"], static["t"], static["weights"]))
        except Exception as error:  # capture refuses host syncs and some ops: eager is still right
            self.eager_reason = f"capture failed ({type(error).__name__}: {error})"
            logger.warning(
                "CUDA graph capture of the denoising step failed (%s); running it eagerly", self.eager_reason
            )
            torch.cuda.synchronize(self.device)
            self.use_graph = False
            self._static = None
            return
        self._graph = graph
        self.mode = "graph"
        self.eager_reason = None
        logger.debug("captured the DDIM step of batch %s in a CUDA graph", tuple(x_T.shape))
