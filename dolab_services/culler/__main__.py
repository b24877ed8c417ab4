"""``python -m dolab_services.culler``: see :mod:`dolab_services.culler.app`."""

from .app import main

main()
