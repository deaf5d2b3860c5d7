"""The torch backend: the reference for every other backend, on CPU or CUDA.

A rule's terms are grouped by the UNet module that evaluates them, and each group is ONE forward
on a stacked batch:

- LoRA pair: both terms run through the base UNet with gated adapters, one forward on 2B with the
  gate 0 on the base half and 1 on the fine-tuned half (`finextract.engine.lora`).
- CFG (both terms on the fine-tune): one forward on 2B, caption and empty embeddings stacked.
- DreamBooth pair with FineXtract: two UNets, called back to back on B each.
- Direct: one forward on B.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..lora import gated, inject_lora, lora_gate_of
from .base import Prediction


@dataclass
class _Group:
    """Terms evaluated by one UNet forward: which UNet, their term indices, embeddings and gates."""

    unet: torch.nn.Module
    term_indices: list[int]
    embeddings: list[torch.Tensor]  # (1, L, D) each
    gates: list[float] | None  # per term, None when the UNet has no LoRA


class TorchBackend:
    """Evaluates a `GuidanceRule`'s UNet terms with torch, one fused forward per UNet.

    Args:
        pair: the `ModelPair`, already on `device` in `dtype` (the sampler moves it). A LoRA pair's
            adapters are injected into `pair.base_unet` once (in place; later backends reuse them).
        rule: the `finextract.rules.GuidanceRule` to evaluate.
        text_embeddings: `encode_text`'s output, (model, caption) -> (1, L, D) tensor.
        device: where `x_t` lives ("cpu", "cuda", "cuda:N").
        dtype: the UNet's dtype; latents are cast to it for the forward.

    Raises:
        KeyError: `text_embeddings` lacks an embedding the rule needs, or a LoRA path matches no module.
    """

    name = "torch"

    def __init__(self, pair, rule, text_embeddings: dict, *, device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.rule = rule
        self.device = torch.device(device)
        self.dtype = dtype
        gate = None
        if pair.unet_lora:
            # GatedLoRA modules take the device and dtype of the layer they wrap
            gate = lora_gate_of(pair.base_unet) or inject_lora(pair.base_unet, pair.unet_lora)
        self._gate = gate
        groups: dict[int, _Group] = {}
        for index, term in enumerate(rule.terms):
            if term.key not in text_embeddings:
                raise KeyError(f"text_embeddings has no {term.key}; build it with encode_text(pair, rule, caption)")
            if term.model == "finetuned" and pair.finetuned_unet is not None:
                unet = pair.finetuned_unet
            else:
                unet = pair.base_unet
            group = groups.setdefault(id(unet), _Group(unet, [], [], [] if gate is not None else None))
            group.term_indices.append(index)
            group.embeddings.append(text_embeddings[term.key].to(device=self.device, dtype=dtype))
            if group.gates is not None:
                group.gates.append(1.0 if term.model == "finetuned" else 0.0)
        self._groups = list(groups.values())
        self._cache: dict[int, list[tuple[torch.Tensor, torch.Tensor | None]]] = {}

    @property
    def forwards_per_step(self) -> int:
        """UNet forwards per denoising step (1 for LoRA, CFG and Direct; 2 for DreamBooth FineXtract)."""
        return len(self._groups)

    def _batch_inputs(self, batch: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Per group: stacked embeddings (n*B, L, D) and gate values (n*B,), cached per batch size."""
        if batch not in self._cache:
            inputs = []
            for group in self._groups:
                embeddings = torch.cat([e.expand(batch, -1, -1) for e in group.embeddings])
                gate = None
                if group.gates is not None:
                    gate = torch.tensor(group.gates, device=self.device).repeat_interleave(batch).to(self.dtype)
                inputs.append((embeddings, gate))
            self._cache[batch] = inputs
        return self._cache[batch]

    @torch.inference_mode()
    def predict(self, x_t: torch.Tensor, t: torch.Tensor) -> Prediction:
        """Both noise predictions of the rule for `x_t` (B, C, h, w) at timestep `t` (0-dim int64).

        Returns:
            `Prediction` with eps_a / eps_b in the order of `rule.terms`, each (B, C, h, w) in
            `x_t`'s dtype, and the rule's coefficients.
        """
        batch = x_t.shape[0]
        x_in = x_t.to(self.dtype)
        eps: list[torch.Tensor | None] = [None] * len(self.rule.terms)
        for group, (embeddings, gate) in zip(self._groups, self._batch_inputs(batch)):
            n = len(group.term_indices)
            sample = x_in if n == 1 else torch.cat([x_in] * n)
            if gate is not None:  # LoRA pair: adapters on for the fine-tuned half only
                with gated(self._gate, gate):
                    out = group.unet(sample, t, encoder_hidden_states=embeddings, return_dict=False)[0]
            else:
                out = group.unet(sample, t, encoder_hidden_states=embeddings, return_dict=False)[0]
            for index, chunk in zip(group.term_indices, out.to(x_t.dtype).split(batch)):
                eps[index] = chunk
        coef_a, coef_b = self.rule.coefs
        return Prediction(eps[0], eps[1] if len(eps) == 2 else None, coef_a, coef_b)
