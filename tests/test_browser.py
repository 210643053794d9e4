"""What a person sees in a real browser: notebook 01 in JupyterLab (its control panel renders and
responds to the tau slider) and the demo's HTML report (every image loads), in headless Chromium.

Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them); skipped with the reason
where they are missing, unless `ACTERASE_REQUIRE_BROWSER=1` (set in CI) turns the skip into a failure.
Screenshots go to `$ACTERASE_SCREENSHOTS` (default: the test's temporary folder)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from acterase_interp.demo import run_demo

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
RUN_TIMEOUT_S = 900  # notebook 01 in small mode takes about a minute; CI machines are slower
pytestmark = pytest.mark.slow


def _missing_browser() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    if not (CHROMIUM and CHROMEDRIVER):
        return "no chromium/chromedriver on PATH (apt-get install chromium chromium-driver)"
    return None


@pytest.fixture(scope="module")
def driver():
    reason = _missing_browser()
    if reason:
        if os.environ.get("ACTERASE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"ACTERASE_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1800"):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    browser.set_script_timeout(60)
    yield browser
    browser.quit()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ.get("ACTERASE_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    """JupyterLab on localhost serving a copy of notebook 01 without outputs, in small mode."""
    root = tmp_path_factory.mktemp("lab")
    nb = nbformat.read(ROOT / "notebooks" / "01_quickstart.ipynb", as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nbformat.write(nb, root / "01_quickstart.ipynb")
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "ACTERASE_NOTEBOOK_SMALL": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}  # fmt: skip
    argv = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
            f"--ServerApp.root_dir={root}", f"--IdentityProvider.token={token}", "--allow-root",
            "--LabApp.expose_app_in_browser=True", "--ServerApp.open_browser=False"]  # fmt: skip
    log = open(root / "jupyterlab.log", "w")
    server = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: _responds(f"{url}/api/status?token={token}"), 120, "JupyterLab to start", server)
        yield url, token
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def _responds(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def _wait(condition, timeout_s: float, what: str, server: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if server is not None and server.poll() is not None:
            raise RuntimeError(f"the server exited with status {server.returncode} while waiting for {what}")
        time.sleep(1)
    raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")


PANEL_STATE = """
const out = document.querySelector('.widget-vbox .widget-output');
if (!out) return null;
const plots = Array.from(out.querySelectorAll('.js-plotly-plot'));
return {text: out.innerText, plots: plots.map(p => JSON.stringify(p.data || null))};
"""


def _panel(driver) -> dict | None:
    """What the control panel's output shows: its printed line and the data of its two figures
    (the image grid and the mask-density bars), once both are drawn."""
    state = driver.execute_script(PANEL_STATE)
    return state if state and len(state["plots"]) == 2 and "null" not in state["plots"] else None


def test_notebook_01_panel_renders_and_follows_the_tau_slider(driver, lab, screenshots):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    url, token = lab
    driver.get(f"{url}/lab/tree/01_quickstart.ipynb?token={token}")
    kernel_ready = "const w = window.jupyterapp && window.jupyterapp.shell.currentWidget; " \
                   "return !!(w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel);"
    _wait(lambda: driver.execute_script(kernel_ready), 180, "the notebook and its kernel")
    driver.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells');")
    findings = "return document.body.innerText.includes('- control panel (');"
    _wait(lambda: driver.execute_script(findings), RUN_TIMEOUT_S, "the notebook to run to its findings cell")
    errors = driver.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
    assert not [e.text for e in errors if "Traceback" in e.text]

    before = _wait(lambda: _panel(driver), 60, "the control panel's figures")
    panel = driver.find_element(By.CSS_SELECTOR, ".widget-vbox")
    driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", panel)
    panel.screenshot(str(screenshots / "01_panel_before.png"))
    assert "tau=" in before["text"] and "mean mask density" in before["text"]

    slider = panel.find_element(By.CSS_SELECTOR, ".widget-hslider")
    handle = slider.find_element(By.CSS_SELECTOR, ".noUi-handle")
    readout = slider.find_element(By.CSS_SELECTOR, ".widget-readout").text
    ActionChains(driver).drag_and_drop_by_offset(handle, 60, 0).perform()  # a real drag: tau rises
    _wait(lambda: slider.find_element(By.CSS_SELECTOR, ".widget-readout").text != readout, 30, "the slider to move")
    after = _wait(lambda: (s := _panel(driver)) and s["text"] != before["text"] and s, 300, "the panel to redraw")
    panel.screenshot(str(screenshots / "01_panel_after.png"))
    driver.save_screenshot(str(screenshots / "01_notebook.png"))

    tau_of = lambda text: float(text.split("tau=")[1].split(",")[0])
    assert tau_of(after["text"]) > tau_of(before["text"])
    image_grid, density_bars = 0, 1
    assert after["plots"][density_bars] != before["plots"][density_bars], "the mask-density figure did not change"
    assert after["plots"][image_grid] != before["plots"][image_grid], "the image grid did not change"


LOAD_IMAGES = """
const done = arguments[arguments.length - 1];
const sources = [...Array.from(document.images).map(i => i.src),
                 ...Array.from(document.querySelectorAll('svg image')).map(i => i.getAttribute('href'))];
Promise.all(sources.map(src => new Promise(resolve => {
  const img = new Image();
  img.onload = () => resolve({src: src.slice(0, 60), ok: img.naturalWidth > 0});
  img.onerror = () => resolve({src: src.slice(0, 60), ok: false});
  img.src = src;
}))).then(done);
"""
"""Every image the page shows (HTML images and the tiles plotly draws as SVG images), each decoded
again by the browser: a broken one reports ok=false."""


def test_demo_report_shows_every_image(driver, conceptworld, tmp_path, screenshots):
    results = run_demo("triangle", tmp_path, n_pairs=2, n_images=2, num_inference_steps=2, model=conceptworld,
                       tau=0.05, beside=None, progress=False)  # fmt: skip
    driver.get((tmp_path / "report.html").as_uri())
    _wait(lambda: driver.execute_script("return document.readyState === 'complete';"), 60, "the report to load")
    images = driver.execute_async_script(LOAD_IMAGES)
    plots = driver.execute_script("return document.querySelectorAll('.js-plotly-plot').length;")
    driver.save_screenshot(str(screenshots / "demo_report.png"))
    assert plots >= 4 and len(images) >= 4, f"the report drew {plots} figures and {len(images)} images"
    assert all(i["ok"] for i in images), f"broken images: {[i['src'] for i in images if not i['ok']]}"
    assert json.loads((tmp_path / "results.json").read_text())["concept"] == results["concept"]
