"""Interactive QC in JupyterLab: a widget browser over the cohort and a 3-D view.

Nothing here is needed by batch runs or the HTML reports: ``ipywidgets``, ``ipyniivue`` and
``itkwidgets`` are imported inside the functions, so importing this module costs nothing and
works without them.

- :func:`browse` builds an ipywidgets browser (works with ipywidgets 7 and 8): subject
  dropdown, slice slider, label-opacity slider, the subject's QC findings, and *Include* /
  *Exclude* buttons that record the reviewer's decision in ``qc_decisions.csv`` through
  :func:`helpers.qc.set_decision`.  The overlay is drawn by :func:`helpers.qc.render_slice`
  (radiological convention, orientation letters from the affine) into an ``Image`` widget.
- :func:`view_3d` opens a 3-D view of an image with its label mask: by default NiiVue
  (:func:`view_3d_niivue`, ipyniivue), or the itkwidgets viewer (``backend="itkwidgets"``).
  :func:`itkwidgets_support` says which Jupyter front ends the installed itkwidgets can render in.

Front ends (checked for the pinned versions)
--------------------------------------------
- The browser needs only ipywidgets: 7.8 (pinned; its JupyterLab extension
  ``@jupyter-widgets/jupyterlab-manager`` 3.1 supports JupyterLab 3 and 4) or 8.x (the tests
  pass with both).
- NiiVue (ipyniivue 2.4, an anywidget): its wheel bundles the whole NiiVue viewer
  (``ipyniivue/static/widget.js``) and anywidget's JupyterLab extension serves it, so it renders
  in JupyterLab 4 with no network.  ``tests/test_viewer_browser.py`` checks that in headless
  Chromium against a real JupyterLab server with every outside request blocked: the canvas
  draws the image and the labels in esma's colours, the patient's right on screen left
  (radiological) for a volume stored R-A-S, and no request leaves the machine.
- itkwidgets 0.32.x ships only a classic-Notebook extension (``nbextensions/itkwidgets``,
  written for ``@jupyter-widgets/base`` 1-3); it has no JupyterLab 4 extension, so in
  JupyterLab 4 its view cannot render ("model not found").  itkwidgets 1.0 pre-releases
  (``itkwidgets[lab]``) support JupyterLab 4 through the prebuilt
  ``imjoy-jupyterlab-extension`` but load the viewer app from the internet at run time.

Example (in a notebook)::

    from helpers.viewer import browse
    browse(cases, "reports/study/run/qc_decisions.csv", labels, qc=qc_table)
"""

from __future__ import annotations

import html
import importlib
import importlib.util
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from helpers.errors import EsmaError
from helpers.labels import LabelTable
from helpers.nifti import Volume, load_image, load_mask, slice_axis
from helpers.qc import (
    QC_COLUMNS,
    cases_frame,
    read_decisions,
    render_slice,
    set_decision,
    worst_status,
)

__all__ = [
    "BACKENDS_3D",
    "QCBrowser",
    "Unavailable",
    "browse",
    "itkwidgets_support",
    "view_3d",
    "view_3d_niivue",
]

log = logging.getLogger(__name__)


def _widgets() -> Any:
    try:
        return importlib.import_module("ipywidgets")
    except ImportError as exc:
        msg = "the QC browser needs ipywidgets (pip install ipywidgets) and JupyterLab"
        raise EsmaError(msg) from exc


class QCBrowser:
    """The widget browser returned by :func:`browse`; display it (or its ``.widget``).

    Attributes
    ----------
    widget : ipywidgets.VBox
        The whole browser.
    subject, slice, opacity : ipywidgets
        Dropdown, IntSlider and FloatSlider.
    reviewer, reason : ipywidgets.Text
        Who decides and why (written with the decision).
    include_button, exclude_button : ipywidgets.Button
        Record the decision for the shown subject.
    image : ipywidgets.Image
        The overlay (PNG).
    findings, message : ipywidgets.HTML
        QC findings of the subject; the last action's outcome or error.
    """

    def __init__(
        self,
        cases: pd.DataFrame,
        decisions_path: Path,
        labels: LabelTable,
        *,
        qc: pd.DataFrame | None,
        reviewer: str,
        opacity: float,
        convention: str,
    ) -> None:
        w = _widgets()
        self.cases = cases
        self.decisions_path = decisions_path
        self.labels = labels
        self.qc = qc
        self.convention = convention
        self._volumes: tuple[str, Volume, Volume] | None = None
        self.draw_count = 0

        self.subject = w.Dropdown(options=list(cases["subject"]), description="Subject")
        self.slice = w.IntSlider(
            value=0, min=0, max=0, description="Slice", continuous_update=False
        )
        self.opacity = w.FloatSlider(
            value=opacity,
            min=0.0,
            max=1.0,
            step=0.05,
            description="Opacity",
            continuous_update=False,
        )
        self.reviewer = w.Text(value=reviewer, description="Reviewer", placeholder="your name")
        self.reason = w.Text(value="", description="Reason", placeholder="why (optional)")
        self.include_button = w.Button(
            description="Include (pass)", button_style="success", icon="check"
        )
        self.exclude_button = w.Button(
            description="Exclude (fail)", button_style="danger", icon="times"
        )
        self.image = w.Image(format="png")
        self.findings = w.HTML()
        self.decision = w.HTML()
        self.message = w.HTML()
        self.widget = w.VBox(
            [
                w.HBox([self.subject, self.slice, self.opacity]),
                w.HBox([self.image, w.VBox([self.decision, self.findings])]),
                w.HBox([self.reviewer, self.reason]),
                w.HBox([self.include_button, self.exclude_button, self.message]),
            ]
        )
        self.subject.observe(self._on_subject, names="value")
        self.slice.observe(self._on_redraw, names="value")
        self.opacity.observe(self._on_redraw, names="value")
        self.include_button.on_click(lambda _b: self.decide("include"))
        self.exclude_button.on_click(lambda _b: self.decide("exclude"))
        self.show_subject(self.subject.value)

    # -- display -----------------------------------------------------------------------------
    def _ipython_display_(self) -> None:  # pragma: no cover - needs a front end
        from IPython.display import display

        display(self.widget)

    # -- state -------------------------------------------------------------------------------
    def _load(self, subject: str) -> tuple[Volume, Volume]:
        if self._volumes is None or self._volumes[0] != subject:
            row = self.cases[self.cases["subject"] == subject].iloc[0]
            self._volumes = (subject, load_image(row["image"]), load_mask(row["mask"]))
        return self._volumes[1], self._volumes[2]

    def show_subject(self, subject: str) -> None:
        """Load ``subject``, set the slice range (start on its most labelled slice), redraw."""
        try:
            _image, mask = self._load(subject)
        except EsmaError as exc:
            self.image.value = b""
            self.message.value = f"<b style='color:#b00'>{html.escape(str(exc))}</b>"
            return
        axis = slice_axis(mask.affine)
        counts = (mask.data > 0).sum(axis=tuple(i for i in range(3) if i != axis))
        best = int(counts.argmax())
        # hold redraws while the slider range moves
        self.slice.unobserve(self._on_redraw, names="value")
        self.slice.max = int(mask.data.shape[axis]) - 1
        self.slice.value = best
        self.slice.observe(self._on_redraw, names="value")
        self.findings.value = self._findings_html(subject)
        self.decision.value = self._decision_html(subject)
        self.message.value = ""
        self.redraw()

    def redraw(self) -> None:
        """Draw the current subject and slice with the current opacity."""
        subject = self.subject.value
        try:
            image, mask = self._load(subject)
            self.image.value = render_slice(
                image,
                mask,
                self.labels,
                int(self.slice.value),
                opacity=float(self.opacity.value),
                convention=self.convention,
                title=f"{subject} · slice {self.slice.value}",
            )
        except (EsmaError, ValueError) as exc:
            self.message.value = f"<b style='color:#b00'>{html.escape(str(exc))}</b>"
            return
        self.draw_count += 1

    def decide(self, decision: str) -> None:
        """Record ``decision`` for the shown subject in the decisions file."""
        subject = self.subject.value
        reviewer = self.reviewer.value.strip()
        if not reviewer:
            self.message.value = "<b style='color:#b00'>Enter your name as reviewer first.</b>"
            return
        try:
            set_decision(self.decisions_path, subject, decision, reviewer, self.reason.value)
        except EsmaError as exc:
            self.message.value = f"<b style='color:#b00'>{html.escape(str(exc))}</b>"
            return
        self.message.value = (
            f"Saved: {html.escape(subject)} &rarr; <b>{decision}</b> "
            f"({html.escape(self.decisions_path.name)})"
        )
        self.reason.value = ""
        self.decision.value = self._decision_html(subject)

    # -- observers ---------------------------------------------------------------------------
    def _on_subject(self, change: Mapping[str, Any]) -> None:
        self.show_subject(change["new"])

    def _on_redraw(self, _change: Mapping[str, Any]) -> None:
        self.redraw()

    # -- text --------------------------------------------------------------------------------
    def _findings_html(self, subject: str) -> str:
        if self.qc is None:
            return ""
        sub = self.qc[self.qc["subject"].astype(str) == subject]
        if sub.empty:
            return "<i>no QC rows for this subject</i>"
        status = worst_status(sub["status"])
        bad = sub[sub["status"] != "pass"]
        items = "".join(
            f"<li><b>{html.escape(r.status)}</b> {html.escape(r.check)} "
            f"{html.escape(' '.join(x for x in (r.side, r.muscle) if isinstance(x, str)))} "
            f"[{html.escape(str(r.level))}]: {html.escape(str(r.reason))}</li>"
            for r in bad.itertuples(index=False)
        )
        return f"<b>QC: {status}</b><ul style='margin:0'>{items}</ul>"

    def _decision_html(self, subject: str) -> str:
        if not self.decisions_path.exists():
            return "<i>no decision recorded yet</i>"
        try:
            df = read_decisions(self.decisions_path)
        except EsmaError as exc:
            return f"<b style='color:#b00'>{html.escape(str(exc))}</b>"
        hit = df[df["subject"] == subject]
        if hit.empty:
            return "<i>no decision recorded yet</i>"
        r = hit.iloc[0]
        return (
            f"Decision: <b>{html.escape(r['decision'])}</b> by {html.escape(r['reviewer'])} "
            f"({html.escape(r['timestamp'])}): {html.escape(r['reason'])}"
        )


def browse(
    cases: pd.DataFrame | Mapping[str, Any],
    decisions_path: str | Path,
    labels: LabelTable,
    *,
    qc: pd.DataFrame | None = None,
    reviewer: str = "",
    opacity: float = 0.45,
    convention: str = "radiological",
) -> QCBrowser:
    """An ipywidgets browser to review segmentations and record include/exclude decisions.

    Parameters
    ----------
    cases : DataFrame or mapping
        Columns ``subject``, ``image``, ``mask`` (paths), or ``{subject: (image, mask)}``.
    decisions_path : path
        ``qc_decisions.csv``; the buttons write it with :func:`helpers.qc.set_decision`
        (created if missing, other rows kept).
    labels : LabelTable
        Declared labels (colours and legend).
    qc : DataFrame, optional
        ``qc.csv`` rows (:data:`helpers.qc.QC_COLUMNS`); the subject's flags and fails are listed.
    reviewer : str
        Pre-filled reviewer name.
    opacity : float
        Initial label opacity (0-1).
    convention : {"radiological", "neurological"}
        Screen convention (see :mod:`helpers.qc`).

    Returns
    -------
    QCBrowser
        Display it as the last expression of a cell.

    Raises
    ------
    EsmaError
        ipywidgets missing, or the cases table lacks columns.
    """
    table = cases_frame(cases, ("subject", "image", "mask"), "browse: the cases table",
                        allow_empty=False)
    if qc is not None:
        missing = set(QC_COLUMNS) - set(qc.columns)
        if missing:
            msg = f"browse: the qc table lacks the column(s) {sorted(missing)}"
            raise EsmaError(msg)
    return QCBrowser(
        table,
        Path(decisions_path),
        labels,
        qc=qc,
        reviewer=reviewer,
        opacity=opacity,
        convention=convention,
    )


# --------------------------------------------------------------------------------------------
# 3-D view
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unavailable:
    """Shown instead of a viewer when it cannot work here; ``message`` says why and what to do."""

    message: str

    def __repr__(self) -> str:
        return self.message

    def _repr_html_(self) -> str:
        return f"<p><b>3-D view unavailable:</b> {html.escape(self.message)}</p>"


def itkwidgets_support() -> dict[str, Any]:
    """What the installed itkwidgets can render in (read from the Jupyter data folders).

    Returns
    -------
    dict
        ``version`` (None when not installed), ``labextension`` (a JupyterLab extension for it
        is installed: ``itkwidgets`` for 0.x, ``imjoy-jupyterlab-extension`` for 1.0),
        ``nbextension`` (the classic-Notebook extension is installed), ``jupyterlab``
        (installed JupyterLab version or None) and ``note`` (a sentence for users).
    """
    from importlib.metadata import PackageNotFoundError, version

    def _version(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    info: dict[str, Any] = {
        "version": _version("itkwidgets"),
        "jupyterlab": _version("jupyterlab"),
        "labextension": False,
        "nbextension": False,
    }
    try:
        from jupyter_core.paths import jupyter_path

        data_dirs = [Path(p) for p in jupyter_path()]
    except ImportError:  # pragma: no cover - jupyter_core ships with every Jupyter install
        data_dirs = []
    for d in data_dirs:
        for name in ("itkwidgets", "imjoy-jupyterlab-extension"):
            pkg = d / "labextensions" / name / "package.json"
            if pkg.is_file():
                try:
                    json.loads(pkg.read_text(encoding="utf-8"))
                    info["labextension"] = True
                except (OSError, ValueError):
                    pass
        if (d / "nbextensions" / "itkwidgets").is_dir():
            info["nbextension"] = True
    if info["version"] is None:
        info["note"] = "itkwidgets is not installed"
    elif info["labextension"]:
        info["note"] = "itkwidgets has a JupyterLab extension here"
    elif info["nbextension"]:
        info["note"] = (
            f"itkwidgets {info['version']} ships only a classic-Notebook extension: the 3-D view "
            f"renders in the classic Notebook (jupyter nbclassic / notebook 6), not in "
            f"JupyterLab {info['jupyterlab']}"
        )
    else:
        info["note"] = f"itkwidgets {info['version']} has no front-end extension installed"
    return info


#: The 3-D view back ends :func:`view_3d` offers; the first is the default.
BACKENDS_3D = ("niivue", "itkwidgets")


def _label_lut(labels: LabelTable) -> dict[str, Any]:
    """NiiVue label colour table: RGBA 0-255 and a name for each value 0..max (0 clear)."""
    from helpers.qc import label_colours

    colours = label_colours(labels)
    top = max(labels.values, default=0)
    lut = [0, 0, 0, 0]
    names = [""]
    for value in range(1, top + 1):
        if value in colours:
            lab = labels.by_value(value)
            lut += [round(c * 255) for c in colours[value]] + [255]
            names.append(f"{lab.side}_{lab.muscle}" if lab.side else lab.muscle)
        else:
            lut += [0, 0, 0, 0]
            names.append("")
    return {"lut": lut, "min": 0.0, "max": float(top), "labels": names}


def view_3d_niivue(
    image_path: str | Path,
    mask_path: str | Path,
    labels: LabelTable | str | Path,
    *,
    opacity: float = 0.5,
    height: int = 480,
    convention: str = "radiological",
) -> Any:
    """A NiiVue 3-D view (ipyniivue) of an image with its label mask, for JupyterLab 4, offline.

    The two NIfTI files are sent to the browser as they are (bytes through the widget's comm,
    nothing fetched from the network: ipyniivue's wheel bundles the NiiVue viewer, and anywidget
    serves it); NiiVue places them in world space from their sform/qform, so the three planes and
    the 3-D rendering are in anatomical orientation whatever the storage order.  The mask is a
    label layer with esma's label colours (:func:`helpers.qc.label_colours`, as in the QC
    overlays) and names (``side_muscle``, shown on hover and in the legend).

    Parameters
    ----------
    image_path, mask_path : path
        Image and its integer label mask (same grid).
    labels : LabelTable or path
        The declared labels (or the label file).
    opacity : float
        Label opacity (0-1).
    height : int
        Widget height in pixels.
    convention : {"radiological", "neurological"}
        Screen convention of the 2-D planes (patient's right on screen left or right).

    Returns
    -------
    ipyniivue.NiiVue
        Multiplanar view (axial, coronal, sagittal) plus a 3-D rendering.

    Raises
    ------
    EsmaError
        ipyniivue is not installed, the files are not readable NIfTI images, or the mask holds
        label values the label file does not declare.
    """
    from helpers.labels import load_labels

    try:
        ipyniivue = importlib.import_module("ipyniivue")
    except ImportError as exc:
        msg = f"the NiiVue 3-D view needs ipyniivue (pip install ipyniivue): {exc}"
        raise EsmaError(msg) from exc
    if convention not in ("radiological", "neurological"):
        msg = f"view_3d: convention must be 'radiological' or 'neurological', not {convention!r}"
        raise EsmaError(msg)
    table = labels if isinstance(labels, LabelTable) else load_labels(labels)
    load_image(image_path)  # readable, 3-D, finite: a clear error here instead of a blank canvas
    mask = load_mask(mask_path)
    table.check_values(set(map(int, np.unique(mask.data))) - {0}, mask_path)
    nv = ipyniivue.NiiVue(
        height=height,
        is_radiological_convention=convention == "radiological",
        multiplanar_show_render=ipyniivue.ShowRender.ALWAYS,
        is_orient_cube=True,
        show_legend=True,
        back_color=(0.0, 0.0, 0.0, 1.0),
    )
    nv.load_volumes(
        [
            {"path": Path(image_path), "colormap": "gray", "colorbar_visible": False},
            {
                "path": Path(mask_path),
                "opacity": float(opacity),
                "colorbar_visible": False,
                "colormap_label": ipyniivue.LUT(**_label_lut(table)),
            },
        ]
    )
    nv.set_slice_type(ipyniivue.SliceType.MULTIPLANAR)
    return nv


def view_3d(
    image_path: str | Path,
    mask_path: str | Path,
    labels: LabelTable | str | Path | None = None,
    *,
    backend: str = "niivue",
    opacity: float = 0.5,
    height: int = 480,
) -> Any:
    """3-D view of an image with its label mask, or a message when it cannot work here.

    Parameters
    ----------
    image_path, mask_path : path
        Image and its label mask.
    labels : LabelTable or path, optional
        Declared labels (colours and names); needed by the ``niivue`` back end.
    backend : {"niivue", "itkwidgets"}
        ``niivue`` (default, :func:`view_3d_niivue`): renders in JupyterLab 4 and the classic
        Notebook without network.  ``itkwidgets``: the itkwidgets 0.32 viewer, which renders only
        in the classic Notebook (see :func:`itkwidgets_support`); the arrays are passed in file
        (voxel) order with their spacing, so use the 2-D browser for left/right.
    opacity, height : float, int
        Label opacity and widget height (``niivue`` only).

    Returns
    -------
    widget or Unavailable
        The viewer widget; an :class:`Unavailable` whose ``message`` says what is missing when
        the back end's package does not import.

    Raises
    ------
    EsmaError
        Unknown back end, ``niivue`` without labels, unreadable files.
    """
    if backend not in BACKENDS_3D:
        msg = f"view_3d: backend must be one of {list(BACKENDS_3D)}, not {backend!r}"
        raise EsmaError(msg)
    if backend == "niivue":
        if labels is None:
            msg = "view_3d: the niivue view needs the label file (labels=...)"
            raise EsmaError(msg)
        if importlib.util.find_spec("ipyniivue") is None:
            return Unavailable(
                "ipyniivue is not installed; install it (pip install ipyniivue) to get the "
                "3-D view, or use helpers.viewer.browse for slice-by-slice review"
            )
        return view_3d_niivue(image_path, mask_path, labels, opacity=opacity, height=height)
    image = load_image(image_path)
    mask = load_mask(mask_path)
    try:
        itkwidgets = importlib.import_module("itkwidgets")
    except ImportError as exc:
        return Unavailable(
            f"itkwidgets is not installed or does not import ({exc}); install it to get the 3-D "
            "view, use backend='niivue', or helpers.viewer.browse for slice-by-slice review"
        )
    support = itkwidgets_support()
    if not support["labextension"]:
        log.warning("view_3d: %s", support["note"])
    spacing = [float(z) for z in image.zooms_mm]
    img = _itk_image(image.data, spacing)
    lab = _itk_image(mask.data.astype("uint8" if mask.data.max() < 256 else "uint16"), spacing)
    return itkwidgets.view(image=img, label_image=lab)


def _itk_image(data: Any, spacing: list[float]) -> Any:
    """ITK image (x = first array axis) with spacing, or the bare array when ITK is missing."""
    try:
        itk = importlib.import_module("itk")
    except ImportError:
        return data
    import numpy as np

    img = itk.image_from_array(np.ascontiguousarray(np.transpose(data)))
    img.SetSpacing(spacing)
    return img
