"""A real browser on the wizard: JupyterLab started on localhost by the test, Debian's Chromium driven by
Playwright (``executable_path``, no downloaded browser) opens ``00_wizard.ipynb``, runs it, clicks through the
first steps and finds the widgets rendered with live counts. Screenshots go to ``test-artifacts/``.

Skipped (with the reason) where ``/usr/bin/chromium`` or the ``playwright`` package is missing; CI installs both.
Everything runs on a temporary copy of the demo data and of the notebook, so the repository is never written.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import copy_demo_data

import lorakit
from lorakit.workspace import open_workspace

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
# As root in a container: no sandbox; and nothing that reaches out to the network.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _missing() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} not found: install Debian's chromium package (apt-get install -y chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed (pip install playwright; no browser download needed)"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_missing() is not None, reason=_missing() or "")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path, monkeypatch):
    """JupyterLab on a free localhost port, serving a folder with a copy of 00_wizard.ipynb, on demo data."""
    models = tmp_path / "models"
    data, config = copy_demo_data(tmp_path, models)
    env = {**os.environ, "LORAKIT_DATA_ROOT": str(data), "LORAKIT_CONFIG": str(config), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter-config"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter-runtime"),
           "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "lab-settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "lab-workspaces")}
    # The checkpoint's weights are there, so the first page can go on (building them is test_wizard's job).
    monkeypatch.setenv("LORAKIT_CONFIG", str(config))
    lorakit.make_tiny_checkpoint(open_workspace(data), "tiny-sd15", "sd15")
    # No "get Jupyter news?" toast over the screenshots (and no fetching of news).
    settings = tmp_path / "lab-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}', encoding="utf-8")
    root = tmp_path / "notebooks"
    root.mkdir()
    shutil.copy(REPO / "notebooks" / "00_wizard.ipynb", root)

    port, token = free_port(), secrets.token_hex(16)
    log = open(tmp_path / "jupyterlab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
         "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         *(["--allow-root"] if os.geteuid() == 0 else []), "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None", "--LabApp.check_for_updates_class="
         "jupyterlab.NeverCheckForUpdate"],
        env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail("JupyterLab did not start:\n" + (tmp_path / "jupyterlab.log").read_text()[-3000:])
                time.sleep(0.5)
        yield {"url": url, "token": token, "root": root, "log": tmp_path / "jupyterlab.log"}
    finally:
        # The server and the kernel it started share the session we created for them: end just that group.
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)
        except ProcessLookupError:
            pass
        log.close()


def test_wizard_renders_in_jupyterlab_with_live_counts(lab, tmp_path):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 1100},
        )
        try:
            page = context.new_page()
            page.set_default_timeout(120_000)
            page.goto(f"{lab['url']}/lab/tree/00_wizard.ipynb?token={lab['token']}")
            page.wait_for_selector(".jp-NotebookPanel .jp-Cell")
            # Wait for the notebook's kernel, then run every cell (Run > Run All Cells).
            page.wait_for_function("""() => {
                const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
                const kernel = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
                return kernel && kernel.status === 'idle';
            }""")
            page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")

            wizard = page.locator(".lorakit-wizard")
            wizard.wait_for()
            assert "Step 1 of 6: Checkpoint" in wizard.inner_text()
            assert "weights found" in wizard.inner_text()
            wizard.get_by_role("button", name="Next").click()
            page.get_by_text("Step 2 of 6: Dataset").wait_for()

            # Step 2: tick an asset type; the live count and thumbnails appear.
            wizard.get_by_text("UI icon (ui_icon)").click()
            count = wizard.locator(".lorakit-count")
            count.wait_for()
            matching = int(count.inner_text())
            assert matching > 0
            assert wizard.locator("img").count() >= min(6, matching)
            wizard.evaluate("el => el.scrollIntoView({block: 'start'})")
            page.screenshot(path=str(ARTIFACTS / "wizard.png"))
            wizard.screenshot(path=str(ARTIFACTS / "wizard-dataset.png"))

            # Skipping ahead is refused in the page.
            wizard.get_by_role("button", name="5. Train").click()
            page.get_by_text("steps cannot be skipped").wait_for()
            assert "Step 2 of 6" in wizard.inner_text()

            # Step 3: the caption preview shows real captions; switching strategy changes them live.
            wizard.get_by_role("button", name="Next").click()
            page.get_by_text("Step 3 of 6: Captions").wait_for()
            page.get_by_text("Tags only").click()
            page.get_by_text("Add prompt tokens").click()
            page.wait_for_function("() => !document.querySelector('.lorakit-wizard').innerText.includes('synthwave')")
            wizard.get_by_text("Tags + spec tags + title").click()
            page.get_by_text("Shield icon").first.wait_for()
            wizard.screenshot(path=str(ARTIFACTS / "wizard-captions.png"))

            # Step 4: the preset with its one-line description.
            wizard.get_by_role("button", name="Next").click()
            page.get_by_text("Step 4 of 6: Preset").wait_for()
            page.get_by_text("Seconds on a CPU").wait_for()
        finally:
            context.close()
    assert (ARTIFACTS / "wizard.png").stat().st_size > 10_000
