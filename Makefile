# Two commands do all the set-up: `make demo` and `make test`. Each creates .venv when it is
# missing, installs what is needed and builds the extension; a second run redoes nothing that is
# up to date.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch from this machine's disk is a CPU build; override, e.g. TORCH_SPEC="torch==2.5.1".
TORCH_SPEC ?= torch==2.13.0
export MAX_JOBS ?= 2

EXTENSION_SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cpp csrc/cuda/*.h csrc/cuda/*.cuh) setup.py

.PHONY: install build demo test lint bench clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" numpy pybind11 ninja setuptools wheel tqdm matplotlib \
		triton pytest pytest-benchmark ruff
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.installed

# The extension is built in place; rebuilt only when a C++/CUDA source changes.
$(VENV)/.built: $(VENV)/.installed $(EXTENSION_SOURCES)
	$(PY) setup.py --quiet build_ext --inplace
	touch $@

build: $(VENV)/.built

demo: build
	$(PY) -m rdn_kernels.demo

test: build
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

bench: build
	$(PY) -m benchmarks.bench_nested_conv_cpu

clean:
	rm -rf build rdn_kernels/*.so $(VENV)/.built
