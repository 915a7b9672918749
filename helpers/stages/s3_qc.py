"""Stage 3, QC: per-subject checks and mosaics, the cohort outlier checks and the reviewer's
decisions.

Declared output: ``qc.csv``, ``qc_summary.csv``, ``qc_decisions.csv`` (copy) and
``excluded_qc.csv`` in the run folder; the decisions file at study level.
"""

from __future__ import annotations

import html
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from helpers.config import Study
from helpers.errors import EsmaError
from helpers.files import atomic_write_bytes, atomic_write_text
from helpers.runs import (
    EXCLUDED_COLUMNS,
    RunPaths,
    StatusRow,
    record_stage,
    redact_paths,
    status_table,
    write_excluded,
    write_failures,
)
from helpers.stages.cached import (
    is_finished,
    mark_finished,
    split_finished,
    task_key,
)
from helpers.stages.s1_segment import (
    labels_for,
    read_segmentation,
)
from helpers.stages.s2_measure import (
    load_measurements,
    measure_stage,
)

if TYPE_CHECKING:
    from helpers.qc import QCSettings

log = logging.getLogger(__name__)


_QC_OUTPUTS = ("qc.csv", "mosaic.png")


@dataclass
class QCOutputs:
    """What :func:`qc_stage` produced.

    Attributes
    ----------
    qc : pandas.DataFrame
        ``qc.csv`` rows (:data:`helpers.qc.QC_COLUMNS`).
    summary : pandas.DataFrame
        One row per subject: status, counts and reasons, with the reviewer's decision.
    decisions : pandas.DataFrame
        The decisions file as now on disk.
    excluded : pandas.DataFrame
        subject, reason, source: subjects the decisions exclude.
    mosaics : dict
        Subject -> overlay mosaic PNG.
    measured : pandas.DataFrame
        The measurement stage's status table (the cohort outlier checks use the measurements).
    """

    qc: pd.DataFrame
    summary: pd.DataFrame
    decisions: pd.DataFrame
    excluded: pd.DataFrame
    mosaics: dict[str, Path]
    measured: pd.DataFrame


@dataclass(frozen=True)
class QCTask:
    """One subject's QC inputs (picklable, for any executor)."""

    subject: str
    image: str
    mask: str
    manual: str | None
    labels: str
    levels: str | None
    settings: QCSettings
    out_dir: str


def _qc_key(task: QCTask) -> dict[str, Any]:
    files = {
        "image": task.image,
        "mask": task.mask,
        "manual": task.manual,
        "labels": task.labels,
        "levels": task.levels,
    }
    return task_key(files, settings=task.settings.to_dict())


def qc_done(task: QCTask) -> bool:
    """True when the subject's QC rows and mosaic are finished with these inputs/settings."""
    return is_finished(Path(task.out_dir), _QC_OUTPUTS, _qc_key(task))


def _input_failure(subject: str, reason: str) -> pd.DataFrame:
    """The one ``qc.csv`` row of a subject whose QC could not look at its files: ``input`` fail."""
    from helpers import qc

    row = {
        "subject": subject,
        "level": qc.ALL_LEVELS,
        "muscle": "",
        "side": "",
        "check": "input",
        "status": "fail",
        "value": float("nan"),
        "reason": reason,
    }
    return pd.DataFrame([row], columns=list(qc.QC_COLUMNS))


def qc_subject(task: QCTask) -> dict[str, Any]:
    """QC one subject into its work folder (``qc.csv`` + ``mosaic.png``), or reuse it.

    The result counts as finished when its completion markers match the checksums of the
    image, mask, manual mask, labels and levels and the QC settings.

    Returns
    -------
    dict
        status (``computed`` / ``reused``), seconds, ``qc`` (path of the rows), ``mosaic``.
    """
    from helpers import qc
    from helpers.labels import load_labels
    from helpers.metrics import read_levels
    from helpers.nifti import check_same_grid, load_image, load_mask

    t0 = time.perf_counter()
    out = Path(task.out_dir)
    rows_csv, mosaic = (out / name for name in _QC_OUTPUTS)
    key = _qc_key(task)
    result = {"qc": str(rows_csv), "mosaic": str(mosaic)}
    if is_finished(out, _QC_OUTPUTS, key):
        return {"status": "reused", "seconds": time.perf_counter() - t0, **result}
    settings = task.settings
    labels = load_labels(task.labels)
    levels = read_levels(task.levels, task.subject) if task.levels else None
    try:
        image, mask = load_image(task.image), load_mask(task.mask)
        check_same_grid(image, mask)
        manual = load_mask(task.manual) if task.manual else None
        rows = qc.check_subject(
            task.subject,
            mask,
            labels,
            levels=levels,
            manual=manual,
            settings=settings,
            image=image,
        )
    except EsmaError as exc:
        # unreadable or off-grid files: one failing QC row naming the file, not a crash
        path = getattr(exc, "path", None)
        reason = f"{Path(path).name}: {exc.problem}" if path is not None else str(exc)
        rows = _input_failure(task.subject, reason)
        atomic_write_text(rows_csv, rows.to_csv(index=False))
        return {
            "status": "computed",
            "seconds": time.perf_counter() - t0,
            "qc": str(rows_csv),
            "mosaic": None,
        }
    qc.save_mosaic(
        image,
        mask,
        labels,
        mosaic,
        subject=task.subject,
        levels=levels,
        max_slices=qc.mosaic_slices_for(rows["status"], settings),
        opacity=settings.mosaic_opacity,
        convention=settings.convention,
        renderer=settings.mosaic_renderer,
    )
    atomic_write_text(rows_csv, rows.to_csv(index=False))
    mark_finished(out, _QC_OUTPUTS, key)
    return {"status": "computed", "seconds": time.perf_counter() - t0, **result}


def qc_stage(
    study: Study,
    paths: RunPaths,
    segmentation: pd.DataFrame,
    measured: pd.DataFrame | None = None,
    *,
    progress: bool = True,
) -> QCOutputs:
    """Quality control of the segmentations: checks, mosaics, qc.csv and the decisions file.

    The cohort outlier checks compare the subjects' areas and fat: ``measured`` is the measure
    stage's table (:func:`helpers.stages.s2_measure.measure_stage`); when None the stage runs
    here first.  Per-subject checks and overlay mosaics
    run through the study's executor and are kept in the work folder (``work/qc``), reused by
    later runs.  The reviewer's decisions file (``<output>/qc_decisions.csv``) gets a row for
    every subject it does not list yet (QC's suggestion: ``exclude`` on ``fail``); rows already
    there are never changed.  A copy of it goes to the run folder.
    """
    from helpers import qc
    from helpers.executor import TaskOutcome, run_tasks

    t0 = time.perf_counter()
    if measured is None:
        measured = measure_stage(study, paths, segmentation, stage="measure", progress=progress)
    ok = segmentation[(segmentation["status"] != "failed") & (segmentation["mask"] != "")]
    settings = study.qc_settings()
    tasks = {}
    for r in ok.itertuples(index=False):
        s = study.subject(str(r.subject))
        tasks[s.subject] = QCTask(
            subject=s.subject,
            image=str(s.image),
            mask=str(r.mask),
            manual=None if s.manual_mask is None else str(s.manual_mask),
            labels=labels_for(study, paths, str(r.status)),
            levels=None if s.levels is None else str(s.levels),
            settings=settings,
            out_dir=str(paths.work_dir / "qc" / s.subject),
        )
    reused, todo = split_finished(tasks, qc_done)
    outcomes = dict(
        run_tasks(qc_subject, todo, study.executor_config(), desc="QC", progress=progress)
    )
    for row in reused:
        task = tasks[row.subject]
        value = {
            "status": "reused",
            "seconds": row.seconds,
            "qc": str(Path(task.out_dir) / "qc.csv"),
            "mosaic": str(Path(task.out_dir) / "mosaic.png"),
        }
        outcomes[row.subject] = TaskOutcome(row.subject, True, value, None, row.seconds)
    outcomes = {k: outcomes[k] for k in tasks}
    frames, mosaics, status_rows = [], {}, []
    for key, o in outcomes.items():
        status_rows.append(StatusRow.from_outcome(key, o))
        if not o.ok:
            frames.append(_input_failure(key, redact_paths(f"QC could not run: {o.error}")))
            continue
        frames.append(pd.read_csv(o.value["qc"], dtype={"subject": str, "level": str}))
        if o.value.get("mosaic"):
            target = paths.qc_dir / "mosaics" / f"{key}.png"
            atomic_write_bytes(target, Path(o.value["mosaic"]).read_bytes())
            mosaics[key] = target
    done = measured.loc[measured["status"] != "failed", "subject"].tolist()
    metrics, _ = load_measurements(paths, done)
    if len(metrics):
        frames.append(qc.outlier_checks(metrics, settings))
    table = (
        pd.concat(frames, ignore_index=True)
        if frames
        else pd.DataFrame(columns=list(qc.QC_COLUMNS))
    )
    table = table.reindex(columns=list(qc.QC_COLUMNS))
    summary = qc.summarize_qc(table, subjects=list(tasks))
    atomic_write_text(paths.file("qc.csv"), table.to_csv(index=False))
    atomic_write_text(paths.file("qc_summary.csv"), summary.to_csv(index=False))
    # issue 16: a QC task that could not run (disk full, killed worker) is a failure of the
    # run, listed in failures_qc.csv, never a decision about the subject: no row is seeded.
    could_not_run = [r.subject for r in status_rows if r.status == "failed"]
    decisions = qc.init_decisions(
        summary[~summary["subject"].isin(could_not_run)],
        paths.decisions,
        inputs=_decision_inputs(tasks),
    )
    atomic_write_text(paths.file("qc_decisions.csv"), decisions.to_csv(index=False))
    excluded = current_exclusions(study, paths)
    write_excluded(paths, excluded)
    shown = ["subject", "decision", "reviewer"] + (["stale"] if "stale" in decisions else [])
    summary = summary.merge(decisions[shown], on="subject", how="left")
    status = status_table(status_rows)
    write_failures(paths, "qc", status[status["status"] == "failed"])
    record_stage(paths, "qc", status, time.perf_counter() - t0)
    return QCOutputs(table, summary, decisions, excluded, mosaics, measured)


def _decision_inputs(tasks: Mapping[str, QCTask]) -> dict[str, str]:
    """Subject -> fingerprint of its QC inputs (mask, image, manual mask, levels, settings).

    ``settings`` covers the QC settings and the label file; a change of any of these re-derives
    an automatic QC decision and marks a reviewer's decision stale (:func:`qc.init_decisions`).
    """
    from helpers import qc

    out = {}
    for subject, task in tasks.items():
        key = _qc_key(task)
        out[subject] = qc.inputs_fingerprint(
            {
                "mask": key["mask"],
                "image": key["image"],
                "manual": key["manual"],
                "levels": key["levels"],
                "settings": {"qc": key["settings"], "labels": key["labels"]},
            }
        )
    return out


def current_exclusions(study: Study, paths: RunPaths) -> pd.DataFrame:
    """Subjects of this study that the reviewer's decisions file excludes (a read; writes nothing).

    The QC and metrics stages write it to their run as ``excluded_qc.csv``
    (:func:`helpers.runs.write_excluded`).

    Returns
    -------
    pandas.DataFrame
        subject, reason, source (``qc decision``).
    """
    from helpers import qc

    table = qc.excluded_subjects(paths.decisions, missing_ok=True)
    table = table[table["subject"].isin(study.subject_ids)].copy()
    table["source"] = "qc decision"
    return table.reindex(columns=EXCLUDED_COLUMNS).reset_index(drop=True)


def mosaic_gallery(
    mosaics: Mapping[str, Path],
    summary: pd.DataFrame | None = None,
    *,
    width_px: int = 640,
    quality: int = 80,
    max_images: int = 60,
) -> Any:
    """The overlay mosaics as one HTML block of embedded JPEG thumbnails (for the QC report).

    Subjects with ``fail`` come first, then ``flag``, then ``pass``; at most ``max_images`` are
    embedded (a large cohort's report stays a few MB) and the rest are named.  The
    full-resolution PNGs of every subject stay in the run folder (``qc/mosaics/``).
    """
    import base64
    import io

    from IPython.display import HTML
    from PIL import Image

    status = {}
    if summary is not None and len(summary):
        status = dict(zip(summary["subject"].astype(str), summary["status"], strict=False))
    from helpers.qc import severity_rank

    ordered = sorted(mosaics, key=lambda x: (-severity_rank(status.get(x, "")), x))
    shown, rest = ordered[:max_images], ordered[max_images:]
    parts = []
    for subject in shown:
        png = mosaics[subject]
        with Image.open(png) as img:
            rgb = img.convert("RGB")
            if rgb.width > width_px:
                rgb = rgb.resize(
                    (width_px, round(rgb.height * width_px / rgb.width)), Image.Resampling.LANCZOS
                )
            buffer = io.BytesIO()
            rgb.save(buffer, format="JPEG", quality=quality, optimize=True)
        data = base64.b64encode(buffer.getvalue()).decode("ascii")
        label = html.escape(f"{subject} (QC {status.get(subject, '?')})")
        parts.append(
            f'<figure style="display:inline-block;margin:4px;vertical-align:top">'
            f'<img src="data:image/jpeg;base64,{data}" alt="overlay mosaic of {label}" '
            f'width="{rgb.width}" height="{rgb.height}" style="max-width:100%;height:auto">'
            f"<figcaption>{label}</figcaption></figure>"
        )
    if rest:
        names = html.escape(", ".join(rest))
        parts.append(
            f"<p>{len(rest)} more mosaics in the run folder (<code>qc/mosaics/</code>): {names}</p>"
        )
    return HTML("".join(parts) or "<p>No mosaic.</p>")


def qc_browser(study: Study, paths: RunPaths, outputs: QCOutputs) -> Any:
    """The interactive QC browser (ipywidgets) over this run's segmented subjects."""
    from helpers.labels import load_labels
    from helpers.viewer import browse

    seg = read_segmentation(paths)
    ok = seg[(seg["status"] != "failed") & (seg["mask"] != "")]
    cases = pd.DataFrame(
        {
            "subject": ok["subject"].astype(str),
            "image": [str(study.subject(str(s)).image) for s in ok["subject"]],
            "mask": ok["mask"].astype(str),
        }
    )
    return browse(cases, paths.decisions, load_labels(study.labels), qc=outputs.qc)


def qc_view_3d(
    study: Study, paths: RunPaths, outputs: QCOutputs, subject: str = "", backend: str = "niivue"
) -> Any:
    """A 3-D view of one subject (default: the first with the worst QC status).

    ``backend``: ``niivue`` (JupyterLab 4, offline) or ``itkwidgets`` (classic Notebook), see
    :func:`helpers.viewer.view_3d`; :class:`helpers.viewer.Unavailable` when it cannot load.
    """
    from helpers.report import qc_status_table
    from helpers.viewer import view_3d

    seg = read_segmentation(paths)
    masks = dict(zip(seg["subject"].astype(str), seg["mask"].astype(str), strict=True))
    ordered = qc_status_table(outputs.summary)["subject"].astype(str).tolist()
    chosen = subject or next((x for x in ordered if masks.get(x)), "")
    if not chosen or not masks.get(chosen):
        from IPython.display import Markdown

        return Markdown("No segmented subject to show.")
    return view_3d(study.subject(chosen).image, masks[chosen], study.labels, backend=backend)
