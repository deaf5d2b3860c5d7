"""finextract.evidence: file hashes and their cache, model-folder records, the environment and command records."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

from finextract import evidence
from finextract.engine.formats import HASH_READ_BYTES
from finextract.evidence import HashCache, command_line, command_record, environment_record, input_record
from finextract.records import locked_versions


def test_file_sha256_crosses_block_boundaries(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 2 * HASH_READ_BYTES + 3, dtype=np.uint8).tobytes()
    path = tmp_path / "weights.safetensors"
    path.write_bytes(data)
    assert evidence.file_sha256(path) == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty.bin").write_bytes(b"")
    assert evidence.file_sha256(tmp_path / "empty.bin") == hashlib.sha256(b"").hexdigest()
    with pytest.raises(FileNotFoundError):
        evidence.file_sha256(tmp_path / "missing.bin")


def test_hash_cache_hashes_once_per_path_size_mtime(tmp_path, monkeypatch):
    calls = []
    real = evidence.file_sha256
    monkeypatch.setattr(evidence, "file_sha256", lambda path: calls.append(path) or real(path))
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"abc")
    link = tmp_path / "link.safetensors"
    link.symlink_to(path)
    cache_dir = tmp_path / "cache"
    first = HashCache(cache_dir)
    assert first.sha256(path) == (hashlib.sha256(b"abc").hexdigest(), 3)
    first.save()
    assert json.loads((cache_dir / evidence.CACHE_FILE).read_text())["format"] == evidence.CACHE_FORMAT
    second = HashCache(cache_dir)  # a new run reads the file: no rehash, through a symlink too
    assert second.sha256(path)[0] == second.sha256(link)[0] == hashlib.sha256(b"abc").hexdigest()
    assert len(calls) == 1
    path.write_bytes(b"abcd")  # another size: hashed again
    assert second.sha256(path) == (hashlib.sha256(b"abcd").hexdigest(), 4)
    os.utime(path, ns=(1, 1))  # same size, another mtime: hashed again
    path.write_bytes(b"abce")
    os.utime(path, ns=(2, 2))
    assert second.sha256(path)[0] == hashlib.sha256(b"abce").hexdigest()
    assert len(calls) == 3
    (cache_dir / evidence.CACHE_FILE).write_text("{not json")  # corrupt: counts as empty, then rewritten
    third = HashCache(cache_dir)
    assert third.sha256(path)[0] == hashlib.sha256(b"abce").hexdigest() and len(calls) == 4
    third.save()
    assert len(json.loads((cache_dir / evidence.CACHE_FILE).read_text())["files"]) == 1
    assert not list(cache_dir.glob("*.tmp"))
    uncached = HashCache(None)
    uncached.sha256(path), uncached.sha256(path), uncached.save()
    assert len(calls) == 6


def test_input_record_of_folder_and_file(tmp_path):
    folder = tmp_path / "pipe"
    (folder / "unet").mkdir(parents=True)
    (folder / ".cache").mkdir()
    (folder / "model_index.json").write_text("{}")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"w" * 10)
    (folder / "unet" / "notes.md").write_text("not a model file")
    (folder / ".cache" / "x.json").write_text("{}")
    record = input_record("base", folder)
    assert record["kind"] == "folder" and record["path"] == str(folder.absolute())
    assert [f["name"] for f in record["files"]] == ["model_index.json", "unet/diffusion_pytorch_model.safetensors"]
    assert record["files"][1] == {
        "name": "unet/diffusion_pytorch_model.safetensors",
        "size": 10,
        "sha256": hashlib.sha256(b"w" * 10).hexdigest(),
    }
    single = input_record("lora", folder / "unet" / "diffusion_pytorch_model.safetensors")
    assert single["kind"] == "file" and single["files"][0]["name"] == "diffusion_pytorch_model.safetensors"
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        input_record("base", tmp_path / "nowhere")


def test_read_lock_and_environment_against_a_lock(tmp_path):
    lock = tmp_path / "requirements.lock"
    lock.write_text(
        "# pip-compile output\n--index-url https://example.invalid/simple\n"
        "Numpy==0.0.1 \\\n    --hash=sha256:00\n"
        "torch==2.13.0+cpu ; sys_platform == 'linux'\n"
        "uvicorn[standard]==0.1  # via x\n"
        "not-installed-anywhere==1.0\n-e .\n"
    )
    assert locked_versions(lock) == {
        "numpy": "0.0.1",
        "torch": "2.13.0+cpu",
        "uvicorn": "0.1",
        "not-installed-anywhere": "1.0",
    }
    record = environment_record([lock])
    assert record["lock"]["files"] == [{"path": str(lock), "sha256": hashlib.sha256(lock.read_bytes()).hexdigest()}]
    differs = record["lock"]["differs"]
    assert differs["numpy"] == {"locked": "0.0.1", "installed": np.__version__}
    assert differs["not-installed-anywhere"] == {"locked": "1.0", "installed": None}
    assert differs["pytest"] == {"locked": None, "installed": pytest.__version__}  # installed, not locked
    assert "distributions" not in record and record["machine"]["arch"]
    full = environment_record([tmp_path / "no.lock"])
    assert full["distributions"]["numpy"] == np.__version__ and "lock" not in full


def test_command_record_and_jsonable():
    call = {"function": "f", "arguments": evidence.jsonable({"train": [np.zeros((2, 3), np.uint8)], "n0": 2})}
    assert call["arguments"] == {"train": ["<ndarray uint8 (2, 3)>"], "n0": 2}
    assert command_record(call)["source"] == "process" and command_record()["argv"]
    with command_line(["finextract", "extract", "--n0", "2"]):
        record = command_record(call)
    assert record == {"argv": ["finextract", "extract", "--n0", "2"], "source": "cli", "call": call}
    assert evidence.jsonable(list(range(70)))[-1] == "... 6 more"
