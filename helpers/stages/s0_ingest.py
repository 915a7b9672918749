"""Stage 0, ingest: a study's DICOM export into NIfTI images (only for a study with ``ingest:``)."""

from __future__ import annotations

import logging
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

log = logging.getLogger(__name__)


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
