"""What DO-LAB's hub side (:mod:`dolab_spawner`) and its services (:mod:`dolab_services`) share.

It imports neither of them, and starts light: importing a module here loads no JupyterHub spawner, docker-py or
paramiko (only :mod:`dolab_core.engines.docker`, which the docker backend and the reaper import, loads docker-py).

- :mod:`.plans`: who may use what (groups -> plans -> profiles, GPUs, hours, money);
- :mod:`.hubconfig`: the hub config readers (``DOLAB_*`` variables, ``c.X.y`` values, secrets);
- :mod:`.paths`, :mod:`.hubidentity`: the data directory and the hub's id in every name it gives;
- :mod:`.times`, :mod:`.text`: times and words as users read them;
- :mod:`.gpus`: the GPU slot type and this machine's GPUs (NVML);
- :mod:`.serverstate`: the one typed contract of a server's spawner state;
- :mod:`.hooks`: the ``module.path:name`` loader of every hook and plug-in setting;
- :mod:`.engines`: clients of the engines servers run on (Docker engines, the RunPod API).
"""
