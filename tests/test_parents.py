"""Ranking candidate bases for a fine-tune (engine/loading/parents.py) on the tiny zoo."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from finextract.engine.formats import file_sha256
from finextract.engine.loading.parents import (
    candidate_bases,
    is_bases_folder,
    rank_bases,
    trainer_hashes,
)
from finextract.engine.metadata import kohya_model_hashes


@pytest.fixture(scope="module")
def bases(tiny_zoo, tmp_path_factory):
    """The zoo's base (the parent of its DreamBooth and LoRA), two random SD 1.x bases (seeds 1, 2), an
    SD 2.x base, and the parent's UNet again as a single file."""
    from finextract.zoo.build import build_family_zoo
    from finextract.zoo.models import save_pipeline, tiny_components

    folder = tmp_path_factory.mktemp("bases")
    shutil.copytree(tiny_zoo / "base", folder / "parent")
    for seed in (1, 2):
        components = tiny_components(seed, tokenizer_folder=folder / f"seed{seed}" / "tokenizer")
        save_pipeline(components, folder / f"seed{seed}")
    shutil.copytree(build_family_zoo(tmp_path_factory.mktemp("sd2"), "sd2") / "base", folder / "sd2")
    shutil.copy(tiny_zoo / "base" / "unet" / "diffusion_pytorch_model.safetensors", folder / "parent-unet.safetensors")
    return folder


def legacy_model_hash(path) -> str:
    return kohya_model_hashes(path)["ss_sd_model_hash"]


def test_legacy_model_hash_is_kohyas_definition(tmp_path):
    data = torch.randint(0, 256, (0x100000 + 0x10000 + 100,), generator=torch.Generator().manual_seed(0))
    big = tmp_path / "big.ckpt"
    big.write_bytes(bytes(data.to(torch.uint8).tolist()))
    # sd-scripts' model_hash: sha256 of the 64 KiB read at offset 1 MiB, its first 8 hex digits
    assert legacy_model_hash(big) == hashlib.sha256(big.read_bytes()[0x100000:0x110000]).hexdigest()[:8]
    small = tmp_path / "small.safetensors"
    small.write_bytes(b"x" * 1000)
    assert legacy_model_hash(small) == hashlib.sha256(b"").hexdigest()[:8] == "e3b0c442"  # the read past the end
    assert trainer_hashes(big) == {"ss_sd_model_hash": legacy_model_hash(big), "ss_new_sd_model_hash": file_sha256(big)}
    assert trainer_hashes(tmp_path) == {}  # a folder: kohya records "IsADirectory"


def test_bases_folder_detected(bases, tiny_zoo):
    names = [path.name for path in candidate_bases(bases)]
    assert names == ["parent", "parent-unet.safetensors", "sd2", "seed1", "seed2"]
    assert is_bases_folder(bases) and not is_bases_folder(tiny_zoo / "base") and not is_bases_folder(tiny_zoo / "lora")


@pytest.mark.parametrize("finetuned", ["dreambooth", "dreambooth_unet_only", "dreambooth_unet.safetensors"])
def test_full_finetune_ranked_by_weight_distance(bases, tiny_zoo, finetuned):
    ranked = rank_bases(tiny_zoo / finetuned, bases)
    order = [candidate.path.name for candidate in ranked]
    assert order[:2] in (["parent", "parent-unet.safetensors"], ["parent-unet.safetensors", "parent"])
    # a folder tells its family (SD 1.x); a UNet state dict at the tiny zoo's width tells none: shapes refuse it
    told = "the fine-tune is SD 1.x; the base is SD 2.x" if "." not in finetuned else "UNet tensor shape(s) differ"
    assert order[-1] == "sd2" and not ranked[-1].compatible and told in ranked[-1].notes[0]
    assert ranked[0].distance == pytest.approx(ranked[1].distance, rel=1e-12)  # the same UNet weights
    # the distance against one computed on whole flattened state dicts; both accumulate in float64
    ft = load_file(str(tiny_zoo / "dreambooth_unet.safetensors"))
    base = load_file(str(tiny_zoo / "base" / "unet" / "diffusion_pytorch_model.safetensors"))
    flat = {
        name: torch.cat([d[k].double().flatten() for k in sorted(base)]) for name, d in (("ft", ft), ("base", base))
    }
    expected = float((flat["ft"] - flat["base"]).norm() / flat["base"].norm())
    assert ranked[0].distance == pytest.approx(expected, rel=1e-9)
    others = {candidate.path.name: candidate.distance for candidate in ranked[2:4]}
    assert set(others) == {"seed1", "seed2"} and min(others.values()) > 10 * ranked[0].distance


def test_adapter_ranked_by_metadata_then_family(bases, tiny_zoo, tmp_path):
    lora = tiny_zoo / "lora_kohya.safetensors"
    ranked = rank_bases(lora, bases)
    assert [c.compatible for c in ranked] == [True] * 4 + [False] and ranked[-1].path.name == "sd2"
    assert "SD 2.x" in ranked[-1].notes[0] and all(c.match is None and c.distance is None for c in ranked)
    tensors = load_file(str(lora))
    parent_file = bases / "parent-unet.safetensors"
    # the parent's UNet file hashes the same alone and as the `unet/` weights file of the parent folder
    hashed = ["parent", parent_file.name]
    cases = [  # metadata, the candidates it names (best first) with the key that named each
        ({"ss_sd_model_name": "D:\\models\\seed2.safetensors"}, [("seed2", "ss_sd_model_name")]),
        ({"ss_sd_model_name": "seed1"}, [("seed1", "ss_sd_model_name")]),
        (  # a hash outranks a name
            {"ss_sd_model_hash": legacy_model_hash(parent_file), "ss_sd_model_name": "seed1"},
            [(name, "ss_sd_model_hash") for name in hashed] + [("seed1", "ss_sd_model_name")],
        ),
        (
            {"ss_new_sd_model_hash": file_sha256(parent_file)[:10].upper()},
            [(name, "ss_new_sd_model_hash") for name in hashed],
        ),
    ]
    for metadata, named in cases:
        save_file(tensors, str(tmp_path / "lora.safetensors"), metadata=metadata)
        ranked = rank_bases(tmp_path / "lora.safetensors", bases)
        assert [(c.path.name, c.match) for c in ranked if c.match] == named, metadata


def test_base_folder_picks_the_parent(bases, tiny_zoo, tmp_path):
    from finextract.engine.loading import load_model_pair

    folder = tmp_path / "candidates"
    folder.mkdir()
    for name in ("parent", "seed1", "sd2"):
        (folder / name).symlink_to(bases / name)
    pair = load_model_pair(folder, tiny_zoo / "dreambooth")
    assert pair.sources["base"] == str(folder / "parent")
    assert [c["path"] for c in pair.sources["base_candidates"]] == [str(folder / n) for n in ("parent", "seed1", "sd2")]
    with pytest.raises(
        ValueError, match=r"2 candidate bases in .* fit .*lora_kohya.safetensors equally \(parent, seed1\)"
    ):
        load_model_pair(folder, lora=tiny_zoo / "lora_kohya.safetensors")
    save_file(
        load_file(str(tiny_zoo / "lora_kohya.safetensors")),
        str(tmp_path / "lora.safetensors"),
        {"ss_sd_model_name": "parent"},
    )
    pair = load_model_pair(folder, lora=tmp_path / "lora.safetensors")
    assert (
        pair.sources["base"] == str(folder / "parent")
        and pair.sources["base_candidates"][0]["match"] == "ss_sd_model_name"
    )


@pytest.mark.parametrize(
    "finetuned",
    ["lora/pytorch_lora_weights.safetensors", "style/lora", "dreambooth", "style/dreambooth", "dreambooth/unet"],
)
def test_committed_finetunes_rank_their_trained_base_first(bases, tmp_path, finetuned):
    """The committed zoo's fine-tunes record the hashes of their parent's UNet file (`finetune`'s
    metadata): among the trained base and random tiny bases of the same family, the trained base is
    named by its hash (its folder renamed, so `ss_sd_model_name` "base" names nothing) and chosen."""
    from finextract.engine.loading.parents import choose_base
    from finextract.zoo.trained import default_zoo_folder

    zoo = default_zoo_folder()
    folder = tmp_path / "candidates"
    folder.mkdir()
    (folder / "trained").symlink_to(zoo / "base")
    for name in ("seed1", "seed2"):
        (folder / name).symlink_to(bases / name)
    chosen, ranked = choose_base(zoo / finetuned, folder)
    assert chosen == folder / "trained"
    assert (ranked[0].path.name, ranked[0].match) == ("trained", "ss_new_sd_model_hash")
    assert {(c.path.name, c.match) for c in ranked[1:]} == {("seed1", None), ("seed2", None)}
    assert all(c.compatible for c in ranked)
    if "dreambooth" in finetuned:  # a full fine-tune: also nearest its parent's weights
        assert ranked[0].distance < min(c.distance for c in ranked[1:])


def test_extract_records_and_reports_the_base_choice(bases, tiny_zoo, tmp_path):
    """An extraction with a folder of candidates as its base: result.json's "base_choice" names the
    chosen base, why, and the ranking; the report shows them (a quick run: N = 4 at 2 DDIM steps)."""
    import json

    from finextract.extract import Extractor

    folder = tmp_path / "candidates"
    folder.mkdir()
    for name in ("parent", "seed1", "sd2"):
        (folder / name).symlink_to(bases / name)
    extractor = Extractor(folder, tiny_zoo / "dreambooth", device="cpu", backend="torch")
    extractor.extract("a photo of sks", 2, num_images=4, steps=2, out=tmp_path / "run", progress=False)
    choice = json.loads((tmp_path / "run" / "result.json").read_text())["base_choice"]
    assert (choice["folder"], choice["chosen"]) == (str(folder), str(folder / "parent"))
    assert choice["why"].startswith("nearest UNet weights, relative L2 distance")  # the random zoo records no parent
    assert [Path(c["path"]).name for c in choice["ranking"]] == ["parent", "seed1", "sd2"]
    assert [c["compatible"] for c in choice["ranking"]] == [True, True, False]
    report = (tmp_path / "run" / "report.html").read_text()
    assert "<h2>Base chosen among the candidates</h2>" in report and f"<code>{folder / 'parent'}</code>" in report


@pytest.fixture(scope="module")
def flow_bases(tmp_path_factory):
    """The tiny FLUX.1 zoo (its DreamBooth's transformer perturbed from the base, seed 0) and candidates:
    its base as a pipeline folder and as BFL's single file, a random FLUX.1 base (seed 1), an SD3 base."""
    from finextract.zoo.build import build_flow_family_zoo
    from finextract.zoo.models import save_pipeline, tiny_components

    zoo = build_flow_family_zoo(tmp_path_factory.mktemp("flux"), "flux", seed=0)
    folder = tmp_path_factory.mktemp("flow_bases")
    (folder / "parent").symlink_to(zoo / "base")
    (folder / "parent.safetensors").symlink_to(zoo / "base.safetensors")
    save_pipeline(tiny_components(1, tokenizer_folder=folder / "seed1" / "tokenizer", family="flux"), folder / "seed1")
    (folder / "sd3").symlink_to(build_flow_family_zoo(tmp_path_factory.mktemp("sd3"), "sd3", seed=0) / "base")
    return zoo, folder


@pytest.mark.parametrize("finetuned", ["dreambooth", "dreambooth.safetensors"])
def test_flux_dreambooth_ranked_by_transformer_distance(flow_bases, finetuned):
    """A FLUX.1 DreamBooth (a diffusers folder, or BFL's single file) ranks its parent first by the
    transformer's weight distance, whichever layout each side is in (a single file facing a folder is
    converted by the pair's loader); the SD3 base is incompatible by family."""
    zoo, folder = flow_bases
    ranked = rank_bases(zoo / finetuned, folder)
    order = [c.path.name for c in ranked]
    assert sorted(order[:2]) == ["parent", "parent.safetensors"] and order[2:] == ["seed1", "sd3"]
    assert ranked[0].reason().startswith("nearest transformer weights")
    # the same weights in both layouts: diffusers' converter copies tensors (splits and concatenations only),
    # so only the float64 summation order differs (relative rounding ~1e-16 per addition)
    assert ranked[0].distance == pytest.approx(ranked[1].distance, rel=1e-12)
    assert ranked[2].distance > 10 * ranked[0].distance  # the random base is far from the fine-tune's
    assert (ranked[-1].compatible, ranked[-1].notes) == (False, ["the fine-tune is FLUX.1; the base is SD3"])
    assert all(c.compatible for c in ranked[:-1]) and ranked[-1].distance is None
    # the distance against one over whole flattened state dicts (of the diffusers folders); both accumulate
    # in float64
    ft, base = (
        load_file(str(zoo / name / "transformer" / "diffusion_pytorch_model.safetensors"))
        for name in ("dreambooth", "base")
    )
    flat = [torch.cat([d[k].double().flatten() for k in sorted(base)]) for d in (ft, base)]
    assert ranked[0].distance == pytest.approx(float((flat[0] - flat[1]).norm() / flat[1].norm()), rel=1e-9)


def test_flux_lora_without_metadata_is_a_tie(flow_bases):
    """A FLUX.1 LoRA without trainer metadata fits both FLUX.1 bases equally: refused, naming them; the SD3
    base is incompatible by the adapter's module names."""
    from finextract.engine.loading.parents import choose_base

    zoo, folder = flow_bases
    lora = zoo / "lora_kohya.safetensors"
    ranked = rank_bases(lora, folder)
    assert [(c.path.name, c.compatible) for c in ranked] == [
        ("parent", True),
        ("parent.safetensors", True),
        ("seed1", True),
        ("sd3", False),
    ]
    assert "is for FLUX.1" in ranked[-1].notes[0] and "the base is SD3" in ranked[-1].notes[0]
    with pytest.raises(ValueError, match=r"3 candidate bases in .* equally \(parent, parent.safetensors, seed1\)"):
        choose_base(lora, folder)


def test_sd3_single_file_measured_against_a_folder(flow_bases):
    """Stability AI's SD3 single file (its MMDiT under `model.diffusion_model.`, beside the VAE and text
    encoders) against the base as a folder and as a single file: converted by the pair's loader, the same
    distance either way (up to the float64 summation order)."""
    _, folder = flow_bases
    sd3 = (folder / "sd3").resolve().parent  # the SD3 zoo
    ranked = rank_bases(sd3 / "dreambooth.safetensors", [sd3 / "base", sd3 / "base.safetensors", folder / "parent"])
    assert sorted(c.path.name for c in ranked[:2]) == ["base", "base.safetensors"] and all(
        c.compatible for c in ranked[:2]
    )
    assert (ranked[2].path.name, ranked[2].notes) == ("parent", ["the fine-tune is SD3; the base is FLUX.1"])
    assert ranked[0].distance == pytest.approx(ranked[1].distance, rel=1e-12) and ranked[0].notes == []
    assert ranked[0].distance == pytest.approx(
        rank_bases(sd3 / "dreambooth", [sd3 / "base"])[0].distance, rel=1e-12
    )  # the folder pair
