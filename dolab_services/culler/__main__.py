"""``python -m dolab_services.culler``: see :mod:`dolab_services.culler.service`."""

from .service import main

main()
