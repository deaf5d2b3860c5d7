"""The conditioning a guidance rule's UNet terms read, encoded once per run.

Each term of a rule evaluates one UNet on one caption ("prompt" = the caption c, "empty" = "").
`eps_base` uses the pretrained text encoder and tokenizer, `eps_ft` the fine-tune's own (the same
objects when the checkpoint ships none). Tokenised like diffusers' `StableDiffusionPipeline`: padded
to the tokenizer's maximum length, truncated beyond it, the encoder's last hidden state.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

#: The UNet inputs one term's conditioning holds, in order (SD 1.x / 2.x: the text encoder's states).
CONDITIONING_KEYS = ("encoder_hidden_states",)


def _encode(encoder, tokenizer, text: str, device) -> torch.Tensor:
    limit = tokenizer.model_max_length
    length = len(tokenizer(text, truncation=False).input_ids)
    if length > limit:
        logger.warning(
            "the caption has %d tokens; the text encoder reads only the first %d (the rest is cut, as in "
            "diffusers' pipelines): %r",
            length,
            limit,
            text,
        )
    tokens = tokenizer(text, padding="max_length", max_length=limit, truncation=True, return_tensors="pt").input_ids
    return encoder(tokens.to(device))[0]


@torch.inference_mode()
def encode_conditioning(pair, rule, caption: str) -> tuple[torch.Tensor, ...]:
    """The conditioning tensors of every term of `rule`, flat, in term order and `CONDITIONING_KEYS` order.

    Args:
        pair: a `ModelPair` (on its run's device and precision).
        rule: a `finextract.engine.guidance.GuidanceRule`.
        caption: the training caption c ("prompt" terms); "empty" terms use "".

    Returns:
        One (1, L, D) tensor per term (SD: `encoder_hidden_states`, L = the tokenizer's maximum
        length, D = the UNet's cross_attention_dim), on the UNet's device in the UNet's dtype. Terms
        that share a (model, caption) share the encoding.
    """
    encoded: dict[tuple[str, str], torch.Tensor] = {}
    device, dtype = pair.device, pair.dtype
    for term in rule.terms:
        if term.key not in encoded:
            if term.model == "base":
                encoder, tokenizer = pair.base_text_encoder, pair.base_tokenizer
            else:
                encoder, tokenizer = pair.finetuned_text_encoder, pair.finetuned_tokenizer
            text = caption if term.caption == "prompt" else ""
            encoded[term.key] = _encode(encoder, tokenizer, text, device).to(device=device, dtype=dtype)
    return tuple(encoded[term.key] for term in rule.terms)
