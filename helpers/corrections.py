"""Corrections: a reviewer fixes a mask in ITK-SNAP or 3D Slicer and the run uses it.

Two halves:

- **Export** (:func:`export_bundle`, ``esma qc export``, a cell in ``02_qc``): for the subjects a
  reviewer picks (default: QC ``fail`` and ``flag``) a folder with each subject's image and
  mask, the label descriptions as ITK-SNAP (``labels.itksnap.txt``) and 3D Slicer
  (``labels.ctbl``) load them (named, coloured labels), the mask as a 3D Slicer segmentation
  with named, coloured segments (``<subject>_dseg.seg.nrrd``, :func:`write_slicer_segmentation`),
  the QC reasons (``subjects.csv``) and a ``README.md`` with the steps.  Images are re-written with the NIfTI header's free-text fields
  (``descrip``, ``aux_file``, ``db_name``, ``intent_name``) emptied; subjects appear by their
  pseudonymous ID only.
- **Use** (study key ``corrections:``, a pattern with ``{subject}`` or a folder): a corrected mask
  replaces the model's (or the given) mask of that subject.  It is validated like any mask (same
  grid as the image, only declared label values) by :func:`validate_mask`; every run records
  each subject's mask source (``model`` / ``given`` / ``corrected``) and sha256 in
  ``mask_sources.csv`` (:func:`write_mask_sources`) and shows them in ``index.html``.  Per-subject
  work downstream is keyed by the mask's checksum, so only the corrected subjects are measured
  and checked again; QC re-derives their automatic decisions (:func:`helpers.qc.init_decisions`).
"""

from __future__ import annotations

import html
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np
import pandas as pd

from helpers.errors import ConfigError, EsmaError, InputFileError
from helpers.files import atomic_path, atomic_write_text, sha256_file
from helpers.labels import LabelTable, load_labels

if TYPE_CHECKING:
    from helpers.runs import StatusRow

__all__ = [
    "MASK_SOURCES_COLUMNS",
    "MASK_SOURCE_OF_STATUS",
    "cases_from",
    "corrected_row",
    "export_bundle",
    "export_for_review",
    "itksnap_label_file",
    "mask_sources_section",
    "read_mask_sources",
    "run_cases",
    "slicer_color_table",
    "validate_mask",
    "write_mask_sources",
    "write_slicer_segmentation",
]

log = logging.getLogger(__name__)

#: Columns of ``mask_sources.csv``: which mask each subject's analysis used.
MASK_SOURCES_COLUMNS = ("subject", "source", "mask_file", "sha256")
#: Segmentation status -> mask source.
MASK_SOURCE_OF_STATUS = {
    "computed": "model",
    "reused": "model",
    "given": "given",
    "corrected": "corrected",
}
#: NIfTI header fields that may hold free text (names, dates) and are emptied on export.
FREE_TEXT_FIELDS = ("descrip", "aux_file", "db_name", "intent_name")


# --------------------------------------------------------------------------------------------
# Label descriptions for the editors
# --------------------------------------------------------------------------------------------


def _label_name(muscle: str, side: str | None) -> str:
    return f"{side}_{muscle}" if side else muscle


def _rgb255(labels: LabelTable) -> dict[int, tuple[int, int, int]]:
    from helpers.qc import label_colours

    return {
        v: (round(r * 255), round(g * 255), round(b * 255))
        for v, (r, g, b) in label_colours(labels).items()
    }


def itksnap_label_file(labels: LabelTable) -> str:
    """ITK-SNAP label description file (Segmentation > Import Label Descriptions, or ``-l``).

    One line per label: ``IDX R G B A VIS MSH "LABEL"`` with colours 0-255, opacity 0-1.

    Examples
    --------
    >>> from helpers.labels import Label
    >>> text = itksnap_label_file(LabelTable((Label(3, "multifidus", "right"),)))
    >>> text.splitlines()[-1].split()[0], text.splitlines()[-1].split()[-1]
    ('3', '"right_multifidus"')
    """
    lines = [
        "################################################",
        "# ITK-SnAP Label Description File (written by esma)",
        "# File format:",
        "# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL",
        "################################################",
        '    0     0    0    0        0  0  0    "Clear Label"',
    ]
    colours = _rgb255(labels)
    for lab in labels.labels:
        r, g, b = colours[lab.value]
        name = _label_name(lab.muscle, lab.side)
        lines.append(f'{lab.value:5d} {r:5d} {g:4d} {b:4d}        1  1  1    "{name}"')
    return "\n".join(lines) + "\n"


def slicer_color_table(labels: LabelTable) -> str:
    """3D Slicer colour table (``.ctbl``): ``value name R G B A`` per line, colours 0-255.

    Examples
    --------
    >>> from helpers.labels import Label
    >>> slicer_color_table(LabelTable((Label(1, "psoas_major", "left"),))).splitlines()[-1][:18]
    '1 left_psoas_major'
    """
    colours = _rgb255(labels)
    lines = [
        "# Color table file written by esma (3D Slicer: value name R G B A)",
        f"# {len(labels.labels) + 1} values",
        "0 background 0 0 0 0",
    ]
    for lab in labels.labels:
        r, g, b = colours[lab.value]
        lines.append(f"{lab.value} {_label_name(lab.muscle, lab.side)} {r} {g} {b} 255")
    return "\n".join(lines) + "\n"


#: NIfTI (RAS+) world coordinates -> NRRD ``left-posterior-superior`` (3D Slicer's file space).
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def write_slicer_segmentation(
    mask: str | Path, labels: LabelTable, target: str | Path
) -> Path:
    """Write a label mask as a 3D Slicer segmentation (``.seg.nrrd``) with named, coloured segments.

    The file is a 3-D NRRD (one layer: the labels of a mask do not overlap) in
    ``left-posterior-superior`` space, geometry from the NIfTI affine (RAS+ -> LPS: the first two
    world axes negated), gzip-encoded, with the custom fields of Slicer's segmentation format:
    ``Segmentation_SourceRepresentation`` (and the older ``..._MasterRepresentation``) = *Binary
    labelmap*, and per declared label ``SegmentN_ID``, ``_Name`` (``side_muscle``), ``_Color``
    (esma's QC colour, RGB 0-1), ``_LabelValue`` (the mask value), ``_Layer`` (0), ``_Extent``
    (voxel bounding box of the label, ``0 -1 0 -1 0 -1`` when absent) and
    ``_NameAutoGenerated`` / ``_ColorAutoGenerated`` (0).  Slicer (4.11+, 5.x) and ``slicerio``
    load it as a segmentation whose segments carry the esma names and colours.

    Parameters
    ----------
    mask : path
        Integer label mask (NIfTI).
    labels : LabelTable
        The declared labels: one segment each, in file order.
    target : path
        Output file, normally ``<subject>_dseg.seg.nrrd``.

    Returns
    -------
    Path
        ``target``.

    Raises
    ------
    InputFileError
        The mask cannot be read, is not 3-D, or holds non-integer or undeclared label values.
    """
    import nrrd

    try:
        img = nib.load(str(mask))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise InputFileError(mask, f"not a readable NIfTI file ({exc})") from exc
    if data.ndim != 3:
        raise InputFileError(mask, f"a label mask must be 3-D, this one has shape {data.shape}")
    if not np.issubdtype(data.dtype, np.integer) and (
        not np.all(np.isfinite(data)) or np.any(data != np.round(data))
    ):
        raise InputFileError(mask, "a label mask must hold whole numbers")
    values = np.unique(data).astype(np.int64)
    undeclared = sorted(set(values.tolist()) - {0, *labels.values})
    if undeclared:
        raise InputFileError(
            mask, f"label value(s) {undeclared} are not declared in the label file"
        )
    dtype = np.uint8 if max(labels.values, default=0) < 256 else np.uint16
    voxels = data.astype(dtype)
    lps = _RAS_TO_LPS @ img.affine[:3, :]
    header: dict[str, Any] = {
        "type": "unsigned char" if dtype is np.uint8 else "unsigned short",
        "dimension": 3,
        "space": "left-posterior-superior",
        "sizes": np.array(voxels.shape),
        # one row per voxel axis: the world step (mm, LPS) along that axis
        "space directions": lps[:, :3].T,
        "space origin": lps[:, 3],
        "kinds": ["domain", "domain", "domain"],
        "encoding": "gzip",
        "Segmentation_SourceRepresentation": "Binary labelmap",
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
    }
    colours = _rgb255(labels)
    for n, lab in enumerate(labels.labels):
        name = _label_name(lab.muscle, lab.side)
        where = np.nonzero(voxels == lab.value)
        if where[0].size:
            extent = " ".join(f"{int(ax.min())} {int(ax.max())}" for ax in where)
        else:
            extent = "0 -1 0 -1 0 -1"
        header.update(
            {
                f"Segment{n}_ID": name,
                f"Segment{n}_Name": name,
                f"Segment{n}_NameAutoGenerated": "0",
                f"Segment{n}_Color": " ".join(f"{c / 255:.6g}" for c in colours[lab.value]),
                f"Segment{n}_ColorAutoGenerated": "0",
                f"Segment{n}_LabelValue": str(lab.value),
                f"Segment{n}_Layer": "0",
                f"Segment{n}_Extent": extent,
            }
        )
    with atomic_path(target) as tmp:
        nrrd.write(str(tmp), voxels, header, index_order="F")
    return Path(target)


# --------------------------------------------------------------------------------------------
# Using corrected masks
# --------------------------------------------------------------------------------------------


def validate_mask(mask: str | Path, image: str | Path, labels: str | Path | LabelTable) -> None:
    """Check a (corrected) mask like any mask: readable, on the image's grid, declared labels.

    Raises
    ------
    InputFileError
        Naming the mask file: unreadable, not 3-D; :class:`~helpers.errors.GeometryMismatchError`
        when it is not on the image's grid; :class:`~helpers.errors.LabelError` for values the
        label file does not declare.
    """
    from helpers.nifti import check_same_grid, load_image, load_mask

    table = labels if isinstance(labels, LabelTable) else load_labels(labels)
    m = load_mask(mask)
    check_same_grid(load_image(image), m)
    table.check_values(np.unique(np.asarray(m.data)), mask)


def corrected_row(study: Any, subject: Any) -> StatusRow:
    """The segmentation-table row of a subject with a corrected mask (validated first).

    Returns
    -------
    helpers.runs.StatusRow
        Status ``corrected`` with the mask, or ``failed`` with the error naming the corrected
        file when it does not validate.
    """
    from helpers.runs import StatusRow

    path = Path(subject.corrected_mask)
    try:
        validate_mask(path, subject.image, study.labels)
    except EsmaError as exc:
        problem = getattr(exc, "problem", str(exc))
        error = f"corrected mask {path.name}: {problem}".replace(str(path.parent), "<folder>")
        log.warning("%s: %s", subject.subject, error)
        return StatusRow(subject.subject, "failed", error=error)
    return StatusRow(subject.subject, "corrected", mask=str(path))


def write_mask_sources(target: str | Path, segmentation: pd.DataFrame) -> Path:
    """Write ``mask_sources.csv``: subject, source (model/given/corrected), file name, sha256.

    Subjects without a usable mask get source ``none``.  File names only, no folders.
    """
    rows = []
    for r in segmentation.to_dict("records"):
        mask = str(r.get("mask") or "")
        source = MASK_SOURCE_OF_STATUS.get(str(r.get("status")), "none") if mask else "none"
        rows.append(
            {
                "subject": str(r["subject"]),
                "source": source,
                "mask_file": Path(mask).name if mask else "",
                "sha256": sha256_file(mask) if mask and Path(mask).is_file() else "",
            }
        )
    table = pd.DataFrame(rows, columns=list(MASK_SOURCES_COLUMNS))
    return atomic_write_text(target, table.to_csv(index=False))


def read_mask_sources(run_dir: str | Path) -> pd.DataFrame:
    """The run's ``mask_sources.csv`` (empty table when the run has none)."""
    path = Path(run_dir) / "mask_sources.csv"
    if not path.is_file():
        return pd.DataFrame(columns=list(MASK_SOURCES_COLUMNS))
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def mask_sources_section(run_dir: str | Path) -> str:
    """The index's "Masks" section: counts per source and every corrected subject with sha256."""
    table = read_mask_sources(run_dir)
    if table.empty:
        return ""
    e = html.escape
    counts = ", ".join(f"{k} {v}" for k, v in table["source"].value_counts().items())
    corrected = table[table["source"] == "corrected"]
    rows = "".join(
        f"<tr><td>{e(r.subject)}</td><td>{e(r.mask_file)}</td><td><code>{e(r.sha256)}</code>"
        "</td></tr>"
        for r in corrected.itertuples(index=False)
    )
    listing = (
        f"<table><tr><th>subject</th><th>corrected mask</th><th>sha256</th></tr>{rows}</table>"
        if rows
        else "<p>No corrected masks in this run.</p>"
    )
    return (
        "<h2>Masks</h2>\n"
        f'<p>Mask source per subject: {e(counts)} (all in <a href="mask_sources.csv">'
        "mask_sources.csv</a>, with sha256).</p>\n"
        f"{listing}\n"
    )


# --------------------------------------------------------------------------------------------
# Export for review
# --------------------------------------------------------------------------------------------


def _write_scrubbed(source: str | Path, target: Path) -> Path:
    """Copy a NIfTI file with its free-text header fields emptied (data and geometry kept)."""
    try:
        img = nib.load(str(source))
    except Exception as exc:
        raise InputFileError(source, f"not a readable NIfTI file ({exc})") from exc
    header = img.header.copy()
    for name in FREE_TEXT_FIELDS:
        if name in header:
            header[name] = b""
    out = nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, header)
    out.set_qform(*img.get_qform(coded=True))
    out.set_sform(*img.get_sform(coded=True))
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        nib.save(out, tmp)
    return target


_README = """# Masks to review and correct

Subjects: {subjects} (why each is here: `subjects.csv`, the QC reasons).
Each folder holds the image (`<subject>_T2w.nii.gz`) and the mask the analysis used
(`<subject>_dseg.nii.gz`, from: {sources}), and the same mask as a 3D Slicer segmentation
(`<subject>_dseg.seg.nrrd`: one named, coloured segment per label).  Labels: {label_list}.

## ITK-SNAP (3.8 or 4.x)

1. `itksnap -g <subject>/<subject>_T2w.nii.gz -s <subject>/<subject>_dseg.nii.gz -l labels.itksnap.txt`
   (or File > Open Main Image, Segmentation > Open Segmentation, then Segmentation >
   Import Label Descriptions > `labels.itksnap.txt`): the labels show with their names and colours.
2. Correct the mask (paintbrush, polygon; pick the label by name in the Active label list).
3. Segmentation > Save Segmentation Image As > `{target}`.

## 3D Slicer (5.x)

1. Drag `labels.ctbl`, `<subject>/<subject>_T2w.nii.gz` and `<subject>/<subject>_dseg.seg.nrrd`
   into Slicer (the last loads as a *Segmentation*): the segments carry the label names and
   colours.
2. Segment Editor: correct the segments (keep their names: each name is one label value).
3. Segmentations module > Export/import models and labelmaps: *Export*, *Labelmap*, with
   *Color table* `labels` (segments are matched to label values by name), then File > Save the
   labelmap as NIfTI to `{target}`.

## Use the corrections

Save each corrected mask as `{target}` (same grid as the image, the label values of
`labels.json`); the study's `corrections:` key {corrections}.  The next `esma run` validates it,
uses it instead of the model's mask for that subject only, re-measures and re-checks that
subject (others are reused), re-derives its automatic QC decision and records the mask source
and sha256 in the run (`mask_sources.csv`, `index.html`).
"""


def export_bundle(
    cases: pd.DataFrame,
    labels: str | Path | LabelTable,
    out_dir: str | Path,
    *,
    subjects: Iterable[str] | None = None,
    statuses: Sequence[str] = ("fail", "flag"),
    corrections: str | None = None,
) -> Path:
    """Write a correction bundle for the picked subjects.

    Parameters
    ----------
    cases : DataFrame
        One row per subject: ``subject``, ``image``, ``mask`` (paths; empty mask = none), and
        optional ``status``, ``reasons`` (the QC summary), ``source`` (mask source).
    labels : path or LabelTable
        The label file describing the masks.
    out_dir : path
        Bundle folder (created; existing subject folders are overwritten file by file).
    subjects : iterable of str, optional
        Subjects to export; default those whose QC ``status`` is in ``statuses``.
    statuses : sequence of str
        QC statuses exported when ``subjects`` is not given.  Default fail and flag.
    corrections : str, optional
        The study's ``corrections:`` value, quoted in the README.

    Returns
    -------
    Path
        The bundle folder.

    Raises
    ------
    ConfigError
        A picked subject is not in ``cases``, or has no mask.
    InputFileError
        An image or mask cannot be read.
    """
    out = Path(out_dir)
    lab = labels if isinstance(labels, LabelTable) else load_labels(labels)
    cases = cases.assign(subject=cases["subject"].astype(str)).set_index("subject", drop=False)
    if subjects is None:
        if "status" not in cases:
            msg = "export: no QC status in the cases table: name the subjects to export"
            raise ConfigError(msg)
        picked = [s for s in cases.index if str(cases.loc[s, "status"]) in set(statuses)]
    else:
        picked = [str(s) for s in subjects]
        unknown = [s for s in picked if s not in cases.index]
        if unknown:
            msg = f"export: subject(s) {unknown} are not in this run"
            raise ConfigError(msg)
    rows = []
    for s in picked:
        case = cases.loc[s]
        mask = str(case.get("mask") or "")
        if not mask:
            msg = f"export: subject {s} has no mask in this run (its segmentation failed)"
            raise ConfigError(msg)
        _write_scrubbed(case["image"], out / s / f"{s}_T2w.nii.gz")
        _write_scrubbed(mask, out / s / f"{s}_dseg.nii.gz")
        write_slicer_segmentation(mask, lab, out / s / f"{s}_dseg.seg.nrrd")
        rows.append(
            {
                "subject": s,
                "status": str(case.get("status", "")),
                "reasons": str(case.get("reasons", "")),
                "mask_source": str(case.get("source", "")),
            }
        )
    listing = pd.DataFrame(rows, columns=["subject", "status", "reasons", "mask_source"])
    atomic_write_text(out / "subjects.csv", listing.to_csv(index=False))
    atomic_write_text(out / "labels.itksnap.txt", itksnap_label_file(lab))
    atomic_write_text(out / "labels.ctbl", slicer_color_table(lab))
    atomic_write_text(out / "labels.json", _labels_json(lab))
    sources = sorted({r["mask_source"] for r in rows if r["mask_source"]}) or ["the run"]
    target = "<corrections folder>/<subject>_dseg.nii.gz"
    readme = _README.format(
        subjects=", ".join(picked) or "none",
        sources=", ".join(sources),
        label_list=", ".join(f"{x.value} {_label_name(x.muscle, x.side)}" for x in lab.labels),
        target=target,
        corrections=(
            f"is `{corrections}`"
            if corrections
            else "names that folder (or a pattern with "
            "`{subject}`): add `corrections: corrections/` to the study file"
        ),
    )
    atomic_write_text(out / "README.md", readme)
    log.info("correction bundle: %d subjects in %s", len(picked), out.name)
    return out


def _labels_json(labels: LabelTable) -> str:
    import json

    doc = {
        "labels": [{"value": x.value, "muscle": x.muscle, "side": x.side} for x in labels.labels]
    }
    return json.dumps(doc, indent=2) + "\n"


def run_cases(run_dir: str | Path, study: Any) -> pd.DataFrame:
    """The cases of a finished run for :func:`export_bundle`.

    Joins the run's ``segmentation.csv`` (mask used), ``qc_summary.csv`` (status, reasons) and
    ``mask_sources.csv`` with the study's images.

    Raises
    ------
    InputFileError
        The run has no ``segmentation.csv`` (naming it).
    """
    run_dir = Path(run_dir)
    seg_path = run_dir / "segmentation.csv"
    if not seg_path.is_file():
        raise InputFileError(seg_path, "no segmentation table: is this a run folder of the study?")
    seg = pd.read_csv(seg_path, dtype=str, keep_default_na=False)
    summary_path = run_dir / "qc_summary.csv"
    summary = (
        pd.read_csv(summary_path, dtype=str, keep_default_na=False)
        if summary_path.is_file()
        else None
    )
    return cases_from(study, seg, summary)


def cases_from(
    study: Any, segmentation: pd.DataFrame, summary: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Cases for :func:`export_bundle` from a segmentation table and a QC summary.

    Returns
    -------
    DataFrame
        ``subject``, ``mask``, ``image``, ``source`` (mask source), and ``status``,
        ``reasons`` when a summary is given.
    """
    seg = segmentation.astype({"subject": str})
    images = {s.subject: str(s.image) for s in study.subjects}
    table = seg[["subject", "mask"]].assign(
        image=seg["subject"].map(images).fillna(""),
        source=[
            MASK_SOURCE_OF_STATUS.get(str(st), "none") if str(m) else "none"
            for st, m in zip(seg["status"], seg["mask"].fillna(""), strict=True)
        ],
    )
    if summary is not None:
        summary = summary.astype({"subject": str})
        table = table.merge(summary[["subject", "status", "reasons"]], on="subject", how="left")
    return table.fillna("")


def export_for_review(
    study: Any,
    out_dir: str | Path,
    *,
    run_dir: str | Path | None = None,
    subjects: Iterable[str] | None = None,
    statuses: Sequence[str] = ("fail", "flag"),
) -> tuple[Path, list[str]]:
    """``esma qc export``: a correction bundle from a study's run (default: its latest run).

    ``study`` is a study file or a loaded :class:`helpers.config.Study`.

    Returns
    -------
    tuple
        The bundle folder and the exported subjects.

    Raises
    ------
    ConfigError
        The study has no finished run, or a picked subject is unknown.
    """
    from helpers.config import Study, load_study
    from helpers.runs import list_runs

    s = study if isinstance(study, Study) else load_study(study)
    if run_dir is None:
        runs = [r for r in list_runs(s.output) if (r / "segmentation.csv").is_file()]
        if not runs:
            msg = (
                f"{s.source.name}: no run with segmentations yet in {s.output.name}/: run it first"
            )
            raise ConfigError(msg)
        run_dir = runs[-1]
    cases = run_cases(run_dir, s)
    corrections = None
    try:
        import yaml

        doc = yaml.safe_load(s.source.read_text(encoding="utf-8")) or {}
        corrections = doc.get("corrections")
    except (OSError, ValueError):  # pragma: no cover - the study loaded a moment ago
        corrections = None
    folder = export_bundle(
        cases, s.labels, out_dir, subjects=subjects, statuses=statuses, corrections=corrections
    )
    listed = pd.read_csv(folder / "subjects.csv", dtype=str, keep_default_na=False)
    return folder, listed["subject"].tolist()
