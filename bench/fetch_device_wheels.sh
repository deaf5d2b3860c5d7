#!/usr/bin/env bash
# Put the pure-Python wheels that the offline GPU machine lacks under .whl/ (git-ignored), for
# bench/device_check.sh to install there. Run here, where PyPI is reachable:
#
#     bash bench/fetch_device_wheels.sh          # then carry ".whl" with the device call
#
# The GPU image (Python 3.12) has torch, CuPy, transformers, huggingface-hub, safetensors, scipy,
# pytest and pytest-benchmark, numba and xxhash, but not diffusers nor diffusers' importlib_metadata.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
DIFFUSERS_VERSION="$("$PY" -c 'import diffusers; print(diffusers.__version__)')"
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -f .whl/*.whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "diffusers==${DIFFUSERS_VERSION}" importlib_metadata
ls -1 .whl; du -sh .whl
