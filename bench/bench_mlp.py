"""Runs the mlp benchmark: see pyvae/benchmarks/mlp.py (the same as `pyvae bench mlp`)."""
from pyvae.benchmarks.mlp import main

if __name__ == "__main__":
    main()
