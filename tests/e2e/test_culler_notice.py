"""The culler's warning where users work: a real hub, a real JupyterLab server (local backend) and Chromium.

A server whose stop time is near shows the culler's notification in JupyterLab (the prebuilt extension that
``make labextension`` builds; the local backend puts it on JUPYTER_PATH, the docker backend mounts it into the
test image, which was built without it). Clicking its "Extend" button moves the stop time, which the culler's
API and page then report. The browser logs in to the hub only: the notice reaches the culler through the hub's
OAuth and the service's XSRF check on its own.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import docker
import pytest
import requests
from bs4 import BeautifulSoup

from dolab_lab.notice import NOTICE_NAME, SHARE_DIR

from ..patience import patience_ms
from .hub import Hub, free_port
from .stack import docker_stack

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
PREFIX = "/services/dolab-culler/"
USER = "nora"
#: The stop time is this far ahead, inside the warning window from the start, and far from a real stop.
RUN_MINUTES = 10
WARN_MINUTES = 15


def parse(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def missing(what: str, how: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is missing: {how}")
    pytest.skip(f"{what} is missing ({how})")


def start_hub(root: Path, overlay: str = "", env: dict[str, str] | None = None) -> Hub:
    """A hub whose culler warns of a deadline from the first sweep on and never stops a server for being idle."""
    if not (SHARE_DIR / "labextensions" / NOTICE_NAME / "package.json").is_file():
        missing("The culler's JupyterLab notice", "`make labextension` builds it; `make test` does")
    policy = root / "policy.json"
    policy.write_text(json.dumps({"rules": [{"idle_hours": None}], "warn_before_minutes": WARN_MINUTES}))
    overlay = (
        "c.DoLabSpawner.profile_list = [{'display_name': 'CPU only', 'slug': 'cpu', 'default': True}]\n"
        "c.DoLabSpawner.gpu_inventory = []\n"
        "c.DoLabSpawner.max_run_hours = 24\n"
    ) + overlay
    env = {
        "DOLAB_CULLER_INTERVAL": "2",
        "DOLAB_CULLER_POLICY": str(policy),
        "DOLAB_CULLER_TELEMETRY": f"file:{root / 'gpu.json'}",
        "DOLAB_CULLER_PORT": str(free_port()),
        **(env or {}),
    }
    return Hub(root, overlay=overlay, env=env).start()


@pytest.fixture(scope="module")
def local_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    hub = start_hub(tmp_path_factory.mktemp("culler-notice"))
    try:
        yield hub
    finally:
        hub.shutdown()


@pytest.fixture(scope="module")
def docker_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    stack = docker_stack()
    hub_port = free_port()
    # The test image as tests/stack.py built it: JupyterLab without DO-LAB's extension.
    overlay = f"""
c.DoLabSpawner.profile_list = [{{"display_name": "Docker CPU", "slug": "cpu", "backend": "docker", "default": True}}]
c.DoLabSpawner.docker_hosts = [{{"name": "local", "url": {stack.docker_host!r}}}]
c.DockerSpawner.image = {stack.image!r}
c.DockerSpawner.extra_create_kwargs = {{"labels": {{"dolab.test": "notice"}}}}
"""
    env = {"DOLAB_HUB_IP": "0.0.0.0", "DOLAB_HUB_PORT": str(hub_port)}
    hub = start_hub(tmp_path_factory.mktemp("culler-notice-docker"), overlay, env)
    try:
        yield hub
    finally:
        hub.shutdown()
        client = docker.DockerClient(base_url=stack.docker_host)
        for container in client.containers.list(all=True, filters={"label": "dolab.test=notice"}):
            container.remove(force=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        missing("Debian's chromium", "`make test` installs the chromium package")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield browser
        browser.close()


def culler(hub: Hub, token: str, path: str) -> requests.Response:
    return requests.get(f"{hub.url}{PREFIX}{path}", headers={"Authorization": f"token {token}"}, timeout=30)


def page_stop_time(hub: Hub, token: str) -> datetime:
    """The stop time of the user's default server on the culler's page."""
    section = BeautifulSoup(culler(hub, token, "").text, "html.parser").find("section", attrs={"data-server": ""})
    assert section is not None, "the culler's page does not list the server"
    return parse(section.find("time")["datetime"])


@pytest.mark.parametrize("backend", ["local", "docker"])
def test_the_warning_shows_in_jupyterlab_and_extend_moves_the_stop_time(
    backend: str, request: pytest.FixtureRequest, browser: Any, tmp_path: Path
) -> None:
    hub: Hub = request.getfixturevalue(f"{backend}_hub")
    hub.create_user(USER)
    token = hub.user_token(USER)
    reply = hub.start_server(USER, {"profile": "cpu", "run_hours": RUN_MINUTES / 60})
    assert reply.status_code in (201, 202), reply.text
    server = hub.wait_ready(USER, timeout=120)
    old = parse(server["user_options"]["stop_at"])
    if backend == "docker":
        # The image's own JupyterLab finds the mounted extension and can load it.
        container = docker.DockerClient(base_url=docker_stack().docker_host).containers.get(
            server["state"]["backend_state"]["object_id"]
        )
        listed = container.exec_run(["jupyter", "labextension", "list"]).output.decode(errors="replace")
        assert NOTICE_NAME in listed and "OK" in listed.split(NOTICE_NAME, 1)[1].splitlines()[0], listed

    password = (hub.data_dir / "shared-password").read_text().strip()
    page = browser.new_page()
    page.set_default_timeout(patience_ms(60))
    try:
        page.goto(f"{hub.url}/hub/login?next=/hub/user/{USER}/lab")
        page.fill("input[name=username]", USER)
        page.fill("input[name=password]", password)
        page.click("input[type=submit], button[type=submit]")
        page.wait_for_url(f"**/user/{USER}/lab**", timeout=patience_ms(90))

        # The notice: why and when, and the one-click extension the culler offers.
        toast = page.locator(".Toastify__toast", has_text="This server stops at")
        toast.wait_for(timeout=patience_ms(90))
        assert "the stop time you chose" in toast.inner_text()
        toast.get_by_role("button", name="Extend by 2 hours").click()
        done = page.locator(".Toastify__toast", has_text="Extended: this server now stops at")
        done.wait_for()
    except Exception:
        page.screenshot(path=str(tmp_path / "failure.png"))
        print(f"screenshot: {tmp_path / 'failure.png'}\n{hub.log_tail(40)}")
        raise
    finally:
        page.close()

    # The culler agrees: two hours later, and no warning left for the server.
    assert page_stop_time(hub, token) - old == timedelta(hours=2)
    assert culler(hub, token, "api/warnings").json() == {"warnings": []}
    log = hub.log_path.read_text(errors="replace")
    assert f"User {USER} extended server {USER}/ to" in log
    assert "JupyterLab notice is not built" not in log
