"""A pre-destroy hook the e2e hub runs after the final sync: records what it sees at that moment.

One JSON line per call in ``$DOLAB_TEST_PROBE_FILE``: the user, whether their container still runs, and the
snapshots their backup holds. Run after ``final_sync``, it shows the order: backup done, container not yet gone.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import docker

from dolab_services.sync.config import SyncSettings
from dolab_services.sync.engine import SyncEngine


async def record(spawner: Any, reason: str) -> None:
    """Append what this moment looks like to the probe file."""
    backend = spawner._backend

    def probe() -> dict[str, Any]:
        client = docker.APIClient(base_url=os.environ["DOLAB_TEST_DOCKER_HOST"], timeout=30)
        try:
            running = bool(client.inspect_container(backend.object_id)["State"]["Running"])
        finally:
            client.close()
        store = SyncSettings.from_env(os.environ).store_for(spawner.user.name)
        return {
            "user": spawner.user.name,
            "reason": reason,
            "container_running": running,
            "snapshots": [s.id for s in SyncEngine(store).snapshots()],
        }

    line = await asyncio.to_thread(probe)
    with open(os.environ["DOLAB_TEST_PROBE_FILE"], "a") as f:
        f.write(json.dumps(line) + "\n")
