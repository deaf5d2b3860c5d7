"""Recover a fine-tune's training caption from its cross-attention weight deltas (`--caption auto`).

Why it works: the cross-attention key and value projections (`attn2.to_k`, `attn2.to_v`) are the
only UNet weights that read the text encoder's states. Fine-tuning on one caption c with a frozen text
encoder adds gradients of the form `g_j h_j^T` to them, `h_j` the states of c's 77 positions (its
tokens, EOS and the EOS padding, which the causal encoder makes depend on the whole caption). So the
delta `dW` (DreamBooth: `W_ft - W_base`; LoRA: `scale * up @ down`, whose row space is the down
matrix's) responds most to the states it was trained on.

Score of a caption c, H its (P, D) text states from the fine-tune's text encoder at all P = 77
positions, as the UNet reads them (a cheaper first pass scores only the first padding positions):

    score(c) = <M, H^T H>_F / (||M||_F ||H^T H||_F),      M = sum_m dW_m^T dW_m / ||dW_m||_F^2

the cosine between the delta's input-space Gram matrix M (each module normalised) and the caption's
state Gram matrix, in [0, 1]. It is 1 when `dW_m = G_m H` with `G_m^T G_m` proportional to I, what
fine-tuning on c with uncorrelated position gradients gives; isotropic states score
trace(M) / (sqrt(D) ||M||_F) (`baseline`). The plain energy share mean_j h_j^T M h_j / |h_j|^2 was
tried first: it favours any caption whose states crowd into M's top eigenvector, and ranked
"a photo of cdn" above the zoo DreamBooth's true "a photo of sks".

Search (every candidate token of the fine-tune's tokenizer, added tokens included, special ones not):
1. length: the mean score of random captions of each length 1..`max_tokens`; the `lengths` best
   are searched (the EOS and padding states carry most of the signal, and depend on the length);
2. for each kept length, one greedy pass over the positions trying every token at each (scored on 8
   padding positions), which keeps each position's `shortlist` best tokens;
3. beam search (`beam_width` captions, scored on all positions) over the shortlists, `sweeps` times
   over the positions;
4. the best `num_candidates` captions found, best first.

Tried and dropped (measured on the committed zoo's DreamBooth): scoring tokens alone (the state of `<bos> v`) put
"sks" at rank 37,624 of 49,408 on the zoo's DreamBooth; projecting on the delta's top-r right singular
vectors or centring the states did no better than `M`; the fine-tune's denoising loss on a handful of
its own Eq. 6 generations preferred the empty caption (0.131) to the true one (0.148), so it cannot
verify candidates there.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

#: The modules that read the text states; the method needs at least one of them changed.
CROSS_ATTENTION_PROJECTIONS = ("attn2.to_k", "attn2.to_v")


class CaptionRecoveryError(ValueError):
    """The fine-tune carries no caption signal (it changes no cross-attention projection)."""


@dataclass
class RecoveredCaption:
    """What `recover_caption` found.

    Attributes:
        caption: the best caption (decoded text). score: its score in [0, 1] (isotropic states
            score `baseline`). token_ids: its token ids (no BOS / EOS).
        candidates: the best captions, best first, each {"caption", "score", "token_ids"}; the first
            is `caption`, the rest are the runner-ups.
        length_scores: mean score of random captions per token count ({n: score}).
        baseline: the score of isotropic states, trace(M) / (sqrt(D) ||M||_F).
        modules: the cross-attention projections whose delta was used.
        seconds: wall-clock time. evaluations: captions scored.
    """

    caption: str
    score: float
    token_ids: list[int]
    candidates: list[dict] = field(default_factory=list)
    length_scores: dict = field(default_factory=dict)
    baseline: float = 0.0
    modules: list[str] = field(default_factory=list)
    seconds: float = 0.0
    evaluations: int = 0

    def to_dict(self) -> dict:
        """A JSON-ready dict (result.json's "caption_recovery")."""
        record = asdict(self)
        record["length_scores"] = {str(n): s for n, s in self.length_scores.items()}
        return record


def cross_attention_deltas(pair) -> dict[str, torch.Tensor]:
    """The fine-tune's weight delta on each changed `attn2.to_k` / `attn2.to_v` of the UNet.

    Args:
        pair: a `ModelPair`: DreamBooth or merged adapters (`finetuned_unet`: `W_ft - W_base`) or
            low-rank adapters (`unet_lora`: `scale * up @ down`).

    Returns:
        module path -> float32 (out_features, cross_attention_dim) delta, only modules with a
        nonzero delta.

    Raises:
        CaptionRecoveryError: no cross-attention projection changed (names the modules needed and
            what the file adapts).
    """
    base = dict(pair.base_unet.named_modules())
    deltas: dict[str, torch.Tensor] = {}
    if pair.unet_lora:
        for name, layer in pair.unet_lora.items():
            if name.endswith(CROSS_ATTENTION_PROJECTIONS):
                deltas[name] = layer.delta().reshape(base[name].weight.shape).float()
        touched = sorted(pair.unet_lora)
    elif pair.finetuned_unet is not None:
        touched = []
        for name, module in pair.finetuned_unet.named_modules():
            if isinstance(module, torch.nn.Linear) and name in base:
                delta = module.weight.detach().float() - base[name].weight.detach().float()
                if torch.count_nonzero(delta):
                    touched.append(name)
                    if name.endswith(CROSS_ATTENTION_PROJECTIONS):
                        deltas[name] = delta
    else:
        touched = []
    deltas = {name: d for name, d in deltas.items() if torch.count_nonzero(d)}
    if not deltas:
        source = pair.sources.get("lora") or pair.sources.get("finetuned") or "the fine-tune"
        changed = f"it changes {len(touched)} module(s), e.g. {touched[:3]}" if touched else "it changes no UNet Linear"
        raise CaptionRecoveryError(
            f"cannot recover a caption from {source}: it leaves every cross-attention projection "
            f"({' / '.join(CROSS_ATTENTION_PROJECTIONS)}) of the UNet unchanged, and only those read the text "
            f"states ({changed}); give the caption (--caption TEXT) or use the unconditional method "
            "(--method finextract-uncond)"
        )
    return deltas


class CaptionScorer:
    """`score(token_ids)`: the delta-energy score of captions (see the module docstring), batched.

    Args:
        deltas: from `cross_attention_deltas`. text_encoder: the fine-tune's CLIP text encoder.
        tokenizer: its tokenizer (for BOS / EOS / pad ids). batch_size: captions per text-encoder call.
    """

    def __init__(self, deltas: dict, text_encoder, tokenizer, *, batch_size: int = 2048):
        device = next(text_encoder.parameters()).device
        metric = sum(d.T @ d / d.pow(2).sum() for d in deltas.values())
        self.metric = (metric / torch.linalg.matrix_norm(metric)).to(device)  # unit Frobenius norm
        dim = self.metric.shape[0]
        self.baseline = float(torch.trace(self.metric)) / dim**0.5  # isotropic states: C = I / sqrt(D)
        self.text_encoder, self.batch_size, self.device = text_encoder, batch_size, device
        self.bos, self.eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.max_positions = tokenizer.model_max_length
        self.evaluations = 0

    @torch.no_grad()
    def score(self, token_ids: torch.Tensor, window: int | None = None) -> torch.Tensor:
        """Scores of captions given as (B, n) int64 token ids (no BOS / EOS); float32 (B,) on the CPU.

        `window`: padding positions scored after EOS; None = all of them, up to the tokenizer's
        `model_max_length` (77 in SD), as the UNet reads them. The causal encoder's first positions do
        not depend on later ones, so a window is the same score truncated, at a fraction of the cost.
        """
        batch, n = token_ids.shape
        positions = self.max_positions if window is None else min(n + 2 + window, self.max_positions)
        ids = torch.full((batch, positions), self.pad, dtype=torch.long)
        ids[:, 0], ids[:, 1 : n + 1] = self.bos, token_ids
        if n + 1 < positions:
            ids[:, n + 1] = self.eos
        scores = []
        for start in range(0, batch, self.batch_size):
            states = self.text_encoder(ids[start : start + self.batch_size].to(self.device))[0].float()
            energy = ((states @ self.metric) * states).sum((1, 2))  # <M, H^T H>_F
            gram = torch.linalg.matrix_norm(states @ states.transpose(1, 2))  # ||H^T H||_F = ||H H^T||_F
            scores.append((energy / gram.clamp_min(1e-12)).cpu())
        self.evaluations += batch
        return torch.cat(scores)


def candidate_tokens(tokenizer) -> torch.Tensor:
    """Every token id of `tokenizer` (added tokens included) except its special tokens; int64 (V,)."""
    special = set(tokenizer.all_special_ids)
    return torch.tensor([i for i in range(len(tokenizer)) if i not in special], dtype=torch.long)


def recover_caption(
    pair,
    *,
    max_tokens: int = 8,
    lengths: int = 1,
    shortlist: int = 256,
    beam_width: int = 4,
    sweeps: int = 2,
    num_candidates: int = 5,
    scan_window: int = 8,
    random_captions: int = 64,
    vocabulary=None,
    seed: int = 0,
    progress: bool = True,
) -> RecoveredCaption:
    """Recover the training caption of a fine-tune from its `attn2.to_k` / `attn2.to_v` deltas.

    Args:
        pair: a `ModelPair` (placed on its device); not changed.
        max_tokens: longest caption tried, in tokens (1..75). lengths: how many of the best-scoring
            lengths are searched (the length scores of all are returned).
        shortlist: tokens kept per position by the greedy pass (which scores `scan_window` padding
            positions after EOS); the beam search then scores all 77 positions.
        beam_width: captions kept by the beam search. sweeps: beam passes over the positions.
        num_candidates: captions returned (the best and its runner-ups). random_captions: random
            captions per length for the length scores.
        vocabulary: candidate token ids (an iterable of ints), or None for every non-special token of
            the fine-tune's tokenizer (added tokens included).
        seed: seed of the random captions. progress: show a tqdm bar (captions scored).

    Returns:
        `RecoveredCaption`; its `score` is the full 77-position score.

    Raises:
        CaptionRecoveryError: the fine-tune changes no cross-attention projection.
        ValueError: invalid settings or an empty vocabulary.
    """
    tokenizer = pair.finetuned_tokenizer
    if not 1 <= max_tokens <= tokenizer.model_max_length - 2:
        raise ValueError(f"max_tokens={max_tokens}: must be in 1..{tokenizer.model_max_length - 2}")
    if min(lengths, shortlist, beam_width, sweeps, num_candidates, random_captions) < 1 or scan_window < 0:
        raise ValueError(
            "lengths, shortlist, beam_width, sweeps, num_candidates and random_captions must be >= 1, scan_window >= 0"
        )
    start = time.perf_counter()
    deltas = cross_attention_deltas(pair)
    scorer = CaptionScorer(deltas, pair.finetuned_text_encoder, tokenizer)
    tokens = candidate_tokens(tokenizer) if vocabulary is None else torch.as_tensor(list(vocabulary), dtype=torch.long)
    if tokens.numel() == 0:
        raise ValueError("vocabulary is empty: pass None (the whole tokenizer) or some token ids")
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(total=max_tokens * random_captions, desc="recover caption", unit="caption", disable=not progress)

    def score(ids: torch.Tensor, window: int | None = None) -> torch.Tensor:
        scores = scorer.score(ids, window)
        bar.update(len(ids))
        return scores

    # 1. length: the mean score of random captions of each length, on every position (a window
    #    favours short captions, whose window holds more of the padding that carries the signal)
    randoms, length_scores = {}, {}
    for n in range(1, max_tokens + 1):
        ids = tokens[torch.randint(len(tokens), (random_captions, n), generator=generator)]
        scores = score(ids)
        randoms[n] = (ids, scores)
        length_scores[n] = float(scores.mean())
    kept = sorted(length_scores, key=length_scores.get, reverse=True)[:lengths]
    width = min(shortlist, len(tokens))
    bar.total += sum(n * len(tokens) + sweeps * n * beam_width * width for n in kept)
    bar.refresh()

    found: dict[tuple, float] = {}
    for n in kept:
        ids, random_scores = randoms[n]
        best = ids[int(random_scores.argmax())].clone()
        # 2. greedy pass: every token at each position in turn, keeping each position's shortlist
        lists = []
        for position in range(n):
            trial = best.repeat(len(tokens), 1)
            trial[:, position] = tokens
            top = torch.topk(score(trial, scan_window), width).indices
            lists.append(tokens[top])
            best[position] = tokens[top[0]]
        # 3. beam search over the shortlists, scored on every position, from the greedy caption and
        #    the best random ones
        beam = [best] + [ids[i] for i in torch.argsort(random_scores, descending=True)[: beam_width - 1].tolist()]
        for _ in range(sweeps):
            for position in range(n):
                trial = torch.stack(beam).repeat_interleave(width, 0)
                trial[:, position] = lists[position].repeat(len(beam))
                scores = score(trial)
                beam, seen = [], set()
                for i in torch.argsort(scores, descending=True).tolist():
                    key = tuple(trial[i].tolist())
                    if key not in seen:
                        seen.add(key)
                        beam.append(trial[i])
                        found[key] = float(scores[i])
                    if len(beam) == beam_width:
                        break
    bar.close()
    candidates, captions = [], set()
    for key, value in sorted(found.items(), key=lambda item: item[1], reverse=True):
        text = tokenizer.decode(list(key)).strip()
        if text not in captions:
            captions.add(text)
            candidates.append({"caption": text, "score": value, "token_ids": list(key)})
        if len(candidates) == num_candidates:
            break
    best = candidates[0]
    result = RecoveredCaption(
        caption=best["caption"],
        score=best["score"],
        token_ids=best["token_ids"],
        candidates=candidates,
        length_scores=length_scores,
        baseline=scorer.baseline,
        modules=sorted(deltas),
        seconds=time.perf_counter() - start,
        evaluations=scorer.evaluations,
    )
    logger.info(
        "recovered caption %r (score %.3f, random direction %.3f) in %.1f s",
        result.caption,
        result.score,
        result.baseline,
        result.seconds,
    )
    return result
