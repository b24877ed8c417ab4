"""``python -m tests.runpod_emulator``: see :mod:`tests.runpod_emulator.server`."""

from .server import main

main()
