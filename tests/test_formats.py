"""Sniffing and safe reading of checkpoint files (engine/formats.py)."""

from __future__ import annotations

import os
import pickle
import sys

import pytest
import torch
from safetensors.torch import save_file

from finextract.engine.formats import (
    CheckpointFormatError,
    PickleRefusedError,
    TrainingState,
    atomic_write,
    file_sha256,
    load_state_dict,
    read_pickle,
    read_safetensors_header,
    sniff,
    state_dict_keys,
)

from .pickles import MODEL_CHECKPOINT, save_lightning_checkpoint

LFS_POINTER = (
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:4c7f2a1d0e9b8c7a6f5e4d3c2b1a09f8e7d6c5b4a39281706f5e4d3c2b1a0987\nsize 3438167536\n"
)
HTML_PAGE = "<!DOCTYPE html>\n<html><head><title>Sign in - Hugging Face</title></head><body>login</body></html>\n"


@pytest.fixture
def tensors():
    generator = torch.Generator().manual_seed(0)
    return {
        "conv_in.weight": torch.randn(8, 4, 3, 3, generator=generator),
        "conv_in.bias": torch.randn(8, generator=generator),
    }


@pytest.fixture
def good(tmp_path, tensors):
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    return path


def test_sniff_says_what_each_file_is(tmp_path, good, tensors):
    files = {
        "html.safetensors": HTML_PAGE,
        "lfs.safetensors": LFS_POINTER,
        "error.safetensors": '{"error": "gated repo"}',
        "empty.safetensors": "",
        "note.safetensors": "Entry not found\n",
        "accents.safetensors": "x" + "é" * 300,
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    torch.save(tensors, tmp_path / "model.ckpt")
    assert sniff(good) == "safetensors"
    assert sniff(tmp_path / "model.ckpt") == "pickle-zip"
    assert sniff(tmp_path / "html.safetensors") == "html"
    assert sniff(tmp_path / "lfs.safetensors") == "git-lfs"
    assert sniff(tmp_path / "error.safetensors") == "json"
    assert sniff(tmp_path / "empty.safetensors") == "empty"
    assert sniff(tmp_path / "note.safetensors") == "text"
    assert sniff(tmp_path / "accents.safetensors") == "text"  # 2-byte characters cut at the 512-byte read
    (tmp_path / "binary.bin").write_bytes(bytes(range(256)))
    assert sniff(tmp_path / "binary.bin") == "unknown"
    with pytest.raises(FileNotFoundError, match="no such file"):
        sniff(tmp_path / "missing.safetensors")


def test_safetensors_round_trip_and_header(good, tensors):
    loaded = load_state_dict(good)
    assert set(loaded) == set(tensors)
    for key, value in tensors.items():
        assert torch.equal(loaded[key], value)
    header, _ = read_safetensors_header(good)
    assert header["conv_in.weight"]["shape"] == [8, 4, 3, 3]
    assert state_dict_keys(good) == {"conv_in.weight": (8, 4, 3, 3), "conv_in.bias": (8,)}


def test_html_page_is_named(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_text(HTML_PAGE)
    with pytest.raises(CheckpointFormatError, match=r"is an HTML page .*not weights"):
        load_state_dict(path)


def test_git_lfs_pointer_is_named_with_the_real_size(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_text(LFS_POINTER)
    with pytest.raises(CheckpointFormatError, match=r"git-lfs pointer .*3438167536 bytes.*git lfs pull"):
        load_state_dict(path)


def test_truncated_safetensors_is_named(tmp_path, good):
    data = good.read_bytes()
    for cut in (len(data) - 100, 20):  # tensor data missing; header itself cut
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointFormatError, match="is truncated"):
            load_state_dict(path)


def test_corrupt_header_is_named(tmp_path, good):
    data = bytearray(good.read_bytes())
    data[9:20] = b"\xff" * 11  # inside the JSON header
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointFormatError, match="corrupt safetensors header"):
        load_state_dict(path)


def test_pickle_refused_unless_allowed(tmp_path, tensors):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": tensors, "global_step": 10}, path)
    with pytest.raises(PickleRefusedError, match="allow_pickle=True"):
        load_state_dict(path)
    loaded = load_state_dict(path, allow_pickle=True)  # nested "state_dict" unwrapped
    assert set(loaded) == set(tensors) and torch.equal(loaded["conv_in.weight"], tensors["conv_in.weight"])


class _Payload:  # an object weights_only unpickling must refuse
    pass


def test_allowed_pickle_still_refuses_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": _Payload()}, path)
    with pytest.raises(CheckpointFormatError, match=r"names tests\.test_formats\._Payload, which is neither weights"):
        load_state_dict(path, allow_pickle=True)


class _System:  # pickles as a call of os.system: loading it unrestricted would run the shell command
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize("zipped", [True, False])
def test_malicious_pickle_refused_by_name_without_running(tmp_path, tensors, zipped):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": tensors, "x": _System(f"touch {marker}")}, path, _use_new_zipfile_serialization=zipped)
    with pytest.raises(
        CheckpointFormatError, match=rf"names {os.system.__module__}\.system, .*nothing was run"
    ) as error:
        load_state_dict(path, allow_pickle=True)
    assert "\x1b[" not in str(error.value) and not marker.exists()


@pytest.mark.parametrize("zipped", [True, False])
def test_lightning_checkpoint_loads_with_inert_stand_ins(tmp_path, tensors, zipped):
    path = tmp_path / "sd-v1-4.ckpt"
    save_lightning_checkpoint(path, tensors, zipped=zipped)
    assert "pytorch_lightning" not in sys.modules
    with pytest.raises(pickle.UnpicklingError, match="ModelCheckpoint"):  # torch's own default refuses it
        torch.load(path, weights_only=True)
    with pytest.raises(PickleRefusedError, match=r"is a pickle checkpoint, which can run code when loaded: refused"):
        load_state_dict(path)  # unchanged without allow_pickle
    loaded = load_state_dict(path, allow_pickle=True)
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[k], tensors[k]) for k in tensors)  # bit-exact
    raw = read_pickle(path, allow_pickle=True)
    (key,) = raw["callbacks"]
    callback = raw["loops"]["callback"]
    assert key.path == MODEL_CHECKPOINT and issubclass(key, TrainingState)
    assert isinstance(callback, TrainingState) and callback.state["dirpath"] == "/fsx/sd/ckpts"
    assert raw["callbacks"][key]["step"] == 470000 and "pytorch_lightning" not in sys.modules


def test_pickle_saved_as_safetensors_is_named(tmp_path, tensors):
    path = tmp_path / "model.safetensors"
    torch.save(tensors, path)
    with pytest.raises(
        CheckpointFormatError, match=r"is a misnamed pickle: a PyTorch pickle .* under a \.safetensors name"
    ):
        read_safetensors_header(path)
    with pytest.raises(PickleRefusedError, match="is a misnamed pickle"):
        load_state_dict(path)
    assert set(load_state_dict(path, allow_pickle=True)) == set(tensors)  # the user may still allow it


def test_file_sha256_and_atomic_write(tmp_path):
    import hashlib

    path = atomic_write(tmp_path / "a.json", '{"x": 1}')
    assert path.read_text() == '{"x": 1}'
    atomic_write(path, b"new bytes")
    assert path.read_bytes() == b"new bytes"
    assert file_sha256(path) == hashlib.sha256(b"new bytes").hexdigest()
    with pytest.raises(TypeError):
        atomic_write(path, 123)  # not bytes-like: the write fails ...
    assert path.read_bytes() == b"new bytes"  # ... the old file stays whole ...
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]  # ... and no temporary file is left


def test_torch_dtype_names():
    from finextract.engine.config import torch_dtype

    assert [torch_dtype(n) for n in ("fp32", "fp16", "bf16", "bfloat16")] == [
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.bfloat16,
    ]
    assert torch_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="expected one of fp32, fp16, bf16"):
        torch_dtype("int8")
