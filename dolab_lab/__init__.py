"""What DO-LAB puts inside users' servers: :mod:`.notice`, the culler's JupyterLab notice (a prebuilt extension,
source in ``labextension/``, built into ``share/``). It holds no credential but the server's own."""
