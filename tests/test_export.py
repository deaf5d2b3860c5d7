"""ONNX export: specs, every network kind against torch, dynamic batch, cache keys, external data, fp16."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from finextract.engine.export import (
    ExportSpec,
    build_module,
    cache_key,
    export_cached,
    read_valid_meta,
    spec_for,
    weights_hash,
)
from finextract.engine.lora import GatedLoRA

from finextract.rules import rule_for


@pytest.fixture(scope="session")
def onnx_cache(tmp_path_factory):
    """One export cache for this file: each network is traced once per session."""
    return tmp_path_factory.mktemp("onnx_cache")


def _run(path, spec, inputs):
    import onnxruntime as ort
    from finextract.engine.backends.ort_backend import session_options

    session = ort.InferenceSession(str(path), session_options(1), providers=["CPUExecutionProvider"])
    return session.run(None, {name: x.numpy() for name, x in zip(spec.input_names, inputs)})[0]


def test_spec_names_shapes_profiles():
    spec = ExportSpec("lora_pair", ("finetuned", "base"), (4, 16, 16), (77, 32))
    assert spec.input_names == ("x_t", "t", "text_embedding_a", "text_embedding_b", "lora_gate", "coef_a", "coef_b")
    assert spec.output_names == ("eps",)
    shapes = spec.input_shapes(8)
    assert shapes["x_t"] == (8, 4, 16, 16) and shapes["t"] == (8,) and shapes["lora_gate"] == (16,)
    assert shapes["text_embedding_a"] == (1, 77, 32) and shapes["coef_b"] == (1,)
    profile = spec.profile_shapes(16)
    assert profile["x_t"] == ((16, 4, 16, 16),) * 3 and profile["lora_gate"] == ((32,),) * 3
    assert spec.dynamic_axes["x_t"] == {0: "batch"} and spec.dynamic_axes["lora_gate"] == {0: "batch2"}
    inputs = spec.sample_inputs(3)
    assert [tuple(x.shape) for x in inputs] == [spec.input_shapes(3)[n] for n in spec.input_names]
    assert torch.equal(inputs[0], spec.sample_inputs(3)[0])  # deterministic
    half = ExportSpec("unet", ("base",), (4, 16, 16), (77, 32), dtype="fp16")
    assert half.input_dtypes() == {"x_t": torch.float16, "t": torch.float32, "text_embedding": torch.float16}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kind="pair"), "kind"),
        (dict(models=("finetuned",)), "models"),
        (dict(dtype="bf16"), "dtype"),
        (dict(opset=13), "opset"),
        (dict(batch_sizes=()), "batch_sizes"),
    ],
)
def test_spec_validation(kwargs, match):
    args = dict(kind="dreambooth_pair", models=("finetuned", "base"), latent_shape=(4, 16, 16), text_shape=(77, 32))
    with pytest.raises(ValueError, match=match):
        ExportSpec(**{**args, **kwargs})


def test_spec_for_picks_the_network(dreambooth_pair, lora_pair):
    assert spec_for(dreambooth_pair, rule_for("finextract", "dreambooth")).kind == "dreambooth_pair"
    assert spec_for(dreambooth_pair, rule_for("cfg", "dreambooth")).models == ("finetuned", "finetuned")
    direct = spec_for(dreambooth_pair, rule_for("direct", "dreambooth"))
    assert (direct.kind, direct.models) == ("unet", ("finetuned",))
    spec = spec_for(lora_pair, rule_for("finextract", "lora"), dtype=torch.float16)
    assert (spec.kind, spec.dtype, spec.latent_shape, spec.text_shape) == ("lora_pair", "fp16", (4, 16, 16), (77, 32))


@pytest.mark.parametrize(
    "pair_name, method",
    [
        ("dreambooth_pair", "finextract"),
        ("dreambooth_pair", "cfg"),
        ("dreambooth_pair", "direct"),
        ("lora_pair", "finextract"),
        ("lora_pair", "direct"),
    ],
)
def test_export_matches_torch_with_dynamic_batch(request, onnx_cache, pair_name, method):
    pair = request.getfixturevalue(pair_name)
    spec = spec_for(pair, rule_for(method, pair.kind))
    exported = export_cached(pair, spec, onnx_cache)
    inputs = spec.sample_inputs(3, seed=1)  # traced at batch 2: batch 3 checks the dynamic axis
    with torch.no_grad():
        expected = build_module(pair, spec)(*inputs).numpy()
    actual = _run(exported.path, spec, inputs)
    assert actual.shape == (3, 4, 16, 16)
    assert np.abs(actual - expected).max() < 1e-4


def test_fused_dreambooth_graph_is_the_rule(dreambooth_pair, onnx_cache):
    """The fused graph's eps equals coef_a * UNet_ft(e_a) + coef_b * UNet_base(e_b) computed in torch."""
    spec = spec_for(dreambooth_pair, rule_for("finextract", "dreambooth"))
    exported = export_cached(dreambooth_pair, spec, onnx_cache)
    x_t, t, e_a, e_b, _, _ = spec.sample_inputs(2, seed=2)
    coef_a, coef_b = torch.tensor([5.0]), torch.tensor([-4.0])
    with torch.no_grad():
        eps_ft = dreambooth_pair.finetuned_unet(x_t, t, encoder_hidden_states=e_a.expand(2, -1, -1)).sample
        eps_base = dreambooth_pair.base_unet(x_t, t, encoder_hidden_states=e_b.expand(2, -1, -1)).sample
    actual = _run(exported.path, spec, (x_t, t, e_a, e_b, coef_a, coef_b))
    assert np.abs(actual - (5.0 * eps_ft - 4.0 * eps_base).numpy()).max() < 1e-4


def test_lora_gate_selects_base_or_finetune_per_sample(lora_pair, onnx_cache):
    """Gate 0 on both halves gives the base UNet's combination; the LoRA branch changes the output."""
    adapted = sum(isinstance(m, GatedLoRA) for m in lora_pair.base_unet.modules())
    spec = spec_for(lora_pair, rule_for("finextract", "lora"))
    exported = export_cached(lora_pair, spec, onnx_cache)
    # the export adapts a copy: the pair's own UNet is not changed
    assert sum(isinstance(m, GatedLoRA) for m in lora_pair.base_unet.modules()) == adapted
    x_t, t, e_a, e_b, _, _, _ = spec.sample_inputs(2, seed=3)
    one, zero = torch.tensor([1.0]), torch.tensor([0.0])
    off = _run(exported.path, spec, (x_t, t, e_a, e_b, torch.zeros(4), one, zero))
    on = _run(exported.path, spec, (x_t, t, e_a, e_b, torch.ones(4), one, zero))
    with torch.no_grad():  # gate unset (None): adapters off
        base = lora_pair.base_unet(x_t, t, encoder_hidden_states=e_a.expand(2, -1, -1)).sample.numpy()
    assert np.abs(off - base).max() < 1e-4
    assert np.abs(on - base).max() > 1e-3


def test_cache_reuse_and_stale_rebuild(dreambooth_pair, onnx_cache):
    spec = spec_for(dreambooth_pair, rule_for("direct", "dreambooth"))
    first = export_cached(dreambooth_pair, spec, onnx_cache)
    again = export_cached(dreambooth_pair, spec, onnx_cache)
    assert again.meta["reused"] and again.path == first.path and again.meta["key"] == first.meta["key"]
    meta = json.loads((first.path.parent / "meta.json").read_text())
    assert meta["spec"]["kind"] == "unet" and meta["versions"]["torch"] == torch.__version__
    assert meta["weights_sha256"] == weights_hash(build_module(dreambooth_pair, spec))
    # a truncated file is stale: re-exported, not trusted
    with open(first.path, "r+b") as handle:
        handle.truncate(100)
    assert read_valid_meta(first.path.parent, meta["key"]) is None
    rebuilt = export_cached(dreambooth_pair, spec, onnx_cache)
    assert not rebuilt.meta["reused"] and rebuilt.path.stat().st_size == meta["files"]["model.onnx"]


def test_cache_key_covers_weights_spec_versions_not_profiles(dreambooth_pair):
    spec = spec_for(dreambooth_pair, rule_for("finextract", "dreambooth"))
    versions = {"torch": "1", "onnx": "1", "diffusers": "1"}
    key = cache_key(spec, "w", versions)
    assert cache_key(spec, "w2", versions) != key
    assert cache_key(spec, "w", {**versions, "onnx": "2"}) != key
    for change in (dict(dtype="fp16"), dict(opset=18), dict(models=("finetuned", "finetuned"))):
        assert cache_key(ExportSpec(**{**spec.__dict__, **change}), "w", versions) != key
    assert cache_key(ExportSpec(**{**spec.__dict__, "batch_sizes": (32,)}), "w", versions) == key
    swapped = build_module(dreambooth_pair, ExportSpec(**{**spec.__dict__, "models": ("base", "finetuned")}))
    assert weights_hash(swapped) != weights_hash(build_module(dreambooth_pair, spec))


def test_external_data_export(dreambooth_pair, tmp_path):
    spec = spec_for(dreambooth_pair, rule_for("direct", "dreambooth"))
    exported = export_cached(dreambooth_pair, spec, tmp_path, external_data=True)
    data = exported.path.with_name("model.onnx.data")
    assert data.is_file() and data.stat().st_size > exported.path.stat().st_size
    assert set(exported.meta["files"]) == {"model.onnx", "model.onnx.data"}
    inputs = spec.sample_inputs(2)
    with torch.no_grad():
        expected = build_module(dreambooth_pair, spec)(*inputs).numpy()
    assert np.abs(_run(exported.path, spec, inputs) - expected).max() < 1e-4


def test_fp16_export(tiny_base, tiny_finetuned, tmp_path):
    """fp16 graphs (for CUDA): fp16 x_t / embeddings / eps, float32 t and coefficients, close to fp32."""
    import copy

    import onnx
    from finextract.engine.pair import ModelPair

    pair = ModelPair(
        kind="dreambooth",
        base_unet=copy.deepcopy(tiny_base["unet"]).half(),
        finetuned_unet=copy.deepcopy(tiny_finetuned["unet"]).half(),
        unet_lora=None,
        base_text_encoder=tiny_base["text_encoder"],
        finetuned_text_encoder=tiny_base["text_encoder"],
        base_tokenizer=tiny_base["tokenizer"],
        vae=tiny_base["vae"],
        scheduler_config={},
    )
    spec = spec_for(pair, rule_for("finextract", "dreambooth"), dtype="fp16")
    exported = export_cached(pair, spec, tmp_path)
    graph = onnx.load(str(exported.path)).graph
    types = {value.name: value.type.tensor_type.elem_type for value in [*graph.input, *graph.output]}
    f16, f32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    assert types == {
        "x_t": f16,
        "t": f32,
        "text_embedding_a": f16,
        "text_embedding_b": f16,
        "coef_a": f32,
        "coef_b": f32,
        "eps": f16,
    }
    inputs = spec.sample_inputs(2)
    with torch.no_grad():
        expected = build_module(pair, spec)(*inputs).float().numpy()
    actual = _run(exported.path, spec, inputs).astype(np.float32)
    assert np.abs(actual - expected).max() < 2e-2 * max(1.0, np.abs(expected).max())


# --- TensorRT: the CPU-side logic (keys, metadata, profiles, missing-package message) ----------


def _tensorrt_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


def test_engine_key_covers_gpu_version_precision_profiles():
    from finextract.engine.tensorrt import BuildConfig, engine_key, unet_profiles

    spec = ExportSpec("dreambooth_pair", ("finetuned", "base"), (4, 64, 64), (77, 768), dtype="fp16")
    profiles = unet_profiles(spec, (16, 8, 8))
    assert list(profiles) == [8, 16]  # sorted, deduplicated: profile i serves the i-th batch size
    assert profiles[16]["x_t"] == ((16, 4, 64, 64),) * 3
    gpu = {"name": "NVIDIA H200", "compute_capability": "9.0"}
    config = BuildConfig("fp16", (8, 16))
    key = engine_key({"onnx_key": "k"}, profiles, config, "10.8.0", gpu)
    assert engine_key({"onnx_key": "k"}, profiles, config, "10.8.0", dict(gpu)) == key
    changed = [
        engine_key({"onnx_key": "k2"}, profiles, config, "10.8.0", gpu),
        engine_key({"onnx_key": "k"}, unet_profiles(spec, (8,)), config, "10.8.0", gpu),
        engine_key({"onnx_key": "k"}, profiles, BuildConfig("fp32", (8, 16)), "10.8.0", gpu),
        engine_key({"onnx_key": "k"}, profiles, config, "10.9.0", gpu),
        engine_key({"onnx_key": "k"}, profiles, config, "10.8.0", {**gpu, "name": "NVIDIA A100"}),
        engine_key({"onnx_key": "k"}, profiles, config, "10.8.0", {**gpu, "compute_capability": "8.0"}),
    ]
    assert key not in changed and len(set(changed)) == len(changed)


def test_engine_meta_is_checked_on_load(tmp_path):
    from finextract.engine.tensorrt import ENGINE_FORMAT, read_engine_meta, sscd_profiles

    plan = tmp_path / "unet-fp16.plan"
    plan.write_bytes(b"\0" * 64)
    plan.with_suffix(".json").write_text(json.dumps({"format": ENGINE_FORMAT, "key": "abc", "size": 64}))
    assert read_engine_meta(plan, "abc")["size"] == 64
    assert read_engine_meta(plan, "other") is None  # stale: rebuilt
    plan.write_bytes(b"\0" * 10)
    assert read_engine_meta(plan, "abc") is None  # truncated: rebuilt
    assert sscd_profiles("image", (64, 32), 288) == {
        32: {"image": ((32, 288, 288, 3),) * 3},
        64: {"image": ((64, 288, 288, 3),) * 3},
    }


def test_build_config_validation():
    from finextract.engine.tensorrt import BuildConfig

    for kwargs in (dict(precision="int8"), dict(batch_sizes=(0,)), dict(optimization_level=7)):
        with pytest.raises(ValueError):
            BuildConfig(**kwargs)


@pytest.mark.skipif(_tensorrt_importable(), reason="tensorrt is importable here; the missing-package path cannot run")
def test_tensorrt_missing_says_how_to_install(dreambooth_pair):
    from finextract.engine.backends import get_backend_factory
    from finextract.engine.tensorrt import require_tensorrt

    with pytest.raises(RuntimeError, match=r"pip install --extra-index-url https://pypi.nvidia.com tensorrt-cu12"):
        require_tensorrt()
    factory = get_backend_factory("tensorrt")
    with pytest.raises(RuntimeError, match="TensorRT's Python package is not importable"):
        factory(dreambooth_pair, rule_for("finextract", "dreambooth"), {}, device="cuda")


@pytest.mark.skipif(_tensorrt_importable(), reason="tensorrt is importable here; this checks the fallback")
def test_build_engines_script_exports_and_reports_missing_tensorrt(tmp_path, capsys):
    """build_engines.py without TensorRT: ONNX exported (and reused on a rerun), exit status 2, a plain message."""
    import importlib.util
    from pathlib import Path

    from finextract.zoo import build_zoo

    zoo = build_zoo(tmp_path / "zoo")
    script = Path(__file__).resolve().parents[1] / "build_engines.py"
    module_spec = importlib.util.spec_from_file_location("build_engines", script)
    build_engines = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(build_engines)
    argv = [
        "--base",
        str(zoo / "base"),
        "--finetuned",
        str(zoo / "dreambooth"),
        "--method",
        "finextract",
        "direct",
        "--precision",
        "fp32",
        "--batch-sizes",
        "2",
        "--sscd",
        "none",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "engines"),
    ]
    assert build_engines.main(argv) == 2
    assert "TensorRT engines NOT built" in capsys.readouterr().err
    manifest = json.loads((tmp_path / "engines" / "manifest.json").read_text())
    assert [n["kind"] for n in manifest["networks"]] == ["dreambooth_pair", "unet"]
    assert all(Path(n["onnx"]).is_file() and not n["onnx_reused"] for n in manifest["networks"])
    assert "pip install" in manifest["tensorrt"]
    assert build_engines.main(argv + ["--onnx-only"]) == 0
    manifest = json.loads((tmp_path / "engines" / "manifest.json").read_text())
    assert all(n["onnx_reused"] for n in manifest["networks"])


@pytest.mark.gpu
def test_tensorrt_backend_matches_torch(dreambooth_pair, tmp_path):
    """Where TensorRT and a GPU exist: fp32 engine vs the torch backend, with and without CUDA graphs."""
    import copy

    pytest.importorskip(
        "tensorrt", reason="tensorrt not installed: pip install --extra-index-url https://pypi.nvidia.com tensorrt-cu12"
    )
    from finextract.engine.backends.torch_backend import TorchBackend
    from finextract.engine.backends.trt_backend import TensorRTBackend

    from finextract.sampling import encode_text

    pair = copy.deepcopy(dreambooth_pair).to("cuda")
    rule = rule_for("finextract", "dreambooth")
    embeddings = encode_text(pair, rule, "a photo of sks dog")
    x_t, t = torch.randn(3, 4, 16, 16, device="cuda"), torch.tensor(501, device="cuda")
    reference = TorchBackend(pair, rule, embeddings, device="cuda").predict(x_t, t)
    expected = reference.coef_a * reference.eps_a + reference.coef_b * reference.eps_b
    for cuda_graph in (False, True):
        backend = TensorRTBackend(
            pair,
            rule,
            embeddings,
            dtype=torch.float32,
            batch_sizes=(2, 4),
            cache_dir=tmp_path / "onnx",
            engine_dir=tmp_path / "engines",
            cuda_graph=cuda_graph,
        )
        assert backend.artifact.reused == cuda_graph  # second construction reuses the engine
        for _ in range(2):  # the second call replays the captured graph
            eps = backend.predict(x_t, t).eps_a
            assert (eps - expected).abs().max() < 1e-2
