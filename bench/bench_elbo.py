"""Runs the elbo benchmark: see pyvae/benchmarks/elbo.py (the same as `pyvae bench elbo`)."""
from pyvae.benchmarks.elbo import main

if __name__ == "__main__":
    main()
