"""The reapers: find what DO-LAB made that no server in the hub owns, and report it or remove it.

``docker`` (Docker containers, service ``dolab-reaper``) and ``runpod`` (RunPod pods, ``dolab-runpod-reaper``)
hold each one's policy and sweep, ``servers`` what both read from the hub, ``app`` runs them
(``python -m dolab_services.reapers docker|runpod``), ``registration`` is what the shipped ``jupyterhub_config.py``
adds: a reaper runs whenever a profile uses its backend. A reaper only ever removes its own hub's leftovers: those
carrying the hub's id (:mod:`dolab_core.hubidentity`); what a server's spawner state names
(:class:`dolab_core.serverstate.ServerState`) is never an orphan.
"""
