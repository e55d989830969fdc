"""Browser tests: a real JupyterLab driven by Playwright in the system Chromium.

Fixtures
- `chromium_path` (session): the system Chromium; the whole browser suite is skipped, with the reason,
  when there is none (or when Playwright is not installed, or when WM_SKIP_BROWSER=1).
- `jupyter_lab` (session): a `jupyter lab` of the project venv on 127.0.0.1, a free port, a random
  token, root dir = the repo, WM_PRESET=smoke, everything that would touch the network switched off,
  autosave off and saving refused by the server (a test never writes a notebook back), shut down with
  its kernels at the end. Its log is tests/artifacts/browser/jupyter-server.log.
- `lab_browser` (session): the system Chromium launched by Playwright.
- `lab` (function): a `Lab` page helper; kernels a test started are shut down after it, and a
  screenshot is saved when the test fails.

Helpers (methods of `Lab`, used by test_lab_notebooks.py)
- open(name), run_all() (Run > Run All Cells; waits for every execution count, fails with the
  traceback), outputs() / output_text(), errors() / assert_no_errors(), assert_matplotlib_images(),
  screenshot(tag) into tests/artifacts/browser/, settle() (kernel idle again).
- slider(description), drag_slider (mouse), nudge_slider (keyboard), slider_value; button(text),
  click_button; play_widget(), play() (play/pause), stop(), is_playing(); image_near(control) (the
  ipywidgets.Image in the same widget box), widget_box(control), image_bytes, wait_image_change,
  expect_image_change, watch_image / image_updates (count every new picture, however fast).

Environment: WM_CHROMIUM (path to the browser), WM_BROWSER_NOTEBOOKS (folder of the notebooks
under test, relative to the repo; default notebooks), WM_BROWSER_TIMEOUT (seconds for one notebook's
"Run All", default 900), WM_SKIP_BROWSER=1 (skip the suite), WM_REQUIRE_BROWSER=1 (fail instead
of skipping when the suite cannot run; .ci/run sets it).
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "tests" / "artifacts" / "browser"
# The lessons' folder, relative to the repo; another folder (under the repo) can stand in for it, e.g.
# to check that these tests catch a broken widget in a scratch copy of a notebook.
NOTEBOOKS_DIR = os.environ.get("WM_BROWSER_NOTEBOOKS", "notebooks").strip("/")
RUN_ALL_TIMEOUT_S = float(os.environ.get("WM_BROWSER_TIMEOUT", "900"))
ACTION_TIMEOUT_MS = 60_000  # one click / one widget round trip (the kernel may be busy with JAX)
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
]
STDERR = "application/vnd.jupyter.stderr"  # stderr streams and error outputs, as JupyterLab renders them
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# What an error looks like in an output's text: a Python traceback (IPython's too), a last line such
# as "SyntaxError: ..." and the widget manager's "Error displaying widget".
ERROR_TEXT = re.compile(
    r"Traceback \(most recent call last\)|^\w*(Error|Exception): |Error displaying widget", re.MULTILINE)

# Errors that the ipywidgets manager writes to the browser console (its own messages, or an Error
# whose stack runs through its bundle).
WIDGET_JS_ERROR = re.compile(r"jupyter-widgets|Could not (create|add|instantiate|send)"
                             r"|Error (displaying|setting state|serializing|creating)|model not found"
                             r"|Exception opening new comm")

# --------------------------------------------------------------------------------------------------
# browser and server


def pytest_configure(config):
    config.addinivalue_line("markers", "browser: runs a notebook in JupyterLab in Chromium "
                                       "(deselect with -m 'not browser')")


def find_chromium() -> str | None:
    """The system Chromium/Chrome: $WM_CHROMIUM, else the first of the usual names on PATH."""
    if os.environ.get("WM_CHROMIUM"):
        path = os.environ["WM_CHROMIUM"]
        return path if os.path.isfile(path) and os.access(path, os.X_OK) else None
    for name in ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"]:
        if path := shutil.which(name):
            return path
    return None


def unavailable(reason: str):
    """Skip the browser suite for `reason`, or fail with it where the suite is required
    (WM_REQUIRE_BROWSER=1, as .ci/run sets: CI must run these tests, not skip them)."""
    if os.environ.get("WM_REQUIRE_BROWSER") == "1":
        pytest.fail(f"the browser tests are required (WM_REQUIRE_BROWSER=1) but cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def chromium_path() -> str:
    if os.environ.get("WM_SKIP_BROWSER") == "1":
        unavailable("browser tests switched off by WM_SKIP_BROWSER=1")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        unavailable("playwright is not installed (uv sync --group test)")
    path = find_chromium()
    if path is None and os.environ.get("WM_CHROMIUM"):
        unavailable(f"WM_CHROMIUM={os.environ['WM_CHROMIUM']} is not an executable file")
    if path is None:
        unavailable("no system Chromium found (looked for $WM_CHROMIUM, chromium, chromium-browser, "
                    "google-chrome on PATH); install it with `apt-get install -y chromium`")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Saving is refused by the server (HTTP 403), so a test can never write outputs into a committed
# notebook, whatever the page does; autosave is also off in the user settings below.
SERVER_CONFIG = '''
from tornado.web import HTTPError

def _refuse_save(model, path, contents_manager, **kwargs):
    raise HTTPError(403, f"browser tests: saving {path} is disabled")

c.FileContentsManager.pre_save_hook = _refuse_save  # applied twice: one harmless "Overriding" warning
c.ContentsManager.allow_hidden = True
c.ServerApp.terminals_enabled = False
'''
USER_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
    # Every cell in the DOM (no virtual scrolling), so outputs can be read without scrolling.
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
}
PAGE_CONFIG = {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True,
                                      "@jupyterlab/extensionmanager-extension": True}}


@dataclass
class JupyterLab:
    url: str
    token: str
    process: subprocess.Popen
    log_path: Path

    def api(self, method: str, path: str, timeout: float = 30) -> object:
        req = urllib.request.Request(f"{self.url}{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
        return json.loads(body) if body else None

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def log_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")

    def shutdown_kernels(self) -> None:
        for s in self.api("GET", "/api/sessions"):
            try:
                self.api("DELETE", f"/api/sessions/{s['id']}")
            except urllib.error.URLError:
                pass


@pytest.fixture(scope="session")
def jupyter_lab(chromium_path, tmp_path_factory) -> JupyterLab:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    home = tmp_path_factory.mktemp("jupyter")
    config_dir, settings_dir = home / "config", home / "user-settings"
    (config_dir / "labconfig").mkdir(parents=True)
    (config_dir / "jupyter_server_config.py").write_text(SERVER_CONFIG)
    (config_dir / "labconfig" / "page_config.json").write_text(json.dumps(PAGE_CONFIG))
    for plugin, values in USER_SETTINGS.items():
        f = settings_dir / f"{plugin}.jupyterlab-settings"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(json.dumps(values))
    env = dict(os.environ, WM_PRESET="smoke", JUPYTER_CONFIG_DIR=str(config_dir),
               JUPYTER_DATA_DIR=str(home / "data"),
               JUPYTER_RUNTIME_DIR=str(home / "runtime"), JUPYTER_PLATFORM_DIRS="1",
               PYTHONUNBUFFERED="1")
    env.pop("MPLBACKEND", None)  # the repo conftest sets Agg; the kernel must use the inline backend
    env.pop("JUPYTER_TOKEN", None)
    token, port = secrets.token_hex(24), free_port()
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root",
           "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={REPO}",
           "--ServerApp.disable_check_xsrf=True", "--LabApp.news_url=None",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
           "--LabApp.extension_manager=readonly", "--LabApp.expose_app_in_browser=True",
           f"--LabApp.user_settings_dir={settings_dir}",
           f"--LabApp.workspaces_dir={home / 'workspaces'}"]
    log_path = ARTIFACTS / "jupyter-server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        lab = JupyterLab(f"http://127.0.0.1:{port}", token, proc, log_path)
        try:
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"jupyter lab exited with code {proc.returncode} before answering; "
                                       f"log {log_path}:\n{lab.log_since(0)[-4000:]}")
                try:
                    lab.api("GET", "/api/status", timeout=5)
                    urllib.request.urlopen(f"{lab.url}/lab?token={token}", timeout=30).read()
                    break
                except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"jupyter lab did not answer on {lab.url} within 120 s; "
                                           f"log {log_path}:\n{lab.log_since(0)[-4000:]}") from e
                    time.sleep(0.5)
            yield lab
        finally:
            try:
                lab.api("POST", "/api/shutdown", timeout=30)  # stops its kernels too
                proc.wait(timeout=60)
            except Exception:  # noqa: BLE001  (not answering: stopped below)
                pass
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


@pytest.fixture(scope="session")
def lab_browser(chromium_path):
    from playwright.sync_api import sync_playwright

    # Playwright gives every launch a fresh temporary profile (user-data-dir) and removes it after.
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture
def lab(request, lab_browser, jupyter_lab):
    context = lab_browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(ACTION_TIMEOUT_MS)
    page = context.new_page()
    console: list[str] = []
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
    helper = Lab(page, jupyter_lab, request.node.name, console)
    for old in ARTIFACTS.glob(f"{helper.shot_prefix()}-*.png"):  # a previous run's screenshots
        old.unlink()
    try:
        yield helper
    finally:
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            try:
                helper.screenshot("failed")
            except Exception:
                pass
        context.close()
        try:
            jupyter_lab.shutdown_kernels()
        except Exception:
            pass


# --------------------------------------------------------------------------------------------------
# the page helper

# The notebook as the page holds it, kept light: no output is serialised but the errors.
JS_STATE = r"""() => {
  const app = window.jupyterapp;
  const w = app && app.shell.currentWidget;
  if (!w || !w.content || !w.context || !w.sessionContext) return null;
  const kernel = w.sessionContext.session && w.sessionContext.session.kernel;
  const cells = w.content.widgets.map((cell, index) => {
    const m = cell.model, errors = [];
    const outputs = m.outputs;
    for (let k = 0; outputs && k < outputs.length; k++) {
      const o = outputs.get(k);
      if (o.type === 'error') {
        const j = o.toJSON();
        errors.push({ename: j.ename, evalue: j.evalue, traceback: (j.traceback || []).join('\n')});
      }
    }
    const prompt = cell.node.querySelector('.jp-InputPrompt');
    return {index, type: m.type, source: m.sharedModel.getSource(),
            execution_count: m.type === 'code' ? (m.executionCount ?? null) : null,
            running: m.executionState === 'running' || !!(prompt && prompt.textContent.includes('*')),
            errors};
  });
  return {path: w.context.path, status: kernel ? kernel.status : 'no-kernel',
          busy: cells.some(c => c.running), cells};
}"""

# Kernel output that belongs to no cell: what a widget callback prints or raises (ipykernel's comm
# manager logs the exception to stderr while handling the comm message, and JupyterLab shows it only
# in its log console). Recorded from the notebook's session from the moment it is opened.
JS_HOOK_KERNEL_OUTPUT = r"""() => {
  const w = window.jupyterapp.shell.currentWidget;
  window.__wmKernelOutput = window.__wmKernelOutput || [];
  if (w.__wmHooked) return;
  w.__wmHooked = true;
  w.sessionContext.iopubMessage.connect((_, msg) => {
    const type = msg.header.msg_type, parent = msg.parent_header && msg.parent_header.msg_type;
    if (!['stream', 'error', 'display_data', 'execute_result'].includes(type)) return;
    if (parent === 'execute_request') return;  // shown in its cell
    const c = msg.content;
    const text = type === 'stream' ? c.text
      : type === 'error' ? `${c.ename}: ${c.evalue}\n${(c.traceback || []).join('\n')}`
      : String((c.data && c.data['text/plain']) || '');
    window.__wmKernelOutput.push({type, name: c.name || '', parent: parent || '', text});
  });
}"""

JS_CURRENT_ID = "() => window.jupyterapp.shell.currentWidget.id"

JS_OUTPUTS = """() => {
  const w = window.jupyterapp.shell.currentWidget;
  return w.content.widgets.map((cell, i) => ({index: i, type: cell.model.type,
     outputs: Array.from(cell.node.querySelectorAll('.jp-OutputArea-output')).map(o => ({
        mime: o.getAttribute('data-mime-type') || '', text: o.textContent || ''}))}));
}"""

# The bytes shown by an <img> (blob: URLs of ipywidgets.Image, data: URLs of matplotlib), base64.
JS_IMG_BYTES = """async (img) => {
  if (!img.src) return '';
  const r = await fetch(img.src);
  const buf = new Uint8Array(await r.arrayBuffer());
  let s = '';
  for (let i = 0; i < buf.length; i += 0x8000) s += String.fromCharCode(...buf.subarray(i, i + 0x8000));
  return btoa(s);
}"""

# The smallest widget box around `el` that also holds an ipywidgets.Image: the widget a control
# belongs to, and the image it drives. Both are tagged so that locators can find them again.
JS_WIDGET_BOX = """(el, tag) => {
  for (let n = el.parentElement; n; n = n.parentElement) {
    const img = n.querySelector('img.widget-image');
    if (img) { img.setAttribute('data-wm-image', tag); n.setAttribute('data-wm-box', tag); return true; }
    if (n.classList.contains('jp-OutputArea-output')) return false;
  }
  return false;
}"""


def _clean(text: str) -> str:
    return ANSI.sub("", text)


def _tail(text: str, lines: int) -> str:
    parts = text.rstrip().splitlines()
    return "\n".join((["..."] if len(parts) > lines else []) + parts[-lines:])


@dataclass
class Lab:
    page: object
    server: JupyterLab
    test_name: str
    console: list[str] = field(default_factory=list)
    notebook: str = ""
    panel: object = None
    _log_mark: int = 0
    _shots: int = 0

    # ---- notebooks ---------------------------------------------------------------------------

    def open(self, name: str) -> None:
        """Open NOTEBOOKS_DIR/NAME in Lab and wait until its kernel is idle."""
        self.notebook = name
        self._log_mark = self.server.log_size()
        self.console.clear()
        # A workspace of its own, so Lab does not reopen the tabs of an earlier test.
        workspace = f"wm-{secrets.token_hex(4)}"
        self.page.goto(f"{self.server.url}/lab/workspaces/{workspace}/tree/{NOTEBOOKS_DIR}/{name}"
                       f"?token={self.server.token}")
        self._wait(lambda s: s["path"].endswith(f"{NOTEBOOKS_DIR}/{name}") and s["status"] == "idle",
                   180, f"{name} to open and its kernel to start")
        self.panel = self.page.locator(f"[id='{self.page.evaluate(JS_CURRENT_ID)}']")
        self.page.evaluate(JS_HOOK_KERNEL_OUTPUT)
        self.panel.locator(".jp-Cell").first.wait_for()
        dialog = self.page.locator(".jp-Dialog")
        if dialog.count():
            self.screenshot("dialog")
            raise AssertionError(f"unexpected JupyterLab dialog after opening {name}: "
                                 f"{dialog.first.text_content()}")

    def state(self) -> dict | None:
        try:
            return self.page.evaluate(JS_STATE)
        except Exception:  # the page is still loading (the app is not there yet)
            return None

    def _wait(self, done, timeout_s: float, what: str, poll_s: float = 0.5) -> dict:
        deadline, s = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            s = self.state()
            if s is not None and done(s):
                return s
            time.sleep(poll_s)
        self.screenshot("timeout")
        raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}; kernel "
                             f"{s and s['status']}; server log:\n{_tail(self.server_log(), 40)}")

    def run_all(self, timeout_s: float = RUN_ALL_TIMEOUT_S) -> dict:
        """Run > Run All Cells from the menu bar; wait until the kernel is idle and every code cell
        has an execution count (or one failed), then fail with the traceback if any cell errored."""
        self.page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
        self.page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
        t0, idle_since = time.monotonic(), None

        def finished(s):
            nonlocal idle_since
            if s["status"] in ("dead", "autorestarting", "restarting", "no-kernel"):
                self.screenshot("kernel-died")
                raise AssertionError(f"{self.notebook}: the kernel is {s['status']} during Run All "
                                     f"(it died: out of memory?); server log:\n"
                                     f"{_tail(self.server_log(), 40)}")
            code = [c for c in s["cells"] if c["type"] == "code" and c["source"].strip()]
            settled = s["status"] == "idle" and not s["busy"]
            complete = all(c["execution_count"] is not None for c in code) or \
                any(c["errors"] for c in code)  # Run All stops at the first error
            if not (settled and complete):
                idle_since = None
                return False
            idle_since = idle_since or time.monotonic()
            return time.monotonic() - idle_since > 1.5  # idle between two cells is not the end

        s = self._wait(finished, timeout_s, f"Run All Cells of {self.notebook} to finish")
        self.run_all_s = time.monotonic() - t0
        self.screenshot("ran")
        self.assert_no_errors(s)
        return s

    def outputs(self) -> list[dict]:
        """Per cell: index, type and its outputs' (mime type, text) as rendered in the page."""
        cells = self.page.evaluate(JS_OUTPUTS)
        for c in cells:
            for o in c["outputs"]:
                o["text"] = _clean(o["text"])
        return cells

    def output_text(self) -> str:
        return "\n".join(o["text"] for c in self.outputs() for o in c["outputs"])

    def kernel_output(self) -> list[dict]:
        """Kernel output that belongs to no cell (widget callbacks), ANSI codes removed."""
        out = self.page.evaluate("() => window.__wmKernelOutput || []")
        for o in out:
            o["text"] = _clean(o["text"])
        return out

    def server_log(self) -> str:
        return self.server.log_since(self._log_mark)

    def errors(self, state: dict | None = None) -> list[str]:
        """Every error visible to a reader: error outputs of the notebook model, output text that
        holds a traceback or "Error displaying widget", kernel output outside any cell that holds
        an error (an exception in a widget callback lands there, shown only in Lab's log console),
        tracebacks in the server log, and JS errors of widget views in the browser console."""
        state = state or self.state()
        cells = {c["index"]: c for c in state["cells"]}

        def where(i: int) -> str:
            n = cells[i]["execution_count"] if i in cells else None
            return f"cell {i + 1} of {len(cells)} (In [{n if n is not None else ' '}])"

        def source(i: int) -> str:
            return _tail(cells[i]["source"], 25) if i in cells else ""

        found = []
        for c in state["cells"]:
            for e in c["errors"]:
                found.append(f"{where(c['index'])} raised {e['ename']}: {e['evalue']}\n--- source:\n"
                             f"{source(c['index'])}\n--- traceback:\n{_tail(_clean(e['traceback']), 60)}")
        for c in self.outputs():
            for o in c["outputs"]:
                widget_error = "Error displaying widget" in o["text"]
                traceback = o["mime"] == STDERR and ERROR_TEXT.search(o["text"]) and \
                    not cells.get(c["index"], {}).get("errors")  # an error output: reported above
                if widget_error or traceback:
                    found.append(f"{where(c['index'])} shows an error ({o['mime'] or 'widget'}):\n"
                                 f"{_tail(o['text'], 60)}\n--- source:\n{source(c['index'])}")
        seen: dict[str, int] = {}
        for o in self.kernel_output():
            if o["type"] == "error" or ERROR_TEXT.search(o["text"]):
                seen[o["text"]] = seen.get(o["text"], 0) + 1
        for text, n in list(seen.items())[:3]:
            found.append(f"kernel output outside any cell, {n} time(s) (a widget callback raised?): "
                         f"{text.splitlines()[0]}\n...\n{_tail(text, 40)}")
        log = self.server_log()
        if "Traceback (most recent call last)" in log or "Exception in comm_msg" in log:
            found.append(f"kernel/server traceback in {self.server.log_path}:\n{_tail(log, 60)}")
        widget_js = [m for m in self.console if WIDGET_JS_ERROR.search(m)]
        if widget_js:
            found.append("widget errors in the browser console:\n" + "\n".join(widget_js[-20:]))
        return found

    def settle(self, quiet_s: float = 1.0, timeout_s: float = 120) -> None:
        """Wait until the kernel has been idle for `quiet_s` (every widget message handled)."""
        deadline, idle_since = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            s = self.state()
            if s and s["status"] == "idle":
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since >= quiet_s:
                    return
            else:
                idle_since = None
            time.sleep(0.2)
        raise AssertionError(f"{self.notebook}: the kernel stayed busy for {timeout_s:.0f} s after "
                             f"a widget interaction")

    def assert_no_errors(self, state: dict | None = None) -> None:
        if state is None:
            self.settle()
        errs = self.errors(state)
        assert not errs, f"{self.notebook}: {len(errs)} error(s) in JupyterLab:\n\n" + "\n\n".join(errs)

    def matplotlib_images(self):
        """Rendered image/png outputs (matplotlib figures) that have loaded."""
        return self.panel.locator(".jp-OutputArea-output[data-mime-type='image/png'] img")

    def assert_matplotlib_images(self, at_least: int = 1) -> int:
        imgs = self.matplotlib_images()
        loaded = sum(bool(imgs.nth(i).evaluate("i => i.complete && i.naturalWidth > 0"))
                     for i in range(imgs.count()))
        assert loaded >= at_least, (f"{self.notebook}: expected at least {at_least} matplotlib "
                                    f"figure(s) shown as <img>, found {loaded} loaded of {imgs.count()}")
        imgs.first.scroll_into_view_if_needed()
        return loaded

    def shot_prefix(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.test_name).strip("_")

    def screenshot(self, tag: str) -> Path:
        """Save the page as tests/artifacts/browser/TEST-NN-TAG.png."""
        self._shots += 1
        tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", tag)
        path = ARTIFACTS / f"{self.shot_prefix()}-{self._shots:02d}-{tag}.png"
        self.page.screenshot(path=str(path))
        return path

    # ---- widgets -----------------------------------------------------------------------------

    def slider(self, description: str | re.Pattern, within=None):
        """The first ipywidgets slider (in the notebook, or inside the locator `within`) whose
        description is `description`: a string matches the whole label or its start followed by a
        space, bracket, colon or "="; a regex is searched."""
        pattern = description if isinstance(description, re.Pattern) else \
            re.compile(rf"^\s*{re.escape(description)}(\s|[\[(:=]|$)")
        scope = within if within is not None else self.panel
        loc = scope.locator(".widget-slider").filter(
            has=self.page.locator(".widget-label", has_text=pattern))
        if loc.count() == 0:
            labels = scope.locator(".widget-slider .widget-label").all_text_contents()
            raise AssertionError(f"{self.notebook}: no slider described {pattern.pattern!r}"
                                 f"{' in that widget' if within is not None else ''}; sliders there: "
                                 f"{labels}")
        return loc.first

    def slider_value(self, slider) -> str:
        return slider.locator(".widget-readout").first.text_content().strip()

    def drag_slider(self, slider, fraction: float = 0.35) -> None:
        """Mouse down on the handle, move by `fraction` of the track width, mouse up."""
        handle = slider.locator(".noUi-handle").first
        handle.scroll_into_view_if_needed()
        track = slider.locator(".noUi-target").first.bounding_box()
        box = handle.bounding_box()
        x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        dx = fraction * track["width"]
        if x + dx > track["x"] + track["width"]:  # near the end: drag the other way
            dx = -dx
        self.page.mouse.move(x, y)
        self.page.mouse.down()
        self.page.mouse.move(x + dx, y, steps=12)
        self.page.mouse.up()

    def nudge_slider(self, slider, presses: int = 3, key: str = "ArrowRight") -> None:
        """Focus the handle and press an arrow key (what a keyboard user does)."""
        handle = slider.locator(".noUi-handle").first
        handle.scroll_into_view_if_needed()
        handle.focus()
        for _ in range(presses):
            self.page.keyboard.press(key)

    def button(self, text: str):
        loc = self.panel.locator("button.widget-button, button.jupyter-button").filter(
            has_text=re.compile(rf"^\s*{re.escape(text)}\s*$"))
        if loc.count() == 0:
            labels = self.panel.locator("button.widget-button").all_text_contents()
            raise AssertionError(f"{self.notebook}: no widget button {text!r}; buttons: {labels}")
        return loc.first

    def click_button(self, text: str) -> None:
        b = self.button(text)
        b.scroll_into_view_if_needed()
        b.click()

    def play_widget(self, n: int = 0):
        loc = self.panel.locator(".widget-play")
        assert loc.count() > n, f"{self.notebook}: expected a Play widget, found {loc.count()}"
        return loc.nth(n)

    def play(self, play_widget) -> None:
        """Press the play/pause button of an ipywidgets.Play (its first button)."""
        b = play_widget.locator("button").first
        b.scroll_into_view_if_needed()
        b.click()

    def stop(self, play_widget) -> None:
        play_widget.locator("button").nth(1).click()

    def is_playing(self, play_widget) -> bool:
        return play_widget.locator("button i.fa-pause").count() > 0

    def widget_box(self, control):
        """(box, image): the smallest widget box that holds `control` and an ipywidgets.Image, and
        that image (the first in the box)."""
        tag = secrets.token_hex(4)
        if not control.evaluate(JS_WIDGET_BOX, tag):
            raise AssertionError(f"{self.notebook}: no ipywidgets.Image in the same widget box as "
                                 f"the control")
        return (self.panel.locator(f"[data-wm-box='{tag}']"),
                self.panel.locator(f"img[data-wm-image='{tag}']"))

    def image_near(self, control):
        """The ipywidgets.Image in the smallest widget box that holds `control` too."""
        return self.widget_box(control)[1]

    def image_bytes(self, img) -> bytes:
        return base64.b64decode(img.evaluate(JS_IMG_BYTES))

    def watch_image(self, img) -> None:
        """Start counting the updates of `img` in the page (every new picture, however fast)."""
        img.evaluate("""(img) => {
          img.__wmUpdates = 0;
          if (img.__wmObserver) img.__wmObserver.disconnect();
          img.__wmObserver = new MutationObserver(() => { img.__wmUpdates += 1; });
          img.__wmObserver.observe(img, {attributes: true, attributeFilter: ['src']});
        }""")

    def image_updates(self, img) -> int:
        """How many times `img` got a new picture since watch_image(img)."""
        return img.evaluate("(img) => img.__wmUpdates || 0")

    def expect_image_change(self, img, action, what: str, timeout_s: float = 60) -> bytes:
        """Let the kernel settle, do `action()`, wait until `img` changes, let the kernel settle
        again (so queued slider events cannot pass for the next action's effect), check that
        nothing raised; return the image shown in the end."""
        self.settle()
        before = self.image_bytes(img)
        action()
        self.wait_image_change(img, before, what, timeout_s)
        self.assert_no_errors()
        return self.image_bytes(img)

    def wait_image_change(self, img, before: bytes, what: str, timeout_s: float = 60) -> bytes:
        """Wait until `img` shows other bytes than `before`; fail with any errors seen."""
        t0 = time.monotonic()
        while time.monotonic() < t0 + timeout_s:
            now = self.image_bytes(img)
            if now and now != before:
                return now
            if any(o["type"] == "error" or ERROR_TEXT.search(o["text"]) for o in self.kernel_output()):
                break  # a callback raised: no point waiting
            time.sleep(0.25)
        self.screenshot("image-unchanged")
        errs = self.errors()
        raise AssertionError(f"{self.notebook}: the image did not change after {what} "
                             f"(waited {time.monotonic() - t0:.0f} s)"
                             + ("; errors:\n\n" + "\n\n".join(errs) if errs else ""))
