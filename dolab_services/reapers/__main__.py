"""``python -m dolab_services.reapers docker|runpod [options]``: see :mod:`dolab_services.reapers.app`."""

import sys

from .app import main_docker, main_runpod

MAINS = {"docker": main_docker, "runpod": main_runpod}

if len(sys.argv) < 2 or sys.argv[1] not in MAINS:
    print("Usage: python -m dolab_services.reapers docker|runpod [options] (--help: each one's)", file=sys.stderr)
    sys.exit(2)
MAINS[sys.argv[1]](sys.argv[2:])
