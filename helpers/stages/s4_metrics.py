"""Stage 4, metrics: the cohort's metrics and asymmetry tables, QC exclusions honoured.

Declared output: ``metrics.csv`` and ``asymmetry.csv`` in the run folder.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import pandas as pd

from helpers.config import Study
from helpers.files import atomic_write_text
from helpers.runs import (
    RunPaths,
    StatusRow,
    record_stage,
    status_table,
    write_excluded,
    write_failures,
)
from helpers.stages.s1_segment import (
    read_segmentation,
)
from helpers.stages.s2_measure import (
    load_measurements,
    measure_stage,
    read_measured,
)
from helpers.stages.s3_qc import (
    current_exclusions,
)

log = logging.getLogger(__name__)


@dataclass
class MetricsOutputs:
    """What :func:`metrics_stage` produced.

    Attributes
    ----------
    metrics, asymmetry : pandas.DataFrame
        The cohort tables (QC-excluded and failed subjects left out); also ``metrics.csv`` and
        ``asymmetry.csv`` in the run folder.
    status : pandas.DataFrame
        subject, status (``computed`` / ``reused`` / ``failed`` / ``excluded``), seconds, error.
    excluded : pandas.DataFrame
        subject, reason, source.
    """

    metrics: pd.DataFrame
    asymmetry: pd.DataFrame
    status: pd.DataFrame
    excluded: pd.DataFrame


def metrics_stage(study: Study, paths: RunPaths, *, progress: bool = True) -> MetricsOutputs:
    """The cohort's metrics and asymmetry tables, honouring the reviewer's QC decisions.

    The subjects' measurements are the measure stage's (``measured.csv`` of this run, written
    by the QC notebook: each subject is measured once per run, and listed here as ``reused``);
    without it they are measured through the study's executor (finished ones are reused from
    the work folder).  They are then concatenated into ``metrics.csv`` and ``asymmetry.csv``.  When the clinical
    data give each subject's convex side, the convex-vs-concave indices (``cdi_cc``, ...) are
    added to ``asymmetry.csv``.
    """
    t0 = time.perf_counter()
    segmentation = read_segmentation(paths)
    excluded = current_exclusions(study, paths)
    write_excluded(paths, excluded)
    keep = [s for s in segmentation["subject"] if s not in set(excluded["subject"])]
    measured = _from_measure_stage(paths, segmentation, keep)
    if measured is None:  # this run's QC notebook did not measure them: measure (or reuse) now
        measured = measure_stage(
            study, paths, segmentation, subjects=keep, stage="metrics", progress=progress
        )
    done = measured.loc[measured["status"] != "failed", "subject"].tolist()
    metrics, asymmetry = load_measurements(paths, done)
    asymmetry = _add_convex_concave(study, asymmetry)
    metrics, asymmetry = _with_contrast(study, metrics, asymmetry)
    atomic_write_text(paths.file("metrics.csv"), metrics.to_csv(index=False))
    atomic_write_text(paths.file("asymmetry.csv"), asymmetry.to_csv(index=False))
    status = pd.concat(
        [
            measured,
            pd.DataFrame(
                {"subject": excluded["subject"], "status": "excluded", "seconds": 0.0, "error": ""}
            ),
        ],
        ignore_index=True,
    )
    record_stage(paths, "metrics", status, time.perf_counter() - t0)
    return MetricsOutputs(metrics, asymmetry, status, excluded)


def _from_measure_stage(
    paths: RunPaths, segmentation: pd.DataFrame, keep: list[str]
) -> pd.DataFrame | None:
    """The metrics stage's status rows from this run's ``measured.csv`` (None: not usable).

    A subject measured there is ``reused`` here; one whose measurement failed is a failure of
    this stage too (``failures_metrics.csv``), as when the stage measured it itself.
    """
    with_mask = segmentation[(segmentation["status"] != "failed") & (segmentation["mask"] != "")]
    subjects = [s for s in with_mask["subject"] if s in set(keep)]
    measured = read_measured(paths, subjects)
    if measured is None:
        return None
    rows = [
        StatusRow(r.subject, "failed", float(r.seconds), r.error)
        if r.status == "failed"
        else StatusRow(r.subject, "reused")
        for r in measured.itertuples(index=False)
    ]
    table = status_table(rows, order=subjects)
    write_failures(paths, "metrics", table[table["status"] == "failed"])
    return table


def _add_convex_concave(study: Study, asymmetry: pd.DataFrame) -> pd.DataFrame:
    if study.clinical is None or asymmetry.empty:
        return asymmetry
    from helpers.metrics import to_convex_concave

    clinical = study.clinical.data()  # read once, when the study was loaded
    if "convex_side" not in clinical.columns:
        return asymmetry
    sides = {
        str(s): (str(v).strip().lower() or None)
        for s, v in zip(clinical["subject"], clinical["convex_side"], strict=True)
        if str(v).strip().lower() in ("left", "right")
    }
    if not sides:
        return asymmetry
    return to_convex_concave(asymmetry, sides, study.metrics_settings())


def metrics_summary(asymmetry: pd.DataFrame, level: str = "all") -> pd.DataFrame:
    """Median and IQR of each asymmetry index per muscle at one level."""
    rows = asymmetry[asymmetry["level"].astype(str) == level]
    cols = [c for c in ("cdi", "cdi_abs", "lfiar", "lfiar_log") if c in rows]
    if rows.empty or not cols:
        return pd.DataFrame()
    long = rows.melt(id_vars=["muscle"], value_vars=cols, var_name="index")
    out = long.groupby(["muscle", "index"], sort=False)["value"].describe()[
        ["count", "25%", "50%", "75%"]
    ]
    return out.rename(columns={"50%": "median", "25%": "q1", "75%": "q3"}).reset_index()


def _with_contrast(
    study: Study, metrics: pd.DataFrame, asymmetry: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The cohort tables with each subject's contrast as their last column."""
    from helpers.contrast import add_contrast

    contrasts = study.contrasts
    return add_contrast(metrics, contrasts), add_contrast(asymmetry, contrasts)
