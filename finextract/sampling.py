"""Guided DDIM sampling: text embeddings once, paired start latents, the fused loop, VAE decode.

    sampler = Sampler(pair, rule_for("finextract", pair.kind), caption, steps=50)
    images = sampler(seeds)            # uint8 (B, H, W, 3) on the CPU

Image i starts from the standard-normal latent drawn by a CPU generator seeded with `seeds[i]`, so
it does not depend on the method, the device, the batch size or how a run is chunked (SPEC §1).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from .kernels.guidance_ddim import guided_ddim_step
from .rules import GuidanceRule
from .runtime import torch_dtype

logger = logging.getLogger(__name__)

#: `--backend auto`: onnxruntime on a CPU (2.3-3x faster per step than torch on the tiny models, its
#: export cached), torch on CUDA (CUDA graphs + the fused kernel; TensorRT only when asked for).
AUTO_BACKENDS = {"cpu": "onnxruntime", "cuda": "torch"}


class NonFiniteError(RuntimeError):
    """Latents or images became NaN/Inf (typically fp16 overflow)."""


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """Map "fp32" / "fp16" / "bf16" (or a torch dtype) to a torch dtype allowed on `device`.

    Raises:
        ValueError: an unknown name or a non-float dtype, or fp16/bf16 on a CPU (slow and unsupported here).
    """
    resolved = torch_dtype(dtype)
    if resolved not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"--dtype {dtype!r}: expected one of fp32, fp16, bf16")
    if resolved != torch.float32 and torch.device(device).type != "cuda":
        raise ValueError(f"--dtype {dtype} needs a CUDA device (got {device!r}); use --dtype fp32 on a CPU")
    return resolved


def resolve_backend(backend: str, device: str | torch.device) -> str:
    """The backend name `backend` stands for on `device`: "auto" -> `AUTO_BACKENDS[device.type]`.

    Args:
        backend: "auto", "torch", "onnxruntime" or "tensorrt".
        device: the sampling device ("cpu", "cuda", "cuda:N").

    Returns:
        A key of `finextract.engine.backends.BACKENDS`.

    Raises:
        ValueError: an unknown backend name.
    """
    from .engine.backends import BACKENDS

    if backend == "auto":
        return AUTO_BACKENDS.get(torch.device(device).type, "torch")
    if backend not in BACKENDS:
        raise ValueError(f"--backend {backend!r}: expected auto or one of {', '.join(BACKENDS)}")
    return backend


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


@torch.inference_mode()
def encode_text(pair, rule: GuidanceRule, caption: str) -> dict[tuple[str, str], torch.Tensor]:
    """Encode the captions a rule needs, once per run.

    `eps_base` uses the pretrained text encoder, `eps_ft` the fine-tuned checkpoint's (the same
    object when it has none: SPEC §1). Tokenised like `StableDiffusionPipeline`: padded to the
    tokenizer's max length, the encoder's last hidden state.

    Args:
        pair: a `ModelPair`.
        rule: the guidance rule; one embedding per distinct `Term.key`.
        caption: the training caption c (the "prompt"); "empty" terms use "".

    Returns:
        (model, caption_kind) -> (1, L, D) tensor on the text encoder's device and dtype.
    """
    embeddings = {}
    for term in rule.terms:
        if term.key in embeddings:
            continue
        if term.model == "base":
            encoder, tokenizer = pair.base_text_encoder, pair.base_tokenizer
        else:
            encoder, tokenizer = pair.finetuned_text_encoder, pair.finetuned_tokenizer
        text = caption if term.caption == "prompt" else ""
        tokens = tokenizer(
            text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        device = next(encoder.parameters()).device
        embeddings[term.key] = encoder(tokens.to(device))[0]
    return embeddings


def make_scheduler(scheduler_config: dict, steps: int):
    """A `diffusers.DDIMScheduler` from the model's own config, with `steps` timesteps set.

    Raises:
        ValueError: `steps` < 1, or a config the fused DDIM step does not reproduce (prediction
            type other than "epsilon", dynamic thresholding).
    """
    from diffusers import DDIMScheduler

    if steps < 1:
        raise ValueError(f"--steps {steps}: must be >= 1 (the paper uses 50)")
    scheduler = DDIMScheduler.from_config(scheduler_config)
    config = scheduler.config
    if config.prediction_type != "epsilon":
        raise ValueError(f"scheduler prediction_type={config.prediction_type!r}: only 'epsilon' models are supported")
    if config.thresholding:
        raise ValueError("scheduler thresholding=True is not supported by the fused DDIM step; disable it")
    if config.clip_sample:
        logger.warning("the model's scheduler config sets clip_sample=True; sampling without clipping (SD 1.x default)")
        scheduler = DDIMScheduler.from_config(scheduler_config, clip_sample=False)
    scheduler.set_timesteps(steps)
    return scheduler


def ddim_schedule(scheduler) -> list[tuple[int, float, float]]:
    """(t, alpha_prod_t, alpha_prod_t_prev) per step, exactly as `DDIMScheduler.step` looks them up."""
    stride = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    schedule = []
    for t in scheduler.timesteps.tolist():
        prev = t - stride
        alpha_prev = scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod
        schedule.append((t, scheduler.alphas_cumprod[t].item(), float(alpha_prev)))
    return schedule


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
    """Guided DDIM (eta = 0) sampling for one model pair, rule and caption.

    Built once per run: moves the pair to `device` / `dtype` (the VAE to `vae_dtype`), encodes the
    text once, builds the backend. Each call samples a batch of seeds.

    On CUDA with the torch backend, the UNets are put in their fast form (`prepare_unet_for_cuda`:
    `dtype` weights, SDPA attention, channels-last) and, with `cuda_graphs`, each batch runs through a
    `GraphedDDIMLoop`: every step (both UNet evaluations + the fused guidance/DDIM kernel) is one
    CUDA graph replay on a static batch (the last batch is padded to it), with one finiteness check
    per batch and no host synchronisation inside the loop. On a CPU nothing of this applies.

    Args:
        pair: a `ModelPair`; modified in place (device, dtype, injected LoRA adapters).
        rule: a `GuidanceRule` (see `finextract.rules.rule_for`).
        caption: the training caption c.
        steps: DDIM steps (the paper: 50).
        device: "cpu", "cuda" or "cuda:N".
        dtype: UNet precision, "fp32" | "fp16" | "bf16" (the last two on CUDA only).
        vae_dtype: VAE precision; fp32 by default, since fp16 VAEs overflow into black images.
        backend: "auto" (see `resolve_backend`) or a name from `finextract.engine.backends.BACKENDS`.
        impl: `guided_ddim_step`'s implementation switch ("auto", "cuda", "reference").
        backend_options: extra keyword arguments for the backend factory.
        cuda_graphs: on CUDA with the torch backend, capture each step in a CUDA graph (default on).
        static_batch: the static batch of the graphed loop (default: the first batch's size); smaller
            batches are padded up to it, larger ones get their own graph.
        images_on_device: return the decoded images on `device` (SSCD then runs there) instead of the CPU.

    Raises:
        ValueError: an unknown dtype/backend, fp16/bf16 on a CPU, an unsupported scheduler config.
    """

    def __init__(
        self,
        pair,
        rule: GuidanceRule,
        caption: str,
        *,
        steps: int = 50,
        device: str = "cpu",
        dtype: str = "fp32",
        vae_dtype: str = "fp32",
        backend: str = "torch",
        impl: str = "auto",
        backend_options: dict | None = None,
        cuda_graphs: bool = True,
        static_batch: int | None = None,
        images_on_device: bool = False,
    ):
        import time

        from .engine.backends import get_backend_factory

        self.pair, self.rule, self.caption = pair, rule, caption
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, device)
        self.vae_dtype = resolve_dtype(vae_dtype, device)
        self.impl = impl
        self.backend_name = resolve_backend(backend, self.device)
        self.scheduler = make_scheduler(pair.scheduler_config, steps)
        self.schedule = ddim_schedule(self.scheduler)
        self._factory = get_backend_factory(self.backend_name)
        self._backend_options = dict(backend_options or {})
        self._fallback = None
        is_cuda = self.device.type == "cuda"
        # the graphed loop needs a backend that never synchronises the host: the torch backend's forward
        self.cuda_graphs = bool(cuda_graphs) and is_cuda and self.backend_name == "torch"
        self.static_batch = static_batch
        self.images_on_device = images_on_device
        self._loops: dict[tuple[int, ...], object] = {}
        self._graph_pool = None
        unet_config = pair.base_unet.config
        self.latent_shape = (unet_config.in_channels, unet_config.sample_size, unet_config.sample_size)
        pair.to(self.device, self.dtype, vae_dtype=self.vae_dtype)
        if is_cuda and self.backend_name == "torch":
            _prepare_unets(pair, self.device, self.dtype)
        self.text_embeddings = encode_text(pair, rule, caption)
        if self.backend_name != "torch":
            logger.info(
                "preparing the %s backend (a first run exports the ONNX graph into the cache; later runs reuse it)",
                self.backend_name,
            )
        started = time.perf_counter()
        self.backend = self._factory(
            pair, rule, self.text_embeddings, device=device, dtype=self.dtype, **self._backend_options
        )
        if self.backend_name != "torch":
            logger.info("%s backend ready in %.1f s", self.backend_name, time.perf_counter() - started)

    @torch.inference_mode()
    def denoise(self, x_T: torch.Tensor, backend=None) -> torch.Tensor:
        """Run the DDIM loop eagerly from `x_T` (B, C, h, w) to x_0 with the guided prediction.

        Returns:
            (B, C, h, w) float32 latents x_0 on the sampler's device.

        Raises:
            NonFiniteError: the latents became non-finite (checked every step on a CPU; once at the
                end on CUDA, where a per-step check would synchronise the host every step).
        """
        backend = backend or self.backend
        per_step_check = self.device.type != "cuda"
        x_t = x_T.to(self.device, torch.float32)
        for step, (t, alpha_prod_t, alpha_prod_t_prev) in enumerate(self.schedule):
            prediction = backend.predict(x_t, torch.tensor(t, device=self.device))
            x_t = guided_ddim_step(
                x_t,
                prediction.eps_a,
                prediction.eps_b,
                prediction.coef_a,
                prediction.coef_b,
                alpha_prod_t,
                alpha_prod_t_prev,
                impl=self.impl,
            )
            if per_step_check and not torch.isfinite(x_t).all():
                raise NonFiniteError(f"latents became non-finite at DDIM step {step} (t={t})")
        if not per_step_check and not torch.isfinite(x_t).all():
            raise NonFiniteError(f"latents became non-finite during the {len(self.schedule)}-step DDIM loop")
        return x_t

    def static_loop(self, batch: int):
        """The `GraphedDDIMLoop` serving a batch of `batch` latents, built on first use.

        Its static batch is `static_batch` when `batch` fits in it (the batch is padded), else
        `batch` (a graph of its own). Latents stay float32 (as in `denoise`); the backend casts them
        to the UNet dtype for the forward.

        Returns:
            A `finextract.engine.cuda_graph.GraphedDDIMLoop` (on a CPU: its eager twin, for tests).
        """
        from .engine.cuda_graph import GraphedDDIMLoop

        if self.static_batch is None:
            self.static_batch = batch
        size = self.static_batch if batch <= self.static_batch else batch
        shape = (size, *self.latent_shape)
        if shape not in self._loops:
            if self.device.type == "cuda" and self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()  # one memory pool for every static shape
            self._loops[shape] = GraphedDDIMLoop.from_schedule(
                self.backend,
                shape,
                self.schedule,
                dtype=torch.float32,
                device=self.device,
                use_graph=self.device.type == "cuda",
                use_kernel=self.impl != "reference",
                pool=self._graph_pool,
            )
        return self._loops[shape]

    @torch.inference_mode()
    def denoise_static(self, x_T: torch.Tensor) -> torch.Tensor:
        """Run the DDIM loop on a static batch (`static_loop`): a CUDA graph per step on CUDA.

        Args:
            x_T: (B, C, h, w) start latents.

        Returns:
            (B, C, h, w) float32 latents x_0 on the sampler's device (padding rows dropped).

        Raises:
            NonFiniteError: non-finite latents (one check per batch, after the loop).
        """
        batch = x_T.shape[0]
        loop = self.static_loop(batch)
        x_0 = loop.run(pad_batch(x_T.to(self.device, torch.float32), loop.static_x.shape[0]))[:batch]
        if not torch.isfinite(x_0).all():  # the loop's only host synchronisation
            raise NonFiniteError(
                f"latents became non-finite during the {len(self.schedule)}-step DDIM loop ({loop.mode} mode)"
            )
        return x_0

    def __call__(self, seeds: Sequence[int]) -> torch.Tensor:
        """Sample one image per seed.

        Returns:
            uint8 tensor (len(seeds), H, W, 3) on the CPU (on the device with `images_on_device`).

        Raises:
            NonFiniteError: non-finite values even in fp32 (a broken checkpoint).
        """
        x_T = start_latents(seeds, self.latent_shape)
        try:
            latents = self.denoise_static(x_T) if self.cuda_graphs else self.denoise(x_T)
        except NonFiniteError as error:
            if self.dtype == torch.float32:
                raise NonFiniteError(
                    f"{error} in fp32: the checkpoint produces NaN/Inf; check it loads correctly"
                ) from None
            logger.warning("%s in %s; retrying seeds %d..%d in fp32", error, self.dtype, seeds[0], seeds[-1])
            latents = self._in_fp32(lambda: self.denoise(x_T, backend=self._fp32_backend()))
        try:
            return decode_latents(self.pair.vae, latents, on_device=self.images_on_device)
        except NonFiniteError as error:
            if self.vae_dtype == torch.float32:
                raise
            logger.warning("%s; decoding seeds %d..%d in fp32", error, seeds[0], seeds[-1])
            self.pair.vae.to(dtype=torch.float32)
            try:
                return decode_latents(self.pair.vae, latents, on_device=self.images_on_device)
            finally:
                self.pair.vae.to(dtype=self.vae_dtype)

    def _fp32_backend(self):
        if self._fallback is None:
            embeddings = {key: value.float() for key, value in self.text_embeddings.items()}
            self._fallback = self._factory(
                self.pair, self.rule, embeddings, device=self.device, dtype=torch.float32, **self._backend_options
            )
        return self._fallback

    def _in_fp32(self, work):
        """Run `work()` with the pair in fp32, then cast it back (fp16/bf16 -> fp32 -> back is exact)."""
        self.pair.to(self.device, torch.float32, vae_dtype=self.vae_dtype)
        try:
            return work()
        finally:
            self.pair.to(self.device, self.dtype, vae_dtype=self.vae_dtype)
            # the casts gave the weights new storage: captured graphs point at the old one, so rebuild them
            self._loops.clear()


def _prepare_unets(pair, device: torch.device, dtype: torch.dtype) -> None:
    """`prepare_unet_for_cuda` on both UNets (dtype weights, SDPA attention, channels-last)."""
    from .engine.cuda_graph import prepare_unet_for_cuda

    for unet in {id(u): u for u in (pair.base_unet, pair.finetuned_unet) if u is not None}.values():
        prepare_unet_for_cuda(unet, dtype, channels_last=True, device=device)
