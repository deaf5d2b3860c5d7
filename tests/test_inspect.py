"""`finextract inspect` and the trainer metadata (`finextract.engine.metadata`): files built with each
producer's documented keys and value formats (kohya-ss sd-scripts `train_network.py`, LyCORIS through
kohya, PEFT's own `LoraConfig.save_pretrained`, diffusers' own `save_lora_weights`, finextract
`finetune`), malformed metadata, and metadata contradicting the weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

RANK = 4
# an SD 1.x UNet's cross-attention key projection reads the 768-wide CLIP states; its query 320 wide
ATTN2 = "down_blocks_0_attentions_0_transformer_blocks_0_attn2"


def _kohya_metadata(**extra) -> dict:
    """What sd-scripts' train_network.py writes (every value str()), for two DreamBooth folders."""
    values = {
        "ss_sd_model_name": "anything-v3.safetensors",
        "ss_sd_model_hash": "1a7df6b8",
        "ss_new_sd_model_hash": "a" * 64,
        "sshs_model_hash": "f" * 64,  # the LoRA file's own hash: never the parent's
        "sshs_legacy_hash": "ffffffff",
        "ss_base_model_version": "sd_v1",
        "ss_v2": "False",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(RANK),
        "ss_network_alpha": "2.0",
        "ss_num_train_images": "240",  # 12 x 16 + 3 x 16 repeats: not N0
        "ss_dataset_dirs": json.dumps(
            {
                "16_smf girl": {"n_repeats": 16, "img_count": 12},
                "16_smf girl outdoors": {"n_repeats": 16, "img_count": 3},
            }
        ),
        "ss_tag_frequency": json.dumps(
            {
                "16_smf girl": {"smf girl": 12, "smile": 12, "red hair": 7},
                "16_smf girl outdoors": {"smf girl": 3, "tree": 2},
            }
        ),
        "ss_resolution": "(512, 512)",
        "ss_steps": "1000",
        "ss_learning_rate": "0.0001",
        "ss_batch_size_per_device": "2",
        "ss_seed": "42",
        "ss_session_id": "123456",  # a key the record does not read: listed raw
    }
    return values | extra


def _kohya_lora(path, metadata: dict, rank: int = RANK, alpha: float = 2.0):
    tensors = {
        f"lora_unet_{ATTN2}_to_k.lora_down.weight": torch.zeros(rank, 768),
        f"lora_unet_{ATTN2}_to_k.lora_up.weight": torch.zeros(320, rank),
        f"lora_unet_{ATTN2}_to_k.alpha": torch.tensor(alpha),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(rank, 768),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(768, rank),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(alpha),
    }
    save_file(tensors, str(path), metadata=metadata)
    return path


def _inspect(path):
    from finextract.inspection import inspect_checkpoint

    return inspect_checkpoint(path)


def test_kohya_lora_training_block(tmp_path):
    report = _inspect(_kohya_lora(tmp_path / "smf.safetensors", _kohya_metadata()))
    training = report["training"]
    # N0: the img_counts of ss_dataset_dirs summed (12 + 3), not ss_num_train_images (with repeats)
    assert training["n0"] == {"value": 15, "source": "ss_dataset_dirs"}
    assert training["settings"]["num_train_images_with_repeats"]["value"] == 240
    assert [w["value"] for w in training["trigger_words"]] == ["smf girl", "smf girl outdoors"]
    candidates = [(c["caption"], c["source"]) for c in training["caption_candidates"]]
    # the tags every image of a folder carries, by frequency; then each folder's trigger words
    assert candidates[0] == ("smf girl, smile", "ss_tag_frequency")
    assert ("smf girl outdoors", "ss_dataset_dirs") in candidates
    assert training["caption"] == {"value": "smf girl, smile", "source": "ss_tag_frequency"}
    assert training["tags"][0] == {"tag": "smf girl", "count": 15}
    parent = training["parent"]
    assert parent["name"] == {"value": "anything-v3.safetensors", "source": "ss_sd_model_name"}
    assert parent["hash"]["value"] == "1a7df6b8" and parent["sha256"]["value"] == "a" * 64
    assert "f" * 64 not in json.dumps(parent)  # sshs_model_hash is the file's own
    settings = training["settings"]
    assert settings["steps"] == {"value": 1000, "source": "ss_steps"}
    assert settings["resolution"]["value"] == [512, 512]
    assert settings["learning_rate"]["value"] == pytest.approx(1e-4)
    assert settings["network_dim"]["value"] == RANK and settings["network_alpha"]["value"] == 2.0
    assert training["unknown"] == {"ss_session_id": "123456"}
    assert training["producers"] == ["kohya"] and not report["warnings"] and not report["contradictions"]
    # the weights: family from the 768-wide cross-attention input, LoRA rank 4 with alpha 2 on both parts
    assert report["kind"] == "adapter" and report["format"] == "kohya"
    assert report["family"]["name"] == "sd1"
    unet, text = report["components"]["unet"], report["components"]["text_encoder"]
    assert unet["types"] == {"lora": 1} and unet["ranks"] == {"4": 1} and unet["alphas"] == {"2.0": 1}
    assert unet["kinds"] == {"cross-attention": 1} and text["kinds"] == {"self-attention": 1}


def test_lycoris_loha_through_kohya(tmp_path):
    """LyCORIS trained by sd-scripts: `ss_network_module` lycoris.kohya, the algorithm in ss_network_args."""
    rank = 2
    tensors = {
        f"lora_unet_{ATTN2}_to_k.hada_w1_a": torch.zeros(320, rank),
        f"lora_unet_{ATTN2}_to_k.hada_w1_b": torch.zeros(rank, 768),
        f"lora_unet_{ATTN2}_to_k.hada_w2_a": torch.zeros(320, rank),
        f"lora_unet_{ATTN2}_to_k.hada_w2_b": torch.zeros(rank, 768),
        f"lora_unet_{ATTN2}_to_k.alpha": torch.tensor(1.0),
    }
    metadata = _kohya_metadata(
        ss_network_module="lycoris.kohya",
        ss_network_dim=str(rank),
        ss_network_alpha="1.0",
        ss_network_args=json.dumps({"algo": "loha", "conv_dim": "2", "conv_alpha": "1"}),
    )
    save_file(tensors, str(tmp_path / "loha.safetensors"), metadata=metadata)
    report = _inspect(tmp_path / "loha.safetensors")
    assert report["components"]["unet"]["types"] == {"loha": 1}
    assert report["components"]["unet"]["ranks"] == {"2": 1}
    settings = report["training"]["settings"]
    assert settings["network_args"]["value"]["algo"] == "loha"
    assert settings["network_module"] == {"value": "lycoris.kohya", "source": "ss_network_module"}
    assert report["training"]["n0"]["value"] == 15 and not report["contradictions"]


def test_peft_adapter_folder(tmp_path):
    """adapter_config.json as PEFT itself writes it (`LoraConfig.save_pretrained`)."""
    from peft import LoraConfig

    folder = tmp_path / "peft"
    LoraConfig(r=RANK, lora_alpha=8, target_modules=["to_k", "to_v"]).save_pretrained(str(folder))
    prefix = "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    tensors = {f"{prefix}.lora_A.weight": torch.zeros(RANK, 768), f"{prefix}.lora_B.weight": torch.zeros(320, RANK)}
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    report = _inspect(folder)
    settings = report["training"]["settings"]
    assert settings["network_dim"] == {"value": RANK, "source": "adapter_config.json:r"}
    assert settings["network_alpha"] == {"value": 8.0, "source": "adapter_config.json:lora_alpha"}
    assert report["training"]["producers"] == ["peft"] and report["training"]["n0"] is None
    unet = report["components"]["unet"]
    assert report["format"] == "peft" and unet["alphas"] == {"8.0": 1} and unet["alpha_source"] == "config"
    # to_v is a target the weights do not adapt: said, and the weights win
    (contradiction,) = report["contradictions"]
    assert contradiction.startswith("modules:") and "to_v" in contradiction and "weights win" in contradiction


def test_diffusers_lora_adapter_metadata(tmp_path):
    """`lora_adapter_metadata` as diffusers' own `save_lora_weights` packs it ("unet.r", ...)."""
    from diffusers import StableDiffusionPipeline

    prefix = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    layers = {f"{prefix}.lora_A.weight": torch.zeros(RANK, 768), f"{prefix}.lora_B.weight": torch.zeros(320, RANK)}
    config = {"r": RANK, "lora_alpha": 2, "target_modules": [prefix]}
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=layers, unet_lora_adapter_metadata=config, safe_serialization=True
    )
    report = _inspect(tmp_path / "pytorch_lora_weights.safetensors")
    settings = report["training"]["settings"]
    assert settings["network_dim"] == {"value": RANK, "source": "lora_adapter_metadata[unet.r]"}
    assert settings["network_alpha"]["value"] == 2.0
    assert report["components"]["unet"]["alphas"] == {"2.0": 1}
    assert report["training"]["producers"] == ["diffusers"] and not report["contradictions"]


@pytest.mark.parametrize(
    "scenario, caption, n0", [(".", "a photo of sks", 5), ("style", "an illustration in sks style", 10)]
)
@pytest.mark.parametrize("kind", ["dreambooth", "dreambooth/unet", "lora", "lora/pytorch_lora_weights.safetensors"])
def test_committed_zoo_finetunes_record_their_training(scenario, caption, n0, kind):
    from finextract import default_zoo_folder

    zoo = default_zoo_folder()
    report = _inspect(zoo / scenario / kind)
    training = report["training"]
    assert training["n0"]["value"] == n0 and training["caption"]["value"] == caption, training
    assert not report["warnings"] and not report["contradictions"]
    # the parent: the zoo base's UNet file, hashed as kohya hashes a model file
    from finextract.engine.metadata import kohya_model_hashes

    hashes = kohya_model_hashes(zoo / "base" / "unet" / "diffusion_pytorch_model.safetensors")
    assert training["parent"]["sha256"]["value"] == hashes["ss_new_sd_model_hash"]
    assert training["parent"]["name"]["value"] == "base"


def test_kohya_model_hashes_follow_their_definition(tmp_path):
    """sd-scripts' `model_hash`: sha256 of the 64 KiB at offset 1 MiB, 8 hex digits; the new one: the whole file."""
    import hashlib

    from finextract.engine.metadata import kohya_model_hashes

    data = bytes(range(256)) * 5000  # 1.28 MB
    (tmp_path / "m.safetensors").write_bytes(data)
    hashes = kohya_model_hashes(tmp_path / "m.safetensors")
    assert hashes["ss_sd_model_hash"] == hashlib.sha256(data[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    assert hashes["ss_new_sd_model_hash"] == hashlib.sha256(data).hexdigest()


def test_malformed_metadata_warns_and_the_rest_stands(tmp_path):
    from finextract.engine.metadata import MAX_VALUE_CHARS

    metadata = _kohya_metadata(
        ss_dataset_dirs="{not json",
        ss_tag_frequency="[1, 2]",
        ss_network_dim="abc",
        ss_steps="1e30",
        ss_learning_rate="nan",
        ss_training_comment="x" * (MAX_VALUE_CHARS + 1),
    )
    report = _inspect(_kohya_lora(tmp_path / "bad.safetensors", metadata))
    warnings = "\n".join(report["warnings"])
    for key in ("ss_dataset_dirs", "ss_tag_frequency", "ss_network_dim", "ss_steps", "ss_learning_rate"):
        assert key in warnings, (key, warnings)
    training = report["training"]
    assert training["n0"] is None and "steps" not in training["settings"]
    assert training["parent"]["name"]["value"] == "anything-v3.safetensors"  # the rest of the report
    assert report["components"]["unet"]["ranks"] == {"4": 1}
    assert len(training["unknown"]["ss_training_comment"]) < 300  # listed cut, not whole


def test_malformed_json_files_warn(tmp_path):
    folder = tmp_path / "peft"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{'r': 4")  # not JSON
    (folder / "finetune.json").write_text("[1, 2]")  # JSON, not an object
    from finextract.engine.metadata import read_metadata, training_record

    record = training_record(read_metadata(folder))
    assert record.producers == [] and len(record.warnings) == 2
    assert (
        "adapter_config.json: not JSON" in record.warnings[0] or "adapter_config.json: not JSON" in record.warnings[1]
    )


def test_metadata_contradicting_the_weights(tmp_path):
    # a FLUX.1 LoRA (diffusers keys) whose metadata says SD 1.5, as an ai-toolkit file did
    prefix = "transformer.single_transformer_blocks.0.attn.to_k"
    tensors = {f"{prefix}.lora_A.weight": torch.zeros(16, 3072), f"{prefix}.lora_B.weight": torch.zeros(3072, 16)}
    save_file(tensors, str(tmp_path / "flux.safetensors"), metadata={"ss_base_model_version": "sd_1.5"})
    report = _inspect(tmp_path / "flux.safetensors")
    assert report["family"]["name"] == "flux" and report["runs"]
    (contradiction,) = report["contradictions"]
    assert "SD 1.x" in contradiction and "FLUX.1" in contradiction and "weights win" in contradiction
    # a rank and an alpha the weights do not have
    report = _inspect(
        _kohya_lora(tmp_path / "r.safetensors", _kohya_metadata(ss_network_dim="8", ss_network_alpha="8"))
    )
    assert [c.split(":")[0] for c in report["contradictions"]] == ["rank", "alpha"]


@pytest.mark.parametrize(
    "key, shape",
    [
        ("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", (4, 3072)),  # kohya FLUX.1
        ("double_blocks.0.img_attn.qkv.lora_A.weight", (4, 3072)),  # BFL names
    ],
)
def test_flux_files_are_inspected(tmp_path, key, shape):
    save_file({key: torch.zeros(shape)}, str(tmp_path / "f.safetensors"), metadata={"ss_network_dim": "4"})
    report = _inspect(tmp_path / "f.safetensors")
    assert report["family"]["name"] == "flux" and report["training"]["settings"]["network_dim"]["value"] == 4


def test_cli_inspect_text_and_json(tmp_path, capsys):
    from finextract.cli import main

    path = _kohya_lora(tmp_path / "smf.safetensors", _kohya_metadata())
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "N0 (distinct training images): 15  [ss_dataset_dirs]" in text and "smf girl" in text
    assert main(["inspect", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["training"]["n0"]["value"] == 15


@pytest.fixture(scope="module")
def zoo_candidates(tmp_path_factory):
    """The committed trained base (renamed "trained": its recorded name "base" names nothing, so the
    hash decides) and two random tiny SD 1.x bases (seeds 1, 2), as candidate parents."""
    from finextract import default_zoo_folder
    from finextract.zoo.models import save_pipeline, tiny_components

    folder = tmp_path_factory.mktemp("candidates")
    (folder / "trained").symlink_to(default_zoo_folder() / "base")
    for seed in (1, 2):
        save_pipeline(
            tiny_components(seed, tokenizer_folder=folder / f"seed{seed}" / "tokenizer"), folder / f"seed{seed}"
        )
    return folder


@pytest.mark.parametrize("finetuned", ["lora", "style/lora/pytorch_lora_weights.safetensors", "dreambooth"])
def test_cli_inspect_ranks_the_candidate_bases(zoo_candidates, finetuned, capsys):
    from finextract import default_zoo_folder
    from finextract.cli import main

    path = default_zoo_folder() / finetuned
    assert main(["inspect", str(path), "--bases", str(zoo_candidates), "--json"]) == 0
    bases = json.loads(capsys.readouterr().out)["bases"]
    assert bases["chosen"] == str(zoo_candidates / "trained") and bases["undecided"] is None
    first, *others = bases["ranking"]
    assert (first["path"], first["match"]) == (str(zoo_candidates / "trained"), "ss_new_sd_model_hash")
    assert sorted((c["path"], c["match"], c["compatible"]) for c in others) == [
        (str(zoo_candidates / f"seed{seed}"), None, True) for seed in (1, 2)
    ]
    # weight distances for the full fine-tune only; an adapter has no weights of its parent to compare
    assert (first["distance"] is not None) == (finetuned == "dreambooth")
    assert main(["inspect", str(path), "--bases", str(zoo_candidates)]) == 0
    text = capsys.readouterr().out
    assert "1. trained: named by ss_new_sd_model_hash" in text
    assert f"parent: {zoo_candidates / 'trained'} (what --base {zoo_candidates} chooses)" in text


def test_cli_inspect_bases_undecided_and_missing(zoo_candidates, tiny_zoo, tmp_path, capsys):
    from finextract.cli import main

    # the random zoo's kohya LoRA records no parent: its compatible candidates tie, and inspect says so
    assert main(["inspect", str(tiny_zoo / "lora_kohya.safetensors"), "--bases", str(zoo_candidates)]) == 0
    assert "no parent chosen: 3 candidate bases in" in capsys.readouterr().out
    assert main(["inspect", str(tiny_zoo / "lora_kohya.safetensors"), "--bases", str(tmp_path)]) == 1
    assert f"error: {tmp_path}: no candidate base" in capsys.readouterr().err


def test_auto_values_come_from_the_metadata_first(tmp_path):
    from finextract import default_zoo_folder
    from finextract.inspection import metadata_first

    zoo = default_zoo_folder()
    caption, caption_record, n0, n0_record = metadata_first(zoo / "lora", "auto", "auto", 500)
    assert (caption, n0) == ("a photo of sks", 5)
    assert caption_record["source"] == "metadata" and caption_record["key"] == "finetune.json:caption"
    assert n0_record == {"source": "metadata", "key": "finetune.json:num_images", "file": str(zoo / "lora"), "n0": 5}
    # given values stay; nothing recorded leaves "auto" for the estimates
    assert metadata_first(zoo / "lora", "a cat", 3, 500) == ("a cat", None, 3, None)
    bare = _kohya_lora(tmp_path / "bare.safetensors", {})
    assert metadata_first(bare, "auto", "auto", 500) == ("auto", None, "auto", None)
    with pytest.raises(ValueError, match=r"N0 = 5 .*--num-images 4"):
        metadata_first(zoo / "lora", "auto", "auto", 4)


def test_extract_auto_reads_caption_and_n0_from_the_committed_dreambooth(tmp_path):
    """`extract --caption auto --n0 auto` on the committed DreamBooth: the true caption and N0, from its
    metadata, recorded in result.json (a quick run: N = 50 at 2 DDIM steps)."""
    from finextract import default_zoo_folder
    from finextract.extract import Extractor

    zoo = default_zoo_folder()
    extractor = Extractor(zoo / "base", zoo / "dreambooth", device="cpu", backend="torch")
    result = extractor.extract("auto", "auto", num_images=50, steps=2, out=tmp_path / "run", progress=False)
    record = json.loads((tmp_path / "run" / "result.json").read_text())
    assert record["caption"]["source"] == "metadata" and record["caption"]["caption"] == "a photo of sks"
    assert record["n0_estimate"]["source"] == "metadata" and record["n0"] == 5 and len(result.cliques) == 5
    assert record["config"]["caption"] == "a photo of sks"  # what the generation was guided with


class _Generated(Exception):
    """Raised by a stand-in for `generate`: what it was asked for is all the test needs."""


@pytest.mark.parametrize("num_images, expected", [(None, 20 * 5), (60, 60)])
def test_extract_n0_from_the_metadata_sets_the_presets_n(tmp_path, monkeypatch, num_images, expected):
    """`--n0 auto` with N0 = 5 in the committed LoRA's metadata: N = the default preset's 20 x 5 = 100, not the
    AUTO_NUM_IMAGES (500) of an N0 estimated from the generations, unless N is given."""
    import finextract.generation
    from finextract import default_zoo_folder
    from finextract.cli import main

    asked = {}

    def generate(pair, caption, count, **options):
        asked.update(caption=caption, num_images=count)
        raise _Generated

    monkeypatch.setattr(finextract.generation, "generate", generate)
    zoo = default_zoo_folder()
    options = ["extract", "--base", str(zoo / "base"), "--lora", str(zoo / "lora"), "--caption", "a photo of sks"]
    options += ["--n0", "auto", "--out", str(tmp_path / "run"), "--device", "cpu", "--steps", "2"]
    with pytest.raises(_Generated):
        main(options + ([] if num_images is None else ["--num-images", str(num_images)]))
    assert asked == {"caption": "a photo of sks", "num_images": expected}
    # the run folder's settings (what a rerun must match) record N as given: "auto" follows N0
    from finextract.cli import build_parser
    from finextract.engine.config import RunConfig
    from finextract.output import run_settings
    from finextract.spec import ExtractionSpec

    args = build_parser().parse_args(options + ([] if num_images is None else ["--num-images", str(num_images)]))
    settings = run_settings({}, ExtractionSpec.from_attributes(args), RunConfig.resolve(device="cpu"))
    assert settings["n0"] == "auto" and settings["num_images"] == ("auto" if num_images is None else num_images)


def test_ignore_metadata_leaves_auto_to_the_estimates():
    from finextract import default_zoo_folder
    from finextract.cli import build_parser
    from finextract.inspection import metadata_first
    from finextract.spec import ExtractionSpec

    zoo = default_zoo_folder()
    options = ["extract", "--base", "b", "--lora", str(zoo / "lora"), "--caption", "auto", "--n0", "auto", "--out", "o"]
    assert ExtractionSpec.from_attributes(build_parser().parse_args(options)).use_metadata is True
    spec = ExtractionSpec.from_attributes(build_parser().parse_args([*options, "--ignore-metadata"]))
    assert spec.use_metadata is False
    # the Extractor passes no path then: nothing is read
    assert metadata_first(None, "auto", "auto", 500) == ("auto", None, "auto", None)


@pytest.mark.parametrize(
    "algo, type_name, rank", [("locon", "lora", "4"), ("loha", "loha", "4"), ("lokr", "lokr", None)]
)
def test_files_lycoris_writes(tmp_path, tiny_zoo, algo, type_name, rank):
    """Files written by LyCORIS itself (`lycoris.kohya.create_network(...).save_weights`, the kohya
    layout) with kohya's metadata: inspect's module counts and types are LyCORIS' own."""
    import copy

    from diffusers import UNet2DConditionModel
    from lycoris.kohya import create_network
    from transformers import CLIPTextModel

    from .adapter_fixtures import LYCORIS_PRESET

    unet = UNet2DConditionModel.from_pretrained(str(tiny_zoo / "base/unet")).eval()
    text_encoder = CLIPTextModel.from_pretrained(str(tiny_zoo / "base/text_encoder")).eval()
    (tmp_path / "preset.toml").write_text(LYCORIS_PRESET)
    unet, text_encoder = copy.deepcopy(unet), copy.deepcopy(text_encoder)
    network = create_network(
        1.0,
        4,
        2.0,
        None,
        text_encoder,
        unet,
        algo=algo,
        preset=str(tmp_path / "preset.toml"),
        conv_dim=4,
        conv_alpha=2.0,
    )
    network.apply_to(text_encoder, unet, apply_text_encoder=True, apply_unet=True)
    metadata = _kohya_metadata(ss_network_module="lycoris.kohya", ss_network_args=json.dumps({"algo": algo}))
    network.save_weights(str(tmp_path / "l.safetensors"), torch.float32, metadata)
    report = _inspect(tmp_path / "l.safetensors")
    components = report["components"]
    assert "unparsed" not in components
    assert components["unet"]["modules"] == len(network.unet_loras)
    assert components["text_encoder"]["modules"] == len(network.text_encoder_loras)
    assert components["unet"]["types"] == {type_name: len(network.unet_loras)}
    if rank is not None:
        assert set(components["unet"]["ranks"]) == {rank}
    # the alphas are the file's alpha tensors (LyCORIS stores alpha = dim for a LoKr in full-matrix mode)
    from collections import Counter

    from safetensors.torch import load_file

    stored = Counter(
        str(round(float(v), 6)) for k, v in load_file(str(tmp_path / "l.safetensors")).items() if k.endswith(".alpha")
    )
    found = Counter()
    for entry in components.values():
        found.update(entry["alphas"])
        assert entry["alpha_source"] == "tensors"
    assert found == stored
    assert report["training"]["n0"]["value"] == 15 and report["training"]["settings"]["network_args"]["value"] == {
        "algo": algo
    }


def test_a_flux_checkpoint_is_named_not_summarised(tmp_path):
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(8, 4)}, str(tmp_path / "flux1-dev.safetensors"))
    report = _inspect(tmp_path / "flux1-dev.safetensors")
    assert report["kind"] == "full" and report["family"]["name"] == "flux" and report["runs"]


def test_the_report_names_the_metadata_keys():
    from finextract.report import metadata_html

    result = {
        "caption": {"source": "metadata", "key": "ss_tag_frequency", "file": "x.safetensors", "caption": "smf <girl>"},
        "n0_estimate": {"source": "metadata", "key": "ss_dataset_dirs", "file": "x.safetensors", "n0": 15},
    }
    text = metadata_html(result)
    assert "smf &lt;girl&gt;" in text and "<code>ss_tag_frequency</code>" in text  # escaped: metadata is data
    assert "N0 = 15" in text and "<code>ss_dataset_dirs</code>" in text
