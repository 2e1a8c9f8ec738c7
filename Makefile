PYTHON ?= python3

.PHONY: install test bench lint cuda-check sanitize

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

# The CPU test suite under AddressSanitizer + UndefinedBehaviorSanitizer (TESTING.md). pyvae is built
# with PYVAE_SANITIZE=ON into a venv of its own, build/sanitize/venv, which sees the current
# environment's packages (torch, pytest, ...) through a .pth file but not its pyvae, so the normal
# build stays as it is. Python and torch are not instrumented: libasan is preloaded (it must come
# first), leak detection is off (CPython does not free everything at exit). The suite runs once per
# CPU kernel build in SAN_ARCHS (PYVAE_CPU_ARCH; a build the processor lacks falls back to the best
# one it has, which the banner line shows).
SAN_DIR := build/sanitize
SAN_PY := $(SAN_DIR)/venv/bin/python
SAN_ARCHS ?= avx512 avx2 base
SAN_PYTEST_ARGS ?= -q tests
SAN_ENV = LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libubsan.so)" \
  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:abort_on_error=1

sanitize:
	test -x $(SAN_PY) || $(PYTHON) -m venv --without-pip $(SAN_DIR)/venv
	$(PYTHON) -c 'import sysconfig; p = sysconfig.get_paths(); print(*dict.fromkeys([p["purelib"], p["platlib"]]), sep="\n")' > \
	  "$$($(SAN_PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_parent_env.pth"
	CXX=$(CXX) PYVAE_SANITIZE=ON PYVAE_CUDA=OFF $(SAN_PY) -m pip install -q --no-build-isolation --no-deps \
	  --force-reinstall --ignore-installed -Cbuild-dir=$(SAN_DIR)/cmake \
	  -Ccmake.build-type=RelWithDebInfo -Cinstall.strip=false .
	# Canary: an out-of-bounds write through the raw binding (5 rows, a 4-element output) must be
	# reported, or the runs below would prove nothing (the raw binding, past the gate's checks). A
	# TypeError in $(SAN_DIR)/canary.log means _C.gaussian_kl_fwd's arguments changed: update the call.
	! $(SAN_ENV) $(SAN_PY) -c 'import sys; sys.path.remove(""); import torch, pyvae; \
	  mu, out = torch.zeros(5, 3), torch.empty(4); p = mu.data_ptr(); \
	  pyvae._C.gaussian_kl_fwd(device=0, dtype=0, rows=5, cols=3, cols2=0, samples=1, a=p, a_mod=5, b=p, b_mod=5, \
	  c=0, c_mod=1, d=0, d_mod=1, grad_out=0, out=out.data_ptr(), grad_a=0, grad_b=0, grad_c=0, grad_d=0, stream=0, \
	  device_index=0)' \
	  > $(SAN_DIR)/canary.log 2>&1
	grep -q "AddressSanitizer: heap-buffer-overflow" $(SAN_DIR)/canary.log
	@echo "sanitize: canary overflow reported ($(SAN_DIR)/canary.log)"
	# pytest without the source tree (no compiled _C) on sys.path ahead of the installed package.
	set -e; for arch in $(SAN_ARCHS); do \
	  $(SAN_ENV) PYVAE_CPU_ARCH=$$arch $(SAN_PY) -c 'import os, sys; sys.path.remove(""); import pyvae; \
	    print("sanitize: PYVAE_CPU_ARCH=%s runs" % os.environ["PYVAE_CPU_ARCH"], pyvae._C.cpu_arch(), "from", pyvae._C.__file__)'; \
	  $(SAN_ENV) PYVAE_CPU_ARCH=$$arch $(SAN_PY) -c 'import sys; sys.path.remove(""); import pytest; sys.exit(pytest.main())' \
	    $(SAN_PYTEST_ARGS); \
	done
