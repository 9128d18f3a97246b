# fastmaskformer: `make train` and `make test` set everything up on a fresh machine, then run.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

# torch's guess of CUDA_HOME from the nvcc wrapper on PATH is wrong: point it at the toolkit.
ifeq ($(origin CUDA_HOME), undefined)
  ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
    export CUDA_HOME := /usr/local/cuda
  endif
endif
export MAX_JOBS ?= 2
export TORCH_CUDA_ARCH_LIST ?= 9.0
PYTEST_WORKERS ?= 2

CSRC := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' 2>/dev/null)

.PHONY: all install build train test bench clean

all: test

# The virtual env with torch (a CUDA 13.0 build that also runs on the CPU) and the dev tools.
$(VENV)/.installed.stamp: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q ninja
	FASTMASKFORMER_NO_EXT=1 $(PIP) install -q --no-build-isolation -e '.[dev,lapjv]'
	touch $@

install: $(VENV)/.installed.stamp

# Rebuild fastmaskformer._C in place whenever a C++/CUDA source changes. flock keeps two builds
# from writing the same objects at once.
# The compiler lines go to build/build.log; its tail is shown if the build fails.
.build.stamp: $(VENV)/.installed.stamp $(CSRC) setup.py build_config.py
	@mkdir -p build
	@echo "building fastmaskformer._C (CUDA_HOME=$(CUDA_HOME) TORCH_CUDA_ARCH_LIST=$(TORCH_CUDA_ARCH_LIST) MAX_JOBS=$(MAX_JOBS))"
	@flock .build.lock $(PY) setup.py -q build_ext --inplace > build/build.log 2>&1 \
		|| { grep -E -A3 "error|FAILED" build/build.log | head -n 60; echo "build failed: full log in build/build.log"; exit 1; }
	@grep -h "^fastmaskformer:" build/build.log || true
	touch $@

build: .build.stamp

train: build
	$(PY) -m fastmaskformer.train $(ARGS)

test: build
	$(PY) -m pytest tests -n $(PYTEST_WORKERS) $(ARGS)

bench: build
	$(PY) -m pytest benchmarks --benchmark-only $(ARGS)

clean:
	rm -rf build .build.stamp fastmaskformer/*.so
