"""The training objective of each kind of model, one function per parameterisation: DDPM noise (or
v) prediction for the UNet families, rectified flow (flow matching) for SD3 / FLUX.1's transformers.
`finextract.finetuning` and the trained zoo (`finextract.zoo.training`) train through `training_loss`;
the denoiser is called by the caller-given `predict(x_t, timesteps)`, so the loop, the data and the
optimiser are the same for every family.
"""

from __future__ import annotations

from collections.abc import Callable


def is_flow_matching(scheduler) -> bool:
    """Whether `scheduler` (a diffusers scheduler) samples a flow-matching model (the velocity
    parameterisation of SD3 / FLUX.1): diffusers' `FlowMatch*` schedulers."""
    return type(scheduler).__name__.startswith("FlowMatch")


def ddpm_noising(scheduler, latents, noise, generator):
    """DDPM's forward process at uniform random training timesteps (diffusers' `train_dreambooth.py`).

    Args:
        scheduler: a DDPM-style diffusers scheduler (`add_noise`, `num_train_timesteps`; `get_velocity`
            for v-prediction).
        latents: x0, (B, C, h, w) float, already multiplied by the VAE scaling factor.
        noise: eps, standard normal of the same shape.
        generator: torch.Generator on the latents' device (draws the timesteps).

    Returns:
        (x_t, timesteps (B,) int64 in [0, num_train_timesteps), target): the target is eps for
        prediction_type "epsilon", v = alpha_t eps - sigma_t x0 for "v_prediction".

    Raises:
        ValueError: another prediction_type.
    """
    import torch

    timesteps = torch.randint(
        0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator, device=latents.device
    ).long()
    x_t = scheduler.add_noise(latents, noise, timesteps)
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return x_t, timesteps, noise
    if prediction_type == "v_prediction":
        return x_t, timesteps, scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"scheduler prediction_type {prediction_type!r} is not supported (epsilon or v_prediction)")


def flow_matching_noising(scheduler, latents, noise, generator):
    """Rectified flow's interpolation at SD3's training sigmas.

    x_t = (1 - sigma) x0 + sigma eps, the velocity target v = eps - x0 (Esser et al. 2024, Eq. 2 and the
    conditional flow of Sec. 2). sigma is drawn as diffusers' `train_dreambooth_sd3.py` draws it
    (`weighting_scheme="logit_normal"`, mean 0, std 1): u = sigmoid(n), n ~ N(0, 1), then the
    scheduler's training sigma at index floor(u x num_train_timesteps), i.e. the shifted sigmas
    `FlowMatchEulerDiscreteScheduler` holds before `set_timesteps` (shift 3 for SD3: more weight on
    high noise). The model is called at timestep sigma x num_train_timesteps, as the pipelines call it.

    Args:
        scheduler: a freshly built `FlowMatchEulerDiscreteScheduler` (its training `sigmas` /
            `timesteps`, not those of a `set_timesteps` call).
        latents: x0, (B, C, h, w) float (VAE latents, shifted and scaled).
        noise: eps, standard normal of the same shape.
        generator: torch.Generator on the latents' device (draws n).

    Returns:
        (x_t, timesteps (B,) float32 in (0, 1000], target v = eps - x0).
    """
    import torch

    count = scheduler.config.num_train_timesteps
    n = torch.randn((latents.shape[0],), generator=generator, device=latents.device)
    index = (torch.sigmoid(n) * count).long().clamp(max=count - 1).cpu()
    sigmas = scheduler.sigmas[index].to(device=latents.device, dtype=latents.dtype)
    timesteps = scheduler.timesteps[index].to(device=latents.device, dtype=torch.float32)
    sigma = sigmas.reshape(-1, *[1] * (latents.ndim - 1))
    return (1 - sigma) * latents + sigma * noise, timesteps, noise - latents


def training_loss(scheduler, latents, predict: Callable, generator):
    """The denoising MSE of one batch for the model `scheduler` samples (DDPM's simple loss, or flow
    matching's velocity regression with uniform weighting).

    Args:
        scheduler: the model's diffusers scheduler: a `FlowMatch*` one (flow matching,
            `flow_matching_noising`) or a DDPM-style one (`ddpm_noising`).
        latents: x0, (B, C, h, w) float (scaled VAE latents).
        predict: `(x_t, timesteps) -> (B, C, h, w)`: the model's output (eps / v / velocity).
        generator: torch.Generator on the latents' device (noise, then timesteps).

    Returns:
        Scalar fp32 loss: mean over elements of (prediction - target)^2.
    """
    import torch
    import torch.nn.functional as F

    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    noising = flow_matching_noising if is_flow_matching(scheduler) else ddpm_noising
    x_t, timesteps, target = noising(scheduler, latents, noise, generator)
    return F.mse_loss(predict(x_t, timesteps).float(), target.float())


def denoising_loss(unet, scheduler, latents, encoder_hidden_states, generator):
    """Noise-prediction MSE (DDPM's simple loss) of a `UNet2DConditionModel` on scaled VAE latents
    ((B, C, h, w)) with text states (B, L, D): `training_loss` with the UNet's forward."""
    return training_loss(
        scheduler, latents, lambda x_t, timesteps: unet(x_t, timesteps, encoder_hidden_states).sample, generator
    )
