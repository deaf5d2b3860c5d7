#!/usr/bin/env bash
# The GPU check, in one script for an offline CUDA machine with torch, CuPy and onnxruntime (no
# TensorRT, no internet): installs what was carried, runs every `gpu`-marked test and the GPU
# benchmarks (bench/bench_gpu.py) in under 8 minutes, writes JSON and logs under $OUT (or
# bench/results/ when OUT is unset) and prints a short summary table last.
#
#   here (PyPI reachable):   bash bench/fetch_device_wheels.sh     # diffusers etc. into .whl/
#   on the GPU machine:      bash bench/device_check.sh            # carry .whl with the tree
#
# Environment: PYTHON (default python3), TEST_TIMEOUT / BENCH_TIMEOUT / E2E_TIMEOUT in seconds (150 / 220 / 90),
# FINEXTRACT_BENCH_BATCHES (8,16,32), FINEXTRACT_BENCH_ROUNDS (5), FINEXTRACT_PEAK_TFLOPS (790),
# FINEXTRACT_SKIP_INSTALL=1 (use the finextract already installed, e.g. a dry run on a CPU machine).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
RESULTS="${OUT:-bench/results}"
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 FINEXTRACT_BENCH_OUT="$RESULTS" FINEXTRACT_THREADS="${FINEXTRACT_THREADS:-8}"
started=$(date +%s)

# 1. carried wheels (pure Python) into a private folder; the machine cannot reach a registry
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/finextract-site .whl/*.whl \
        && export PYTHONPATH="/tmp/finextract-site${PYTHONPATH:+:$PYTHONPATH}"
fi
# 2. the project itself, without dependencies; if pip cannot build it, a link tree with the same layout
if [ -n "${FINEXTRACT_SKIP_INSTALL:-}" ]; then
    echo "FINEXTRACT_SKIP_INSTALL set: using the installed finextract" >"$RESULTS/install.log"
elif ! "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$RESULTS/install.log" 2>&1; then
    mkdir -p /tmp/finextract-src && rm -rf /tmp/finextract-src/finextract && cp -r finextract /tmp/finextract-src/
    ln -sfn "$PWD/engine" /tmp/finextract-src/finextract/engine
    ln -sfn "$PWD/kernels" /tmp/finextract-src/finextract/kernels
    export PYTHONPATH="/tmp/finextract-src:${PYTHONPATH:-}"
    echo "pip install -e . failed (see install.log); using a link tree on PYTHONPATH" | tee -a "$RESULTS/install.log"
fi

# 3. the machine, for the record
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    "$PY" - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
for name in ("cupy", "diffusers", "transformers", "onnxruntime", "tensorrt", "finextract"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as error:
        print(name, "MISSING", type(error).__name__, error)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", round(p.total_memory / 2**30, 1), "GiB")
EOF
} >"$RESULTS/env.txt" 2>&1
cat "$RESULTS/env.txt"

# 4. every gpu-marked test (the kernel's, the engine's, any other engineer's)
timeout "${TEST_TIMEOUT:-150}" "$PY" -m pytest -q -m gpu tests -p no:cacheprovider --junitxml="$RESULTS/gpu_tests.xml" \
    >"$RESULTS/gpu_tests.log" 2>&1
tests_rc=$?
tail -n 25 "$RESULTS/gpu_tests.log"

# 5. GPU benchmarks (pytest-benchmark JSON + gpu_summary.json written by bench_gpu.py)
timeout "${BENCH_TIMEOUT:-220}" "$PY" -m pytest -q bench/bench_gpu.py -p no:cacheprovider --benchmark-enable \
    --benchmark-json="$RESULTS/bench_gpu.json" --benchmark-columns=median,min,max,rounds >"$RESULTS/bench_gpu.log" 2>&1
bench_rc=$?
tail -n 30 "$RESULTS/bench_gpu.log"

# 6. end to end on the trained tiny zoo (text, 50 steps, decode, SSCD, clustering): the torch backend
#    against the plain diffusers way, both on the GPU (bench/bench_e2e.py; e2e_gpu.json)
if "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    FINEXTRACT_BENCH_DEVICE=cuda FINEXTRACT_BENCH_IMAGES=16 FINEXTRACT_BENCH_ROUNDS=2 timeout "${E2E_TIMEOUT:-90}" \
        "$PY" -m pytest -q bench/bench_e2e.py -k trained -p no:cacheprovider --benchmark-enable \
        --benchmark-json="$RESULTS/bench_e2e_gpu.json" >"$RESULTS/bench_e2e_gpu.log" 2>&1
    e2e_rc=$?
    tail -n 5 "$RESULTS/bench_e2e_gpu.log"
else
    echo "no CUDA device: skipping the GPU end-to-end benchmark" | tee "$RESULTS/bench_e2e_gpu.log"
    e2e_rc=0
fi

# 7. summary table, last
"$PY" - "$RESULTS" "$tests_rc" "$bench_rc" "$(( $(date +%s) - started ))" <<'EOF' | tee "$RESULTS/summary.txt"
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
results, tests_rc, bench_rc, seconds = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
try:
    suite = ET.parse(results / "gpu_tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total, failures, errors, skipped = (int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped"))
    print(f"gpu tests: {total - failures - errors - skipped} passed, {failures} failed, {errors} errors, "
          f"{skipped} skipped (pytest rc {tests_rc})")
except Exception as error:
    print(f"gpu tests: no report ({error}); pytest rc {tests_rc}")
try:
    e2e = json.loads((results / "e2e_gpu.json").read_text())
    for row in e2e["results"]:
        ways = row["ways"]
        ours = ways.get("torch", {})
        print(f"e2e {row['zoo']} {row['kind']}: diffusers {ways['diffusers']['wall_s']['median']} s, torch "
              f"{ours.get('wall_s', {}).get('median')} s, x{ours.get('speedup_wall', {}).get('median')} "
              f"(range {ours.get('speedup_wall', {}).get('min')}-{ours.get('speedup_wall', {}).get('max')}), "
              f"max pixel diff {ours.get('max_pixel_diff')}, same extraction {ours.get('same_extraction')}")
except Exception as error:
    print(f"e2e: no e2e_gpu.json ({error})")
try:
    summary = json.loads((results / "gpu_summary.json").read_text())
except Exception as error:
    print(f"benchmarks: no summary ({error}); pytest rc {bench_rc}")
    sys.exit(0)
print(f"benchmarks on {summary['device']} (torch {summary['torch']}), pytest rc {bench_rc}, total {seconds} s")
print(f"{'config':<22}{'mode':>7}{'step ms':>9}{'img/s':>8}{'s/img':>7}{'MFU':>6}{'peak GB':>9}")
for name, row in summary["results"].items():
    if "step_ms" in row:
        print(f"{name:<22}{row.get('mode', ''):>7}{row['step_ms']:>9.1f}{row['images_per_s']:>8.2f}"
              f"{row['s_per_image']:>7.3f}{row['mfu']:>6.2f}{row['peak_gb']:>9.2f}")
for name, row in summary["results"].items():
    if "step_ms" not in row:
        print(name, " ".join(f"{key}={value}" for key, value in row.items()))
EOF
exit $(( tests_rc != 0 || bench_rc != 0 || e2e_rc != 0 ))
