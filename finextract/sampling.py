"""Guided DDIM sampling: text embeddings once, paired start latents, the fused loop, VAE decode.

    sampler = Sampler(pair, rule_for("finextract", pair.kind), caption, steps=50)
    images = sampler(seeds)            # uint8 (B, H, W, 3) on the CPU

Image i starts from the standard-normal latent drawn by a CPU generator seeded with `seeds[i]`, so
it does not depend on the method, the device, the batch size or how a run is chunked (SPEC §1).
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from .kernels.guidance_ddim import guided_ddim_step
from .rules import GuidanceRule

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class NonFiniteError(RuntimeError):
    """Latents or images became NaN/Inf (typically fp16 overflow)."""


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """Map "fp32" / "fp16" / "bf16" (or a torch dtype) to a torch dtype allowed on `device`.

    Raises:
        ValueError: an unknown name, or fp16/bf16 on a CPU (slow and unsupported here).
    """
    if isinstance(dtype, torch.dtype):
        name = {v: k for k, v in DTYPES.items()}.get(dtype)
    else:
        name = dtype
    if name not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if name != "fp32" and torch.device(device).type != "cuda":
        raise ValueError(f"--dtype {name} needs a CUDA device (got {device!r}); use --dtype fp32 on a CPU")
    return DTYPES[name]


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
        encoder = pair.base_text_encoder if term.model == "base" else pair.finetuned_text_encoder
        text = caption if term.caption == "prompt" else ""
        tokens = pair.tokenizer(
            text, padding="max_length", max_length=pair.tokenizer.model_max_length, truncation=True, return_tensors="pt"
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
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """VAE-decode latents x_0 to uint8 RGB images, as `StableDiffusionPipeline` post-processes them.

    Args:
        vae: `diffusers.AutoencoderKL`.
        latents: (B, C, h, w) latents, cast to the VAE's dtype and device.

    Returns:
        uint8 tensor (B, H, W, 3) on the CPU, values round((x / 2 + 0.5).clamp(0, 1) * 255).

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
    return images.permute(0, 2, 3, 1).cpu()


class Sampler:
    """Guided DDIM (eta = 0) sampling for one model pair, rule and caption.

    Built once per run: moves the pair to `device` / `dtype` (the VAE to `vae_dtype`), encodes the
    text once, builds the backend. Each call samples a batch of seeds.

    Args:
        pair: a `ModelPair`; modified in place (device, dtype, injected LoRA adapters).
        rule: a `GuidanceRule` (see `finextract.rules.rule_for`).
        caption: the training caption c.
        steps: DDIM steps (the paper: 50).
        device: "cpu", "cuda" or "cuda:N".
        dtype: UNet precision, "fp32" | "fp16" | "bf16" (the last two on CUDA only).
        vae_dtype: VAE precision; fp32 by default, since fp16 VAEs overflow into black images.
        backend: a backend name from `finextract.engine.backends.BACKENDS`.
        impl: `guided_ddim_step`'s implementation switch ("auto", "cuda", "reference").
        backend_options: extra keyword arguments for the backend factory.

    Raises:
        ValueError: an unknown dtype/backend, fp16/bf16 on a CPU, an unsupported scheduler config.
    """

    def __init__(
        self, pair, rule: GuidanceRule, caption: str, *, steps: int = 50, device: str = "cpu", dtype: str = "fp32",
        vae_dtype: str = "fp32", backend: str = "torch", impl: str = "auto", backend_options: dict | None = None,
    ):
        from .engine.backends import get_backend_factory

        self.pair, self.rule, self.caption = pair, rule, caption
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, device)
        self.vae_dtype = resolve_dtype(vae_dtype, device)
        self.impl = impl
        self.scheduler = make_scheduler(pair.scheduler_config, steps)
        self.schedule = ddim_schedule(self.scheduler)
        self._factory = get_backend_factory(backend)
        self._backend_options = dict(backend_options or {})
        self._fallback = None
        unet_config = pair.base_unet.config
        self.latent_shape = (unet_config.in_channels, unet_config.sample_size, unet_config.sample_size)
        _place(pair, self.device, self.dtype, self.vae_dtype)
        self.text_embeddings = encode_text(pair, rule, caption)
        self.backend = self._factory(pair, rule, self.text_embeddings, device=device, dtype=self.dtype, **self._backend_options)

    @torch.inference_mode()
    def denoise(self, x_T: torch.Tensor, backend=None) -> torch.Tensor:
        """Run the DDIM loop from `x_T` (B, C, h, w) to x_0 with the guided prediction.

        Raises:
            NonFiniteError: the latents became non-finite at some step (checked every step).
        """
        backend = backend or self.backend
        x_t = x_T.to(self.device, torch.float32)
        for step, (t, alpha_prod_t, alpha_prod_t_prev) in enumerate(self.schedule):
            prediction = backend.predict(x_t, torch.tensor(t, device=self.device))
            x_t = guided_ddim_step(
                x_t, prediction.eps_a, prediction.eps_b, prediction.coef_a, prediction.coef_b,
                alpha_prod_t, alpha_prod_t_prev, impl=self.impl,
            )
            if not torch.isfinite(x_t).all():
                raise NonFiniteError(f"latents became non-finite at DDIM step {step} (t={t})")
        return x_t

    def __call__(self, seeds: Sequence[int]) -> torch.Tensor:
        """Sample one image per seed.

        Returns:
            uint8 tensor (len(seeds), H, W, 3) on the CPU.

        Raises:
            NonFiniteError: non-finite values even in fp32 (a broken checkpoint).
        """
        x_T = start_latents(seeds, self.latent_shape)
        try:
            latents = self.denoise(x_T)
        except NonFiniteError as error:
            if self.dtype == torch.float32:
                raise NonFiniteError(f"{error} in fp32: the checkpoint produces NaN/Inf; check it loads correctly") from None
            logger.warning("%s in %s; retrying seeds %d..%d in fp32", error, self.dtype, seeds[0], seeds[-1])
            latents = self._in_fp32(lambda: self.denoise(x_T, backend=self._fp32_backend()))
        try:
            return decode_latents(self.pair.vae, latents)
        except NonFiniteError as error:
            if self.vae_dtype == torch.float32:
                raise
            logger.warning("%s; decoding seeds %d..%d in fp32", error, seeds[0], seeds[-1])
            self.pair.vae.to(dtype=torch.float32)
            try:
                return decode_latents(self.pair.vae, latents)
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
        _place(self.pair, self.device, torch.float32, self.vae_dtype)
        try:
            return work()
        finally:
            _place(self.pair, self.device, self.dtype, self.vae_dtype)


def _place(pair, device: torch.device, dtype: torch.dtype, vae_dtype: torch.dtype) -> None:
    """Move the pair to `device`; UNets, text encoders and LoRA tensors to `dtype`, the VAE to `vae_dtype`.

    Not `ModelPair.to`, which would round-trip the VAE through `dtype` (lossy for fp32 -> bf16).
    Casts only when needed: diffusers warns on every `.to(dtype=...)`, even a no-op one.
    """
    models = [pair.base_unet, pair.finetuned_unet, pair.base_text_encoder, pair.finetuned_text_encoder]
    for model in {id(m): m for m in models if m is not None}.values():
        model.to(device=device, dtype=None if model.dtype == dtype else dtype)
    pair.vae.to(device=device, dtype=None if pair.vae.dtype == vae_dtype else vae_dtype)
    for layer in (pair.unet_lora or {}).values():
        layer.down, layer.up = layer.down.to(device, dtype), layer.up.to(device, dtype)
