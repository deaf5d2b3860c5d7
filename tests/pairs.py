"""`ModelPair`s assembled from `finextract.zoo.models.tiny_components` parts (tests only)."""

from __future__ import annotations


def pair_from_parts(base: dict, *, finetuned_unet=None, unet_lora=None, finetuned_text_encoder=None):
    """A `ModelPair` on the parts `base` (unet, text_encoder, tokenizer, vae, scheduler): DreamBooth-kind
    with `finetuned_unet`, else LoRA-kind (`unet_lora` or None); the fine-tune's text encoder defaults to
    the base's."""
    from finextract.engine.pair import ModelPair

    return ModelPair(
        kind="dreambooth" if finetuned_unet is not None else "lora",
        base_unet=base["unet"],
        finetuned_unet=finetuned_unet,
        unet_lora=unet_lora,
        base_text_encoder=base["text_encoder"],
        finetuned_text_encoder=base["text_encoder"] if finetuned_text_encoder is None else finetuned_text_encoder,
        base_tokenizer=base["tokenizer"],
        vae=base["vae"],
        scheduler_config=dict(base["scheduler"].config),
    )
