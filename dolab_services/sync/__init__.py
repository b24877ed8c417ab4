"""DO-LAB workspace sync: incremental, content-addressed backups of users' workspaces to S3 or Google Drive.

Modules: ``store`` (the storage interface), ``s3`` and ``drive`` (targets; ``drive_auth``: a service account key or
a user's own OAuth token, ``drive_calls``: Drive's retries and failure sentences), ``manifest`` (snapshots and the
hash cache), ``blobs`` (hashing, pieces, checked fetches), ``engine`` (the steps every backup and restore share,
retention), ``local`` (a workspace on this machine, through ``workspace`` and ``dirfd``: descriptor-only walks),
``remote`` (a workspace in a running Jupyter server, through ``contents``, the contents API client), ``config``
(``DOLAB_SYNC_*``), ``choices`` (each user's target within the admin's policy), ``tokens`` (users' own Google Drive
tokens, read from the hub's auth_state), ``backups``, ``web`` and ``app`` (the hub-managed ``dolab-sync``
service and its API), ``hooks`` and ``remote_hooks`` (the final backup before a stop, the restore at spawn),
``registration`` (what the shipped ``jupyterhub_config.py`` adds).
"""
