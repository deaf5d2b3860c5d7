"""CPU benchmark of the backends on the tiny models: torch vs onnxruntime (vs the plain diffusers way).

    python bench/bench_backends.py [--batch 64] [--steps 10] [--out bench/results/backends.json]

For FineXtract on a DreamBooth pair and on a LoRA pair, and CFG on the DreamBooth pair, each backend
runs `--steps` guided DDIM steps (backend.predict + guided_ddim_step) on a batch of `--batch` latents
after warm-up. Reported per configuration: median step latency, images/s for a 50-step run
(UNet work only: batch / (50 x step latency)), and peak RSS. Each configuration runs in its own
process, so peak RSS is that configuration's alone. `bench/baseline.py` (the plain diffusers way:
two pipelines, two sequential UNet calls per step, batch 5, fp32) is measured in the same run when
it exists; otherwise the JSON says it was missing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [  # (method, kind)
    ("finextract", "dreambooth"),
    ("finextract", "lora"),
    ("cfg", "dreambooth"),
]
BACKENDS = ("torch", "onnxruntime")
STEPS_PER_IMAGE = 50


def _pair(kind: str, zoo: Path):
    from finextract.engine.loading import load_model_pair

    if kind == "dreambooth":
        return load_model_pair(zoo / "base", zoo / "dreambooth")
    return load_model_pair(zoo / "base", lora=zoo / "lora" / "pytorch_lora_weights.safetensors")


def run_one(backend_name: str, method: str, kind: str, batch: int, steps: int, zoo: Path, cache: Path) -> dict:
    """Time `steps` guided DDIM steps of one configuration in this process; return its figures."""
    import torch

    from finextract.engine.backends import get_backend_factory
    from finextract.kernels.guidance_ddim import guided_ddim_step
    from finextract.rules import rule_for
    from finextract.runtime import set_threads
    from finextract.sampling import ddim_schedule, encode_text, make_scheduler

    threads = set_threads()
    pair = _pair(kind, zoo)
    rule = rule_for(method, pair.kind)
    embeddings = encode_text(pair, rule, "a photo of sks dog")
    options = {"cache_dir": cache} if backend_name == "onnxruntime" else {}
    started = time.perf_counter()
    backend = get_backend_factory(backend_name)(pair, rule, embeddings, **options)
    setup_s = time.perf_counter() - started
    schedule = ddim_schedule(make_scheduler(pair.scheduler_config, STEPS_PER_IMAGE))
    x_t = torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    times = []
    with torch.inference_mode():
        for index in range(steps + 2):  # two warm-up steps
            t, alpha_prod_t, alpha_prod_t_prev = schedule[index % len(schedule)]
            began = time.perf_counter()
            prediction = backend.predict(x_t, torch.tensor(t))
            x_t = guided_ddim_step(x_t, prediction.eps_a, prediction.eps_b, prediction.coef_a, prediction.coef_b,
                                   alpha_prod_t, alpha_prod_t_prev)
            if index >= 2:
                times.append(time.perf_counter() - began)
    step_s = statistics.median(times)
    return {
        "backend": backend_name, "method": method, "kind": kind, "batch": batch, "threads": threads,
        "step_latency_s": round(step_s, 5), "step_latency_min_s": round(min(times), 5),
        "images_per_s": round(batch / (STEPS_PER_IMAGE * step_s), 3), "setup_s": round(setup_s, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def run_baseline(method: str, kind: str, zoo: Path) -> dict | None:
    """The plain diffusers way from bench/baseline.py, when that file exists (issue 3 writes it)."""
    if not (ROOT / "bench" / "baseline.py").is_file():
        return None
    sys.path.insert(0, str(ROOT / "bench"))
    import baseline  # noqa: E402  (bench/baseline.py)

    return baseline.measure(method=method, kind=kind, zoo=zoo, num_images=5)  # one batch of 5, 50 steps


def _subprocess(args: list[str]) -> dict:
    output = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(output.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration (after 2 warm-up)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "backends.json")
    parser.add_argument("--one", nargs=3, metavar=("BACKEND", "METHOD", "KIND"), help=argparse.SUPPRESS)
    parser.add_argument("--baseline", nargs=2, metavar=("METHOD", "KIND"), help=argparse.SUPPRESS)
    parser.add_argument("--zoo", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("FINEXTRACT_THREADS", "2")
    if args.one:  # child process: one configuration, one JSON line
        print(json.dumps(run_one(*args.one, args.batch, args.steps, args.zoo, args.cache)))
        return 0
    if args.baseline:
        print(json.dumps(run_baseline(*args.baseline, args.zoo)))
        return 0

    from finextract.zoo import build_zoo

    with tempfile.TemporaryDirectory() as scratch:
        zoo, cache = build_zoo(Path(scratch) / "zoo"), Path(scratch) / "onnx"
        common = ["--batch", str(args.batch), "--steps", str(args.steps), "--zoo", str(zoo), "--cache", str(cache)]
        results, baselines = [], []
        for method, kind in CONFIGS:
            for backend in BACKENDS:
                results.append(_subprocess(["--one", backend, method, kind, *common]))
                print(json.dumps(results[-1]), file=sys.stderr)
            baseline = _subprocess(["--baseline", method, kind, "--zoo", str(zoo)])
            if baseline is not None:
                baselines.append({"method": method, "kind": kind, **baseline})
    speedups = {}
    for method, kind in CONFIGS:
        by = {r["backend"]: r for r in results if (r["method"], r["kind"]) == (method, kind)}
        speedups[f"{method}/{kind}"] = round(by["onnxruntime"]["images_per_s"] / by["torch"]["images_per_s"], 2)
        for baseline in baselines:
            if (baseline["method"], baseline["kind"]) == (method, kind):
                for name, result in by.items():
                    result["over_baseline"] = round(result["images_per_s"] / baseline["images_per_s"], 2)
    report = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "threads": os.environ["FINEXTRACT_THREADS"], "python": platform.python_version()},
        "models": "tiny (UNet 16x16x4 latents, ~1 M parameters), fp32, CPU",
        "images_per_s_note": f"batch / ({STEPS_PER_IMAGE} x median step latency): UNet + DDIM update only; "
                              "the baseline's figure is end to end (text encoding and VAE decode included)",
        "results": results,
        "onnxruntime_over_torch": speedups,
        "baseline": baselines or "bench/baseline.py missing at run time: torch vs onnxruntime only",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"{'config':<24}{'backend':<13}{'step s':>9}{'img/s':>9}{'RSS MiB':>9}")
    for r in results:
        print(f"{r['method'] + '/' + r['kind']:<24}{r['backend']:<13}{r['step_latency_s']:>9.4f}"
              f"{r['images_per_s']:>9.2f}{r['peak_rss_mib']:>9.0f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
