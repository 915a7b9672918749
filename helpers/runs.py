"""Run bookkeeping: a run's folders and ID, exit codes, failure and exclusion tables, stage
records and warnings.

Every stage writes through these helpers, so that ``esma run`` can aggregate a run whatever
ran in it.  Nothing here runs a notebook or measures a subject.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import re
import secrets
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from helpers import __version__
from helpers.config import Study, load_study
from helpers.errors import ConfigError, OutputError
from helpers.files import atomic_write_text

log = logging.getLogger(__name__)


EXIT_OK, EXIT_PARTIAL, EXIT_BAD_INPUT = 0, 1, 2


#: A notebook stopped on an infrastructure error (disk full, unwritable output): issue 16.
EXIT_INFRASTRUCTURE = 3


#: Exit code recorded in the manifest of a run that has not finished (running or killed).
EXIT_RUNNING = -1


INTERACTIVE_RUN = "interactive"


_RUN_ID_RE = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{6}$")


_STAGES_DIR = "stages"


@dataclass(frozen=True)
class RunPaths:
    """Where one run (or an interactive session) reads and writes.

    Attributes
    ----------
    run_dir : Path
        The run folder: tables, figures, executed notebooks, reports.
    work_dir : Path
        The study's work folder shared by every run.
    seg_dir : Path
        Segmentations (``<subject>.nii.gz`` + sidecars), in the work folder.
    metrics_dir : Path
        Per-subject metrics (``<subject>/metrics.csv``, ``asymmetry.csv``), in the work folder.
    decisions : Path
        The reviewer's QC decisions file (study level, never overwritten by a run).
    interactive : bool
        True for a notebook opened on its own (``run_dir`` parameter left empty): it then writes
        to ``<output>/interactive/`` and reads the products of earlier notebooks from there, or
        else from the latest run that has them.
    """

    run_dir: Path
    work_dir: Path
    seg_dir: Path
    metrics_dir: Path
    decisions: Path
    interactive: bool = False

    @property
    def figures_dir(self) -> Path:
        """Figures (PNG) of this run."""
        return self.run_dir / "figures"

    @property
    def qc_dir(self) -> Path:
        """QC overlay mosaics (PNG) of this run."""
        return self.run_dir / "qc"

    @property
    def tables_dir(self) -> Path:
        """Statistics tables (CSV, xlsx) of this run."""
        return self.run_dir / "tables"

    def file(self, name: str) -> Path:
        """A product of this run (``run_dir / name``)."""
        return self.run_dir / name

    def upstream(self, name: str) -> Path:
        """A product of an earlier notebook of this run.

        In an interactive session a missing product is taken from the latest run that has it.

        Raises
        ------
        OutputError
            When no such file exists (run the earlier notebook first).
        """
        here = self.run_dir / name
        if here.is_file() or not self.interactive:
            if not here.is_file():
                msg = f"{here}: missing; the notebook that writes it has not run"
                raise OutputError(msg)
            return here
        for run in reversed(list_runs(self.run_dir.parent)):
            candidate = run / name
            if candidate.is_file():
                log.info("interactive: using %s from run %s", name, run.name)
                return candidate
        msg = f"{here}: missing; run the earlier notebooks first (or esma run the study)"
        raise OutputError(msg)


def run_paths(study: Study, run_dir: str | Path = "") -> RunPaths:
    """The paths of a run folder, or of the interactive folder when ``run_dir`` is empty."""
    interactive = not str(run_dir).strip()
    folder = study.output / INTERACTIVE_RUN if interactive else Path(run_dir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    work = study.work_dir
    return RunPaths(
        run_dir=folder,
        work_dir=work,
        seg_dir=work / "seg",
        metrics_dir=work / "metrics",
        decisions=study.decisions_path,
        interactive=interactive,
    )


def open_study(study: str | Path, run_dir: str | Path = "") -> tuple[Study, RunPaths]:
    """What every notebook does first: validate the study and resolve the run's paths.

    Also routes warnings logged in the notebook through :func:`redact_paths`, so that a report
    shows file names but never the folders they live in.
    """
    _notebook_logging()
    _kernel_dies_with_run()  # issue 16: a killed esma run takes its kernel (and workers) along
    s = load_study(study)
    if s.ingest is not None and not s.subjects:
        msg = (
            f"{s.source.name}: ingest: the DICOM export has not been ingested yet "
            f"(no {s.ingest.table.name}); run esma ingest --study {s.source.name} "
            f"or esma run {s.source.name}"
        )
        raise ConfigError(msg)
    return s, run_paths(s, run_dir)


def _kernel_dies_with_run() -> None:
    """In a notebook kernel started by ``esma run``: die (SIGKILL) when the run's process ends.

    Only in a kernel whose parent is an ``esma``/papermill process started for a run (the
    environment variable ``ESMA_RUN_PID`` names it); an interactive Jupyter kernel is left alone.
    """
    parent = os.environ.get(RUN_PID_ENV)
    if parent and parent.isdigit() and int(parent) == os.getppid():
        from helpers.lifecycle import die_with_parent

        die_with_parent(int(parent))


#: Environment variable naming the ``esma run`` process to its notebook kernels.
RUN_PID_ENV = "ESMA_RUN_PID"


#: An absolute path: folders (which may hold spaces) then a file name (which may not).
_PATH_RE = re.compile(
    r"(?<![\w.~])(?:[A-Za-z]:)?(?:[/\\][^/\\\n:'\"()<>,;]+)+[/\\]([^/\\\s:'\"()<>,;]+)"
)


def redact_paths(text: str) -> str:
    """Keep only the file name of every absolute path in ``text``.

    Folder names can identify a patient (``/data/DOE_JOHN/...``); reports, failure tables and
    logs shown in them carry file names only (which are study IDs in an esma study).

    Examples
    --------
    >>> redact_paths("/data/DOE_JOHN/scan_T2w.nii.gz: unreadable")
    'scan_T2w.nii.gz: unreadable'
    """
    return _PATH_RE.sub(r"\1", str(text))


class _RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact_paths(super().format(record))


def _notebook_logging() -> None:
    root = logging.getLogger()
    if any(isinstance(h.formatter, _RedactingFormatter) for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_RedactingFormatter("%(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.WARNING)
    root.addHandler(handler)


def list_runs(output: str | Path) -> list[Path]:
    """Finished or unfinished run folders of a study's output folder, oldest first."""
    output = Path(output)
    if not output.is_dir():
        return []
    return sorted(p for p in output.iterdir() if p.is_dir() and _RUN_ID_RE.match(p.name))


def new_run_id(now: dt.datetime | None = None) -> str:
    """A new run ID: UTC time stamp and 6 random hex digits, e.g. ``20250101T120000Z-3fa2c1``."""
    now = now or dt.datetime.now(dt.UTC)
    return f"{now:%Y%m%dT%H%M%S}Z-{secrets.token_hex(3)}"


def _create_run_dir(output: Path) -> tuple[str, Path]:
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        msg = f"{output}: cannot create the output folder ({exc.strerror or exc})"
        raise OutputError(msg) from exc
    for _ in range(20):
        run_id = new_run_id()
        run_dir = output / run_id
        try:
            run_dir.mkdir()  # exclusive: an existing run folder is never reused
        except FileExistsError:
            continue
        except OSError as exc:
            msg = f"{run_dir}: cannot create the run folder ({exc.strerror or exc})"
            raise OutputError(msg) from exc
        return run_id, run_dir
    msg = f"{output}: could not find a free run ID"  # pragma: no cover - 16M IDs per second
    raise OutputError(msg)


FAILURE_COLUMNS = ["subject", "stage", "error"]


EXCLUDED_COLUMNS = ["subject", "reason", "source"]


def write_failures(paths: RunPaths, stage: str, failures: pd.DataFrame) -> Path:
    """Write one stage's failures (subject, stage, error) as ``failures_<stage>.csv``.

    ``failures`` holds a subject and an error column, e.g. the failed rows of the stage's
    status table (:func:`status_table`); its other columns are dropped.  Paths in the errors
    are cut to file names (:func:`redact_paths`).  The one way a stage's failures are tabled.
    """
    table = failures.reindex(columns=FAILURE_COLUMNS)
    table["stage"] = stage
    table["error"] = table["error"].fillna("").astype(str).map(redact_paths)
    target = paths.file(f"failures_{stage}.csv")
    atomic_write_text(target, table.to_csv(index=False))
    return target


def collect_failures(run_dir: str | Path) -> pd.DataFrame:
    """Aggregate every stage's ``failures_<stage>.csv`` into the run's ``failures.csv``."""
    run_dir = Path(run_dir)
    parts = []
    for path in sorted(run_dir.glob("failures_*.csv")):
        try:
            table = pd.read_csv(path, dtype=str, keep_default_na=False)
        except (OSError, ValueError, pd.errors.EmptyDataError):
            continue
        parts.append(table.reindex(columns=FAILURE_COLUMNS))
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=FAILURE_COLUMNS)
    stages = ("ingest", "segment", "qc", "metrics", "clinical", "statistics")
    order = {s: i for i, s in enumerate(stages)}
    table = table.sort_values(
        ["stage", "subject"], key=lambda c: c.map(order).fillna(99) if c.name == "stage" else c
    ).reset_index(drop=True)
    atomic_write_text(run_dir / "failures.csv", table.to_csv(index=False))
    return table


def write_excluded(paths: RunPaths, excluded: pd.DataFrame) -> Path:
    """Write the subjects excluded by QC decisions (subject, reason, source) of this run."""
    table = excluded.reindex(columns=EXCLUDED_COLUMNS)
    target = paths.file("excluded_qc.csv")
    atomic_write_text(target, table.to_csv(index=False))
    return target


def collect_excluded(run_dir: str | Path, failures: pd.DataFrame) -> pd.DataFrame:
    """Subjects left out of the analysis and why: QC decisions and processing failures.

    A refused DICOM series of a subject who is in the run's cohort anyway (another of its
    series was ingested) is a failure but not an exclusion.
    """
    run_dir = Path(run_dir)
    parts = []
    qc_file = run_dir / "excluded_qc.csv"
    if qc_file.is_file():
        parts.append(pd.read_csv(qc_file, dtype=str, keep_default_na=False))
    if not failures.empty:
        f = failures.copy()
        cohort_file = run_dir / "cohort.csv"
        if cohort_file.is_file() and (f["stage"] == "ingest").any():
            cohort = set(pd.read_csv(cohort_file, dtype=str, keep_default_na=False)["subject"])
            f = f[~((f["stage"] == "ingest") & f["subject"].isin(cohort))]
        f["reason"] = f["stage"] + " failed: " + f["error"].astype(str)
        f["source"] = "failure"
        parts.append(f[EXCLUDED_COLUMNS])
    table = (
        pd.concat(parts, ignore_index=True).reindex(columns=EXCLUDED_COLUMNS)
        if parts
        else pd.DataFrame(columns=EXCLUDED_COLUMNS)
    )
    atomic_write_text(run_dir / "excluded.csv", table.to_csv(index=False))
    return table


def record_stage(paths: RunPaths, stage: str, status: pd.DataFrame, seconds: float) -> dict:
    """Record a stage's timing and how many subjects it computed, reused or lost.

    Parameters
    ----------
    paths : RunPaths
        The run.
    stage : str
        Stage name (``segment``, ``qc``, ``metrics``, ``statistics``).
    status : pandas.DataFrame
        One row per subject with a ``status`` column (``computed``, ``reused``, ``given``,
        ``failed``, ``excluded``) and optionally ``seconds``.
    seconds : float
        Wall time of the stage (s).

    Returns
    -------
    dict
        The record written to ``stages/<stage>.json``.
    """
    counts = status["status"].value_counts().to_dict() if "status" in status else {}
    record = {
        "stage": stage,
        "seconds": round(float(seconds), 3),
        "subjects": len(status),
        **{f"n_{k}": int(v) for k, v in sorted(counts.items())},
    }
    if "seconds" in status and len(status):
        record["subject_seconds_total"] = round(float(status["seconds"].fillna(0).sum()), 3)
    atomic_write_text(paths.file(f"{_STAGES_DIR}/{stage}.json"), json.dumps(record, indent=2))
    return record


def read_stage_records(run_dir: str | Path) -> list[dict]:
    """Stage records of a run, in pipeline order."""
    order = ["ingest", "segment", "qc", "metrics", "statistics"]
    records = []
    for path in Path(run_dir, _STAGES_DIR).glob("*.json"):
        try:
            records.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    return sorted(records, key=lambda r: order.index(r["stage"]) if r["stage"] in order else 99)


STATUS_COLUMNS = ["subject", "status", "seconds", "error"]
#: Columns of the segmentation stage's status table (``segmentation.csv``).
SEGMENTATION_COLUMNS = ["subject", "mask", "status", "seconds", "error"]


@dataclass(frozen=True)
class StatusRow:
    """One subject's outcome in a stage: a row of the stage's status table.

    Attributes
    ----------
    subject : str
        Study ID.
    status : str
        ``computed``, ``reused``, ``given``, ``failed``, ``excluded`` (or a stage's own word).
    seconds : float
        Wall time (s) spent on the subject.
    error : str
        Why it failed (folders cut to file names, :func:`redact_paths`); empty otherwise.
    mask : str
        The mask the subject goes on with (segmentation only: made, given or corrected; empty
        when it failed).  A column only of the tables that ask for it
        (:data:`SEGMENTATION_COLUMNS`).
    """

    subject: str
    status: str
    seconds: float = 0.0
    error: str = ""
    mask: str = ""

    @classmethod
    def from_outcome(cls, subject: str, outcome: Any) -> StatusRow:
        """The row of a :class:`helpers.executor.TaskOutcome` whose value holds ``status`` and
        ``seconds`` (a failed task: ``failed`` with its error, redacted)."""
        if outcome.ok:
            value = outcome.value
            return cls(subject, str(value["status"]), float(value["seconds"]))
        return cls(subject, "failed", float(outcome.seconds), redact_paths(outcome.error or "failed"))


def status_table(
    rows: Iterable[StatusRow],
    order: Sequence[str] | None = None,
    columns: Sequence[str] = STATUS_COLUMNS,
) -> pd.DataFrame:
    """The stage's status table (``columns``, by default :data:`STATUS_COLUMNS`), in ``order``
    of subjects if given.

    Examples
    --------
    >>> status_table([StatusRow("b", "reused"), StatusRow("a", "failed", 1.5, "bad")],
    ...              order=["a", "b"]).to_dict("records")  # doctest: +NORMALIZE_WHITESPACE
    [{'subject': 'a', 'status': 'failed', 'seconds': 1.5, 'error': 'bad'},
     {'subject': 'b', 'status': 'reused', 'seconds': 0.0, 'error': ''}]
    """
    table = pd.DataFrame([dataclasses.asdict(r) for r in rows], columns=list(columns))
    table["seconds"] = table["seconds"].astype(float)
    if order is not None:
        rank = {k: i for i, k in enumerate(order)}
        table = table.sort_values("subject", key=lambda c: c.map(rank), kind="stable")
    return table.reset_index(drop=True)


def study_header(study: Study, paths: RunPaths) -> str:
    """Markdown header of a report: study, run, cohort size, and the identity note."""
    where = "interactive session" if paths.interactive else f"run `{paths.run_dir.name}`"
    lines = [
        (
            f"**Study** `{study.name}` · {where} · {len(study.subjects)} subjects "
            f"({study.images_spec}) · esma {__version__}"
        ),
    ]
    if study.description:
        lines += ["", study.description]
    lines += ["", "Subjects appear by their pseudonymous study ID only."]
    return "\n".join(lines)


def status_counts(table: pd.DataFrame) -> pd.DataFrame:
    """Subjects per status with their summed time (s), for a stage summary."""
    if table.empty:
        return pd.DataFrame(columns=["status", "subjects", "seconds"])
    seconds = table["seconds"] if "seconds" in table else pd.Series(0.0, index=table.index)
    out = (
        pd.DataFrame({"status": table["status"], "seconds": seconds.fillna(0.0)})
        .groupby("status", sort=True)
        .agg(subjects=("status", "size"), seconds=("seconds", "sum"))
        .reset_index()
    )
    out["seconds"] = out["seconds"].round(1)
    return out


#: Warnings of a run's stages that index.html shows (one JSON list in the run folder).
RUN_WARNINGS_NAME = "warnings.json"


def record_run_warning(run_dir: Path, message: str) -> None:
    """Add ``message`` to the run's warnings (shown in ``index.html``), once."""
    path = Path(run_dir) / RUN_WARNINGS_NAME
    found = read_run_warnings(run_dir)
    if message not in found:
        atomic_write_text(path, json.dumps([*found, message], indent=2))


def read_run_warnings(run_dir: Path) -> list[str]:
    """The run's recorded warnings (none when the file is missing or unreadable)."""
    try:
        found = json.loads((Path(run_dir) / RUN_WARNINGS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [str(m) for m in found] if isinstance(found, list) else []
