"""Two cores, two ways to use them: one inference with two threads, or the batch split in two concurrent halves.

    python -m pytest bench/bench_streams.py -q --benchmark-enable --benchmark-json=bench/results/streams_pytest.json

FineXtract's exported step on the trained tiny zoo's DreamBooth pair, batch 16, wall-clock per
image-step, every way once per round in turn (side by side on a shared machine), median over rounds:
- onnxruntime: one session with 2 intra-op threads, against two sessions of 1 thread each running the
  two halves of the batch concurrently (Python threads; a session run releases the GIL);
- OpenVINO: one stream of 1 thread (the 1-thread reference), one stream of 2 threads, and two streams
  of 1 thread each (`OpenVINOBackend` with threads=2: what `--threads 2` runs).
Summary: `bench/results/streams.json`. `FINEXTRACT_BENCH_ROUNDS` (default 7).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

BATCH = 16
ROUNDS = int(os.environ.get("FINEXTRACT_BENCH_ROUNDS", "7"))


def _ways(tmp_path):
    import onnxruntime as ort
    import openvino as ov

    from finextract.engine.backends.openvino_backend import OpenVINOBackend
    from finextract.engine.backends.ort_backend import session_options
    from finextract.engine.conditioning import encode_conditioning
    from finextract.engine.config import RunConfig
    from finextract.engine.denoiser import GuidedDenoiser
    from finextract.engine.loading import load_model_pair
    from finextract.rules import rule_for
    from finextract.zoo.trained import default_zoo_folder

    zoo = default_zoo_folder()
    config = RunConfig.resolve(device="cpu", backend="openvino", threads=1, cache_dir=tmp_path)
    pair = load_model_pair(zoo / "base", zoo / "dreambooth").place(config)
    rule = rule_for("finextract", "dreambooth")
    denoiser = GuidedDenoiser(pair, rule)
    conditioning = encode_conditioning(pair, rule, (zoo / "caption.txt").read_text().strip())
    one = OpenVINOBackend(denoiser, conditioning, config)
    two = OpenVINOBackend(denoiser, conditioning, config.replace(threads=2))
    x_t = torch.randn(BATCH, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t, weights = torch.tensor([500.0]), torch.tensor([1.02, -0.3, 0.2])
    feeds = {"x_t": x_t.numpy(), "t": t.numpy(), "weights": weights.numpy()}
    feeds.update({name: tensor.numpy() for name, tensor in one._constants.items()})
    halves = [{**feeds, "x_t": part.numpy()} for part in x_t.split(BATCH // 2)]
    path = str(one.exported.path)
    ort_two_threads = ort.InferenceSession(path, session_options(2), providers=["CPUExecutionProvider"])
    ort_halves = [ort.InferenceSession(path, session_options(1), providers=["CPUExecutionProvider"]) for _ in halves]
    pool = ThreadPoolExecutor(2)
    core = ov.Core()
    model = core.read_model(path)
    model.reshape({"x_t": [BATCH, 4, 16, 16]})
    ov_two_threads = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": 2, "PERFORMANCE_HINT": "LATENCY"})
    ov_request = ov_two_threads.create_infer_request()
    return {
        "onnxruntime_1_session_2_threads": lambda: ort_two_threads.run(None, feeds),
        "onnxruntime_2_sessions_1_thread": lambda: list(
            pool.map(lambda pair_: pair_[0].run(None, pair_[1]), zip(ort_halves, halves))
        ),
        "openvino_1_stream_1_thread": lambda: one.step(x_t, t, weights),
        "openvino_1_stream_2_threads": lambda: ov_request.infer(feeds),
        "openvino_2_streams_1_thread": lambda: two.step(x_t, t, weights),
    }


def test_two_cores(benchmark, tmp_path):
    ways = _ways(tmp_path)
    for fn in ways.values():
        fn()
        fn()
    times = {name: [] for name in ways}

    def one_round():
        for name, fn in ways.items():
            started = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - started) / BATCH)

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    rows = {
        name: {
            "ms_per_image_step_median": round(statistics.median(v) * 1e3, 2),
            "min": round(min(v) * 1e3, 2),
            "max": round(max(v) * 1e3, 2),
        }
        for name, v in times.items()
    }
    reference = statistics.median(times["openvino_1_stream_1_thread"])
    for name, v in times.items():
        rows[name]["speedup_over_openvino_1_thread"] = round(reference / statistics.median(v), 2)
    report = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average_at_end": os.getloadavg()},
        "what": f"FineXtract step, trained tiny zoo DreamBooth pair, batch {BATCH}, wall clock per image-step",
        "rounds": ROUNDS,
        "results": rows,
    }
    benchmark.extra_info.update(rows)
    folder = Path(__file__).with_name("results")
    folder.mkdir(exist_ok=True)
    (folder / "streams.json").write_text(json.dumps(report, indent=2))
