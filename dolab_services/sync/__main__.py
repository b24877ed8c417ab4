"""``python -m dolab_services.sync``: see :mod:`dolab_services.sync.service`."""

from .service import main

main()
