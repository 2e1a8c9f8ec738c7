"""``python -m pyvae ...`` (also what ``torchrun -m pyvae train ...`` runs in every process)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
