"""`finextract bench` and the shared timing helpers of `finextract.benchmarking` (no timing asserts)."""

from __future__ import annotations

import json

import pytest

from finextract import benchmarking
from finextract.cli import main
from finextract.engine.config import AUTO_BACKENDS


def test_flop_and_mfu_arithmetic():
    assert benchmarking.tflop_per_image_eval((4, 64, 64)) == pytest.approx(0.89)
    assert benchmarking.tflop_per_image_eval((4, 32, 32)) == pytest.approx(0.89 / 4)
    # FineXtract, batch 8: 16 UNet image-evaluations per step; 0.1 s per step on a 790 TFLOP/s GPU
    assert benchmarking.model_flop_utilisation(0.1, 16, (4, 64, 64), 790.0) == pytest.approx(16 * 0.89 / 0.1 / 790)


def test_time_calls_warms_up_then_times():
    calls = []
    times = benchmarking.time_calls(lambda: calls.append(1), 3, warmup=2)
    assert len(calls) == 5 and len(times) == 3 and all(t >= 0 for t in times)
    with pytest.raises(ValueError, match="repeats=0"):
        benchmarking.time_calls(lambda: None, 0)


def test_peak_memory_on_cpu_is_process_rss():
    assert benchmarking.peak_memory_mib("cpu") > 10  # a Python process with torch holds far more than 10 MiB


def test_format_table_marks_missing_mfu():
    row = {
        "backend": "torch",
        "method": "finextract",
        "kind": "lora",
        "batch": 4,
        "mode": "eager",
        "step_ms": 12.5,
        "images_per_s": 6.4,
        "peak_mem_mib": 512.0,
    }
    table = benchmarking.format_table([row, {**row, "backend": "tensorrt", "mode": "graph", "mfu": 0.41}])
    lines = table.splitlines()
    assert len(lines) == 3 and "MFU" in lines[0]
    assert lines[1].split()[-1] == "-" and lines[2].split()[-1] == "0.410"
    assert "12.50" in lines[1] and "6.400" in lines[1]


def test_bench_command_zoo_two_backends_two_methods(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert (
        main(
            [
                "bench",
                "--zoo",
                "--backend",
                "torch",
                "auto",
                "--method",
                "finextract",
                "cfg",
                "--batch-size",
                "2",
                "--steps",
                "1",
                "--device",
                "cpu",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [(r["backend"], r["method"]) for r in rows] == [
        ("torch", "finextract"),
        ("torch", "cfg"),
        (AUTO_BACKENDS["cpu"], "finextract"),  # "auto" on a CPU
        (AUTO_BACKENDS["cpu"], "cfg"),
    ]
    for row in rows:
        assert row["kind"] == "dreambooth" and row["batch"] == 2 and row["dtype"] == "fp32" and row["mode"] == "eager"
        assert row["step_ms"] > 0 and row["images_per_s"] == pytest.approx(2 / (50 * row["step_ms"] / 1e3), rel=1e-2)
        assert row["peak_mem_kind"] == "process peak RSS" and "mfu" not in row
    assert rows[0]["forwards_per_step"] == 2 and rows[1]["forwards_per_step"] == 1  # DreamBooth pair vs CFG on 2B
    assert report["models"] == "zoo" and report["machine"]["threads"] >= 1
    table = capsys.readouterr().out
    assert AUTO_BACKENDS["cpu"] in table and "img/s (50 steps)" in table


def test_bench_command_lora_kind_and_errors(tmp_path, capsys):
    assert (
        main(
            [
                "bench",
                "--zoo",
                "--kind",
                "lora",
                "--backend",
                "torch",
                "--batch-size",
                "1",
                "3",
                "--steps",
                "1",
                "--device",
                "cpu",
                "--json",
                str(tmp_path / "b.json"),
            ]
        )
        == 0
    )
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [(r["kind"], r["batch"], r["forwards_per_step"]) for r in rows] == [("lora", 1, 1), ("lora", 3, 1)]
    capsys.readouterr()
    assert main(["bench", "--base", str(tmp_path), "--steps", "1"]) == 1
    assert "--base needs --finetuned or --lora" in capsys.readouterr().err
    assert main(["bench", "--zoo", "--device", "cpu", "--dtype", "fp16"]) == 1
    assert "needs a CUDA device" in capsys.readouterr().err
    assert main(["bench", "--zoo", "--device", "cpu", "--backend", "jax"]) == 1
    assert "expected auto or one of" in capsys.readouterr().err


def test_sd1_random_pair_shapes_on_cpu(tokenizer_dir):
    """The SD 1.x-size pair is built from config (no download); checked for shape, not speed."""
    pair = benchmarking.sd1_random_pair("lora", tokenizer_folder=tokenizer_dir)
    config = pair.base_unet.config
    assert tuple(config.block_out_channels) == (320, 640, 1280, 1280) and config.cross_attention_dim == 768
    parameters = sum(p.numel() for p in pair.base_unet.parameters())
    assert 855e6 < parameters < 865e6  # the SD 1.x UNet: 859.5 M parameters
    assert (
        pair.kind == "lora" and pair.finetuned_unet is None and len(pair.unet_lora) == 128
    )  # 16 transformer blocks x 2 attentions x 4
    assert pair.base_text_encoder.config.hidden_size == 768


def test_throughput_column_is_labelled_and_stays_aligned():
    rows = [
        {
            "backend": "torch",
            "method": "finextract",
            "kind": "lora",
            "batch": 2,
            "mode": "eager",
            "step_ms": 12.5,
            "images_per_s": 3.2,
            "peak_mem_mib": 100.0,
        }
    ]
    header, row = benchmarking.format_table(rows).split("\n")
    assert "img/s (50 steps)" in header and len(header) == len(row)
    assert header.index("img/s (50 steps)") + len("img/s (50 steps)") == row.index("3.200") + len("3.200")
    assert header.index("peak MiB") + len("peak MiB") == row.index("100") + len("100")


def test_random_flux_transformer_runs_as_the_gpu_benchmark_builds_it():
    """bench_gpu.py's FLUX.1-size transformer, at the tiny zoo's widths on the CPU: allocated once in the asked
    dtype, its parameters drawn as documented, a forward on `flux_forward_inputs` gives finite packed latents."""
    import torch

    from finextract.zoo.configs import TINY_FLUX_TRANSFORMER_CONFIG

    config = dict(TINY_FLUX_TRANSFORMER_CONFIG, _class_name="FluxTransformer2DModel")
    model = benchmarking.random_flow_transformer(config, dtype=torch.bfloat16, seed=1)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and not any(
        p.requires_grad for p in model.parameters()
    )
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    assert biases and all(torch.count_nonzero(b) == 0 for b in biases)
    weight = model.x_embedder.weight.float()
    assert abs(weight.std().item() - 0.02) < 0.005  # 64 x 32 draws of N(0, 0.02): std within 25 %
    inputs = benchmarking.flux_forward_inputs(config, (16, 16), 2, text_tokens=7, dtype=torch.bfloat16)
    assert inputs["img_ids"][9].tolist() == [0.0, 1.0, 1.0]  # token 9 of an 8 x 8 grid: row 1, column 1
    with torch.no_grad():
        (out,) = model(**inputs)
    assert out.shape == (2, 64, 64) and torch.isfinite(out.float()).all()
