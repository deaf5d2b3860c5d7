"""The fused guidance + DDIM kernel: its source compiles, its loader's logic, and (GPU) its numbers.

CPU tests cover everything that runs without a GPU: nvcc / NVRTC compilation of the .cu, the dispatch
table, the source hash, the DDIM weights (against diffusers' form of the update in float64), the
vectorisation plan (every element covered once), argument checks, and the CUDA-graph loop's eager
path. GPU tests compare the kernel with a float64 reference on odd sizes and unaligned pointers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import operator
import os
import shutil
import subprocess
import sys

import pytest
import torch
from finextract.engine.backends.base import Prediction
from finextract.kernels import cuda_guidance as cg

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (alpha_prod_t, alpha_prod_t_prev) from the SD 1.x schedule: early, middle and last DDIM steps.
ALPHA_PAIRS = [(0.0047, 0.0060), (0.3, 0.4), (0.9915, 0.99915)]


def ddim_reference(x_t, eps_a, eps_b, coef_a, coef_b, alpha_prod_t, alpha_prod_t_prev):
    """diffusers' `DDIMScheduler.step` (eta = 0) on the combined eps, in float64."""
    x_t = x_t.double()
    eps = coef_a * eps_a.double() + (coef_b * eps_b.double() if eps_b is not None else 0.0)
    a_t = torch.tensor(alpha_prod_t, dtype=torch.float64)
    a_prev = torch.tensor(alpha_prod_t_prev, dtype=torch.float64)
    pred_original_sample = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    return a_prev.sqrt() * pred_original_sample + (1 - a_prev).sqrt() * eps


def relative_error(value, reference):
    return ((value.double() - reference).norm() / reference.norm()).item()


# ---------------------------------------------------------------- compilation (CPU, toolchains) --


def test_cu_compiles_for_sm90_with_nvcc(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: install the CUDA toolkit to check that guidance_ddim.cu compiles")
    ptx = tmp_path / "guidance_ddim.ptx"
    result = subprocess.run(
        [nvcc, "-arch=sm_90", "-cubin", "-Xptxas", "-v", "-o", str(tmp_path / "g.cubin"), str(cg.KERNEL_SOURCE)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    report = result.stderr
    for dtype in DTYPES:
        for has_b in (True, False):
            assert f"'{cg.kernel_name(dtype, has_b)}'" in report
    assert report.count("0 bytes stack frame") == 6, report  # nothing spilled to local memory
    subprocess.run([nvcc, "-arch=sm_90", "-ptx", "-o", str(ptx), str(cg.KERNEL_SOURCE)], check=True)
    text = ptx.read_text()
    assert "ld.global.nc.v4" in text and "st.global.v4" in text  # 16-byte loads and stores


def _find_nvrtc():
    candidates = [os.environ.get("FINEXTRACT_NVRTC", "")]
    candidates += glob.glob(
        os.path.join(sys.prefix, "lib", "python*", "site-packages", "nvidia", "cu*", "lib", "libnvrtc.so*")
    )
    candidates.append(ctypes.util.find_library("nvrtc") or "")
    for candidate in filter(None, candidates):
        try:
            return ctypes.CDLL(candidate)
        except OSError:
            continue
    return None


def test_cu_compiles_with_nvrtc_as_cupy_does():
    lib = _find_nvrtc()
    if lib is None:
        pytest.skip(
            "libnvrtc not found (CuPy compiles with it on the GPU machine); set FINEXTRACT_NVRTC=/path/libnvrtc.so"
        )
    source, _ = cg.kernel_source()
    program = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(program), source.encode(), b"guidance_ddim.cu", 0, None, None) == 0
    options = [option.encode() for option in cg.NVRTC_OPTIONS] + [b"-arch=sm_90"]
    status = lib.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(program, log)
    assert status == 0, log.value.decode()


# ----------------------------------------------------------------------- loader logic (CPU) --


def test_dispatch_table_names_every_entry_point():
    source, _ = cg.kernel_source()
    names = {cg.kernel_name(dtype, has_b) for dtype in DTYPES for has_b in (True, False)}
    assert names == {
        "guided_ddim_f32",
        "guided_ddim_f32_a",
        "guided_ddim_f16",
        "guided_ddim_f16_a",
        "guided_ddim_bf16",
        "guided_ddim_bf16_a",
    }
    assert "GUIDED_DDIM_ENTRY(guided_ddim_f32, F32)" in source
    assert [cg.vector_elements(dtype) for dtype in DTYPES] == [4, 8, 8]
    with pytest.raises(ValueError, match="float64"):
        cg.kernel_name(torch.float64, True)


def test_source_hash_keys_source_and_options():
    source, digest = cg.kernel_source()
    assert digest == cg.source_hash(source) and len(digest) == 64
    assert cg.source_hash(source + " ") != digest
    assert cg.source_hash(source, cg.NVRTC_OPTIONS + ("-G",)) != digest


@pytest.mark.parametrize("alpha_prod_t, alpha_prod_t_prev", ALPHA_PAIRS)
@pytest.mark.parametrize("has_b", [True, False])
def test_ddim_weights_equal_diffusers_update(alpha_prod_t, alpha_prod_t_prev, has_b):
    generator = torch.Generator().manual_seed(1)
    x_t, eps_a, eps_b = (torch.randn(2, 4, 5, 3, generator=generator, dtype=torch.float64) for _ in range(3))
    eps_b = eps_b if has_b else None
    coef_a, coef_b = 3.0, -2.02  # FineXtract DreamBooth: w, 1 - w + k
    w_x, w_a, w_b = cg.ddim_weights(coef_a, coef_b, alpha_prod_t, alpha_prod_t_prev)
    fused = w_x * x_t + w_a * eps_a + (w_b * eps_b if has_b else 0.0)
    reference = ddim_reference(x_t, eps_a, eps_b, coef_a, coef_b, alpha_prod_t, alpha_prod_t_prev)
    assert relative_error(fused, reference) < 1e-12


def test_ddim_weights_reject_bad_alphas_and_coefficients():
    for a_t, a_prev in [(0.0, 0.5), (0.5, 1.5), (-0.1, 0.2)]:
        with pytest.raises(ValueError, match="alpha_prod_t"):
            cg.ddim_weights(1.0, 0.0, a_t, a_prev)
    with pytest.raises(ValueError, match="finite"):
        cg.ddim_weights(float("nan"), 0.0, 0.5, 0.6)
    table = cg.ddim_weights_table(3.0, -2.0, [0.3, 0.5], [0.5, 0.9])
    assert table.shape == (2, 3) and table.dtype == torch.float32
    assert torch.allclose(table[1].double(), torch.tensor(cg.ddim_weights(3.0, -2.0, 0.5, 0.9), dtype=torch.float64))


def _covered(numel, head, n_vec, vec):
    """Element indices the kernel touches, in its own order: vector body, then scalar head and tail."""
    body = [head + v * vec + j for v in range(n_vec) for j in range(vec)]
    tail_start = head + n_vec * vec
    scalar = [s if s < head else tail_start + (s - head) for s in range(head + numel - tail_start)]
    return body, scalar


@pytest.mark.parametrize("element_size", [4, 2])
@pytest.mark.parametrize("numel", [1, 3, 8, 17, 1001])
@pytest.mark.parametrize("offset_elements", [0, 1, 3])
def test_vector_plan_covers_every_element_once(element_size, numel, offset_elements):
    base = 1 << 20  # a 16-byte aligned allocation
    pointers = [base + offset_elements * element_size + k * 4096 for k in range(4)]
    vec = 16 // element_size
    head, n_vec = cg.vector_plan(pointers, numel, element_size)
    body, scalar = _covered(numel, head, n_vec, vec)
    assert sorted(body + scalar) == list(range(numel))
    assert len(scalar) < 2 * vec  # the vectors carry nearly everything
    if n_vec:
        assert all((pointer + head * element_size) % 16 == 0 for pointer in pointers)


def test_vector_plan_falls_back_to_scalar_when_alignments_differ():
    head, n_vec = cg.vector_plan([0, 4, 32], 100, 4)
    assert (head, n_vec) == (0, 0)
    assert sorted(functools.reduce(operator.iadd, _covered(100, head, n_vec, 4), [])) == list(range(100))
    assert cg.grid_blocks(1, 132) == 1 and cg.grid_blocks(10**9, 132) == 132 * 8


def test_check_inputs_names_the_bad_argument():
    x = torch.zeros(2, 4, 3, 3)
    with pytest.raises(ValueError, match="eps_a has shape"):
        cg.check_inputs(x, torch.zeros(2, 4, 3, 4), None, None)
    with pytest.raises(ValueError, match=r"eps_b is torch\.float16"):
        cg.check_inputs(x, x.clone(), x.half(), None)
    with pytest.raises(ValueError, match="needs CUDA tensors"):  # strided inputs pass (made dense later)
        cg.check_inputs(x, x.transpose(2, 3), None, None)
    with pytest.raises(ValueError, match="laid out like x_t"):
        cg.check_inputs(x, x.clone(), None, torch.empty_like(x).transpose(2, 3))
    with pytest.raises(ValueError, match="float64"):
        cg.check_inputs(x.double(), x.double(), None, None)
    with pytest.raises(TypeError, match=r"eps_a must be a torch\.Tensor"):
        cg.check_inputs(x, [1.0], None, None)
    with pytest.raises(ValueError, match="out overlaps x_t"):
        cg.check_inputs(x, x.clone(), None, x)
    with pytest.raises(ValueError, match="weights must be"):
        cg.check_inputs(x, x.clone(), None, torch.empty_like(x), torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        cg.guided_ddim_step_cuda(x, x.clone(), x.clone(), 3.0, -2.0, 0.3, 0.5)
    with pytest.raises(ValueError, match="out is required"):
        cg.guided_ddim_step_cuda_weights(x, x.clone(), None, torch.zeros(3), None)


def test_match_layout_copies_only_when_the_memory_order_differs():
    x = torch.randn(2, 4, 3, 5)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert cg.match_layout(x.clone(), x).is_contiguous()
    same = x_cl.clone(memory_format=torch.channels_last)
    assert cg.match_layout(same, x_cl) is same  # channels-last eps with channels-last x_t: used in place
    converted = cg.match_layout(x_cl, x)
    assert converted.is_contiguous() and torch.equal(converted, x)
    strided = cg.match_layout(x.transpose(2, 3))
    assert strided.is_contiguous() and torch.equal(strided, x.transpose(2, 3))
    back = cg.match_layout(x, x_cl)
    assert back.is_contiguous(memory_format=torch.channels_last) and torch.equal(back, x)
    # flat views of dense tensors with one element order hold the same values at the same offsets
    assert torch.equal(cg.match_layout(x_cl, x_cl).permute(0, 2, 3, 1).reshape(-1), x.permute(0, 2, 3, 1).reshape(-1))


def test_cupy_is_not_imported_by_the_loader():
    code = "import sys, finextract.kernels.cuda_guidance, finextract.engine.cuda_graph; print('cupy' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_contract_reference_matches_fused_weights():
    guidance_ddim = pytest.importorskip(
        "finextract.kernels.guidance_ddim", reason="finextract.kernels.guidance_ddim (issue 3) is not in the tree yet"
    )
    generator = torch.Generator().manual_seed(2)
    x_t, eps_a, eps_b = (torch.randn(3, 4, 7, 5, generator=generator) for _ in range(3))
    for a_t, a_prev in ALPHA_PAIRS:
        value = guidance_ddim.guided_ddim_step(x_t, eps_a, eps_b, 5.0, -4.0, a_t, a_prev, impl="reference")
        reference = ddim_reference(x_t, eps_a, eps_b, 5.0, -4.0, a_t, a_prev)
        assert relative_error(value, reference) < 1e-5


# ------------------------------------------------------------ the CUDA-graph loop, eager (CPU) --


class LinearBackend:
    """A stand-in for a model pair: eps_a = 0.5 x + t/1000, eps_b = -0.25 x (deterministic)."""

    name = "linear"

    def __init__(self, coef_a=3.0, coef_b=-2.02):
        self.coef_a, self.coef_b = coef_a, coef_b
        self.calls = 0

    def predict(self, x_t, t):
        self.calls += 1
        return Prediction(
            eps_a=0.5 * x_t + t.to(x_t.dtype) / 1000, eps_b=-0.25 * x_t, coef_a=self.coef_a, coef_b=self.coef_b
        )


def _schedule(steps=5):
    from diffusers import DDIMScheduler

    from finextract.zoo import SD1_SCHEDULER_CONFIG

    scheduler = DDIMScheduler.from_config(SD1_SCHEDULER_CONFIG)
    scheduler.set_timesteps(steps)
    timesteps = [int(t) for t in scheduler.timesteps]
    step = scheduler.config.num_train_timesteps // steps
    alphas = scheduler.alphas_cumprod
    a_t = [float(alphas[t]) for t in timesteps]
    a_prev = [float(alphas[t - step]) if t - step >= 0 else float(scheduler.final_alpha_cumprod) for t in timesteps]
    return scheduler, timesteps, a_t, a_prev


def test_graphed_loop_eager_path_equals_diffusers_ddim():
    scheduler, timesteps, a_t, a_prev = _schedule(5)
    backend = LinearBackend()
    x_T = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(3))
    from finextract.engine.cuda_graph import GraphedDDIMLoop

    loop = GraphedDDIMLoop(backend, x_T.shape, timesteps, a_t, a_prev, dtype=torch.float32, device="cpu")
    result = loop.run(x_T)
    assert loop.mode == "eager" and backend.calls == 5
    # diffusers' own DDIM loop on the same combined prediction
    sample = x_T.clone()
    for t in scheduler.timesteps:
        prediction = backend.predict(sample, t)
        eps = prediction.coef_a * prediction.eps_a + prediction.coef_b * prediction.eps_b
        sample = scheduler.step(eps, t, sample, eta=0.0).prev_sample
    assert relative_error(result, sample.double()) < 1e-5
    with pytest.raises(ValueError, match="pad the batch"):
        loop.run(x_T[:1])


@pytest.mark.parametrize("method", ["finextract", "cfg"])
def test_graphed_loop_with_torch_backend_equals_sampler_loop(dreambooth_pair, method):
    from finextract.engine.backends.torch_backend import TorchBackend
    from finextract.engine.cuda_graph import GraphedDDIMLoop
    from finextract.kernels.guidance_ddim import guided_ddim_step

    from finextract.rules import rule_for
    from finextract.sampling import ddim_schedule, encode_text, make_scheduler

    rule = rule_for(method, "dreambooth")
    backend = TorchBackend(dreambooth_pair, rule, encode_text(dreambooth_pair, rule, "a photo of sks"))
    schedule = ddim_schedule(make_scheduler(dreambooth_pair.scheduler_config, 4))
    x_T = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(8))
    loop = GraphedDDIMLoop.from_schedule(backend, x_T.shape, schedule, dtype=torch.float32, device="cpu")
    result = loop.run(x_T)
    x_t = x_T.clone()
    for t, alpha_prod_t, alpha_prod_t_prev in schedule:
        prediction = backend.predict(x_t, torch.tensor(t))
        x_t = guided_ddim_step(
            x_t,
            prediction.eps_a,
            prediction.eps_b,
            prediction.coef_a,
            prediction.coef_b,
            alpha_prod_t,
            alpha_prod_t_prev,
            impl="reference",
        )
    assert relative_error(result, x_t.double()) < 1e-5


def test_graphed_loop_rejects_mismatched_schedule():
    from finextract.engine.cuda_graph import GraphedDDIMLoop

    with pytest.raises(ValueError, match="one length"):
        GraphedDDIMLoop(LinearBackend(), (1, 4, 2, 2), [10, 0], [0.5], [0.6, 0.7], device="cpu")


def test_prepare_unet_for_cuda_keeps_the_function(tiny_base):
    import copy

    from finextract.engine.cuda_graph import prepare_unet_for_cuda

    unet = copy.deepcopy(tiny_base["unet"])
    generator = torch.Generator().manual_seed(4)
    sample = torch.randn(2, 4, 16, 16, generator=generator)
    text = torch.randn(2, 5, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        before = unet(sample, 10, encoder_hidden_states=text).sample
        prepared = prepare_unet_for_cuda(unet, dtype="fp32", channels_last=True, device="cpu")
        after = prepared(sample, 10, encoder_hidden_states=text).sample
    assert prepared is unet and not any(p.requires_grad for p in unet.parameters())
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(after, before.double()) < 1e-5
    prepare_unet_for_cuda(unet, dtype=torch.bfloat16, channels_last=False, device="cpu")
    assert unet.conv_in.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="fp16"):
        prepare_unet_for_cuda(unet, dtype="int8", device="cpu")


# --------------------------------------------------------------------------------- GPU tests --


def _cuda_inputs(numel, dtype, offset, generator):
    """Three inputs and a NaN-filled output of `numel` elements starting `offset` elements into their buffers."""

    def buffer():
        storage = torch.randn(numel + offset, generator=generator, dtype=torch.float32).to("cuda", dtype)
        return storage[offset:]

    out_storage = torch.full((numel + offset,), float("nan"), device="cuda", dtype=dtype)
    return buffer(), buffer(), buffer(), out_storage[offset:]


TOLERANCE = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("has_b", [True, False])
@pytest.mark.parametrize("numel, offset", [(1, 0), (7, 1), (1001, 0), (4 * 4 * 33 * 17 + 5, 3), (2 * 4 * 64 * 64, 0)])
def test_kernel_equals_reference_on_gpu(dtype, has_b, numel, offset):
    generator = torch.Generator().manual_seed(numel + offset)
    x_t, eps_a, eps_b, out = _cuda_inputs(numel, dtype, offset, generator)
    eps_b = eps_b if has_b else None
    for a_t, a_prev in ALPHA_PAIRS:
        out.fill_(float("nan"))
        result = cg.guided_ddim_step_cuda(x_t, eps_a, eps_b, 3.0, -2.02, a_t, a_prev, out=out)
        torch.cuda.synchronize()
        assert result.data_ptr() == out.data_ptr()
        assert torch.isfinite(out).all(), "an output element was not written"
        reference = ddim_reference(x_t.cpu(), eps_a.cpu(), eps_b.cpu() if has_b else None, 3.0, -2.02, a_t, a_prev)
        assert relative_error(out.cpu(), reference) < TOLERANCE[dtype]


@pytest.mark.gpu
def test_kernel_accepts_channels_last_and_strided_inputs():
    generator = torch.Generator().manual_seed(9)
    x_t, eps_a, eps_b = (torch.randn(3, 4, 9, 7, generator=generator).cuda() for _ in range(3))
    reference = ddim_reference(x_t.cpu(), eps_a.cpu(), eps_b.cpu(), 3.0, -2.02, 0.3, 0.4)
    channels_last = [t.contiguous(memory_format=torch.channels_last) for t in (x_t, eps_a, eps_b)]
    result = cg.guided_ddim_step_cuda(*channels_last, 3.0, -2.02, 0.3, 0.4)
    assert result.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(result.cpu(), reference) < 1e-6
    mixed = cg.guided_ddim_step_cuda(
        x_t, channels_last[1], eps_b.transpose(2, 3).contiguous().transpose(2, 3), 3.0, -2.02, 0.3, 0.4
    )
    assert relative_error(mixed.cpu(), reference) < 1e-6


@pytest.mark.gpu
def test_device_weights_variant_equals_scalar_variant_and_captures():
    generator = torch.Generator().manual_seed(5)
    x_t, eps_a, eps_b, out = _cuda_inputs(3 * 4 * 64 * 64 + 3, torch.float16, 0, generator)
    expected = cg.guided_ddim_step_cuda(x_t, eps_a, eps_b, 5.0, -4.0, 0.3, 0.4)
    table = cg.ddim_weights_table(5.0, -4.0, [0.3], [0.4], device="cuda")
    weights = table[0].clone()
    out.fill_(float("nan"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cg.guided_ddim_step_cuda_weights(x_t, eps_a, eps_b, weights, out)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, expected)


@pytest.mark.gpu
def test_gpu_kernel_equals_contract_reference():
    guidance_ddim = pytest.importorskip(
        "finextract.kernels.guidance_ddim", reason="finextract.kernels.guidance_ddim (issue 3) is not in the tree yet"
    )
    generator = torch.Generator().manual_seed(6)
    x_t, eps_a, eps_b, _ = _cuda_inputs(8 * 4 * 64 * 64 + 1, torch.float32, 0, generator)
    value = cg.guided_ddim_step_cuda(x_t, eps_a, eps_b, 3.0, -2.02, 0.3, 0.4)
    reference = guidance_ddim.guided_ddim_step(
        x_t.cpu(), eps_a.cpu(), eps_b.cpu(), 3.0, -2.02, 0.3, 0.4, impl="reference"
    )
    assert relative_error(value.cpu(), reference.double()) < 1e-6
    dispatched = guidance_ddim.guided_ddim_step(x_t, eps_a, eps_b, 3.0, -2.02, 0.3, 0.4)  # impl="auto" on CUDA
    assert torch.equal(dispatched, value)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_graphed_loop_on_gpu_equals_eager(dtype):
    from finextract.engine.cuda_graph import GraphedDDIMLoop

    _, timesteps, a_t, a_prev = _schedule(6)
    x_T = torch.randn(4, 4, 32, 32, generator=torch.Generator().manual_seed(7)).to("cuda", dtype)
    graphed = GraphedDDIMLoop(LinearBackend(), x_T.shape, timesteps, a_t, a_prev, dtype=dtype, device="cuda")
    eager = GraphedDDIMLoop(
        LinearBackend(),
        x_T.shape,
        timesteps,
        a_t,
        a_prev,
        dtype=dtype,
        device="cuda",
        use_graph=False,
        use_kernel=False,
    )
    first, second, reference = graphed.run(x_T), graphed.run(x_T), eager.run(x_T)
    assert graphed.mode == "graph"
    assert torch.equal(first, second)  # replays are deterministic and restart from x_T
    assert relative_error(first.float().cpu(), reference.double().cpu()) < TOLERANCE[dtype] * 10
