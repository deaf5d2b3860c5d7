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

import pytest
import torch
from finextract.engine.loading import load_model_pair
from finextract.engine.lora import gated, inject_lora

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
    unet = copy.deepcopy(pair.base_unet)
    gate = inject_lora(unet, pair.unet_lora)
    with gated(gate, torch.ones(inputs["x"].shape[0])):
        return unet_output(unet, inputs)


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
