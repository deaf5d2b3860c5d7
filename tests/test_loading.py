"""`load_model_pair` on every zoo format: same weights as the source files, same LoRA adapters,
and clear errors for mismatches, pickles, non-weights files and unmatched LoRA keys."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from finextract.engine.families import FamilyMismatchError
from finextract.engine.formats import CheckpointFormatError, PickleRefusedError
from finextract.engine.loading import NonFiniteWeightsError, load_model_pair
from finextract.engine.loading.checks import nonfinite_tensors
from finextract.engine.lora_formats import LoRAKeyError, read_lora
from finextract.zoo.configs import LORA_NO_ALPHA_MODULE
from finextract.zoo.models import zoo_lora
from finextract.zoo.tokenizers import CLIP_VOCAB_SIZE as CLIP_VOCAB

from .pickles import save_lightning_checkpoint


def _assert_same(model, file):
    expected = load_file(str(file))
    state = model.state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def _delta(layer):
    return layer.scale * layer.up.flatten(1) @ layer.down.flatten(1)


@pytest.fixture(scope="module")
def base_weights(tiny_zoo):
    return tiny_zoo / "base/unet/diffusion_pytorch_model.safetensors", tiny_zoo / "base/text_encoder/model.safetensors"


@pytest.mark.parametrize(
    "name, text_from",
    [
        ("dreambooth", "dreambooth"),
        ("dreambooth_unet", "dreambooth_unet"),
        ("dreambooth_unet_only", None),
        ("dreambooth_unet.safetensors", None),
    ],
)
def test_dreambooth_formats_load_source_weights(tiny_zoo, base_weights, name, text_from):
    pair = load_model_pair(tiny_zoo / "base", tiny_zoo / name)
    assert pair.kind == "dreambooth" and pair.unet_lora is None
    _assert_same(pair.base_unet, base_weights[0])
    _assert_same(pair.base_text_encoder, base_weights[1])
    _assert_same(pair.finetuned_unet, tiny_zoo / "dreambooth/unet/diffusion_pytorch_model.safetensors")
    if text_from is None:
        assert pair.finetuned_text_encoder is pair.base_text_encoder
        assert pair.sources["text_encoder"] == "base"
    else:
        _assert_same(pair.finetuned_text_encoder, tiny_zoo / text_from / "text_encoder/model.safetensors")
        assert pair.sources["text_encoder"] == "finetuned"
    assert pair.scheduler_config["beta_schedule"] == "scaled_linear"
    assert pair.base_tokenizer("a").input_ids[0] == pair.base_tokenizer.bos_token_id


@pytest.fixture(scope="module")
def source_lora(tiny_zoo):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(str(tiny_zoo / "base/unet"))
    text_encoder = CLIPTextModel.from_pretrained(str(tiny_zoo / "base/text_encoder"))
    return zoo_lora(unet, text_encoder, seed=2000)  # what build_zoo(seed=0) wrote


@pytest.mark.parametrize(
    "name, fmt",
    [
        ("lora", "lora_diffusers"),
        ("lora/pytorch_lora_weights.safetensors", "lora_diffusers"),
        ("lora_peft", "lora_peft"),
        ("lora_kohya.safetensors", "lora_kohya"),
    ],
)
def test_lora_formats_yield_the_same_adapters(tiny_zoo, base_weights, source_lora, name, fmt):
    unet_source, text_source = source_lora
    pair = load_model_pair(tiny_zoo / "base", lora=tiny_zoo / name)
    assert pair.kind == "lora" and pair.finetuned_unet is None and pair.sources["finetuned_format"] == fmt
    _assert_same(pair.base_unet, base_weights[0])  # adapters are not merged into the UNet
    assert set(pair.unet_lora) == set(unet_source)
    for module, layer in unet_source.items():
        assert pair.unet_lora[module].rank == layer.rank
        assert torch.allclose(_delta(pair.unet_lora[module]), _delta(layer), atol=1e-7), module
    counts = pair.sources["lora_counts"]
    assert counts["unet"]["modules"] == len(unet_source) and counts["text_encoder"]["modules"] == len(text_source)
    expected_assumed = [f"unet:{LORA_NO_ALPHA_MODULE}"] if fmt == "lora_kohya" else []
    assert pair.sources["lora_alpha_assumed"] == expected_assumed
    # the text-encoder LoRA is merged into a copy: exactly the named layers change, by their delta
    base_state = pair.base_text_encoder.state_dict()
    tuned_state = pair.finetuned_text_encoder.state_dict()
    changed = {k for k in base_state if not torch.equal(base_state[k], tuned_state[k])}
    assert changed == {f"{module}.weight" for module in text_source}
    for module, layer in text_source.items():
        delta = tuned_state[f"{module}.weight"] - base_state[f"{module}.weight"]
        assert torch.allclose(delta, _delta(layer), atol=1e-6), module


def test_lora_changes_exactly_the_named_unet_layers(tiny_zoo, source_lora):
    import copy

    from finextract.engine.lora import merge_lora

    pair = load_model_pair(tiny_zoo / "base", lora=tiny_zoo / "lora_kohya.safetensors")
    merged = merge_lora(copy.deepcopy(pair.base_unet), pair.unet_lora).state_dict()
    base_state = pair.base_unet.state_dict()
    changed = {k for k in base_state if not torch.equal(base_state[k], merged[k])}
    assert changed == {f"{module}.weight" for module in source_lora[0]}


def test_lora_matches_diffusers_own_loader(tiny_zoo):
    """Our reading (ranks, alphas, names), merged, equals diffusers' load_lora_into_unet + fuse_lora."""
    import copy

    from diffusers import StableDiffusionPipeline

    from finextract.engine.lora import merge_lora

    pair = load_model_pair(tiny_zoo / "base", lora=tiny_zoo / "lora")
    ours = merge_lora(copy.deepcopy(pair.base_unet), pair.unet_lora).state_dict()
    pipeline = StableDiffusionPipeline.from_pretrained(str(tiny_zoo / "base"), safety_checker=None)
    # UNet part only: diffusers 0.42 cannot place `text_model.`-named text-encoder LoRA keys on
    # transformers 5's CLIP modules (which lost that prefix); our reader maps them (tested above).
    state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(str(tiny_zoo / "lora"), return_lora_metadata=True)
    unet_state = {k: v for k, v in state.items() if k.startswith("unet.")}
    StableDiffusionPipeline.load_lora_into_unet(unet_state, alphas, pipeline.unet, metadata=metadata)
    pipeline.unet.fuse_lora()
    theirs = pipeline.unet.state_dict()  # fused weights stay in PEFT's `base_layer`
    for module in pair.unet_lora:
        fused = theirs[f"{module}.base_layer.weight"]
        assert not torch.equal(fused, pair.base_unet.state_dict()[f"{module}.weight"])
        assert torch.allclose(ours[f"{module}.weight"], fused, atol=1e-6), module


def test_lora_matches_peft_merge(tiny_zoo):
    import copy

    from peft import PeftModel

    from finextract.engine.lora import merge_lora

    pair = load_model_pair(tiny_zoo / "base", lora=tiny_zoo / "lora_peft")
    ours = merge_lora(copy.deepcopy(pair.base_unet), pair.unet_lora).state_dict()
    theirs = PeftModel.from_pretrained(copy.deepcopy(pair.base_unet), str(tiny_zoo / "lora_peft")).merge_and_unload()
    theirs = theirs.state_dict()
    for module in pair.unet_lora:
        assert torch.allclose(ours[f"{module}.weight"], theirs[f"{module}.weight"], atol=1e-6), module


def test_dtype_and_explicit_format(tiny_zoo):
    pair = load_model_pair(
        tiny_zoo / "base", tiny_zoo / "lora_kohya.safetensors", finetuned_format="lora_kohya", dtype="fp16"
    )
    assert pair.base_unet.dtype == torch.float16 and pair.finetuned_text_encoder.dtype == torch.float16
    assert all(layer.up.dtype == torch.float16 for layer in pair.unet_lora.values())
    with pytest.raises(
        ValueError, match=r"DreamBooth\) pipeline folder, not a LoRA checkpoint: pass it as --finetuned"
    ):
        load_model_pair(tiny_zoo / "base", tiny_zoo / "dreambooth", finetuned_format="lora")
    with pytest.raises(ValueError, match="finetuned_format 'nope'"):
        load_model_pair(tiny_zoo / "base", tiny_zoo / "dreambooth", finetuned_format="nope")
    with pytest.raises(ValueError, match="not both"):
        load_model_pair(tiny_zoo / "base", tiny_zoo / "dreambooth", lora=tiny_zoo / "lora")


# --- errors ---


def test_cross_attention_dim_mismatch_is_named(tiny_zoo, tmp_path):
    other = tmp_path / "sd2_unet"
    shutil.copytree(tiny_zoo / "dreambooth_unet_only", other)
    config = json.loads((other / "unet/config.json").read_text())
    config["cross_attention_dim"] = 1024
    (other / "unet/config.json").write_text(json.dumps(config))
    with pytest.raises(
        FamilyMismatchError,
        match=r"is SD 2\.x \(cross-attention 1024\), told by its configs; the base is SD 1\.x \(32\)",
    ):
        load_model_pair(tiny_zoo / "base", other)


def test_state_dict_mismatch_is_named(tiny_zoo, tmp_path):
    state = load_file(str(tiny_zoo / "dreambooth_unet.safetensors"))
    state.pop("conv_out.bias")
    state["conv_in.weight"] = state["conv_in.weight"][:16].contiguous()
    path = tmp_path / "unet.safetensors"
    save_file(state, str(path))
    with pytest.raises(
        ValueError,
        match=r"1 base tensor\(s\) missing, e.g. \['conv_out.bias'\].*conv_in.weight \(16, 4, 3, 3\) vs base \(32, 4, 3, 3\)",
    ):
        load_model_pair(tiny_zoo / "base", path)


def test_pickle_unet_refused_unless_allowed(tiny_zoo, tmp_path):
    state = load_file(str(tiny_zoo / "dreambooth_unet.safetensors"))
    path = tmp_path / "unet.ckpt"
    torch.save(state, path)
    with pytest.raises(PickleRefusedError, match="--allow-pickle"):
        load_model_pair(tiny_zoo / "base", path)
    pair = load_model_pair(tiny_zoo / "base", path, allow_pickle=True)
    _assert_same(pair.finetuned_unet, tiny_zoo / "dreambooth_unet.safetensors")


def _pickled_folder(source: Path, out: Path, names: dict) -> Path:
    """A copy of the pipeline folder `source` whose parts hold pickles: part -> pickle file name, each
    an original-SD-era Lightning `.ckpt` (weights nested under "state_dict", training state beside)."""
    shutil.copytree(source, out)
    for part, name in names.items():
        (weights,) = (out / part).glob("*.safetensors")
        save_lightning_checkpoint(out / part / name, load_file(str(weights)))
        weights.unlink()
    return out


def test_pickled_folder_parts_load_through_the_restricted_reader(tiny_zoo, tmp_path):
    # diffusers' own reader initialised this UNet at random from a nested "state_dict" (a warning only),
    # and refused the Lightning training state with "Unable to load weights from checkpoint file"
    names = {"unet": "diffusion_pytorch_model.bin", "text_encoder": "pytorch_model.bin", "vae": "vae.ckpt"}
    folder = _pickled_folder(tiny_zoo / "dreambooth", tmp_path / "dreambooth", names)
    with pytest.raises(PickleRefusedError, match="holds only pickle weights"):
        load_model_pair(tiny_zoo / "base", folder)
    pair = load_model_pair(tiny_zoo / "base", folder, allow_pickle=True)
    _assert_same(pair.finetuned_unet, tiny_zoo / "dreambooth" / "unet" / "diffusion_pytorch_model.safetensors")
    _assert_same(pair.finetuned_text_encoder, tiny_zoo / "dreambooth" / "text_encoder" / "model.safetensors")
    _assert_same(pair.vae, tiny_zoo / "dreambooth" / "vae" / "diffusion_pytorch_model.safetensors")


def test_pickled_folder_errors_name_the_file(tiny_zoo, tmp_path):
    folder = _pickled_folder(tiny_zoo / "dreambooth_unet_only", tmp_path / "two", {"unet": "a.bin"})
    shutil.copy(folder / "unet" / "a.bin", folder / "unet" / "b.bin")
    with pytest.raises(ValueError, match=r"holds 2 pickle weight files \(a.bin, b.bin\) and none is named"):
        load_model_pair(tiny_zoo / "base", folder, allow_pickle=True)
    (folder / "unet" / "b.bin").unlink()
    state = load_file(str(tiny_zoo / "dreambooth_unet.safetensors"))
    del state["conv_out.bias"]
    torch.save(state, folder / "unet" / "a.bin")
    with pytest.raises(ValueError, match=r"a.bin \(pickle weights of .*\) does not match the base UNet: 1 base tensor"):
        load_model_pair(tiny_zoo / "base", folder, allow_pickle=True)


def test_nonfinite_tensors_exact_after_a_cheap_sum():
    finite_overflow = torch.full((4,), 3e38)  # every value finite, their float32 sum overflows to inf
    half = torch.zeros(8, dtype=torch.float16)
    half[5] = float("nan")
    named = [
        ("big", finite_overflow),
        ("half", half),
        ("steps", torch.tensor([2**62])),
        ("inf", torch.tensor([1.0, -float("inf")])),
    ]
    assert nonfinite_tensors(named) == [("half", 1, 8), ("inf", 1, 2)]


def test_nonfinite_weights_named_at_load(tiny_zoo, tmp_path):
    state = load_file(str(tiny_zoo / "dreambooth_unet.safetensors"))
    state["down_blocks.0.resnets.0.conv1.weight"][0, 0, 0, :2] = torch.tensor([float("nan"), float("inf")])
    save_file(state, str(tmp_path / "unet.safetensors"))
    with pytest.raises(
        NonFiniteWeightsError,
        match=r"fine-tune .*unet.safetensors: 1 tensor\(s\) hold NaN or Inf: unet down_blocks.0.resnets.0.conv1.weight "
        r"\(2 of \d+ values\)",
    ):
        load_model_pair(tiny_zoo / "base", tmp_path / "unet.safetensors")
    base = tmp_path / "base"
    shutil.copytree(tiny_zoo / "base", base)
    vae_file = base / "vae" / "diffusion_pytorch_model.safetensors"
    vae = load_file(str(vae_file))
    vae["decoder.conv_out.bias"][0] = float("nan")
    save_file(vae, str(vae_file))
    with pytest.raises(
        NonFiniteWeightsError, match=r"base .*base: 1 tensor\(s\) .*: vae decoder.conv_out.bias \(1 of 3"
    ):
        load_model_pair(base, tiny_zoo / "dreambooth_unet.safetensors")
    lora = load_file(str(tiny_zoo / "lora" / "pytorch_lora_weights.safetensors"))
    key = next(k for k in sorted(lora) if k.startswith("unet.") and "lora_A" in k)
    lora[key][0, 0] = float("inf")
    save_file(lora, str(tmp_path / "lora.safetensors"))
    module = key.removeprefix("unet.").removesuffix(".lora_A.weight")
    with pytest.raises(NonFiniteWeightsError, match=rf"unet LoRA {re.escape(module)}.down \(1 of"):
        load_model_pair(tiny_zoo / "base", lora=tmp_path / "lora.safetensors")


def test_non_weights_files_are_named(tiny_zoo, tmp_path):
    html = tmp_path / "model.safetensors"
    html.write_text("<!DOCTYPE html><html><title>404</title></html>")
    with pytest.raises(CheckpointFormatError, match="HTML page"):
        load_model_pair(tiny_zoo / "base", html)
    base = tmp_path / "base_clone"  # a git clone without git-lfs: pointers instead of weights
    shutil.copytree(tiny_zoo / "base", base)
    (base / "unet/diffusion_pytorch_model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 3438167536\n"
    )
    with pytest.raises(CheckpointFormatError, match="git-lfs pointer"):
        load_model_pair(base, tiny_zoo / "dreambooth")


def test_truncated_finetune_is_named(tiny_zoo, tmp_path):
    data = (tiny_zoo / "dreambooth_unet.safetensors").read_bytes()
    path = tmp_path / "unet.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError, match="is truncated"):
        load_model_pair(tiny_zoo / "base", path)


def test_unmatched_lora_key_is_named(tiny_zoo, tmp_path):
    state = load_file(str(tiny_zoo / "lora_kohya.safetensors"))
    state["lora_unet_down_blocks_0_resnets_0_nonexistent.lora_down.weight"] = torch.zeros(4, 32)
    state["lora_unet_down_blocks_0_resnets_0_nonexistent.lora_up.weight"] = torch.zeros(32, 4)
    path = tmp_path / "kohya.safetensors"
    save_file(state, str(path))
    with pytest.raises(
        LoRAKeyError, match=r"2 of 97 unet LoRA keys match no .*lora_unet_down_blocks_0_resnets_0_nonexistent"
    ):
        load_model_pair(tiny_zoo / "base", lora=path)
    state = load_file(str(tiny_zoo / "lora/pytorch_lora_weights.safetensors"))
    state["text_encoder.text_model.encoder.layers.7.mlp.fc1.lora_A.weight"] = torch.zeros(4, 32)
    state["text_encoder.text_model.encoder.layers.7.mlp.fc1.lora_B.weight"] = torch.zeros(64, 4)
    folder = tmp_path / "diffusers_lora"
    folder.mkdir()
    save_file(state, str(folder / "pytorch_lora_weights.safetensors"))
    with pytest.raises(LoRAKeyError, match=r"text_encoder LoRA keys match no .*layers.7.mlp.fc1"):
        load_model_pair(tiny_zoo / "base", lora=folder)


def test_lora_shape_mismatch_is_named(tiny_zoo, tmp_path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    state = load_file(str(tiny_zoo / "lora_kohya.safetensors"))
    key = next(k for k in state if k.startswith("lora_unet_") and k.endswith("attn2_to_k.lora_down.weight"))
    state[key] = torch.zeros(state[key].shape[0], 1024)  # an SD 2.x text width
    path = tmp_path / "kohya.safetensors"
    save_file(state, str(path))
    unet = UNet2DConditionModel.from_pretrained(str(tiny_zoo / "base/unet"))
    text_encoder = CLIPTextModel.from_pretrained(str(tiny_zoo / "base/text_encoder"))
    with pytest.raises(LoRAKeyError, match="trained for another base model"):
        read_lora(path, unet, text_encoder)


def test_hub_id_resolves_only_from_local_cache(tiny_zoo, tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--tiny--sd" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_zoo / "base", snapshot)
    (cache / "models--tiny--sd" / "refs").mkdir()
    (cache / "models--tiny--sd" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pair = load_model_pair("tiny/sd", tiny_zoo / "dreambooth_unet_only")
    assert pair.sources["base_format"] == "hub-cache"
    _assert_same(pair.base_unet, tiny_zoo / "base/unet/diffusion_pytorch_model.safetensors")
    with pytest.raises(FileNotFoundError, match="offline: not in the local Hugging Face cache"):
        load_model_pair("runwayml/stable-diffusion-v1-5", tiny_zoo / "dreambooth")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_model_pair(tmp_path / "nothing_here", tiny_zoo / "dreambooth")


def test_single_file_base_without_config_fails_clearly(tiny_zoo):
    with pytest.raises(ValueError, match=r"single-file checkpoint: pass base_config=.*\(CLI --base-config\)"):
        load_model_pair(tiny_zoo / "dreambooth_unet.safetensors", tiny_zoo / "lora")


@pytest.mark.parametrize(
    "content, message",
    [
        (b"just some text, renamed", r"is a text file \(23 bytes, first line 'just some text, renamed'\)"),
        (b"\x01\x02garbage", "unrecognised file format"),
        (b"<!DOCTYPE html><html><title>login</title></html>", "is an HTML page"),
        (b"", r"is empty \(0 bytes\)"),
    ],
)
def test_lora_path_sniffs_like_finetuned(tiny_zoo, tmp_path, content, message):
    path = tmp_path / "lora.safetensors"
    path.write_bytes(content)
    for kwargs in ({"lora": path}, {"finetuned": path}):  # the same diagnosis on both paths
        with pytest.raises(CheckpointFormatError, match=message):
            load_model_pair(tiny_zoo / "base", **kwargs)


def test_full_unet_as_lora_and_lora_as_full_are_named_in_plain_words(tiny_zoo):
    with pytest.raises(
        ValueError,
        match=r"full fine-tuned \(DreamBooth\) UNet state dict, not a LoRA checkpoint: "
        r"pass it as --finetuned",
    ) as error:
        load_model_pair(tiny_zoo / "base", lora=tiny_zoo / "dreambooth_unet.safetensors")
    assert "unet_file" not in str(error.value)
    with pytest.raises(ValueError, match=r"is a LoRA checkpoint, not a full fine-tune .*pass it as --lora"):
        load_model_pair(tiny_zoo / "base", tiny_zoo / "lora_kohya.safetensors", finetuned_format="unet_file")


# --- fine-tunes that add tokens, original-SD single files, bad bases ---


def _dreambooth_with_tokens(tiny_zoo, folder, tokens=("sks",), rows_extra=0, ship_tokenizer=True):
    """A DreamBooth pipeline folder whose tokenizer adds `tokens` and whose text encoder has one
    row per tokenizer entry (+ `rows_extra`), as diffusers' training scripts save it."""
    from transformers import CLIPTextModel, CLIPTokenizer

    shutil.copytree(tiny_zoo / "dreambooth", folder)
    tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    tokenizer.add_tokens(list(tokens))
    text_encoder = CLIPTextModel.from_pretrained(str(folder / "text_encoder"))
    text_encoder.resize_token_embeddings(len(tokenizer) + rows_extra)
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight[-len(tokens) - rows_extra :] = 0.5
    text_encoder.save_pretrained(folder / "text_encoder")
    shutil.rmtree(folder / "tokenizer")
    if ship_tokenizer:
        tokenizer.save_pretrained(folder / "tokenizer")
    return folder


def test_dreambooth_with_added_tokens_uses_its_own_tokenizer(tiny_zoo, tmp_path):
    from finextract.engine.conditioning import encode_conditioning
    from finextract.rules import rule_for

    folder = _dreambooth_with_tokens(tiny_zoo, tmp_path / "db_tokens")
    pair = load_model_pair(tiny_zoo / "base", folder)
    assert len(pair.base_tokenizer) == CLIP_VOCAB and len(pair.finetuned_tokenizer) == CLIP_VOCAB + 1
    assert pair.sources["tokenizer"] == "finetuned"
    sks = pair.finetuned_tokenizer.convert_tokens_to_ids("sks")
    assert sks == CLIP_VOCAB and sks in pair.finetuned_tokenizer("a photo of sks object").input_ids
    assert CLIP_VOCAB not in pair.base_tokenizer("a photo of sks object").input_ids  # the base spells it out
    # eps_ft's caption embedding comes from the fine-tune's own tokenizer and text encoder, eps_base's from the base's
    conditioning = encode_conditioning(pair, rule_for("finextract", pair.kind), "a photo of sks object")
    tokens = pair.finetuned_tokenizer(
        "a photo of sks object", padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        expected = pair.finetuned_text_encoder(tokens)[0]
    assert torch.equal(conditioning[0], expected)  # term a of Eq. 13: eps_ft on the caption


@pytest.mark.parametrize(
    "ship_tokenizer, rows_extra, message",
    [
        (
            True,
            1,
            rf"has {CLIP_VOCAB + 2} token-embedding rows but the tokenizer \(its own\) has {CLIP_VOCAB + 1} entries",
        ),
        (
            False,
            0,
            rf"has {CLIP_VOCAB + 1} token-embedding rows but the tokenizer \(the base's: the fine-tune ships none\) "
            rf"has {CLIP_VOCAB}",
        ),
    ],
)
def test_tokenizer_and_text_encoder_rows_must_agree(tiny_zoo, tmp_path, ship_tokenizer, rows_extra, message):
    folder = _dreambooth_with_tokens(tiny_zoo, tmp_path / "db", rows_extra=rows_extra, ship_tokenizer=ship_tokenizer)
    with pytest.raises(ValueError, match=message):
        load_model_pair(tiny_zoo / "base", folder)


@pytest.fixture(scope="module")
def dreambooth_models(tiny_zoo):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    return (
        UNet2DConditionModel.from_pretrained(str(tiny_zoo / "dreambooth/unet")),
        CLIPTextModel.from_pretrained(str(tiny_zoo / "dreambooth/text_encoder")),
        AutoencoderKL.from_pretrained(str(tiny_zoo / "base/vae")),
    )


@pytest.mark.parametrize("parts", ["unet", "unet+text_encoder", "unet+text_encoder+vae"])
def test_original_sd_single_file_finetune(tiny_zoo, tmp_path, dreambooth_models, caplog, parts):
    """An LDM-layout file (written by the zoo's inverse of diffusers' converters) loads, offline,
    onto the base's configs; parts it lacks come from the base, with a log line each."""
    import logging

    from finextract.zoo.writers import write_ldm_checkpoint

    unet, text_encoder, vae = dreambooth_models
    path = write_ldm_checkpoint(
        tmp_path / "ft.safetensors",
        unet,
        text_encoder if "text_encoder" in parts else None,
        vae if "vae" in parts else None,
    )
    with caplog.at_level(logging.INFO, logger="finextract.engine.loading"):
        pair = load_model_pair(tiny_zoo / "base", path)
    assert pair.kind == "dreambooth" and pair.sources["finetuned_format"] == "checkpoint"
    _assert_same(pair.finetuned_unet, tiny_zoo / "dreambooth/unet/diffusion_pytorch_model.safetensors")
    if "text_encoder" in parts:
        _assert_same(pair.finetuned_text_encoder, tiny_zoo / "dreambooth/text_encoder/model.safetensors")
    else:
        assert pair.finetuned_text_encoder is pair.base_text_encoder
        assert "holds no text encoder: using the base's" in caplog.text
    assert ("holds no VAE: using the base's" in caplog.text) == ("vae" not in parts)
    _assert_same(pair.vae, tiny_zoo / "base/vae/diffusion_pytorch_model.safetensors")


def test_partial_single_file_unet_is_refused_naming_the_missing(tiny_zoo, tmp_path, dreambooth_models):
    from finextract.zoo.writers import write_ldm_checkpoint

    path = write_ldm_checkpoint(
        tmp_path / "partial.safetensors",
        dreambooth_models[0],
        drop=("model.diffusion_model.out.2.weight", "model.diffusion_model.out.2.bias"),
    )
    with pytest.raises(
        ValueError, match=r"\(UNet\) is partial: 2 of \d+ tensors are missing .*'conv_out.bias', 'conv_out.weight'"
    ):
        load_model_pair(tiny_zoo / "base", path)


def test_single_file_pickle_finetune_and_single_file_base(tiny_zoo, tmp_path, dreambooth_models):
    from safetensors.torch import load_file

    from finextract.zoo.writers import write_ldm_checkpoint

    unet, _, vae = dreambooth_models
    ckpt = tmp_path / "ft.ckpt"
    # as the original SD releases were saved: Lightning's ModelCheckpoint pickled beside the weights
    save_lightning_checkpoint(ckpt, load_file(str(write_ldm_checkpoint(tmp_path / "x.safetensors", unet))))
    with pytest.raises(PickleRefusedError, match="is a pickle checkpoint, which can run code when loaded: refused"):
        load_model_pair(tiny_zoo / "base", ckpt)
    pair = load_model_pair(tiny_zoo / "base", ckpt, allow_pickle=True)  # its layout shows once it is read
    assert pair.sources["finetuned_format"] == "checkpoint"
    _assert_same(pair.finetuned_unet, tiny_zoo / "dreambooth/unet/diffusion_pytorch_model.safetensors")
    # the base as an original-SD single file, with a pipeline folder for its configs
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    base_file = write_ldm_checkpoint(
        tmp_path / "base.safetensors",
        UNet2DConditionModel.from_pretrained(str(tiny_zoo / "base/unet")),
        CLIPTextModel.from_pretrained(str(tiny_zoo / "base/text_encoder")),
        vae,
    )
    pair = load_model_pair(base_file, tiny_zoo / "dreambooth_unet_only", base_config=tiny_zoo / "base")
    assert pair.sources["base_format"] == "single-file"
    _assert_same(pair.base_unet, tiny_zoo / "base/unet/diffusion_pytorch_model.safetensors")
    _assert_same(pair.base_text_encoder, tiny_zoo / "base/text_encoder/model.safetensors")
    with pytest.raises(ValueError, match=r"lacks its text_encoder and vae: a base checkpoint must be complete"):
        load_model_pair(tmp_path / "x.safetensors", tiny_zoo / "dreambooth_unet_only", base_config=tiny_zoo / "base")


@pytest.mark.parametrize(
    "content, message",
    [
        ("<!DOCTYPE html><html><title>Sign in</title></html>", r"base: .*is an HTML page"),
        ("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 4265380512\n", r"base: .*git-lfs pointer"),
        ("Repository not found\n", r"base: .*is a text file"),
    ],
)
def test_bad_base_file_is_named_before_diffusers_sees_it(tiny_zoo, tmp_path, content, message):
    path = tmp_path / "v1-5-pruned.safetensors"
    path.write_text(content)
    with pytest.raises(CheckpointFormatError, match=message):
        load_model_pair(path, tiny_zoo / "dreambooth", base_config=tiny_zoo / "base")


def test_misnamed_pickle_is_named(tiny_zoo, tmp_path):
    path = tmp_path / "unet.safetensors"
    torch.save(load_file(str(tiny_zoo / "dreambooth_unet.safetensors")), path)
    for kwargs in ({"finetuned": path}, {"lora": path}):
        with pytest.raises(PickleRefusedError, match="is a misnamed pickle"):
            load_model_pair(tiny_zoo / "base", **kwargs)
    base = tmp_path / "base"
    shutil.copytree(tiny_zoo / "base", base)
    vae_file = base / "vae/diffusion_pytorch_model.safetensors"
    state = {k: v.clone() for k, v in load_file(str(vae_file)).items()}  # load_file maps the file: copy first
    torch.save(state, vae_file)
    with pytest.raises(CheckpointFormatError, match="is a misnamed pickle"):
        load_model_pair(base, tiny_zoo / "dreambooth")
