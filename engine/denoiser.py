"""The guided denoiser: ONE module per (model pair, guidance rule), for the whole batch, in one call.

"UNet" below is the family's denoiser: a UNet, or a flow family's transformer (SD3, FLUX.1), called
through `finextract.engine.denoisers.denoiser_output`.

    denoiser = GuidedDenoiser(pair, rule)
    output = denoiser(x_t, t, *conditioning)                 # the rule's combined model output
    state = denoiser.step(state, t, weights, *conditioning)  # + the fused guidance/sampler update

The rule's terms are grouped by the UNet module that evaluates them, and each group is ONE forward on
a stacked batch:
- LoRA pair: every term runs through the base UNet with its gated adapters, one forward on n*B with the
  gate 1 on the fine-tuned terms' rows and 0 on the base term's (`finextract.engine.lora`);
- CFG (both terms on the fine-tune): one forward on 2B, caption and empty conditioning stacked;
- a full fine-tune with FineXtract: two UNets, back to back on B each;
- Direct: one forward on B.

The torch backend runs this module; onnxruntime and TensorRT run its export (`step`, unchanged), so
there is one definition of what a rule computes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json

import torch
from torch import nn

from ..kernels.guidance_ddim import guided_update
from .conditioning import conditioning_keys
from .denoisers import denoiser_output, latent_shape
from .lora import gated


class GuidedDenoiser(nn.Module):
    """The rule's UNet terms for a batch of latents in one fused call, and the guided sampler step on them.

    The module holds the pair's UNets (shared, never copied or changed) and the rule's structure: which
    UNet evaluates each term, on which conditioning, with which LoRA gate. The rule's coefficients are
    not baked in: `forward` uses `rule.coefs`, and `step` takes them folded into a weights row, so one
    exported graph serves every w and k.

    Args:
        pair: a `finextract.engine.pair.ModelPair`, on its run's device and precision.
        rule: a `finextract.engine.guidance.GuidanceRule` (one or two terms).

    Inputs of `forward` / `step` (all on the pair's device):
        x_t: (B, C, h, w) float32 latents (cast to the UNet dtype for the forward); for `step`, the loop's
            state (B, (1 + K) * C, h, w): x_t, then the solver's K history tensors (K = 0 for DDIM).
        t: (1,) float32 timestep (a row of `StepTable.timesteps_tensor`), the same for the whole batch.
        weights: ((1 + K) * (3 + K),) float32, a row of `StepTable.weights(*rule.coefs)` (`step` only;
            DDIM: (w_x, w_a, w_b)).
        conditioning: `encode_conditioning(pair, rule, caption)`: per term, in term order, one tensor
            per key of `conditioning_keys(pair.family)`, each (1, ...) in the UNet dtype (expanded to the
            batch here).
    """

    def __init__(self, pair, rule) -> None:
        super().__init__()
        self.rule = rule
        self.coefs = tuple(float(coef) for coef in rule.coefs)[: len(rule.terms)]
        self.conditioning_keys = conditioning_keys(pair.family)
        unets: list[nn.Module] = []
        groups: list[tuple[int, list[int]]] = []
        for index, term in enumerate(rule.terms):
            unet = pair.unet_for(term.model)
            group = next((g for g in groups if unets[g[0]] is unet), None)
            if group is None:
                unets.append(unet)
                groups.append((len(unets) - 1, [index]))
            else:
                group[1].append(index)
        self.unets = nn.ModuleList(unets)
        self.groups = tuple((unet_index, tuple(members)) for unet_index, members in groups)
        self.lora_gate = pair.lora_gate
        self.family = pair.family
        self.latent_shape = latent_shape(pair)  # (C, h, w): the loop's unpacked latents
        self.latent_channels = self.latent_shape[0]
        parameter = next(unets[0].parameters())
        self.unet_dtype = parameter.dtype
        for number, (_, members) in enumerate(self.groups):  # LoRA pair: 1 = fine-tuned rows, 0 = base rows
            gates = [1.0 if rule.terms[index].model == "finetuned" else 0.0 for index in members]
            self.register_buffer(f"gates_{number}", torch.tensor(gates, device=parameter.device), persistent=False)
        self.pair = pair

    @property
    def structure(self) -> dict:
        """What the module computes besides the weights: terms, UNet groups, gating (the export cache key)."""
        return {
            "terms": [term.model for term in self.rule.terms],  # captions are inputs: one graph serves all
            "groups": [[unet_index, list(members)] for unet_index, members in self.groups],
            "gated": self.lora_gate is not None,
            "conditioning": list(self.conditioning_keys),
        }

    @property
    def fingerprint(self) -> str:
        """sha256 of the pair's weight fingerprint and `structure`: equal for equal computations."""
        payload = json.dumps({"pair": self.pair.fingerprint, "structure": self.structure}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    @property
    def conditioning_names(self) -> tuple[str, ...]:
        """Input names of the conditioning tensors, in order: `<key>_a`, then `<key>_b` for a second term."""
        return tuple(f"{key}_{'ab'[index]}" for index in range(len(self.rule.terms)) for key in self.conditioning_keys)

    def term_outputs(self, x_t: torch.Tensor, t: torch.Tensor, *conditioning: torch.Tensor) -> list[torch.Tensor]:
        """Each term's UNet output for `x_t`, in term order: float32 (B, C, h, w) tensors."""
        keys = self.conditioning_keys
        if len(conditioning) != len(self.rule.terms) * len(keys):
            raise ValueError(
                f"GuidedDenoiser: got {len(conditioning)} conditioning tensors; rule {self.rule.name!r} needs "
                f"{len(self.rule.terms) * len(keys)} ({', '.join(self.conditioning_names)}): use encode_conditioning"
            )
        per_term = [
            dict(zip(keys, conditioning[i * len(keys) : (i + 1) * len(keys)])) for i in range(len(self.rule.terms))
        ]
        batch = x_t.shape[0]
        sample = x_t.to(self.unet_dtype)
        outputs: list[torch.Tensor | None] = [None] * len(self.rule.terms)
        for number, (unet_index, members) in enumerate(self.groups):
            stacked = {
                key: torch.cat([per_term[i][key].expand(batch, *per_term[i][key].shape[1:]) for i in members])
                for key in keys
            }
            x = sample if len(members) == 1 else torch.cat([sample] * len(members))
            if self.lora_gate is not None:  # (n,) -> (n*B,): each term's gate on its B rows (export-friendly)
                gate = getattr(self, f"gates_{number}")[:, None].expand(-1, batch).reshape(-1)
                gate_context = gated(self.lora_gate, gate)
            else:
                gate_context = contextlib.nullcontext()
            with gate_context:
                output = denoiser_output(self.family, self.unets[unet_index], x, t, stacked)
            for j, index in enumerate(members):  # slices, not split(): a dynamic batch exports cleanly
                outputs[index] = output[j * batch : (j + 1) * batch].float()
        return outputs

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, *conditioning: torch.Tensor) -> torch.Tensor:
        """The rule's combined model output `sum(coef_i * output_i)`: float32 (B, C, h, w).

        For an epsilon model this is the guided noise prediction (FineXtract Eq. 13:
        `w * eps_ft(c) + (1 - w + k) * eps_base("")`).
        """
        outputs = self.term_outputs(x_t, t, *conditioning)
        combined = outputs[0] * self.coefs[0]
        for coef, output in zip(self.coefs[1:], outputs[1:]):
            combined = combined + coef * output
        return combined

    def step(self, x_t: torch.Tensor, t: torch.Tensor, weights: torch.Tensor, *conditioning: torch.Tensor):
        """One guided sampler step on the state: the next state, float32 (B, (1 + K) * C, h, w).

        The UNets run on x (the state's first C channels); each output block r is
        `w_x * x + w_a * output_a + w_b * output_b + sum_j w_hj * h_j` with block r's 3 + K weights
        (DDIM, K = 0: x_prev). The update is `finextract.kernels.guidance_ddim.guided_update`: the fused
        CUDA kernel on CUDA tensors, its torch reference on a CPU and inside an export.

        Raises:
            ValueError: a state that is not (1 + K) * C channels wide, or weights not (1 + K) * (3 + K).
        """
        channels = self.latent_channels
        blocks = x_t.shape[1] // channels
        history = blocks - 1
        if x_t.shape[1] != blocks * channels or not 1 <= blocks <= 3:
            raise ValueError(
                f"GuidedDenoiser.step: a state of {x_t.shape[1]} channels; expected (1 + K) * {channels}, K <= 2"
            )
        width = 3 + history
        if weights.numel() != blocks * width:
            raise ValueError(
                f"GuidedDenoiser.step: {weights.numel()} weights for K = {history} history tensors; expected "
                f"{blocks * width}, a StepTable row"
            )
        if not history:  # DDIM: the state is x_t, one block
            outputs = self.term_outputs(x_t, t, *conditioning)
            return guided_update(x_t, outputs[0], outputs[1] if len(outputs) == 2 else None, weights)
        # slices, not chunk(): exports cleanly with a dynamic batch
        x = x_t[:, :channels]
        past = tuple(x_t[:, (j + 1) * channels : (j + 2) * channels] for j in range(history))
        outputs = self.term_outputs(x, t, *conditioning)
        output_b = outputs[1] if len(outputs) == 2 else None
        new = [
            guided_update(x, outputs[0], output_b, weights[r * width : (r + 1) * width], history=past)
            for r in range(blocks)
        ]
        return torch.cat(new, dim=1)
