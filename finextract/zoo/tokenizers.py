"""The tiny models' tokenizers: SD 1.x's own CLIP BPE vocabulary (read from the file `open_clip`
ships), a minimal XLM-R-style Unigram one for AltDiffusion, and a T5 Unigram one trained on the zoo's
captions for SD3 and FLUX.1."""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
from pathlib import Path

from .configs import TINY_TEXT_CONFIG

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# OpenAI CLIP's BPE file (as open_clip ships it): a header line, then merges; CLIP uses the first
# 49152 - 256 - 2 of them, so that bytes (256, twice) + merges + BOS/EOS make 49,408 tokens.
CLIP_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_MERGES = 49152 - 256 - 2
CLIP_VOCAB_SIZE = 49408


def _byte_characters() -> list[str]:
    """GPT-2's reversible byte -> unicode characters (the alphabet CLIP's BPE works on), in CLIP's order."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


def clip_bpe_path() -> Path:
    """The CLIP BPE merges file shipped inside the `open_clip` package (`open_clip_torch` on PyPI).

    Found without importing `open_clip` (its package import needs torchvision and more; only the
    data file is used, so it is installed with `pip install --no-deps open_clip_torch`).

    Raises:
        FileNotFoundError: open_clip is not installed, or ships no BPE file (the message gives the fix).
    """
    spec = importlib.util.find_spec("open_clip")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / CLIP_BPE_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"CLIP's BPE vocabulary ({CLIP_BPE_FILE}) was not found: install it with "
        "`pip install --no-deps open_clip_torch` (data only; `make install` does this)"
    )


def clip_vocabulary() -> tuple[list[str], list[str]]:
    """CLIP's tokens and BPE merges, built from the BPE file the way CLIP's `SimpleTokenizer` does.

    Tokens: the 256 byte characters, the same with the end-of-word suffix `</w>`, one token per merge
    (its two halves joined), then `<|startoftext|>`, `<|endoftext|>`: 49,408 tokens, so token ids
    equal SD 1.x's tokenizer (`openai/clip-vit-large-patch14`): "a</w>" 320, BOS 49406, EOS 49407.

    Returns:
        (tokens in id order, merges as "left right" lines in priority order).
    """
    with gzip.open(clip_bpe_path(), "rt", encoding="utf-8") as file:
        lines = file.read().split("\n")
    merges = lines[1 : CLIP_MERGES + 1]  # line 0 is the version header
    characters = _byte_characters()
    tokens = characters + [c + "</w>" for c in characters] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    if len(tokens) != CLIP_VOCAB_SIZE or len(set(tokens)) != CLIP_VOCAB_SIZE:
        raise ValueError(f"{clip_bpe_path()}: not CLIP's BPE file ({len(set(tokens))} distinct tokens, expected 49408)")
    return tokens, merges


def write_tokenizer(folder: str | Path) -> Path:
    """Write SD 1.x's CLIP tokenizer (vocab.json, merges.txt, configs) into `folder`; return it.

    The vocabulary and merges are CLIP's own (`clip_vocabulary`), so captions tokenise exactly as in
    Stable Diffusion 1.x ("sks" is one token, 48136); the files are those of the Hugging Face
    `CLIPTokenizer` (merges.txt with its `#version: 0.2` header), padded with EOS to 77 tokens.

    Raises:
        FileNotFoundError: the BPE file is not installed (see `clip_bpe_path`).
    """
    from transformers import CLIPTokenizer  # heavy: transformers, only to write a tokenizer; models.py imports this

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokens, merges = clip_vocabulary()
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=EOS)
    tokenizer.model_max_length = TINY_TEXT_CONFIG["max_position_embeddings"]
    tokenizer.save_pretrained(folder)
    return folder


def _xlmr_characters() -> list[str]:
    """Single characters of several scripts for the minimal XLM-R-style vocabulary (ASCII, Latin-1,
    Greek, Cyrillic, kana and the first CJK ideographs), in a fixed order."""
    ranges = [(0x21, 0x7E), (0xA1, 0xFF), (0x391, 0x3C9), (0x410, 0x44F), (0x3041, 0x3096), (0x30A1, 0x30FA)]
    ranges.append((0x4E00, 0x4EFF))
    return [chr(code) for low, high in ranges for code in range(low, high + 1)]


def write_xlmr_tokenizer(folder: str | Path) -> Path:
    """Write a minimal XLM-R-style tokenizer (AltDiffusion's kind) into `folder` and return it.

    A Unigram model (what XLM-R's SentencePiece model is) whose vocabulary is XLM-R's special tokens
    in XLM-R's order (`<s>` 0, `<pad>` 1, `</s>` 2, `<unk>` 3, `<mask>` last), the word-start marker
    and every character of `_xlmr_characters` alone and after the marker; characters outside it
    become `<unk>`. `model_max_length` 77, as AltDiffusion's tokenizer.
    """
    from transformers import XLMRobertaTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    characters = _xlmr_characters()
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + c, -2.5) for c in characters] + [(c, -3.0) for c in characters] + [("<mask>", 0.0)]
    tokenizer = XLMRobertaTokenizer(vocab=vocab, model_max_length=TINY_TEXT_CONFIG["max_position_embeddings"])
    tokenizer.save_pretrained(folder)
    return folder


T5_VOCAB_SIZE = 256  # the Unigram trainer's upper bound (the captions give about 130 pieces)
# Every printable ASCII character is in the vocabulary, so any English prompt tokenises (no <unk>).
_T5_ALPHABET = [chr(code) for code in range(0x21, 0x7F)]


def zoo_captions() -> list[str]:
    """Every caption the zoos use (the random zoo's, both scenarios', the pretraining images'), in a fixed order."""
    from .configs import ZOO_CAPTION
    from .scenarios import PRETRAIN_IMAGES, SCENARIOS

    scenario_captions = dict.fromkeys(s.caption for s in SCENARIOS.values())  # the held-out one repeats the object's
    return [ZOO_CAPTION, *scenario_captions, *(caption for _, _, caption in PRETRAIN_IMAGES)]


def write_t5_tokenizer(folder: str | Path) -> Path:
    """Write a small T5 tokenizer (SD3's and FLUX.1's kind, `T5TokenizerFast`) into `folder`; return it.

    No T5 vocabulary ships in a package we install, so this one is trained: a SentencePiece-style
    Unigram model (T5's kind) whose pieces the `tokenizers` library's `UnigramTrainer` picks from
    `zoo_captions` (at most `T5_VOCAB_SIZE` pieces, every printable ASCII character among them; each
    piece's log-probability its count in the captions), wrapped as transformers'
    `T5TokenizerFast` with T5's special tokens and ids (`<pad>` 0, `</s>` 1, `<unk>` 2, 100
    `<extra_id_*>` sentinels), `</s>` appended, `model_max_length` `T5_MAX_LENGTH` (512).
    Deterministic: the same captions give the same file.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5TokenizerFast

    from .configs import T5_MAX_LENGTH

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    trainer_tokenizer = Tokenizer(models.Unigram())
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=T5_VOCAB_SIZE,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        initial_alphabet=_T5_ALPHABET,
        show_progress=False,
    )
    trainer_tokenizer.train_from_iterator(zoo_captions(), trainer)
    trained = json.loads(trainer_tokenizer.to_str())["model"]["vocab"]
    if [piece for piece, _ in trained[:3]] != ["<pad>", "</s>", "<unk>"]:
        raise ValueError(f"the trained T5 vocabulary starts {trained[:3]}, not T5's <pad>, </s>, <unk>")
    # The trainer's choice of pieces is the same every run, but not its scores (it assigns those of unseen
    # characters in hash order): each piece's log-probability is recounted from the captions instead,
    # as substring counts over the word-start-marked words, so the file is the same every time.
    text = " ".join("\u2581" + word for caption in zoo_captions() for word in caption.split())
    counts = {piece: text.count(piece) + 1 for piece, _ in trained[3:]}
    total = sum(counts.values())
    pieces = sorted(counts, key=lambda piece: (-counts[piece], piece))
    vocab = [(piece, 0.0) for piece, _ in trained[:3]] + [(p, round(math.log(counts[p] / total), 6)) for p in pieces]
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=100, model_max_length=T5_MAX_LENGTH)
    tokenizer.save_pretrained(folder)
    return folder
