"""Stage 1, segment: a mask per subject (the model's, a given one, or a reviewer's correction).

Declared output: ``segmentation.csv`` in the run folder (subject, mask, status, seconds, error);
masks and their sidecars in the study's work folder (``work/seg``), reused by later runs.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from helpers.config import Study
from helpers.errors import InputFileError
from helpers.files import atomic_write_text, sha256_file
from helpers.runs import (
    SEGMENTATION_COLUMNS,
    RunPaths,
    StatusRow,
    record_run_warning,
    record_stage,
    redact_paths,
    status_table,
    write_failures,
)

log = logging.getLogger(__name__)


def read_segmentation(paths: RunPaths) -> pd.DataFrame:
    """The segmentation table written by ``01_segment`` (subject, mask, status, ...)."""
    table = pd.read_csv(paths.upstream("segmentation.csv"), dtype={"subject": str})
    table["error"] = table["error"].fillna("")
    table["mask"] = table["mask"].fillna("")
    return table


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
    rows: list[StatusRow] = []
    to_segment = []
    for s in study.subjects:
        if s.corrected_mask is not None:
            # a reviewer's corrected mask replaces the model's or the given one
            from helpers.corrections import corrected_row

            rows.append(corrected_row(study, s))
        elif s.mask is not None:
            rows.append(StatusRow(s.subject, "given", mask=str(s.mask)))
        elif study.model is None:
            rows.append(
                StatusRow(s.subject, "failed", error="no mask given and no model to segment with")
            )
        else:
            to_segment.append(s)
    if to_segment:
        rows.extend(_segment_with_model(study, paths, to_segment, progress=progress))
        check_model_labels(study, paths)
    table = status_table(rows, order=study.subject_ids, columns=SEGMENTATION_COLUMNS)
    atomic_write_text(paths.file("segmentation.csv"), table.to_csv(index=False))
    from helpers.corrections import write_mask_sources

    write_mask_sources(paths.file("mask_sources.csv"), table)
    write_failures(paths, "segment", table[table["status"] == "failed"])
    record_stage(paths, "segment", table, time.perf_counter() - t0)
    return table


def _segment_with_model(
    study: Study, paths: RunPaths, subjects: Sequence[Any], *, progress: bool
) -> list[StatusRow]:
    from helpers.segment import segment_cohort

    staged = {
        _stage_input(paths, s.subject, segmentation_input(study, paths, s)): s.subject
        for s in subjects
    }
    settings = study.segment_settings()
    if study.dixon_settings().segment_on in ("water", "fat"):
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
            rows.append(StatusRow(s.subject, "failed", error="segmentation produced no result"))
            continue
        status = _SEG_STATUS.get(str(r["status"]), str(r["status"]))
        error = "" if pd.isna(r.get("error")) else str(r.get("error") or "")
        error = redact_paths(error)
        mask = "" if status == "failed" or pd.isna(r.get("mask")) else str(r["mask"])
        seconds = float(r["seconds"]) if pd.notna(r.get("seconds")) else 0.0
        rows.append(StatusRow(s.subject, status, seconds, error, mask))
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


def segmentation_input(study: Study, paths: RunPaths, subject: Any) -> Path:
    """The image a subject is segmented on: its image, or for a Dixon subject the image
    ``dixon.segment_on`` names (default the sum ``W + F``), written to ``work/dixon_seg/``
    (rewritten only when the pair changed)."""
    from helpers.dixon import write_segmentation_image

    if subject.water is None or subject.fat is None:
        return Path(subject.image)
    settings = study.dixon_settings()
    if settings.segment_on == "image":
        if Path(subject.image) == Path(subject.water):
            msg = "dixon.segment_on: 'image' but the subject has no image besides its Dixon pair"
            raise InputFileError(subject.water, msg)
        return Path(subject.image)
    target = paths.work_dir / "dixon_seg" / f"{subject.subject}_{settings.segment_on}.nii.gz"
    key = {
        "water": sha256_file(subject.water),
        "fat": sha256_file(subject.fat),
        "segment_on": settings.segment_on,
    }
    from helpers.files import is_done, mark_done

    if not is_done(target, key):
        target.parent.mkdir(parents=True, exist_ok=True)
        write_segmentation_image(subject.water, subject.fat, target, settings.segment_on)
        mark_done(target, key)
    return target
