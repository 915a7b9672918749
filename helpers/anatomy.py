"""Anatomical plausibility of a muscle mask on its image, in world coordinates.

Pure functions over ``(mask, image, affine, labels)``: they do not care which model (or person)
drew the mask.  :func:`plausibility_checks` turns them into QC rows (:data:`helpers.qc.QC_COLUMNS`)
with a status and a reason in words; :func:`helpers.qc.check_subject` calls it, so a grossly
wrong mask is ``fail`` and excluded from the analysis by default.

Every position is taken in world coordinates (nibabel RAS+: +x = patient's right, +y =
anterior) from the affine, never from array order, so a file stored L-P-S and one stored R-A-S
give the same numbers.  The checks and the anatomy behind them:

``inside_body``
    A muscle lies inside the body.  The body outline is, per axial slice, the convex hull of
    the image's bright tissue (above half the Otsu threshold of the volume: skin and
    subcutaneous fat on a fat-bright image, all tissue on others).  The hull, not a threshold,
    decides, because muscle on T2 can be as dark as the air's noise (the example scan's psoas
    has median intensity 9, the air behind the patient 0-26).  ``value``: share (0-1) of the
    label's voxels outside the outline; fail above ``max_outside_body_fraction``.
``posterior_cover``
    Erector spinae and multifidus lie directly beneath the posterior subcutaneous fat and the
    thoracolumbar fascia: no other muscle lies between them and the skin of the back.
    ``value``: median (over the columns the label occupies, all slices) thickness in mm of
    non-fat, unlabelled tissue between the label and the posterior skin; fail above
    ``max_posterior_cover_mm``.  A mask moved anteriorly (into the abdomen) leaves the real
    back muscles, unlabelled, behind it.  Only judged on fat-bright images.
``arrangement``
    Multifidus lies medial to erector spinae (next to the spinous processes), psoas medial to
    quadratus lumborum (psoas against the vertebral body, quadratus lumborum between it and the
    lateral abdominal wall); psoas lies anterior to erector spinae and multifidus, quadratus
    lumborum anterior to erector spinae.  Medial/lateral is the distance in world x from the
    midline, which per slice is the median of the right/left centroid midpoints of the muscle
    pairs (so swapped sides do not read as swapped muscles).  ``value``: median over the
    slices holding both labels of the margin in mm (positive = anatomical order); a negative
    margin names the two muscles as swapped.
``mirror``
    Right and left twins mirror each other about the midline: ``value`` is the larger of the
    median antero-posterior offset between the twins and the median offset of their midpoint
    from the midline (mm), measured after undoing the slice's axial rotation (scoliosis turns
    every pair alike); fail above ``max_mirror_offset_mm``.
``intensity``
    A muscle is darker than subcutaneous fat on a fat-bright image.  ``value``: label median
    intensity over the median of the bright tissue class (fat); fail at or above
    ``max_fat_intensity_ratio`` (the label covers fat, not muscle).  Judged on fat-bright
    images only (the value is recorded on others).
``csa_range``
    Median per-slice area (mm2) of the label over the slices of a level where it is present,
    against :data:`PHYSIOLOGICAL_CSA_MM2`: ``csa_range_status`` outside the range, fail outside
    it by more than a factor ``csa_fail_factor``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from scipy import ndimage

from helpers.labels import LabelTable
from helpers.nifti import slice_axis as _slice_axis
from helpers.nifti import voxel_area_mm2

if TYPE_CHECKING:
    from helpers.qc import QCSettings

__all__ = [
    "ANTERIOR_OF",
    "MEDIAL_OF",
    "PHYSIOLOGICAL_CSA_MM2",
    "BodyOutline",
    "arrangement_table",
    "body_outline",
    "csa_table",
    "intensity_table",
    "mirror_table",
    "outside_body_table",
    "plausibility_checks",
    "posterior_cover_table",
    "slice_centroids",
]

#: Physiological range (mm2) of one muscle's area on one axial slice, per side, adult lumbar
#: spine L1-S1 (median over a level's slices).  Wide on purpose: it spans the published adult
#: values (multifidus about 3-12 cm2 from L1 to L5-S1 and erector spinae about 5-25 cm2,
#: Fortin & Macedo 2013, Phys Ther 93:873, and Crawford et al. 2016, Eur Spine J 25:2844;
#: psoas about 1-25 cm2 rising from L1 to L4-L5, quadratus lumborum about 1-10 cm2, Hides et al.
#: 2010 and Marras et al. 2001, Clin Biomech 16:38) with room for small and large bodies.  Muscles
#: not listed are not judged.
PHYSIOLOGICAL_CSA_MM2: dict[str, tuple[float, float]] = {
    "multifidus": (150.0, 1800.0),
    "erector_spinae": (300.0, 3500.0),
    "psoas_major": (80.0, 3500.0),
    "quadratus_lumborum": (50.0, 1500.0),
}

#: (medial muscle, lateral muscle, status when reversed).
MEDIAL_OF: tuple[tuple[str, str, str], ...] = (
    ("multifidus", "erector_spinae", "fail"),
    ("psoas_major", "quadratus_lumborum", "fail"),
)
#: (anterior muscle, posterior muscle, status when reversed).
ANTERIOR_OF: tuple[tuple[str, str, str], ...] = (
    ("psoas_major", "erector_spinae", "fail"),
    ("psoas_major", "multifidus", "fail"),
    ("quadratus_lumborum", "erector_spinae", "fail"),
)

#: Muscles whose posterior cover is judged (the back muscles beneath the subcutaneous fat).
POSTERIOR_MUSCLES = ("multifidus", "erector_spinae")


# --------------------------------------------------------------------------------------------
# Geometry helpers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BodyOutline:
    """The body's outline on each axial slice and the image's tissue classes.

    Attributes
    ----------
    inside : ndarray of bool
        Same shape as the image: True inside the body outline.
    threshold : float
        Otsu threshold of the volume (bright tissue class above it).
    fat_median : float
        Median intensity of the bright tissue inside the outline (fat on a fat-bright image).
    fat_bright : bool
        True when the outline's posterior rim (10 mm) is mostly bright tissue, i.e.
        subcutaneous fat is bright (T1, T2 TSE without fat suppression).
    """

    inside: NDArray[np.bool_]
    threshold: float
    fat_median: float
    fat_bright: bool


def _otsu(values: NDArray[np.floating]) -> float:
    from skimage.filters import threshold_otsu

    return float(threshold_otsu(values))


def _convex_hull(plane: NDArray[np.bool_]) -> NDArray[np.bool_]:
    from skimage.morphology import convex_hull_image

    if plane.sum() < 3:
        return np.zeros_like(plane)
    return np.asarray(convex_hull_image(plane), dtype=bool)


def body_outline(image: NDArray[np.floating], affine: NDArray[np.float64]) -> BodyOutline:
    """Body outline per axial slice: convex hull of the bright tissue (see module notes).

    Parameters
    ----------
    image : ndarray, 3-D
        The MR image.
    affine : ndarray, shape (4, 4)
        Voxel-to-world affine (RAS+).

    Returns
    -------
    BodyOutline
    """
    data = np.asarray(image, dtype=np.float64)
    axis = _slice_axis(affine)
    finite = data[np.isfinite(data)]
    positive = finite[finite > 0]
    if positive.size < 10 or float(positive.min()) == float(positive.max()):
        inside = np.ones(data.shape, dtype=bool)
        return BodyOutline(inside, math.nan, math.nan, False)
    thr = _otsu(positive)
    bright = np.nan_to_num(data) > 0.5 * thr
    inside = np.zeros(data.shape, dtype=bool)
    structure = ndimage.generate_binary_structure(2, 1)
    for k in range(data.shape[axis]):
        idx: list[Any] = [slice(None)] * 3
        idx[axis] = k
        plane = ndimage.binary_opening(bright[tuple(idx)], structure=structure)
        pieces, n = ndimage.label(plane)
        if n == 0:
            continue
        sizes = np.bincount(pieces.ravel())[1:]
        keep = np.flatnonzero(sizes >= 0.02 * sizes.max()) + 1
        hull = _convex_hull(np.isin(pieces, keep))
        inside[tuple(idx)] = hull
    fat = data[inside & (data > thr)]
    fat_median = float(np.median(fat)) if fat.size else math.nan
    # fat-bright: the posterior rim (the back's skin and subcutaneous fat, 10 mm deep) is
    # mostly bright tissue.  Only the back is used: elsewhere the outline may be cut by a
    # small field of view or lost to a posterior coil's fall-off.
    ap, to_anterior = _ap_axis(affine, axis)
    step = float(np.linalg.norm(affine[:3, ap]))
    depth = max(1, round(10.0 / step))
    order = (axis, next(i for i in range(3) if i not in (axis, ap)), ap)
    body = np.transpose(inside, order)
    bright_t = np.transpose(data > thr, order)
    if to_anterior:
        body, bright_t = body[:, :, ::-1], bright_t[:, :, ::-1]
    ramp = np.arange(body.shape[2])
    post = np.max(np.where(body, ramp, -1), axis=2)
    band = body & (ramp >= (post - depth + 1)[..., None]) & (post >= 0)[..., None]
    fat_bright = bool(band.any() and float(bright_t[band].mean()) >= 0.5)
    return BodyOutline(inside, thr, fat_median, fat_bright)


def slice_centroids(
    mask: NDArray[np.integer], affine: NDArray[np.float64], labels: LabelTable
) -> pd.DataFrame:
    """Centroid of each label on each axial slice, in world coordinates.

    Returns
    -------
    DataFrame
        ``value``, ``muscle``, ``side``, ``slice`` (index along the slice axis, file order),
        ``n_voxels``, ``x_mm`` (+ = patient's right), ``y_mm`` (+ = anterior).

    Examples
    --------
    >>> from helpers.labels import Label
    >>> m = np.zeros((4, 2, 1), dtype=np.int16); m[3, 0, 0] = 1
    >>> lps = np.diag([-2.0, -2.0, 2.0, 1.0])
    >>> float(slice_centroids(m, lps, LabelTable((Label(1, "mf", "left"),))).x_mm[0])
    -6.0
    """
    mask = np.asarray(mask)
    axis = _slice_axis(affine)
    rows = []
    for lab in labels.labels:
        idx = np.argwhere(mask == lab.value)
        if not idx.size:
            continue
        k = idx[:, axis]
        counts = np.bincount(k, minlength=mask.shape[axis])
        means = np.stack(
            [np.bincount(k, weights=idx[:, d], minlength=mask.shape[axis]) for d in range(3)],
            axis=1,
        )
        for s in np.flatnonzero(counts):
            centre = affine[:3, :3] @ (means[s] / counts[s]) + affine[:3, 3]
            rows.append(
                {
                    "value": lab.value,
                    "muscle": lab.muscle,
                    "side": lab.side,
                    "slice": int(s),
                    "n_voxels": int(counts[s]),
                    "x_mm": float(centre[0]),
                    "y_mm": float(centre[1]),
                }
            )
    cols = ["value", "muscle", "side", "slice", "n_voxels", "x_mm", "y_mm"]
    return pd.DataFrame(rows, columns=cols)


def _midlines(cents: pd.DataFrame) -> pd.Series:
    """Per slice: median x (mm) of the right/left centroid midpoints of every muscle pair."""
    sided = cents[cents["side"].isin(["left", "right"])]
    if sided.empty:
        return pd.Series(dtype=float)
    wide = sided.pivot_table(index=["slice", "muscle"], columns="side", values="x_mm")
    if not {"left", "right"} <= set(wide.columns):
        return pd.Series(dtype=float)
    mids = ((wide["left"] + wide["right"]) / 2).dropna()
    return mids.groupby(level="slice").median()


def _position(cents: pd.DataFrame, muscle: str, side: str) -> pd.DataFrame:
    sel = cents[(cents["muscle"] == muscle) & (cents["side"] == side)]
    return sel.set_index("slice")[["x_mm", "y_mm"]]


# --------------------------------------------------------------------------------------------
# Measurements (pure)
# --------------------------------------------------------------------------------------------


def arrangement_table(cents: pd.DataFrame) -> pd.DataFrame:
    """Medial/lateral and anterior/posterior order of the muscles, per side (see module notes).

    Parameters
    ----------
    cents : DataFrame
        :func:`slice_centroids` output.

    Returns
    -------
    DataFrame
        ``relation`` (``medial`` / ``anterior``), ``first``, ``second`` (muscles: ``first``
        should lie medial to / anterior of ``second``), ``side``, ``status_if_reversed``,
        ``n_slices`` (slices holding both), ``margin_mm`` (median over those slices; positive
        = anatomical order, NaN when not measurable).
    """
    mid = _midlines(cents)
    rows = []
    relations = [("medial", *r) for r in MEDIAL_OF] + [("anterior", *r) for r in ANTERIOR_OF]
    for relation, first, second, status in relations:
        for side in ("right", "left"):
            a = _position(cents, first, side)
            b = _position(cents, second, side)
            if a.empty or b.empty:
                continue
            common = a.index.intersection(b.index)
            if relation == "medial":
                common = common.intersection(mid.index)
                m = mid.loc[common]
                margin = (b.loc[common, "x_mm"] - m).abs() - (a.loc[common, "x_mm"] - m).abs()
            else:
                margin = a.loc[common, "y_mm"] - b.loc[common, "y_mm"]
            rows.append(
                {
                    "relation": relation,
                    "first": first,
                    "second": second,
                    "side": side,
                    "status_if_reversed": status,
                    "n_slices": len(common),
                    "margin_mm": float(np.median(margin)) if len(common) else math.nan,
                }
            )
    cols = ["relation", "first", "second", "side", "status_if_reversed", "n_slices", "margin_mm"]
    return pd.DataFrame(rows, columns=cols)


def mirror_table(cents: pd.DataFrame) -> pd.DataFrame:
    """How well each right/left pair mirrors about the midline, allowing for axial rotation.

    Per slice, the patient's axial rotation is the median angle of the left-to-right vectors of
    the muscle pairs (a rotated trunk, as in scoliosis, turns every pair alike); the centroids
    are rotated back by it, the midline is the median of the pair midpoints, and each pair's
    offsets are measured in that frame.  A single misplaced label turns only its own pair.

    Returns
    -------
    DataFrame
        ``muscle``, ``n_slices`` (slices holding both twins), ``ap_offset_mm`` (median of
        y_right - y_left after derotation), ``midline_offset_mm`` (median of the twins'
        midpoint x minus the slice's midline x, after derotation), ``offset_mm`` (the larger
        absolute value of the two), ``rotation_deg`` (median axial rotation of the slices).
    """
    cols = ["muscle", "n_slices", "ap_offset_mm", "midline_offset_mm", "offset_mm", "rotation_deg"]
    sided = cents[cents["side"].isin(["left", "right"])]
    if sided.empty:
        return pd.DataFrame(columns=cols)
    wide = sided.pivot_table(index=["slice", "muscle"], columns="side", values=["x_mm", "y_mm"])
    if ("x_mm", "left") not in wide.columns or ("x_mm", "right") not in wide.columns:
        return pd.DataFrame(columns=cols)
    wide = wide.dropna()
    if wide.empty:
        return pd.DataFrame(columns=cols)
    xr, xl = wide[("x_mm", "right")], wide[("x_mm", "left")]
    yr, yl = wide[("y_mm", "right")], wide[("y_mm", "left")]
    angle = pd.Series(np.arctan2(yr - yl, xr - xl), index=wide.index)
    theta = angle.groupby(level="slice").median().reindex(wide.index, level="slice")
    c, s_ = np.cos(theta), np.sin(theta)
    xr_, yr_ = xr * c + yr * s_, -xr * s_ + yr * c
    xl_, yl_ = xl * c + yl * s_, -xl * s_ + yl * c
    mid_pair = (xr_ + xl_) / 2
    midline = mid_pair.groupby(level="slice").median().reindex(wide.index, level="slice")
    table = pd.DataFrame(
        {"dy": yr_ - yl_, "dx": mid_pair - midline, "rot": np.degrees(theta)}, index=wide.index
    )
    rows = []
    for muscle, grp in table.groupby(level="muscle", sort=False):
        dy, dx = float(grp["dy"].median()), float(grp["dx"].median())
        rows.append(
            {
                "muscle": muscle,
                "n_slices": len(grp),
                "ap_offset_mm": dy,
                "midline_offset_mm": dx,
                "offset_mm": max(abs(dy), abs(dx)),
                "rotation_deg": float(grp["rot"].median()),
            }
        )
    return pd.DataFrame(rows, columns=cols)


def outside_body_table(
    mask: NDArray[np.integer], outline: BodyOutline, labels: LabelTable
) -> pd.DataFrame:
    """Share (0-1) of each present label's voxels outside the body outline.

    Returns
    -------
    DataFrame
        ``value``, ``n_voxels``, ``outside_fraction``.
    """
    mask = np.asarray(mask)
    rows = []
    for lab in labels.labels:
        m = mask == lab.value
        n = int(m.sum())
        if n:
            out = int((m & ~outline.inside).sum())
            rows.append({"value": lab.value, "n_voxels": n, "outside_fraction": out / n})
    return pd.DataFrame(rows, columns=["value", "n_voxels", "outside_fraction"])


def _ap_axis(affine: NDArray[np.float64], axis: int) -> tuple[int, bool]:
    """In-plane array axis closest to world y, and whether increasing index runs anterior."""
    unit = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    cands = [i for i in range(3) if i != axis]
    ap = max(cands, key=lambda i: abs(unit[1, i]))
    return ap, bool(unit[1, ap] > 0)


def posterior_cover_table(
    mask: NDArray[np.integer],
    image: NDArray[np.floating],
    affine: NDArray[np.float64],
    labels: LabelTable,
    outline: BodyOutline,
    muscles: tuple[str, ...] = POSTERIOR_MUSCLES,
) -> pd.DataFrame:
    """Non-fat, unlabelled tissue (mm) between each back muscle and the posterior skin.

    For every slice and every image column (in-plane axis across the antero-posterior one)
    the label occupies, the voxels from the label's posterior-most voxel to the posterior edge
    of the body outline that are darker than the Otsu threshold and carry no label are counted
    and multiplied by the voxel size along that axis.

    Returns
    -------
    DataFrame
        ``value``, ``n_columns`` (slice x column pairs measured), ``cover_mm`` (median).
    """
    mask = np.asarray(mask)
    data = np.nan_to_num(np.asarray(image, dtype=np.float64))
    axis = _slice_axis(affine)
    ap, to_anterior = _ap_axis(affine, axis)
    lr = next(i for i in range(3) if i not in (axis, ap))
    step = float(np.linalg.norm(affine[:3, ap]))
    # arrays ordered (slice, lr, ap) with ap increasing towards posterior
    order = (axis, lr, ap)
    m = np.transpose(mask, order)
    dark = np.transpose((data < outline.threshold) & (mask == 0) & outline.inside, order)
    body = np.transpose(outline.inside, order)
    if to_anterior:
        m, dark, body = m[:, :, ::-1], dark[:, :, ::-1], body[:, :, ::-1]
    n_ap = m.shape[2]
    cum = np.concatenate([np.zeros((*m.shape[:2], 1)), np.cumsum(dark, axis=2)], axis=2)
    ramp = np.arange(n_ap)
    body_post = np.where(body.any(axis=2), np.max(np.where(body, ramp, -1), axis=2), -1)
    rows = []
    for lab in labels.labels:
        if lab.muscle not in muscles:
            continue
        hit = m == lab.value
        has = hit.any(axis=2)
        if not has.any():
            continue
        lab_post = np.max(np.where(hit, ramp, -1), axis=2)
        end = np.maximum(body_post, lab_post)
        count = (
            np.take_along_axis(cum, (end + 1)[..., None], axis=2)[..., 0]
            - np.take_along_axis(cum, (lab_post + 1)[..., None], axis=2)[..., 0]
        )
        values = count[has] * step
        rows.append(
            {"value": lab.value, "n_columns": int(has.sum()), "cover_mm": float(np.median(values))}
        )
    return pd.DataFrame(rows, columns=["value", "n_columns", "cover_mm"])


def intensity_table(
    mask: NDArray[np.integer],
    image: NDArray[np.floating],
    labels: LabelTable,
    outline: BodyOutline,
) -> pd.DataFrame:
    """Median intensity of each present label and its ratio to the fat (bright class) median.

    Returns
    -------
    DataFrame
        ``value``, ``median``, ``fat_ratio`` (NaN when the image has no bright class).
    """
    mask = np.asarray(mask)
    data = np.asarray(image, dtype=np.float64)
    rows = []
    for lab in labels.labels:
        vals = data[mask == lab.value]
        vals = vals[np.isfinite(vals)]
        if not vals.size:
            continue
        med = float(np.median(vals))
        fat = outline.fat_median
        ratio = med / fat if math.isfinite(fat) and fat > 0 else math.nan
        rows.append({"value": lab.value, "median": med, "fat_ratio": ratio})
    return pd.DataFrame(rows, columns=["value", "median", "fat_ratio"])


def csa_table(
    mask: NDArray[np.integer],
    affine: NDArray[np.float64],
    labels: LabelTable,
    groups: list[tuple[str, NDArray[np.int64]]],
) -> pd.DataFrame:
    """Median per-slice area (mm2) of each label per level group, over slices holding it.

    Parameters
    ----------
    groups : list of (level, slice indices)
        Level groups (``"all"`` for the whole stack).

    Returns
    -------
    DataFrame
        ``level``, ``value``, ``n_slices``, ``csa_mm2``.
    """
    mask = np.asarray(mask)
    axis = _slice_axis(affine)
    area = voxel_area_mm2(affine, axis)
    in_plane = tuple(i for i in range(3) if i != axis)
    rows = []
    for lab in labels.labels:
        per_slice = (mask == lab.value).sum(axis=in_plane)
        for level, slices in groups:
            counts = per_slice[np.asarray(slices, dtype=np.int64)]
            counts = counts[counts > 0]
            if counts.size:
                rows.append(
                    {
                        "level": level,
                        "value": lab.value,
                        "n_slices": int(counts.size),
                        "csa_mm2": float(np.median(counts)) * area,
                    }
                )
    return pd.DataFrame(rows, columns=["level", "value", "n_slices", "csa_mm2"])


# --------------------------------------------------------------------------------------------
# QC rows
# --------------------------------------------------------------------------------------------


def plausibility_checks(
    subject: str,
    mask: NDArray[np.integer],
    affine: NDArray[np.float64],
    labels: LabelTable,
    *,
    image: NDArray[np.floating] | None = None,
    groups: list[tuple[str, NDArray[np.int64]]] | None = None,
    settings: QCSettings | None = None,
    tips: Mapping[int, set[str]] | None = None,
) -> pd.DataFrame:
    """All anatomical plausibility checks as QC rows (see the module notes).

    Parameters
    ----------
    subject : str
        Pseudonymous subject ID.
    mask : ndarray of int, 3-D
        Label mask (values the label file does not declare are ignored here).
    affine : ndarray, shape (4, 4)
        Voxel-to-world affine (RAS+) shared by mask and image.
    labels : LabelTable
        Declared labels.
    image : ndarray, optional
        The MR image on the mask's grid; without it the image-based checks (``inside_body``,
        ``posterior_cover``, ``intensity``) are left out.
    groups : list of (level, slice indices), optional
        Level groups for ``csa_range``; default the whole stack (``"all"``).
    settings : QCSettings, optional
        Thresholds.
    tips : mapping, optional
        Label value -> its tip levels (:func:`helpers.qc.tip_levels`): there a muscle tapers,
        so an area below the range's lower end is recorded but not judged.

    Returns
    -------
    DataFrame
        Rows in :data:`helpers.qc.QC_COLUMNS`.
    """
    from helpers.qc import ALL_LEVELS, QCSettings, _frame, _row

    settings = settings or QCSettings()
    mask = np.asarray(mask)
    axis = _slice_axis(affine)
    rows: list[dict[str, Any]] = []
    by_value = {lab.value: lab for lab in labels.labels}

    def name(muscle: str) -> str:
        return muscle.replace("_", " ")

    if image is not None:
        outline = body_outline(image, affine)
        if math.isfinite(outline.threshold):
            for r in outside_body_table(mask, outline, labels).itertuples(index=False):
                lab = by_value[int(r.value)]
                share = float(r.outside_fraction)
                if share > settings.max_outside_body_fraction:
                    status = "fail"
                    reason = (
                        f"{share:.0%} of its voxels lie outside the body outline (in the air; "
                        f"> {settings.max_outside_body_fraction:.0%})"
                    )
                else:
                    status, reason = "pass", f"{share:.1%} of its voxels outside the body outline"
                rows.append(_row(subject, ALL_LEVELS, "inside_body", status, share, reason, lab))
            for r in intensity_table(mask, image, labels, outline).itertuples(index=False):
                lab = by_value[int(r.value)]
                ratio = float(r.fat_ratio)
                if not math.isfinite(ratio):
                    status, reason = "pass", "not checked: no bright tissue class on the image"
                elif not outline.fat_bright:
                    status = "pass"
                    reason = "not checked: subcutaneous fat is not bright on this image"
                elif ratio >= settings.max_fat_intensity_ratio:
                    status = "fail"
                    reason = (
                        f"median intensity {r.median:.0f} is {ratio:.2f} x that of the image's "
                        f"bright tissue (fat) (>= {settings.max_fat_intensity_ratio:g}): "
                        "the label covers fat, not muscle"
                    )
                else:
                    status = "pass"
                    reason = f"median intensity {ratio:.2f} x that of the bright tissue (fat)"
                rows.append(_row(subject, ALL_LEVELS, "intensity", status, ratio, reason, lab))
            if outline.fat_bright:
                cover = posterior_cover_table(mask, image, affine, labels, outline)
                for r in cover.itertuples(index=False):
                    lab = by_value[int(r.value)]
                    mm = float(r.cover_mm)
                    if mm > settings.max_posterior_cover_mm:
                        status = "fail"
                        reason = (
                            f"{mm:.0f} mm of unlabelled non-fat tissue lies between it and the "
                            f"posterior subcutaneous fat (> {settings.max_posterior_cover_mm:g} "
                            "mm): the mask lies anterior to the back muscles (moved into the "
                            "abdomen?)"
                        )
                    else:
                        status = "pass"
                        reason = f"{mm:.0f} mm of non-fat tissue between it and the back's fat"
                    rows.append(
                        _row(subject, ALL_LEVELS, "posterior_cover", status, mm, reason, lab)
                    )
            else:
                rows.append(
                    _row(
                        subject,
                        ALL_LEVELS,
                        "posterior_cover",
                        "pass",
                        math.nan,
                        "not checked: subcutaneous fat is not bright on this image",
                    )
                )

    cents = slice_centroids(mask, affine, labels)
    for r in arrangement_table(cents).itertuples(index=False):
        muscle = f"{r.first}/{r.second}"
        word = "medial to" if r.relation == "medial" else "anterior of"
        opposite = "lateral to" if r.relation == "medial" else "posterior of"
        if not math.isfinite(r.margin_mm):
            reason = f"not checked: {name(r.first)} and {name(r.second)} share no slice"
            rows.append(
                _row(
                    subject,
                    ALL_LEVELS,
                    "arrangement",
                    "pass",
                    math.nan,
                    reason,
                    muscle=muscle,
                    side=r.side,
                )
            )
            continue
        if r.margin_mm < 0:
            status = r.status_if_reversed
            reason = (
                f"{r.side} {name(r.first)} lies {abs(r.margin_mm):.0f} mm {opposite} the "
                f"{r.side} {name(r.second)} (median of {r.n_slices} slices; anatomy puts it "
                f"{word} it): {name(r.first)} and {name(r.second)} swapped?"
            )
        else:
            status = "pass"
            reason = f"{name(r.first)} lies {r.margin_mm:.0f} mm {word} {name(r.second)}"
        rows.append(
            _row(
                subject,
                ALL_LEVELS,
                "arrangement",
                status,
                r.margin_mm,
                reason,
                muscle=muscle,
                side=r.side,
            )
        )
    for r in mirror_table(cents).itertuples(index=False):
        off = float(r.offset_mm)
        detail = (
            f"right-left antero-posterior offset {r.ap_offset_mm:+.0f} mm, pair centre "
            f"{r.midline_offset_mm:+.0f} mm from the midline (after {r.rotation_deg:+.0f} deg "
            "of axial rotation)"
        )
        if off > settings.max_mirror_offset_mm:
            status = "fail"
            reason = (
                f"right and left {name(r.muscle)} do not mirror each other about the midline: "
                f"{detail} (> {settings.max_mirror_offset_mm:g} mm)"
            )
        else:
            status, reason = "pass", detail
        rows.append(_row(subject, ALL_LEVELS, "mirror", status, off, reason, muscle=r.muscle))

    if groups is None:
        groups = [(ALL_LEVELS, np.arange(mask.shape[axis]))]
    for r in csa_table(mask, affine, labels, groups).itertuples(index=False):
        lab = by_value[int(r.value)]
        if lab.muscle not in PHYSIOLOGICAL_CSA_MM2:
            continue
        lo, hi = PHYSIOLOGICAL_CSA_MM2[lab.muscle]
        area = float(r.csa_mm2)
        f = settings.csa_fail_factor
        at_tip = str(r.level) in (tips or {}).get(lab.value, set())
        if at_tip:
            lo = 0.0  # a muscle tapers at its ends: only the upper bound applies there
        if area < lo / f or area > hi * f:
            status = "fail"
        elif area < lo or area > hi:
            status = settings.csa_range_status
        else:
            status = "pass"
        reason = f"median area {area:.0f} mm2 on {r.n_slices} slices"
        if at_tip:
            reason += " (a tip level of the muscle: no lower bound)"
        if status == "pass" and not lo <= area <= hi:
            reason += f" (outside {lo:.0f}-{hi:.0f} mm2; csa_range_status is pass)"
        elif status != "pass":
            reason += f" outside the physiological {lo:.0f}-{hi:.0f} mm2"
            if status == "fail":
                reason += f" by more than a factor {f:g}"
        rows.append(_row(subject, str(r.level), "csa_range", status, area, reason, lab))
    return _frame(rows)
