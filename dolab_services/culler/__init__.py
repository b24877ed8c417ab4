"""The keep-alive and culling service: ``python -m dolab_services.culler``.

``policy`` decides (pure), ``telemetry`` reads GPU use, ``service`` sweeps the hub and stops servers through
one stop path.
"""
