"""The notebook pipeline: run a study's four notebooks through papermill and write its reports.

A run (:func:`run_study`, ``esma run STUDY.yml``) goes:

1. validate the study YAML (:func:`helpers.config.load_study`); an invalid study stops here with
   exit code 2 and nothing written; a study with an ``ingest:`` section then has its DICOM
   export ingested (:func:`ingest_stage`; skipped when already done with the same files and
   settings) and its cohort is the images the ingest wrote;
2. create a new run folder ``<output>/<run-id>/`` (``run-id`` = UTC time stamp + random hex; an
   existing folder is never reused or overwritten) and freeze the study in it
   (``study.yml`` with absolute paths + ``cohort.csv``): every notebook of the run reads that
   copy;
3. execute ``01_segment``, ``02_qc``, ``03_metrics`` and ``04_statistics`` with papermill
   (kernel ``python3``, working folder = the run folder), after checking that every parameter
   passed is declared in the notebook's ``parameters`` cell (papermill itself only warns);
   each executed notebook is exported to HTML without code cells;
4. collect ``failures.csv`` (subject, stage, error) and ``excluded.csv`` (subject, reason), and
   write ``manifest.json`` (provenance: versions, parameters, checksums, timings) and
   ``index.html`` linking the reports.

Per-subject work that is expensive (segmentations, per-subject metrics) lives in the study's
work folder ``<output>/work/``, shared by all runs: a re-run reuses every finished subject
(completion markers with checksums and settings, :mod:`helpers.files`) and its timings show it.

The stage functions the notebooks call (:func:`segment_stage`, :func:`metrics_stage`,
:func:`qc_stage`, :func:`statistics_stage`) live here too, so that the notebooks stay thin.

Exit codes: 0 everything ran and no subject failed; 1 the run finished but some subjects failed
(or a notebook stopped on an unexpected error, or on an input error after subjects had failed);
2 the study or an input is invalid.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import html
import json
import logging
import os
import platform
import re
import secrets
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from helpers.config import Study, load_study, resolved_document
from helpers.errors import ConfigError, EsmaError, InputFileError, OutputError
from helpers.files import atomic_write_bytes, atomic_write_text, sha256_file
from helpers.locks import hold_output_lock

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_OK",
    "EXIT_PARTIAL",
    "NOTEBOOKS",
    "NOTEBOOK_DIR",
    "NotebookRun",
    "RunPaths",
    "RunResult",
    "check_parameters",
    "collect_failures",
    "execute_notebook",
    "export_html",
    "ingest_failures",
    "ingest_stage",
    "new_run_id",
    "open_study",
    "record_ingest",
    "run_paths",
    "run_study",
]

log = logging.getLogger(__name__)

try:  # from the installed distribution (works whatever the working folder)
    __version__ = metadata.version("esma")
except metadata.PackageNotFoundError:  # pragma: no cover - source tree without install
    __version__ = "0.0.0+unknown"

EXIT_OK, EXIT_PARTIAL, EXIT_BAD_INPUT = 0, 1, 2
#: A notebook stopped on an infrastructure error (disk full, unwritable output): issue 16.
EXIT_INFRASTRUCTURE = 3
#: Exit code recorded in the manifest of a run that has not finished (running or killed).
EXIT_RUNNING = -1
#: Folder of the pipeline notebooks (the repository's ``notebooks/``).
NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
#: The pipeline notebooks, in execution order.
NOTEBOOKS = ("01_segment", "02_qc", "03_metrics", "04_statistics")
#: Kernel every notebook runs in.
KERNEL_NAME = "python3"
#: Distributions whose versions go into the run's provenance.
PROVENANCE_PACKAGES = (
    "esma",
    "nnunetv2",
    "torch",
    "numpy",
    "pandas",
    "scipy",
    "nibabel",
    "SimpleITK",
    "scikit-learn",
    "scikit-image",
    "statsmodels",
    "pingouin",
    "seaborn",
    "matplotlib",
    "papermill",
    "nbconvert",
    "nbclient",
    "ipykernel",
    "dask",
    "distributed",
)
INTERACTIVE_RUN = "interactive"
#: Notebooks that only make sense with clinical data (skipped for a study without them).
NEEDS_CLINICAL = ("04_statistics",)
_RUN_ID_RE = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{6}$")
_STAGES_DIR = "stages"

# nbconvert template: the JupyterLab one without anything fetched from the network (require.js,
# MathJax, mermaid, widget manager), so reports open offline and leak nothing to a CDN.
_REPORT_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{% block jupyter_widgets %}{% endblock jupyter_widgets %}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{% block data_png scoped %}
<div class="jp-RenderedImage jp-OutputArea-output {{ extra_class }}">
<img src="data:image/png;base64,{{ output.data['image/png'] | escape_html }}"
 alt="{{ ((output | get_metadata('alt', 'image/png')) or 'figure') | escape_html }}">
</div>
{% endblock data_png %}
"""
_WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


# ------------------------------------------------------------------------------- run paths
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


# --------------------------------------------------------------------- executing notebooks
@dataclass
class NotebookRun:
    """How one notebook of a run went.

    Attributes
    ----------
    name : str
        Notebook name without ``.ipynb``.
    ok : bool
        True when every cell ran.
    seconds : float
        Wall time (s) of the execution, HTML export excluded.
    ipynb, html : Path or None
        Executed notebook and its HTML report.
    error : str or None
        ``"ErrorName: message"`` of the cell that failed.
    error_name : str or None
        The exception class name of the failing cell.
    parameters : dict
        Parameters injected into the notebook.
    """

    name: str
    ok: bool
    seconds: float
    ipynb: Path | None
    html: Path | None
    error: str | None = None
    error_name: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


def check_parameters(notebook: str | Path, parameters: Mapping[str, Any]) -> dict[str, Any]:
    """Refuse parameters the notebook does not declare.

    Papermill only warns about unknown parameters; a typo would then silently run with the
    default.  Returns the declared parameters (name -> papermill's description).

    Raises
    ------
    ConfigError
        Naming the notebook, the unknown parameters and the declared ones; or when the notebook
        has no ``parameters`` cell.
    """
    import papermill as pm

    notebook = Path(notebook)
    declared = pm.inspect_notebook(str(notebook))
    if not declared:
        msg = f"{notebook.name}: no cell tagged 'parameters'; cannot pass {sorted(parameters)}"
        raise ConfigError(msg)
    unknown = sorted(set(parameters) - set(declared))
    if unknown:
        msg = (
            f"{notebook.name}: unknown parameter(s) {', '.join(unknown)}; "
            f"the notebook declares {', '.join(sorted(declared))}"
        )
        raise ConfigError(msg)
    return dict(declared)


def execute_notebook(
    notebook: str | Path,
    run_dir: str | Path,
    parameters: Mapping[str, Any],
    *,
    progress: bool = False,
    stream_output: bool = False,
    html: bool = True,
) -> NotebookRun:
    """Execute one notebook with papermill into ``run_dir`` and export it to HTML.

    Parameters
    ----------
    notebook : path
        The source notebook.
    run_dir : path
        Existing run folder; it is also the kernel's working folder.
    parameters : mapping
        Parameters to inject; every one must be declared (:func:`check_parameters`).
    progress : bool
        Show papermill's per-cell progress bar.
    stream_output : bool
        Echo the kernel's printed output (and progress bars) to this process's stderr.
    html : bool
        Export the executed notebook to HTML without code cells (also after a failure).

    Returns
    -------
    NotebookRun
        ``ok=False`` with the error when a cell raised; the executed notebook (with papermill's
        error banner) and its HTML are written anyway.
    """
    import papermill as pm

    notebook, run_dir = Path(notebook), Path(run_dir)
    check_parameters(notebook, parameters)
    if not run_dir.is_dir():
        msg = f"{run_dir}: run folder does not exist"
        raise OutputError(msg)
    out = run_dir / notebook.name
    if out.exists():
        msg = f"{out}: already exists; a run folder is never overwritten"
        raise OutputError(msg)
    params = dict(parameters)
    start = time.perf_counter()
    ok, error, error_name = True, None, None
    stream_kwargs: dict[str, Any] = {}
    if stream_output:
        stream_kwargs = {"log_output": True, "stdout_file": sys.stderr, "stderr_file": sys.stderr}
    os.environ[RUN_PID_ENV] = str(os.getpid())  # the kernel inherits it (see open_study)
    try:
        pm.execute_notebook(
            str(notebook),
            str(out),
            parameters=params,
            kernel_name=KERNEL_NAME,
            cwd=str(run_dir),
            progress_bar=progress,
            **stream_kwargs,
        )
    except pm.PapermillExecutionError as exc:
        ok, error_name = False, exc.ename
        error = redact_paths(f"{exc.ename}: {exc.evalue}")
        log.error("%s stopped at cell %s: %s", notebook.name, exc.exec_count, error)
    except Exception as exc:  # noqa: BLE001 - the kernel died, timed out or could not start
        ok, error_name = False, type(exc).__name__
        error = redact_paths(f"{type(exc).__name__}: {exc}")
        log.error("%s could not run: %s", notebook.name, error)
    seconds = time.perf_counter() - start
    html_path = export_html(out) if html and out.exists() else None
    return NotebookRun(
        name=notebook.stem,
        ok=ok,
        seconds=seconds,
        ipynb=out if out.exists() else None,
        html=html_path,
        error=error,
        error_name=error_name,
        parameters=params,
    )


@functools.cache
def _html_exporter() -> Any:
    """One exporter per process: its templates compile once, not once per notebook (issue 19:
    0.27 against 0.44-0.65 s of CPU for a run's four notebooks; the same HTML)."""
    import jinja2
    from nbconvert import HTMLExporter

    return HTMLExporter(
        exclude_input=True,
        extra_loaders=[jinja2.DictLoader({"esma_report.html.j2": _REPORT_TEMPLATE})],
        template_file="esma_report.html.j2",
    )


def export_html(executed: str | Path, target: str | Path | None = None) -> Path:
    """Export an executed notebook to a self-contained HTML report without code cells.

    Figures are embedded as base64 PNG; nothing is loaded from the network (no require.js,
    MathJax or widget manager).  Progress-bar widgets are replaced by their text, and carriage
    returns in printed output (text progress bars) are collapsed to the final state.
    """
    import nbformat

    executed = Path(executed)
    nb = nbformat.read(executed, as_version=4)
    _clean_for_html(nb)
    body, _ = _html_exporter().from_notebook_node(
        nb, resources={"metadata": {"name": executed.stem}}
    )
    target = Path(target) if target else executed.with_suffix(".html")
    atomic_write_text(target, body)
    return target


def _clean_for_html(nb: Any) -> None:
    """Make an executed notebook render well as static HTML (in place).

    Widgets cannot run in a static page: a tqdm progress-bar widget becomes the text of its
    final state (from the widget state papermill saved), other widgets their text form or
    nothing.  Carriage returns in printed output keep only the final state of each line.
    """
    widgets = nb.metadata.pop("widgets", None) or {}
    state = widgets.get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    for cell in nb.cells:
        if cell.get("cell_type") != "code":
            continue
        kept = []
        for output in cell.get("outputs", []):
            data = output.get("data")
            if data is not None and _WIDGET_MIME in data:
                view = data.pop(_WIDGET_MIME)
                text = _progress_text(state, view.get("model_id", "")) or str(
                    data.get("text/plain", "")
                )
                for mime in [m for m in data if m != "text/plain"]:
                    data.pop(mime)
                if not text or text.startswith(("HBox(", "VBox(", "FloatProgress(")):
                    continue  # a widget without a useful text form
                data["text/plain"] = text
            if output.get("output_type") == "stream":
                output["text"] = _collapse_carriage_returns(str(output.get("text", "")))
            kept.append(output)
        cell["outputs"] = kept


def _progress_text(state: Mapping[str, Any], model_id: str) -> str | None:
    """The final text of a tqdm notebook progress bar from saved widget state, if it is one."""
    model = state.get(model_id)
    if not model or model.get("model_name") != "HBoxModel":
        return None
    children = [
        state.get(str(c).replace("IPY_MODEL_", ""), {}) for c in model["state"].get("children", [])
    ]
    names = [c.get("model_name") for c in children]
    if names != ["HTMLModel", "FloatProgressModel", "HTMLModel"]:
        return None
    left, bar, right = (c.get("state", {}) for c in children)
    value, top = float(bar.get("value") or 0), float(bar.get("max") or 0)
    filled = round(10 * value / top) if top else 0
    text = f"{left.get('value', '')}|{'█' * filled}{' ' * (10 - filled)}|{right.get('value', '')}"
    return html.unescape(text).replace("\u2007", " ")


def _collapse_carriage_returns(text: str) -> str:
    r"""Keep what a terminal would show: the text after the last ``\r`` of each line."""
    lines = text.split("\n")
    return "\n".join(line.rstrip("\r").rsplit("\r", 1)[-1] for line in lines)


# -------------------------------------------------------------------------------- the run
@dataclass
class RunResult:
    """The outcome of :func:`run_study`.

    Attributes
    ----------
    study : str
        Study name.
    run_id : str
        The run's ID (its folder name).
    run_dir : Path
        The run folder.
    exit_code : int
        0 all fine, 1 some subjects failed or a notebook stopped, 2 invalid input.
    notebooks : list of NotebookRun
        One entry per notebook executed.
    failures : pandas.DataFrame
        subject, stage, error.
    excluded : pandas.DataFrame
        subject, reason, source.
    index : Path
        The run's ``index.html``.
    seconds : float
        Wall time of the whole run (s).
    """

    study: str
    run_id: str
    run_dir: Path
    exit_code: int
    notebooks: list[NotebookRun]
    failures: pd.DataFrame
    excluded: pd.DataFrame
    index: Path
    seconds: float


@hold_output_lock  # issue 16: one esma run per output at a time
def run_study(
    study_path: str | Path,
    *,
    notebooks: Sequence[str] = NOTEBOOKS,
    notebook_dir: str | Path = NOTEBOOK_DIR,
    progress: bool = True,
    stream_output: bool = False,
    extra_parameters: Mapping[str, Mapping[str, Any]] | None = None,
) -> RunResult:
    """Run a study's notebooks with papermill into a new run folder and write its index.

    Parameters
    ----------
    study_path : path
        The study YAML.
    notebooks : sequence of str
        Notebook names to run, in order (default: all four).
    notebook_dir : path
        Where the notebooks are (default: the repository's ``notebooks/``).
    progress : bool
        Show papermill's per-cell progress bars.
    stream_output : bool
        Echo the kernels' printed output to stderr while they run.
    extra_parameters : mapping, optional
        ``{notebook name: {parameter: value}}`` added to the standard ``study``/``run_dir``
        parameters (each checked against the notebook's declared parameters).

    Returns
    -------
    RunResult

    Raises
    ------
    ConfigError
        Invalid study or unknown notebook parameter (before anything is written).
    OutputError
        The output folder cannot be written.
    """
    started = dt.datetime.now(dt.UTC)
    t0 = time.perf_counter()
    study = load_study(study_path)
    notebook_dir = Path(notebook_dir)
    extra = {k: dict(v) for k, v in (extra_parameters or {}).items()}
    plan = []
    for name in notebooks:
        nb = notebook_dir / f"{name}.ipynb"
        if not nb.is_file():
            msg = f"{nb}: pipeline notebook not found"
            raise ConfigError(msg)
        params = {"study": "", "run_dir": "", **_batch_parameters(nb), **extra.get(name, {})}
        check_parameters(nb, params)  # before any folder is created
        plan.append((nb, params))

    ingested = None
    if study.ingest is not None:
        ingested = ingest_stage(study)
        study = load_study(study_path)  # the cohort is what the ingest wrote
        if not study.subjects:
            msg = f"no image to analyse: {ingest_summary(ingested.table)} (see its issues column)"
            raise InputFileError(study.ingest.table, msg)

    run_id, run_dir = _create_run_dir(study.output)
    log.info("run %s of study %s -> %s", run_id, study.name, run_dir)
    frozen = _freeze_study(study, run_dir)
    if ingested is not None:
        record_ingest(run_paths(study, run_dir), ingested)
    checksums = input_checksums(study)  # the inputs as they were when the run started

    runs: list[NotebookRun] = []
    stopped = False

    def write_reports(exit_code: int) -> Path:
        failures = collect_failures(run_dir)
        excluded = collect_excluded(run_dir, failures)
        seconds = time.perf_counter() - t0
        manifest = build_manifest(
            study,
            run_id,
            run_dir,
            runs,
            failures,
            excluded,
            started,
            seconds,
            exit_code,
            checksums=checksums,
        )
        atomic_write_text(run_dir / "manifest.json", json.dumps(manifest, indent=2, default=str))
        return write_index(run_dir, manifest, failures, excluded)

    write_reports(EXIT_RUNNING)
    for nb, params in plan:
        params = {**params, "study": str(frozen), "run_dir": str(run_dir)}
        if stopped:
            runs.append(
                NotebookRun(
                    nb.stem,
                    False,
                    0.0,
                    None,
                    None,
                    "not run: earlier notebook stopped",
                    "NotRun",
                    params,
                )
            )
            continue
        if nb.stem in NEEDS_CLINICAL and study.clinical is None:
            log.info("skipping %s: the study gives no clinical data", nb.name)
            runs.append(
                NotebookRun(
                    nb.stem,
                    True,
                    0.0,
                    None,
                    None,
                    "skipped: the study gives no clinical data",
                    None,
                    params,
                )
            )
            continue
        log.info("running %s", nb.name)
        result = execute_notebook(
            nb, run_dir, params, progress=progress, stream_output=stream_output
        )
        runs.append(result)
        if not result.ok:
            stopped = True
        write_reports(EXIT_RUNNING)  # an interrupted run still has an index of what it did

    failures = collect_failures(run_dir)
    excluded = collect_excluded(run_dir, failures)
    seconds = time.perf_counter() - t0
    bad_input = any(
        (not r.ok) and r.error_name in _esma_error_names() for r in runs if r.error_name != "NotRun"
    )
    if bad_input and failures.empty:
        # a notebook stopped on an input esma refuses (not caused by failed subjects)
        exit_code = EXIT_BAD_INPUT
    elif any((not r.ok) and r.error_name == "OutputError" for r in runs):
        exit_code = EXIT_INFRASTRUCTURE  # the run failed, not the input (issue 16)
    elif stopped or not failures.empty:
        exit_code = EXIT_PARTIAL
    else:
        exit_code = EXIT_OK
    index = write_reports(exit_code)
    log.info("run %s finished in %.1f s (exit code %d): %s", run_id, seconds, exit_code, index)
    return RunResult(
        study.name, run_id, run_dir, exit_code, runs, failures, excluded, index, seconds
    )


def _batch_parameters(notebook: Path) -> dict[str, Any]:
    """Parameters the runner sets besides study/run_dir (batch mode: no interactive widgets)."""
    import papermill as pm

    declared = pm.inspect_notebook(str(notebook))
    return {"interactive": False} if "interactive" in declared else {}


def _freeze_study(study: Study, run_dir: Path) -> Path:
    """Write the run's own copy of the study (absolute paths, cohort manifest)."""
    cohort = run_dir / "cohort.csv"
    text = study.cohort_table().to_csv(index=False)
    atomic_write_text(cohort, text)
    doc = resolved_document(study, cohort)
    header = (
        f"# Frozen copy of {study.source} for this run (paths absolute, cohort in cohort.csv).\n"
    )
    target = run_dir / "study.yml"
    atomic_write_text(target, header + yaml.safe_dump(doc, sort_keys=False))
    return target


def _esma_error_names() -> set[str]:
    """Class names of the input errors esma raises (a notebook stopping on one = bad input)."""
    from helpers import errors

    names = set()
    stack = [errors.EsmaError]
    while stack:
        cls = stack.pop()
        names.add(cls.__name__)
        stack.extend(cls.__subclasses__())
    names.discard("OutputError")
    return names


# ------------------------------------------------------------------------ failures & excluded
FAILURE_COLUMNS = ["subject", "stage", "error"]
EXCLUDED_COLUMNS = ["subject", "reason", "source"]


def write_failures(paths: RunPaths, stage: str, failures: pd.DataFrame) -> Path:
    """Write one stage's failures (subject, stage, error) as ``failures_<stage>.csv``.

    Paths in the errors are cut to file names (:func:`redact_paths`).
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


# ------------------------------------------------------------------------------ stage records
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


# ------------------------------------------------------------------------------- provenance
def package_versions(names: Sequence[str] = PROVENANCE_PACKAGES) -> dict[str, str]:
    """Installed versions of ``names`` (``"not installed"`` when absent)."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    out["python"] = platform.python_version()
    return out


def input_checksums(study: Study) -> list[dict[str, str]]:
    """sha256 of every input file, keyed by subject and role (never by patient name or path).

    Study-level files (labels, model, clinical, study YAML) have subject ``"-"``; a model
    folder gets the checksum of its ``fold_*/checkpoint_final.pth`` files combined.
    """
    rows = [
        {
            "subject": "-",
            "role": "study file",
            "file": study.source.name,
            "sha256": sha256_file(study.source),
        },
        {
            "subject": "-",
            "role": "labels",
            "file": study.labels.name,
            "sha256": sha256_file(study.labels),
        },
    ]
    if study.model is not None:
        rows.append(
            {
                "subject": "-",
                "role": "model",
                "file": study.model.name,
                "sha256": _model_checksum(study.model),
            }
        )
    if study.ingest is not None and study.ingest.table.is_file():
        rows.append(
            {
                "subject": "-",
                "role": "DICOM ingest table",
                "file": study.ingest.table.name,
                "sha256": sha256_file(study.ingest.table),
            }
        )
    if study.clinical is not None:
        rows.append(
            {
                "subject": "-",
                "role": "clinical",
                "file": study.clinical.path.name,
                "sha256": sha256_file(study.clinical.path),
            }
        )
    for s in study.subjects:
        for role in ("image", "mask", "manual_mask", "levels", "water", "fat", "corrected_mask"):
            path = getattr(s, role)
            if path is not None:
                rows.append(
                    {"subject": s.subject, "role": role, "file": "", "sha256": sha256_file(path)}
                )
    return rows


def _model_checksum(model: Path) -> str:
    if model.is_file():
        return sha256_file(model)
    import hashlib

    digest = hashlib.sha256()
    files = sorted(model.rglob("*.json")) + sorted(model.rglob("checkpoint_final.pth"))
    for f in files:
        digest.update(str(f.relative_to(model)).encode())
        digest.update(sha256_file(f).encode())
    return digest.hexdigest()


def _git_commit() -> str | None:
    head = Path(__file__).resolve().parents[1] / ".git" / "HEAD"
    try:
        ref = head.read_text(encoding="utf-8").strip()
        if ref.startswith("ref: "):
            ref_path = head.parent / ref[5:]
            if ref_path.is_file():
                return ref_path.read_text(encoding="utf-8").strip()
            packed = head.parent / "packed-refs"
            for line in packed.read_text(encoding="utf-8").splitlines():
                if line.endswith(ref[5:]):
                    return line.split()[0]
            return None
        return ref
    except OSError:
        return None


def build_manifest(
    study: Study,
    run_id: str,
    run_dir: Path,
    runs: Sequence[NotebookRun],
    failures: pd.DataFrame,
    excluded: pd.DataFrame,
    started: dt.datetime,
    seconds: float,
    exit_code: int,
    *,
    checksums: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    """The run's provenance record (``manifest.json``).

    ``exit_code`` :data:`EXIT_RUNNING` marks a run that has not finished yet.
    """
    return {
        "study": study.name,
        "description": study.description,
        "run_id": run_id,
        "run_dir": str(run_dir),
        "started_utc": started.isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
        "exit_code": exit_code,
        "esma_version": __version__,
        "git_commit": _git_commit(),
        "host": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "versions": package_versions(),
        "study_source": str(study.source),
        "settings": {
            "images": study.images_spec,
            "segmentation": study.segmentation,
            "metrics": study.metrics,
            "qc": study.qc,
            "executor": study.executor,
            "statistics": dataclasses.asdict(study.statistics),
            "clinical_mapping": study.clinical.mapping if study.clinical else None,
            # rules only: the DICOM folder's path may carry a patient's name
            "ingest": {"rules": study.ingest.rules, "out": study.ingest.out.name}
            if study.ingest
            else None,
            "uses_given_masks": study.uses_given_masks,
        },
        "n_subjects": len(study.subjects),
        "contrasts": _contrast_counts(study),
        "notebooks": [
            {
                "name": r.name,
                "ok": r.ok,
                "seconds": round(r.seconds, 3),
                "error": r.error,
                "html": r.html.name if r.html else None,
                "ipynb": r.ipynb.name if r.ipynb else None,
                "parameters": r.parameters,
            }
            for r in runs
        ],
        "stages": read_stage_records(run_dir),
        "checksums": checksums if checksums is not None else input_checksums(study),
        "failures": failures.to_dict("records"),
        "excluded": excluded.to_dict("records"),
    }


# ---------------------------------------------------------------------------------- index
def write_index(
    run_dir: Path, manifest: Mapping[str, Any], failures: pd.DataFrame, excluded: pd.DataFrame
) -> Path:
    """Write ``index.html``: links to the reports and the run's provenance (no external files)."""
    e = html.escape
    status = {
        EXIT_OK: "completed",
        EXIT_PARTIAL: "completed with failures",
        EXIT_BAD_INPUT: "stopped: invalid input",
        EXIT_INFRASTRUCTURE: "stopped: could not write its outputs (disk full?)",
        EXIT_RUNNING: "not finished (still running, or interrupted)",
    }.get(int(manifest["exit_code"]), "unknown")
    nb_rows = []
    for nb in manifest["notebooks"]:
        link = f'<a href="{e(nb["html"])}">{e(nb["name"])}</a>' if nb["html"] else e(nb["name"])
        raw = f' (<a href="{e(nb["ipynb"])}">notebook</a>)' if nb["ipynb"] else ""
        if nb["ok"]:
            state = e(nb["error"]) if nb["error"] else "ok"  # ok, or why it was skipped
        else:
            state = f'<span class="bad">{e(nb["error"] or "failed")}</span>'
        nb_rows.append(
            f"<tr><td>{link}{raw}</td><td>{state}</td><td class=num>{nb['seconds']:.1f}</td></tr>"
        )
    stage_rows = []
    for st in manifest["stages"]:
        counts = ", ".join(f"{k[2:]} {v}" for k, v in st.items() if k.startswith("n_"))
        stage_rows.append(
            f"<tr><td>{e(st['stage'])}</td><td class=num>{st['subjects']}</td>"
            f"<td>{e(counts)}</td><td class=num>{st['seconds']:.1f}</td></tr>"
        )
    ex_rows = [
        f"<tr><td>{e(str(r['subject']))}</td><td>{e(str(r['reason']))}</td>"
        f"<td>{e(str(r['source']))}</td></tr>"
        for r in excluded.to_dict("records")
    ]
    fail_rows = [
        f"<tr><td>{e(str(r['subject']))}</td><td>{e(str(r['stage']))}</td>"
        f"<td>{e(str(r['error']))}</td></tr>"
        for r in failures.to_dict("records")
    ]
    versions = "".join(
        f"<tr><td>{e(k)}</td><td>{e(str(v))}</td></tr>" for k, v in manifest["versions"].items()
    )
    settings = e(yaml.safe_dump(_plain(manifest["settings"]), sort_keys=False))
    params = "".join(
        f"<tr><td>{e(nb['name'])}</td><td><code>{e(json.dumps(nb['parameters']))}</code></td></tr>"
        for nb in manifest["notebooks"]
    )
    checks = "".join(
        f"<tr><td>{e(c['subject'])}</td><td>{e(c['role'])}</td><td>{e(c['file'])}</td>"
        f"<td><code>{e(c['sha256'])}</code></td></tr>"
        for c in manifest["checksums"]
    )
    empty = '<tr><td colspan="3">none</td></tr>'
    from helpers.corrections import mask_sources_section

    ingest_section = (_warnings_section(run_dir) + _ingest_section(run_dir)
                      + mask_sources_section(run_dir))
    description = e(manifest.get("description") or "")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>esma: {e(manifest["study"])} run {e(manifest["run_id"])}</title>
<style>
body {{ font-family: sans-serif; margin: 2em auto; max-width: 72em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
td, th {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }}
th {{ background: #f0f0f0; }} .num {{ text-align: right; }} .bad {{ color: #b00; }}
code, pre {{ font-size: 0.85em; }} details {{ margin-bottom: 1em; }}
</style></head><body>
<h1>Study {e(manifest["study"])}: run {e(manifest["run_id"])}</h1>
<p>{description}</p>
<p>Status: <b>{e(status)}</b> (exit code {manifest["exit_code"]}); started
{e(manifest["started_utc"])} UTC; {manifest["seconds"]:.1f} s;
{manifest["n_subjects"]} subjects{e(_contrast_text(manifest))}; esma {e(manifest["esma_version"])}
{("(git " + e(str(manifest["git_commit"])[:12]) + ")") if manifest["git_commit"] else ""}.</p>
<p>Subjects appear by their pseudonymous study ID only.</p>
<h2>Reports</h2>
<table><tr><th>notebook</th><th>status</th><th>seconds</th></tr>{"".join(nb_rows)}</table>
<h2>Stages</h2>
<p>Per-subject work is kept in the study's work folder and reused by later runs
(<i>reused</i> = finished earlier with the same inputs and settings).</p>
<table><tr><th>stage</th><th>subjects</th><th>status</th><th>seconds</th></tr>
{"".join(stage_rows) or '<tr><td colspan="4">none</td></tr>'}</table>
{ingest_section}<h2>Excluded subjects</h2>
<table><tr><th>subject</th><th>reason</th><th>source</th></tr>{"".join(ex_rows) or empty}</table>
<h2>Failures</h2>
<p>Also in <a href="failures.csv">failures.csv</a>.</p>
<table><tr><th>subject</th><th>stage</th><th>error</th></tr>{"".join(fail_rows) or empty}</table>
<h2>Provenance</h2>
<details><summary>Settings</summary><pre>{settings}</pre></details>
<details><summary>Notebook parameters</summary>
<table><tr><th>notebook</th><th>parameters</th></tr>{params}</table></details>
<details><summary>Package versions</summary>
<table><tr><th>package</th><th>version</th></tr>{versions}</table></details>
<details><summary>Input and model checksums (sha256)</summary>
<table><tr><th>subject</th><th>role</th><th>file</th><th>sha256</th></tr>{checks}</table></details>
<p>Full record: <a href="manifest.json">manifest.json</a>.</p>
</body></html>
"""
    target = run_dir / "index.html"
    atomic_write_text(target, page)
    return target


def _ingest_section(run_dir: Path) -> str:
    """The index's DICOM ingest section: series counts and every series with a finding."""
    path = run_dir / "ingest.csv"
    if not path.is_file():
        return ""
    e = html.escape
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError):
        return ""
    noted = table[table["issues"].str.strip() != ""]
    rows = "".join(
        f"<tr><td>{e(r['subject'])}</td><td class=num>{e(r['series'])}</td>"
        f"<td>{e(r['image'])}</td><td>{e(r['status'])}</td><td>{e(r['issues'])}</td></tr>"
        for r in noted.to_dict("records")
    )
    body = rows or '<tr><td colspan="5">none</td></tr>'
    return (
        "<h2>DICOM ingest</h2>\n"
        f"<p>{e(ingest_summary(table))}. Every series and its findings: "
        '<a href="ingest.csv">ingest.csv</a>; refused series are also listed under '
        "Failures.</p>\n"
        "<table><tr><th>subject</th><th>series</th><th>image</th><th>status</th>"
        f"<th>findings</th></tr>{body}</table>\n"
    )


def _plain(obj: Any) -> Any:
    """Tuples to lists, paths to strings: something yaml.safe_dump accepts."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


# ------------------------------------------------------------------------------ DICOM ingest
def ingest_stage(study: Study) -> Any:
    """Ingest the study's DICOM export (:func:`helpers.dicom.ingest_once`).

    Skipped (``reused``) when the last ingest into the same folder is complete and was made
    from the same DICOM files with the same rules, key and secret.

    Returns
    -------
    helpers.dicom.IngestResult

    Raises
    ------
    ConfigError
        The study has no ``ingest:`` section, or its key/secret are unusable.
    InputFileError
        The DICOM folder holds no DICOM image.
    """
    from helpers.dicom import ingest_once

    spec = study.ingest
    if spec is None:
        msg = f"{study.source.name}: ingest: the study has no ingest: section"
        raise ConfigError(msg)
    result = ingest_once(
        spec.dicom,
        spec.out,
        key_path=spec.key,
        secret_path=spec.secret,
        rules=spec.ingest_rules(),
    )
    log.info(
        "ingest %s: %s",
        "reused (DICOM unchanged)" if result.reused else "done",
        ingest_summary(result.table),
    )
    return result


def ingest_summary(table: pd.DataFrame) -> str:
    """One line of counts: ``6 series of 4 subjects: 4 written, 1 refused, 1 skipped``."""
    counts = table["status"].value_counts() if len(table) else pd.Series(dtype=int)
    parts = [f"{int(counts.get(k, 0))} {k}" for k in ("written", "refused", "skipped")]
    n = table["subject"].nunique() if len(table) else 0
    return f"{len(table)} DICOM series of {n} subject{'' if n == 1 else 's'}: " + ", ".join(parts)


def ingest_failures(table: pd.DataFrame) -> pd.DataFrame:
    """Per-subject failures of an ingest (subject, stage, error) from its ``ingest.csv``.

    Every refused series is a failure (with its findings); so is a subject none of whose
    series was written (all skipped: no axial T2).  Skipped series of a subject who has an
    image (localizers, sagittal series) are not failures.
    """
    rows = []
    for subject, group in table.groupby("subject", sort=True):
        has_image = bool((group["status"] == "written").any())
        for r in group[group["status"] == "refused"].to_dict("records"):
            outcome = "another series of this subject was used" if has_image else "no image"
            rows.append(
                {
                    "subject": subject,
                    "stage": "ingest",
                    "error": f"DICOM series {r['series']} refused ({outcome}): {r['issues']}",
                }
            )
        if not has_image and not (group["status"] == "refused").any():
            skipped = "; ".join(
                f"series {r['series']}: {r['issues']}" for r in group.to_dict("records")
            )
            rows.append(
                {
                    "subject": subject,
                    "stage": "ingest",
                    "error": f"no axial T2 series ({skipped})",
                }
            )
    return pd.DataFrame(rows, columns=FAILURE_COLUMNS)


def record_ingest(paths: RunPaths, result: Any) -> None:
    """Put an ingest into a run: ``ingest.csv``, ``failures_ingest.csv``, the stage record."""
    table = result.table
    atomic_write_text(paths.file("ingest.csv"), table.to_csv(index=False))
    write_failures(paths, "ingest", ingest_failures(table))
    written = set(table.loc[table["status"] == "written", "subject"])
    ok = "reused" if result.reused else "computed"
    status = pd.DataFrame(
        {
            "subject": sorted(set(table["subject"])),
            "status": [ok if s in written else "failed" for s in sorted(set(table["subject"]))],
        }
    )
    record_stage(paths, "ingest", status, result.seconds)


# ==========================================================================================
# Stages: what the notebooks call
# ==========================================================================================
SEGMENTATION_COLUMNS = ["subject", "mask", "status", "seconds", "error"]
STATUS_COLUMNS = ["subject", "status", "seconds", "error"]


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


def read_segmentation(paths: RunPaths) -> pd.DataFrame:
    """The segmentation table written by ``01_segment`` (subject, mask, status, ...)."""
    table = pd.read_csv(paths.upstream("segmentation.csv"), dtype={"subject": str})
    table["error"] = table["error"].fillna("")
    table["mask"] = table["mask"].fillna("")
    return table


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


# ------------------------------------------------------------------------------ segmentation
def segment_stage(study: Study, paths: RunPaths, *, progress: bool = True) -> pd.DataFrame:
    """Segment the cohort (or take the given masks) and write ``segmentation.csv``.

    Segmentations go to the study's work folder (``work/seg``) and are reused by later runs
    when the model, settings and image are unchanged (``status = reused``).  A subject that
    fails is recorded in ``failures_segment.csv``; the others go on.

    Returns
    -------
    pandas.DataFrame
        subject, mask (path or empty), status (``computed`` / ``reused`` / ``given`` /
        ``failed``), seconds, error.
    """
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    to_segment = []
    for s in study.subjects:
        if s.corrected_mask is not None:
            # a reviewer's corrected mask replaces the model's or the given one
            from helpers.corrections import corrected_row

            rows.append(corrected_row(study, s))
        elif s.mask is not None:
            rows.append(
                {
                    "subject": s.subject,
                    "mask": str(s.mask),
                    "status": "given",
                    "seconds": 0.0,
                    "error": "",
                }
            )
        elif study.model is None:
            rows.append(
                {
                    "subject": s.subject,
                    "mask": "",
                    "status": "failed",
                    "seconds": 0.0,
                    "error": "no mask given and no model to segment with",
                }
            )
        else:
            to_segment.append(s)
    if to_segment:
        rows.extend(_segment_with_model(study, paths, to_segment, progress=progress))
        check_model_labels(study, paths)
    table = pd.DataFrame(rows, columns=SEGMENTATION_COLUMNS)
    order = {s: i for i, s in enumerate(study.subject_ids)}
    table = table.sort_values("subject", key=lambda c: c.map(order)).reset_index(drop=True)
    atomic_write_text(paths.file("segmentation.csv"), table.to_csv(index=False))
    from helpers.corrections import write_mask_sources

    write_mask_sources(paths.file("mask_sources.csv"), table)
    failed = table[table["status"] == "failed"]
    write_failures(paths, "segment", failed[["subject", "error"]].assign(stage="segment"))
    record_stage(paths, "segment", table, time.perf_counter() - t0)
    return table


def _segment_with_model(
    study: Study, paths: RunPaths, subjects: Sequence[Any], *, progress: bool
) -> list[dict[str, Any]]:
    from helpers.segment import segment_cohort

    staged = {
        _stage_input(paths, s.subject, _segmentation_input(study, paths, s)): s.subject
        for s in subjects
    }
    settings = study.segment_settings()
    if (study.dixon or {}).get("segment_on") in ("water", "fat"):
        import dataclasses

        # a water or fat image is not fat-bright: only a model trained on it segments it
        settings = dataclasses.replace(settings, fat_bright=False)
    result = segment_cohort(
        list(staged),
        study.model,
        paths.seg_dir,
        settings,
        overwrite=False,
        progress=progress,
    )
    by_subject = {}
    for r in result.to_dict("records"):
        subject = staged.get(Path(str(r.get("image", ""))), str(r.get("subject", "")))
        by_subject[subject] = r
    rows = []
    for s in subjects:
        r = by_subject.get(s.subject)
        if r is None:
            rows.append(
                {
                    "subject": s.subject,
                    "mask": "",
                    "status": "failed",
                    "seconds": 0.0,
                    "error": "segmentation produced no result",
                }
            )
            continue
        status = _SEG_STATUS.get(str(r["status"]), str(r["status"]))
        error = "" if pd.isna(r.get("error")) else str(r.get("error") or "")
        error = redact_paths(error)
        mask = "" if status == "failed" or pd.isna(r.get("mask")) else str(r["mask"])
        seconds = float(r["seconds"]) if pd.notna(r.get("seconds")) else 0.0
        rows.append(
            {
                "subject": s.subject,
                "mask": mask,
                "status": status,
                "seconds": seconds,
                "error": error,
            }
        )
    return rows


def _stage_input(paths: RunPaths, subject: str, image: Path) -> Path:
    """A link ``work/seg_inputs/<subject>.nii.gz`` -> the image, so that the segmentation's
    file-name-based subject ID is the study's subject ID (manifests may name subjects freely).
    """
    suffix = ".nii.gz" if image.name.endswith(".nii.gz") else ".nii"
    link = paths.work_dir / "seg_inputs" / f"{subject}{suffix}"
    link.parent.mkdir(parents=True, exist_ok=True)
    try:
        if link.is_symlink() or link.exists():
            if link.resolve() == image.resolve():
                return link
            link.unlink()
        link.symlink_to(image.resolve())
    except OSError as exc:  # pragma: no cover - file systems without symbolic links
        log.warning("cannot link %s (%s); segmenting the original file", link.name, exc)
        return image
    return link


def segmentation_info(study: Study, paths: RunPaths, segmentation: pd.DataFrame) -> pd.DataFrame:
    """Model and settings of this run's segmentations (from their sidecars), as item/value rows.

    Also lists the subjects whose segmented right label lies left of its twin (world x).
    """
    rows: list[tuple[str, str]] = []
    made = segmentation[segmentation["status"].isin(["computed", "reused"])]
    given = int((segmentation["status"] == "given").sum())
    if given:
        rows.append(("masks given by the study", f"{given} subjects (not segmented)"))
    sidecars = []
    for subject in made["subject"]:
        path = paths.seg_dir / f"{subject}.json"
        if path.is_file():
            try:
                sidecars.append(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                continue
    if sidecars:
        first = sidecars[0]
        model, settings = first.get("model", {}), first.get("settings", {})
        rows += [
            ("model", str(model.get("source", ""))),
            ("model sha256", str(model.get("sha256", ""))),
            (
                "configuration / trainer",
                f"{model.get('configuration', '')} / {model.get('trainer', '')}",
            ),
            ("labels sided by the model", str(model.get("labels_sided", ""))),
        ]
        rows += [(f"setting: {k}", str(v)) for k, v in settings.items()]
        rows += [(f"version: {k}", str(v)) for k, v in first.get("versions", {}).items()]
        models = {sc.get("model", {}).get("sha256") for sc in sidecars}
        if len(models) > 1:
            rows.append(("warning", f"masks come from {len(models)} different models"))
        swapped = [
            f"{sc.get('subject')}: {m}"
            for sc in sidecars
            for m, v in sc.get("side_check", {}).items()
            if v != "ok"
        ]
        rows.append(("side check (world x)", "; ".join(swapped) if swapped else "all ok"))
    return pd.DataFrame(rows, columns=["item", "value"])


#: helpers.segment statuses -> pipeline statuses.
_SEG_STATUS = {
    "done": "computed",
    "ok": "computed",
    "segmented": "computed",
    "computed": "computed",
    "skipped": "reused",
    "reused": "reused",
    "cached": "reused",
    "failed": "failed",
    "error": "failed",
}


# -------------------------------------------------------------------------------- measuring
@dataclass(frozen=True)
class MeasureTask:
    """Everything one subject's measurement needs (picklable, for any executor)."""

    subject: str
    image: str
    mask: str
    labels: str
    levels: str | None
    settings: dict[str, Any]
    out_dir: str
    water: str | None = None  # a Dixon pair (issue 18): fat from F / (W + F)
    fat: str | None = None
    dixon: dict[str, Any] = field(default_factory=dict)


#: The files whose completion markers say that a subject's stage is finished.
_MEASURE_OUTPUTS = ("metrics.csv", "asymmetry.csv")
_QC_OUTPUTS = ("qc.csv", "mosaic.png")


def _finished(out: Path, names: tuple[str, ...], key: dict[str, Any]) -> bool:
    """True when every file ``names`` in ``out`` carries a completion marker for ``key``."""
    from helpers.files import is_done

    return all(is_done(out / name, key) for name in names)


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
    from helpers.files import mark_done
    from helpers.metrics import MetricsSettings, measure_files, write_result

    t0 = time.perf_counter()
    out = Path(task.out_dir)
    key = _measure_key(task)
    if _finished(out, _MEASURE_OUTPUTS, key):
        return {"status": "reused", "seconds": time.perf_counter() - t0}
    settings = MetricsSettings.from_mapping(dict(task.settings))
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
    for name in _MEASURE_OUTPUTS:
        mark_done(out / name, key)
    return {"status": "computed", "seconds": time.perf_counter() - t0}


def measure_done(task: MeasureTask) -> bool:
    """True when the subject's measurement is finished with these inputs and settings."""
    return _finished(Path(task.out_dir), _MEASURE_OUTPUTS, _measure_key(task))


def _measure_key(task: MeasureTask) -> dict[str, Any]:
    key = {
        "esma": __version__,
        "settings": task.settings,
        "image": sha256_file(task.image),
        "mask": sha256_file(task.mask),
        "labels": sha256_file(task.labels),
        "levels": sha256_file(task.levels) if task.levels else None,
        "subject": task.subject,
    }
    if task.water is not None and task.fat is not None:
        key.update(_dixon_key(task))
    return key


def labels_for(study: Study, paths: RunPaths, status: str) -> str:
    """The label file that describes a subject's mask.

    Masks the model made are described by the label file the segmentation step wrote beside
    them (``work/seg/labels.json``: the model's labels, unsided ones split into sides); given
    masks by the study's ``labels``.  A model whose labels differ from the study's label file is
    reported once per run.
    """
    seg_labels = paths.seg_dir / "labels.json"
    if status in ("computed", "reused") and seg_labels.is_file():
        return str(seg_labels)
    return str(study.labels)


def check_model_labels(study: Study, paths: RunPaths) -> str | None:
    """A warning when the model's output labels differ from the study's label file, else None."""
    from helpers.labels import load_labels

    seg_labels = paths.seg_dir / "labels.json"
    if not seg_labels.is_file():
        return None
    model = {(lab.value, lab.muscle, lab.side) for lab in load_labels(seg_labels).labels}
    declared = {(lab.value, lab.muscle, lab.side) for lab in load_labels(study.labels).labels}
    if model == declared:
        return None
    msg = (
        f"the model's output labels differ from the study's label file {study.labels.name}: "
        f"only in the model {sorted(model - declared)}, only in the file "
        f"{sorted(declared - model)}; measurements of segmented subjects use the model's labels"
    )
    log.warning("%s", msg)
    record_run_warning(paths.run_dir, msg)  # issue 16: shown in index.html too
    return msg


# ------------------------------------------------------------ run warnings (issue 16)
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


def _warnings_section(run_dir: Path) -> str:
    found = read_run_warnings(run_dir)
    if not found:
        return ""
    items = "".join(f"<li>{html.escape(redact_paths(m))}</li>" for m in found)
    return f'<h2>Warnings</h2>\n<ul class="bad">{items}</ul>\n'


def _levels_for(study: Study, subject: str) -> str | None:
    s = study.subject(subject)
    return None if s.levels is None else str(s.levels)


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
        subject, status (``computed`` / ``reused`` / ``failed``), seconds, error.
    """
    from helpers.executor import run_tasks

    t0 = time.perf_counter()
    ok = segmentation[(segmentation["status"] != "failed") & (segmentation["mask"] != "")]
    if subjects is not None:
        ok = ok[ok["subject"].isin(list(subjects))]
    settings = dict(study.metrics)
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
    rows, todo = _reuse_finished(tasks, measure_done)
    outcomes = run_tasks(
        measure_subject, todo, study.executor_config(), desc=stage, progress=progress
    )
    for key, o in outcomes.items():
        if o.ok:
            rows.append(
                {
                    "subject": key,
                    "status": o.value["status"],
                    "seconds": float(o.value["seconds"]),
                    "error": "",
                }
            )
        else:
            rows.append(
                {
                    "subject": key,
                    "status": "failed",
                    "seconds": float(o.seconds),
                    "error": redact_paths(o.error or "failed"),
                }
            )
    order = {k: i for i, k in enumerate(tasks)}
    table = pd.DataFrame(rows, columns=STATUS_COLUMNS)
    table = table.sort_values("subject", key=lambda c: c.map(order)).reset_index(drop=True)
    failed = table[table["status"] == "failed"]
    write_failures(paths, stage, failed[["subject", "error"]].assign(stage=stage))
    record_stage(paths, stage, table, time.perf_counter() - t0)
    return table


def _reuse_finished(
    tasks: Mapping[str, Any], done: Any
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Split tasks into finished ones (status rows ``reused``) and the rest (to run).

    Checking in this process first means a re-run starts no worker pool for finished work.
    """
    rows, todo = [], {}
    for key, task in tasks.items():
        t0 = time.perf_counter()
        try:
            finished = done(task)
        except OSError:
            finished = False
        if finished:
            rows.append(
                {
                    "subject": key,
                    "status": "reused",
                    "seconds": time.perf_counter() - t0,
                    "error": "",
                }
            )
        else:
            todo[key] = task
    if rows:
        log.info("%d subject(s) already finished: reused", len(rows))
    return rows, todo


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


def _cohort_levels(study: Study, subjects: Sequence[str]) -> dict[str, pd.DataFrame]:
    from helpers.metrics import read_levels

    out = {}
    for subject in subjects:
        s = study.subject(subject)
        if s.levels is not None:
            try:
                out[subject] = read_levels(s.levels, subject)
            except EsmaError as exc:
                log.warning("levels of %s not used in QC: %s", subject, exc)
    return out


# --------------------------------------------------------------------------------------- QC
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
    settings: dict[str, Any]
    out_dir: str


def _qc_key(task: QCTask) -> dict[str, Any]:
    return {
        "esma": __version__,
        "settings": task.settings,
        "image": sha256_file(task.image),
        "mask": sha256_file(task.mask),
        "manual": sha256_file(task.manual) if task.manual else None,
        "labels": sha256_file(task.labels),
        "levels": sha256_file(task.levels) if task.levels else None,
    }


def qc_done(task: QCTask) -> bool:
    """True when the subject's QC rows and mosaic are finished with these inputs/settings."""
    return _finished(Path(task.out_dir), _QC_OUTPUTS, _qc_key(task))


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
    from helpers.files import mark_done
    from helpers.labels import load_labels
    from helpers.metrics import read_levels
    from helpers.nifti import check_same_grid, load_image, load_mask

    t0 = time.perf_counter()
    out = Path(task.out_dir)
    rows_csv, mosaic = (out / name for name in _QC_OUTPUTS)
    key = _qc_key(task)
    result = {"qc": str(rows_csv), "mosaic": str(mosaic)}
    if _finished(out, _QC_OUTPUTS, key):
        return {"status": "reused", "seconds": time.perf_counter() - t0, **result}
    settings = qc.QCSettings.from_mapping(task.settings)
    labels = load_labels(task.labels)
    levels = read_levels(task.levels, task.subject) if task.levels else None
    try:
        image, mask = load_image(task.image), load_mask(task.mask)
        check_same_grid(image, mask)
        manual = load_mask(task.manual) if task.manual else None
        rows = qc.check_subject(
            task.subject, mask, labels, levels=levels, manual=manual, settings=settings,
            image=image,
        )
    except EsmaError as exc:
        # unreadable or off-grid files: one failing QC row naming the file, not a crash
        path = getattr(exc, "path", None)
        reason = f"{Path(path).name}: {exc.problem}" if path is not None else str(exc)
        rows = pd.DataFrame(
            [
                {
                    "subject": task.subject,
                    "level": qc.ALL_LEVELS,
                    "muscle": "",
                    "side": "",
                    "check": "input",
                    "status": "fail",
                    "value": float("nan"),
                    "reason": reason,
                }
            ],
            columns=list(qc.QC_COLUMNS),
        )
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
    mark_done(rows_csv, key)
    mark_done(mosaic, key)
    return {"status": "computed", "seconds": time.perf_counter() - t0, **result}


def qc_stage(
    study: Study, paths: RunPaths, segmentation: pd.DataFrame, *, progress: bool = True
) -> QCOutputs:
    """Quality control of the segmentations: checks, mosaics, qc.csv and the decisions file.

    The subjects are measured first (:func:`measure_stage`, reused when finished) because the
    cohort outlier checks compare their areas and fat.  Per-subject checks and overlay mosaics
    run through the study's executor and are kept in the work folder (``work/qc``), reused by
    later runs.  The reviewer's decisions file (``<output>/qc_decisions.csv``) gets a row for
    every subject it does not list yet (QC's suggestion: ``exclude`` on ``fail``); rows already
    there are never changed.  A copy of it goes to the run folder.
    """
    from helpers import qc
    from helpers.executor import TaskOutcome, run_tasks

    t0 = time.perf_counter()
    measured = measure_stage(study, paths, segmentation, stage="measure", progress=progress)
    ok = segmentation[(segmentation["status"] != "failed") & (segmentation["mask"] != "")]
    settings = qc.QCSettings.from_mapping(study.qc)
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
            settings=settings.to_dict(),
            out_dir=str(paths.work_dir / "qc" / s.subject),
        )
    reused, todo = _reuse_finished(tasks, qc_done)
    outcomes = dict(
        run_tasks(qc_subject, todo, study.executor_config(), desc="QC", progress=progress)
    )
    for row in reused:
        task = tasks[row["subject"]]
        value = {
            "status": "reused",
            "seconds": row["seconds"],
            "qc": str(Path(task.out_dir) / "qc.csv"),
            "mosaic": str(Path(task.out_dir) / "mosaic.png"),
        }
        outcomes[row["subject"]] = TaskOutcome(row["subject"], True, value, None, row["seconds"])
    outcomes = {k: outcomes[k] for k in tasks}
    frames, mosaics, status_rows = [], {}, []
    for key, o in outcomes.items():
        if not o.ok:
            status_rows.append(
                {
                    "subject": key,
                    "status": "failed",
                    "seconds": o.seconds,
                    "error": redact_paths(o.error or "failed"),
                }
            )
            frames.append(
                pd.DataFrame(
                    [
                        {
                            "subject": key,
                            "level": qc.ALL_LEVELS,
                            "muscle": "",
                            "side": "",
                            "check": "input",
                            "status": "fail",
                            "value": float("nan"),
                            "reason": redact_paths(f"QC could not run: {o.error}"),
                        }
                    ]
                )
            )
            continue
        status_rows.append(
            {
                "subject": key,
                "status": o.value["status"],
                "seconds": o.value["seconds"],
                "error": "",
            }
        )
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
    could_not_run = [r["subject"] for r in status_rows if r["status"] == "failed"]
    decisions = qc.init_decisions(
        summary[~summary["subject"].isin(could_not_run)], paths.decisions,
        inputs=_decision_inputs(tasks),
    )
    atomic_write_text(paths.file("qc_decisions.csv"), decisions.to_csv(index=False))
    excluded = current_exclusions(study, paths)
    shown = ["subject", "decision", "reviewer"] + (["stale"] if "stale" in decisions else [])
    summary = summary.merge(decisions[shown], on="subject", how="left")
    status = pd.DataFrame(status_rows, columns=STATUS_COLUMNS)
    write_failures(paths, "qc", status.loc[status["status"] == "failed", ["subject", "error"]])
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
    """Subjects of this study that the reviewer's decisions file excludes (written to the run).

    Returns
    -------
    pandas.DataFrame
        subject, reason, source (``qc decision``); also written as ``excluded_qc.csv``.
    """
    from helpers import qc

    table = qc.excluded_subjects(paths.decisions, missing_ok=True)
    table = table[table["subject"].isin(study.subject_ids)].copy()
    table["source"] = "qc decision"
    table = table.reindex(columns=EXCLUDED_COLUMNS).reset_index(drop=True)
    write_excluded(paths, table)
    return table


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
    rank = {"fail": 0, "flag": 1, "pass": 2}
    ordered = sorted(mosaics, key=lambda x: (rank.get(status.get(x, ""), 3), x))
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


def qc_view_3d(study: Study, paths: RunPaths, outputs: QCOutputs, subject: str = "") -> Any:
    """An itkwidgets 3-D view of one subject (default: the first with the worst QC status).

    Returns :class:`helpers.viewer.Unavailable` with the reason when itkwidgets cannot load.
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
    return view_3d(study.subject(chosen).image, masks[chosen])


# ---------------------------------------------------------------------------------- metrics
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

    Subjects are measured through the study's executor (finished ones are reused from the work
    folder), then concatenated into ``metrics.csv`` and ``asymmetry.csv``.  When the clinical
    data give each subject's convex side, the convex-vs-concave indices (``cdi_cc``, ...) are
    added to ``asymmetry.csv``.
    """
    t0 = time.perf_counter()
    segmentation = read_segmentation(paths)
    excluded = current_exclusions(study, paths)
    keep = [s for s in segmentation["subject"] if s not in set(excluded["subject"])]
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


def _add_convex_concave(study: Study, asymmetry: pd.DataFrame) -> pd.DataFrame:
    if study.clinical is None or asymmetry.empty:
        return asymmetry
    from helpers.clinical import load_clinical
    from helpers.metrics import to_convex_concave

    clinical = load_clinical(study.clinical.path, study.clinical.mapping or None)
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


# ------------------------------------------------------------------------------- statistics
@dataclass
class StatsOutputs:
    """What :func:`statistics_stage` produced (tables also written to the run folder)."""

    asymmetry: pd.DataFrame
    scores: pd.DataFrame
    skipped: pd.DataFrame
    unmatched: pd.DataFrame
    table1: pd.DataFrame
    correlations: pd.DataFrame
    interactions: pd.DataFrame
    files: dict[str, Path]


def statistics_stage(study: Study, paths: RunPaths) -> StatsOutputs:
    """Scores, Table 1, correlations and the sex interaction for the run's asymmetry table.

    Needs clinical data (:class:`ConfigError` otherwise; the runner skips the statistics
    notebook for a study without them).  Clinical rows with invalid values are
    skipped and listed (``failures_clinical.csv``) when ``clinical.skip_invalid`` is true (the
    default).  Writes ``scores.csv``, ``table1.csv``, ``correlations.csv``,
    ``interactions.csv``, ``unmatched.csv`` and, under ``tables/``, every table as CSV plus
    ``esma_tables.xlsx``.
    """
    from helpers import report, stats
    from helpers.clinical import load_clinical
    from helpers.scores import score_clinical

    if study.clinical is None:
        msg = f"{study.source.name}: clinical: the study gives no clinical data to analyse"
        raise ConfigError(msg)
    t0 = time.perf_counter()
    spec = study.statistics
    asymmetry = stats.load_asymmetry(paths.upstream("asymmetry.csv"))
    clinical = load_clinical(study.clinical.path, study.clinical.mapping or None)
    scores, skipped = score_clinical(clinical, skip_invalid=study.clinical.skip_invalid)
    clinical_failures = _skipped_as_failures(skipped)
    write_failures(paths, "clinical", clinical_failures)
    excluded = set(current_exclusions(study, paths)["subject"])
    scores = scores[~scores["subject"].astype(str).isin(excluded)].reset_index(drop=True)
    if spec.muscles:
        asymmetry = asymmetry[asymmetry["muscle"].isin(spec.muscles)]
    if spec.levels:
        asymmetry = asymmetry[asymmetry["level"].astype(str).isin(spec.levels)]
    asymmetry = asymmetry.reset_index(drop=True)
    _, unmatched = stats.match_subjects(asymmetry, scores)
    analysed = scores[scores["subject"].astype(str).isin(set(asymmetry["subject"].astype(str)))]
    indices = [c for c in spec.indices if c in asymmetry.columns]
    lacking = [c for c in spec.indices if c not in asymmetry.columns]
    if lacking:
        log.warning("indices not in asymmetry.csv (convex side not given?): %s", lacking)
    covariates = [c for c in spec.covariates if c in scores.columns]
    kwargs = {
        "indices": indices,
        "scores_cols": list(spec.scores) if spec.scores else None,
        "covariates": covariates,
    }
    correlations = stats.correlation_table(asymmetry, scores, family=spec.family, **kwargs)
    by_contrast = _correlations_by_contrast(paths, asymmetry, scores, spec.family, kwargs)
    interactions = stats.interaction_table(asymmetry, scores, **kwargs)
    t1 = stats.table1(analysed.reset_index(drop=True))
    tables = {
        "table1": t1,
        "correlations": correlations,
        "interactions": interactions,
        "scores": scores,
        "unmatched": unmatched,
        "clinical_skipped": skipped,
    }
    files = {}
    for name in ("table1", "correlations", "interactions", "scores", "unmatched"):
        files[name] = atomic_write_text(paths.file(f"{name}.csv"), tables[name].to_csv(index=False))
    files.update(by_contrast)
    notes = report.caveats_markdown(study.metrics_settings().to_dict())
    files.update(
        report.write_tables(
            {
                "table1": report.table1_display(t1),
                "table1_full": t1,
                "correlations_fdr": report.fdr_table(correlations, alpha=spec.alpha),
                "interactions": interactions,
                "unmatched": unmatched,
                "clinical_skipped": skipped,
            },
            paths.tables_dir,
            notes=notes,
        )
    )
    status = pd.DataFrame({"subject": analysed["subject"].astype(str), "status": "analysed"})
    if len(clinical_failures):
        status = pd.concat(
            [
                status,
                pd.DataFrame(
                    {"subject": clinical_failures["subject"].unique(), "status": "clinical invalid"}
                ),
            ]
        )
    record_stage(paths, "statistics", status, time.perf_counter() - t0)
    return StatsOutputs(
        asymmetry, scores, skipped, unmatched, t1, correlations, interactions, files
    )


def _skipped_as_failures(skipped: pd.DataFrame) -> pd.DataFrame:
    if skipped is None or skipped.empty:
        return pd.DataFrame(columns=FAILURE_COLUMNS)
    rows = []
    for subject, group in skipped.groupby(skipped["subject"].astype(str), sort=False):
        problems = "; ".join(f"{r.column}: {r.problem}" for r in group.itertuples(index=False))
        rows.append(
            {"subject": subject, "stage": "clinical", "error": f"clinical row skipped ({problems})"}
        )
    return pd.DataFrame(rows, columns=FAILURE_COLUMNS)


# ------------------------------------------------------------------------ Dixon (issue 18)
def _segmentation_input(study: Study, paths: RunPaths, subject: Any) -> Path:
    """The image a subject is segmented on: its image, or for a Dixon subject the image
    ``dixon.segment_on`` names (default the sum ``W + F``), written to ``work/dixon_seg/``
    (rewritten only when the pair changed)."""
    from helpers.dixon import DixonSettings, write_segmentation_image

    if subject.water is None or subject.fat is None:
        return Path(subject.image)
    settings = DixonSettings.from_mapping(dict(study.dixon))
    if settings.segment_on == "image":
        if Path(subject.image) == Path(subject.water):
            msg = "dixon.segment_on: 'image' but the subject has no image besides its Dixon pair"
            raise InputFileError(subject.water, msg)
        return Path(subject.image)
    target = paths.work_dir / "dixon_seg" / f"{subject.subject}_{settings.segment_on}.nii.gz"
    key = {"water": sha256_file(subject.water), "fat": sha256_file(subject.fat),
           "segment_on": settings.segment_on}
    from helpers.files import is_done, mark_done

    if not is_done(target, key):
        target.parent.mkdir(parents=True, exist_ok=True)
        write_segmentation_image(subject.water, subject.fat, target, settings.segment_on)
        mark_done(target, key)
    return target


def _dixon_task_fields(study: Study, subject: str) -> dict[str, Any]:
    s = study.subject(subject)
    if s.water is None or s.fat is None:
        return {}
    return {"water": str(s.water), "fat": str(s.fat), "dixon": dict(study.dixon)}


def _dixon_key(task: MeasureTask) -> dict[str, Any]:
    return {"water": sha256_file(task.water), "fat": sha256_file(task.fat),
            "dixon": dict(task.dixon)}


def _measure_dixon_task(task: MeasureTask, settings: Any) -> Any:
    from helpers.dixon import DixonSettings, measure_dixon_files

    return measure_dixon_files(
        task.water, task.fat, task.mask, task.labels, subject=task.subject, settings=settings,
        dixon=DixonSettings.from_mapping(dict(task.dixon)), levels_path=task.levels,
    )


def _study_contrasts(study: Study) -> dict[str, str]:
    return {s.subject: getattr(s, "contrast", "") for s in study.subjects}


def _contrast_counts(study: Study) -> dict[str, int]:
    from helpers.contrast import contrast_counts

    return contrast_counts(_study_contrasts(study))


def _contrast_text(manifest: Mapping[str, Any]) -> str:
    """`` (24 T2w, 1 T1w)``: the subjects per contrast for the index page."""
    counts = manifest.get("contrasts") or {}
    return f" ({', '.join(f'{n} {c}' for c, n in counts.items())})" if counts else ""


def _with_contrast(
    study: Study, metrics: pd.DataFrame, asymmetry: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The cohort tables with each subject's contrast as their last column."""
    from helpers.contrast import add_contrast

    contrasts = _study_contrasts(study)
    return add_contrast(metrics, contrasts), add_contrast(asymmetry, contrasts)


def _correlations_by_contrast(
    paths: RunPaths, asymmetry: pd.DataFrame, scores: pd.DataFrame, family: str,
    kwargs: Mapping[str, Any],
) -> dict[str, Path]:
    """``correlations_by_contrast.csv`` when the cohort mixes contrasts (else nothing)."""
    from helpers.contrast import correlations_by_contrast

    if "contrast" not in asymmetry.columns or asymmetry["contrast"].nunique() < 2:
        return {}
    table = correlations_by_contrast(asymmetry, scores, family=family, **kwargs)
    path = paths.file("correlations_by_contrast.csv")
    return {"correlations_by_contrast": atomic_write_text(path, table.to_csv(index=False))}
