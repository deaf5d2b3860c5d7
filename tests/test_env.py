"""`finextract env`: the versions, backends and cache a bug report needs; never fatal."""

from __future__ import annotations

import json
import os
import sys

from finextract.cli import main


def _env(capsys, *options) -> str:
    capsys.readouterr()
    assert main(["env", *options]) == 0
    return capsys.readouterr().out


def test_env_json_reports_the_libraries_backends_and_cache(tmp_path, monkeypatch, capsys):
    import diffusers
    import numpy
    import onnxruntime
    import openvino
    import torch
    import transformers

    from finextract import __version__
    from finextract.engine.config import default_threads

    cache = tmp_path / "cache"
    (cache / "onnx" / "abc").mkdir(parents=True)
    (cache / "onnx" / "abc" / "model.onnx").write_bytes(b"x" * 1000)
    (cache / "engines.json").write_bytes(b"y" * 234)
    os.symlink(tmp_path / "elsewhere", cache / "link")  # a link is not the cache's own bytes
    monkeypatch.setenv("FINEXTRACT_CACHE", str(cache))
    env = json.loads(_env(capsys, "--json"))
    assert set(env) == {"finextract", "python", "libraries", "backends", "system", "cache"}
    assert env["finextract"] == __version__ and env["python"]["executable"] == sys.executable
    libraries = env["libraries"]
    assert list(libraries)[:4] == ["torch", "diffusers", "transformers", "kernels"]
    for module in (torch, diffusers, transformers, numpy, onnxruntime, openvino):
        assert libraries[module.__name__] == module.__version__
    assert env["backends"]["onnxruntime"] == {"providers": onnxruntime.get_available_providers()}
    assert env["backends"]["openvino"] == {"devices": list(openvino.Core().available_devices)}
    assert env["backends"]["cuda"]["available"] == torch.cuda.is_available()
    assert env["system"]["threads"] == default_threads() and env["system"]["cpu_cores"] == os.cpu_count()
    assert env["cache"] == {
        "folder": str(cache),
        "from": "$FINEXTRACT_CACHE",
        "exists": True,
        "bytes": 1234,
        "files": 2,
    }
    text = _env(capsys)
    assert f"torch        {torch.__version__}" in text and f"cache        {cache} ($FINEXTRACT_CACHE)" in text
    assert "1.2 KiB in 2 files" in text
    monkeypatch.setenv("FINEXTRACT_CACHE", str(tmp_path / "none"))
    assert json.loads(_env(capsys, "--json"))["cache"]["exists"] is False and "not created yet" in _env(capsys)


def test_env_reports_missing_and_broken_libraries_without_failing(tmp_path, monkeypatch, capsys):
    import openvino

    broken = tmp_path / "site"
    (broken / "tensorrt").mkdir(parents=True)
    (broken / "tensorrt" / "__init__.py").write_text(
        'raise OSError("libnvinfer.so.10: cannot open shared object file")\n'
    )
    monkeypatch.syspath_prepend(str(broken))
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    monkeypatch.setitem(sys.modules, "numba", None)  # None in sys.modules: imports as absent
    monkeypatch.setitem(sys.modules, "onnxruntime", None)

    def no_devices():
        raise RuntimeError("device plugin failed to load")

    monkeypatch.setattr(openvino, "Core", no_devices)
    env = json.loads(_env(capsys, "--json"))
    assert env["libraries"]["numba"] == "not installed" and env["libraries"]["onnxruntime"] == "not installed"
    assert env["libraries"]["tensorrt"] == "error: OSError: libnvinfer.so.10: cannot open shared object file"
    assert env["backends"]["onnxruntime"] == {"available": False, "why": "not installed"}
    assert env["backends"]["tensorrt"] == {"importable": False, "why": env["libraries"]["tensorrt"]}
    assert env["backends"]["openvino"] == {"error": "error: RuntimeError: device plugin failed to load"}
    assert env["libraries"]["openvino"] == openvino.__version__  # the version still reads
    text = _env(capsys)
    assert "numba        not installed" in text and "openvino     error: RuntimeError: device plugin" in text
    assert "tensorrt     error: OSError: libnvinfer.so.10" in text
