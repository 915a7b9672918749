"""The HTML reports open in a real browser: headless Chromium via the DevTools protocol.

For the index and each notebook report of the end-to-end run (built by
``test_pipeline.ci_runs``, shared on disk when both files run in one session): the page loads,
every image decodes (``naturalWidth > 0``), nothing is logged as a console error, exception or
failed load, and a screenshot is saved.  Skipped, with the reason, when Chromium is absent
(``.ci/run`` installs Debian's ``chromium``).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from child_process import stop_process

from helpers import runner

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--hide-scrollbars",
    "--mute-audio",
    "--remote-debugging-port=0",
    "--window-size=1280,1600",
)


def _chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


class DevTools:
    """A minimal Chrome DevTools protocol client over one page's websocket."""

    def __init__(self, url: str) -> None:
        import websocket

        self.ws = websocket.create_connection(url, timeout=60, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, event: str, timeout_s: float = 60.0) -> dict:
        for seen in self.events:
            if seen.get("method") == event:
                return seen
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            message = json.loads(self.ws.recv())
            self.events.append(message)
            if message.get("method") == event:
                return message
        raise TimeoutError(event)

    def drain(self, seconds: float) -> None:
        """Collect events for a while (late console messages, image decoding)."""
        import websocket

        self.ws.settimeout(0.2)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with contextlib.suppress(websocket.WebSocketTimeoutException):
                self.events.append(json.loads(self.ws.recv()))
        self.ws.settimeout(60)

    def close(self) -> None:
        self.ws.close()


@contextlib.contextmanager
def chromium(profile: Path):
    exe = _chromium()
    proc = subprocess.Popen(
        [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not port_file.is_file() or not port_file.read_text().strip():
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail(f"chromium did not start (exit code {proc.poll()})")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        yield port
    finally:
        stop_process(proc)


def open_page(port: str, url: str, screenshot: Path) -> dict:
    """Load ``url`` in a fresh tab; return console problems, images and the page title."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/json/new?about:blank", method="PUT")
    with urllib.request.urlopen(request, timeout=30) as r:
        target = json.loads(r.read())
    tab = DevTools(target["webSocketDebuggerUrl"])
    try:
        for domain in ("Page", "Runtime", "Log"):
            tab.call(f"{domain}.enable")
        tab.call(
            "Emulation.setDeviceMetricsOverride",
            width=1280,
            height=1600,
            deviceScaleFactor=1,
            mobile=False,
        )
        tab.call("Page.navigate", url=url)
        tab.wait_for("Page.loadEventFired")
        tab.drain(1.0)
        result = tab.call(
            "Runtime.evaluate",
            returnByValue=True,
            expression="JSON.stringify({title: document.title, "
            "text: document.body.innerText.length, "
            "images: Array.from(document.images).map(i => ({src: i.src.slice(0, 30), "
            "complete: i.complete, width: i.naturalWidth, alt: i.alt}))})",
        )
        page = json.loads(result["result"]["value"])
        shot = tab.call("Page.captureScreenshot", format="png")
        screenshot.write_bytes(base64.b64decode(shot["data"]))
    finally:
        tab.close()
    problems = []
    for event in tab.events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            problems.append(f"console.{params['type']}: {params.get('args')}")
        elif method == "Runtime.exceptionThrown":
            problems.append(f"exception: {params.get('exceptionDetails', {}).get('text')}")
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            problems.append(f"log: {entry.get('text')} {entry.get('url', '')}")
    page["problems"] = problems
    return page


@pytest.fixture(scope="module")
def e2e_run(tmp_path_factory) -> Path:
    if _chromium() is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run does it)")
    pytest.importorskip("websocket", reason="websocket-client (a jupyter_server dependency)")
    from test_pipeline import ci_runs

    return Path(ci_runs(tmp_path_factory.getbasetemp())["runs"][0])


@pytest.mark.e2e
def test_reports_load_in_chromium_without_errors(e2e_run, tmp_path_factory):
    # screenshots go to the session's temporary folder, or to $ESMA_SCREENSHOT_DIR when set
    shots = Path(os.environ.get("ESMA_SCREENSHOT_DIR") or tmp_path_factory.getbasetemp())
    shots = shots / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    pages = ["index", *runner.NOTEBOOKS]
    # a control page with the faults the check must catch (proves the check can fail)
    control = tmp_path_factory.mktemp("control") / "control.html"
    control.write_text(
        "<html><body><p>control</p><img src='missing.png' alt='x'>"
        "<script>console.error('planted error'); undefined_call();</script>"
        "</body></html>"
    )
    with chromium(tmp_path_factory.mktemp("chromium-profile")) as port:
        bad = open_page(port, control.as_uri(), shots / "control.png")
        results = {
            name: open_page(port, (e2e_run / f"{name}.html").as_uri(), shots / f"{name}.png")
            for name in pages
        }
    assert any("planted error" in p for p in bad["problems"])
    assert any(p.startswith("exception:") for p in bad["problems"])
    assert any("missing.png" in p for p in bad["problems"])  # failed load is logged
    assert [img["width"] for img in bad["images"]] == [0]
    for name, page in results.items():
        assert page["problems"] == [], f"{name}: {page['problems']}"
        assert page["text"] > 200, f"{name}: page has content"
        broken = [img for img in page["images"] if not img["complete"] or img["width"] == 0]
        assert broken == [], f"{name}: images that did not load: {broken}"
        assert (shots / f"{name}.png").stat().st_size > 10_000, f"{name}: screenshot"
    assert results["index"]["title"].startswith("esma: ci run ")
    for name in ("02_qc", "03_metrics", "04_statistics"):
        assert len(results[name]["images"]) >= 2, f"{name}: figures shown"
        assert all(img["src"].startswith("data:image/") for img in results[name]["images"])
        assert all(img["alt"] for img in results[name]["images"])
