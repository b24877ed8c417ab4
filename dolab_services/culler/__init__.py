"""dolab-culler (``python -m dolab_services.culler``): keep running work alive, stop what is idle or past its
time, warn first, let users extend.

Every ``--interval`` seconds a sweep lists the hub's ready servers (one paginated request, with their spawner
state) and, for each, builds :class:`~.policy.ServerFacts`: start, the hub's last activity, the profile, backend
and GPU slots from the state, the user's groups, and the stop time (the spawner state's ``stop_at``, or a
later one the user extended to here). Only servers that :func:`~.policy.needs_inspection` says are near their
idle timeout get their kernels read, and every server holding GPUs gets its GPU use read (one telemetry call per
sweep, cheap). Then :func:`~.policy.decide`:

- running work (a busy kernel, a busy GPU) is recorded as the server's activity in the hub
  (``POST /users/:name/activity``), so the hub, the admin page and other tools agree it is in use;
- a stop coming within the warning window becomes a warning, shown on the service's page and at ``api/warnings``;
- a stop that is due goes through :class:`~dolab_services.stop.StopPath` (pre-stop hooks, then the hub API).

Kernels are read from the server's own address (``state["server_url"]`` + ``api/kernels?no_track_activity=1``),
never through the proxy: the proxy counts every request as the user's activity, so a culler reading through it
would keep every server alive forever; with ``no_track_activity=1`` jupyter-server does not count it either.

One server failing never holds up the others: each server is handled in its own task (at most ``--concurrency``
read kernels at once, each read with a timeout), a sweep waits at most one interval for them, and a server still
being handled is skipped by the next sweep. A server whose kernels cannot be read (no answer, an error status, no
``server_url`` in its state) is logged and kept from an idle stop: unknown is not idle. Its deadline and maximum
age still apply.

Users extend their stop time in JupyterLab (the notice the ``labextension/`` shows, :mod:`dolab_lab.notice`), on
the service's page (a one-click button) or with ``POST api/extend``; the culler keeps extended stop times in its
own file (``--extensions-file``), see :mod:`.extensions`.

The modules, one concept each: :mod:`.facts` (what the hub and a server's own API say), :mod:`.policy` (pure
decisions), :mod:`.telemetry` (GPU use), :mod:`.notices` (warnings and the page's view), :mod:`.extensions`
(extended stop times), :mod:`.sweeper` (the work), :mod:`.registration` (``jupyterhub_config.py``'s part),
:mod:`.app` (the program), :mod:`.web` (page and API). Shared with the other services: :mod:`dolab_services.stop`
(the stop path), :mod:`dolab_core.times` (timestamps); the JupyterLab notice shipped to users' servers is
:mod:`dolab_lab.notice`.

Scopes (role ``dolab-culler``, :data:`.registration.CULLER_SCOPES`): ``list:users``, ``read:users:name`` and
``read:users:groups`` (who, and their groups for exemptions), ``read:servers`` and ``admin:server_state`` (the
servers, their activity, options and state), ``users:activity`` (record running work), ``delete:servers`` (stop),
``tokens`` (a token per server whose kernels it reads, owned by its user and limited to that server). Users get
``access:services!service=dolab-culler`` through ``c.JupyterHub.extra_user_scopes`` to open the page.
"""
