"""Stage 2, measure: CSA, fat and asymmetry per subject, cached in the work folder.

Declared output: ``<work>/metrics/<subject>/metrics.csv`` and ``asymmetry.csv`` (completion
markers keyed by the inputs' checksums and the metrics settings); QC and metrics read them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from helpers.config import Study
from helpers.files import atomic_write_text, sha256_file
from helpers.runs import (
    RunPaths,
    StatusRow,
    record_stage,
    status_table,
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
)

if TYPE_CHECKING:
    from helpers.dixon import DixonSettings
    from helpers.metrics import MetricsSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MeasureTask:
    """Everything one subject's measurement needs (picklable, for any executor)."""

    subject: str
    image: str
    mask: str
    labels: str
    levels: str | None
    settings: MetricsSettings
    out_dir: str
    water: str | None = None  # a Dixon pair (issue 18): fat from F / (W + F)
    fat: str | None = None
    dixon: DixonSettings | None = None  # set with water and fat (Study.dixon_settings())


#: The files whose completion markers say that a subject's stage is finished.
_MEASURE_OUTPUTS = ("metrics.csv", "asymmetry.csv")


def measure_subject(task: MeasureTask) -> dict[str, Any]:
    """Measure one subject into its work folder, or reuse the finished result.

    The result (``metrics.csv``, ``asymmetry.csv``, ``reference.json`` from
    :func:`helpers.metrics.write_result`) counts as finished when its completion markers match
    the checksums of the image, mask, labels and levels and the metrics settings.

    Returns
    -------
    dict
        status (``computed`` / ``reused``) and seconds.
    """
    from helpers.metrics import measure_files, write_result

    t0 = time.perf_counter()
    out = Path(task.out_dir)
    key = _measure_key(task)
    if is_finished(out, _MEASURE_OUTPUTS, key):
        return {"status": "reused", "seconds": time.perf_counter() - t0}
    settings = task.settings
    if task.water is not None:
        result = _measure_dixon_task(task, settings)
    else:
        result = measure_files(
            task.image,
            task.mask,
            task.labels,
            subject=task.subject,
            settings=settings,
            levels_path=task.levels,
        )
    write_result(result, out)
    mark_finished(out, _MEASURE_OUTPUTS, key)
    return {"status": "computed", "seconds": time.perf_counter() - t0}


def measure_done(task: MeasureTask) -> bool:
    """True when the subject's measurement is finished with these inputs and settings."""
    return is_finished(Path(task.out_dir), _MEASURE_OUTPUTS, _measure_key(task))


def _measure_key(task: MeasureTask) -> dict[str, Any]:
    files = {"image": task.image, "mask": task.mask, "labels": task.labels, "levels": task.levels}
    key = task_key(files, settings=task.settings.to_dict(), subject=task.subject)
    if task.water is not None and task.fat is not None:
        key.update(_dixon_key(task))
    return key


def _levels_for(study: Study, subject: str) -> str | None:
    s = study.subject(subject)
    return None if s.levels is None else str(s.levels)


#: The measure stage's declared output in the run folder: one status row per measured subject.
MEASURED_TABLE = "measured.csv"


def read_measured(paths: RunPaths, subjects: Sequence[str]) -> pd.DataFrame | None:
    """This run's measure-stage status of ``subjects`` (``measured.csv``), or None.

    None when the run has no such table (its QC notebook did not run), in an interactive session
    (an earlier session's table may predate the masks), or when it lacks one of ``subjects``:
    the caller then measures them itself (:func:`measure_stage`, reusing finished ones).

    Returns
    -------
    pandas.DataFrame or None
        subject, status (``computed`` / ``reused`` / ``failed``), seconds, error.
    """
    path = paths.file(MEASURED_TABLE)
    if paths.interactive or not path.is_file():
        return None
    table = pd.read_csv(path, dtype={"subject": str, "error": str}, keep_default_na=False)
    if set(subjects) - set(table["subject"]):
        return None
    table = table[table["subject"].isin(list(subjects))].reset_index(drop=True)
    table["seconds"] = pd.to_numeric(table["seconds"], errors="coerce").fillna(0.0)
    return table


def measure_stage(
    study: Study,
    paths: RunPaths,
    segmentation: pd.DataFrame,
    *,
    subjects: Sequence[str] | None = None,
    stage: str = "measure",
    progress: bool = True,
) -> pd.DataFrame:
    """Measure every segmented subject (through the study's executor), reusing finished ones.

    Parameters
    ----------
    study, paths
        The study and run.
    segmentation : pandas.DataFrame
        :func:`read_segmentation`; subjects without a mask are skipped.
    subjects : sequence of str, optional
        Restrict to these subjects.
    stage : str
        Name under which timings and failures are recorded.
    progress : bool
        Progress bar.

    Returns
    -------
    pandas.DataFrame
        subject, status (``computed`` / ``reused`` / ``failed``), seconds, error; the
        ``measure`` stage also writes it as ``measured.csv`` (its declared output, which the
        metrics stage reads instead of measuring again).
    """
    from helpers.executor import run_tasks

    t0 = time.perf_counter()
    ok = segmentation[(segmentation["status"] != "failed") & (segmentation["mask"] != "")]
    if subjects is not None:
        ok = ok[ok["subject"].isin(list(subjects))]
    settings = study.metrics_settings()
    tasks = {
        str(r.subject): MeasureTask(
            subject=str(r.subject),
            image=str(study.subject(str(r.subject)).image),
            mask=str(r.mask),
            labels=labels_for(study, paths, str(r.status)),
            levels=_levels_for(study, str(r.subject)),
            settings=settings,
            out_dir=str(paths.metrics_dir / str(r.subject)),
            **_dixon_task_fields(study, str(r.subject)),
        )
        for r in ok.itertuples(index=False)
    }
    rows, todo = split_finished(tasks, measure_done)
    outcomes = run_tasks(
        measure_subject, todo, study.executor_config(), desc=stage, progress=progress
    )
    rows += [StatusRow.from_outcome(key, o) for key, o in outcomes.items()]
    table = status_table(rows, order=list(tasks))
    if stage == "measure":
        atomic_write_text(paths.file(MEASURED_TABLE), table.to_csv(index=False))
    write_failures(paths, stage, table[table["status"] == "failed"])
    record_stage(paths, stage, table, time.perf_counter() - t0)
    return table


def load_measurements(
    paths: RunPaths, subjects: Sequence[str]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Concatenate the per-subject ``metrics.csv`` and ``asymmetry.csv`` of the work folder."""
    metrics, asym = [], []
    for subject in subjects:
        folder = paths.metrics_dir / subject
        if (folder / "metrics.csv").is_file():
            metrics.append(
                pd.read_csv(folder / "metrics.csv", dtype={"subject": str, "level": str})
            )
        if (folder / "asymmetry.csv").is_file():
            asym.append(pd.read_csv(folder / "asymmetry.csv", dtype={"subject": str, "level": str}))
    from helpers.metrics import ASYMMETRY_COLUMNS, METRICS_COLUMNS

    m = (
        pd.concat(metrics, ignore_index=True)
        if metrics
        else pd.DataFrame(columns=list(METRICS_COLUMNS))
    )
    a = (
        pd.concat(asym, ignore_index=True)
        if asym
        else pd.DataFrame(columns=list(ASYMMETRY_COLUMNS))
    )
    return m, a


def _dixon_task_fields(study: Study, subject: str) -> dict[str, Any]:
    s = study.subject(subject)
    if s.water is None or s.fat is None:
        return {}
    return {"water": str(s.water), "fat": str(s.fat), "dixon": study.dixon_settings()}


def _dixon_key(task: MeasureTask) -> dict[str, Any]:
    return {
        "water": sha256_file(task.water),
        "fat": sha256_file(task.fat),
        "dixon": task.dixon.to_dict() if task.dixon is not None else {},
    }


def _measure_dixon_task(task: MeasureTask, settings: Any) -> Any:
    from helpers.dixon import DixonSettings, measure_dixon_files

    return measure_dixon_files(
        task.water,
        task.fat,
        task.mask,
        task.labels,
        subject=task.subject,
        settings=settings,
        dixon=task.dixon if task.dixon is not None else DixonSettings(),
        levels_path=task.levels,
    )
