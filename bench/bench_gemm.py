"""Runs the gemm benchmark: see pyvae/benchmarks/gemm.py (the same as `pyvae bench gemm`)."""
from pyvae.benchmarks.gemm import main

if __name__ == "__main__":
    main()
