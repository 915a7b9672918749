"""The NiiVue 3-D view renders in JupyterLab 4 in headless Chromium with the network blocked.

A real JupyterLab server (this environment's) opens a notebook that calls
:func:`helpers.viewer.view_3d`; Chromium (the system's, driven by Playwright; no browser is
downloaded) runs it with every request that does not go to that server aborted and recorded.
The test reads the pixels of the widget's WebGL canvases:

- the default view (three planes + 3-D rendering) draws the image and both labels in esma's
  label colours;
- an axial view of a subject stored R-A-S puts the patient's right muscle on screen left in
  the radiological convention and on screen right in the neurological one (orientation from the
  affine, not from the storage order);
- no request left the machine.

Skips (with the reason) when Playwright, JupyterLab or a Chromium binary is missing; CI installs
Chromium with apt in ``.ci/run``.  Takes about 2 minutes on the shared 2-core development machine.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from child_process import stop_process

from helpers.labels import Label, LabelTable
from helpers.qc import label_colours

pytestmark = pytest.mark.e2e

LABELS = LabelTable((Label(1, "multifidus", "right"), Label(2, "multifidus", "left")))
REPO = Path(__file__).resolve().parents[1]


def _chromium() -> str | None:
    env = os.environ.get("ESMA_CHROMIUM")
    if env:
        return env
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _subject(folder: Path) -> tuple[Path, Path]:
    """A small subject stored R-A-S (+i = patient's right): right muscle at high i, left at low i.

    Drawn in storage order, the right muscle would land on screen right; only the affine puts it
    on screen left in the radiological convention.
    """
    mask = np.zeros((48, 40, 10), dtype=np.uint8)
    mask[30:40, 18:30, 1:-1] = 1  # right multifidus
    mask[8:18, 18:30, 1:-1] = 2  # left multifidus
    rng = np.random.default_rng(0)
    image = (rng.normal(200, 10, mask.shape) + 400 * (mask > 0)).astype(np.float32)
    image[:, :, :] += np.linspace(0, 100, mask.shape[1])[None, :, None]
    affine = np.diag([2.0, 2.0, 5.0, 1.0])
    affine[:3, 3] = [-48.0, -40.0, -25.0]
    img_path, mask_path = folder / "sub-ras_T2w.nii.gz", folder / "sub-ras_dseg.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), img_path)
    nib.save(nib.Nifti1Image(mask, affine), mask_path)
    return img_path, mask_path


def _notebook(folder: Path, image: Path, mask: Path, labels: Path) -> Path:
    setup = "\n".join(
        [
            "from ipyniivue import SliceType",
            "from helpers.viewer import view_3d, view_3d_niivue",
            f"IMAGE, MASK, LABELS = {str(image)!r}, {str(mask)!r}, {str(labels)!r}",
        ]
    )
    axial = "{0}.opts.show_legend = False\n{0}.set_slice_type(SliceType.AXIAL)\n{0}"
    cells = [
        setup,
        "view_3d(IMAGE, MASK, LABELS, opacity=1.0, height=360)",
        "rad = view_3d(IMAGE, MASK, LABELS, opacity=1.0, height=300)\n" + axial.format("rad"),
        "neu = view_3d_niivue(IMAGE, MASK, LABELS, opacity=1.0, height=300, "
        "convention='neurological')\n" + axial.format("neu"),
    ]
    nb = {
        "cells": [
            {
                "cell_type": "code",
                "execution_count": None,
                "id": f"c{i}",
                "metadata": {},
                "outputs": [],
                "source": src,
            }
            for i, src in enumerate(cells)
        ],
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    path = folder / "view.ipynb"
    path.write_text(json.dumps(nb))
    return path


def _pixels(png: bytes) -> np.ndarray:
    from matplotlib.image import imread

    arr = imread(io.BytesIO(png), format="png")
    return np.round(arr[..., :3] * 255).astype(np.int16)


def _near(rgb: np.ndarray, colour: tuple[float, float, float], tol: int = 8) -> np.ndarray:
    target = np.array([round(c * 255) for c in colour], dtype=np.int16)
    return np.all(np.abs(rgb - target) <= tol, axis=-1)


@pytest.fixture(scope="module")
def jupyterlab(tmp_path_factory):
    pytest.importorskip("jupyterlab", reason="JupyterLab is not installed")
    pytest.importorskip("ipyniivue", reason="ipyniivue is not installed")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if _chromium() is None:
        pytest.skip("no Chromium (chromium, chromium-browser, google-chrome or $ESMA_CHROMIUM)")
    root = tmp_path_factory.mktemp("lab")
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "JUPYTER_CONFIG_DIR": str(root / ".jupyter"),
        "JUPYTER_RUNTIME_DIR": str(root / ".runtime"),
        "JUPYTERLAB_WORKSPACES_DIR": str(root / ".workspaces"),
        "IPYTHONDIR": str(root / ".ipython"),
    }
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}",
            "--ip=127.0.0.1", "--IdentityProvider.token=esma-test", "--allow-root",
            f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
            "--ServerApp.disable_check_xsrf=True",
        ],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"jupyter lab exited: {(root / 'server.log').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("jupyter lab did not start within 120 s")
        yield root, base
    finally:
        stop_process(proc)
        log.close()


def test_niivue_view_renders_offline_in_jupyterlab(jupyterlab):
    from playwright import sync_api as playwright_api

    chromium = _chromium()
    root, base = jupyterlab
    labels_path = root / "labels.json"
    labels_path.write_text(
        json.dumps({"labels": [{"value": x.value, "muscle": x.muscle, "side": x.side}
                               for x in LABELS.labels]})
    )
    image, mask = _subject(root)
    _notebook(root, image, mask, labels_path)
    colours = label_colours(LABELS)
    outside: list[str] = []
    served: list[str] = []

    def gate(route):
        url = route.request.url
        if url.startswith((base, "data:", "blob:")):
            served.append(url)
            route.continue_()
        else:
            outside.append(url)
            route.abort()

    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=chromium,
            headless=True,
            args=[
                "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                "--ignore-gpu-blocklist", "--no-sandbox",
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
            ],
        )  # fmt: skip
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1600})
            page.route("**/*", gate)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{base}/lab/tree/view.ipynb?token=esma-test", timeout=120_000)
            page.wait_for_function(
                """() => {
                    const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
                    const k = w && w.sessionContext && w.sessionContext.session
                        && w.sessionContext.session.kernel;
                    return k && k.status === 'idle';
                }""",
                timeout=120_000,
            )
            page.on(
                "console", lambda m: errors.append(m.text) if m.type == "error" else None
            )
            # one cell at a time, as a reader would: each view has drawn before the next starts
            page.evaluate("() => { window.jupyterapp.shell.currentWidget.content"
                          ".activeCellIndex = 0; }")
            run_next = (
                "() => window.jupyterapp.commands.execute('notebook:run-cell-and-select-next')"
            )
            page.evaluate(run_next)  # imports and paths
            canvases = page.locator(".jp-OutputArea-output canvas")
            shots = []
            for i in range(3):
                page.evaluate(run_next)
                canvases.nth(i).wait_for(timeout=300_000)
                # generous: on a loaded 2-core machine a view took minutes to draw
                keep = root / f"canvas{i}.png"
                shots.append(_wait_for_labels(canvases.nth(i), colours, 300, keep))
            page.screenshot(path=str(root / "page.png"), full_page=True)  # kept for failures
        finally:
            browser.close()
    assert not outside, f"requests left the machine: {outside[:5]}"
    assert len(served) > 20  # the gate saw JupyterLab's own requests
    drawn = [all(_near(s, c).sum() > 50 for c in colours.values()) for s in shots]
    assert all(drawn), f"views without both label colours after 300 s: {drawn}; {root}; {errors}"
    multi, rad, neu = shots
    right, left = colours[1], colours[2]
    # the default view: the image (grey levels) and both labels in esma's colours
    grey = (np.ptp(multi, axis=-1) < 6) & (multi.mean(axis=-1) > 40)
    assert grey.mean() > 0.02, f"too few image pixels drawn ({grey.mean():.3%})"
    assert _near(multi, right).sum() > 50, errors
    assert _near(multi, left).sum() > 50, errors
    # orientation from the affine: right muscle on screen left in radiological convention
    for shot, right_first in ((rad, True), (neu, False)):
        xr = np.nonzero(_near(shot, right))[1]
        xl = np.nonzero(_near(shot, left))[1]
        assert xr.size > 50
        assert xl.size > 50
        assert (xr.mean() < xl.mean()) == right_first, (xr.mean(), xl.mean())


def _wait_for_labels(canvas, colours, timeout: float, keep: Path) -> np.ndarray:
    """A screenshot of ``canvas`` once it shows both label colours (the last one at timeout).

    The last screenshot is also written to ``keep`` for a failure.
    """
    deadline = time.monotonic() + timeout
    while True:
        png = canvas.screenshot()
        keep.write_bytes(png)
        shot = _pixels(png)
        if all(_near(shot, c).sum() > 50 for c in colours.values()):
            return shot
        if time.monotonic() > deadline:
            return shot
        time.sleep(2)
