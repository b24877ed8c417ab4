"""A person's first session, in a real browser (Debian's Chromium driven by Playwright):
log in with the shared password, choose a GPU profile on the form, watch the progress page, land in
JupyterLab and run a cell that shows the GPU the server holds.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from ..patience import patience_ms
from .hub import GPU_INVENTORY, Hub

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


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory):
    # No profile_list: the defaults ("CPU only" + one profile per GPU model) from the static inventory.
    hub = Hub(
        tmp_path_factory.mktemp("browser-hub"),
        env={"DOLAB_GPU_INVENTORY": json.dumps(GPU_INVENTORY)},
    ).start()
    yield hub
    hub.shutdown()


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI") == "true":
            pytest.fail("Chromium is missing: `make test` installs Debian's chromium package")
        pytest.skip("Debian's chromium is not installed (make test installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield browser
        browser.close()


def test_login_pick_gpu_profile_and_run_a_cell(hub: Hub, browser, tmp_path: Path) -> None:
    password = (hub.data_dir / "shared-password").read_text().strip()
    page = browser.new_page()
    page.set_default_timeout(patience_ms(60))
    try:
        page.goto(f"{hub.url}/hub/login")
        page.fill("input[name=username]", "zoe")
        page.fill("input[name=password]", password)
        page.click("input[type=submit], button[type=submit]")

        # The spawn form: live availability, the GPU profile, a stop time.
        page.wait_for_selector("#dolab-options")
        gpu_card = page.locator('.dolab-profile[data-profile="gpu-nvidia-a100-80gb"]')
        assert "2 of 2 GPUs free" in gpu_card.inner_text()
        gpu_card.locator('input[name="profile"]').check()
        page.locator('input[name="run_hours"]').fill("2")
        page.locator('input[name="stop_mode"][value="hours"]').check()
        page.click("#spawn_form input[type=submit], #spawn_form button[type=submit]")

        # The progress page shows DO-LAB's phases, then the hub sends the browser to JupyterLab.
        page.wait_for_url("**/hub/spawn-pending/zoe**")
        # (the event log sits in a collapsed "details" box: attached, not visible)
        page.locator(".progress-log-event", has_text="Reserved GPU").first.wait_for(state="attached")
        page.wait_for_url("**/user/zoe/lab**", timeout=patience_ms(90))

        # Open a notebook, run a cell.
        page.locator('.jp-LauncherCard[data-category="Notebook"]').first.click()
        editor = page.locator(".jp-Notebook .jp-Cell .cm-content").first
        editor.wait_for()
        # A cell run before the kernel is connected is dropped: wait for the status bar to say Idle.
        page.get_by_text("Python 3 (ipykernel) | Idle").wait_for(timeout=patience_ms(90))
        editor.click()
        page.keyboard.type("import os; print('GPU=' + os.environ['CUDA_VISIBLE_DEVICES'])")
        page.keyboard.press("Shift+Enter")
        output = page.locator(".jp-OutputArea-output").first
        output.wait_for()
        text = output.inner_text()
        assert text.strip() in {f"GPU={g['uuid']}" for g in GPU_INVENTORY}, text
    except Exception:
        page.screenshot(path=str(tmp_path / "failure.png"))
        print(f"screenshot: {tmp_path / 'failure.png'}")
        raise
    finally:
        page.close()

    server = hub.wait_ready("zoe")
    assert server["user_options"]["profile"] == "gpu-nvidia-a100-80gb"
    assert server["user_options"]["run_hours"] == 2
