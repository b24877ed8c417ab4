"""The GPU and cost monitor with quotas: ``python -m dolab_services.monitor``.

``telemetry`` reads GPUs, ``runs`` reads what the hub's servers hold and cost, ``ledger`` books usage (never
twice), ``periods`` and ``quotas`` decide what is allowed, ``enforcer`` warns and stops, ``sampler`` runs the tick,
``metrics`` exports Prometheus series, ``plots`` and ``web`` serve the page and API, ``quotacheck`` is the
spawner's spawn-time check, ``app`` is the program and ``registration`` what the hub config adds.
"""
