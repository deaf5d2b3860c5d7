"""Tiny Stable-Diffusion-format models of every family, built offline and deterministically from a seed.

No weights can be downloaded where this project is tested, so it builds its own models: a tiny UNet
(16x16x4 latents), a slim x2 VAE (32x32 RGB), tiny text encoders and their tokenizers (SD 1.x's own
CLIP BPE vocabulary, read from the file `open_clip` ships; a minimal XLM-R-style one for
AltDiffusion). They are saved with `save_pretrained` and loaded back by the same code that loads
real checkpoints. Each family (`ZOO_FAMILIES`) keeps the markers its released models have,
at tiny size:

| zoo family | UNet | text encoder(s) | tokenizer | scheduler |
|---|---|---|---|---|
| `sd1` | conv projections, cross-attention 32 | CLIP, quick_gelu (OpenAI CLIP) | CLIP BPE (SD 1.x's own) | SD 1.5's (epsilon) |
| `sd2` | linear projections, per-block heads, cross-attention 48 | CLIP, gelu (OpenCLIP) | CLIP BPE | SD 2.1-base's (epsilon) |
| `sd2-v` | as `sd2` | as `sd2` | CLIP BPE | v-prediction, trailing spacing, zero-terminal-SNR betas |
| `sdxl` | SDXL's block layout, `text_time` added embedding (6 time ids), cross-attention 64 = 32 + 32 | CLIP (quick_gelu) + CLIP with projection (gelu, OpenCLIP bigG) | two CLIP BPE (the second pads with "!") | SDXL's (epsilon, leading) |
| `altdiffusion` | as `sd1` | XLM-R (`RobertaSeriesModelWithTransformation`, pre-transformation) | XLM-R-style Unigram, characters | SD 1.5's |

The XLM-R-style tokenizer is minimal (no package ships XLM-R's 250k-piece SentencePiece model): a
Unigram vocabulary of XLM-R's special tokens and single characters of several scripts (each also
with SentencePiece's word-start marker), built with `transformers.XLMRobertaTokenizer(vocab=...)`.

One module per job:

| module | what it holds |
|---|---|
| `configs` | the tiny configs per family, schedulers, the random zoo's caption and LoRA settings |
| `tokenizers` | the CLIP BPE and XLM-R-style tokenizers |
| `models` | random components, pipelines, perturbed fine-tunes, random LoRA adapters |
| `writers` | LoRA files (diffusers, PEFT, kohya, cloneofsimo) and original-layout single files |
| `build` | `build_zoo`: the random zoo (seconds) |
| `scenarios`, `training`, `trained` | `build_trained_zoo`: the trained zoo committed in `finextract/zoo_weights/` |
| `second_base` | `build_second_base`: a second trained base of that zoo's family (not committed) |
"""
