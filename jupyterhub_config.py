# DO-LAB's shipped JupyterHub config.
#
# Unchanged, it runs the embedded default: SQLite, DoLabSpawner on the local backend, and a shared password
# generated on the first run. Everything else comes from environment variables (README.md, "Configuration")
# or from overlay files: every `*.py` in $DOLAB_CONFIG_DIR (default: jupyterhub_config.d/ beside this file)
# is loaded after this one, in name order, with the same `c`.
#
# c is provided by JupyterHub's config loader.
# ruff: noqa: F821

import os
import sys
from pathlib import Path

from traitlets import TraitError

from dolab_core.hubconfig import ConfigEnvError, ensure_secret, env_float, env_json, env_list, find_proxy
from dolab_core.paths import default_data_dir
from dolab_core.plans import PlanConfigError, load_plans_file
from dolab_services.culler.registration import culler_service
from dolab_services.monitor.registration import monitor_service
from dolab_services.reapers.registration import reaper_service, runpod_reaper_service
from dolab_services.scopes import with_admin_role, with_custom_scopes
from dolab_services.sync.registration import backup_before_stops, sync_service
from dolab_spawner import DoLabSpawner
from dolab_spawner.auth.envconfig import configure_login
from dolab_spawner.backends.local import check_local_accounts

env = os.environ
here = Path(__file__).resolve().parent
data_dir = Path(default_data_dir())
data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
bind_url = env.get("DOLAB_BIND_URL", "http://127.0.0.1:8000")

# --- the hub ---------------------------------------------------------------------------------------------
c.JupyterHub.bind_url = bind_url
c.JupyterHub.db_url = env.get("DOLAB_DB_URL", f"sqlite:///{data_dir / 'jupyterhub.sqlite'}")
c.JupyterHub.cookie_secret_file = str(data_dir / "jupyterhub_cookie_secret")
c.JupyterHub.pid_file = str(data_dir / "jupyterhub.pid")
# A hub restart must never stop running work: servers outlive the hub, and their state is in the database.
c.JupyterHub.cleanup_servers = False
c.JupyterHub.allow_named_servers = True
c.JupyterHub.named_server_limit_per_user = int(env_float(env, "DOLAB_NAMED_SERVER_LIMIT", 2))
c.JupyterHub.hub_ip = env.get("DOLAB_HUB_IP", "127.0.0.1")
if env.get("DOLAB_HUB_PORT"):
    c.JupyterHub.hub_port = int(env["DOLAB_HUB_PORT"])
c.ConfigurableHTTPProxy.command = find_proxy(env, here)
c.ConfigurableHTTPProxy.pid_file = str(data_dir / "proxy.pid")
if env.get("DOLAB_PROXY_API_PORT"):
    c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{int(env['DOLAB_PROXY_API_PORT'])}"

# --- login: one shared password (switch to your identity provider with DoLabAuthenticator) ---------------
user_password, new_user_password = ensure_secret(data_dir / "shared-password", length=16)
admin_password, new_admin_password = ensure_secret(data_dir / "admin-password", length=40)
admin_users = set(env_list(env, "DOLAB_ADMIN_USERS", ["admin"]))
c.JupyterHub.authenticator_class = "shared-password"
c.SharedPasswordAuthenticator.user_password = user_password
c.SharedPasswordAuthenticator.admin_password = admin_password
c.Authenticator.admin_users = admin_users
c.Authenticator.allow_all = True
# DOLAB_AUTH=oidc|google|github logs in with the team's identity provider instead (README.md, "Logging in").
try:
    login_provider = configure_login(c, env, bind_url)
except ConfigEnvError as e:
    sys.exit(f"DO-LAB: bad configuration: {e}")
if login_provider is not None:
    print(f"DO-LAB: users log in with {login_provider} (DOLAB_AUTH)", file=sys.stderr)
elif (new_user_password or new_admin_password) and sys.stderr.isatty():
    print(
        "\n"
        "  DO-LAB first run: passwords generated (shown this once)\n"
        f"    open        {bind_url}\n"
        f"    users       any user name, password {user_password}\n"
        f"    admins      {', '.join(sorted(admin_users))}, password {admin_password}\n"
        f"    kept in     {data_dir}/shared-password and admin-password (mode 0600)\n",
        file=sys.stderr,
        flush=True,
    )
elif new_user_password or new_admin_password:
    # Not a terminal: stderr goes to a log (journald, docker logs, a file) that others may read. Say where, not what.
    print(
        f"DO-LAB first run: passwords generated, not shown because this output is not a terminal. They are in "
        f"{data_dir / 'shared-password'} (any user name) and {data_dir / 'admin-password'} "
        f"({', '.join(sorted(admin_users))}), mode 0600: read them as this user with "
        f"`cat {data_dir / 'shared-password'} {data_dir / 'admin-password'}`",
        file=sys.stderr,
        flush=True,
    )
else:
    print(f"DO-LAB: the login passwords are in {data_dir}/shared-password and admin-password", file=sys.stderr)

# --- the spawner ---------------------------------------------------------------------------------------
c.JupyterHub.spawner_class = "dolab"
c.Spawner.default_url = "/lab"
c.DoLabSpawner.workspace_root = env.get("DOLAB_WORKSPACE_ROOT", str(data_dir / "workspaces"))
c.DoLabSpawner.max_run_hours = env_float(env, "DOLAB_MAX_RUN_HOURS", 168)
try:
    profiles = env_json(env, "DOLAB_PROFILES")
    inventory = env_json(env, "DOLAB_GPU_INVENTORY")
    docker_hosts = env_json(env, "DOLAB_DOCKER_HOSTS")
except ConfigEnvError as e:
    sys.exit(f"DO-LAB: bad configuration: {e}")
if profiles is not None:
    c.DoLabSpawner.profile_list = profiles
if inventory is not None:
    c.DoLabSpawner.gpu_inventory = inventory
if docker_hosts is not None:
    c.DoLabSpawner.docker_hosts = docker_hosts
c.DoLabSpawner.gpu_ids = env_list(env, "DOLAB_GPU_IDS")
if env.get("DOLAB_PLANS_FILE"):  # groups -> plans (profiles, quotas, run time, culling exemption)
    try:
        c.DoLabSpawner.plans = load_plans_file(env["DOLAB_PLANS_FILE"])
    except PlanConfigError as e:
        sys.exit(f"DO-LAB: bad configuration: {e}")
c.LocalProcessBackend.log_dir = str(data_dir / "logs")
# As root, each user's local server runs as a system account of their own; this runs them as root instead.
if env.get("DOLAB_ALLOW_ROOT_SERVERS", "") in ("1", "true", "yes"):
    c.LocalProcessBackend.allow_root_servers = True

# --- services --------------------------------------------------------------------------------------------
# `dolab gpus` reads slots from the hub with this token (kept in the data directory, like the passwords).
cli_token, _ = ensure_secret(data_dir / "cli-token", length=40)
c.JupyterHub.services = [{"name": "dolab-cli", "api_token": cli_token, "display": False}]
c.JupyterHub.load_roles = [
    {
        "name": "dolab-cli",
        "description": "Read who holds which GPU (dolab gpus)",
        "scopes": ["list:users", "read:users:name", "read:servers", "admin:server_state"],
        "services": ["dolab-cli"],
    }
]

# --- workspace backups: when a target is configured (DOLAB_SYNC_*; README, "Workspace backup") ---------------------
# The dolab-sync service (periodic backups, restore API), a final backup before a server is destroyed, and a restore
# into a new, empty workspace. Storage credentials go to the service's environment only.
try:
    sync = sync_service(env, c.DoLabSpawner.workspace_root, str(data_dir), sys.executable)
except ValueError as e:
    sys.exit(f"DO-LAB: bad configuration: {e}")
if sync is not None:
    # Its scope for users (the culler's section below adds its own to these), the spawner's pre_destroy_hooks and
    # pre_start_hooks.
    sync.add_to(c)

# --- overlays, then a check of the result ----------------------------------------------------------------
overlay_dir = Path(env.get("DOLAB_CONFIG_DIR", here / "jupyterhub_config.d"))
for overlay in sorted(overlay_dir.glob("*.py")):
    load_subconfig(str(overlay))

if c.JupyterHub.spawner_class in ("dolab", DoLabSpawner):
    try:
        DoLabSpawner.check_config(c)
    except TraitError as e:
        sys.exit(f"DO-LAB: bad configuration: {e}")
    # Local servers as root: accounts of their own and a data directory they cannot read (README, "The local backend").
    try:
        root_warning = check_local_accounts(c, data_dir, c.DoLabSpawner.workspace_root)
    except ValueError as e:
        sys.exit(f"DO-LAB: bad configuration: {e}")
    if root_warning:
        print(f"DO-LAB: {root_warning}", file=sys.stderr, flush=True)

# --- the reaper: after the overlays, so it sweeps the docker_hosts they set ----------------------------------
# Reports (DOLAB_REAPER_REMOVE=1: removes) DO-LAB containers no server owns; only when a profile uses docker.
try:
    reaper = reaper_service(c, env, sys.executable)
except ValueError as e:
    sys.exit(f"DO-LAB: bad configuration: {e}")
if reaper is not None:
    reaper.add_to(c)
# Reports (DOLAB_RUNPOD_REAPER_TERMINATE=1: terminates) DO-LAB's RunPod pods no server owns, when a profile uses runpod
# (DOLAB_RUNPOD_REAPER=0: never).
try:
    runpod_reaper = runpod_reaper_service(c, env, sys.executable)
except ValueError as e:
    sys.exit(f"DO-LAB: bad configuration: {e}")
if runpod_reaper is not None:
    runpod_reaper.add_to(c)

# --- the culler: always, after the overlays, so it sees their max_run_hours and services -----------------------
# Keeps running work alive and stops idle or expired servers (README.md, "Keep-alive and culling"). Its page is
# under /services/dolab-culler/; every user gets access to it through extra_user_scopes.
try:
    culler = culler_service(c, env, sys.executable, data_dir)
except ValueError as e:
    sys.exit(f"DO-LAB: bad configuration: {e}")
if culler is not None:
    culler.add_to(c)
    if sync is not None:
        # The culler has dolab-sync back a server up before it stops it; a failed backup keeps the server running.
        backup_before_stops(c, sync, culler)

# --- the monitor: always, after the overlays and the culler -------------------------------------------------------
# GPU and cost telemetry, the usage ledger, quotas and metrics (README.md, "GPU use, spend and quotas"); its page is
# under /services/dolab-monitor/. With quotas configured, the spawner asks it before any GPU or pod is taken.
try:
    monitor = monitor_service(c, env, sys.executable, data_dir)
except ValueError as e:
    sys.exit(f"DO-LAB: bad configuration: {e}")
if monitor is not None:
    monitor.add_to(c)  # with quotas configured, also the spawner's quota_check (unless an overlay set one)
    if sync is not None:
        # A quota stop has dolab-sync back the server up first, like the culler's; a failed backup keeps it running.
        backup_before_stops(c, sync, monitor)

# --- DO-LAB's scopes: last, so they see the overlays' admins and roles --------------------------------------------
# The services decide from a token's scopes, never from the admin flag (dolab_services/scopes.py): the admins named
# in admin_users (DOLAB_ADMIN_USERS) and admin_groups (DOLAB_ADMIN_GROUP) get DO-LAB's scopes (stop, extend, read
# usage, manage backups for other users) through the dolab-admin role.
c.JupyterHub.custom_scopes = with_custom_scopes(c)
c.JupyterHub.load_roles = with_admin_role(c)
