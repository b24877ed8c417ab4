"""``python -m dolab_services.monitor``: see :mod:`dolab_services.monitor.app`."""

from .app import main

main()
