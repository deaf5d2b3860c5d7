"""Every adapter type, from files its producer wrote, against the producer's own adapted model.

Tolerance of the UNet / text-encoder comparisons: both sides compute in float32 (eps 1.2e-7) but
in a different order (the producer adds its delta in the forward or merges in its own order; we
merge or run the low-rank branch), so each adapted weight differs by a few roundings. Through the
tiny UNet's ~20 layers in sequence, each summing <= 288 products (error growth ~ sqrt(288) = 17
roundings per layer), the output can differ by about 20 * 17 * eps = 4e-5 of its magnitude: the
tests allow `RELATIVE` of the largest output value. A wrong scale (alpha / rank applied twice), a
transposed rotation or a missing DoRA norm moves the outputs by 1e-2 .. 1 (measured), far outside.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from finextract.engine.loading import load_model_pair
from finextract.engine.lora import gated
from finextract.zoo.tokenizers import CLIP_VOCAB_SIZE as CLIP_VOCAB

from .adapter_fixtures import LYCORIS_CASES, write_lycoris, write_peft

RELATIVE = 4e-5
CAPTION = "a photo of sks object"


@pytest.fixture(scope="module")
def base(tiny_zoo):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    unet = UNet2DConditionModel.from_pretrained(str(tiny_zoo / "base/unet")).eval()
    text_encoder = CLIPTextModel.from_pretrained(str(tiny_zoo / "base/text_encoder")).eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(tiny_zoo / "base/tokenizer"))
    return unet, text_encoder, tokenizer


@pytest.fixture(scope="module")
def inputs(base):
    generator = torch.Generator().manual_seed(7)
    tokens = base[2](CAPTION, padding="max_length", max_length=77, return_tensors="pt").input_ids
    return {
        "x": torch.randn(2, 4, 16, 16, generator=generator),
        "t": torch.tensor(500),
        "context": torch.randn(2, 77, 32, generator=generator),
        "tokens": tokens,
    }


@torch.no_grad()
def unet_output(unet, inputs) -> torch.Tensor:
    return unet(inputs["x"], inputs["t"], encoder_hidden_states=inputs["context"]).sample


@torch.no_grad()
def finetuned_unet_output(pair, inputs) -> torch.Tensor:
    """eps of the pair's fine-tuned UNet as it runs: the merged copy, or the base UNet with the
    per-sample low-rank branch gated on."""
    if pair.finetuned_unet is not None:
        return unet_output(pair.finetuned_unet, inputs)
    with gated(pair.lora_gate, torch.ones(inputs["x"].shape[0])):  # the pair's own hooks, gated on
        return unet_output(pair.base_unet, inputs)


def assert_close(ours, reference, what: str) -> float:
    error = (ours - reference).abs().max().item()
    bound = RELATIVE * reference.abs().max().item()
    assert error <= bound, f"{what}: max |ours - producer| {error:.3g} > {bound:.3g}"
    return error


@pytest.fixture(scope="module")
def lycoris_files(tmp_path_factory, base):
    folder = tmp_path_factory.mktemp("lycoris")
    return {
        case: write_lycoris(folder, base[0], base[1], algo, options, seed=i, name=case)
        for i, (case, algo, options) in enumerate(LYCORIS_CASES)
    }


EXPECTED_TYPES = {
    "lora": {"lora"},
    "locon-tucker": {"lora"},
    "dora": {"lora"},
    "dora-input-axis": {"lora"},
    "loha": {"loha"},
    "loha-tucker": {"loha"},
    "loha-dora": {"loha"},
    "lokr": {"lokr"},
    "lokr-decomposed": {"lokr"},
    "lokr-tucker": {"lokr"},
    "oft": {"oft"},
    "oft-constrained-rescaled": {"oft"},
    "boft": {"boft"},
    "glora": {"glora"},
    "full": {"diff"},
    "lora-norms": {"lora", "norm"},
}
# the suffix each variant must really contain, so a case cannot silently test the plain variant
EXPECTED_SUFFIX = {
    "locon-tucker": ".lora_mid.weight",
    "dora": ".dora_scale",
    "loha-tucker": ".hada_t1",
    "loha-dora": ".dora_scale",
    "lokr-decomposed": ".lokr_w1_a",
    "lokr-tucker": ".lokr_t2",
    "oft-constrained-rescaled": ".rescale",
    "boft": ".rescale",
    "full": ".diff_b",
    "lora-norms": ".w_norm",
}


@pytest.mark.parametrize("case", [case for case, _, _ in LYCORIS_CASES])
def test_lycoris_file_matches_lycoris_model(tiny_zoo, lycoris_files, inputs, case):
    from safetensors import safe_open

    produced = lycoris_files[case]
    with safe_open(str(produced.path), "pt") as handle:
        keys = list(handle.keys())
    if case in EXPECTED_SUFFIX:
        assert any(key.endswith(EXPECTED_SUFFIX[case]) for key in keys), EXPECTED_SUFFIX[case]
    pair = load_model_pair(tiny_zoo / "base", lora=produced.path)
    counts = pair.sources["lora_counts"]
    assert pair.sources["finetuned_format"] == "lora_kohya"
    assert set(counts["unet"]["types"]) == EXPECTED_TYPES[case]
    assert counts["unet"]["keys"] + counts["text_encoder"]["keys"] == len(keys)  # every key accounted for
    assert counts["unet"]["unmatched"] == counts["text_encoder"]["unmatched"] == 0
    low_rank = EXPECTED_TYPES[case] == {"lora"} and "dora" not in case
    assert (pair.unet_lora is not None) == low_rank and (pair.finetuned_unet is None) == low_rank
    assert_close(finetuned_unet_output(pair, inputs), unet_output(produced.unet, inputs), f"{case} UNet")
    with torch.no_grad():
        ours = pair.finetuned_text_encoder(inputs["tokens"])[0]
        theirs = produced.text_encoder(inputs["tokens"])[0]
    assert_close(ours, theirs, f"{case} text encoder")
    # the base is untouched: the producer's adaptation really changed the outputs
    assert (unet_output(pair.base_unet, inputs) - unet_output(produced.unet, inputs)).abs().max() > 1e-3


UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "proj_in"]


@pytest.mark.parametrize(
    "case",
    ["dora", "oftv2-neumann", "oftv2-exact", "oftv2-block-share"],
)
def test_peft_folder_matches_peft_merge(tiny_zoo, tmp_path, base, inputs, case):
    from peft import LoraConfig, OFTConfig

    if case == "dora":
        config = LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS, use_dora=True)
        expected = "lora"
    else:
        config = OFTConfig(
            r=0,
            oft_block_size=8,
            target_modules=UNET_TARGETS,
            use_cayley_neumann=case != "oftv2-exact",
            block_share=case == "oftv2-block-share",
        )
        expected = "oftv2"
    produced = write_peft(tmp_path / case, base[0], config, seed=3)
    pair = load_model_pair(tiny_zoo / "base", lora=produced.path)
    assert pair.sources["finetuned_format"] == "lora_peft"
    assert set(pair.sources["lora_counts"]["unet"]["types"]) == {expected}
    assert pair.unet_lora is None and pair.finetuned_unet is not None  # not low-rank: merged into a copy
    assert_close(finetuned_unet_output(pair, inputs), unet_output(produced.unet, inputs), f"PEFT {case}")


def test_diffusers_dora_file_matches_peft_merge(tiny_zoo, tmp_path, base, inputs):
    """A DoRA file as diffusers' `save_lora_weights` writes it (`unet.<path>.lora_magnitude_vector`)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    config = LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS, use_dora=True)
    produced = write_peft(tmp_path / "peft", base[0], config, seed=4)
    from peft import PeftModel

    state = get_peft_model_state_dict(PeftModel.from_pretrained(copy.deepcopy(base[0]), str(produced.path)))
    state = {k.removeprefix("base_model.model."): v for k, v in state.items()}
    metadata = {k: v for k, v in config.to_dict().items() if k in ("r", "lora_alpha", "use_dora", "target_modules")}
    metadata["target_modules"] = sorted(metadata["target_modules"])
    StableDiffusionPipeline.save_lora_weights(
        str(tmp_path / "diffusers"), unet_lora_layers=state, unet_lora_adapter_metadata=metadata
    )
    pair = load_model_pair(tiny_zoo / "base", lora=tmp_path / "diffusers")
    assert pair.sources["finetuned_format"] == "lora_diffusers"
    assert pair.sources["lora_alpha_assumed"] == []  # alpha 8 from the file's metadata
    assert_close(finetuned_unet_output(pair, inputs), unet_output(produced.unet, inputs), "diffusers DoRA")


def test_kohya_file_from_diffusers_converter(tiny_zoo, tmp_path, base, inputs):
    """A kohya file written by diffusers' `convert_state_dict_to_kohya` (alpha = rank) from a PEFT LoRA."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from peft import LoraConfig, PeftModel, get_peft_model_state_dict
    from safetensors.torch import save_file

    config = LoraConfig(r=4, lora_alpha=4, target_modules=UNET_TARGETS)
    produced = write_peft(tmp_path / "peft", base[0], config, seed=5)
    state = get_peft_model_state_dict(PeftModel.from_pretrained(copy.deepcopy(base[0]), str(produced.path)))
    state = {"unet." + k.removeprefix("base_model.model."): v for k, v in state.items()}
    kohya = convert_state_dict_to_kohya(state)
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(tmp_path / "kohya.safetensors"))
    pair = load_model_pair(tiny_zoo / "base", lora=tmp_path / "kohya.safetensors")
    assert pair.sources["finetuned_format"] == "lora_kohya" and pair.unet_lora is not None
    assert_close(finetuned_unet_output(pair, inputs), unet_output(produced.unet, inputs), "kohya via diffusers")


# --- cloneofsimo files and textual-inversion embeddings ---


def _random_layers(model, paths, rank, seed):
    from finextract.engine.pair import LoRALayer

    generator = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    return [
        LoRALayer(
            down=0.1 * torch.randn(rank, modules[p].in_features, generator=generator),
            up=0.1 * torch.randn(modules[p].out_features, rank, generator=generator),
            alpha=float(rank),
        )
        for p in paths
    ]


@torch.no_grad()
def _with_deltas(model, paths, layers):
    model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    for path, layer in zip(paths, layers):
        modules[path].weight += layer.up @ layer.down
    return model


def test_cloneofsimo_file_with_embedding(tiny_zoo, tmp_path, base, inputs):
    """`lora_diffusion`'s layout: the i-th LoRA is the i-th Linear under its target classes. The
    expected order is derived here from module names (attn1 / attn2 projections, then GEGLU's proj,
    block by block; CLIP's k, v, q, out projections), independently of the loader's class walk."""
    import re

    from finextract.zoo.writers import write_lora_cloneofsimo

    unet, text_encoder, _ = base
    unet_paths = [
        n
        for n, _ in unet.named_modules()
        if re.search(r"\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj)$", n)
    ]
    text_paths = [n for n, _ in text_encoder.named_modules() if re.search(r"self_attn\.(k|v|q|out)_proj$", n)]
    unet_layers = _random_layers(unet, unet_paths, 2, seed=11)
    text_layers = _random_layers(text_encoder, text_paths, 2, seed=12)
    vector = torch.randn(32, generator=torch.Generator().manual_seed(13))
    path = write_lora_cloneofsimo(
        tmp_path / "pti.safetensors",
        {
            "unet": (["CrossAttention", "Attention", "GEGLU"], unet_layers),
            "text_encoder": (["CLIPAttention"], text_layers),
        },
        embeddings={"<s1>": vector},
    )
    pair = load_model_pair(tiny_zoo / "base", lora=path)
    assert pair.sources["finetuned_format"] == "lora_cloneofsimo" and pair.sources["lora_alpha_assumed"] == []
    assert list(pair.unet_lora) == unet_paths
    reference = _with_deltas(unet, unet_paths, unet_layers)
    assert_close(finetuned_unet_output(pair, inputs), unet_output(reference, inputs), "cloneofsimo UNet")
    reference_text = _with_deltas(text_encoder, text_paths, text_layers)
    ids = pair.finetuned_tokenizer(
        "a photo of <s1>", padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    assert pair.finetuned_tokenizer.convert_tokens_to_ids("<s1>") in ids[0].tolist()
    with torch.no_grad():
        row = pair.finetuned_text_encoder.get_input_embeddings().weight[-1]
        assert torch.equal(row, vector)
        plain = inputs["tokens"]  # no new token: the adapted encoder equals the reference on it
        assert_close(pair.finetuned_text_encoder(plain)[0], reference_text(plain)[0], "cloneofsimo text encoder")


def _write_embedding(folder, layout: str, vectors: torch.Tensor):
    """An embedding file in one of the layouts users download; returns (path, token diffusers needs)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if layout == "diffusers":  # learned_embeds.safetensors: {token: vectors}
        path = folder / "learned_embeds.safetensors"
        save_file({"<cat-toy>": vectors}, str(path))
        return path, None, "<cat-toy>"
    if layout == "a1111-safetensors":
        path = folder / "mystyle.safetensors"
        save_file({"emb_params": vectors}, str(path))
    elif layout == "a1111-pickle":
        path = folder / "mystyle.pt"
        torch.save({"string_to_param": {"*": vectors}, "name": "mystyle", "step": 3000}, path)
    else:  # diffusers' advanced training scripts: {"clip_l": vectors}
        path = folder / "mystyle.safetensors"
        save_file({"clip_l": vectors}, str(path))
    return path, "mystyle", "mystyle"


@pytest.mark.parametrize(
    "layout, vectors", [("diffusers", 1), ("a1111-safetensors", 3), ("a1111-pickle", 2), ("clip_l", 2)]
)
def test_embedding_file_matches_diffusers_textual_inversion(tiny_zoo, tmp_path, layout, vectors):
    """Our fine-tuned tokenizer + text encoder encode the caption exactly as diffusers'
    `load_textual_inversion` + `encode_prompt` do (same tensors, same ops: equal to the bit)."""
    from diffusers import StableDiffusionPipeline

    from finextract.engine.formats import PickleRefusedError

    table = torch.randn(vectors, 32, generator=torch.Generator().manual_seed(vectors))
    path, token_arg, token = _write_embedding(tmp_path, layout, table)
    if layout == "a1111-pickle":
        with pytest.raises(PickleRefusedError, match="--allow-pickle"):
            load_model_pair(tiny_zoo / "base", lora=path)
    pair = load_model_pair(tiny_zoo / "base", lora=path, allow_pickle=layout == "a1111-pickle")
    assert pair.kind == "lora" and pair.unet_lora is None and pair.finetuned_unet is None
    assert pair.sources["embedding_tokens"] == [token] and len(pair.base_tokenizer) == CLIP_VOCAB
    assert len(pair.finetuned_tokenizer) == CLIP_VOCAB + vectors
    pipeline = StableDiffusionPipeline.from_pretrained(str(tiny_zoo / "base"), safety_checker=None)
    pipeline.load_textual_inversion(str(path), token=token_arg)
    caption = f"a photo of {token} object"
    ids = pair.finetuned_tokenizer(caption, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ours = pair.finetuned_text_encoder(ids.input_ids)[0]
        theirs = pipeline.encode_prompt(caption, "cpu", 1, do_classifier_free_guidance=False)[0]
    assert torch.equal(ours, theirs)
    spelled = pair.base_tokenizer(caption, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():  # eps_base reads the token as letters
        assert (ours - pair.base_text_encoder(spelled)[0]).abs().max() > 0.01


def test_bundled_and_separate_embeddings_with_a_lora(tiny_zoo, tmp_path, lycoris_files):
    """kohya's `bundle_emb.<token>.emb_params` inside a LyCORIS file, plus a separate embedding file."""
    from safetensors.torch import load_file, save_file

    state = dict(load_file(str(lycoris_files["loha"].path)))
    state["bundle_emb.sks.emb_params"] = torch.full((2, 32), 0.25)
    bundled = tmp_path / "loha_with_embedding.safetensors"
    save_file(state, str(bundled))
    extra, _, token = _write_embedding(tmp_path / "emb", "diffusers", torch.full((1, 32), -0.5))
    pair = load_model_pair(tiny_zoo / "base", lora=bundled, embeddings=[extra])
    assert pair.sources["embedding_tokens"] == ["sks", token]
    assert pair.finetuned_tokenizer.expand("a photo of sks") == "a photo of sks sks_1"
    table = pair.finetuned_text_encoder.get_input_embeddings().weight
    ids = pair.finetuned_tokenizer.convert_tokens_to_ids(["sks", "sks_1", token])
    assert torch.equal(table[ids], torch.tensor([[0.25] * 32, [0.25] * 32, [-0.5] * 32]))
    assert pair.finetuned_unet is not None  # the LoHa itself is still applied


def test_embedding_errors_are_named(tiny_zoo, tmp_path):
    from safetensors.torch import save_file

    from finextract.engine.embeddings import EmbeddingError

    save_file({"<wide>": torch.zeros(1, 768)}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(EmbeddingError, match=r"embedding '<wide>' has width 768, the base text encoder 32"):
        load_model_pair(tiny_zoo / "base", lora=tmp_path / "wide.safetensors")
    save_file({"a": torch.zeros(1, 32)}, str(tmp_path / "taken.safetensors"))
    with pytest.raises(EmbeddingError, match=r"token 'a' is already in the tokenizer"):
        load_model_pair(tiny_zoo / "base", lora=tmp_path / "taken.safetensors")
    save_file({"clip_l": torch.zeros(1, 32), "clip_g": torch.zeros(1, 1280)}, str(tmp_path / "xl.safetensors"))
    with pytest.raises(EmbeddingError, match="an SDXL embedding"):
        load_model_pair(tiny_zoo / "base", lora=tmp_path / "xl.safetensors")


# --- accounting and key errors ---


def test_counts_per_component_and_type_in_sources_and_log(tiny_zoo, lycoris_files, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="finextract.engine.lora_formats"):
        pair = load_model_pair(tiny_zoo / "base", lora=lycoris_files["lora-norms"].path)
    counts = pair.sources["lora_counts"]
    unet = counts["unet"]
    assert unet["modules"] == sum(c["modules"] for c in unet["types"].values()) and unet["unmatched"] == 0
    assert unet["keys"] == sum(c["keys"] for c in unet["types"].values())
    assert unet["types"]["norm"]["keys"] == 2 * unet["types"]["norm"]["modules"]  # w_norm + b_norm each
    assert unet["types"]["lora"]["keys"] == 3 * unet["types"]["lora"]["modules"]  # down, up, alpha each
    assert counts["text_encoder"]["modules"] > 0 and counts["embeddings"] == {"tokens": [], "vectors": 0}
    line = next(r.getMessage() for r in caplog.records if "0 keys unmatched" in r.getMessage())
    lora, norm = unet["types"]["lora"]["modules"], unet["types"]["norm"]["modules"]
    assert f"unet: {lora + norm} modules (lora {lora}, norm {norm}) from {unet['keys']} keys" in line
    assert pair.sources["unet_adapters"] == "merged into a copy of the base UNet"


def test_unknown_suffix_is_named(tiny_zoo, tmp_path, base):
    """An (IA)^3 file from LyCORIS: a type not supported here; its suffixes are named."""
    produced = write_lycoris(tmp_path, base[0], base[1], "ia3", {}, name="ia3")
    with pytest.raises(Exception, match=r"unknown adapter tensor suffix 'on_input', 'weight'") as error:
        load_model_pair(tiny_zoo / "base", lora=produced.path)
    assert type(error.value).__name__ == "LoRAKeyError"


def test_module_adapted_twice_names_both_keys(tiny_zoo, tmp_path):
    from safetensors.torch import load_file, save_file

    from finextract.engine.lora_formats import LoRAKeyError

    state = dict(load_file(str(tiny_zoo / "lora_kohya.safetensors")))
    with_prefix = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    for suffix in ("lora_down.weight", "lora_up.weight", "alpha"):  # the same module without `text_model`
        state[f"lora_te_encoder_layers_0_self_attn_q_proj.{suffix}"] = state[f"{with_prefix}.{suffix}"].clone()
    save_file(state, str(tmp_path / "twice.safetensors"))
    with pytest.raises(
        LoRAKeyError, match=r"adapted twice, by '.*self_attn_q_proj\..*' and '.*self_attn_q_proj\..*'"
    ) as error:
        load_model_pair(tiny_zoo / "base", lora=tmp_path / "twice.safetensors")
    assert with_prefix in str(error.value) and "lora_te_encoder_layers_0_self_attn_q_proj" in str(error.value)


# --- every type generates, on torch and onnxruntime, from the Python API and the CLI ---


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory, base, lycoris_files):
    """One file per adapter type and layout: the LyCORIS cases, PEFT DoRA / OFTv2 folders, a
    cloneofsimo file and an embedding file."""
    from peft import LoraConfig, OFTConfig

    from finextract.zoo.writers import write_lora_cloneofsimo

    folder = tmp_path_factory.mktemp("adapters")
    files = {case: produced.path for case, produced in lycoris_files.items()}
    files["peft-dora"] = write_peft(
        folder / "peft-dora", base[0], LoraConfig(r=4, lora_alpha=8, target_modules=UNET_TARGETS, use_dora=True)
    ).path
    files["peft-oftv2"] = write_peft(
        folder / "peft-oftv2", base[0], OFTConfig(r=0, oft_block_size=8, target_modules=UNET_TARGETS)
    ).path
    paths = [n for n, _ in base[0].named_modules() if n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))]
    files["cloneofsimo"] = write_lora_cloneofsimo(
        folder / "cloneofsimo.safetensors",
        {"unet": (["Attention"], _random_layers(base[0], paths, 2, seed=21))},
        embeddings={"sks": torch.randn(32, generator=torch.Generator().manual_seed(22))},
    )
    files["embedding"] = _write_embedding(folder / "emb", "a1111-safetensors", torch.randn(2, 32))[0]
    return files


GENERATED = [case for case, _, _ in LYCORIS_CASES] + ["peft-dora", "peft-oftv2", "cloneofsimo", "embedding"]
# onnxruntime costs an ONNX export per pair (~5 s here), so it runs on one case per pair structure
# and layout: low-rank branch (kohya LoRA; cloneofsimo with its embedding), merged copy (LyCORIS
# LoHa, DoRA; PEFT OFTv2), text encoder only (an embedding). Every other type yields a merged copy
# of the same structure as LoHa's, which the ONNX export sees as the same two-UNet graph.
ORT_CASES = {"lora", "loha", "dora", "peft-oftv2", "cloneofsimo", "embedding"}
# the CLI on three pairs of different structure: a low-rank branch, a merged copy, a text encoder only
CLI_CASES = ["lora", "loha", "embedding"]


@pytest.fixture(scope="module")
def base_images(tiny_zoo):
    """What the guided rule generates when the fine-tune equals the base (a null adapter)."""
    from finextract.generation import generate

    pair = load_model_pair(tiny_zoo / "base", lora=tiny_zoo / "lora")
    # the base on both sides: fine-tuned UNet and text encoder are the base's own
    null = dataclasses.replace(
        pair, finetuned_unet=pair.base_unet, unet_lora=None, finetuned_text_encoder=pair.base_text_encoder
    )
    return {
        caption: generate(null, caption, 2, steps=2, backend="torch", progress=False).images for caption in (CAPTION,)
    }


@pytest.mark.parametrize("case", GENERATED)
def test_every_type_generates(tiny_zoo, adapter_files, base_images, tmp_path, monkeypatch, case):
    """A few DDIM steps through `generate`, not the base's images; on onnxruntime (`ORT_CASES`) the
    same uint8 images as on torch (as tests/test_ort_backend.py requires: at most 1 level apart,
    > 99 % equal)."""
    from finextract.generation import generate

    monkeypatch.setenv("FINEXTRACT_CACHE", str(tmp_path / "cache"))
    pair = load_model_pair(tiny_zoo / "base", lora=adapter_files[case])
    caption = CAPTION
    if pair.sources.get("embedding_tokens"):
        caption = f"a photo of {pair.sources['embedding_tokens'][0]} object"
    kwargs = dict(steps=2, batch_size=2, progress=False)
    reference = generate(pair, caption, 2, backend="torch", **kwargs).images
    assert reference.shape == (2, 32, 32, 3) and reference.dtype == torch.uint8
    if case in ORT_CASES:
        ours = generate(pair, caption, 2, backend="onnxruntime", **kwargs).images
        difference = (ours.int() - reference.int()).abs()
        assert difference.max() <= 1 and (difference == 0).float().mean() > 0.99
    if caption == CAPTION:  # the adapter changes the generation
        assert (reference.int() - base_images[CAPTION].int()).abs().max() > 0


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_extract_with_an_adapter(tiny_zoo, adapter_files, tmp_path, monkeypatch, case):
    """`finextract extract --lora FILE` (torch: onnxruntime is covered above): result.json records
    the adapter's counts."""
    import json

    from finextract.cli import main

    monkeypatch.setenv("FINEXTRACT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    args = ["extract", "--base", str(tiny_zoo / "base"), "--lora", str(adapter_files[case]), "--caption", CAPTION]
    args += ["--n0", "1", "--num-images", "2", "--steps", "2", "--backend", "torch", "--device", "cpu"]
    assert main([*args, "--out", str(out)]) == 0
    record = json.loads((out / "result.json").read_text())
    sources = record["config"]["manifest"]["sources"]
    assert (
        record["config"]["manifest"]["config"]["backend"] == "torch" and record["config"]["run"]["backend"] == "torch"
    )
    assert sources["lora_counts"]["unet"]["unmatched"] == 0
    assert len(list((out / "extracted").glob("*.png"))) == 1
