"""``python -m dolab_services.culler``: see :mod:`dolab_services.culler.service`."""

from .app import main

main()
