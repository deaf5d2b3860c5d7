"""One guided sampler step on a compiled backend against the torch backend (the reference), for the tests of
the onnxruntime and OpenVINO backends: DDIM's (K = 0) and the multistep solvers' (K = 1, 2 history tensors)."""

from __future__ import annotations

import torch

from tests import tolerances


def backends(backend_class, pair, rule, config, caption: str):
    """(`backend_class`'s backend, the torch backend) of one `GuidedDenoiser(pair, rule)` on `caption`."""
    from finextract.engine.backends.torch_backend import TorchBackend
    from finextract.engine.conditioning import encode_conditioning
    from finextract.engine.denoiser import GuidedDenoiser

    denoiser = GuidedDenoiser(pair, rule)
    conditioning = encode_conditioning(pair, rule, caption)
    return backend_class(denoiser, conditioning, config), TorchBackend(denoiser, conditioning, config)


def step_row(pair, rule, index: int = 10, scheduler: str = "ddim"):
    """(t, weights) of step `index` of a 50-step `scheduler` table on the pair's scheduler config (a flow
    model's DDIM: its Euler step)."""
    from finextract.engine.denoisers import image_tokens
    from finextract.engine.solvers import step_table

    flow = pair.family.flow_matching
    scheduler = "euler" if flow and scheduler == "ddim" else scheduler
    tokens = image_tokens(pair) if flow else None
    table = step_table(scheduler, pair.scheduler_config, 50, family=pair.family, image_tokens=tokens)
    return table.timesteps_tensor()[index], table.weights(*rule.coefs)[index]


def step_bound(unet, reference, x_t, t, weights) -> float:
    """Each term's UNet output within the network bound of `unet` (other kernels, other order), weighted by
    the largest |w_a|, |w_b| of any output block (the state's x and, for a multistep solver, each new
    history tensor); twice, for the two evaluations."""
    channels = reference.denoiser.latent_channels
    blocks = x_t.shape[1] // channels
    rows = weights.reshape(blocks, -1)[:, 1:3].abs()
    with torch.inference_mode():
        outputs = reference.denoiser.term_outputs(x_t[:, :channels], t, *reference.conditioning)
    return 2 * sum(w * tolerances.network(unet, o) for w, o in zip(rows.max(0).values.tolist(), outputs))


def assert_step_matches(ours, reference, unet, pair, rule, scheduler: str = "ddim") -> None:
    """`ours` steps a seeded float32 batch of 3 states as `reference` does, within `step_bound`, and moves it.

    The state is x_t for DDIM and x_t with the solver's history (random here) for a multistep one; the
    backends were built for `scheduler` (their config's)."""
    from finextract.engine.solvers import history_slots

    blocks = 1 + history_slots(scheduler)
    channels, h, w = reference.denoiser.latent_shape
    x_t = torch.randn(3, channels * blocks, h, w, generator=torch.Generator().manual_seed(0))
    t, weights = step_row(pair, rule, scheduler=scheduler)
    x_ours, x_ref = ours.step(x_t, t, weights), reference.step(x_t, t, weights)
    assert x_ours.shape == x_t.shape and x_ours.dtype == torch.float32
    assert (x_ours - x_ref).abs().max().item() <= step_bound(unet, reference, x_t, t, weights)
    assert (x_ours - x_t).abs().max().item() > 1e-3  # the step moved the latents
