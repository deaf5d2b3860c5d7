"""The tiny model zoo: layout, determinism, loadability, the `finextract zoo build` command."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from finextract.zoo.configs import LORA_NO_ALPHA_MODULE, ZOO_CAPTION

LAYOUT = (
    "base/model_index.json",
    "base/unet/diffusion_pytorch_model.safetensors",
    "base/vae/config.json",
    "base/text_encoder/model.safetensors",
    "base/tokenizer/vocab.json",
    "base/scheduler/scheduler_config.json",
    "dreambooth/model_index.json",
    "dreambooth/unet/config.json",
    "dreambooth/text_encoder/model.safetensors",
    "dreambooth_unet/unet/diffusion_pytorch_model.safetensors",
    "dreambooth_unet/text_encoder/model.safetensors",
    "dreambooth_unet_only/unet/diffusion_pytorch_model.safetensors",
    "dreambooth_unet.safetensors",
    "lora/pytorch_lora_weights.safetensors",
    "lora_peft/adapter_config.json",
    "lora_peft/adapter_model.safetensors",
    "lora_peft/text_encoder/adapter_config.json",
    "lora_kohya.safetensors",
    "caption.txt",
)


def test_layout(tiny_zoo):
    missing = [name for name in LAYOUT if not (tiny_zoo / name).is_file()]
    assert missing == []
    assert not (tiny_zoo / "dreambooth_unet_only" / "text_encoder").exists()
    assert (tiny_zoo / "caption.txt").read_text().strip() == ZOO_CAPTION


def test_finetune_differs_from_base_everywhere(tiny_zoo):
    base = load_file(str(tiny_zoo / "base/unet/diffusion_pytorch_model.safetensors"))
    tuned = load_file(str(tiny_zoo / "dreambooth_unet.safetensors"))
    assert set(base) == set(tuned)
    assert all(not torch.equal(base[k], tuned[k]) for k in base)
    # a small perturbation, not a different model
    relative = [((tuned[k] - base[k]).norm() / base[k].norm()).item() for k in base if base[k].norm() > 0]
    assert max(relative) < 0.2


def test_kohya_file_has_alphas_but_one(tiny_zoo):
    keys = load_file(str(tiny_zoo / "lora_kohya.safetensors"))
    downs = [k for k in keys if k.endswith(".lora_down.weight")]
    alphas = [k for k in keys if k.endswith(".alpha")]
    assert len(alphas) == len(downs) - 1
    assert "lora_unet_" + LORA_NO_ALPHA_MODULE.replace(".", "_") + ".alpha" not in keys
    assert any(k.startswith("lora_te_text_model_encoder_layers_0") for k in keys)


def test_base_runs_in_stable_diffusion_pipeline(tiny_zoo):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(str(tiny_zoo / "base"), safety_checker=None)
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline(
        ZOO_CAPTION,
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, 32, 32, 3) and image.min() >= 0 and image.max() <= 1


def test_cli_build_is_deterministic(family_zoo, tmp_path):
    from finextract.cli import main

    assert main(["zoo", "build", "--out", str(tmp_path / "again"), "--seed", "0", "--families", "sdxl"]) == 0
    assert not (tmp_path / "again" / "sd2").exists()  # only the families asked for
    for name in (
        "sdxl/lora_kohya.safetensors",
        "sdxl/base/text_encoder_2/model.safetensors",
        "dreambooth_unet.safetensors",
        "lora_kohya.safetensors",
        "lora/pytorch_lora_weights.safetensors",
        "lora_peft/adapter_model.safetensors",
        "base/text_encoder/model.safetensors",
    ):
        again, first = tmp_path / "again" / name, family_zoo / name
        a, b = load_file(str(again)), load_file(str(first))
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name
        # safetensors orders metadata entries freely, so bytes may differ where metadata has 2+ entries
        assert safe_open(str(again), "pt").metadata() == safe_open(str(first), "pt").metadata(), name


def test_cli_build_names_an_unknown_family(tmp_path, capsys):
    from finextract.cli import main

    assert main(["zoo", "build", "--out", str(tmp_path / "z"), "--families", "pixart"]) != 0
    message = "zoo families ['pixart']: expected some of sd2, sd2-v, sdxl, altdiffusion, sd3, flux, flux-schnell"
    assert message in capsys.readouterr().err


def test_seed_changes_weights():
    from finextract.zoo.models import tiny_components, zoo_lora

    a, b = tiny_components(seed=0), tiny_components(seed=1)
    assert not torch.equal(a["unet"].conv_in.weight, b["unet"].conv_in.weight)
    lora_a, _ = zoo_lora(a["unet"], a["text_encoder"], seed=0)
    lora_b, _ = zoo_lora(a["unet"], a["text_encoder"], seed=1)
    name = next(iter(lora_a))
    assert not torch.equal(lora_a[name].down, lora_b[name].down)


def test_unit_variance_scaling_gives_unit_std_latents():
    import numpy as np
    from diffusers import AutoencoderKL

    from finextract.zoo.configs import TINY_VAE_CONFIG
    from finextract.zoo.training import to_tensor, unit_variance_scaling

    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_VAE_CONFIG).eval()
    pixels = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    factor = unit_variance_scaling(vae, pixels)
    with torch.no_grad():
        means = vae.encode(to_tensor(pixels)).latent_dist.mean
    assert factor > 0
    assert abs((means * factor).std().item() - 1.0) < 1e-3  # 4 significant digits


# SD 1.x's tokenizer (openai/clip-vit-large-patch14) on these captions, as its model cards and the
# DreamBooth literature quote them: BOS 49406, "a" 320, "photo" 1125, "of" 539, "sks" 48136,
# "dog" 1929, EOS 49407.
KNOWN_IDS = {
    "a photo of sks dog": [49406, 320, 1125, 539, 48136, 1929, 49407],
    "sks": [49406, 48136, 49407],
}
CAPTIONS = (
    "a photo of sks dog",
    "an illustration in sks style",
    "Art style of Claude Monet, 1890!",
    "a watercolor painting of a red fox   jumping over a fence",
    "photo of a ohwx man, 8k, highly detailed",
    "",
)


def _open_clip_tokenizer():
    """open_clip's own CLIP tokenizer (OpenAI's `SimpleTokenizer`), loaded from its file: the open_clip
    package itself needs torchvision, which is not installed (only its vocabulary file is used)."""
    import importlib.util

    from finextract.zoo.tokenizers import clip_bpe_path

    spec = importlib.util.spec_from_file_location("open_clip_tokenizer", clip_bpe_path().parent / "tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer(bpe_path=str(clip_bpe_path()))


def test_tokenizer_is_sd_clip(tokenizer_dir):
    from transformers import CLIPTokenizer

    from finextract.zoo.tokenizers import CLIP_VOCAB_SIZE

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    assert len(tokenizer) == CLIP_VOCAB_SIZE and tokenizer.model_max_length == 77
    for caption, ids in KNOWN_IDS.items():
        assert tokenizer(caption).input_ids == ids, caption
    # padded like SD pipelines: EOS (49407) to 77 tokens
    padded = tokenizer("sks", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[3:] == [49407] * 74


def test_tokenizer_matches_open_clip(tokenizer_dir):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    reference = _open_clip_tokenizer()
    for caption in CAPTIONS:
        ours = tokenizer(caption).input_ids
        theirs = [reference.sot_token_id] + reference.encode(caption) + [reference.eot_token_id]
        assert ours == theirs, caption


def test_missing_bpe_file_names_the_fix(monkeypatch):
    import importlib.util

    import pytest

    from finextract.zoo import tokenizers

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps open_clip_torch"):
        tokenizers.clip_bpe_path()


def test_composition_images_are_a_deterministic_new_set():
    import numpy as np

    from finextract.style_images import composition_images

    first, again, other = composition_images(1), composition_images(1), composition_images(2)
    assert list(first) == [f"composition{i:02d}" for i in range(10)]
    assert all(image.shape == (180, 240, 3) and image.dtype == np.uint8 for image in first.values())
    assert all(np.array_equal(first[name], again[name]) for name in first)  # same seed, same pixels
    assert not any(np.array_equal(first[name], other[name]) for name in first)  # another seed, another set
    images = list(first.values())
    assert all(not np.array_equal(images[0], image) for image in images[1:])  # the compositions differ
    with pytest.raises(ValueError, match="count 0"):
        composition_images(1, count=0)


def test_second_base_shares_every_part_but_the_unet(tmp_path, capsys):
    """`zoo second-base` (a 2 + 2 step recipe here): the committed base's VAE, text encoder, tokenizer and
    scheduler byte for byte, a UNet of the same config with other weights that loads in a pipeline, the
    record of what was trained; a retrained and a cached rebuild give the same bytes (fp16 files compared exactly)."""
    import json

    from diffusers import StableDiffusionPipeline

    from finextract.cli import main
    from finextract.zoo.second_base import SecondBaseRecipe, build_second_base, pretraining_subset
    from finextract.zoo.trained import default_zoo_folder

    parent = default_zoo_folder() / "base"
    recipe = SecondBaseRecipe(images=2, crops_per_image=4, base_steps=2, base_batch=2, refine_steps=2)
    out = build_second_base(tmp_path / "second", recipe, cache=tmp_path / "cache", progress=False)
    for part in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "tokenizer/vocab.json"):
        assert (out / part).read_bytes() == (parent / part).read_bytes(), part
    assert json.loads((out / "unet" / "config.json").read_text()) == json.loads(
        (parent / "unet/config.json").read_text()
    )
    ours, theirs = (load_file(str(f / "unet" / "diffusion_pytorch_model.safetensors")) for f in (out, parent))
    assert ours.keys() == theirs.keys() and all(ours[k].shape == theirs[k].shape for k in ours)
    assert sum(not torch.equal(ours[k], theirs[k]) for k in ours) > 0.9 * len(ours)  # another UNet, not a copy
    record = json.loads((out / "second_base.json").read_text())
    assert record["pretrain_images"] == [name for _, name, _ in pretraining_subset(recipe)]
    assert set(record["timings"]) == {"base", "refined"} and not record["timings"]["refined"]["reused"]
    StableDiffusionPipeline.from_pretrained(out, safety_checker=None)  # loads as a pipeline
    unet = (out / "unet/diffusion_pytorch_model.safetensors").read_bytes()
    # deterministic (retrained without the cache), and a rebuild with the cache reuses every stage
    for folder, cache in ((tmp_path / "retrained", None), (tmp_path / "reused", tmp_path / "cache")):
        build_second_base(folder, recipe, cache=cache, progress=False)
        assert (folder / "unet/diffusion_pytorch_model.safetensors").read_bytes() == unet, folder
        assert json.loads((folder / "second_base.json").read_text())["timings"]["refined"]["reused"] == bool(cache)
    assert main(["zoo", "second-base", "--out", str(tmp_path / "x"), "--zoo", str(tmp_path)]) != 0
    assert f"{tmp_path / 'base'}: no trained base (model_index.json)" in capsys.readouterr().err


def test_heldout_images_are_none_of_the_other_stages():
    """The held-out scenario: five different images at the fine-tunes' 32 px, deterministic, from files no
    other stage reads (not a pretraining image, not a fine-tuning photograph), under the object caption."""
    import numpy as np

    from finextract.zoo.scenarios import (
        DEFAULT_SCENARIOS,
        FINETUNE_IMAGES,
        HELDOUT_IMAGES,
        PRETRAIN_IMAGES,
        SCENARIOS,
        finetune_set,
    )

    names, images = finetune_set("heldout")
    assert names == ["present", "phantom", "face", "relief", "logo"] and images.shape == (5, 32, 32, 3)
    assert images.dtype == np.uint8 and np.array_equal(images, finetune_set("heldout")[1])
    assert all(not np.array_equal(images[i], images[j]) for i in range(5) for j in range(i + 1, 5))
    assert list(HELDOUT_IMAGES) == names
    files = {file for _, file in HELDOUT_IMAGES.values()}
    assert not files & {name for _, name, _ in PRETRAIN_IMAGES} and not files & set(FINETUNE_IMAGES)
    assert SCENARIOS["heldout"].caption == SCENARIOS["object"].caption and "heldout" not in DEFAULT_SCENARIOS
    # every other scenario's images differ from these (no shared picture slipped in)
    for other in DEFAULT_SCENARIOS:
        assert not any(np.array_equal(a, b) for a in images for b in finetune_set(other)[1])


def test_heldout_zoo_fine_tunes_the_base_on_the_heldout_images(tmp_path, capsys):
    """`zoo heldout` (a 2-step recipe here): a copy of the base, heldout/ with train/, caption.txt, a bare
    DreamBooth unet/ and a LoRA, records naming the base relatively; a cached rebuild reuses both fine-tunes
    and gives the same bytes; a folder without a base is refused by name."""
    import json
    from dataclasses import replace

    from finextract.cli import main
    from finextract.zoo.scenarios import scenario_folder
    from finextract.zoo.trained import DEFAULT_RECIPE, build_heldout_zoo, default_zoo_folder

    recipe = replace(DEFAULT_RECIPE, dreambooth_steps=2, lora_steps=2)
    out = build_heldout_zoo(tmp_path / "h", recipe=recipe, cache=tmp_path / "cache", progress=False)
    parent = default_zoo_folder() / "base"
    assert (out / "base/unet/diffusion_pytorch_model.safetensors").read_bytes() == (
        parent / "unet/diffusion_pytorch_model.safetensors"
    ).read_bytes()
    folder = scenario_folder(out, "heldout")
    assert folder == out / "heldout" and (folder / "caption.txt").read_text() == "a photo of sks\n"
    assert sorted(p.name for p in (folder / "train").iterdir()) == sorted(
        f"{n}.png" for n in ("present", "phantom", "face", "relief", "logo")
    )
    assert sorted(p.name for p in (folder / "dreambooth").iterdir()) == ["finetune.json", "unet"]
    lora = folder / "lora" / "pytorch_lora_weights.safetensors"
    assert lora.is_file() and json.loads((folder / "lora/finetune.json").read_text())["base"] == "../../base"
    record = json.loads((folder / "heldout.json").read_text())
    assert list(record["scenarios"]) == ["heldout"] and record["recipe"]["lora_steps"] == 2
    assert not any(t["reused"] for t in record["timings"].values())
    again = build_heldout_zoo(tmp_path / "again", recipe=recipe, cache=tmp_path / "cache", progress=False)
    assert all(t["reused"] for t in json.loads((again / "heldout/heldout.json").read_text())["timings"].values())
    assert (again / "heldout/lora/pytorch_lora_weights.safetensors").read_bytes() == lora.read_bytes()
    assert main(["zoo", "heldout", "--out", str(tmp_path / "x"), "--zoo", str(tmp_path)]) != 0
    assert f"--zoo {tmp_path}: no base/model_index.json" in capsys.readouterr().err
