"""Muscle area, fat infiltration, functional area and left/right asymmetry of one scan.

Given an axial T2 image, a muscle label mask on the same grid and its label file, :func:`measure`
returns, per muscle and side:

- per slice: ``csa_mm2`` (mask area), ``fat_pct`` (mean per-voxel fat fraction x 100) and
  ``fcsa_mm2 = csa_mm2 * (1 - fat_pct / 100)`` (functional, lean area);
- per vertebral level and for the whole stack (``level = "all"``): ``csa_mm2`` = mean per-slice
  area over the slices where the muscle is present, ``fat_pct`` pooled over all its voxels (not
  the mean of the per-slice percentages), ``fcsa_mm2`` from those two, ``n_slices``;
- per level and muscle, the asymmetry indices ``cdi``, ``cdi_abs``, ``lfiar``, ``lfiar_log``.

Formulas (defaults; configurable in :class:`MetricsSettings`; computed by, and stated in the
reports from, the registries of :mod:`helpers.formulas`)
------------------------------------------------------------------------------------------
The study this toolkit follows (ISMRM 2024 #5045) did not publish its formulas, so these are
documented choices, not the study's own:

- ``cdi = (FCSA_L - FCSA_R) / ((FCSA_L + FCSA_R) / 2)`` (normalized difference;
  ``cdi_formula="normalized_difference"``) or ``ln(FCSA_L / FCSA_R)`` (``"log_ratio"``);
  ``cdi_abs = |cdi|``.
- ``lfiar = FI_L / max(FI_R, floor)`` with FI the fat infiltration in % and a floor of
  ``lfiar_floor_pct`` (default 0.5 %) so lean muscle does not divide by ~0
  (``lfiar_formula="ratio"``), or ``(FI_L - FI_R) / ((FI_L + FI_R) / 2)``
  (``"normalized_difference"``).  ``lfiar_log = ln(max(FI_L, floor) / max(FI_R, floor))``: the
  log of the same ratio with the floor applied to both sides, so it stays finite when the left
  side is lean and changes sign (exactly) when the sides are swapped.
- When clinical data give each subject's curve convex side, :func:`to_convex_concave` adds the
  same indices convex-vs-concave.

Left and right always come from the label file's sides (the anatomy), never from array order;
unsided labels are split by anatomy in world coordinates (:func:`helpers.labels.split_sides`).
Areas use the in-plane voxel area from the affine (mm2); slices are cut across the axis that
runs closest to superior-inferior, whatever the storage order.

Flags (``flags`` column, ``;``-joined)
--------------------------------------
``absent``
    The label file declares the muscle but the mask lacks it here (whole subject or level):
    numbers NaN, never 0.
``truncated``
    The muscle touches the in-plane border of the image on that slice, so its cross-section is
    cut by the field of view: the slice's numbers are NaN and it is left out of the aggregates.
    On an aggregate row: every slice was truncated (numbers NaN).
``some_slices_truncated``
    Aggregate row computed from the slices left after dropping truncated ones.
``z_edge``
    Aggregate row of a muscle present on the first or last slice of the stack: it continues
    beyond the scanned range, so the aggregate describes the scanned part only (each slice's
    area is still complete).  With ``edge_rule="any"`` these rows are NaN and ``truncated``.
``psoas_t2_unreliable``
    Psoas rows: no method measured psoas fat on T2 reliably (Wesselink et al. 2024,
    N Am Spine Soc J 17:100313, ICC <= 0.01).  Its area and the other muscles are unaffected.
``fat_reference_collapsed``
    The fat classification found no fat cluster and used the half-way threshold (see
    :mod:`helpers.fat`).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from helpers import fat, formulas
from helpers.errors import ConfigError, InputFileError, LabelError
from helpers.files import atomic_write_text
from helpers.labels import LabelTable, load_labels
from helpers.nifti import (
    Volume,
    check_axial_stack,
    check_same_grid,
    load_image,
    load_mask,
    slice_axis,
    subject_from_filename,
    voxel_area_mm2,
)
from helpers.validate import SettingError, check_choice, check_settings_mapping

__all__ = [
    "ASYMMETRY_COLUMNS",
    "CDI_FORMULAS",
    "EDGE_RULES",
    "FLAGS",
    "LFIAR_FORMULAS",
    "METRICS_COLUMNS",
    "PSOAS_CAVEAT",
    "REFERENCE_SCOPES",
    "MeasureResult",
    "MetricsSettings",
    "measure",
    "measure_files",
    "read_levels",
    "to_convex_concave",
    "write_result",
]

log = logging.getLogger(__name__)

#: Columns of ``metrics.csv``, in order.
METRICS_COLUMNS = (
    "subject",
    "level",
    "slice",
    "muscle",
    "side",
    "n_slices",
    "n_voxels",
    "csa_mm2",
    "fat_pct",
    "fcsa_mm2",
    "method",
    "flags",
)
#: Columns of ``asymmetry.csv``, in order.
ASYMMETRY_COLUMNS = (
    "subject",
    "level",
    "muscle",
    "cdi",
    "cdi_abs",
    "lfiar",
    "lfiar_log",
    "lfiar_floor_pct",
    "fcsa_left_mm2",
    "fcsa_right_mm2",
    "fat_pct_left",
    "fat_pct_right",
    "method",
    "flags",
)
#: The whole stack's level name.
ALL_LEVELS = "all"
#: Names of the CDI and LFIAR formulas (the registries :data:`helpers.formulas.CDI` and
#: :data:`helpers.formulas.LFIAR` compute them and give the reports their text).
CDI_FORMULAS = tuple(formulas.CDI)
LFIAR_FORMULAS = tuple(formulas.LFIAR)
REFERENCE_SCOPES = ("subject", "level")
#: ``inplane``: slices cut by the in-plane image border are NaN and dropped from aggregates;
#: ``any``: also aggregates of muscles reaching the first/last slice are NaN;
#: ``none``: flag only, never drop.
EDGE_RULES = ("inplane", "any", "none")
FLAGS = (
    "absent",
    "truncated",
    "some_slices_truncated",
    "z_edge",
    "psoas_t2_unreliable",
    "fat_reference_collapsed",
)
#: The published caveat carried by every psoas row.
PSOAS_CAVEAT = (
    "psoas fat infiltration on T2 is not reliable: no method reached ICC > 0.01 "
    "(Wesselink et al. 2024, N Am Spine Soc J 17:100313)"
)
_VERTEBRA_PREFIX = "vertebra_"


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetricsSettings:
    """How one scan is measured.  Validated on creation (:class:`helpers.validate.SettingError`
    carrying the key).

    A study YAML embeds these under its ``metrics:`` key (:meth:`from_mapping`).

    Attributes
    ----------
    fat_method : str
        Fat classification method, one of :data:`helpers.fat.FAT_METHODS`; default
        :data:`helpers.fat.DEFAULT_FAT_METHOD` (chosen from phantom accuracy).
    bias_correction : bool
        Run N4 bias-field correction before classifying fat (default True).
    reference_scope : str
        Fit the fat reference once per ``"subject"`` (default) or once per subject and
        ``"level"`` (slices without a level use the subject-wide fit).  Always both sides pooled.
    pool_psoas : bool
        Include psoas voxels in the pooled fat reference fit (default False: psoas lies
        anteriorly, far from the paraspinal muscles and the spine coil, its fat is not
        measurable reliably on T2, and pooling it made every method slightly less accurate on
        the phantoms, e.g. ``unmix`` 0.23 vs 0.19 pp mean absolute error; see
        ``benchmarks/results/fat_methods.json``).  Psoas is measured either way.
    lfiar_floor_pct : float
        Floor (%) of the LFIAR denominator (default 0.5).
    cdi_formula : str
        One of :data:`CDI_FORMULAS` (default ``"normalized_difference"``).
    lfiar_formula : str
        One of :data:`LFIAR_FORMULAS` (default ``"ratio"``).
    edge_rule : str
        Field-of-view edge rule, one of :data:`EDGE_RULES` (default ``"inplane"``).
    n4_fit_spacing_mm : float
        N4 fits on a copy shrunk to about this voxel spacing (mm; default 7.5, i.e. a shrink of
        8 for 0.94 mm voxels, 3 for 2.5 mm ones); the field is then evaluated at full
        resolution (about 2 s of CPU per realistic scan).  A coarser grid is cheaper but less
        accurate on the phantoms (``benchmarks/results/n4_speed.json``: 10 mm and 15 mm
        grids raise the worst CDI error), so 7.5 mm stays the default.
    n4_iterations : tuple of int
        N4 iterations per fitting level (default (50, 50, 50)).
    side_check : bool
        Refuse a sided label file whose right label lies to the patient's left of its left twin
        (world x; default True).  False measures anyway (the asymmetries' signs then follow the
        label file, not the anatomy).  Kept out of :meth:`to_dict` while True: it changes no
        number of a scan that passes.

    Examples
    --------
    >>> MetricsSettings.from_mapping({"fat_method": "gmm3", "bias_correction": False}).fat_method
    'gmm3'
    >>> MetricsSettings.from_mapping({"fat_method": "gmm4"})
    Traceback (most recent call last):
    ...
    helpers.validate.SettingError: fat_method: 'gmm4' is not one of unmix, gmm3, gmm2, kmeans2, otsu (did you mean 'gmm3'?)
    """

    fat_method: str = fat.DEFAULT_FAT_METHOD
    bias_correction: bool = True
    reference_scope: str = "subject"
    pool_psoas: bool = False
    lfiar_floor_pct: float = formulas.DEFAULT_LFIAR_FLOOR_PCT
    cdi_formula: str = formulas.DEFAULT_CDI_FORMULA
    lfiar_formula: str = formulas.DEFAULT_LFIAR_FORMULA
    edge_rule: str = "inplane"
    n4_fit_spacing_mm: float = 7.5
    n4_iterations: tuple[int, ...] = (50, 50, 50)
    side_check: bool = True

    def __post_init__(self) -> None:
        check_choice("fat_method", self.fat_method, fat.FAT_METHODS)
        check_choice("reference_scope", self.reference_scope, REFERENCE_SCOPES)
        check_choice("cdi_formula", self.cdi_formula, CDI_FORMULAS)
        check_choice("lfiar_formula", self.lfiar_formula, LFIAR_FORMULAS)
        check_choice("edge_rule", self.edge_rule, EDGE_RULES)
        for key in ("bias_correction", "pool_psoas", "side_check"):
            if not isinstance(getattr(self, key), bool):
                msg = f"must be true or false, got {getattr(self, key)!r}"
                raise SettingError(key, msg)
        floor = self.lfiar_floor_pct
        if isinstance(floor, bool) or not isinstance(floor, int | float) or not (
            0 < float(floor) < 100
        ):
            msg = f"must be a number of percent in (0, 100), got {floor!r}"
            key = "lfiar_floor_pct"
            raise SettingError(key, msg)
        object.__setattr__(self, "lfiar_floor_pct", float(floor))
        sp = self.n4_fit_spacing_mm
        if isinstance(sp, bool) or not isinstance(sp, int | float) or not 0 < float(sp) <= 50:
            msg = f"must be a spacing in mm in (0, 50], got {sp!r}"
            key = "n4_fit_spacing_mm"
            raise SettingError(key, msg)
        object.__setattr__(self, "n4_fit_spacing_mm", float(sp))
        its = self.n4_iterations
        if isinstance(its, int) and not isinstance(its, bool):
            its = (its,)
        if (
            not isinstance(its, list | tuple)
            or not its
            or len(its) > 6
            or any(isinstance(i, bool) or not isinstance(i, int) or not 1 <= i <= 1000 for i in its)
        ):
            msg = (
                "must be a list of 1-6 integers from 1 to 1000 (iterations per "
                f"fitting level), got {self.n4_iterations!r}"
            )
            key = "n4_iterations"
            raise SettingError(key, msg)
        object.__setattr__(self, "n4_iterations", tuple(int(i) for i in its))

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> MetricsSettings:
        """Build from a mapping (e.g. the ``metrics:`` section of a study YAML).

        Raises
        ------
        SettingError
            Unknown key (with the closest known one), or an invalid value, naming the key.
        """
        if mapping is None:
            return cls()
        check_settings_mapping(mapping, [f.name for f in fields(cls)], section="metrics")
        return cls(**dict(mapping))

    def fat_settings(self) -> fat.FatSettings:
        """The settings of the fat step (:func:`helpers.fat.fat_step`)."""
        return fat.FatSettings(
            method=self.fat_method, bias_correction=self.bias_correction,
            n4_fit_spacing_mm=self.n4_fit_spacing_mm, n4_iterations=self.n4_iterations,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record (what ``reference.json`` stores)."""
        out = asdict(self)
        out["n4_iterations"] = list(self.n4_iterations)
        if self.side_check:  # the default changes no number: keep records as before
            del out["side_check"]
        return out


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class MeasureResult:
    """What :func:`measure` returns.

    Attributes
    ----------
    metrics : DataFrame
        Columns :data:`METRICS_COLUMNS`; aggregate rows (``slice`` NA) for ``"all"`` and each
        level, then per-slice rows.
    asymmetry : DataFrame
        Columns :data:`ASYMMETRY_COLUMNS`, one row per level and muscle.
    reference : dict
        JSON-ready: fat method, scope, fitted thresholds / tissue intensities, bias-correction
        effect, settings, timings.
    fat_fraction : ndarray or None
        Per-voxel fat fraction (0-1, clipped) on the image grid, NaN outside the muscles.
    """

    metrics: pd.DataFrame
    asymmetry: pd.DataFrame
    reference: dict[str, Any]
    fat_fraction: NDArray[np.float32] | None = field(default=None, repr=False)


# --------------------------------------------------------------------------------------------
# Levels
# --------------------------------------------------------------------------------------------

_LEVEL_RE = re.compile(r"^([CTLS])(\d+)$", re.IGNORECASE)
_REGION_ORDER = {"C": 0, "T": 1, "L": 2, "S": 3}


def _level_key(name: str) -> tuple[int, int, str]:
    m = _LEVEL_RE.match(name.strip())
    if m:
        return (_REGION_ORDER[m.group(1).upper()], int(m.group(2)), name)
    return (9, 0, name)


def read_levels(path: str | Path, subject: str | None = None) -> pd.DataFrame:
    """Read a slice->level CSV (columns ``slice``, ``level``, optionally ``subject``).

    ``slice`` is the 0-based index along the axial slice axis in the image file's own array
    order.  With a ``subject`` column, only that subject's rows are kept.

    Raises
    ------
    InputFileError
        Missing/unreadable file, missing columns, non-integer or duplicate slices, a level
        named ``all`` (reserved for the whole stack), or no rows for ``subject``; the message
        names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "levels file not found")
    try:
        table = pd.read_csv(path, dtype={"level": "string", "subject": "string"})
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InputFileError(path, f"not a readable CSV ({exc})") from exc
    table.attrs["path"] = str(path)
    return _clean_levels(table, subject, path)


def _clean_levels(table: pd.DataFrame, subject: str | None, where: Path | str) -> pd.DataFrame:
    missing = {"slice", "level"} - set(table.columns)
    if missing:
        msg = f"levels table lacks column(s) {sorted(missing)} (needs 'slice' and 'level')"
        raise InputFileError(where, msg)
    if "subject" in table.columns and subject is not None:
        table = table[table["subject"].astype("string") == subject]
        if table.empty:
            raise InputFileError(where, f"levels table has no rows for subject {subject!r}")
    slices = pd.to_numeric(table["slice"], errors="coerce")
    if slices.dtype == np.int64:  # the usual case (integers read from CSV): whole, never NaN
        bad = slices.to_numpy() < 0
    else:
        bad = (slices.isna() | (slices != np.round(slices)) | (slices < 0)).to_numpy(dtype=bool)
    if bad.any():
        first = table["slice"].iloc[int(np.argmax(bad))]
        msg = f"levels table: slice must be a non-negative integer, got {first!r}"
        raise InputFileError(where, msg)
    level = table["level"].astype("string")
    stripped = level.str.strip()
    keep = (level.notna() & (stripped != "")).to_numpy(dtype=bool)
    slice_arr = slices.astype(np.int64).to_numpy()[keep]
    _, first_seen = np.unique(slice_arr, return_index=True)
    dup = np.ones(slice_arr.size, dtype=bool)
    dup[first_seen] = False
    if dup.any():
        msg = f"levels table: slice {int(slice_arr[int(np.argmax(dup))])} is listed twice"
        raise InputFileError(where, msg)
    out = pd.DataFrame({"slice": slice_arr, "level": stripped.array[keep]})
    reserved = out["level"].str.lower() == ALL_LEVELS
    if reserved.any():  # issue 16: would give a second, different level=all row
        first = int(out["slice"].to_numpy()[int(np.argmax(reserved.to_numpy(dtype=bool)))])
        msg = (
            f"levels table: level {out['level'].iloc[int(np.argmax(reserved))]!r} (slice {first}) "
            f"is reserved for the whole-stack rows ({ALL_LEVELS!r}); name the level otherwise"
        )
        raise InputFileError(where, msg)
    out.attrs["path"] = str(where)
    return out


def _slice_levels(
    levels: pd.DataFrame | None,
    subject: str,
    n_slices: int,
    vertebra: dict[int, str],
    mask_moved: NDArray,
    *,
    clean: bool = True,
) -> tuple[list[str | None], str]:
    """Level name of each slice (None when unknown) and where the levels came from.

    ``clean=False``: ``levels`` is already the output of :func:`_clean_levels` for ``subject``.
    """
    if levels is not None:
        where = levels.attrs.get("path", "<levels table>")
        table = _clean_levels(levels, subject, where) if clean else levels
        too_big = table["slice"] >= n_slices
        if too_big.any():
            msg = (
                f"levels table: slice {int(table.loc[too_big, 'slice'].iloc[0])} is outside the "
                f"image's {n_slices} slices (0-{n_slices - 1})"
            )
            raise InputFileError(where, msg)
        out: list[str | None] = [None] * n_slices
        for s, lev in zip(table["slice"], table["level"], strict=True):
            out[int(s)] = str(lev)
        return out, "table"
    if vertebra:
        out = [None] * n_slices
        for k in range(n_slices):
            sl = mask_moved[..., k]
            counts = {name: int(np.count_nonzero(sl == v)) for v, name in vertebra.items()}
            best = max(counts, key=lambda n: counts[n])
            if counts[best] > 0:
                out[k] = best
        return out, "vertebra_labels"
    return [None] * n_slices, "none"


# --------------------------------------------------------------------------------------------
# Asymmetry formulas
# --------------------------------------------------------------------------------------------


def _cdi(left: NDArray | float, right: NDArray | float, formula: str) -> NDArray:
    return formulas.cdi(left, right, formula)


def _lfiar(
    left: NDArray | float, right: NDArray | float, floor: float, formula: str
) -> tuple[NDArray, NDArray]:
    return formulas.lfiar(left, right, floor, formula)


# --------------------------------------------------------------------------------------------
# The measurement
# --------------------------------------------------------------------------------------------


def _is_psoas(muscle: str) -> bool:
    return "psoas" in muscle.lower()


def _unique_values(data: NDArray) -> NDArray:
    """Sorted distinct values of an array (``np.unique``; by counting for small non-negative
    integers, which avoids sorting the whole volume)."""
    arr = np.asarray(data)
    if arr.dtype.kind in "iu" and arr.size:
        flat = arr.ravel(order="K")  # memory order: no copy
        lo, hi = int(flat.min()), int(flat.max())
        if lo >= 0 and hi <= 65535:
            return np.flatnonzero(np.bincount(flat, minlength=hi + 1)).astype(arr.dtype)
    return np.unique(arr)


def _labelled(mask: NDArray) -> tuple[NDArray[np.intp], NDArray]:
    """Flat C-order indices of the non-zero voxels of a label mask, and their values."""
    flat = np.ravel(mask)
    idx = np.flatnonzero(flat)
    return idx, flat[idx]


def _present_values(mask: NDArray, labelled: tuple[NDArray, NDArray]) -> NDArray:
    """``_unique_values(mask)`` from :func:`_labelled` (the distinct non-zero values, and 0 when
    any voxel is 0)."""
    idx, values = labelled
    found = _unique_values(values)
    if idx.size < np.size(mask):
        found = np.unique(np.concatenate([found, np.zeros(1, dtype=found.dtype)]))
    return found


def _isin(arr: NDArray, values: list[int]) -> NDArray[np.bool_]:
    """``np.isin(arr, values)``; by table look-up for a non-negative integer array."""
    if arr.dtype.kind in "iu" and values and arr.size:
        top = max(int(arr.max()), max(values))
        if int(arr.min()) >= 0 and top <= 65535:
            member = np.zeros(top + 1, dtype=bool)
            member[values] = True
            return member[arr]
    return np.isin(arr, values)


def _split_unsided(
    mask: NDArray, affine: NDArray[np.float64], labels: LabelTable
) -> tuple[NDArray, LabelTable]:
    from helpers.labels import split_sides

    sided_mask, sided_labels = split_sides(mask, affine, labels)
    return np.asarray(sided_mask), sided_labels


def measure(
    image: Volume,
    mask: Volume,
    labels: LabelTable,
    *,
    subject: str,
    settings: MetricsSettings | None = None,
    levels: pd.DataFrame | None = None,
) -> MeasureResult:
    """Measure CSA, fat infiltration, FCSA and asymmetry of one scan.

    Parameters
    ----------
    image : Volume
        Axial T2 intensities (3-D).
    mask : Volume
        Integer label mask on the image's grid.
    labels : LabelTable
        Label file of the mask; unsided labels are split into left/right by anatomy, labels
        named ``vertebra_<LEVEL>`` (optional) give slice levels and are not measured.
    subject : str
        Subject ID written in every row.
    settings : MetricsSettings, optional
        Default :class:`MetricsSettings`.
    levels : DataFrame, optional
        Slice->level table (``slice``, ``level``, optionally ``subject``).

    Returns
    -------
    MeasureResult

    Raises
    ------
    GeometryMismatchError
        Mask not on the image's grid.
    LabelError
        Mask values the label file does not declare.
    InputFileError
        Fat-suppressed image, no muscle voxels, bad levels table.
    """
    return _measure(image, mask, labels, subject=subject, settings=settings, levels=levels)


def _measure(
    image: Volume,
    mask: Volume,
    labels: LabelTable,
    *,
    subject: str,
    settings: MetricsSettings | None = None,
    levels: pd.DataFrame | None = None,
    levels_clean: bool = False,
) -> MeasureResult:
    """:func:`measure`; ``levels_clean``: ``levels`` comes straight from :func:`read_levels`
    for this subject (already validated, so it is not cleaned twice)."""
    settings = settings or MetricsSettings()
    t_start = time.perf_counter()
    for vol, what in ((image, "image"), (mask, "mask")):
        if np.ndim(vol.data) != 3:
            where = vol.path or Path(f"<{what}>")
            msg = f"expected a 3-D volume, got {np.ndim(vol.data)}-D data of shape {np.shape(vol.data)}"
            raise InputFileError(where, msg)
    check_same_grid(image, mask)
    check_axial_stack(image.affine, image.path)  # issue 16: sagittal/coronal/oblique refused
    n_bad = int(np.count_nonzero(~np.isfinite(image.data)))
    if n_bad:
        raise InputFileError(image.path or Path("<image>"), f"{n_bad} voxels are NaN or infinite")
    # C order once: every boolean selection, ravel and labelling below works in C order.
    mask_arr = fat.c_order(mask.data)
    labelled = _labelled(mask_arr)
    labels.check_values(_present_values(mask_arr, labelled), mask.path)
    where_image = image.path or Path("<image>")
    affine = image.affine

    # Vertebra labels give levels and are not measured.
    vertebra = {
        lab.value: lab.muscle[len(_VERTEBRA_PREFIX) :]
        for lab in labels.labels
        if lab.muscle.lower().startswith(_VERTEBRA_PREFIX)
    }
    muscle_labels = tuple(lab for lab in labels.labels if lab.value not in vertebra)
    if not muscle_labels:
        raise LabelError(labels.path or Path("<labels>"), "label file declares no muscles")
    vertebra_arr = mask_arr
    if vertebra:
        mask_arr = np.where(np.isin(mask_arr, list(vertebra)), 0, mask_arr).astype(mask_arr.dtype)
    table = LabelTable(muscle_labels, labels.path)
    if settings.side_check and table.is_sided():
        _refuse_swapped_sides(mask_arr, affine, table, mask.path)
    if not table.is_sided():
        mask_arr, table = _split_unsided(mask_arr, affine, table)
        mask_arr = np.ascontiguousarray(mask_arr)
    if mask_arr is not vertebra_arr:
        labelled = _labelled(mask_arr)

    ax = slice_axis(affine)
    area = voxel_area_mm2(affine, ax)
    img = fat.c_order(image.data, np.float32)
    muscle = mask_arr > 0
    # Flat (C-order) indices of the muscle voxels: gathering through them gives the values in
    # the order boolean indexing with ``muscle`` gives, without a pass over the volume.
    muscle_idx = labelled[0][labelled[1] > 0]
    if not muscle_idx.size:
        msg = "mask holds none of the muscles its label file declares: nothing to measure"
        raise InputFileError(mask.path or Path("<mask>"), msg)
    n_z = img.shape[ax]
    slice_level, levels_source = _slice_levels(
        levels, subject, n_z, vertebra, np.moveaxis(vertebra_arr, ax, -1), clean=not levels_clean
    )

    # ---- the fat step: bias correction, reference tissues, fits (both sides pooled)
    reference: dict[str, Any] = {"subject": subject, "method": settings.fat_method,
                                 "scope": settings.reference_scope}
    pool_values = [lab.value for lab in table.labels if settings.pool_psoas or not _is_psoas(lab.muscle)]
    pool = np.zeros(img.size, dtype=bool)
    pool[labelled[0][_isin(labelled[1], pool_values)]] = True
    level_fits: list[tuple[str, NDArray[np.bool_]]] = []
    if settings.reference_scope == "level":
        names = sorted({lev for lev in slice_level if lev is not None}, key=_level_key)
        level_fits = [(n, np.array([lev == n for lev in slice_level])) for n in names]
    step = fat.fat_step(img, muscle, affine, settings.fat_settings(), pool=pool.reshape(img.shape),
                        levels=level_fits, path=where_image)
    reference.update(step.record)
    unclipped_map, fraction_map, collapsed_any = step.unclipped, step.fraction, step.collapsed
    reference["pooled_muscles"] = sorted(
        {lab.muscle for lab in table.labels if lab.value in set(pool_values)}
    )
    reference["levels_source"] = levels_source
    reference["psoas_caveat"] = PSOAS_CAVEAT
    reference["settings"] = settings.to_dict()
    reference["voxel_area_mm2"] = area
    reference["slice_axis"] = ax
    reference["orientation"] = "".join(image.axcodes)

    # ---- per slice and label sums
    metrics, asym = _tabulate(
        mask_arr, unclipped_map, table, ax, area, slice_level, subject, settings, collapsed_any,
        labelled=labelled,
    )
    reference["seconds"] = round(time.perf_counter() - t_start, 3)
    return MeasureResult(metrics, asym, reference, fraction_map)


def _refuse_swapped_sides(
    mask_arr: NDArray, affine: NDArray[np.float64], table: LabelTable, mask_path: Path | None
) -> None:
    """Raise :class:`LabelError` when the label file's sides contradict the anatomy (issue 16)."""
    from helpers.labels import side_contradictions

    wrong = side_contradictions(mask_arr, affine, table)
    if not wrong:
        return
    muscle, right, left, sep = wrong[0]
    mask_name = mask_path.name if mask_path else "the mask"
    more = f" (and {len(wrong) - 1} more muscles)" if len(wrong) > 1 else ""
    msg = (
        f"left and right contradict the anatomy in {mask_name}: the right {muscle} (label "
        f"{right}) lies {abs(sep):.1f} mm to the patient's left of the left one (label {left}; "
        f"world x, RAS+){more}; every asymmetry would change sign. Check the label file's "
        "sides and the image orientation, or measure anyway with --no-side-check "
        "(metrics.side_check: false)"
    )
    raise LabelError(table.path or mask_path or Path("<labels>"), msg)


def _flag_strings(bits: NDArray[np.bool_]) -> list[str]:
    """The ``flags`` text of each row of ``bits`` (n_rows x len(FLAGS)): the flags set on the
    row, ``;``-joined in :data:`FLAGS` order (empty when none)."""
    codes = bits.astype(np.int64) @ (1 << np.arange(len(FLAGS), dtype=np.int64))
    uniq, inverse = np.unique(codes, return_inverse=True)
    names = [";".join(f for j, f in enumerate(FLAGS) if int(c) >> j & 1) for c in uniq]
    return [names[i] for i in inverse.ravel()]


_FLAG = {f: j for j, f in enumerate(FLAGS)}


def _tabulate(
    mask_arr: NDArray,
    fraction: NDArray,
    table: LabelTable,
    ax: int,
    area: float,
    slice_level: list[str | None],
    subject: str,
    settings: MetricsSettings,
    collapsed: bool,
    labelled: tuple[NDArray, NDArray] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-slice and aggregate rows of every label, and the asymmetry table.

    One pass over the labelled voxels gives per-label, per-slice voxel counts and fat sums
    (``np.bincount`` over ``label * n_slices + slice`` codes); every row is then computed from
    those small arrays, column-wise, and each table is built once from its columns.
    ``labelled``: :func:`_labelled` of ``mask_arr`` when already known.
    """
    shape = np.shape(mask_arr)
    nz = shape[ax]
    p_ax, q_ax = (a for a in range(3) if a != ax)
    nx, ny = shape[p_ax], shape[q_ax]
    labs = list(table.labels)
    n_lab = len(labs)
    lut = np.full(int(max(lab.value for lab in labs)) + 1, -1, dtype=np.int64)
    for i, lab in enumerate(labs):
        lut[lab.value] = i
    # Labelled voxels in C order.  Within one (label, slice) bin that is the order of the
    # slice-last view too, so the per-bin sums below do not depend on the slice axis.
    idx, values = labelled if labelled is not None else _labelled(mask_arr)
    li = lut[values]
    keep = li >= 0
    idx, li = idx[keep], li[keep]
    coords = np.unravel_index(idx, shape)
    ii, jj, kk = coords[p_ax], coords[q_ax], coords[ax]
    key = li * nz + kk
    n_keys = n_lab * nz
    counts = np.bincount(key, minlength=n_keys).reshape(n_lab, nz)
    weights = np.ravel(fraction)[idx].astype(np.float64)
    fsum = np.bincount(key, weights=weights, minlength=n_keys).reshape(n_lab, nz)
    border = (ii == 0) | (ii == nx - 1) | (jj == 0) | (jj == ny - 1)
    touch = np.bincount(key[border], minlength=n_keys).reshape(n_lab, nz) > 0
    present = counts > 0
    drop = touch & present if settings.edge_rule in ("inplane", "any") else np.zeros_like(touch)
    valid = present & ~drop
    psoas = np.array([_is_psoas(lab.muscle) for lab in labs], dtype=bool)
    muscles = [lab.muscle for lab in labs]
    sides = [lab.side for lab in labs]

    # ---- aggregate rows: groups ("all", then each level) x labels, group-major
    level_names = sorted({lev for lev in slice_level if lev is not None}, key=_level_key)
    gsel = np.ones((1 + len(level_names), nz), dtype=bool)
    for g, name in enumerate(level_names, start=1):
        gsel[g] = [lev == name for lev in slice_level]
    n_g = gsel.shape[0]
    edge_slices = np.zeros(nz, dtype=bool)
    edge_slices[[0, nz - 1]] = True
    p = present[None, :, :] & gsel[:, None, :]  # (group, label, slice)
    v = valid[None, :, :] & gsel[:, None, :]
    any_p, any_v = p.any(axis=2), v.any(axis=2)
    any_drop = (drop[None, :, :] & gsel[:, None, :]).any(axis=2)
    at_edge = (p & edge_slices).any(axis=2)
    n_slices = v.sum(axis=2)
    n_vox = (counts[None, :, :] * v).sum(axis=2)
    measured = any_p & any_v
    some_cut = measured & any_drop
    edge_cut = measured & at_edge & (settings.edge_rule == "any")
    nan_row = ~measured | edge_cut
    bits = np.zeros((n_g, n_lab, len(FLAGS)), dtype=bool)
    bits[..., _FLAG["absent"]] = ~any_p
    bits[..., _FLAG["truncated"]] = (any_p & ~any_v) | edge_cut
    bits[..., _FLAG["some_slices_truncated"]] = some_cut
    bits[..., _FLAG["z_edge"]] = at_edge
    bits[..., _FLAG["psoas_t2_unreliable"]] = psoas[None, :]
    bits[..., _FLAG["fat_reference_collapsed"]] = collapsed
    # Pooled fat: the sum of the kept slices' fat, summed as np.sum sums the selected slices.
    fs_agg = np.zeros((n_g, n_lab))
    for g, i in zip(*np.nonzero(~nan_row), strict=True):
        fs_agg[g, i] = fsum[i][v[g, i]].sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        csa_agg = n_vox / n_slices * area
        fp_agg = np.clip(100.0 * fs_agg / n_vox, 0.0, 100.0)
        fcsa_agg = csa_agg * (1 - fp_agg / 100.0)
    for arr in (csa_agg, fp_agg, fcsa_agg):
        arr[nan_row] = np.nan
    agg_level = np.repeat(np.array([ALL_LEVELS, *level_names], dtype=object), n_lab)

    # ---- per-slice rows: slice-major, labels present on the slice
    ks, ls = np.nonzero(present.T)
    s_counts = counts[ls, ks]
    s_csa = s_counts.astype(np.float64) * area
    s_fp = np.clip(100.0 * fsum[ls, ks] / s_counts, 0.0, 100.0)
    s_fcsa = s_csa * (1 - s_fp / 100.0)
    s_drop = drop[ls, ks]
    for arr in (s_csa, s_fp, s_fcsa):
        arr[s_drop] = np.nan
    s_bits = np.zeros((ks.size, len(FLAGS)), dtype=bool)
    s_bits[:, _FLAG["truncated"]] = touch[ls, ks]
    s_bits[:, _FLAG["psoas_t2_unreliable"]] = psoas[ls]
    s_bits[:, _FLAG["fat_reference_collapsed"]] = collapsed

    n_agg, n_sl = n_g * n_lab, ks.size
    n_rows = n_agg + n_sl
    level_col = [*agg_level.tolist(), *(slice_level[k] for k in ks.tolist())]
    slice_vals = np.zeros(n_rows, dtype=np.int64)
    slice_vals[n_agg:] = ks
    slice_na = np.zeros(n_rows, dtype=bool)
    slice_na[:n_agg] = True
    agg_flags = _flag_strings(bits.reshape(n_agg, len(FLAGS)))
    metrics = pd.DataFrame({
        "subject": [subject] * n_rows,
        "level": pd.array(level_col, dtype="string"),
        "slice": pd.arrays.IntegerArray(slice_vals, slice_na),
        "muscle": muscles * n_g + [muscles[i] for i in ls.tolist()],
        "side": sides * n_g + [sides[i] for i in ls.tolist()],
        "n_slices": np.concatenate([n_slices.ravel(), np.ones(n_sl, dtype=np.int64)]).astype(
            np.int64
        ),
        "n_voxels": np.concatenate([n_vox.ravel(), s_counts]).astype(np.int64),
        "csa_mm2": np.concatenate([csa_agg.ravel(), s_csa]),
        "fat_pct": np.concatenate([fp_agg.ravel(), s_fp]),
        "fcsa_mm2": np.concatenate([fcsa_agg.ravel(), s_fcsa]),
        "method": [settings.fat_method] * n_rows,
        "flags": agg_flags + _flag_strings(s_bits),
    })
    asym = _asymmetry(
        subject, [ALL_LEVELS, *level_names], muscles, sides, csa_agg, fp_agg, fcsa_agg, bits,
        settings,
    )
    return metrics, asym


def _asymmetry(
    subject: str,
    levels: list[str],
    muscles: list[str],
    sides: list[str | None],
    csa: NDArray,
    fat_pct: NDArray,
    fcsa: NDArray,
    bits: NDArray[np.bool_],
    settings: MetricsSettings,
) -> pd.DataFrame:
    """Asymmetry rows (level-major, muscles in label-file order) from the aggregate arrays.

    ``fat_pct``, ``fcsa`` (n_levels x n_labels) and ``bits`` (their flags) are the aggregate
    rows of :func:`_tabulate`; a muscle needs a left and a right label (the last one of each
    side when the label file repeats one).
    """
    floor = settings.lfiar_floor_pct
    label_of: dict[tuple[str, str | None], int] = {}
    for i, (m, s) in enumerate(zip(muscles, sides, strict=True)):
        label_of[(m, s)] = i
    pairs = [
        (label_of[(m, "left")], label_of[(m, "right")])
        for m in dict.fromkeys(muscles)
        if (m, "left") in label_of and (m, "right") in label_of
    ]
    if not pairs:
        out = pd.DataFrame([], columns=list(ASYMMETRY_COLUMNS))
        out["level"] = out["level"].astype("string")
        for c in ASYMMETRY_COLUMNS[3:12]:
            out[c] = out[c].astype("float64")
        return out
    li = np.array([p[0] for p in pairs])
    ri = np.array([p[1] for p in pairs])
    n_lev, n_pair = len(levels), len(pairs)
    fl, fr = fcsa[:, li].ravel(), fcsa[:, ri].ravel()
    il, ir = fat_pct[:, li].ravel(), fat_pct[:, ri].ravel()
    cdi = np.asarray(_cdi(fl, fr, settings.cdi_formula), dtype=np.float64)
    lf, lf_log = _lfiar(il, ir, floor, settings.lfiar_formula)
    flag_bits = (bits[:, li, :] | bits[:, ri, :]).reshape(n_lev * n_pair, len(FLAGS))
    n = n_lev * n_pair
    return pd.DataFrame({
        "subject": [subject] * n,
        "level": pd.array(np.repeat(np.array(levels, dtype=object), n_pair).tolist(),
                          dtype="string"),
        "muscle": [muscles[i] for i in li.tolist()] * n_lev,
        "cdi": cdi,
        "cdi_abs": np.abs(cdi),
        "lfiar": np.asarray(lf, dtype=np.float64),
        "lfiar_log": np.asarray(lf_log, dtype=np.float64),
        "lfiar_floor_pct": np.full(n, floor, dtype=np.float64),
        "fcsa_left_mm2": fl,
        "fcsa_right_mm2": fr,
        "fat_pct_left": il,
        "fat_pct_right": ir,
        "method": [settings.fat_method] * n,
        "flags": _flag_strings(flag_bits),
    })


def to_convex_concave(
    asymmetry: pd.DataFrame,
    convex_side: Mapping[str, str | None],
    settings: MetricsSettings | None = None,
) -> pd.DataFrame:
    """Add convex-vs-concave versions of the asymmetry indices.

    Parameters
    ----------
    asymmetry : DataFrame
        Rows as written by :func:`measure` (needs ``fcsa_left_mm2``, ``fcsa_right_mm2``,
        ``fat_pct_left``, ``fat_pct_right`` and ``lfiar_floor_pct``).
    convex_side : mapping
        Subject -> ``"left"`` or ``"right"`` (the side of the curve's convexity); subjects
        missing or mapped to None/NaN/"" get NaN.
    settings : MetricsSettings, optional
        Formula choices (default :class:`MetricsSettings`).

    Returns
    -------
    DataFrame
        A copy with ``convex_side``, ``cdi_cc`` (convex minus concave FCSA over their mean, or
        the log ratio), ``cdi_cc_abs``, ``lfiar_cc = FI_convex / max(FI_concave, floor)`` and
        ``lfiar_cc_log = ln(max(FI_convex, floor) / max(FI_concave, floor))``.

    Raises
    ------
    ConfigError
        A side other than left/right, naming the subject.

    Examples
    --------
    >>> a = pd.DataFrame({"subject": ["s1"], "fcsa_left_mm2": [90.0], "fcsa_right_mm2": [110.0],
    ...                   "fat_pct_left": [20.0], "fat_pct_right": [10.0], "lfiar_floor_pct": [0.5]})
    >>> cc = to_convex_concave(a, {"s1": "right"})
    >>> round(float(cc.cdi_cc[0]), 3), round(float(cc.lfiar_cc[0]), 3)
    (0.2, 0.5)
    """
    settings = settings or MetricsSettings()
    out = asymmetry.copy()
    sides = []
    for subj in out["subject"]:
        side = convex_side.get(subj) if hasattr(convex_side, "get") else None
        if side is None or (isinstance(side, float) and math.isnan(side)) or side == "":
            sides.append(None)
            continue
        s = str(side).strip().lower()
        if s not in ("left", "right"):
            msg = f"convex_side: subject {subj!r} has {side!r}; expected 'left' or 'right'"
            raise ConfigError(msg)
        sides.append(s)
    out["convex_side"] = pd.array(sides, dtype="string")
    is_left = np.array([s == "left" for s in sides])
    known = np.array([s is not None for s in sides])
    fl, fr = out["fcsa_left_mm2"].to_numpy(float), out["fcsa_right_mm2"].to_numpy(float)
    il, ir = out["fat_pct_left"].to_numpy(float), out["fat_pct_right"].to_numpy(float)
    floor = out["lfiar_floor_pct"].to_numpy(float)
    f_cx, f_cc = np.where(is_left, fl, fr), np.where(is_left, fr, fl)
    i_cx, i_cc = np.where(is_left, il, ir), np.where(is_left, ir, il)
    cdi = _cdi(f_cx, f_cc, settings.cdi_formula)
    lf, lf_log = _lfiar(i_cx, i_cc, floor, settings.lfiar_formula)  # type: ignore[arg-type]
    out["cdi_cc"] = np.where(known, cdi, np.nan)
    out["cdi_cc_abs"] = np.abs(out["cdi_cc"])
    out["lfiar_cc"] = np.where(known, lf, np.nan)
    out["lfiar_cc_log"] = np.where(known, lf_log, np.nan)
    return out


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def write_result(result: MeasureResult, out_dir: str | Path) -> dict[str, Path]:
    """Write ``metrics.csv``, ``asymmetry.csv`` and ``reference.json`` atomically into a folder.

    Returns
    -------
    dict
        ``{"metrics": path, "asymmetry": path, "reference": path}``.
    """
    out = Path(out_dir)
    paths = {
        "metrics": out / "metrics.csv",
        "asymmetry": out / "asymmetry.csv",
        "reference": out / "reference.json",
    }
    atomic_write_text(paths["metrics"], result.metrics.to_csv(index=False))
    atomic_write_text(paths["asymmetry"], result.asymmetry.to_csv(index=False))
    atomic_write_text(
        paths["reference"],
        json.dumps(result.reference, indent=2, sort_keys=False, default=_json_default) + "\n",
    )
    return paths


def _json_default(obj: object) -> object:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def measure_files(
    image_path: str | Path,
    mask_path: str | Path,
    labels_path: str | Path,
    *,
    subject: str | None = None,
    settings: MetricsSettings | None = None,
    levels_path: str | Path | None = None,
) -> MeasureResult:
    """Read an image, its mask, label file and (optional) levels CSV, then :func:`measure`.

    ``subject`` defaults to the image file name without ``_T2w`` and ``.nii(.gz)``.

    Raises
    ------
    InputFileError (and its subclasses)
        Any unusable input, naming the file.
    """
    image = load_image(image_path)
    mask = load_mask(mask_path)
    labels = load_labels(labels_path)
    subject = subject or subject_from_filename(image_path)
    levels = read_levels(levels_path, subject) if levels_path is not None else None
    return _measure(image, mask, labels, subject=subject, settings=settings, levels=levels,
                    levels_clean=True)
