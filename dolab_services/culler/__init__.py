"""The keep-alive and culling service: ``python -m dolab_services.culler``.

``policy`` decides (pure), ``facts`` and ``telemetry`` gather what it decides on, ``sweeper`` does the work and
stops servers through ``stop``'s one stop path, ``app`` runs it, ``web`` serves the page and API, ``labnotice``
ships the warning into users' JupyterLab. ``service`` gathers the public names.
"""
