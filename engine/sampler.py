"""Guided sampling of one model pair: conditioning once, paired start latents, the step-table loop, VAE decode.

    config = RunConfig.resolve(steps=50)
    sampler = Sampler(pair, rule_for("finextract", pair.kind), caption, config)
    images = sampler(seeds)            # uint8 (B, H, W, 3) on the CPU

Image i starts from the standard-normal latent drawn by a CPU generator seeded with `seeds[i]`, so
it does not depend on the method, the device, the batch size or how a run is chunked: image i of two
methods starts from the same latent (paired comparisons).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import torch

from .backends import get_backend_factory
from .conditioning import encode_conditioning
from .ddim import DDIMLoop, NonFiniteError, pad_batch
from .denoiser import GuidedDenoiser
from .denoisers import image_tokens
from .solvers import step_table

logger = logging.getLogger(__name__)

__all__ = ["NonFiniteError", "Sampler", "decode_latents", "start_latents"]


def start_latents(seeds: Sequence[int], shape: tuple[int, int, int]) -> torch.Tensor:
    """Standard-normal start latents x_T, one CPU generator per seed (paired across methods).

    Args:
        seeds: one integer seed per image.
        shape: (C, h, w) of one latent (SD 1.x: (4, 64, 64); the tiny models: (4, 16, 16)).

    Returns:
        float32 tensor (len(seeds), C, h, w) on the CPU.
    """
    latents = [torch.randn(shape, generator=torch.Generator().manual_seed(int(seed))) for seed in seeds]
    return torch.stack(latents) if latents else torch.empty((0, *shape))


@torch.inference_mode()
def decode_latents(vae, latents: torch.Tensor, *, on_device: bool = False) -> torch.Tensor:
    """VAE-decode latents x_0 to uint8 RGB images, as `StableDiffusionPipeline` post-processes them.

    Args:
        vae: `diffusers.AutoencoderKL`.
        latents: (B, C, h, w) latents, cast to the VAE's dtype and device.
        on_device: keep the images on the VAE's device (for SSCD on the GPU) instead of the CPU.

    Returns:
        uint8 tensor (B, H, W, 3), values round((x / 2 + 0.5).clamp(0, 1) * 255), on the CPU (or the
        VAE's device with `on_device`).

    Raises:
        NonFiniteError: the decoded images hold NaN/Inf.
    """
    parameter = next(vae.parameters())
    latents = latents.to(device=parameter.device, dtype=parameter.dtype) / vae.config.scaling_factor
    if getattr(vae.config, "shift_factor", None):
        latents = latents + vae.config.shift_factor
    images = vae.decode(latents, return_dict=False)[0].float()
    if not torch.isfinite(images).all():
        raise NonFiniteError(f"the VAE decoded non-finite values in {parameter.dtype}")
    images = ((images / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    images = images.permute(0, 2, 3, 1)
    return images if on_device else images.cpu()


class Sampler:
    """Guided sampling (`config.scheduler`: DDIM eta = 0, DPM-Solver++ 2M or UniPC) for one model pair, rule
    and caption, under one `RunConfig`.

    Built once per run: encodes the conditioning once, builds the step table, the guided denoiser and
    the backend. Each call samples a batch of seeds through the one loop (`DDIMLoop`): eagerly on a
    CPU; on CUDA with a capturable backend (torch, TensorRT) each step is one CUDA graph replay on a
    static batch (`config.batch_size`; the last batch is padded), with one finiteness check per batch
    and no host synchronisation inside the loop. The pair is never changed.

    If a reduced-precision run (fp16/bf16) produces NaN/Inf, the batch is rerun on an fp32 copy of
    the pair (made once, on first need) with a warning; the VAE likewise decodes in fp32.

    Args:
        pair: a `ModelPair` placed where `config` says (`pair.place(config)`).
        rule: a `finextract.engine.guidance.GuidanceRule` (see `finextract.rules.rule_for`).
        caption: the training caption c.
        config: the run's `finextract.engine.config.RunConfig`.
        images_on_device: return the decoded images on the device (SSCD then runs there).
        backend_options: extra keyword arguments for the backend factory (e.g. `providers=`).

    Raises:
        ValueError: the pair is not on `config`'s device / precision, or an unsupported scheduler config.
    """

    def __init__(
        self,
        pair,
        rule,
        caption: str,
        config,
        *,
        images_on_device: bool = False,
        backend_options: dict | None = None,
    ) -> None:
        if pair.device != config.torch_device and not (pair.device.type == config.torch_device.type == "cuda"):
            raise ValueError(
                f"the model pair is on {pair.device} but the run is on {config.device}; place it first: "
                "pair.place(config) (or load it with the same device)"
            )
        if pair.dtype != config.torch_dtype:
            raise ValueError(
                f"the model pair's UNets are {pair.dtype} but the run's dtype is {config.dtype}; place it first: "
                "pair.place(config)"
            )
        config.apply_threads()
        self.pair, self.rule, self.caption, self.config = pair, rule, caption, config
        self.images_on_device = images_on_device
        tokens = image_tokens(pair) if pair.family.flow_matching else None
        self.table = step_table(
            config.scheduler, pair.scheduler_config, config.steps, family=pair.family, image_tokens=tokens
        )
        device = config.torch_device
        self.timesteps = self.table.timesteps_tensor(device)
        self.weights = self.table.weights(*rule.coefs, device=device)
        self.denoiser = GuidedDenoiser(pair, rule)
        self.latent_shape = self.denoiser.latent_shape
        self.conditioning = encode_conditioning(pair, rule, caption)
        self._backend_options = dict(backend_options or {})
        self.backend = get_backend_factory(config.backend)(  # exported backends log their readiness
            self.denoiser, self.conditioning, config, **self._backend_options
        )
        self.use_graph = config.is_cuda and config.cuda_graphs and self.backend.capturable
        self._loops: dict[tuple[int, ...], DDIMLoop] = {}
        self._graph_pool = None
        self._fp32: Sampler | None = None

    def loop(self, batch: int) -> DDIMLoop:
        """The `DDIMLoop` serving a batch of `batch` latents, built on first use.

        Eager loops take any batch (one loop serves all). A graphed loop has a static batch:
        `config.batch_size` when `batch` fits in it (the batch is padded), else `batch` (a graph of its own).
        """
        size = (max(self.config.batch_size, batch) if self.use_graph else 0,)
        if size not in self._loops:
            if self.use_graph and self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()  # one memory pool for every static shape
            self._loops[size] = DDIMLoop(
                self.backend.step,
                self.timesteps,
                self.weights,
                history=self.table.history,
                graph=self.use_graph,
                pool=self._graph_pool,
                check_every_step=not self.config.is_cuda,
            )
        return self._loops[size]

    def denoise(self, x_T: torch.Tensor) -> torch.Tensor:
        """Run the sampling loop from `x_T` (B, C, h, w) to x_0.

        Returns:
            (B, C, h, w) float32 latents x_0 on the run's device (padding rows dropped).

        Raises:
            NonFiniteError: the latents became non-finite (checked every step on a CPU; once per
                batch on CUDA).
        """
        batch = x_T.shape[0]
        loop = self.loop(batch)
        if loop.use_graph:
            return loop.run(pad_batch(x_T.to(self.config.torch_device), max(self.config.batch_size, batch)))[:batch]
        return loop.run(x_T)

    def __call__(self, seeds: Sequence[int]) -> torch.Tensor:
        """Sample one image per seed.

        Returns:
            uint8 tensor (len(seeds), H, W, 3) on the CPU (on the device with `images_on_device`).

        Raises:
            NonFiniteError: non-finite values even in fp32 (a broken checkpoint).
        """
        x_T = start_latents(seeds, self.latent_shape)
        try:
            latents = self.denoise(x_T)
        except NonFiniteError as error:
            if self.config.dtype == "fp32":
                named = ", ".join(
                    f"{k} {self.pair.sources[k]}" for k in ("base", "finetuned") if k in self.pair.sources
                )
                raise NonFiniteError(
                    f"{error} in fp32{f' ({named})' if named else ''}: the pair computes NaN/Inf although its "
                    "weights are finite (load_model_pair checks them): a weight too large for float32 arithmetic, "
                    "or a fine-tune paired with a base it was not trained from"
                ) from None
            logger.warning("%s in %s; retrying seeds %d..%d in fp32", error, self.config.dtype, seeds[0], seeds[-1])
            latents = self._fp32_sampler().denoise(x_T)
        try:
            return decode_latents(self.pair.vae, latents, on_device=self.images_on_device)
        except NonFiniteError as error:
            if self.config.vae_dtype == "fp32":
                raise
            logger.warning("%s; decoding seeds %d..%d in fp32", error, seeds[0], seeds[-1])
            return decode_latents(self._fp32_sampler().pair.vae, latents, on_device=self.images_on_device)

    def _fp32_sampler(self) -> Sampler:
        """This run in fp32 on a float32 copy of the pair, built on first need (the pair is left as is)."""
        if self._fp32 is None:
            config = self.config.replace(dtype="fp32", vae_dtype="fp32", backend="torch")
            pair = copy.deepcopy(self.pair).place(config)
            self._fp32 = Sampler(pair, self.rule, self.caption, config, images_on_device=self.images_on_device)
        return self._fp32
