"""DO-LAB workspace sync: incremental, content-addressed backups of users' workspaces to S3 or Google Drive.

Modules: ``store`` (the storage interface), ``s3`` and ``drive`` (targets), ``workspace`` (scanning a workspace
safely), ``engine`` (backup, restore, retention), ``service`` (the hub-managed service), ``hooks`` (the stop path's
final sync).
"""
