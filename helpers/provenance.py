"""Provenance of a run: package versions, input checksums, ``manifest.json`` and
``index.html``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import html
import json
import logging
import os
import platform
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import yaml

from helpers import __version__
from helpers.config import Study
from helpers.files import atomic_write_text, sha256_file
from helpers.runs import (
    EXIT_BAD_INPUT,
    EXIT_INFRASTRUCTURE,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_RUNNING,
    read_run_warnings,
    read_stage_records,
    redact_paths,
)
from helpers.stages.s0_ingest import (
    ingest_summary,
)

if TYPE_CHECKING:
    from helpers.runner import NotebookRun

log = logging.getLogger(__name__)


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
        "contrasts": contrast_counts_of(study),
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

    ingest_section = (
        _warnings_section(run_dir) + _ingest_section(run_dir) + mask_sources_section(run_dir)
    )
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
{manifest["n_subjects"]} subjects{e(contrast_text(manifest))}; esma {e(manifest["esma_version"])}
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


def _warnings_section(run_dir: Path) -> str:
    found = read_run_warnings(run_dir)
    if not found:
        return ""
    items = "".join(f"<li>{html.escape(redact_paths(m))}</li>" for m in found)
    return f'<h2>Warnings</h2>\n<ul class="bad">{items}</ul>\n'


def contrast_counts_of(study: Study) -> dict[str, int]:
    from helpers.contrast import contrast_counts

    return contrast_counts(study.contrasts)


def contrast_text(manifest: Mapping[str, Any]) -> str:
    """`` (24 T2w, 1 T1w)``: the subjects per contrast for the index page."""
    counts = manifest.get("contrasts") or {}
    return f" ({', '.join(f'{n} {c}' for c, n in counts.items())})" if counts else ""
