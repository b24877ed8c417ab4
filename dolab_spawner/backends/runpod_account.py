"""The RunPod account as the RunPod backend uses it: the settings an admin gives (the key, API timeouts, retries
and threads, pod names, what a stop does, how long a pod may take) and what the account's failures tell users.

:class:`RunPodSettings` holds the ``c.RunPodBackend.*`` traits; it is mixed into :class:`~.runpod.RunPodBackend`,
so they are configured under that name.
"""

from __future__ import annotations

import logging
import os

from jupyterhub.spawner import SpawnException
from traitlets import Enum, Float, HasTraits, Integer, List, Unicode, default

from dolab_core.engines.runpod import BadApiKey, RunPodApi, RunPodError, TransientError, shared_api
from dolab_core.hubidentity import hub_id

__all__ = ["RunPodSettings", "api_failure"]


class RunPodSettings(HasTraits):
    """The RunPod backend's settings (``c.RunPodBackend.*``) and the hub-wide API adapter they give."""

    api_key = Unicode(
        config=True,
        help="""The RunPod API key. Default: the hub's ``RUNPOD_API_KEY`` environment variable. It stays in the hub:
        never in a pod's environment, the form, the logs or the browser.""",
    )

    proxy_url_template = Unicode(
        "https://{pod_id}-{port}.proxy.runpod.net",
        config=True,
        help="""The URL the hub's proxy uses to reach a pod's HTTP port. Fields: ``{pod_id}``, ``{port}`` (the port
        in the pod), and from the pod's runtime ``{ip}`` and ``{public_port}``. Default: RunPod's HTTP proxy (its
        edge gives up on a response after 100 s). Tests point it at the emulator: ``http://{ip}:{public_port}``.""",
    )

    http_port = Integer(8888, config=True, help="The port jupyterhub-singleuser listens on inside the pod.")

    singleuser_command = List(
        Unicode(),
        default_value=["jupyterhub-singleuser"],
        config=True,
        help="The pod's start command (its ``dockerArgs``), found on the image's PATH; the spawner's ``args`` follow.",
    )

    pod_name_prefix = Unicode(
        "dolab-",
        config=True,
        help="""Prefix of every pod name (``<prefix><hub id>-<user>[--<server>]``). The hub's id tells apart the pods
        of hubs sharing a RunPod account: a reaper only ever looks at its own hub's.""",
    )

    hub_id = Unicode(help="This hub's id (:mod:`dolab_core.hubidentity`), in every pod's name.")

    stop_action = Enum(
        ["terminate", "stop"],
        "terminate",
        config=True,
        help="""What stopping a server does to its pod: ``terminate`` (default; the pod and its disks are gone, no
        cost) or ``stop`` (the volume is kept and billed for storage; the next start creates a new pod).""",
    )

    pod_start_timeout_seconds = Float(
        1200,
        config=True,
        help="""How long a RunPod start may take before it is given up and the pod terminated (seconds; the hub's
        ``start_timeout`` for RunPod profiles). Pods pull their image first: large images take minutes.""",
    )

    pod_http_timeout_seconds = Float(
        900,
        config=True,
        help="How long the hub waits for a started pod's server to answer (seconds; ``http_timeout`` for RunPod).",
    )

    poll_interval_seconds = Float(0.5, config=True, help="First wait between two looks at a starting pod (seconds).")

    poll_max_interval_seconds = Float(
        5.0,
        config=True,
        help="""Longest wait between two looks at a starting pod (seconds); waits grow by a quarter each time. Each
        look is one GraphQL request, which RunPod rate-limits.""",
    )

    server_wait_seconds = Float(
        120,
        config=True,
        help="""Once the pod runs, how long start() itself waits for its server to answer through the proxy URL
        before handing the rest of the wait to the hub (seconds). Waiting here, checking every fraction of a second,
        spares the hub's own check, which backs off to 5 s between tries.""",
    )

    api_timeout_seconds = Float(40, config=True, help="Longest wait for one RunPod API call (seconds).")

    api_retries = Integer(
        3, config=True, help="Retries of a RunPod call that was rate-limited, failed on the server, or timed out."
    )

    api_backoff_seconds = Float(1.0, config=True, help="First wait before a retry (seconds); it doubles each time.")

    api_threads = Integer(4, config=True, help="Threads running RunPod SDK calls (shared by every server of the hub).")

    price_ttl_seconds = Float(300, config=True, help="How long GPU prices are reused before RunPod is asked again.")

    @default("hub_id")
    def _default_hub_id(self) -> str:
        return hub_id()

    @default("api_key")
    def _default_api_key(self) -> str:
        return os.environ.get("RUNPOD_API_KEY", "")

    @property
    def api(self) -> RunPodApi:
        """The hub-wide RunPod adapter for this key and these settings."""
        return shared_api(
            self.api_key,
            pool_size=self.api_threads,
            call_timeout_seconds=self.api_timeout_seconds,
            retries=self.api_retries,
            backoff_seconds=self.api_backoff_seconds,
            price_ttl_seconds=self.price_ttl_seconds,
        )


def api_failure(error: RunPodError, doing: str, log: logging.Logger, log_name: str) -> SpawnException:
    """A sentence for the user about a RunPod call that failed while ``doing`` something for the server
    ``log_name``; the details (never the key) go to ``log`` for the admin."""
    if isinstance(error, BadApiKey):
        log.error("RunPod refused the hub's API key while %s: %s. Check RUNPOD_API_KEY.", doing, error)
        return SpawnException(
            "RunPod is not available right now (the hub's RunPod account was refused). Please tell an administrator.",
            reason="runpod_key",
            status_code=503,
        )
    if isinstance(error, TransientError):
        log.warning("RunPod failed while %s for %s after retries: %s", doing, log_name, error)
        return SpawnException(
            "RunPod is not answering properly right now. Please try again in a few minutes.",
            reason="runpod_unavailable",
            status_code=503,
        )
    log.error("RunPod error while %s for %s: %s", doing, log_name, error)
    return SpawnException(
        "RunPod refused to start your pod. Please try again, or tell an administrator if it keeps failing.",
        reason="runpod_error",
        status_code=503,
    )
