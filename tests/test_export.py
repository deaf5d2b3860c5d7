"""ONNX export of the guided denoiser's step: specs, every rule against torch, dynamic batch, cache keys,
external data, fp16; and the TensorRT path's CPU-side logic."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest
import torch

from finextract.engine.conditioning import encode_conditioning
from finextract.engine.config import RunConfig
from finextract.engine.ddim import DDIMTable
from finextract.engine.denoiser import GuidedDenoiser
from finextract.engine.export import EXPORT_FORMAT, ExportSpec, cache_key, export_cached, read_valid_meta
from finextract.engine.lora import GatedLoRA
from finextract.rules import rule_for
from tests import tolerances
from tests.pairs import pair_from_parts

CAPTION = "a photo of sks dog"


def _hooks(unet) -> int:
    """The gated LoRA hooks a UNet carries."""
    return sum(isinstance(hook, GatedLoRA) for module in unet.modules() for hook in module._forward_hooks.values())


@pytest.fixture(scope="session")
def onnx_cache(tmp_path_factory):
    """One export cache for this file: each graph is traced once per session."""
    return tmp_path_factory.mktemp("onnx_cache")


def _run(path, spec, inputs):
    import onnxruntime as ort

    from finextract.engine.backends.ort_backend import session_options

    session = ort.InferenceSession(str(path), session_options(1), providers=["CPUExecutionProvider"])
    return session.run(None, {name: x.numpy() for name, x in zip(spec.input_names, inputs)})[0]


def _setup(pair, method, **params):
    rule = rule_for(method, pair.kind, **params)
    denoiser = GuidedDenoiser(pair, rule)
    conditioning = encode_conditioning(pair, rule, CAPTION)
    return rule, denoiser, conditioning, ExportSpec.of(denoiser, conditioning)


def _step_inputs(pair, rule, conditioning, batch, index=20, seed=1):
    table = DDIMTable.from_scheduler_config(pair.scheduler_config, 50)
    x_t = torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(seed))
    return (x_t, table.timesteps_tensor()[index], table.weights(*rule.coefs)[index], *conditioning)


def _bound(pair, rule, inputs, reference) -> float:
    """onnxruntime vs torch: each term's UNet output within `tolerances.network`, weighted by |w_a|, |w_b|."""
    weights = inputs[2]
    return 2 * float(weights[1 : 1 + len(rule.terms)].abs().sum()) * tolerances.network(pair.base_unet, reference)


def test_spec_names_shapes_profiles():
    conditioning = (("encoder_hidden_states_a", (1, 77, 32)), ("encoder_hidden_states_b", (1, 77, 32)))
    spec = ExportSpec((4, 16, 16), conditioning)
    assert spec.input_names == ("x_t", "t", "weights", "encoder_hidden_states_a", "encoder_hidden_states_b")
    assert spec.output_names == ("x_prev",)
    shapes = spec.input_shapes(8)
    assert shapes["x_t"] == (8, 4, 16, 16) and shapes["t"] == (1,) and shapes["weights"] == (3,)
    assert shapes["encoder_hidden_states_a"] == (1, 77, 32)
    assert spec.profile_shapes(16)["x_t"] == ((16, 4, 16, 16),) * 3
    assert spec.dynamic_axes == {"x_t": {0: "batch"}, "x_prev": {0: "batch"}}
    inputs = spec.sample_inputs(3)
    assert [tuple(x.shape) for x in inputs] == [spec.input_shapes(3)[n] for n in spec.input_names]
    assert torch.equal(inputs[0], spec.sample_inputs(3)[0])  # deterministic
    half = ExportSpec((4, 16, 16), conditioning[:1], dtype="fp16")
    assert half.input_dtypes() == {
        "x_t": torch.float32,
        "t": torch.float32,
        "weights": torch.float32,
        "encoder_hidden_states_a": torch.float16,
    }


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dtype="bf16"), "dtype"),
        (dict(opset=13), "opset"),
        (dict(batch_sizes=()), "batch_sizes"),
        (dict(conditioning=()), "conditioning"),
    ],
)
def test_spec_validation(kwargs, match):
    args = dict(latent_shape=(4, 16, 16), conditioning=(("encoder_hidden_states_a", (1, 77, 32)),))
    with pytest.raises(ValueError, match=match):
        ExportSpec(**{**args, **kwargs})


def test_spec_of_reads_the_denoiser_and_conditioning(dreambooth_pair, lora_pair):
    _, _, _, spec = _setup(dreambooth_pair, "finextract")
    assert spec.latent_shape == (4, 16, 16) and [name for name, _ in spec.conditioning] == [
        "encoder_hidden_states_a",
        "encoder_hidden_states_b",
    ]
    _, _, _, direct = _setup(lora_pair, "direct")
    assert direct.conditioning == (("encoder_hidden_states_a", (1, 77, 32)),)


@pytest.mark.parametrize(
    "pair_name, method",
    [
        ("dreambooth_pair", "finextract"),
        ("dreambooth_pair", "cfg"),
        ("dreambooth_pair", "direct"),
        ("lora_pair", "finextract"),
        ("lora_pair", "finextract-uncond"),
        ("lora_pair", "direct"),
    ],
)
def test_export_matches_torch_with_dynamic_batch(request, onnx_cache, pair_name, method):
    pair = request.getfixturevalue(pair_name)
    rule, denoiser, conditioning, spec = _setup(pair, method)
    exported = export_cached(denoiser, spec, onnx_cache)
    inputs = _step_inputs(pair, rule, conditioning, batch=3)  # traced at batch 2: batch 3 checks the dynamic axis
    with torch.no_grad():
        expected = denoiser.step(*inputs)
    actual = _run(exported.path, spec, inputs)
    assert actual.shape == (3, 4, 16, 16)
    assert np.abs(actual - expected.numpy()).max() <= _bound(pair, rule, inputs, expected)


def test_one_graph_serves_every_w_k_and_caption(dreambooth_pair, onnx_cache):
    """Rules that differ only in w, k (and Eq. 13 vs Eq. 6, which differ only in a caption) share one export,
    and each still gets its own step."""
    pair = dreambooth_pair
    rule_a, denoiser_a, conditioning_a, spec = _setup(pair, "finextract", w=3.0, k=-0.02)
    rule_b, denoiser_b, conditioning_b, _ = _setup(pair, "finextract", w=7.0, k=0.5)
    uncond = GuidedDenoiser(pair, rule_for("finextract-uncond", "dreambooth"))
    a, b = export_cached(denoiser_a, spec, onnx_cache), export_cached(denoiser_b, spec, onnx_cache)
    assert a.path == b.path and b.meta["reused"]
    assert export_cached(uncond, spec, onnx_cache).path == a.path
    inputs_a = _step_inputs(pair, rule_a, conditioning_a, batch=2)
    inputs_b = _step_inputs(pair, rule_b, conditioning_b, batch=2)
    with torch.no_grad():
        expected_b = denoiser_b.step(*inputs_b)
    out_a, out_b = _run(a.path, spec, inputs_a), _run(a.path, spec, inputs_b)
    assert np.abs(out_b - expected_b.numpy()).max() <= _bound(pair, rule_b, inputs_b, expected_b)
    assert np.abs(out_a - out_b).max() > 1e-2


def test_lora_graph_gates_the_adapters_inside(lora_pair, onnx_cache):
    """The LoRA pair's graph holds the gated low-rank branches (traced from the hooks), and exporting it leaves
    the pair unchanged: with weights (0, 1, 0) the step returns the fine-tune's output itself."""
    adapted = _hooks(lora_pair.base_unet)
    _, denoiser, conditioning, spec = _setup(lora_pair, "direct")
    exported = export_cached(denoiser, spec, onnx_cache)
    assert _hooks(lora_pair.base_unet) == adapted and lora_pair.lora_gate.value is None
    x_t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    t, output_only = torch.tensor([500.0]), torch.tensor([0.0, 1.0, 0.0])
    fine_tuned = _run(exported.path, spec, (x_t, t, output_only, *conditioning))
    with torch.no_grad():
        base = lora_pair.base_unet(x_t, t, encoder_hidden_states=conditioning[0].expand(2, -1, -1)).sample
    bound = tolerances.network(lora_pair.base_unet, base)
    assert np.abs(fine_tuned - base.numpy()).max() > 3 * bound  # the adapters are in the graph


def test_cache_reuse_and_stale_rebuild(dreambooth_pair, onnx_cache):
    _, denoiser, _, spec = _setup(dreambooth_pair, "direct")
    first = export_cached(denoiser, spec, onnx_cache)
    again = export_cached(denoiser, spec, onnx_cache)
    assert again.meta["reused"] and again.path == first.path and again.meta["key"] == first.meta["key"]
    meta = json.loads((first.path.parent / "meta.json").read_text())
    assert meta["structure"]["terms"] == ["finetuned"] and meta["versions"]["torch"] == torch.__version__
    assert meta["denoiser_fingerprint"] == denoiser.fingerprint
    # a truncated file is stale: re-exported, not trusted
    with open(first.path, "r+b") as handle:
        handle.truncate(100)
    assert read_valid_meta(first.path.parent, meta["key"]) is None
    rebuilt = export_cached(denoiser, spec, onnx_cache)
    assert not rebuilt.meta["reused"] and rebuilt.path.stat().st_size == meta["files"]["model.onnx"]


def test_cache_key_covers_weights_structure_spec_versions_not_profiles(dreambooth_pair, lora_pair):
    _, denoiser, _, spec = _setup(dreambooth_pair, "finextract")
    versions = {"torch": "1", "onnx": "1", "diffusers": "1"}
    key = cache_key(spec, denoiser.fingerprint, versions)
    assert cache_key(spec, "other", versions) != key
    assert cache_key(spec, denoiser.fingerprint, {**versions, "onnx": "2"}) != key
    for change in (dict(dtype="fp16"), dict(opset=18), dict(latent_shape=(4, 8, 8)), dict(history=1), dict(history=2)):
        assert cache_key(ExportSpec(**{**spec.__dict__, **change}), denoiser.fingerprint, versions) != key
    assert cache_key(ExportSpec(**{**spec.__dict__, "batch_sizes": (32,)}), denoiser.fingerprint, versions) == key
    # DDIM's (K = 0) key is the one before the history field existed: its cached exports stay valid
    before = {k: v for k, v in dataclasses.asdict(spec).items() if k not in ("batch_sizes", "history")}
    payload = {"format": EXPORT_FORMAT, "spec": before, "denoiser": denoiser.fingerprint, "versions": versions}
    assert key == hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    # K history tensors: the state and the weights row grow, the output is the next state
    multistep = ExportSpec(**{**spec.__dict__, "history": 2})
    assert multistep.input_shapes(3)["x_t"] == (3, 12, *spec.latent_shape[1:]) == multistep.output_shape(3)
    assert multistep.input_shapes(3)["weights"] == (15,) and spec.input_shapes(3)["weights"] == (3,)
    with pytest.raises(ValueError, match="history 3"):
        ExportSpec(**{**spec.__dict__, "history": 3})
    # another rule structure (CFG: both terms on the fine-tune) or other weights: another fingerprint
    cfg = GuidedDenoiser(dreambooth_pair, rule_for("cfg", "dreambooth"))
    assert cfg.fingerprint != denoiser.fingerprint
    assert GuidedDenoiser(lora_pair, rule_for("finextract", "lora")).fingerprint != denoiser.fingerprint


def test_external_data_export(dreambooth_pair, tmp_path):
    rule, denoiser, conditioning, spec = _setup(dreambooth_pair, "direct")
    exported = export_cached(denoiser, spec, tmp_path, external_data=True)
    data = exported.path.with_name("model.onnx.data")
    assert data.is_file() and data.stat().st_size > exported.path.stat().st_size
    assert set(exported.meta["files"]) == {"model.onnx", "model.onnx.data"}
    inputs = _step_inputs(dreambooth_pair, rule, conditioning, batch=2)
    with torch.no_grad():
        expected = denoiser.step(*inputs)
    assert np.abs(_run(exported.path, spec, inputs) - expected.numpy()).max() <= _bound(
        dreambooth_pair, rule, inputs, expected
    )


def test_fp16_export(tiny_base, tiny_finetuned, tmp_path):
    """fp16 graphs (for CUDA): fp16 UNets and conditioning, float32 x_t / t / weights / x_prev, close to fp32."""
    import copy

    import onnx

    parts = copy.deepcopy({**tiny_base, "finetuned_unet": tiny_finetuned["unet"]})  # cast below: copies only
    pair = pair_from_parts(parts, finetuned_unet=parts["finetuned_unet"])
    rule = rule_for("finextract", "dreambooth")
    conditioning = encode_conditioning(pair, rule, CAPTION)
    inputs = _step_inputs(pair, rule, conditioning, batch=2)
    with torch.no_grad():
        expected = GuidedDenoiser(pair, rule).step(*inputs)  # fp32
        outputs = GuidedDenoiser(pair, rule).term_outputs(inputs[0], inputs[1], *conditioning)
    pair.to("cpu", torch.float16)
    denoiser = GuidedDenoiser(pair, rule)
    half_conditioning = tuple(c.half() for c in conditioning)
    spec = ExportSpec.of(denoiser, half_conditioning, dtype="fp16")
    exported = export_cached(denoiser, spec, tmp_path)
    graph = onnx.load(str(exported.path)).graph
    types = {value.name: value.type.tensor_type.elem_type for value in [*graph.input, *graph.output]}
    f16, f32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    assert types == {
        "x_t": f32,
        "t": f32,
        "weights": f32,
        "encoder_hidden_states_a": f16,
        "encoder_hidden_states_b": f16,
        "x_prev": f32,
    }
    actual = _run(exported.path, spec, (*inputs[:3], *half_conditioning))
    # fp16 weights and activations: each of the L products meets two roundings to 2^-11 relative (its
    # fp16 weights, its fp16 result) instead of u; the step weighs each term's output by |w_a|, |w_b|
    layers, _ = tolerances.network_size(pair.base_unet)
    w_a, w_b = inputs[2][1:].abs().tolist()
    bound = sum(w * 2 * layers * 2.0**-11 * o.abs().max().item() for w, o in zip((w_a, w_b), outputs))
    assert np.abs(actual - expected.numpy()).max() <= bound


# --- TensorRT: the CPU-side logic (keys, metadata, profiles, missing-package message) ----------


def _tensorrt_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorrt") is not None


def test_engine_key_covers_gpu_version_precision_profiles():
    from finextract.engine.tensorrt import BuildConfig, engine_key, unet_profiles

    conditioning = (("encoder_hidden_states_a", (1, 77, 768)), ("encoder_hidden_states_b", (1, 77, 768)))
    spec = ExportSpec((4, 64, 64), conditioning, dtype="fp16")
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
    from finextract.engine.tensorrt import ENGINE_FORMAT, read_engine_meta

    plan = tmp_path / "unet-fp16.plan"
    plan.write_bytes(b"\0" * 64)
    plan.with_suffix(".json").write_text(json.dumps({"format": ENGINE_FORMAT, "key": "abc", "size": 64}))
    assert read_engine_meta(plan, "abc")["size"] == 64
    assert read_engine_meta(plan, "other") is None  # stale: rebuilt
    plan.write_bytes(b"\0" * 10)
    assert read_engine_meta(plan, "abc") is None  # truncated: rebuilt


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
    rule = rule_for("finextract", "dreambooth")
    with pytest.raises(RuntimeError, match="TensorRT's Python package is not importable"):
        factory(GuidedDenoiser(dreambooth_pair, rule), (), RunConfig(device="cuda", backend="tensorrt"))


@pytest.mark.skipif(_tensorrt_importable(), reason="tensorrt is importable here; this checks the fallback")
def test_build_engines_script_exports_and_reports_missing_tensorrt(tmp_path, capsys):
    """build_engines.py without TensorRT: ONNX exported (and reused on a rerun), exit status 2, a plain message."""
    import importlib.util
    from pathlib import Path

    from finextract.zoo.build import build_zoo

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
        "finextract-uncond",
        "direct",
        "--precision",
        "fp32",
        "--batch-sizes",
        "2",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "cache"),
    ]
    assert build_engines.main(argv) == 2
    assert "TensorRT engines NOT built" in capsys.readouterr().err
    manifest = json.loads((tmp_path / "cache" / "engines" / "manifest.json").read_text())
    # Eq. 13 and Eq. 6 use the same models: one graph (captions are inputs); Direct another
    assert [(g["models"], g["methods"]) for g in manifest["graphs"]] == [
        (["finetuned", "base"], ["finextract", "finextract-uncond"]),
        (["finetuned"], ["direct"]),
    ]
    assert all(Path(g["onnx"]).is_file() and not g["onnx_reused"] for g in manifest["graphs"])
    assert all(Path(g["onnx"]).parent.parent == tmp_path / "cache" / "onnx" for g in manifest["graphs"])
    assert "pip install" in manifest["tensorrt"]
    assert build_engines.main([*argv, "--onnx-only"]) == 0
    manifest = json.loads((tmp_path / "cache" / "engines" / "manifest.json").read_text())
    assert all(g["onnx_reused"] for g in manifest["graphs"])


@pytest.mark.gpu
def test_tensorrt_backend_matches_torch(dreambooth_pair, tmp_path):
    """Where TensorRT and a GPU exist: an fp32 engine's step vs the torch backend's, eager and in the graphed loop."""
    import copy

    pytest.importorskip(
        "tensorrt", reason="tensorrt not installed: pip install --extra-index-url https://pypi.nvidia.com tensorrt-cu12"
    )
    from finextract.engine.backends.torch_backend import TorchBackend
    from finextract.engine.backends.trt_backend import TensorRTBackend
    from finextract.engine.ddim import DDIMLoop

    config = RunConfig.resolve(device="cuda", backend="tensorrt", batch_size=4, cache_dir=tmp_path)
    pair = copy.deepcopy(dreambooth_pair).place(config)
    rule = rule_for("finextract", "dreambooth")
    denoiser = GuidedDenoiser(pair, rule)
    conditioning = encode_conditioning(pair, rule, CAPTION)
    table = DDIMTable.from_scheduler_config(pair.scheduler_config, 4)
    timesteps, weights = table.timesteps_tensor("cuda"), table.weights(*rule.coefs, device="cuda")
    x_T = torch.randn(3, 4, 16, 16, device="cuda")
    reference = TorchBackend(denoiser, conditioning, config).step(x_T, timesteps[0], weights[0])
    backend = TensorRTBackend(denoiser, conditioning, config, batch_sizes=(2, 4))
    assert TensorRTBackend(denoiser, conditioning, config, batch_sizes=(2, 4)).artifact.reused
    bound = 2 * float(weights[0, 1:].abs().sum()) * tolerances.network(pair.base_unet, reference)
    assert (backend.step(x_T, timesteps[0], weights[0]) - reference).abs().max().item() <= bound
    graphed = DDIMLoop(backend.step, timesteps, weights, graph=True).run(torch.cat([x_T, x_T[:1] * 0]))
    eager = DDIMLoop(backend.step, timesteps, weights).run(torch.cat([x_T, x_T[:1] * 0]))
    assert torch.equal(graphed, eager)  # the same engine launches, captured or not


def test_one_data_file_from_scattered_external_data(tmp_path):
    """The exporter's layout above 2 GB (one file per tensor) gathers into one aligned data file, bytes unchanged."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from finextract.engine.export import save_with_one_data_file

    rng = np.random.default_rng(0)
    weights = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in (("a", (2, 64)), ("c", (3, 5)))}
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(weights["c"], "c")),
            helper.make_node("Add", ["x", "a"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64]), helper.make_tensor_value_info("c", 1, [3, 5])],
        [numpy_helper.from_array(weights["a"], "a")],
    )
    scattered = tmp_path / "raw" / "model.onnx"
    scattered.parent.mkdir()
    onnx.save_model(
        helper.make_model(graph), str(scattered), save_as_external_data=True, all_tensors_to_one_file=False,
        size_threshold=0,
    )  # fmt: skip
    # the graph and one file per initializer, as the exporter writes them; the Constant stays inline
    assert sorted(p.name for p in scattered.parent.iterdir()) == ["a", "model.onnx"]
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    save_with_one_data_file(scattered, out, size_threshold=0)
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    loaded = onnx.load(str(out), load_external_data=True)
    # bytes copied as they are: from a data file (the initializer) and from the graph (the Constant)
    assert np.array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), weights["a"])
    assert np.array_equal(numpy_helper.to_array(loaded.graph.node[0].attribute[0].t), weights["c"])
    headers = onnx.load(str(out), load_external_data=False)
    tensors = [headers.graph.initializer[0], headers.graph.node[0].attribute[0].t]
    offsets = [int(entry.value) for tensor in tensors for entry in tensor.external_data if entry.key == "offset"]
    assert len(offsets) == 2 and all(offset % 4096 == 0 for offset in offsets)
