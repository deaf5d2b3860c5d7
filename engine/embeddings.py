"""Textual-inversion embeddings: read from their files (or from adapter files that bundle them) and
added to a copy of a tokenizer and text encoder.

Files and the token each vector set gets:
- diffusers `learned_embeds.safetensors` / `.bin`: `{token: (dim,) or (n, dim)}`, the token is the key;
- AUTOMATIC1111 `.pt` (`{"string_to_param": {"*": (n, dim)}, "name": ...}`, a pickle: only with
  `allow_pickle`) and `.safetensors` (`{"emb_params": (n, dim)}`), and `{"clip_l": (n, dim)}` (diffusers'
  advanced training scripts): the token is the file's stem, as AUTOMATIC1111 names them;
- inside adapter files: kohya's `bundle_emb.<token>.emb_params` / `.string_to_param.*`, cloneofsimo's
  `<s1>` keys (flagged `<embed>` in the metadata).
An embedding of n > 1 vectors is added as n tokens `tok`, `tok_1`, ... `tok_{n-1}`, and the
tokenizer rewrites `tok` in a caption to all n of them, as diffusers' `load_textual_inversion` and
`maybe_convert_prompt` do.
"""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .formats import load_state_dict, read_pickle, sniff

logger = logging.getLogger(__name__)

# keys of the container formats (the token is then the file's stem); "clip_g" marks SDXL files
CONTAINER_KEYS = ("emb_params", "clip_l", "clip_g", "string_to_param")


class EmbeddingError(ValueError):
    """An embedding that cannot be added (its width, a token already taken, an unreadable file)."""


@dataclass
class Embedding:
    """One textual-inversion token: `vectors` (n, dim) float32, from `source` (file and key)."""

    token: str
    vectors: torch.Tensor
    source: str

    @property
    def tokens(self) -> list[str]:
        """The tokens added for it: `token`, then `token_1` ... for a multi-vector embedding."""
        return [self.token] + [f"{self.token}_{i}" for i in range(1, self.vectors.shape[0])]


def _vectors(value, where: str) -> torch.Tensor:
    if isinstance(value, dict):  # string_to_param: {"*": tensor}
        if len(value) != 1:
            raise EmbeddingError(f"{where}: expected one vector set, found {len(value)}")
        value = next(iter(value.values()))
    if not isinstance(value, torch.Tensor) or value.dim() not in (1, 2):
        raise EmbeddingError(f"{where}: expected a (dim,) or (n, dim) tensor")
    return value.detach().float().reshape(-1, value.shape[-1])


def embeddings_from_state(state: dict, path: str | Path) -> list[Embedding]:
    """The embeddings of one embedding file's contents (`state`: key -> tensor or nested dict).

    Raises:
        EmbeddingError: an SDXL file (`clip_g`), or contents of no embedding format (named).
    """
    path = Path(path)
    if "clip_g" in state:
        raise EmbeddingError(f"{path}: an SDXL embedding (clip_l + clip_g); the base is SD 1.x/2.x")
    for key in ("string_to_param", "emb_params", "clip_l"):
        if key in state:
            return [Embedding(path.stem, _vectors(state[key], f"{path}[{key}]"), f"{path}[{key}]")]
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if len(tensors) == 1:  # diffusers: {token: vectors}
        token, value = next(iter(tensors.items()))
        return [Embedding(token, _vectors(value, f"{path}[{token}]"), f"{path}[{token}]")]
    raise EmbeddingError(
        f"{path}: not a textual-inversion embedding (expected one of {', '.join(CONTAINER_KEYS[:2])}, "
        f"string_to_param or a single token key; found {sorted(state)[:5]})"
    )


def is_embedding_header(shapes: dict[str, tuple]) -> bool:
    """Whether safetensors tensor shapes (name -> shape) look like an embedding file."""
    if set(shapes) & {"emb_params", "clip_l", "clip_g"}:
        return True
    return len(shapes) == 1 and len(next(iter(shapes.values()))) in (1, 2) and "." not in next(iter(shapes))


def read_embedding_file(path: str | Path, *, allow_pickle: bool = False) -> list[Embedding]:
    """Read one embedding file (`.safetensors`; `.pt` / `.bin` pickles only with `allow_pickle`).

    Raises:
        EmbeddingError, CheckpointFormatError, PickleRefusedError, FileNotFoundError.
    """
    path = Path(path)
    if sniff(path) in ("pickle", "pickle-zip"):
        state = read_pickle(path, allow_pickle=allow_pickle)
        if not isinstance(state, dict):
            raise EmbeddingError(f"{path}: expected a dict, found {type(state).__name__}")
    else:
        state = load_state_dict(path, allow_pickle=allow_pickle)
    return embeddings_from_state(state, path)


class ExpandingTokenizer:
    """A tokenizer that first rewrites each multi-vector embedding's token into all its tokens
    (`"<cat>"` -> `"<cat> <cat>_1 <cat>_2"`), as diffusers' `maybe_convert_prompt` does, then calls
    the wrapped tokenizer; every other attribute is the wrapped tokenizer's."""

    def __init__(self, tokenizer, expansions: dict[str, str]) -> None:
        self.tokenizer = tokenizer
        self.expansions = expansions

    def expand(self, text: str) -> str:
        for token, replacement in self.expansions.items():
            text = re.sub(re.escape(token) + r"(?!_\d)", lambda _, r=replacement: r, text)
        return text

    def __call__(self, text, *args, **kwargs):
        text = [self.expand(t) for t in text] if isinstance(text, (list, tuple)) else self.expand(text)
        return self.tokenizer(text, *args, **kwargs)

    def __len__(self) -> int:
        return len(self.tokenizer)

    def __getattr__(self, name):
        if name == "tokenizer":  # not set yet (copy / unpickling): no recursion into it
            raise AttributeError(name)
        return getattr(self.tokenizer, name)


@torch.no_grad()
def add_embeddings(tokenizer, text_encoder, embeddings: list[Embedding]):
    """Copies of `tokenizer` and `text_encoder` with `embeddings` added (the inputs are not changed).

    The tokenizer gets each embedding's tokens (`Embedding.tokens`), the text encoder's token
    embedding grows to `len(tokenizer)` rows (`resize_token_embeddings`) and the new rows hold the
    vectors: what diffusers' `load_textual_inversion` does.

    Args:
        tokenizer: a `transformers.CLIPTokenizer`.
        text_encoder: a `transformers.CLIPTextModel`.
        embeddings: the embeddings to add (tokens must be new).

    Returns:
        (tokenizer, text_encoder); the tokenizer is an `ExpandingTokenizer` when an embedding has
        several vectors.

    Raises:
        EmbeddingError: a token already in the tokenizer, a width other than the text encoder's
            hidden size (naming both), or the same token twice.
    """
    width = text_encoder.get_input_embeddings().embedding_dim
    vocabulary = tokenizer.get_vocab()
    seen: dict[str, str] = {}
    for embedding in embeddings:
        if embedding.vectors.shape[1] != width:
            raise EmbeddingError(
                f"{embedding.source}: embedding '{embedding.token}' has width {embedding.vectors.shape[1]}, the base text "
                f"encoder {width}: it was trained for another model (768 SD 1.x, 1024 SD 2.x)"
            )
        for token in embedding.tokens:
            if token in vocabulary:
                raise EmbeddingError(
                    f"{embedding.source}: token '{token}' is already in the tokenizer; an embedding must add a new token"
                )
            if token in seen:
                raise EmbeddingError(f"token '{token}' comes twice: from {seen[token]} and {embedding.source}")
            seen[token] = embedding.source
    tokenizer = copy.deepcopy(tokenizer)
    text_encoder = copy.deepcopy(text_encoder)
    tokens = [token for embedding in embeddings for token in embedding.tokens]
    added = tokenizer.add_tokens(tokens)
    if added != len(tokens):
        raise EmbeddingError(f"the tokenizer added {added} of the {len(tokens)} embedding tokens {tokens}")
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the new rows are set below
    table = text_encoder.get_input_embeddings().weight
    for embedding in embeddings:
        ids = tokenizer.convert_tokens_to_ids(embedding.tokens)
        table[ids] = embedding.vectors.to(table.dtype)
    logger.info(
        "added %d textual-inversion token(s): %s",
        len(embeddings),
        ", ".join(f"{e.token} ({e.vectors.shape[0]} vector{'s' * (e.vectors.shape[0] > 1)})" for e in embeddings),
    )
    expansions = {e.token: " ".join(e.tokens) for e in embeddings if e.vectors.shape[0] > 1}
    return (ExpandingTokenizer(tokenizer, expansions) if expansions else tokenizer), text_encoder
