"""``python -m dolab_services.monitor``: see :mod:`dolab_services.monitor.service`."""

from .service import main

main()
