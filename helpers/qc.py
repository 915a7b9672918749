"""Quality control of muscle segmentations: checks, overlay mosaics and the reviewer's decisions.

Three layers, as everywhere in esma:

- **Pure checks** over arrays and DataFrames (:func:`coverage_table`, :func:`component_table`,
  :func:`world_centroids`, :func:`lateralization_checks`, :func:`dice_table` (Dice from
  :mod:`helpers.overlap`), :func:`robust_z`, :func:`cohort_outliers`), each returning numbers or a tidy table.
- **Per-subject QC rows** (:func:`check_subject`, :func:`outlier_checks`) in the long ``qc.csv``
  format (:data:`QC_COLUMNS`), one row per subject x level x label x check with a status
  ``pass`` / ``flag`` / ``fail`` and a reason in words; :func:`summarize_qc` condenses them to one
  row per subject.  The one driver over a study's files is the QC stage
  (:func:`helpers.stages.s3_qc.qc_stage`).
- **Reviewer decisions** (``qc_decisions.csv``, :data:`DECISION_COLUMNS`): seeded from QC by
  :func:`init_decisions` (which never touches existing rows), edited in a spreadsheet, with
  :func:`set_decision` or in the widget browser (:mod:`helpers.viewer`), and honoured by the
  metrics and statistics notebooks through :func:`excluded_subjects`.

Every threshold lives in :class:`QCSettings` (settable from the study YAML's ``qc:`` mapping).

Display convention
------------------
Overlays are drawn as axial slices in the **radiological convention**: the patient's right on the
screen's left, anterior at the top, as seen from the feet.  The screen orientation is derived from
the affine (nibabel RAS+: +x = patient's right, +y = anterior), never from array order, so a file
stored L-P-S and one stored R-A-S look the same; the ``R``/``L``/``A``/``P`` letters on each tile
are placed by :func:`patient_right_screen_side`, again from the affine.  ``convention=
"neurological"`` (patient's right on screen right) is available for users who prefer it.

Subjects appear only by their pseudonymous ID (the file's subject ID); no header field, file path
or date is drawn or written into the QC tables.
"""

from __future__ import annotations

import functools
import io
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from scipy import ndimage

from helpers.errors import ConfigError, EsmaError, InputFileError
from helpers.files import atomic_path, atomic_write_text
from helpers.labels import Label, LabelTable, lateralization_table
from helpers.nifti import Volume, check_same_grid
from helpers.nifti import slice_axis as _slice_axis
from helpers.overlap import dice
from helpers.validate import SettingError, did_you_mean

__all__ = [
    "ALL_LEVELS",
    "CHECKS",
    "DECISIONS",
    "DECISION_COLUMNS",
    "INPUT_COLUMNS",
    "QC_COLUMNS",
    "STATUSES",
    "SUMMARY_COLUMNS",
    "UNASSIGNED_LEVEL",
    "AxialView",
    "QCSettings",
    "axial_view",
    "check_subject",
    "cohort_outliers",
    "component_table",
    "compose_mosaic",
    "coverage_table",
    "dice_table",
    "excluded_subjects",
    "init_decisions",
    "inputs_fingerprint",
    "label_colours",
    "lateralization_checks",
    "midline_checks",
    "mosaic_png_bytes",
    "mosaic_size_px",
    "mosaic_slices_for",
    "orient_slice",
    "outlier_checks",
    "patient_right_screen_side",
    "read_decisions",
    "render_mosaic",
    "render_slice",
    "robust_z",
    "save_mosaic",
    "select_slices",
    "set_decision",
    "severity_rank",
    "summarize_qc",
    "world_centroids",
    "worst_status",
]

log = logging.getLogger(__name__)

#: Statuses from best to worst.
STATUSES = ("pass", "flag", "fail")
_SEVERITY = {s: i for i, s in enumerate(STATUSES)}
#: ``level`` of rows about the whole stack (same word as the metrics table's aggregate rows).
ALL_LEVELS = "all"
#: ``level`` of per-slice findings on slices that the level table assigns to no level.
UNASSIGNED_LEVEL = "unassigned"

#: Columns of ``qc.csv``: one row per subject x level x label x check.
#:
#: - ``subject``: pseudonymous subject ID;
#: - ``level``: vertebral level, ``"all"`` for the whole stack, ``"unassigned"`` for slices
#:   outside every level;
#: - ``muscle``, ``side``: the label checked (empty for subject-wide checks);
#: - ``check``: one of :data:`CHECKS`;
#: - ``status``: ``pass``, ``flag`` (look at it) or ``fail`` (excluded by default);
#: - ``value``: the check's number (unit in :data:`CHECKS`), NaN when not applicable;
#: - ``reason``: what was found, in words.
QC_COLUMNS = ("subject", "level", "muscle", "side", "check", "status", "value", "reason")
#: Columns of the per-subject summary (``qc_summary.csv``).
SUMMARY_COLUMNS = ("subject", "status", "n_fail", "n_flag", "reasons")
#: Columns of the reviewer's decisions file ``qc_decisions.csv``.
DECISION_COLUMNS = ("subject", "decision", "reviewer", "reason", "timestamp")
#: Allowed values of ``decision``.
DECISIONS = ("include", "exclude")
#: Reviewer name written by :func:`init_decisions` for decisions taken from QC alone.
AUTO_REVIEWER = "auto-qc"

#: The checks and the meaning (unit) of their ``value``.
CHECKS: dict[str, str] = {
    "input": "image/mask could not be read or do not share a grid (value NaN)",
    "undeclared_label": "number of voxels holding values the label file does not declare",
    "empty_label": "voxels of a declared label in the whole mask (0 = absent)",
    "coverage": "number of slices holding the label",
    "level_coverage": "number of slices of the level holding the label",
    "truncation_z": "1 when the label touches the first or last slice of the stack, else 0",
    "truncation_inplane": "label voxels on the in-plane border of the field of view",
    "fragmentation": "smallest share (0-1) of a slice's label voxels in its largest piece",
    "lateralization": "world x (mm, RAS) of the right label's centroid minus the left one's",
    "midline_side": "mean world x (mm) of the label relative to the anatomical midline "
    "(+ = patient's right)",
    "dice": "Dice overlap (0-1) with the manual mask",
    "outlier_csa_mm2": "robust z of csa_mm2 against the cohort (same muscle, side, level)",
    "outlier_fat_pct": "robust z of fat_pct against the cohort (same muscle, side, level)",
    # anatomical plausibility (helpers.anatomy)
    "inside_body": "share (0-1) of the label's voxels outside the body outline",
    "posterior_cover": "median thickness (mm) of unlabelled non-fat tissue between the back "
    "muscle and the posterior subcutaneous fat",
    "intensity": "label median intensity / median of the image's bright tissue (fat)",
    "arrangement": "margin (mm, + = anatomical order) of a medial/lateral or "
    "anterior/posterior relation of two muscles on one side",
    "mirror": "largest offset (mm) of a right/left pair from mirror symmetry about the midline",
    "csa_range": "median per-slice area (mm2) of the label over the level's slices",
}

#: MAD to standard deviation for normal data.
MAD_TO_SD = 1.4826
#: Mean absolute deviation to standard deviation for normal data (fallback when MAD is 0).
MEANAD_TO_SD = 1.253314


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QCSettings:
    """Thresholds of every QC check (the study YAML's ``qc:`` mapping).

    Attributes
    ----------
    min_largest_component_fraction : float
        A label is *fragmented* on a slice when its largest connected piece holds less than
        this share (0-1) of the label's voxels on that slice.  Default 0.90.
    fragmentation_min_voxels : int
        Slices where a label has fewer voxels are not judged for fragmentation (a few stray
        voxels at a muscle's tip are not a segmentation failure).  Default 20.
    connectivity : int
        In-plane neighbourhood for connected pieces: 1 = 4-neighbours (edges), 2 = 8-neighbours
        (edges and corners).  Default 2.
    robust_z_threshold : float
        ``|robust z|`` above which a subject's area or fat is an outlier.  Default 3.5 (Iglewicz
        and Hoaglin's cut-off for the modified z score).
    min_cohort_size : int
        Fewest subjects with a value for a muscle, side and level for the outlier check to run.
        Default 5.
    min_dice : float
        Dice against a manual mask below this is flagged.  Default 0.80 (published automated T2
        paraspinal segmentation reaches about 0.89-0.95).
    min_lateral_separation_mm : float
        A right label whose centroid lies less than this far (mm, world x) to the patient's right
        of its left twin fails lateralization.  Default 0 (fail only when it is on the wrong
        side or at the same x).
    max_border_voxels : int
        Most label voxels allowed on the in-plane border of the image before the label counts
        as truncated by the field of view.  Default 0.
    z_edge_status : {"flag", "pass"}
        Status of a label touching the first or last slice (it may continue beyond the stack).
        Default ``"flag"``; set ``"pass"`` for protocols whose stack cuts through the muscles
        by design.
    empty_label_status : {"fail", "flag"}
        Status of a declared label absent from the whole mask.  Default ``"fail"``.
    level_absent_status : {"flag", "pass", "fail"}
        Status of a label absent from every slice of a level while present on levels above and
        below it (a gap).  Default ``"flag"``.  Absence from levels at either end of a muscle's
        span (the quadratus lumborum ends above S1) is anatomy and passes, with a reason.
    mosaic_max_slices : int
        Most slices in the overlay mosaic of a subject with a ``fail`` or ``flag`` among its
        own checks.  Default 12.
    mosaic_pass_max_slices : int
        Most slices in the mosaic of a subject whose own checks all pass: a thumbnail that a
        reviewer skims (the QC report shows failed and flagged subjects first).  Default 4; set
        it to ``mosaic_max_slices`` for full mosaics of every subject.  The cohort outlier
        checks run after the mosaics are drawn, so a subject flagged only as a cohort outlier
        has the thumbnail; the QC browser shows all its slices.  See
        :func:`mosaic_slices_for`.
    mosaic_opacity : float
        Label overlay opacity (0-1) in mosaics.  Default 0.45.
    convention : {"radiological", "neurological"}
        Screen convention of overlays.  Default ``"radiological"`` (patient right on screen left).
    mosaic_renderer : {"direct", "matplotlib"}
        How mosaics are drawn.  ``"direct"`` (default) composes the PNG from the image arrays
        (:func:`compose_mosaic`: numpy windowing, a label colour lookup, nearest-neighbour
        scaling, PIL text): 0.065 s of CPU per demo subject against 0.47-0.58 s for
        ``"matplotlib"`` (:func:`render_mosaic`, a figure with one axes per tile), which stays
        available; same geometry, colours, orientation and annotations.
    max_outside_body_fraction : float
        A label with more than this share (0-1) of its voxels outside the body outline fails
        (``inside_body``).  Default 0.10.
    max_posterior_cover_mm : float
        Erector spinae or multifidus with more than this (median, mm) of unlabelled non-fat
        tissue between it and the posterior subcutaneous fat fails (``posterior_cover``): the
        back muscles lie directly beneath the fat and the thoracolumbar fascia.  Default 25 mm.
    max_fat_intensity_ratio : float
        A label whose median intensity is at least this share of the fat's fails
        (``intensity``).  Default 0.85.
    max_mirror_offset_mm : float
        A right/left pair further than this (mm) from mirror symmetry about the midline fails
        (``mirror``).  Default 30 mm.
    csa_fail_factor : float
        A label's median area per level fails when outside the physiological range
        (:data:`helpers.anatomy.PHYSIOLOGICAL_CSA_MM2`) by more than this factor.  Default 2.
    csa_range_status : {"flag", "pass"}
        Status of an area outside the physiological range but within ``csa_fail_factor``.
        Default ``"flag"``.
    tip_slices : int
        Slices at each end of a label's span where fragmentation is recorded but not flagged:
        a muscle tapers and splits into fascicles at its ends (psoas at the sacrum, quadratus
        lumborum at the iliac crest).  Likewise, at the first and last level of a label's span
        (its tips) a low Dice and a small area are recorded but not flagged.  Default 2.
    outlier_flag_levels : {"all", "each"}
        Which cohort outliers are flagged: ``"all"`` (default) those of the whole stack only
        (per-level outliers are recorded in ``qc.csv`` with status ``pass``: with about 80
        values per subject, per-level ``|z| > 3.5`` is flagged in a third of the demo's
        well-segmented subjects), ``"each"`` every level.
    """

    min_largest_component_fraction: float = 0.90
    fragmentation_min_voxels: int = 20
    connectivity: int = 2
    robust_z_threshold: float = 3.5
    min_cohort_size: int = 5
    min_dice: float = 0.80
    min_lateral_separation_mm: float = 0.0
    max_border_voxels: int = 0
    z_edge_status: str = "flag"
    empty_label_status: str = "fail"
    level_absent_status: str = "flag"
    mosaic_max_slices: int = 12
    mosaic_pass_max_slices: int = 4
    mosaic_opacity: float = 0.45
    convention: str = "radiological"
    mosaic_renderer: str = "direct"
    max_outside_body_fraction: float = 0.10
    max_posterior_cover_mm: float = 25.0
    max_fat_intensity_ratio: float = 0.85
    max_mirror_offset_mm: float = 30.0
    csa_fail_factor: float = 2.0
    csa_range_status: str = "flag"
    tip_slices: int = 2
    outlier_flag_levels: str = "all"

    def __post_init__(self) -> None:
        for f in fields(self):
            _validate_setting(f.name, getattr(self, f.name), "QCSettings")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None, *, where: str = "qc") -> QCSettings:
        """Build settings from a (YAML) mapping; missing keys keep their defaults.

        Parameters
        ----------
        mapping : mapping or None
            Keys are attribute names of :class:`QCSettings`.
        where : str
            Prefix of the key in messages, e.g. ``"qc"`` gives ``qc.min_dice``.

        Raises
        ------
        ConfigError
            Naming the key: unknown key, wrong type or value out of range.

        Examples
        --------
        >>> QCSettings.from_mapping({"min_dice": 0.7}).min_dice
        0.7
        >>> QCSettings.from_mapping({"min_dise": 0.7})
        Traceback (most recent call last):
        ...
        helpers.validate.SettingError: qc.min_dise: unknown key (did you mean 'min_dice'?); known keys: ...
        """
        if mapping is None:
            return cls()
        if not isinstance(mapping, Mapping):
            msg = f"{where}: expected a mapping of QC settings, got {type(mapping).__name__}"
            raise ConfigError(msg)
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in mapping.items():
            if key not in known:
                msg = f"unknown key{did_you_mean(key, known)}; known keys: {', '.join(sorted(known))}"
                setting = f"{where}.{key}"
                raise SettingError(setting, msg)
            default = getattr(cls, key)
            if (
                isinstance(default, float)
                and isinstance(value, int)
                and not isinstance(value, bool)
            ):
                value = float(value)
            _validate_setting(key, value, where)
            values[key] = value
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for provenance and completion markers)."""
        return asdict(self)


_CHOICES = {
    "z_edge_status": ("flag", "pass"),
    "empty_label_status": ("fail", "flag"),
    "level_absent_status": STATUSES,
    "convention": ("radiological", "neurological"),
    "mosaic_renderer": ("direct", "matplotlib"),
    "csa_range_status": ("flag", "pass"),
    "outlier_flag_levels": ("all", "each"),
}
_RANGES: dict[str, tuple[float, float]] = {
    "min_largest_component_fraction": (0.0, 1.0),
    "fragmentation_min_voxels": (1, math.inf),
    "connectivity": (1, 2),
    "robust_z_threshold": (0.0, math.inf),
    "min_cohort_size": (3, math.inf),
    "min_dice": (0.0, 1.0),
    "min_lateral_separation_mm": (0.0, math.inf),
    "max_border_voxels": (0, math.inf),
    "mosaic_max_slices": (1, 200),
    "mosaic_pass_max_slices": (1, 200),
    "mosaic_opacity": (0.0, 1.0),
    "max_outside_body_fraction": (0.0, 1.0),
    "max_posterior_cover_mm": (0.0, math.inf),
    "max_fat_intensity_ratio": (0.0, math.inf),
    "max_mirror_offset_mm": (0.0, math.inf),
    "csa_fail_factor": (1.0, math.inf),
    "tip_slices": (0, 50),
}


def _validate_setting(key: str, value: Any, where: str) -> None:
    name = f"{where}.{key}"
    default = QCSettings.__dataclass_fields__[key].default
    if key in _CHOICES:
        if value not in _CHOICES[key]:
            allowed = ", ".join(repr(c) for c in _CHOICES[key])
            msg = f"{value!r} is not one of {allowed}"
            raise SettingError(name, msg)
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        msg = f"expected a number, got {value!r}"
        raise SettingError(name, msg)
    if isinstance(default, int) and not isinstance(value, int):
        msg = f"expected a whole number, got {value!r}"
        raise SettingError(name, msg)
    if not math.isfinite(value) and key != "robust_z_threshold":
        msg = f"expected a finite number, got {value!r}"
        raise SettingError(name, msg)
    lo, hi = _RANGES[key]
    if not lo <= value <= hi:
        msg = f"{value!r} is outside the allowed range [{lo}, {hi}]"
        raise SettingError(name, msg)


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def severity_rank(status: object) -> int:
    """The one severity order of QC statuses: ``pass`` 0 < ``flag`` 1 < ``fail`` 2; -1 else.

    Sort worst first with ``key=lambda s: -severity_rank(s)`` (unknown statuses then come last).

    Examples
    --------
    >>> sorted(["pass", "fail", "?", "flag"], key=lambda s: -severity_rank(s))
    ['fail', 'flag', 'pass', '?']
    """
    return _SEVERITY.get(status, -1) if isinstance(status, str) else -1


def worst_status(statuses: Iterable[str]) -> str:
    """The worst of some statuses (``pass`` < ``flag`` < ``fail``); ``pass`` when empty.

    Examples
    --------
    >>> worst_status(["pass", "flag", "pass"])
    'flag'
    """
    worst = "pass"
    for s in statuses:
        if severity_rank(s) > severity_rank(worst):
            worst = s
    return worst


def mosaic_slices_for(statuses: Iterable[str], settings: QCSettings) -> int:
    """Slices of a subject's mosaic: all it may have when a check failed or flagged it.

    Parameters
    ----------
    statuses : iterable of str
        The statuses of the subject's own check rows (``pass``/``flag``/``fail``).
    settings : QCSettings
        ``mosaic_max_slices`` and ``mosaic_pass_max_slices``.

    Examples
    --------
    >>> s = QCSettings()
    >>> mosaic_slices_for(["pass", "flag"], s), mosaic_slices_for(["pass", "pass"], s)
    (12, 4)
    """
    if worst_status(statuses) != "pass":
        return settings.mosaic_max_slices
    return min(settings.mosaic_pass_max_slices, settings.mosaic_max_slices)


def _row(
    subject: str,
    level: str,
    check: str,
    status: str,
    value: float,
    reason: str,
    label: Label | None = None,
    *,
    muscle: str | None = None,
    side: str | None = None,
) -> dict[str, Any]:
    if label is not None:
        muscle, side = label.muscle, label.side
    return {
        "subject": subject,
        "level": level,
        "muscle": muscle or "",
        "side": side or "",
        "check": check,
        "status": status,
        "value": float(value) if value is not None else math.nan,
        "reason": reason,
    }


def _frame(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(list(rows), columns=list(QC_COLUMNS))
    df["value"] = df["value"].astype(float)
    return df


def _name(label: Label) -> str:
    return f"{label.side} {label.muscle}" if label.side else label.muscle


def _ranges(indices: Iterable[int]) -> str:
    """Compact slice list: ``[0, 1, 2, 5]`` -> ``'0-2, 5'``."""
    idx = sorted({int(i) for i in indices})
    if not idx:
        return "none"
    parts: list[str] = []
    start = prev = idx[0]
    for i in [*idx[1:], None]:  # type: ignore[list-item]
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(parts)


def _level_groups(
    levels: pd.DataFrame | None, n_slices: int, *, with_all: bool, with_unassigned: bool
) -> list[tuple[str, NDArray[np.int64]]]:
    """(level, slice indices) groups; ``"all"`` first when asked."""
    groups: list[tuple[str, NDArray[np.int64]]] = []
    every = np.arange(n_slices)
    if levels is None or levels.empty:
        return [(ALL_LEVELS, every)]
    if with_all:
        groups.append((ALL_LEVELS, every))
    per_level = [
        (str(level), np.sort(sub["slice"].to_numpy(dtype=np.int64)))
        for level, sub in levels.groupby("level", sort=False)
    ]
    groups.extend(sorted(per_level, key=lambda g: int(g[1][0])))  # in slice order
    if with_unassigned:
        rest = np.setdiff1d(every, levels["slice"].to_numpy(dtype=np.int64))
        if rest.size:
            groups.append((UNASSIGNED_LEVEL, rest))
    return groups


def _check_levels(levels: pd.DataFrame | None, n_slices: int, subject: str) -> pd.DataFrame | None:
    if levels is None:
        return None
    where = Path(f"<levels of {subject}>")
    if not isinstance(levels, pd.DataFrame) or not {"slice", "level"} <= set(levels.columns):
        raise InputFileError(where, "level table needs the columns 'slice' and 'level'")
    if levels.empty:
        return None
    sl = pd.to_numeric(levels["slice"], errors="coerce")
    if sl.isna().any() or (sl % 1 != 0).any():
        raise InputFileError(where, "column 'slice' must hold whole slice indices")
    bad = sorted(int(s) for s in sl if not 0 <= s < n_slices)
    if bad:
        msg = f"slice indices {bad} lie outside the stack (0-{n_slices - 1})"
        raise InputFileError(where, msg)
    if sl.duplicated().any():
        dup = sorted(int(s) for s in sl[sl.duplicated()])
        raise InputFileError(where, f"slices {dup} are assigned to more than one level")
    out = pd.DataFrame({"slice": sl.astype(np.int64), "level": levels["level"].astype(str)})
    return out.reset_index(drop=True)


def _in_plane_axes(axis: int) -> tuple[int, int]:
    a, b = (i for i in range(3) if i != axis)
    return a, b


# --------------------------------------------------------------------------------------------
# Pure checks
# --------------------------------------------------------------------------------------------


def coverage_table(mask: NDArray[np.integer], labels: LabelTable, axis: int) -> pd.DataFrame:
    """Where each declared label lies in the stack.

    Parameters
    ----------
    mask : ndarray of int, 3-D
        Label mask.
    labels : LabelTable
        Declared labels.
    axis : int
        Array axis of the axial slices (:func:`helpers.nifti.slice_axis`).

    Returns
    -------
    DataFrame
        One row per declared label with columns ``value``, ``muscle``, ``side``, ``n_voxels``,
        ``n_slices`` (slices holding it), ``first_slice``, ``last_slice`` (-1 when absent),
        ``slices`` (list of slice indices), ``touches_z_edge`` (on slice 0 or the last one),
        ``border_voxels`` (voxels on the in-plane border of the image) and ``border_slices``
        (dict slice -> voxels on that border, for slices where it touches it).

    Examples
    --------
    >>> m = np.zeros((5, 5, 3), dtype=np.int16)
    >>> m[0:2, 1:3, 1] = 1
    >>> t = coverage_table(m, LabelTable((Label(1, "mf", "right"),)), axis=2)
    >>> t[["n_voxels", "n_slices", "first_slice", "touches_z_edge", "border_voxels"]].values[0]
    array([4, 1, 1, False, 2], dtype=object)
    """
    mask = np.asarray(mask)
    n = mask.shape[axis]
    a, b = _in_plane_axes(axis)
    border = np.zeros(mask.shape, dtype=bool)
    for ax in (a, b):
        idx = [slice(None)] * 3
        idx[ax] = 0
        border[tuple(idx)] = True
        idx[ax] = mask.shape[ax] - 1
        border[tuple(idx)] = True
    rows = []
    for lab in labels.labels:
        m = mask == lab.value
        per_slice = m.sum(axis=(a, b))
        present = np.flatnonzero(per_slice)
        on_border = m & border
        border_per_slice = on_border.sum(axis=(a, b))
        rows.append(
            {
                "value": lab.value,
                "muscle": lab.muscle,
                "side": lab.side,
                "n_voxels": int(per_slice.sum()),
                "n_slices": int(present.size),
                "first_slice": int(present[0]) if present.size else -1,
                "last_slice": int(present[-1]) if present.size else -1,
                "slices": [int(i) for i in present],
                "touches_z_edge": bool(present.size and (present[0] == 0 or present[-1] == n - 1)),
                "border_voxels": int(border_per_slice.sum()),
                "border_slices": {
                    int(i): int(border_per_slice[i]) for i in np.flatnonzero(border_per_slice)
                },
            }
        )
    return pd.DataFrame(rows)


def component_table(
    mask: NDArray[np.integer], labels: LabelTable, axis: int, *, connectivity: int = 2
) -> pd.DataFrame:
    """Connected pieces of each label on each slice (:func:`scipy.ndimage.label`).

    Parameters
    ----------
    mask : ndarray of int, 3-D
        Label mask.
    labels : LabelTable
        Declared labels.
    axis : int
        Array axis of the axial slices.
    connectivity : {1, 2}
        In-plane neighbourhood: 1 = 4-neighbours, 2 = 8-neighbours.

    Returns
    -------
    DataFrame
        One row per label and slice where the label is present: ``value``, ``muscle``,
        ``side``, ``slice``, ``n_voxels``, ``n_components``, ``largest_fraction`` (share 0-1 of
        the slice's label voxels in its largest piece).

    Examples
    --------
    >>> m = np.zeros((6, 6, 1), dtype=np.int16)
    >>> m[0:2, 0:2, 0] = 1          # 4 voxels
    >>> m[4:6, 4:6, 0] = 1          # 4 more, not touching
    >>> t = component_table(m, LabelTable((Label(1, "mf", "right"),)), axis=2)
    >>> int(t.n_components[0]), float(t.largest_fraction[0])
    (2, 0.5)
    """
    # slices first and contiguous: one plane per slice without strided copies
    stack = np.ascontiguousarray(np.moveaxis(np.asarray(mask), axis, 0))
    structure = ndimage.generate_binary_structure(2, connectivity)
    rows = []
    for lab in labels.labels:
        m = stack == lab.value
        per_slice = m.sum(axis=(1, 2))
        for k in np.flatnonzero(per_slice):
            pieces, n_pieces = ndimage.label(m[k], structure=structure)
            sizes = np.bincount(pieces.ravel())[1:]
            rows.append(
                {
                    "value": lab.value,
                    "muscle": lab.muscle,
                    "side": lab.side,
                    "slice": int(k),
                    "n_voxels": int(per_slice[k]),
                    "n_components": int(n_pieces),
                    "largest_fraction": float(sizes.max() / per_slice[k]),
                }
            )
    cols = ["value", "muscle", "side", "slice", "n_voxels", "n_components", "largest_fraction"]
    return pd.DataFrame(rows, columns=cols)


def world_centroids(
    mask: NDArray[np.integer],
    affine: NDArray[np.float64],
    labels: LabelTable,
    *,
    axis: int | None = None,
    slices: Sequence[int] | NDArray[np.int64] | None = None,
) -> pd.DataFrame:
    """Centroid of each label in world coordinates (mm, nibabel RAS+).

    Parameters
    ----------
    mask : ndarray of int, 3-D
        Label mask.
    affine : ndarray, shape (4, 4)
        Voxel-to-world (RAS+) affine of the mask.
    labels : LabelTable
        Declared labels.
    axis, slices : optional
        Restrict to these slices along ``axis`` (e.g. one vertebral level).

    Returns
    -------
    DataFrame
        One row per label: ``value``, ``muscle``, ``side``, ``n_voxels``, ``x_mm`` (+ = towards
        the patient's right), ``y_mm`` (+ = anterior), ``z_mm`` (+ = superior); NaN
        coordinates when the label is absent.

    Examples
    --------
    >>> m = np.zeros((4, 1, 1), dtype=np.int16); m[3] = 1
    >>> lps = np.diag([-2.0, -2.0, 2.0, 1.0])     # array axis 0 runs to the patient's left
    >>> float(world_centroids(m, lps, LabelTable((Label(1, "mf", "left"),))).x_mm[0])
    -6.0
    """
    mask = np.asarray(mask)
    if slices is not None:
        if axis is None:
            msg = "world_centroids: 'slices' needs 'axis'"
            raise ValueError(msg)
        keep = np.zeros(mask.shape[axis], dtype=bool)
        keep[np.asarray(slices, dtype=np.int64)] = True
        shape = [1, 1, 1]
        shape[axis] = -1
        mask = np.where(keep.reshape(shape), mask, 0)
    rows = []
    for lab in labels.labels:
        idx = np.argwhere(mask == lab.value)
        if idx.size:
            centre = affine[:3, :3] @ idx.mean(axis=0) + affine[:3, 3]
        else:
            centre = np.full(3, np.nan)
        rows.append(
            {
                "value": lab.value,
                "muscle": lab.muscle,
                "side": lab.side,
                "n_voxels": len(idx),
                "x_mm": float(centre[0]),
                "y_mm": float(centre[1]),
                "z_mm": float(centre[2]),
            }
        )
    return pd.DataFrame(rows)


def lateralization_checks(
    subject: str,
    mask: NDArray[np.integer],
    affine: NDArray[np.float64],
    labels: LabelTable,
    *,
    levels: pd.DataFrame | None = None,
    settings: QCSettings | None = None,
) -> pd.DataFrame:
    """Check in world coordinates that each right label lies to the patient's right of its twin.

    For every muscle with a ``right`` and a ``left`` label, the world x (RAS+, mm) of the two
    centroids is compared, over the whole stack (``level="all"``) and per level when a level
    table is given.  ``value = x_right - x_left``; the check fails when it is below
    ``settings.min_lateral_separation_mm`` (default 0, i.e. the right label is on the patient's
    left of its twin or level with it).  Array order plays no part, so the result is the same
    for any storage orientation.  A pair with an absent member passes with ``value`` NaN and the
    reason says it was not checked (the empty-label check reports the absence).

    Returns
    -------
    DataFrame
        Rows in :data:`QC_COLUMNS` (``check = "lateralization"``, ``side`` empty).
    """
    settings = settings or QCSettings()
    axis = _slice_axis(affine)
    pairs: dict[str, dict[str, Label]] = {}
    for lab in labels.labels:
        if lab.side in ("left", "right"):
            pairs.setdefault(lab.muscle, {})[lab.side] = lab
    pairs = {m: p for m, p in pairs.items() if len(p) == 2}
    rows: list[dict[str, Any]] = []
    if not pairs:
        return _frame(rows)
    for level, slices in _level_groups(
        levels, mask.shape[axis], with_all=True, with_unassigned=False
    ):
        cents = world_centroids(mask, affine, labels, axis=axis, slices=slices).set_index("value")
        for muscle, pair in pairs.items():
            xr = cents.loc[pair["right"].value, "x_mm"]
            xl = cents.loc[pair["left"].value, "x_mm"]
            if not (np.isfinite(xr) and np.isfinite(xl)):
                missing = "right" if not np.isfinite(xr) else "left"
                if not (np.isfinite(xr) or np.isfinite(xl)):
                    missing = "both"
                reason = f"not checked: {missing} {muscle} absent"
                rows.append(
                    _row(subject, level, "lateralization", "pass", math.nan, reason, muscle=muscle)
                )
                continue
            sep = float(xr - xl)
            if sep < settings.min_lateral_separation_mm or sep == 0:
                reason = (
                    f"right {muscle} centroid lies {abs(sep):.1f} mm to the patient's "
                    f"{'left' if sep < 0 else 'right'} of the left {muscle} (world x, RAS): "
                    "right and left labels swapped?"
                )
                status = "fail"
            else:
                reason = f"right {muscle} lies {sep:.1f} mm to the patient's right of the left one"
                status = "pass"
            rows.append(_row(subject, level, "lateralization", status, sep, reason, muscle=muscle))
    return _frame(rows)


def dice_table(
    auto: NDArray[np.integer],
    manual: NDArray[np.integer],
    labels: LabelTable,
    *,
    axis: int | None = None,
    slices: Sequence[int] | NDArray[np.int64] | None = None,
) -> pd.DataFrame:
    """Dice per declared label between an automatic and a manual mask.

    Returns
    -------
    DataFrame
        ``value``, ``muscle``, ``side``, ``n_auto``, ``n_manual``, ``n_overlap`` (voxels),
        ``dice`` (NaN when the label is absent from both) and ``note``.
    """
    auto = np.asarray(auto)
    manual = np.asarray(manual)
    if auto.shape != manual.shape:
        msg = f"dice_table: shapes differ {auto.shape} vs {manual.shape}"
        raise ValueError(msg)
    if slices is not None:
        if axis is None:
            msg = "dice_table: 'slices' needs 'axis'"
            raise ValueError(msg)
        auto = np.take(auto, np.asarray(slices, dtype=np.int64), axis=axis)
        manual = np.take(manual, np.asarray(slices, dtype=np.int64), axis=axis)
    rows = []
    for lab in labels.labels:
        a = auto == lab.value
        m = manual == lab.value
        d = dice(a, m)
        rows.append(
            {
                "value": lab.value,
                "muscle": lab.muscle,
                "side": lab.side,
                "n_auto": int(a.sum()),
                "n_manual": int(m.sum()),
                "n_overlap": int(np.logical_and(a, m).sum()),
                "dice": d,
                "note": "label absent in both masks" if math.isnan(d) else "",
            }
        )
    return pd.DataFrame(rows)


def robust_z(values: Sequence[float] | NDArray[np.floating] | pd.Series) -> NDArray[np.float64]:
    """Robust z scores ``(x - median) / (1.4826 * MAD)``.

    NaN inputs give NaN and are ignored for the median and MAD.  When the MAD is 0 (more than
    half the values identical) the mean absolute deviation x 1.2533 is used instead; when that
    is 0 too (all values equal) every z is 0.

    Examples
    --------
    >>> robust_z([1.0, 2.0, 3.0, 4.0, 100.0]).round(2).tolist()
    [-1.35, -0.67, 0.0, 0.67, 65.43]
    """
    x = np.asarray(values, dtype=np.float64)
    z = np.full(x.shape, np.nan)
    ok = np.isfinite(x)
    if not ok.any():
        return z
    med = float(np.median(x[ok]))
    dev = np.abs(x[ok] - med)
    scale = MAD_TO_SD * float(np.median(dev))
    if scale == 0:
        scale = MEANAD_TO_SD * float(np.mean(dev))
    z[ok] = 0.0 if scale == 0 else (x[ok] - med) / scale
    return z


_MEASURES = ("csa_mm2", "fat_pct")


def cohort_outliers(metrics: pd.DataFrame, settings: QCSettings | None = None) -> pd.DataFrame:
    """Robust z of area and fat per muscle, side and level across subjects.

    Parameters
    ----------
    metrics : DataFrame
        The cohort metrics table (columns ``subject, level, slice, muscle, side, csa_mm2,
        fat_pct``; ``method`` optional).  Only aggregate rows (``slice`` NaN) are used.
    settings : QCSettings, optional
        ``robust_z_threshold`` and ``min_cohort_size``.

    Returns
    -------
    DataFrame
        One row per subject, level, muscle, side and measure: ``subject``, ``level``,
        ``muscle``, ``side``, ``method``, ``measure`` (``csa_mm2`` or ``fat_pct``), ``value``,
        ``median``, ``z``, ``n_cohort`` (subjects with a value in the group) and ``outlier``
        (``|z| > threshold``; False when the group is smaller than ``min_cohort_size``, where
        ``z`` is NaN).

    Notes
    -----
    ``csa_mm2`` does not depend on the fat method, so when the table holds several methods the
    area is judged once per subject (first method).  ``fat_pct`` is judged per method.
    """
    settings = settings or QCSettings()
    needed = {"subject", "level", "muscle", "side", "csa_mm2", "fat_pct"}
    missing = needed - set(metrics.columns)
    if missing:
        where = Path("<metrics table>")
        raise InputFileError(where, f"missing columns {sorted(missing)} for the outlier check")
    df = metrics
    if "slice" in df.columns:
        df = df[df["slice"].isna()]
    df = df.copy()
    df["level"] = df["level"].astype(object).where(df["level"].notna(), ALL_LEVELS).astype(str)
    df["side"] = df["side"].astype(object).where(df["side"].notna(), "").astype(str)
    df["subject"] = df["subject"].astype(str)
    if "method" not in df.columns:
        df["method"] = ""
    df["method"] = df["method"].astype(object).where(df["method"].notna(), "").astype(str)
    out = []
    keys = ["level", "muscle", "side"]
    for measure in _MEASURES:
        if measure == "csa_mm2":
            part = df.drop_duplicates(["subject", *keys])
            part = part.assign(method="")
        else:
            part = df
        for _, grp in part.groupby([*keys, "method"], sort=False):
            vals = pd.to_numeric(grp[measure], errors="coerce").to_numpy(dtype=float)
            n_ok = int(np.isfinite(vals).sum())
            big_enough = n_ok >= settings.min_cohort_size
            z = robust_z(vals) if big_enough else np.full(vals.shape, np.nan)
            med = float(np.nanmedian(vals)) if n_ok else math.nan
            for (_, r), v, zi in zip(grp.iterrows(), vals, z, strict=True):
                out.append(
                    {
                        "subject": r["subject"],
                        "level": r["level"],
                        "muscle": r["muscle"],
                        "side": r["side"],
                        "method": r["method"],
                        "measure": measure,
                        "value": float(v),
                        "median": med,
                        "z": float(zi),
                        "n_cohort": n_ok,
                        "outlier": bool(np.isfinite(zi) and abs(zi) > settings.robust_z_threshold),
                    }
                )
    cols = ["subject", "level", "muscle", "side", "method", "measure", "value", "median", "z"]
    return pd.DataFrame(out, columns=[*cols, "n_cohort", "outlier"])


def outlier_checks(metrics: pd.DataFrame, settings: QCSettings | None = None) -> pd.DataFrame:
    """QC rows (``outlier_csa_mm2`` / ``outlier_fat_pct``) from :func:`cohort_outliers`.

    An outlier is a ``flag`` (unusual, not necessarily wrong: look at the mosaic).  Groups
    smaller than ``min_cohort_size`` pass with ``value`` NaN and a reason saying so.
    """
    settings = settings or QCSettings()
    table = cohort_outliers(metrics, settings)
    rows = []
    for r in table.itertuples(index=False):
        check = f"outlier_{r.measure}"
        unit = "mm2" if r.measure == "csa_mm2" else "%"
        method = f" ({r.method})" if r.method else ""
        if not np.isfinite(r.z):
            if not np.isfinite(r.value):
                reason = f"not checked: no {r.measure}{method}"
            else:
                reason = (
                    f"not checked: {r.n_cohort} subjects with a value "
                    f"(< min_cohort_size {settings.min_cohort_size})"
                )
            status = "pass"
        elif r.outlier:
            reason = (
                f"{r.measure}{method} {r.value:.1f} {unit} vs cohort median {r.median:.1f} "
                f"{unit}: robust z {r.z:+.1f} (|z| > {settings.robust_z_threshold:g})"
            )
            status = "flag"
            if settings.outlier_flag_levels == "all" and r.level != ALL_LEVELS:
                status = "pass"
                reason += "; one level only: recorded, not flagged (outlier_flag_levels all)"
        else:
            reason = f"robust z {r.z:+.1f}"
            status = "pass"
        rows.append(
            _row(r.subject, r.level, check, status, r.z, reason, muscle=r.muscle, side=r.side)
        )
    return _frame(rows)


def midline_checks(
    subject: str, mask: NDArray[np.integer], affine: NDArray[np.float64], labels: LabelTable
) -> pd.DataFrame:
    """``midline_side`` rows: each sided label against the anatomical midline (world x).

    Uses :func:`helpers.labels.lateralization_table` (per-slice mid-sagittal line estimated
    from the left/right muscle pairs, so an off-centre or rotated spine is handled).  A right
    label must lie on the patient's right of the midline and of its twin, a left label on the
    left; otherwise the row fails.  ``value`` is the label's mean world-x offset from the
    midline (mm, + = patient's right).  Returns rows in :data:`QC_COLUMNS`.  Absent labels get
    no row (``empty_label`` reports them); values the label file does not declare are ignored
    here (``undeclared_label`` reports them).
    """
    if not any(lab.side for lab in labels.labels):
        return _frame([])
    data = np.asarray(mask)
    extra = sorted({int(v) for v in np.unique(data)} - set(labels.values) - {0})
    if extra:
        data = np.where(np.isin(data, extra), 0, data)
    table = lateralization_table(data, affine, labels)
    rows = []
    for r in table.itertuples(index=False):
        if r.note == "absent":
            continue
        lab = labels.by_value(int(r.value))
        off = float(r.offset_x_mm)
        where = "right" if off > 0 else "left"
        reason = f"lies {abs(off):.1f} mm to the patient's {where} of the midline"
        if not r.ok:
            reason += f": {r.note}"
        rows.append(
            _row(subject, ALL_LEVELS, "midline_side", "pass" if r.ok else "fail", off, reason, lab)
        )
    return _frame(rows)


def tip_levels(
    mask: NDArray[np.integer], labels: LabelTable, levels: pd.DataFrame | None, axis: int
) -> dict[int, set[str]]:
    """Label value -> the first and last level (in slice order) holding it: the muscle's tips.

    Empty sets without a level table or for a label present on fewer than two levels.

    Examples
    --------
    >>> m = np.zeros((1, 1, 3), dtype=np.int16); m[..., :] = 1
    >>> lv = pd.DataFrame({"slice": [0, 1, 2], "level": ["L5", "L4", "L3"]})
    >>> sorted(tip_levels(m, LabelTable((Label(1, "mf", "right"),)), lv, axis=2)[1])
    ['L3', 'L5']
    """
    out: dict[int, set[str]] = {lab.value: set() for lab in labels.labels}
    if levels is None or levels.empty:
        return out
    groups = _level_groups(levels, np.asarray(mask).shape[axis], with_all=False,
                           with_unassigned=False)
    in_plane = tuple(i for i in range(3) if i != axis)
    for lab in labels.labels:
        per_slice = (np.asarray(mask) == lab.value).any(axis=in_plane)
        present = [lv_ for lv_, sl in groups if per_slice[sl].any()]
        if len(present) >= 2:
            out[lab.value] = {present[0], present[-1]}
    return out


# --------------------------------------------------------------------------------------------
# One subject
# --------------------------------------------------------------------------------------------


def check_subject(
    subject: str,
    mask: Volume,
    labels: LabelTable,
    *,
    levels: pd.DataFrame | None = None,
    manual: Volume | None = None,
    settings: QCSettings | None = None,
    image: Volume | None = None,
) -> pd.DataFrame:
    """All per-subject QC checks on one segmentation.

    Parameters
    ----------
    subject : str
        Pseudonymous subject ID (written into every row).
    mask : Volume
        The automatic label mask with its affine.
    labels : LabelTable
        Declared labels.
    levels : DataFrame, optional
        Slice-to-level table (``slice``, ``level``; slice indices along the axial axis in the
        file's array order).  Without it everything is reported for ``level="all"``.
    manual : Volume, optional
        A manual mask on the same grid: adds ``dice`` rows.
    settings : QCSettings, optional
        Thresholds.
    image : Volume, optional
        The MR image on the mask's grid: adds the image-based plausibility checks
        (``inside_body``, ``posterior_cover``, ``intensity``; :mod:`helpers.anatomy`).  The
        mask-only plausibility checks (``arrangement``, ``mirror``, ``csa_range``) always run.

    Returns
    -------
    DataFrame
        Rows in :data:`QC_COLUMNS`.  Checks (see :data:`CHECKS`): ``undeclared_label`` (fail),
        ``empty_label`` (fail by default), ``coverage`` (always pass: records the span),
        ``truncation_z`` (flag by default), ``truncation_inplane`` (flag), ``level_coverage``
        (flag when a label skips a whole level inside its span), ``fragmentation`` (flag),
        ``lateralization`` (fail, per level), ``midline_side`` (fail) and ``dice`` (flag
        below ``min_dice``).

    Raises
    ------
    GeometryMismatchError
        ``manual`` is not on the mask's grid.
    InputFileError
        The level table is malformed or points outside the stack.
    """
    settings = settings or QCSettings()
    data = np.asarray(mask.data)
    axis = _slice_axis(mask.affine)
    n = data.shape[axis]
    lv = _check_levels(levels, n, subject)
    rows: list[dict[str, Any]] = []

    present = np.unique(data)
    undeclared = sorted({int(v) for v in present} - set(labels.values) - {0})
    if undeclared:
        count = int(np.isin(data, undeclared).sum())
        reason = f"mask holds values {undeclared} that the label file does not declare"
        rows.append(_row(subject, ALL_LEVELS, "undeclared_label", "fail", count, reason))

    cov = coverage_table(data, labels, axis).set_index("value")
    slice_level = {} if lv is None else dict(zip(lv["slice"], lv["level"], strict=True))
    groups = _level_groups(lv, n, with_all=False, with_unassigned=True)
    comps = component_table(data, labels, axis, connectivity=settings.connectivity)

    for lab in labels.labels:
        c = cov.loc[lab.value]
        if c.n_voxels == 0:
            reason = "declared but absent from the mask"
            status = settings.empty_label_status
            rows.append(_row(subject, ALL_LEVELS, "empty_label", status, 0, reason, lab))
            continue
        rows.append(_row(subject, ALL_LEVELS, "empty_label", "pass", c.n_voxels, "present", lab))
        span = f"slices {_ranges(c.slices)} of 0-{n - 1}"
        if lv is not None:
            lvls = list(dict.fromkeys(slice_level[s] for s in c.slices if s in slice_level))
            span += f" (levels {', '.join(lvls) if lvls else 'none'})"
        rows.append(_row(subject, ALL_LEVELS, "coverage", "pass", c.n_slices, span, lab))

        if c.touches_z_edge:
            ends = [e for e, s in (("first", 0), ("last", n - 1)) if s in c.slices]
            reason = (
                f"reaches the {' and '.join(ends)} slice of the stack: it may "
                "continue beyond the field of view"
            )
            rows.append(
                _row(subject, ALL_LEVELS, "truncation_z", settings.z_edge_status, 1, reason, lab)
            )
        else:
            rows.append(
                _row(subject, ALL_LEVELS, "truncation_z", "pass", 0, "inside the stack", lab)
            )

        lab_comps = comps[comps["value"] == lab.value].set_index("slice")
        named = [(lv_, set(sl.tolist())) for lv_, sl in groups if lv_ != UNASSIGNED_LEVEL]
        has = [bool(set(c.slices) & sl) for _, sl in named]
        for level, slices in groups:
            in_group = sorted(set(c.slices) & set(slices.tolist()))
            if level not in (ALL_LEVELS, UNASSIGNED_LEVEL):
                if not in_group:
                    i = [lv_ for lv_, _ in named].index(level)
                    if any(has[:i]) and any(has[i + 1 :]):
                        reason = f"absent from every slice of {level} but present above and below"
                        status = settings.level_absent_status
                    else:
                        reason = (
                            f"absent from every slice of {level}, at the end of its span "
                            "(anatomy or field of view)"
                        )
                        status = "pass"
                    rows.append(_row(subject, level, "level_coverage", status, 0, reason, lab))
                else:
                    reason = f"on {len(in_group)} of {len(slices)} slices"
                    rows.append(
                        _row(subject, level, "level_coverage", "pass", len(in_group), reason, lab)
                    )
            if not in_group:
                continue
            # in-plane truncation
            bs = [s for s in in_group if s in c.border_slices]
            n_border = sum(c.border_slices[s] for s in bs)
            if n_border > settings.max_border_voxels:
                reason = (
                    f"touches the in-plane edge of the field of view on slices "
                    f"{_ranges(bs)} ({n_border} voxels): its area may be cut off"
                )
                status = "flag"
            else:
                reason = "clear of the in-plane edge"
                status = "pass"
            rows.append(_row(subject, level, "truncation_inplane", status, n_border, reason, lab))
            # fragmentation
            tip = settings.tip_slices
            body_slices = [
                s for s in in_group if c.first_slice + tip <= s <= c.last_slice - tip
            ]
            judged = lab_comps.loc[
                [
                    s
                    for s in body_slices
                    if lab_comps.loc[s, "n_voxels"] >= settings.fragmentation_min_voxels
                ]
            ]
            if judged.empty:
                reason = (
                    f"not judged: fewer than {settings.fragmentation_min_voxels} voxels on "
                    f"every slice outside the label's {tip} end slices (tips)"
                )
                rows.append(_row(subject, level, "fragmentation", "pass", math.nan, reason, lab))
                continue
            worst = float(judged["largest_fraction"].min())
            bad = judged[judged["largest_fraction"] < settings.min_largest_component_fraction]
            if bad.empty:
                reason = f"largest piece holds >= {worst:.0%} of the label on every slice"
                status = "pass"
            else:
                k = int(bad["largest_fraction"].idxmin())
                reason = (
                    f"in {int(bad.loc[k, 'n_components'])} pieces on slice {k}: "
                    f"largest holds {worst:.1%} (< "
                    f"{settings.min_largest_component_fraction:.0%}); fragmented slices "
                    f"{_ranges(bad.index)}"
                )
                status = "flag"
            rows.append(_row(subject, level, "fragmentation", status, worst, reason, lab))

    rows.extend(
        lateralization_checks(
            subject, data, mask.affine, labels, levels=lv, settings=settings
        ).to_dict("records")
    )

    rows.extend(midline_checks(subject, data, mask.affine, labels).to_dict("records"))

    # anatomical plausibility (helpers.anatomy): gross errors fail
    from helpers.anatomy import plausibility_checks

    if image is not None:
        check_same_grid(image, mask)
    plaus = plausibility_checks(
        subject,
        data,
        mask.affine,
        labels,
        image=None if image is None else np.asarray(image.data),
        groups=_level_groups(lv, n, with_all=lv is None, with_unassigned=False),
        settings=settings,
        tips=tip_levels(data, labels, lv, axis),
    )
    rows.extend(plaus.to_dict("records"))

    if manual is not None:
        check_same_grid(mask, manual)
        mdata = np.asarray(manual.data)
        tips = tip_levels(data, labels, lv, axis)
        for level, slices in _level_groups(lv, n, with_all=True, with_unassigned=False):
            table = dice_table(data, mdata, labels, axis=axis, slices=slices)
            for r, lab in zip(table.itertuples(index=False), labels.labels, strict=True):
                if math.isnan(r.dice):
                    rows.append(
                        _row(
                            subject, level, "dice", "pass", math.nan, f"not defined: {r.note}", lab
                        )
                    )
                    continue
                status = "flag" if r.dice < settings.min_dice else "pass"
                reason = (
                    f"Dice {r.dice:.3f} ({r.n_auto} automatic, {r.n_manual} manual, "
                    f"{r.n_overlap} shared voxels)"
                )
                if status == "flag" and level in tips.get(lab.value, set()):
                    status = "pass"
                    reason += (
                        f" < min_dice {settings.min_dice:g} at a tip level of the muscle "
                        "(boundary dominates: recorded, not flagged)"
                    )
                elif status == "flag":
                    reason += f" < min_dice {settings.min_dice:g}"
                rows.append(_row(subject, level, "dice", status, r.dice, reason, lab))
    return _frame(rows)


def summarize_qc(qc: pd.DataFrame, subjects: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per subject: worst status, counts and the reasons of every fail and flag.

    Parameters
    ----------
    qc : DataFrame
        Rows in :data:`QC_COLUMNS`.
    subjects : sequence of str, optional
        Subjects to list (in this order) even if they have no rows.

    Returns
    -------
    DataFrame
        Columns :data:`SUMMARY_COLUMNS`: ``subject``, ``status`` (worst), ``n_fail``,
        ``n_flag``, ``reasons`` (fails first, ``"; "``-separated, empty when all pass; rows
        of the same check, level and status are merged, naming their labels).
    """
    order = list(dict.fromkeys([*(subjects or []), *qc["subject"].astype(str)]))
    out = []
    for subject in order:
        sub = qc[qc["subject"].astype(str) == subject]
        parts = []
        for status in ("fail", "flag"):
            bad = sub[sub["status"] == status]
            for (check, level), grp in bad.groupby(["check", "level"], sort=False):
                head = f"{status} {check}"
                if level != ALL_LEVELS:
                    head += f" [{level}]"
                names = [
                    " ".join(str(x) for x in (side, muscle) if isinstance(x, str) and x)
                    for side, muscle in zip(grp["side"], grp["muscle"], strict=True)
                ]
                names = list(dict.fromkeys(n for n in names if n))
                if names:
                    head += " " + ", ".join(names)
                reason = str(grp["reason"].iloc[0])
                if grp["reason"].nunique() > 1:
                    reason += f" (+{len(grp) - 1} more in qc.csv)"
                parts.append(f"{head}: {reason}")
        out.append(
            {
                "subject": subject,
                "status": worst_status(sub["status"]),
                "n_fail": int((sub["status"] == "fail").sum()),
                "n_flag": int((sub["status"] == "flag").sum()),
                "reasons": "; ".join(parts),
            }
        )
    return pd.DataFrame(out, columns=list(SUMMARY_COLUMNS))


# --------------------------------------------------------------------------------------------
# Display: orientation from the affine
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AxialView:
    """How a stored axial slice is turned into a screen image.

    Attributes
    ----------
    slice_axis : int
        Array axis across the axial slices.
    row_axis, col_axis : int
        Array axes shown as screen rows (top to bottom) and columns (left to right).
    flip_rows, flip_cols : bool
        Whether those axes are reversed on screen.
    convention : str
        ``"radiological"`` or ``"neurological"``.
    """

    slice_axis: int
    row_axis: int
    col_axis: int
    flip_rows: bool
    flip_cols: bool
    convention: str


def axial_view(affine: NDArray[np.float64], convention: str = "radiological") -> AxialView:
    """Screen layout of axial slices from the affine.

    The in-plane axis closest to world left-right becomes the screen columns, the other the
    rows.  Rows run anterior (top) to posterior (bottom).  Columns run patient-right to
    patient-left in the radiological convention (patient's right on the screen's left), the
    other way in the neurological one.

    Examples
    --------
    >>> v = axial_view(np.diag([-1.0, -1.0, 1.0, 1.0]))    # L-P-S storage
    >>> v.row_axis, v.col_axis, v.flip_rows, v.flip_cols
    (1, 0, False, False)
    >>> axial_view(np.diag([1.0, 1.0, 1.0, 1.0])).flip_cols   # R-A-S storage
    True
    """
    if convention not in ("radiological", "neurological"):
        msg = f"convention must be 'radiological' or 'neurological', got {convention!r}"
        raise ValueError(msg)
    s = _slice_axis(affine)
    a, b = _in_plane_axes(s)
    unit = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    col = a if abs(unit[0, a]) >= abs(unit[0, b]) else b
    row = b if col == a else a
    # radiological: moving right on screen goes to the patient's left (world x decreasing)
    want_x_decreasing = convention == "radiological"
    flip_cols = bool((affine[0, col] > 0) == want_x_decreasing)
    flip_rows = bool(affine[1, row] > 0)  # top = anterior: moving down goes posterior
    return AxialView(s, row, col, flip_rows, flip_cols, convention)


def patient_right_screen_side(affine: NDArray[np.float64], view: AxialView) -> str:
    """Screen side (``"left"``/``"right"``) where the patient's right appears, from the affine.

    Computed from the world direction of the screen's left-to-right axis, independently of how
    :func:`axial_view` chose the flips, and used to place the ``R``/``L`` letters.

    Examples
    --------
    >>> lps, ras = np.diag([-1.0, -1.0, 1.0, 1.0]), np.eye(4)
    >>> patient_right_screen_side(lps, axial_view(lps))
    'left'
    >>> patient_right_screen_side(ras, axial_view(ras))
    'left'
    >>> patient_right_screen_side(ras, axial_view(ras, "neurological"))
    'right'
    """
    direction_x = affine[0, view.col_axis] * (-1.0 if view.flip_cols else 1.0)
    return "left" if direction_x < 0 else "right"


def _anterior_screen_side(affine: NDArray[np.float64], view: AxialView) -> str:
    direction_y = affine[1, view.row_axis] * (-1.0 if view.flip_rows else 1.0)
    return "top" if direction_y < 0 else "bottom"


def orient_slice(volume: NDArray, view: AxialView, index: int) -> NDArray:
    """Slice ``index`` (along ``view.slice_axis``, file order) as a screen image (rows, cols).

    A view of ``volume`` (basic indexing; ``np.take`` copied about 9 ms of a realistic scan per
    call).
    """
    where: list[int | slice] = [slice(None)] * np.ndim(volume)
    where[view.slice_axis] = int(index)
    plane = np.asarray(volume)[tuple(where)]
    remaining = [i for i in range(3) if i != view.slice_axis]
    if remaining.index(view.row_axis) != 0:
        plane = plane.T
    if view.flip_rows:
        plane = plane[::-1, :]
    if view.flip_cols:
        plane = plane[:, ::-1]
    return plane


def label_colours(labels: LabelTable) -> dict[int, tuple[float, float, float]]:
    """A distinct RGB colour per label: one hue per muscle, dark for right, light for left."""
    from matplotlib import colormaps

    tab20 = colormaps["tab20"].colors
    out = {}
    for m, muscle in enumerate(labels.muscles):
        for lab in labels.labels:
            if lab.muscle != muscle:
                continue
            k = (2 * m + (1 if lab.side == "left" else 0)) % len(tab20)
            out[lab.value] = tuple(float(c) for c in tab20[k])
    return out


def select_slices(mask: NDArray[np.integer], axis: int, max_slices: int) -> list[int]:
    """Up to ``max_slices`` evenly spaced slices among those holding any label (all if none).

    Examples
    --------
    >>> m = np.zeros((2, 2, 10), dtype=np.int16); m[:, :, 2:8] = 1
    >>> select_slices(m, 2, 3)
    [2, 4, 7]
    """
    a, b = _in_plane_axes(axis)
    labelled = np.flatnonzero((np.asarray(mask) > 0).sum(axis=(a, b)))
    pool = labelled if labelled.size else np.arange(mask.shape[axis])
    if pool.size <= max_slices:
        return [int(i) for i in pool]
    picks = np.unique(np.linspace(0, pool.size - 1, max_slices).round().astype(int))
    return [int(pool[i]) for i in picks]


#: Mosaic geometry (pixels).  Width = ncols x TILE_PX, height = nrows x TILE_PX + HEADER_PX +
#: legend rows x LEGEND_ROW_PX (see :func:`mosaic_size_px`).
TILE_PX = 240
HEADER_PX = 48
LEGEND_ROW_PX = 22
LEGEND_COLUMNS = 4
_DPI = 100


def mosaic_size_px(n_tiles: int, n_labels: int, ncols: int = 4) -> tuple[int, int]:
    """(width, height) in pixels of a mosaic with ``n_tiles`` slices and ``n_labels`` labels.

    Examples
    --------
    >>> mosaic_size_px(8, 8)
    (960, 572)
    """
    cols = max(1, min(ncols, n_tiles))
    rows = max(1, math.ceil(n_tiles / cols))
    legend_rows = math.ceil(n_labels / LEGEND_COLUMNS) if n_labels else 0
    return cols * TILE_PX, rows * TILE_PX + HEADER_PX + legend_rows * LEGEND_ROW_PX


def _window(image: NDArray) -> tuple[float, float]:
    lo, hi = np.percentile(image, [1.0, 99.5])
    if hi <= lo:
        lo, hi = float(image.min()), float(image.max())
    if hi <= lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def _overlay_rgba(
    plane: NDArray[np.integer], colours: Mapping[int, tuple[float, float, float]], opacity: float
) -> NDArray[np.float32]:
    top = int(max(plane.max(initial=0), max(colours, default=0)))
    lut = np.zeros((top + 1, 4), dtype=np.float32)
    lut[1:] = (1.0, 1.0, 1.0, opacity)  # undeclared values: white
    for value, rgb in colours.items():
        lut[value] = (*rgb, opacity)
    return lut[np.clip(plane, 0, top)]


def _draw_tile(
    ax: Any,
    image: Volume,
    mask: Volume,
    view: AxialView,
    index: int,
    colours: Mapping[int, tuple[float, float, float]],
    window: tuple[float, float],
    opacity: float,
    title: str,
) -> None:
    img = orient_slice(image.data, view, index)
    lab = orient_slice(mask.data, view, index)
    zooms = image.zooms_mm
    aspect = zooms[view.row_axis] / zooms[view.col_axis]
    ax.imshow(
        img, cmap="gray", vmin=window[0], vmax=window[1], aspect=aspect, interpolation="nearest"
    )
    if opacity > 0:
        ax.imshow(_overlay_rgba(lab, colours, opacity), aspect=aspect, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title, fontsize=8, color="white", pad=2)
    right = patient_right_screen_side(image.affine, view)
    anterior = _anterior_screen_side(image.affine, view)
    style = {
        "color": "yellow",
        "fontsize": 9,
        "fontweight": "bold",
        "transform": ax.transAxes,
        "va": "center",
        "ha": "center",
    }
    ax.text(0.04 if right == "left" else 0.96, 0.5, "R", **style)
    ax.text(0.96 if right == "left" else 0.04, 0.5, "L", **style)
    ax.text(0.5, 0.95 if anterior == "top" else 0.05, "A", **style)
    ax.text(0.5, 0.05 if anterior == "top" else 0.95, "P", **style)


def _check_pair(image: Volume, mask: Volume) -> None:
    if np.asarray(image.data).ndim != 3:
        raise InputFileError(image.path or Path("<image>"), "expected a 3-D image")
    check_same_grid(image, mask)


def render_mosaic(
    image: Volume,
    mask: Volume,
    labels: LabelTable,
    *,
    subject: str | None = None,
    levels: pd.DataFrame | None = None,
    max_slices: int = 12,
    ncols: int = 4,
    opacity: float = 0.45,
    convention: str = "radiological",
) -> Any:
    """Overlay mosaic of one subject as a matplotlib Figure (Agg canvas; no pyplot state).

    Tiles are axial slices (see :func:`select_slices`) in the chosen convention with the
    ``R``/``L``/``A``/``P`` letters placed from the affine, titled with the slice index (file
    order) and its level.  The figure title holds the subject ID and the display convention;
    the legend names each label.  Size: :func:`mosaic_size_px`.

    Raises
    ------
    GeometryMismatchError
        Image and mask are not on the same grid.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    _check_pair(image, mask)
    view = axial_view(image.affine, convention)
    slices = select_slices(mask.data, view.slice_axis, max_slices)
    n_labels = len(labels.labels)
    width, height = mosaic_size_px(len(slices), n_labels, ncols)
    cols = max(1, min(ncols, len(slices)))
    rows = max(1, math.ceil(len(slices) / cols))
    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI, facecolor="black")
    FigureCanvasAgg(fig)
    legend_rows = math.ceil(n_labels / LEGEND_COLUMNS) if n_labels else 0
    bottom = legend_rows * LEGEND_ROW_PX / height
    top = 1 - HEADER_PX / height
    gs = fig.add_gridspec(
        rows, cols, left=0, right=1, bottom=bottom, top=top, wspace=0.02, hspace=0.14
    )
    colours = label_colours(labels)
    window = _window(np.asarray(image.data))
    level_of = {}
    if levels is not None and not levels.empty:
        level_of = dict(zip(levels["slice"].astype(int), levels["level"].astype(str), strict=True))
    for i, k in enumerate(slices):
        ax = fig.add_subplot(gs[i // cols, i % cols])
        title = f"slice {k}" + (f" · {level_of[k]}" if k in level_of else "")
        _draw_tile(ax, image, mask, view, k, colours, window, opacity, title)
    side = "left" if patient_right_screen_side(image.affine, view) == "left" else "right"
    head = f"{subject}  " if subject else ""
    fig.text(
        0.5,
        1 - 0.5 * HEADER_PX / height,
        f"{head}axial, {view.convention} view: patient's right on screen {side}, anterior up",
        color="white",
        ha="center",
        va="center",
        fontsize=10,
    )
    if n_labels:
        handles = [Patch(facecolor=colours[lab.value], label=_name(lab)) for lab in labels.labels]
        fig.legend(
            handles=handles,
            loc="lower center",
            ncol=LEGEND_COLUMNS,
            fontsize=7,
            frameon=False,
            labelcolor="white",
            bbox_to_anchor=(0.5, 0.0),
            handlelength=1.2,
            borderaxespad=0.2,
        )
    return fig


# Direct composition (issue 19): the mosaic drawn from the image arrays, no figure per tile.
#: Text sizes (pixels) of the directly composed mosaic, matching the matplotlib figure's
#: points at :data:`_DPI` (8 pt titles, 9 pt bold orientation letters, 10 pt header, 7 pt legend).
_TITLE_PX, _LETTER_PX, _HEADER_TEXT_PX, _LEGEND_TEXT_PX = 11, 13, 14, 10
#: Height (pixels) of the title strip above each tile's image.
_TILE_TITLE_PX = 16
_YELLOW = (255, 255, 0)


@functools.lru_cache(maxsize=8)
def _font(size_px: int, bold: bool = False) -> Any:
    """DejaVu Sans (the font matplotlib's mosaics used) at ``size_px``; PIL's own as a fallback."""
    from PIL import ImageFont

    try:
        import matplotlib

        name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
        return ImageFont.truetype(str(Path(matplotlib.get_data_path(), "fonts", "ttf", name)), size_px)
    except (ImportError, OSError):  # pragma: no cover - matplotlib without its fonts
        return ImageFont.load_default(size_px)


def _colour_lut(
    top: int, colours: Mapping[int, tuple[float, float, float]]
) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    """RGB (0-255) and "drawn" flag per label value ``0..top`` (undeclared values: white)."""
    rgb = np.full((top + 1, 3), 255.0, dtype=np.float32)
    drawn = np.ones(top + 1, dtype=bool)
    drawn[0] = False
    for value, colour in colours.items():
        if 0 <= value <= top:
            rgb[value] = np.asarray(colour, dtype=np.float32) * 255.0
    return rgb, drawn


def _nearest_index(n_out: int, n_in: int) -> NDArray[np.intp]:
    """Source index of each of ``n_out`` output pixels spanning ``n_in`` input pixels."""
    return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.intp), n_in - 1)


def _fit(n_rows: int, n_cols: int, aspect: float, box_w: int, box_h: int) -> tuple[int, int]:
    """(height, width) in pixels of a ``n_rows x n_cols`` slice shown with ``aspect`` in a box."""
    height_units, width_units = n_rows * aspect, float(n_cols)
    scale = min(box_w / width_units, box_h / height_units)
    return max(1, round(height_units * scale)), max(1, round(width_units * scale))


def compose_mosaic(
    image: Volume,
    mask: Volume,
    labels: LabelTable,
    *,
    subject: str | None = None,
    levels: pd.DataFrame | None = None,
    max_slices: int = 12,
    ncols: int = 4,
    opacity: float = 0.45,
    convention: str = "radiological",
) -> NDArray[np.uint8]:
    """The overlay mosaic composed directly from the arrays, as an RGB image (rows, cols, 3).

    The same picture as :func:`render_mosaic` without a matplotlib figure: each tile is the
    slice windowed to the image's 1st-99.5th percentile in grey, labels blended over it with
    ``opacity`` in :func:`label_colours` (undeclared values white), scaled by nearest neighbour
    to fit the tile with the voxels' in-plane aspect, in the chosen convention
    (:func:`axial_view`), with the slice title and the ``R``/``L``/``A``/``P`` letters placed
    from the affine; the header names the subject and the convention, the legend each label.
    Size: :func:`mosaic_size_px`.

    Parameters
    ----------
    image, mask : Volume
        The scan and its label mask, on the same grid.
    labels : LabelTable
        The declared labels (colours and legend).
    subject : str, optional
        Shown in the header.
    levels : DataFrame, optional
        Slice-to-level table (``slice``, ``level``) for the tile titles.
    max_slices, ncols : int
        Most tiles (:func:`select_slices`) and tiles per row.
    opacity : float
        Label opacity (0-1); 0 draws no overlay.
    convention : {"radiological", "neurological"}
        Screen convention.

    Returns
    -------
    numpy.ndarray
        uint8 RGB pixels, black background.

    Raises
    ------
    GeometryMismatchError
        Image and mask are not on the same grid.
    """
    from PIL import Image, ImageDraw

    _check_pair(image, mask)
    view = axial_view(image.affine, convention)
    data = np.asarray(image.data)
    labels_data = np.asarray(mask.data)
    slices = select_slices(labels_data, view.slice_axis, max_slices)
    n_labels = len(labels.labels)
    width, height = mosaic_size_px(len(slices), n_labels, ncols)
    cols = max(1, min(ncols, len(slices)))
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    colours = label_colours(labels)
    lo, hi = _window(data)
    top = int(max(labels_data.max(initial=0), max(colours, default=0), 0))
    lut_rgb, lut_drawn = _colour_lut(top, colours)
    zooms = image.zooms_mm
    aspect = zooms[view.row_axis] / zooms[view.col_axis]
    level_of: dict[int, str] = {}
    if levels is not None and not levels.empty:
        level_of = dict(zip(levels["slice"].astype(int), levels["level"].astype(str), strict=True))
    right = patient_right_screen_side(image.affine, view)
    anterior = _anterior_screen_side(image.affine, view)
    boxes = []
    for i, k in enumerate(slices):
        plane = orient_slice(data, view, k)
        lab = orient_slice(labels_data, view, k)
        box_x, box_y = (i % cols) * TILE_PX, HEADER_PX + (i // cols) * TILE_PX
        img_h, img_w = _fit(plane.shape[0], plane.shape[1], aspect, TILE_PX - 4,
                            TILE_PX - _TILE_TITLE_PX - 4)
        rows_idx = _nearest_index(img_h, plane.shape[0])
        cols_idx = _nearest_index(img_w, plane.shape[1])
        grey = np.clip((plane[np.ix_(rows_idx, cols_idx)] - lo) / (hi - lo), 0.0, 1.0)
        rgb = np.repeat((grey * 255.0).astype(np.float32)[..., None], 3, axis=2)
        if opacity > 0:
            shown = np.clip(lab[np.ix_(rows_idx, cols_idx)], 0, top)
            on = lut_drawn[shown]
            rgb[on] = (1.0 - opacity) * rgb[on] + opacity * lut_rgb[shown[on]]
        x0 = box_x + (TILE_PX - img_w) // 2
        y0 = box_y + _TILE_TITLE_PX + (TILE_PX - _TILE_TITLE_PX - img_h) // 2
        canvas[y0 : y0 + img_h, x0 : x0 + img_w] = np.rint(rgb).astype(np.uint8)
        title = f"slice {k}" + (f" · {level_of[k]}" if k in level_of else "")
        boxes.append((box_x, box_y, x0, y0, img_w, img_h, title))
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    title_font, letter_font = _font(_TITLE_PX), _font(_LETTER_PX, bold=True)
    for box_x, box_y, x0, y0, img_w, img_h, title in boxes:
        draw.text((box_x + TILE_PX / 2, box_y + _TILE_TITLE_PX / 2), title, fill="white",
                  font=title_font, anchor="mm")
        left_x, right_x = x0 + 0.04 * img_w, x0 + 0.96 * img_w
        upper_y, lower_y = y0 + 0.05 * img_h, y0 + 0.95 * img_h
        mid_x, mid_y = x0 + img_w / 2, y0 + img_h / 2
        for text, xy in (
            ("R", (left_x if right == "left" else right_x, mid_y)),
            ("L", (right_x if right == "left" else left_x, mid_y)),
            ("A", (mid_x, upper_y if anterior == "top" else lower_y)),
            ("P", (mid_x, lower_y if anterior == "top" else upper_y)),
        ):
            draw.text(xy, text, fill=_YELLOW, font=letter_font, anchor="mm")
    head = f"{subject}  " if subject else ""
    draw.text(
        (width / 2, HEADER_PX / 2),
        f"{head}axial, {view.convention} view: patient's right on screen {right}, anterior up",
        fill="white",
        font=_font(_HEADER_TEXT_PX),
        anchor="mm",
    )
    if n_labels:
        legend_font = _font(_LEGEND_TEXT_PX)
        legend_top = height - math.ceil(n_labels / LEGEND_COLUMNS) * LEGEND_ROW_PX
        column_w = width / LEGEND_COLUMNS
        for j, lab in enumerate(labels.labels):
            x = (j % LEGEND_COLUMNS) * column_w + 8
            y = legend_top + (j // LEGEND_COLUMNS) * LEGEND_ROW_PX + LEGEND_ROW_PX / 2
            fill = tuple(round(255 * c) for c in colours.get(lab.value, (1.0, 1.0, 1.0)))
            draw.rectangle((x, y - 5, x + 16, y + 5), fill=fill)
            draw.text((x + 22, y), _name(lab), fill="white", font=legend_font, anchor="lm")
    return np.asarray(picture)


def _png(pixels: NDArray[np.uint8]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)
    return buf.getvalue()


#: zlib level of directly composed mosaics: 1 encodes in a third of the default level 6's time
#: (41 against 128 ms on the example scan's mosaic) at the size of the matplotlib PNG (574 kB).
_PNG_COMPRESS_LEVEL = 1


def _figure_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, facecolor=fig.get_facecolor())
    return buf.getvalue()


def mosaic_png_bytes(
    image: Volume, mask: Volume, labels: LabelTable, *, renderer: str = "direct", **kwargs: Any
) -> bytes:
    """The overlay mosaic as PNG bytes (for ``IPython.display.Image`` or base64 embedding).

    ``renderer`` is ``"direct"`` (:func:`compose_mosaic`, the default) or ``"matplotlib"``
    (:func:`render_mosaic`); the other keyword arguments are theirs.
    """
    if renderer == "direct":
        return _png(compose_mosaic(image, mask, labels, **kwargs))
    if renderer == "matplotlib":
        return _figure_png(render_mosaic(image, mask, labels, **kwargs))
    msg = f"renderer must be 'direct' or 'matplotlib', got {renderer!r}"
    raise ValueError(msg)


def save_mosaic(
    image: Volume, mask: Volume, labels: LabelTable, out_png: str | Path, **kwargs: Any
) -> Path:
    """Write the overlay mosaic PNG atomically and return its path.

    Keyword arguments are those of :func:`mosaic_png_bytes` (``renderer``) and
    :func:`compose_mosaic` (``subject``, ``levels``, ``max_slices``, ``ncols``, ``opacity``,
    ``convention``).
    """
    data = mosaic_png_bytes(image, mask, labels, **kwargs)
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        tmp.write_bytes(data)
    return out_png


def render_slice(
    image: Volume,
    mask: Volume,
    labels: LabelTable,
    index: int,
    *,
    opacity: float = 0.45,
    convention: str = "radiological",
    size_px: int = 480,
    title: str = "",
) -> bytes:
    """One axial slice with its overlay as PNG bytes (used by the widget browser)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    _check_pair(image, mask)
    view = axial_view(image.affine, convention)
    n = image.data.shape[view.slice_axis]
    if not 0 <= index < n:
        msg = f"slice {index} is outside the stack (0-{n - 1})"
        raise ValueError(msg)
    fig = Figure(figsize=(size_px / _DPI, size_px / _DPI), dpi=_DPI, facecolor="black")
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 0.93))
    _draw_tile(
        ax,
        image,
        mask,
        view,
        index,
        label_colours(labels),
        _window(np.asarray(image.data)),
        opacity,
        title or f"slice {index}",
    )
    return _figure_png(fig)


# --------------------------------------------------------------------------------------------
# Friendly layer: files in, qc.csv out
# --------------------------------------------------------------------------------------------


def cases_frame(
    cases: pd.DataFrame | Mapping[str, Any],
    required: Sequence[str] = ("subject", "mask"),
    what: str = "QC cases table",
    *,
    allow_empty: bool = True,
) -> pd.DataFrame:
    """The cases as a table with a ``subject`` column (str) and the ``required`` columns.

    Parameters
    ----------
    cases : DataFrame or mapping
        A table, or ``{subject: {"image": ..., "mask": ..., ...}}`` or
        ``{subject: (image, mask)}``.
    required : sequence of str
        Columns the caller needs.
    what : str
        What the table is, for the error message.
    allow_empty : bool
        Accept a table without rows.

    Raises
    ------
    ConfigError
        A required column is missing, or there is no subject and ``allow_empty`` is false.
    """
    if isinstance(cases, Mapping):
        rows = []
        for subject, entry in cases.items():
            if isinstance(entry, Mapping):
                rows.append({"subject": subject, **entry})
            else:
                image, mask = entry
                rows.append({"subject": subject, "image": image, "mask": mask})
        cases = pd.DataFrame(rows)
    missing = set(required) - set(cases.columns)
    if missing:
        msg = f"{what} lacks the column(s) {sorted(missing)} (needs {', '.join(required)})"
        raise ConfigError(msg)
    if cases.empty and not allow_empty:
        msg = f"{what}: no subjects to show"
        raise ConfigError(msg)
    return cases.assign(subject=cases["subject"].astype(str)).reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# Reviewer decisions
# --------------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _read_raw(path: Path) -> pd.DataFrame:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as exc:
        raise InputFileError(path, "decisions file not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise InputFileError(path, f"cannot read decisions file ({exc})") from exc
    first = text.splitlines()[0] if text.strip() else ""
    sep = ";" if ("," not in first and ";" in first) else ","  # spreadsheet locales
    try:
        df = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise InputFileError(path, f"not a readable CSV table ({exc})") from exc
    df.columns = [str(c).strip() for c in df.columns]
    return df


def read_decisions(path: str | Path) -> pd.DataFrame:
    """Read and validate the reviewer's decisions file.

    Returns
    -------
    DataFrame
        Columns :data:`DECISION_COLUMNS` (plus any extra columns the reviewer added), all text;
        ``decision`` normalised to lower case.

    Raises
    ------
    InputFileError
        Naming the file and, for bad content, the row (spreadsheet numbering: the header is row
        1) and column: missing file or column, empty subject, a subject listed twice, or a
        decision other than ``include``/``exclude``.
    """
    path = Path(path)
    df = _read_raw(path)
    missing = [c for c in DECISION_COLUMNS if c not in df.columns]
    if missing:
        msg = (
            f"missing column(s) {', '.join(repr(c) for c in missing)} "
            f"(expected {', '.join(DECISION_COLUMNS)})"
        )
        raise InputFileError(path, msg)
    df = df.map(lambda v: v.strip() if isinstance(v, str) else v)
    seen: dict[str, int] = {}
    for i, r in enumerate(df.itertuples(index=False)):
        row = i + 2
        if not r.subject:
            raise InputFileError(path, f"row {row}, column 'subject': empty subject ID")
        if r.subject in seen:
            msg = (
                f"row {row}, column 'subject': subject {r.subject!r} already listed on row "
                f"{seen[r.subject]}"
            )
            raise InputFileError(path, msg)
        seen[r.subject] = row
        if r.decision.lower() not in DECISIONS:
            msg = (
                f"row {row}, column 'decision': {r.decision!r} is not one of {', '.join(DECISIONS)}"
            )
            raise InputFileError(path, msg)
    df["decision"] = df["decision"].str.lower()
    return df


def _write_decisions(path: Path, df: pd.DataFrame) -> None:
    cols = list(DECISION_COLUMNS) + [c for c in df.columns if c not in DECISION_COLUMNS]
    atomic_write_text(path, df[cols].to_csv(index=False))


#: Extra columns of ``qc_decisions.csv`` written when QC knows each subject's inputs:
#:
#: - ``inputs``: fingerprint of the inputs the decision was taken on (``mask=..;image=..;...``,
#:   first 12 hex digits of each sha256; ``settings`` covers the QC settings and label file);
#: - ``qc_inputs``: fingerprint of the inputs of the latest QC;
#: - ``stale``: empty, or which inputs changed since a reviewer's decision (the decision is
#:   kept and still honoured: look again).
INPUT_COLUMNS = ("inputs", "qc_inputs", "stale")


def inputs_fingerprint(parts: Mapping[str, Any]) -> str:
    """Compact fingerprint of a subject's QC inputs, e.g. ``'image=3fa9..;mask=91bc..'``.

    Parameters
    ----------
    parts : mapping
        Input name -> sha256 hex digest (or any value: non-strings are hashed as JSON; None
        is written as ``-``).

    Examples
    --------
    >>> inputs_fingerprint({"mask": "a" * 64, "image": None})
    'image=-;mask=aaaaaaaaaaaa'
    """
    import hashlib
    import json

    out = []
    for key in sorted(parts):
        value = parts[key]
        if value is None:
            digest = "-"
        elif isinstance(value, str):
            digest = value[:12]
        else:
            text = json.dumps(value, sort_keys=True, default=str).encode()
            digest = hashlib.sha256(text).hexdigest()[:12]
        out.append(f"{key}={digest}")
    return ";".join(out)


def _changed_inputs(old: str, new: str) -> list[str]:
    def parse(text: str) -> dict[str, str]:
        return dict(p.split("=", 1) for p in text.split(";") if "=" in p)

    a, b = parse(old), parse(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def init_decisions(
    qc_summary: pd.DataFrame,
    path: str | Path,
    *,
    inputs: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Create or update ``qc_decisions.csv`` from the QC summary; a reviewer's rows are kept.

    - Subjects not yet listed are appended with the decision QC suggests: ``exclude`` when
      their QC status is ``fail``, else ``include``; reviewer ``auto-qc``; the QC reasons; the
      current UTC time.
    - Rows of reviewer ``auto-qc`` are automatic: they are re-derived from the current QC
      whenever its suggestion, reasons or the subject's inputs changed (a corrected mask is no
      longer excluded by the old mask's ``fail``).
    - Rows of any other reviewer are never changed, except for the :data:`INPUT_COLUMNS`:
      ``qc_inputs`` follows the latest QC, and ``stale`` names the inputs that changed since the
      decision (``inputs``).  The decision itself stays in force.

    When nothing changed the file is not rewritten.

    Parameters
    ----------
    qc_summary : DataFrame
        :func:`summarize_qc` output (``subject``, ``status``, ``reasons``).
    path : path
        The decisions file.
    inputs : mapping, optional
        Subject -> :func:`inputs_fingerprint` of its QC inputs (mask, image, settings, ...).
        Without it the :data:`INPUT_COLUMNS` are not written.

    Returns
    -------
    DataFrame
        The decisions as now on disk (see :func:`read_decisions`).
    """
    path = Path(path)
    if path.exists():
        read_decisions(path)  # validate before changing anything
        raw = _read_raw(path)
    else:
        raw = pd.DataFrame(columns=DECISION_COLUMNS)
    raw = raw.astype(object).fillna("")
    # issue 16: an auto-qc row made from a QC that could not run is no decision: drop it
    dropped = raw.loc[_infrastructure_rows(raw), "subject"].astype(str).str.strip().tolist()
    if dropped:
        log.warning("decisions: %d auto-qc rows came from a QC that could not run (%s); "
                    "re-seeded from this QC", len(dropped), ", ".join(sorted(dropped)[:5]))
        raw = raw[~_infrastructure_rows(raw)].reset_index(drop=True)
    if inputs is not None:
        for col in INPUT_COLUMNS:
            if col not in raw.columns:
                raw[col] = ""
    index = {str(s).strip(): i for i, s in enumerate(raw["subject"])}
    new_rows = []
    n_updated = 0
    stamp = _now()
    for r in qc_summary.itertuples(index=False):
        subject = str(r.subject)
        decision = "exclude" if r.status == "fail" else "include"
        reason = f"QC {r.status}" + (f": {r.reasons}" if getattr(r, "reasons", "") else "")
        fp = None if inputs is None else inputs.get(subject)
        if subject not in index:
            index[subject] = -1
            row = {
                "subject": subject,
                "decision": decision,
                "reviewer": AUTO_REVIEWER,
                "reason": reason,
                "timestamp": stamp,
            }
            if inputs is not None:
                row.update({"inputs": fp or "", "qc_inputs": fp or "", "stale": ""})
            new_rows.append(row)
            continue
        i = index[subject]
        if i < 0:
            continue  # listed twice in the summary
        before = raw.loc[i].to_dict()
        if str(before["reviewer"]).strip() == AUTO_REVIEWER:
            if before["decision"].strip().lower() != decision or before["reason"] != reason:
                raw.loc[i, ["decision", "reason", "timestamp"]] = [decision, reason, stamp]
            if fp is not None:
                raw.loc[i, ["inputs", "qc_inputs", "stale"]] = [fp, fp, ""]
        elif fp is not None:
            decided_on = str(before.get("inputs", "")) or fp  # first time known: baseline
            changed = _changed_inputs(decided_on, fp)
            stale = (
                f"inputs changed since this decision: {', '.join(changed)}" if changed else ""
            )
            raw.loc[i, ["inputs", "qc_inputs", "stale"]] = [decided_on, fp, stale]
        if raw.loc[i].to_dict() != before:
            n_updated += 1
    if not new_rows and not n_updated and not dropped and path.exists():
        return read_decisions(path)
    added = pd.DataFrame(new_rows, columns=list(raw.columns))
    merged = pd.concat([raw, added], ignore_index=True).fillna("") if new_rows else raw
    _write_decisions(path, merged)
    log.info(
        "decisions: %d subjects added, %d updated in %s", len(new_rows), n_updated, path.name
    )
    return read_decisions(path)


#: Reason text of a QC row made because the QC task itself failed (not a finding).
QC_NOT_RUN = "QC could not run"


def _infrastructure_rows(decisions: pd.DataFrame) -> pd.Series:
    """Auto-qc rows whose only basis was a QC task that could not run (disk full, ...)."""
    if decisions.empty:
        return pd.Series(False, index=decisions.index)
    auto = decisions["reviewer"].astype(str) == AUTO_REVIEWER
    return auto & decisions["reason"].astype(str).str.contains(QC_NOT_RUN, regex=False)


def set_decision(
    path: str | Path, subject: str, decision: str, reviewer: str, reason: str = ""
) -> pd.DataFrame:
    """Record one reviewer decision (atomic rewrite; other rows kept as they are).

    Parameters
    ----------
    path : path
        The decisions file (created when missing).
    subject : str
        Subject ID; appended when not yet listed.
    decision : {"include", "exclude"}
    reviewer : str
        Who decided (required).
    reason : str
        Why.

    Returns
    -------
    DataFrame
        The decisions now on disk.

    Raises
    ------
    EsmaError
        Empty subject or reviewer, or a decision other than include/exclude.

    Notes
    -----
    When the file tracks inputs (:data:`INPUT_COLUMNS`), the decision is recorded as taken on
    the inputs of the latest QC (``qc_inputs``) and is no longer ``stale``.
    """
    path = Path(path)
    subject = str(subject).strip()
    decision = str(decision).strip().lower()
    reviewer = str(reviewer).strip()
    if not subject:
        msg = "set_decision: subject is empty"
        raise EsmaError(msg)
    if decision not in DECISIONS:
        msg = f"set_decision: decision {decision!r} is not one of {', '.join(DECISIONS)}"
        raise EsmaError(msg)
    if not reviewer:
        msg = "set_decision: reviewer name is required"
        raise EsmaError(msg)
    if path.exists():
        read_decisions(path)  # validate before rewriting
        df = _read_raw(path)
    else:
        df = pd.DataFrame(columns=DECISION_COLUMNS)
    record = {
        "subject": subject,
        "decision": decision,
        "reviewer": reviewer,
        "reason": str(reason).strip(),
        "timestamp": _now(),
    }
    hit = df["subject"].str.strip() == subject
    if "qc_inputs" in df.columns:
        # the reviewer decides on what QC last saw: that becomes the decision's inputs
        current = df.loc[hit, "qc_inputs"].iloc[0] if hit.any() else ""
        record.update({"inputs": current, "stale": ""})
    if hit.any():
        for key, value in record.items():
            df.loc[hit, key] = value
    else:
        df = pd.concat([df, pd.DataFrame([record])], ignore_index=True).fillna("")
    _write_decisions(path, df)
    return read_decisions(path)


def excluded_subjects(path: str | Path, *, missing_ok: bool = False) -> pd.DataFrame:
    """Subjects the reviewer excluded, with the reason (honoured by metrics and statistics).

    Parameters
    ----------
    path : path
        The decisions file.
    missing_ok : bool
        Return an empty table when the file does not exist (instead of raising).

    Returns
    -------
    DataFrame
        Columns ``subject``, ``reason`` (``reviewer: reason``), in file order.
    """
    path = Path(path)
    if missing_ok and not path.exists():
        return pd.DataFrame(columns=["subject", "reason"])
    df = read_decisions(path)
    ex = df[df["decision"] == "exclude"]
    reasons = [
        f"{r.reviewer}: {r.reason}" if r.reason else f"{r.reviewer}: (no reason given)"
        for r in ex.itertuples(index=False)
    ]
    return pd.DataFrame({"subject": ex["subject"].tolist(), "reason": reasons})
