"""``python -m dolab_services.sync``: see :mod:`dolab_services.sync.app`."""

from .app import main

main()
