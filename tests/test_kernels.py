"""The fused guidance + DDIM kernel: its source compiles, its loader's logic, and (GPU) its numbers.

CPU tests cover everything that runs without a GPU: nvcc / NVRTC compilation of the .cu, the dispatch
table, the source hash, the vectorisation plan (every element covered once), argument checks and the
torch reference's dispatcher. GPU tests compare the kernel with the torch reference on odd sizes and
unaligned pointers, with the weights row read from device memory (as the graphed DDIM loop feeds it).
The table's weights themselves are checked against diffusers in tests/test_ddim.py.
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

from finextract.kernels import cuda_guidance as cg
from finextract.kernels.guidance_ddim import guided_update, guided_update_reference
from tests import tolerances

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# weights rows (w_x, w_a, w_b) of the SD 1.x table for FineXtract DreamBooth at early, middle and late steps
ROWS = [(1.0631, 3.1788, -2.1406), (1.1416, -0.1512, 0.1018), (1.0004, -0.0203, 0.0137)]


# history weights (w_h1, w_h2) of multistep rows (DPM-Solver++ 2M / UniPC magnitudes)
HISTORY_WEIGHTS = (-0.4137, 0.0921)


def reference_update(x_t, out_a, out_b, row, history=()):
    """The update in float64: the exact value both float32 implementations round."""
    w_x, w_a, w_b = row[:3]
    value = w_x * x_t.double() + w_a * out_a.double() + (w_b * out_b.double() if out_b is not None else 0.0)
    for w_h, h in zip(row[3:], history):
        value = value + w_h * h.double()
    return value


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
            for history in (0, 1, 2):
                assert f"'{cg.kernel_name(dtype, has_b, history)}'" in report
    assert report.count("0 bytes stack frame") == 18, report  # nothing spilled to local memory
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
    w = torch.zeros(3)
    with pytest.raises(ValueError, match="output_a has shape"):
        cg.check_inputs(x, torch.zeros(2, 4, 3, 4), None, None, w)
    with pytest.raises(ValueError, match=r"output_b is torch\.float16"):
        cg.check_inputs(x, x.clone(), x.half(), None, w)
    with pytest.raises(ValueError, match="needs CUDA tensors"):  # strided inputs pass (made dense later)
        cg.check_inputs(x, x.transpose(2, 3), None, None, w)
    with pytest.raises(ValueError, match="laid out like x_t"):
        cg.check_inputs(x, x.clone(), None, torch.empty_like(x).transpose(2, 3), w)
    with pytest.raises(ValueError, match="float64"):
        cg.check_inputs(x.double(), x.double(), None, None, w)
    with pytest.raises(TypeError, match=r"output_a must be a torch\.Tensor"):
        cg.check_inputs(x, [1.0], None, None, w)
    with pytest.raises(ValueError, match="out overlaps x_t"):
        cg.check_inputs(x, x.clone(), None, x, w)
    with pytest.raises(ValueError, match="weights must be"):
        cg.check_inputs(x, x.clone(), None, torch.empty_like(x), torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="4 elements"):  # one history tensor: 3 + 1 weights
        cg.check_inputs(x, x.clone(), None, torch.empty_like(x), torch.zeros(3), history=(x.clone(),))
    with pytest.raises(ValueError, match=r"history\[0\] has shape"):
        cg.check_inputs(x, x.clone(), None, None, torch.zeros(4), history=(x[:1].clone(),))
    with pytest.raises(ValueError, match="0, 1 or 2"):
        cg.kernel_name(torch.float32, True, 3)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        cg.guided_update_cuda(x, x.clone(), x.clone(), w)


def test_dispatcher_uses_the_reference_on_a_cpu_and_validates():
    generator = torch.Generator().manual_seed(2)
    x_t, out_a, out_b = (torch.randn(3, 4, 7, 5, generator=generator) for _ in range(3))
    for row in ROWS:
        weights = torch.tensor(row)
        value = guided_update(x_t, out_a, out_b, weights)  # impl="auto" on CPU tensors: the reference
        assert torch.equal(value, guided_update_reference(x_t, out_a, out_b, weights))
        # float32: each term rounded at most 3 times (product, two sums; inputs are float32 already)
        bound = tolerances.elementwise(row[0] * x_t, row[1] * out_a, row[2] * out_b, operations=3)
        assert ((value.double() - reference_update(x_t, out_a, out_b, row)).abs() <= bound).all()
    one_term = guided_update(x_t, out_a, None, torch.tensor(ROWS[0]))
    assert torch.allclose(one_term, ROWS[0][0] * x_t + ROWS[0][1] * out_a)  # w_b is unused
    half = guided_update(x_t.bfloat16(), out_a.bfloat16(), None, torch.tensor(ROWS[1]))
    assert half.dtype == torch.bfloat16 and half.shape == x_t.shape
    with pytest.raises(ValueError, match="one shape"):
        guided_update(x_t, out_a[:1], None, torch.tensor(ROWS[0]))
    with pytest.raises(ValueError, match="weights has 2 elements"):
        guided_update(x_t, out_a, None, torch.zeros(2))
    with pytest.raises(ValueError, match="weights has 3 elements; expected 3 \\+ 1"):
        guided_update(x_t, out_a, None, torch.zeros(3), history=(x_t,))
    with pytest.raises(ValueError, match="at most 2"):
        guided_update(x_t, out_a, None, torch.zeros(6), history=(x_t,) * 3)
    with pytest.raises(ValueError, match="one shape"):
        guided_update(x_t, out_a, None, torch.zeros(4), history=(x_t[:1],))
    with pytest.raises(ValueError, match="impl"):
        guided_update(x_t, out_a, None, torch.zeros(3), impl="triton")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        guided_update(x_t, out_a, None, torch.zeros(3), impl="cuda")


@pytest.mark.parametrize("history", [1, 2])
@pytest.mark.parametrize("has_b", [True, False])
def test_reference_adds_the_history_columns(history, has_b):
    """The history column(s): `w_h1 * h_1 (+ w_h2 * h_2)` added to the DDIM terms, in float32 (one more
    product and sum per history tensor: 3 + 2K roundings per term at most), in x_t's dtype."""
    generator = torch.Generator().manual_seed(4)
    x_t, out_a, out_b, h1, h2 = (torch.randn(2, 4, 5, 3, generator=generator) for _ in range(5))
    out_b = out_b if has_b else None
    past = (h1, h2)[:history]
    for row in ROWS:
        full = (*row, *HISTORY_WEIGHTS[:history])
        value = guided_update(x_t, out_a, out_b, torch.tensor(full), history=past)
        assert torch.equal(value, guided_update_reference(x_t, out_a, out_b, torch.tensor(full), past))
        exact = reference_update(x_t, out_a, out_b, full, past)
        terms = [full[0] * x_t, full[1] * out_a] + ([full[2] * out_b] if has_b else [])
        terms += [w * h for w, h in zip(full[3:], past)]
        bound = tolerances.elementwise(*terms, operations=3 + 2 * history)
        assert ((value.double() - exact).abs() <= bound).all()
        # the history column changes the result by exactly its term (to rounding): not ignored
        without = guided_update_reference(x_t, out_a, out_b, torch.tensor(row))
        assert ((value - without).double() - sum(w * h.double() for w, h in zip(full[3:], past))).abs().max() < 1e-5
    assert guided_update(x_t.half(), out_a.half(), None, torch.tensor((*ROWS[0], 0.5)), history=(h1.half(),)).dtype == (
        torch.float16
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("history", [1, 2])
@pytest.mark.parametrize("numel, offset", [(7, 1), (4 * 4 * 33 * 17 + 5, 3), (2 * 4 * 64 * 64, 0)])
def test_kernel_with_history_equals_reference_on_gpu(dtype, history, numel, offset):
    generator = torch.Generator().manual_seed(numel + history)
    x_t, out_a, out_b, out = _cuda_inputs(numel, dtype, offset, generator)
    h1, h2, _, _ = _cuda_inputs(numel, dtype, offset, generator)
    past = (h1, h2)[:history]
    for has_b in (True, False):
        b = out_b if has_b else None
        full = (*ROWS[0], *HISTORY_WEIGHTS[:history])
        out.fill_(float("nan"))
        cg.guided_update_cuda(x_t, out_a, b, torch.tensor(full, device="cuda"), out=out, history=past)
        torch.cuda.synchronize()
        inputs = [v.cpu() if v is not None else None for v in (x_t, out_a, b)]
        cpu_past = tuple(h.cpu() for h in past)
        exact = reference_update(*inputs, full, cpu_past)
        magnitude = sum(abs(w) * v.double().abs() for w, v in zip(full, [*inputs, *cpu_past]) if v is not None)
        bound = (RELATIVE_BOUND[dtype] + (3 + 2 * history) * tolerances.U) * magnitude + 1e-30
        assert ((out.cpu().double() - exact).abs() <= bound).all()
        via_dispatch = guided_update(x_t, out_a, b, torch.tensor(full, device="cuda"), history=past)
        assert torch.equal(via_dispatch, out)  # impl="auto" on CUDA runs the same kernel


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
    code = "import sys, finextract.kernels.cuda_guidance, finextract.engine.ddim; print('cupy' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# --------------------------------------------------------------------------------- GPU tests --


def _cuda_inputs(numel, dtype, offset, generator):
    """Three inputs and a NaN-filled output of `numel` elements starting `offset` elements into their buffers."""

    def buffer():
        storage = torch.randn(numel + offset, generator=generator, dtype=torch.float32).to("cuda", dtype)
        return storage[offset:]

    out_storage = torch.full((numel + offset,), float("nan"), device="cuda", dtype=dtype)
    return buffer(), buffer(), buffer(), out_storage[offset:]


# float32 storage: the kernel's 3 FMA-style roundings; fp16 / bf16 storage: one rounding of the result to
# 11 / 8 significant bits (2^-11, 2^-8 relative) dominates
RELATIVE_BOUND = {torch.float32: 3 * tolerances.U, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def _bound(dtype, x_t, out_a, out_b, row):
    """Per-element bound: the storage rounding of the result plus float32 arithmetic on the terms."""
    terms = [row[0] * x_t.double().abs(), row[1] * out_a.double().abs()]
    if out_b is not None:
        terms.append(row[2] * out_b.double().abs())
    magnitude = sum(abs(term) for term in terms)
    return (RELATIVE_BOUND[dtype] + 3 * tolerances.U) * magnitude + 1e-30


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("has_b", [True, False])
@pytest.mark.parametrize("numel, offset", [(1, 0), (7, 1), (1001, 0), (4 * 4 * 33 * 17 + 5, 3), (2 * 4 * 64 * 64, 0)])
def test_kernel_equals_reference_on_gpu(dtype, has_b, numel, offset):
    generator = torch.Generator().manual_seed(numel + offset)
    x_t, out_a, out_b, out = _cuda_inputs(numel, dtype, offset, generator)
    out_b = out_b if has_b else None
    for row in ROWS:
        weights = torch.tensor(row, device="cuda")
        out.fill_(float("nan"))
        result = cg.guided_update_cuda(x_t, out_a, out_b, weights, out=out)
        torch.cuda.synchronize()
        assert result.data_ptr() == out.data_ptr()
        assert torch.isfinite(out).all(), "an output element was not written"
        inputs = [v.cpu() if v is not None else None for v in (x_t, out_a, out_b)]
        exact = reference_update(*inputs, row)
        assert ((out.cpu().double() - exact).abs() <= _bound(dtype, *inputs, row)).all()


@pytest.mark.gpu
def test_kernel_accepts_channels_last_and_strided_inputs():
    generator = torch.Generator().manual_seed(9)
    x_t, out_a, out_b = (torch.randn(3, 4, 9, 7, generator=generator).cuda() for _ in range(3))
    weights = torch.tensor(ROWS[0], device="cuda")
    expected = guided_update_reference(x_t, out_a, out_b, weights)
    channels_last = [t.contiguous(memory_format=torch.channels_last) for t in (x_t, out_a, out_b)]
    result = cg.guided_update_cuda(*channels_last, weights)
    assert result.is_contiguous(memory_format=torch.channels_last)
    bound = _bound(torch.float32, x_t.cpu(), out_a.cpu(), out_b.cpu(), ROWS[0]).to("cuda")
    assert ((result.double() - expected.double()).abs() <= bound).all()
    mixed = cg.guided_update_cuda(x_t, channels_last[1], out_b.transpose(2, 3).contiguous().transpose(2, 3), weights)
    assert ((mixed.double() - expected.double()).abs() <= bound).all()


@pytest.mark.gpu
def test_kernel_reads_the_weights_row_on_the_device_inside_a_graph():
    """One captured kernel serves every step: the row copied into its weights buffer before each replay."""
    generator = torch.Generator().manual_seed(5)
    x_t, out_a, out_b, out = _cuda_inputs(3 * 4 * 64 * 64 + 3, torch.float16, 0, generator)
    table = torch.tensor(ROWS, device="cuda")
    weights = table[0].clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cg.guided_update_cuda(x_t, out_a, out_b, weights, out=out)
    for index in range(len(ROWS)):
        weights.copy_(table[index])
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, cg.guided_update_cuda(x_t, out_a, out_b, table[index]))


@pytest.mark.gpu
def test_dispatcher_runs_the_kernel_on_cuda():
    generator = torch.Generator().manual_seed(6)
    x_t, out_a, out_b, _ = _cuda_inputs(8 * 4 * 64 * 64 + 1, torch.float32, 0, generator)
    weights = torch.tensor(ROWS[1], device="cuda")
    kernel = cg.guided_update_cuda(x_t, out_a, out_b, weights)
    assert torch.equal(guided_update(x_t, out_a, out_b, weights), kernel)  # impl="auto" on CUDA: the kernel
    reference = guided_update(x_t, out_a, out_b, weights, impl="reference")
    bound = _bound(torch.float32, x_t.cpu(), out_a.cpu(), out_b.cpu(), ROWS[1]).to("cuda")
    assert ((kernel.double() - reference.double()).abs() <= 2 * bound).all()
