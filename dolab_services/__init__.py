"""DO-LAB's hub-managed services: ``culler``, ``monitor``, ``sync`` and ``reapers``.

Each is a package of the same shape: ``app.py`` (its traitlets Application, on :class:`.app.ServiceApp`: the hub's
log format, the page's listener, a work loop one failure never ends, a quick quiet stop at SIGINT or SIGTERM),
``registration.py`` (what the shipped ``jupyterhub_config.py`` adds: a :class:`.registration.Registration` with the
service, its least-privilege role, the users' scopes and the spawner settings it brings) and its domain modules.
They share ``hubclient.py`` (the hub's REST API), ``web.py`` (the pages' handler base), ``scopes.py``,
``servertokens.py`` (per-server tokens) and ``stop.py`` (the one stop path). No service imports ``dolab_spawner``:
what both sides share is in ``dolab_core``.
"""
