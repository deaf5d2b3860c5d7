"""The fast torch CUDA path: UNets prepared for the GPU and the whole DDIM loop replayed as one CUDA graph.

`prepare_unet_for_cuda` puts a diffusers UNet in inference form (half-precision weights, SDPA
attention, channels-last). `GraphedDDIMLoop` captures one denoising step, `backend.predict` (both
UNet evaluations of the rule) followed by the fused guidance + DDIM kernel, on static buffers, and
replays it for every timestep: the timestep and the step's DDIM weights are copied on the device
from tables prepared once, so the loop issues no host synchronisation and no Python per kernel.

Anything that cannot be captured (no CUDA, a backend that synchronises, an unsupported op) falls
back to the same step run eagerly, with the same numbers, and says so in the log.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from finextract.kernels.cuda_guidance import ddim_weights_table, guided_ddim_step_cuda_weights

from finextract.runtime import torch_dtype

logger = logging.getLogger(__name__)


def prepare_unet_for_cuda(
    unet: torch.nn.Module,
    dtype: torch.dtype | str = torch.float16,
    channels_last: bool = True,
    device: str | torch.device = "cuda",
) -> torch.nn.Module:
    """Put a diffusers UNet in its fast inference form, in place.

    eval mode, no gradients, weights in `dtype` on `device`, SDPA attention (diffusers' default
    `AttnProcessor2_0`, set again in case a loader changed it) and channels-last convolution weights
    (cuDNN's fastest layout for fp16/bf16 convolutions; inputs may stay NCHW, the first conv converts).

    Args:
        unet: a `diffusers.UNet2DConditionModel` (LoRA-wrapped modules are kept).
        dtype: torch.float16 / torch.bfloat16 / torch.float32, or "fp16" / "bf16" / "fp32".
        channels_last: convert 4-D weights to channels-last memory format.
        device: target device ("cuda", "cuda:1"; "cpu" works too, for tests).

    Returns:
        The same module.

    Raises:
        ValueError: an unknown dtype name.
    """
    dtype = torch_dtype(dtype)
    unet.eval().requires_grad_(False)
    unet.to(device=device, dtype=dtype)
    if hasattr(unet, "set_default_attn_processor"):
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    return unet


def torch_fused_update(
    x_t: torch.Tensor, eps_a: torch.Tensor, eps_b: torch.Tensor | None, weights: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """The fused kernel's arithmetic in torch ops (fp32), on device weights: the fallback without CuPy.

    Args:
        x_t, eps_a, eps_b, out: same shape and dtype; eps_b may be None.
        weights: float32 tensor (3,) = (w_x, w_a, w_b) (see `ddim_weights`).

    Returns:
        out = w_x * x_t + w_a * eps_a + w_b * eps_b, cast to out's dtype.
    """
    acc = x_t.float() * weights[0] + eps_a.float() * weights[1]
    if eps_b is not None:
        acc += eps_b.float() * weights[2]
    return out.copy_(acc)


class GraphedDDIMLoop:
    """DDIM (eta = 0) sampling of one static batch with the whole step captured in a CUDA graph.

    Each step: `prediction = backend.predict(x, t)`, then
    x <- w_x x + w_a eps_a + w_b eps_b (the fused kernel), with (w_x, w_a, w_b) from
    `ddim_weights(prediction.coef_a, prediction.coef_b, a_t, a_prev)`.

    Args:
        backend: follows `finextract.engine.backends.base.Backend`; its `predict` must accept the
            static `x_t` and a 0-dim int64 device tensor `t` and return the same coefficients
            every call. For capture it must not synchronise the host (no `.item()`, no CPU copies).
        sample_shape: (B, C, h, w) of the static batch (pad the last batch to it).
        timesteps: the DDIM timesteps in sampling order (length = steps).
        alphas_prod_t, alphas_prod_t_prev: alphas_cumprod at each step's t and previous timestep.
        dtype: latent dtype (the backend's dtype).
        device: "cuda", "cuda:N" or "cpu" (cpu: eager, torch update; for tests).
        use_graph: capture a CUDA graph (CUDA only); False runs each step eagerly.
        use_kernel: use the fused CuPy kernel (CUDA only; falls back to `torch_fused_update`).
        warmup: eager steps on a side stream before capture (compiles the kernel, initialises cuBLAS).
        pool: optional CUDA graph memory pool shared with other graphs (`torch.cuda.graph_pool_handle()`).

    Raises:
        ValueError: schedule lengths that differ, or an empty schedule.
    """

    def __init__(
        self,
        backend,
        sample_shape: Sequence[int],
        timesteps: Sequence[int],
        alphas_prod_t: Sequence[float],
        alphas_prod_t_prev: Sequence[float],
        *,
        dtype: torch.dtype = torch.float16,
        device: str | torch.device = "cuda",
        use_graph: bool = True,
        use_kernel: bool = True,
        warmup: int = 2,
        pool=None,
    ) -> None:
        if not (len(timesteps) == len(alphas_prod_t) == len(alphas_prod_t_prev)) or len(timesteps) == 0:
            raise ValueError(
                f"GraphedDDIMLoop: timesteps ({len(timesteps)}), alphas_prod_t ({len(alphas_prod_t)}) and "
                f"alphas_prod_t_prev ({len(alphas_prod_t_prev)}) must be non-empty and of one length"
            )
        self.backend = backend
        self.device = torch.device(device)
        self.dtype = dtype
        self.is_cuda = self.device.type == "cuda"
        self.use_graph = use_graph and self.is_cuda
        self.use_kernel = use_kernel and self.is_cuda
        self.warmup = warmup
        self.pool = pool
        self.alphas = (list(map(float, alphas_prod_t)), list(map(float, alphas_prod_t_prev)))
        # Static buffers and tables, prepared once: the loop only copies rows of them on the device.
        self.timesteps = torch.as_tensor(list(timesteps), dtype=torch.int64, device=self.device)
        self.static_x = torch.zeros(tuple(sample_shape), dtype=dtype, device=self.device)
        self.static_out = torch.empty_like(self.static_x)
        self.static_t = self.timesteps[0].clone()
        self.static_weights = torch.zeros(3, dtype=torch.float32, device=self.device)
        self.weights_table: torch.Tensor | None = None
        self._index = 0  # the step whose t and weights are loaded
        self._prepared = False
        self.graph = None
        self.mode = "eager"
        # why the loop runs eagerly (None once a graph is captured); recorded in the sampler's log
        self.eager_reason: str | None = (
            "not a CUDA device" if not self.is_cuda else None if self.use_graph else "CUDA graphs turned off"
        )

    @classmethod
    def from_schedule(
        cls, backend, sample_shape: Sequence[int], schedule: Sequence[tuple[int, float, float]], **options
    ) -> GraphedDDIMLoop:
        """Build from `finextract.sampling.ddim_schedule(scheduler)`'s (t, alpha_prod_t, alpha_prod_t_prev) rows."""
        timesteps, alphas_prod_t, alphas_prod_t_prev = zip(*schedule) if schedule else ((), (), ())
        return cls(backend, sample_shape, timesteps, alphas_prod_t, alphas_prod_t_prev, **options)

    # -- one step on the static buffers (what the graph captures) --
    def _step(self) -> None:
        prediction = self.backend.predict(self.static_x, self.static_t)
        if self.weights_table is None:  # first call: the rule's coefficients fix the table
            self.weights_table = ddim_weights_table(
                prediction.coef_a, prediction.coef_b, *self.alphas, device=self.device
            )
            self.static_weights.copy_(self.weights_table[self._index])
        if self.use_kernel:
            guided_ddim_step_cuda_weights(
                self.static_x, prediction.eps_a, prediction.eps_b, self.static_weights, self.static_out
            )
        else:
            torch_fused_update(self.static_x, prediction.eps_a, prediction.eps_b, self.static_weights, self.static_out)
        self.static_x.copy_(self.static_out)

    def _load_step(self, index: int) -> None:
        self._index = index
        self.static_t.copy_(self.timesteps[index])
        if self.weights_table is not None:
            self.static_weights.copy_(self.weights_table[index])

    def _try_kernel(self) -> None:
        if not self.use_kernel:
            return
        try:
            from finextract.kernels.cuda_guidance import load_module

            load_module(self.device)
        except RuntimeError as error:
            logger.warning("fused guidance kernel unavailable (%s); using torch ops for the update", error)
            self.use_kernel = False

    def _capture(self) -> None:
        """Warm up on a side stream, then capture one step; on failure stay eager."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(max(1, self.warmup)):
                self._load_step(0)
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                self._step()
        except Exception as error:  # capture refuses host syncs and some ops: eager is still right
            self.eager_reason = f"capture failed ({type(error).__name__}: {error})"
            logger.warning(
                "CUDA graph capture of the denoising step failed (%s: %s); running it eagerly",
                type(error).__name__,
                error,
            )
            torch.cuda.synchronize(self.device)
            return
        self.graph = graph
        self.mode = "graph"
        self.eager_reason = None
        logger.debug("captured the DDIM step of batch %s in a CUDA graph", tuple(self.static_x.shape))

    def _check_shape(self, x_T: torch.Tensor) -> None:
        if tuple(x_T.shape) != tuple(self.static_x.shape):
            raise ValueError(
                f"GraphedDDIMLoop: x_T has shape {tuple(x_T.shape)}, the static batch is "
                f"{tuple(self.static_x.shape)}; pad the batch to it (or build a loop for this shape)"
            )

    def prepare(self, x_T: torch.Tensor) -> None:
        """Load the kernel, warm up and capture the step graph, once (later calls only load `x_T`).

        Args:
            x_T: (B, C, h, w) latents with the static shape (the warm-up steps run on them).

        Raises:
            ValueError: `x_T` does not have the static shape.
        """
        self._check_shape(x_T)
        with torch.no_grad():
            if not self._prepared:
                self._try_kernel()
                if self.use_graph:
                    self.static_x.copy_(x_T)
                    self._capture()
                self._prepared = True
            self.static_x.copy_(x_T)

    def step(self, index: int) -> None:
        """Advance the static latents by DDIM step `index` (0 = the first timestep): one graph replay
        (or the eager step). Call `prepare` first; no host synchronisation."""
        with torch.no_grad():
            self._load_step(index)
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()

    def run(self, x_T: torch.Tensor) -> torch.Tensor:
        """Denoise `x_T` through every timestep; returns x_0 latents (a new tensor, the static dtype).

        Args:
            x_T: (B, C, h, w) start latents with the static shape, on any device (copied in).

        Returns:
            (B, C, h, w) tensor on the loop's device: the denoised latents.

        Raises:
            ValueError: `x_T` does not have the static shape.
        """
        self.prepare(x_T)
        for index in range(len(self.timesteps)):
            self.step(index)
        return self.static_x.clone()
