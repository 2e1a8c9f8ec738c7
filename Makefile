PYTHON ?= python3

.PHONY: install test bench lint cuda-check

install:
	$(PYTHON) -m pip install .

# The test command of README.md and .ci/run.
test:
	pytest -q tests

bench:
	$(PYTHON) bench/bench_elbo.py --malloc both
	$(PYTHON) bench/bench_mlp.py
	$(PYTHON) bench/bench_gemm.py

# Compile the CUDA kernels (sm_80, sm_90, warnings as errors) without installing; with
# PYVAE_CUBLASLT_INCLUDE=<dir of cublasLt.h> the cuBLASLt path too (CONTRIBUTING.md, "Build flags").
cuda-check:
	cmake -S . -B build/cuda-check -DPYVAE_CUDA=ON -Dpybind11_DIR=$$($(PYTHON) -m pybind11 --cmakedir) \
	  $(if $(PYVAE_CUBLASLT_INCLUDE),-DPYVAE_CUBLASLT=ON -DPYVAE_CUBLASLT_INCLUDE=$(PYVAE_CUBLASLT_INCLUDE))
	cmake --build build/cuda-check -j 2

lint:
	$(PYTHON) -m ruff check pyvae tests bench
