"""DO-LAB workspace sync: incremental, content-addressed backups of users' workspaces to S3 or Google Drive.

Modules: ``store`` (the storage interface), ``s3`` and ``drive`` (targets), ``workspace`` (reading and writing a
workspace safely), ``manifest`` (snapshots and the hash cache), ``engine`` (backup, restore, retention), ``config``
(``DOLAB_SYNC_*``), ``choices`` (each user's target within the admin's policy), ``tokens`` (users' own Google Drive
tokens, read from the hub's auth_state), ``backups``, ``web`` and ``app`` (the hub-managed ``dolab-sync``
service and its API), ``hooks`` (the spawner's and the culler's final backup, the restore at spawn),
``registration`` (what the shipped ``jupyterhub_config.py`` adds).
"""
