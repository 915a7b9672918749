"""The papermill runner: execute a study's four notebooks into a new run folder.

A run (:func:`run_study`, ``esma run STUDY.yml``) goes:

1. validate the study YAML (:func:`helpers.config.load_study`); an invalid study stops here with
   exit code 2 and nothing written; a study with an ``ingest:`` section then has its DICOM
   export ingested (:func:`helpers.stages.s0_ingest.ingest_stage`; skipped when already done
   with the same files and settings) and its cohort is the images the ingest wrote;
2. create a new run folder ``<output>/<run-id>/`` (``run-id`` = UTC time stamp + random hex; an
   existing folder is never reused or overwritten) and freeze the study in it
   (``study.yml`` with absolute paths + ``cohort.csv``): every notebook of the run reads that
   copy;
3. execute ``01_segment``, ``02_qc``, ``03_metrics`` and ``04_statistics`` with papermill
   (kernel ``python3``, working folder = the run folder), after checking that every parameter
   passed is declared in the notebook's ``parameters`` cell (papermill itself only warns);
   each executed notebook is exported to HTML without code cells.  Each notebook gets its own
   kernel; ``shared_kernel=True`` (``esma run --shared-kernel``) runs them all in one
   (:class:`SharedKernel`: started once, the notebooks' names deleted between them), which
   saves a kernel start and the imports per notebook but keeps the first notebook's memory
   (torch) alive through the later stages.  Measured on the demo cohort in two invocations
   (``benchmarks/bench_throughput.py``): the notebooks' overhead fell from 22.6 to 12.2 s and
   from 22.8 to 9.8 s, the whole run went from 91.0 to 92.4 s and from 96.8 to 75.0 s (stage
   times vary by several seconds between runs), and the process tree's peak memory rose from
   about 1010 to 1467 MB; so it is offered, not the default;
4. collect ``failures.csv`` (subject, stage, error) and ``excluded.csv`` (subject, reason), and
   write ``manifest.json`` and ``index.html`` (:mod:`helpers.provenance`).

The notebooks call the stages (:mod:`helpers.stages`); the run's bookkeeping is
:mod:`helpers.runs`.

Exit codes: 0 everything ran and no subject failed; 1 the run finished but some subjects failed
(or a notebook stopped on an unexpected error, or on an input error after subjects had failed);
2 the study or an input is invalid; 3 a notebook could not write its outputs.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import html
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from helpers.config import Study, load_study, resolved_document
from helpers.errors import ConfigError, InputFileError, OutputError
from helpers.files import atomic_write_text
from helpers.locks import hold_output_lock
from helpers.provenance import (
    build_manifest,
    input_checksums,
    write_index,
)
from helpers.runs import (
    EXIT_BAD_INPUT,
    EXIT_INFRASTRUCTURE,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_RUNNING,
    RUN_PID_ENV,
    _create_run_dir,
    collect_excluded,
    collect_failures,
    redact_paths,
    run_paths,
)
from helpers.stages.s0_ingest import (
    ingest_stage,
    ingest_summary,
    record_ingest,
)

log = logging.getLogger(__name__)


#: Folder of the pipeline notebooks (the repository's ``notebooks/``).
NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"


#: The pipeline notebooks, in execution order.
NOTEBOOKS = ("01_segment", "02_qc", "03_metrics", "04_statistics")


#: Kernel every notebook runs in.
KERNEL_NAME = "python3"


#: Notebooks that only make sense with clinical data (skipped for a study without them).
NEEDS_CLINICAL = ("04_statistics",)


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


class SharedKernel:
    """One kernel for the notebooks of a run, started by the first notebook that uses it.

    nbclient starts the kernel (in the working folder of that first notebook) and, since it
    does not own the kernel manager, leaves it running; :meth:`reset` deletes the names the
    notebooks defined before each later notebook, and :meth:`close` shuts it down.
    Imported modules stay loaded: that is the saving.
    """

    #: Code run in the kernel before a notebook after the first: delete every name the
    #: notebooks defined, keeping IPython's own (``user_ns_hidden``) and the module dunders
    #: (``%reset -f`` would delete ``__spec__`` too, and multiprocessing's spawn start method
    #: reads ``__main__.__spec__``).
    RESET_CODE = (
        "def _esma_reset():\n"
        "    import gc\n"
        "    ns, hidden = get_ipython().user_ns, get_ipython().user_ns_hidden\n"
        "    for name in [n for n in ns if n not in hidden\n"
        "                 and not (n.startswith('__') and n.endswith('__'))]:\n"
        "        del ns[name]\n"
        "    gc.collect()\n"
        "_esma_reset()\n"
    )

    def __init__(self) -> None:
        from jupyter_client.manager import AsyncKernelManager

        self.km = AsyncKernelManager(kernel_name=KERNEL_NAME)

    def reset(self, timeout: float = 120.0) -> None:
        """Clear the kernel's namespace (nothing to do before the first notebook).

        Raises
        ------
        RuntimeError
            The kernel died or did not answer in ``timeout`` seconds.
        """
        if not self.km.has_kernel:
            return
        kc = self.km.blocking_client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=timeout)
            reply = kc.execute_interactive(self.RESET_CODE, timeout=timeout, store_history=False,
                                           output_hook=lambda _msg: None)
        finally:
            kc.stop_channels()
        if reply["content"].get("status") != "ok":
            msg = f"the shared kernel could not be reset: {reply['content'].get('evalue')}"
            raise RuntimeError(msg)

    def close(self) -> None:
        """Shut the kernel down (now) if it was started."""
        from jupyter_core.utils import run_sync

        if self.km.has_kernel:
            run_sync(self.km.shutdown_kernel)(now=True)


@contextlib.contextmanager
def shared_kernel_for(enabled: bool) -> Iterator[SharedKernel | None]:
    """A :class:`SharedKernel` for a run's notebooks, shut down on the way out (also after an
    error or Ctrl-C); ``None`` when not ``enabled`` (one kernel per notebook)."""
    if not enabled:
        yield None
        return
    kernel = SharedKernel()
    try:
        yield kernel
    finally:
        kernel.close()


def execute_notebook(
    notebook: str | Path,
    run_dir: str | Path,
    parameters: Mapping[str, Any],
    *,
    progress: bool = False,
    stream_output: bool = False,
    html: bool = True,
    kernel: SharedKernel | None = None,
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
    kernel : SharedKernel, optional
        Run in this kernel (its namespace cleared first) instead of a new one.

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
    engine_kwargs: dict[str, Any] = {}
    if stream_output:
        engine_kwargs = {"log_output": True, "stdout_file": sys.stderr, "stderr_file": sys.stderr}
    os.environ[RUN_PID_ENV] = str(os.getpid())  # the kernel inherits it (see open_study)
    if kernel is not None:
        engine_kwargs["km"] = kernel.km
    try:
        if kernel is not None:
            kernel.reset()
        pm.execute_notebook(
            str(notebook),
            str(out),
            parameters=params,
            kernel_name=KERNEL_NAME,
            cwd=str(run_dir),
            progress_bar=progress,
            **engine_kwargs,
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
    shared_kernel: bool = False,
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
    shared_kernel : bool
        Run every notebook in one kernel (:class:`SharedKernel`) instead of one kernel each.

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
    with shared_kernel_for(shared_kernel) as kernel:
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
                nb, run_dir, params, progress=progress, stream_output=stream_output,
                kernel=kernel,
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
