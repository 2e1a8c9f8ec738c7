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

# Compile the CUDA kernels (sm_80, sm_90, warnings as errors) without installing.
cuda-check:
	cmake -S . -B build/cuda-check -DPYVAE_CUDA=ON -Dpybind11_DIR=$$($(PYTHON) -m pybind11 --cmakedir)
	cmake --build build/cuda-check -j 2

lint:
	$(PYTHON) -m ruff check pyvae tests bench
