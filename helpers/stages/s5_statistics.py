"""Stage 5, statistics: scores, Table 1, correlations and the sex interaction.

Declared output: ``scores.csv``, ``table1.csv``, ``correlations.csv``, ``interactions.csv``,
``unmatched.csv`` and ``tables/`` in the run folder.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from helpers.config import Study
from helpers.errors import ConfigError
from helpers.files import atomic_write_text
from helpers.runs import (
    FAILURE_COLUMNS,
    RunPaths,
    record_stage,
    write_failures,
)
from helpers.stages.s3_qc import (
    current_exclusions,
)

log = logging.getLogger(__name__)


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
    from helpers.scores import score_clinical

    if study.clinical is None:
        msg = f"{study.source.name}: clinical: the study gives no clinical data to analyse"
        raise ConfigError(msg)
    t0 = time.perf_counter()
    spec = study.statistics
    asymmetry = stats.load_asymmetry(paths.upstream("asymmetry.csv"))
    clinical = study.clinical.data()  # read once, when the study was loaded
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
    indices = [c for c in spec.indices if c in asymmetry.columns]
    lacking = [c for c in spec.indices if c not in asymmetry.columns]
    if lacking:
        log.warning("indices not in asymmetry.csv (convex side not given?): %s", lacking)
    kwargs = {
        "indices": indices,
        "scores_cols": list(spec.scores) if spec.scores else None,
        "covariates": list(spec.covariates),
    }
    try:
        result = stats.analyse(asymmetry, scores, family=spec.family, **kwargs)
    except stats.StatsInputError as exc:  # the same rule as esma stats: named, never dropped
        msg = f"{study.source.name}: statistics: {exc}"
        raise ConfigError(msg) from exc
    by_contrast = write_correlations_by_contrast(paths, asymmetry, scores, spec.family, kwargs)
    correlations, interactions = result.correlations, result.interactions
    t1, unmatched, analysed = result.table1, result.unmatched, result.analysed
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


def write_correlations_by_contrast(
    paths: RunPaths,
    asymmetry: pd.DataFrame,
    scores: pd.DataFrame,
    family: str,
    kwargs: Mapping[str, Any],
) -> dict[str, Path]:
    """``correlations_by_contrast.csv`` when the cohort mixes contrasts (else nothing)."""
    from helpers.contrast import correlations_by_contrast

    if "contrast" not in asymmetry.columns or asymmetry["contrast"].nunique() < 2:
        return {}
    table = correlations_by_contrast(asymmetry, scores, family=family, **kwargs)
    path = paths.file("correlations_by_contrast.csv")
    return {"correlations_by_contrast": atomic_write_text(path, table.to_csv(index=False))}
