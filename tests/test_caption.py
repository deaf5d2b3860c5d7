"""Caption recovery from cross-attention deltas (`finextract.caption`), on tiny random models."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.pairs import pair_from_parts

CAPTION = "photo of sks"


def _pair(components, finetuned_unet=None, unet_lora=None):
    if finetuned_unet is None:  # a LoRA pair: its own copy of the base UNet
        components = {**components, "unet": copy.deepcopy(components["unet"])}
    return pair_from_parts(components, finetuned_unet=finetuned_unet, unet_lora=unet_lora)


def _planted(components, caption):
    """A DreamBooth whose only change is on attn2.to_k / to_v, built the way fine-tuning on `caption`
    builds it: delta W = G H^T with H the caption's 77 text states (77, D) and G random (out, 77)."""
    from finextract.training_parts import tokenize

    tokenizer, text_encoder = components["tokenizer"], components["text_encoder"]
    with torch.no_grad():
        states = text_encoder(tokenize(tokenizer, [caption]))[0][0].float()  # (77, D)
    unet = copy.deepcopy(components["unet"])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith(("attn2.to_k", "attn2.to_v")):
                g = torch.randn(module.weight.shape[0], states.shape[0], generator=generator)
                module.weight += 1e-2 * g @ states
    return _pair(components, finetuned_unet=unet)


@pytest.fixture(scope="module")
def planted(tiny_base):
    return _planted(tiny_base, CAPTION)


def _vocabulary(tokenizer, size=40, seed=0, caption=CAPTION):
    """The caption's tokens among `size` random others (a small vocabulary keeps the test fast)."""
    from finextract.caption import candidate_tokens

    own = tokenizer(caption, add_special_tokens=False).input_ids
    every = candidate_tokens(tokenizer)
    others = every[torch.randperm(len(every), generator=torch.Generator().manual_seed(seed))[:size]]
    return sorted(set(own) | set(others.tolist()))


def test_recovers_planted_caption(planted):
    from finextract.caption import recover_caption

    tokenizer = planted.finetuned_tokenizer
    assert "sks</w>" in tokenizer.convert_ids_to_tokens(tokenizer(CAPTION, add_special_tokens=False).input_ids)
    result = recover_caption(planted, max_tokens=5, lengths=5, vocabulary=_vocabulary(tokenizer), progress=False)
    assert result.caption == CAPTION
    assert sorted(result.length_scores) == [1, 2, 3, 4, 5]  # every length searched (lengths=5)
    assert result.candidates[0]["caption"] == CAPTION and len(result.candidates) == 5
    scores = [c["score"] for c in result.candidates]
    assert scores == sorted(scores, reverse=True)
    assert sorted(result.modules) == result.modules and all("attn2.to_" in m for m in result.modules)
    # score = <M, H^T H>_F / (||M||_F ||H^T H||_F), a cosine of PSD matrices: above the isotropic
    # baseline, at most 1 (Cauchy-Schwarz), and near 1 here since M ~ H^T G^T G H with G random
    assert result.baseline < 0.9 < result.score <= 1 + 1e-6


def test_score_is_the_energy_share(planted):
    """CaptionScorer against the formula computed directly, on all 77 positions and on a window."""
    from finextract.caption import CaptionScorer, cross_attention_deltas
    from finextract.training_parts import tokenize

    tokenizer, text_encoder = planted.finetuned_tokenizer, planted.finetuned_text_encoder
    deltas = cross_attention_deltas(planted)
    scorer = CaptionScorer(deltas, text_encoder, tokenizer)
    ids = torch.tensor([tokenizer(CAPTION, add_special_tokens=False).input_ids])
    with torch.no_grad():
        h = text_encoder(tokenize(tokenizer, [CAPTION]))[0][0].float()
    metric = sum(d.T @ d / d.pow(2).sum() for d in deltas.values())

    def cosine(states):
        return float(((states @ metric) * states).sum() / (metric.norm() * (states @ states.T).norm()))

    # float32 sums of 77 x 32 products of O(1) terms: 1e-5 relative covers the reordering
    assert scorer.score(ids).item() == pytest.approx(cosine(h), rel=1e-5)
    assert scorer.score(ids, window=3).item() == pytest.approx(cosine(h[: 3 + 2 + 3]), rel=1e-5)


def test_longer_planted_caption_is_a_local_maximum(tiny_base):
    """For a 5-token caption the search may stop short (measured: it does here), but the objective
    is right: every one-token change of the true caption scores lower."""
    from finextract.caption import CaptionScorer, cross_attention_deltas

    caption = "a photo of sks dog"
    pair = _planted(tiny_base, caption)
    tokenizer = pair.finetuned_tokenizer
    scorer = CaptionScorer(cross_attention_deltas(pair), pair.finetuned_text_encoder, tokenizer)
    true = torch.tensor(tokenizer(caption, add_special_tokens=False).input_ids)
    vocabulary = torch.tensor(_vocabulary(tokenizer, caption=caption))
    trials = true.repeat(len(true) * len(vocabulary), 1)
    trials[torch.arange(len(trials)), torch.arange(len(true)).repeat_interleave(len(vocabulary))] = vocabulary.repeat(
        len(true)
    )
    changed = (trials != true).any(1)
    assert scorer.score(true[None]).item() > scorer.score(trials[changed]).max().item()


def test_lora_without_cross_attention_is_refused(tiny_base):
    from finextract.caption import CaptionRecoveryError, recover_caption
    from finextract.engine.pair import LoRALayer

    generator = torch.Generator().manual_seed(0)
    layers = {}
    for name, module in tiny_base["unet"].named_modules():
        if name.endswith(("attn1.to_k", "attn1.to_v")):
            down = torch.randn(2, module.in_features, generator=generator)
            layers[name] = LoRALayer(down=down, up=torch.randn(module.out_features, 2, generator=generator), alpha=2.0)
    pair = _pair(tiny_base, unet_lora=layers)
    with pytest.raises(CaptionRecoveryError, match=r"cannot recover a caption.*attn2\.to_k / attn2\.to_v"):
        recover_caption(pair, progress=False)


def test_lora_down_matrices_are_read(tiny_base, planted):
    """A LoRA carrying the planted delta (rank = out, up = delta, down = identity) recovers the same caption."""
    from finextract.caption import cross_attention_deltas, recover_caption
    from finextract.engine.pair import LoRALayer

    deltas = cross_attention_deltas(planted)
    layers = {
        name: LoRALayer(down=torch.eye(d.shape[1]), up=d.clone(), alpha=float(d.shape[1])) for name, d in deltas.items()
    }
    pair = _pair(tiny_base, unet_lora=layers)
    for name, d in cross_attention_deltas(pair).items():
        torch.testing.assert_close(d, deltas[name])  # scale 1 and an identity down: the delta itself
    tokenizer = pair.finetuned_tokenizer
    result = recover_caption(pair, max_tokens=5, lengths=5, vocabulary=_vocabulary(tokenizer), progress=False)
    assert result.caption == CAPTION


def test_bad_settings(planted):
    from finextract.caption import recover_caption

    with pytest.raises(ValueError, match="max_tokens"):
        recover_caption(planted, max_tokens=0, progress=False)
    with pytest.raises(ValueError, match="vocabulary is empty"):
        recover_caption(planted, vocabulary=[], progress=False)
