"""``python -m pyvae ...`` (also what ``torchrun -m pyvae train ...`` runs in every process)."""
import os
import sys

from .cli import main

if __name__ == "__main__":
    rc = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # NOTE: [torchrun exit] After a distributed run has finished (process group destroyed,
        # checkpoint renamed into place, output flushed below), a worker occasionally aborted in
        # torch's C++ static destructors ("terminate called without an active exception": ~1 in 5
        # runs under load), which torchrun reports as a failed job. Leaving without running them
        # avoids that; nothing of pyvae's is left unwritten at this point.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(rc or 0))
    sys.exit(rc)
