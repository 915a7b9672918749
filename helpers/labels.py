"""Label files: which mask value is which muscle on which side.

A label file is JSON in the shape MuscleMap uses::

    {"labels": [{"value": 1, "muscle": "erector_spinae", "side": "left"}, ...]}

``side`` is ``"left"``, ``"right"`` or ``null`` (an unsided label, split into sides by anatomy).

Sides by anatomy
----------------
:func:`split_sides` splits unsided labels into left and right slice by slice (axial slices across
:func:`helpers.nifti.slice_axis`) in world coordinates (nibabel RAS+: +x is the patient's right),
never by array order, the image centre or a label's own centroid.  Per slice it estimates the
mid-sagittal line from the anatomy: every left/right pair of muscles (a sided pair, or the two
largest in-plane connected components of an unsided label) gives the midpoint of its two
centroids; a weighted median of these midpoints (and, when they spread antero-posteriorly, a
robust line fit, so a rotated spine gets a tilted midline) is the midline.  Uniform atrophy of
one side keeps that side's centroid, so the midline does not move when one side shrinks; an
off-centre spine moves the midpoints with it.  Slices without such evidence take the midline of
the nearest slices that have it.  Each in-plane connected component of an unsided label then goes
to the side of the midline where most of its voxels lie (a component that straddles the midline
is split voxel by voxel).  :func:`lateralization_table` reports each sided label's position
relative to the same midline.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from scipy import ndimage as ndi

from helpers.errors import LabelError
from helpers.nifti import slice_axis

__all__ = [
    "KNOWN_MUSCLES",
    "SIDES",
    "Label",
    "LabelTable",
    "estimate_midlines",
    "lateralization_table",
    "load_labels",
    "parse_labels",
    "side_contradictions",
    "split_sides",
]

log = logging.getLogger(__name__)

SIDES = ("left", "right")
#: Muscles the toolkit knows by name; others are accepted but reported as-is.
KNOWN_MUSCLES = ("multifidus", "erector_spinae", "psoas_major", "quadratus_lumborum")


@dataclass(frozen=True)
class Label:
    """One mask value: its muscle and (anatomical) side, or ``side=None`` when unsided."""

    value: int
    muscle: str
    side: str | None


@dataclass(frozen=True)
class LabelTable:
    """The labels of one label file, in file order."""

    labels: tuple[Label, ...]
    path: Path | None = None

    @property
    def values(self) -> tuple[int, ...]:
        """Declared mask values."""
        return tuple(lab.value for lab in self.labels)

    @property
    def muscles(self) -> tuple[str, ...]:
        """Muscle names in first-seen order, without repeats."""
        return tuple(dict.fromkeys(lab.muscle for lab in self.labels))

    def by_value(self, value: int) -> Label:
        """The label with mask value ``value``."""
        for lab in self.labels:
            if lab.value == value:
                return lab
        where = self.path or Path("<labels>")
        raise LabelError(where, f"label value {value} is not declared")

    def is_sided(self) -> bool:
        """True when every label has a side."""
        return all(lab.side is not None for lab in self.labels)

    def check_values(self, present: Iterable[int], mask_path: str | Path | None = None) -> None:
        """Raise :class:`LabelError` (naming the mask) for mask values the file does not declare.

        Background (0) is always allowed.
        """
        unknown = sorted({int(v) for v in present} - set(self.values) - {0})
        if unknown:
            declared = ", ".join(str(v) for v in self.values)
            where = mask_path or self.path or Path("<mask>")
            msg = f"mask holds label values {unknown} not in the label file (declared: {declared})"
            raise LabelError(where, msg)


def parse_labels(document: object, path: str | Path | None = None) -> LabelTable:
    """Validate a decoded label document and build a :class:`LabelTable`.

    Raises
    ------
    LabelError
        Naming the file and the offending entry.
    """
    where = Path(path) if path is not None else Path("<labels>")
    if not isinstance(document, dict) or not isinstance(document.get("labels"), list):
        raise LabelError(where, 'expected a JSON object with a "labels" list')
    labels: list[Label] = []
    for i, entry in enumerate(document["labels"]):
        if not isinstance(entry, dict):
            raise LabelError(where, f"labels[{i}] is not an object")
        value, muscle, side = entry.get("value"), entry.get("muscle"), entry.get("side")
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise LabelError(where, f"labels[{i}].value must be a positive integer, got {value!r}")
        if not isinstance(muscle, str) or not muscle.strip():
            raise LabelError(where, f"labels[{i}].muscle must be a non-empty string")
        if side is not None and side not in SIDES:
            msg = f"labels[{i}].side must be 'left', 'right' or null, got {side!r}"
            raise LabelError(where, msg)
        labels.append(Label(int(value), muscle.strip(), side))
    if not labels:
        raise LabelError(where, "no labels declared")
    values = [lab.value for lab in labels]
    dupes = sorted({v for v in values if values.count(v) > 1})
    if dupes:
        raise LabelError(where, f"label values declared twice: {dupes}")
    pairs = [(lab.muscle, lab.side) for lab in labels]
    dup_pairs = sorted({p for p in pairs if pairs.count(p) > 1}, key=str)
    if dup_pairs:
        raise LabelError(where, f"muscle/side declared twice: {dup_pairs}")
    return LabelTable(tuple(labels), Path(path) if path is not None else None)


def load_labels(path: str | Path) -> LabelTable:
    """Read and validate a label JSON file."""
    path = Path(path)
    if not path.is_file():
        raise LabelError(path, "label file not found")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LabelError(path, f"not valid JSON ({exc})") from exc
    return parse_labels(document, path)


# --------------------------------------------------------------------------------------------
# Sides by anatomy
# --------------------------------------------------------------------------------------------

#: Smallest share of the larger side that the smaller side of a pair must have to count as
#: midline evidence (an atrophic side is still far above it; stray specks are below).
_MIN_PAIR_SHARE = 0.03
#: Largest midline tilt (|dx/dy|) a line fit may give (about 31 degrees of axial rotation).
_MAX_TILT = 0.6
#: Minimum antero-posterior spread (mm) of the evidence before a tilt is fitted.
_MIN_TILT_SPREAD_MM = 25.0


def _inplane_structure(ax: int) -> NDArray[np.bool_]:
    """3 x 3 x 3 structure connecting 8-neighbours within a slice, never across slices."""
    st = np.zeros((3, 3, 3), bool)
    idx = [slice(None)] * 3
    idx[ax] = 1
    st[tuple(idx)] = True
    return st


def _world_xy(idx: tuple[NDArray, ...], affine: NDArray) -> tuple[NDArray, NDArray]:
    ijk = np.vstack([np.asarray(i, dtype=np.float64) for i in idx])
    xyz = affine[:3, :3] @ ijk + affine[:3, 3:4]
    return xyz[0], xyz[1]


def _components(
    mask: NDArray, value: int, structure: NDArray
) -> tuple[tuple[NDArray, ...], NDArray, int]:
    """In-plane connected components of one label: voxel indices, component ids, count.

    Labels only the label's bounding box (the muscles fill a small part of the image).
    """
    sel = mask == value
    hit = [np.flatnonzero(sel.any(axis=tuple(a for a in range(mask.ndim) if a != d)))
           for d in range(mask.ndim)]
    if any(h.size == 0 for h in hit):
        empty = tuple(np.zeros(0, np.intp) for _ in range(mask.ndim))
        return empty, np.zeros(0, np.int32), 0
    box = tuple(slice(int(h[0]), int(h[-1]) + 1) for h in hit)
    comp, n_comp = ndi.label(sel[box], structure=structure)
    local = np.nonzero(comp)
    idx = tuple(i + b.start for i, b in zip(local, box, strict=True))
    return idx, comp[local], int(n_comp)


Components = dict[int, tuple[tuple[NDArray, ...], NDArray, int]]


def _unsided_components(mask: NDArray, labels: LabelTable, ax: int) -> Components:
    """:func:`_components` of every unsided label, by value (computed once, used twice)."""
    structure = _inplane_structure(ax)
    return {lab.value: _components(mask, lab.value, structure)
            for lab in labels.labels if lab.side is None}


def _pairs_by_slice(
    mask: NDArray, affine: NDArray, labels: LabelTable, ax: int,
    components: Components | None = None,
) -> list[list[tuple[float, float, float]]]:
    """Midline evidence per slice: (x_mid, y_mid, weight) of every left/right pair.

    ``components``: :func:`_unsided_components` of the mask, when the caller has them.
    """
    n_slices = mask.shape[ax]
    evidence: list[list[tuple[float, float, float]]] = [[] for _ in range(n_slices)]
    if components is None:
        components = _unsided_components(mask, labels, ax)
    by_pair = {(lab.muscle, lab.side): lab.value for lab in labels.labels}
    # Sided pairs: centroids of the left and right labels in each slice.
    for lab in labels.labels:
        if lab.side != "right" or (lab.muscle, "left") not in by_pair:
            continue
        stats = {}
        for side in ("right", "left"):
            idx = np.nonzero(mask == by_pair[(lab.muscle, side)])
            x, y = _world_xy(idx, affine)
            s = idx[ax]
            n = np.bincount(s, minlength=n_slices)
            stats[side] = (n, np.bincount(s, x, n_slices), np.bincount(s, y, n_slices))
        (nr, xr, yr), (nl, xl, yl) = stats["right"], stats["left"]
        for k in np.flatnonzero((nr > 0) & (nl > 0)):
            small, big = sorted((nr[k], nl[k]))
            if small < max(3, _MIN_PAIR_SHARE * big):
                continue
            xm = (xr[k] / nr[k] + xl[k] / nl[k]) / 2
            ym = (yr[k] / nr[k] + yl[k] / nl[k]) / 2
            evidence[k].append((xm, ym, float(small)))
    # Unsided labels: the two largest in-plane components of each slice.
    for lab in labels.labels:
        if lab.side is not None:
            continue
        idx, cid, n_comp = components[lab.value]
        if n_comp < 2:
            continue
        x, y = _world_xy(idx, affine)
        size = np.bincount(cid, minlength=n_comp + 1).astype(float)
        cx = np.bincount(cid, x, n_comp + 1) / np.maximum(size, 1)
        cy = np.bincount(cid, y, n_comp + 1) / np.maximum(size, 1)
        xmin = np.full(n_comp + 1, np.inf)
        xmax = np.full(n_comp + 1, -np.inf)
        np.minimum.at(xmin, cid, x)
        np.maximum.at(xmax, cid, x)
        slice_of = np.zeros(n_comp + 1, np.int64)
        slice_of[cid] = idx[ax]
        for k in range(n_slices):
            ids = np.flatnonzero((slice_of == k) & (size > 0))
            ids = ids[ids > 0]
            if ids.size < 2:
                continue
            a, b = ids[np.argsort(size[ids])[::-1][:2]]
            if size[b] < max(3, _MIN_PAIR_SHARE * size[a]):
                continue
            # Two pieces of one side overlap in x; a left/right pair lies side by side.
            if min(xmax[a], xmax[b]) > max(xmin[a], xmin[b]):
                continue
            evidence[k].append(((cx[a] + cx[b]) / 2, (cy[a] + cy[b]) / 2, float(size[b])))
    return evidence


def _weighted_median(values: NDArray, weights: NDArray) -> float:
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, cum[-1] / 2)])


def _fit_midline(points: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    """(x0, y0, tilt) of the line x = x0 + tilt * (y - y0) through the pair midpoints."""
    arr = np.asarray(points, dtype=np.float64)
    x, y, w = arr[:, 0], arr[:, 1], arr[:, 2]
    x_med = _weighted_median(x, w)
    y0 = float(np.average(y, weights=w))
    tilt = 0.0
    keep = np.abs(x - x_med) <= 15.0 + _MAX_TILT * np.abs(y - y0)
    if keep.sum() >= 2 and np.ptp(y[keep]) >= _MIN_TILT_SPREAD_MM:
        xk, yk, wk = x[keep], y[keep], w[keep]
        yc = float(np.average(yk, weights=wk))
        xc = float(np.average(xk, weights=wk))
        tilt = float(np.sum(wk * (yk - yc) * (xk - xc)) / np.sum(wk * (yk - yc) ** 2))
        tilt = float(np.clip(tilt, -_MAX_TILT, _MAX_TILT))
        resid = xk - (xc + tilt * (yk - yc))
        return xc + float(_weighted_median(resid, wk)), yc, tilt
    return x_med, y0, tilt


def estimate_midlines(mask: NDArray, affine: NDArray, labels: LabelTable) -> pd.DataFrame:
    """Mid-sagittal line of every axial slice, in world coordinates (mm, RAS+).

    Parameters
    ----------
    mask : ndarray of int
        3-D label mask.
    affine : ndarray (4, 4)
        Voxel-to-RAS+ affine (mm).
    labels : LabelTable
        Labels of the mask (sided pairs and/or unsided labels give the evidence).

    Returns
    -------
    DataFrame
        One row per slice (index along :func:`helpers.nifti.slice_axis`, array order):
        ``slice``, ``x0_mm``, ``y0_mm``, ``tilt`` (the midline is
        ``x = x0_mm + tilt * (y - y0_mm)``), ``n_pairs`` (evidence in that slice) and
        ``source`` (``"pairs"``, ``"neighbours"`` or ``"extent"`` when no slice has any pair
        and the middle of the muscles' x extent is used, with a warning).
    """
    return _estimate_midlines(np.asarray(mask), affine, labels)


def _estimate_midlines(
    mask: NDArray, affine: NDArray, labels: LabelTable, components: Components | None = None
) -> pd.DataFrame:
    """:func:`estimate_midlines`, with the unsided labels' components when the caller has them."""
    ax = slice_axis(affine)
    n_slices = mask.shape[ax]
    evidence = _pairs_by_slice(mask, affine, labels, ax, components)
    rows = []
    for k in range(n_slices):
        if evidence[k]:
            x0, y0, tilt = _fit_midline(evidence[k])
            rows.append((k, x0, y0, tilt, len(evidence[k]), "pairs"))
        else:
            rows.append((k, np.nan, np.nan, 0.0, 0, "neighbours"))
    table = pd.DataFrame(rows, columns=["slice", "x0_mm", "y0_mm", "tilt", "n_pairs", "source"])
    have = table["n_pairs"].to_numpy() > 0
    if have.any():
        if have.sum() >= 3:
            # One slice's evidence can be wrong (a muscle split in two pieces): compare with the
            # median of the up-to-5 nearest slices that have evidence; the midline moves slowly.
            x = table.loc[have, "x0_mm"].to_numpy()
            med = np.array([np.median(x[max(0, i - 2): i + 3]) for i in range(x.size)])
            table.loc[have, "x0_mm"] = np.where(np.abs(x - med) > 10.0, med, x)
        ks = table.loc[have, "slice"].to_numpy()
        for col in ("x0_mm", "y0_mm", "tilt"):
            vals = table.loc[have, col].to_numpy(dtype=float)
            missing = ~have
            # nearest slice with evidence (np.interp holds the end values)
            table.loc[missing, col] = np.interp(table.loc[missing, "slice"], ks, vals)
    else:
        nz = np.nonzero(mask)
        if nz[0].size:
            log.warning("no left/right pair in any slice: midline from the muscles' x extent")
            x, y = _world_xy(nz, affine)
            s = nz[ax]
            for k in range(n_slices):
                sel = s == k
                if sel.any():
                    table.loc[k, ["x0_mm", "y0_mm"]] = [(x[sel].min() + x[sel].max()) / 2,
                                                        y[sel].mean()]
            table["source"] = "extent"
            good = table["x0_mm"].notna().to_numpy()
            if good.any():
                for col in ("x0_mm", "y0_mm"):
                    table.loc[~good, col] = np.interp(
                        table.loc[~good, "slice"], table.loc[good, "slice"],
                        table.loc[good, col].to_numpy(dtype=float))
    return table


def _signed_offset(idx: tuple[NDArray, ...], affine: NDArray, midlines: pd.DataFrame,
                   ax: int) -> NDArray:
    """World x (mm) of voxels relative to their slice's midline (> 0: patient's right)."""
    x, y = _world_xy(idx, affine)
    k = idx[ax]
    x0 = midlines["x0_mm"].to_numpy(dtype=float)[k]
    y0 = midlines["y0_mm"].to_numpy(dtype=float)[k]
    tilt = midlines["tilt"].to_numpy(dtype=float)[k]
    return x - (x0 + tilt * (y - y0))


def split_sides(
    mask: NDArray, affine: NDArray, labels: LabelTable
) -> tuple[NDArray, LabelTable]:
    """Split unsided labels into left and right by anatomy, in world coordinates.

    Parameters
    ----------
    mask : ndarray of int
        3-D label mask (any storage order).
    affine : ndarray (4, 4)
        Voxel-to-RAS+ affine (mm) of the mask; +x is the patient's right.
    labels : LabelTable
        The mask's labels; those with ``side=None`` are split.

    Returns
    -------
    mask : ndarray
        New mask (same shape; uint8 when the values fit, else int16).
    labels : LabelTable
        Sided labels.  Numbering: when *no* input label is sided, the k-th label in file order
        (k = 0, 1, ...) becomes right ``2k + 1`` and left ``2k + 2`` (the MuscleMap scheme of
        ``data/example/labels.json``); otherwise sided labels keep their values, each unsided
        label keeps its value for the right side and its left side gets the next free value
        above the largest declared one, in file order.

    Raises
    ------
    LabelError
        The mask holds values the label table does not declare, or an unsided muscle also has
        a sided label.

    Notes
    -----
    See the module docstring for the midline estimate.  Each in-plane connected component goes
    to the side where most of its voxels lie; one with more than 10 % of its voxels on each side
    of the midline is split voxel by voxel.
    """
    mask = np.asarray(mask)
    labels.check_values(np.unique(mask))
    unsided = [lab for lab in labels.labels if lab.side is None]
    if not unsided:
        return mask.copy(), labels
    sided_muscles = {lab.muscle for lab in labels.labels if lab.side is not None}
    clash = sorted({lab.muscle for lab in unsided} & sided_muscles)
    if clash:
        where = labels.path or Path("<labels>")
        raise LabelError(where, f"muscle(s) {clash} are declared both sided and unsided")
    new_labels: list[Label] = []
    value_map: dict[int, tuple[int, int]] = {}  # unsided value -> (right, left)
    if len(unsided) == len(labels.labels):
        for k, lab in enumerate(labels.labels):
            value_map[lab.value] = (2 * k + 1, 2 * k + 2)
            new_labels += [Label(2 * k + 1, lab.muscle, "right"),
                           Label(2 * k + 2, lab.muscle, "left")]
    else:
        nxt = max(labels.values)
        for lab in labels.labels:
            if lab.side is None:
                nxt += 1
                value_map[lab.value] = (lab.value, nxt)
                new_labels += [Label(lab.value, lab.muscle, "right"),
                               Label(nxt, lab.muscle, "left")]
            else:
                new_labels.append(lab)
    table = LabelTable(tuple(new_labels), labels.path)
    dtype = np.uint8 if max(table.values) < 256 else np.int16
    out = mask.astype(dtype, copy=True)
    ax = slice_axis(affine)
    components = _unsided_components(mask, labels, ax)
    midlines = _estimate_midlines(mask, affine, labels, components)
    for lab in unsided:
        right, left = value_map[lab.value]
        idx, cid, n_comp = components[lab.value]
        if not n_comp:
            continue
        is_right = _signed_offset(idx, affine, midlines, ax) > 0
        n = np.bincount(cid, minlength=n_comp + 1)
        n_right = np.bincount(cid, is_right, minlength=n_comp + 1)
        share = n_right / np.maximum(n, 1)
        straddles = (share > 0.1) & (share < 0.9)
        whole_right = share >= 0.5
        voxel_right = np.where(straddles[cid], is_right, whole_right[cid])
        out[idx] = np.where(voxel_right, right, left).astype(dtype)
    return out, table


def lateralization_table(mask: NDArray, affine: NDArray, labels: LabelTable) -> pd.DataFrame:
    """Where each sided label lies relative to the anatomical midline, in world x.

    Parameters
    ----------
    mask : ndarray of int
        3-D label mask.
    affine : ndarray (4, 4)
        Voxel-to-RAS+ affine (mm).
    labels : LabelTable
        Labels of the mask.

    Returns
    -------
    DataFrame
        One row per sided label: ``value, muscle, side, n_voxels``, ``centroid_x_mm`` (world x,
        RAS+), ``offset_x_mm`` (mean world x relative to the per-slice midline of
        :func:`estimate_midlines`; > 0 is the patient's right), ``twin_offset_x_mm`` (the same
        for the other-side label of the muscle), ``ok`` (right labels lie right of the midline
        and of their left twin, left labels left of both; True when absent, see ``note``) and
        ``note`` (``""``, ``"absent"``, ``"wrong side of midline"``, ``"swapped with twin"``).
    """
    mask = np.asarray(mask)
    ax = slice_axis(affine)
    midlines = estimate_midlines(mask, affine, labels)
    by_pair = {(lab.muscle, lab.side): lab.value for lab in labels.labels}
    stats: dict[int, tuple[int, float, float]] = {}
    for lab in labels.labels:
        if lab.side is None:
            continue
        idx = np.nonzero(mask == lab.value)
        if not idx[0].size:
            stats[lab.value] = (0, np.nan, np.nan)
            continue
        x, _ = _world_xy(idx, affine)
        off = _signed_offset(idx, affine, midlines, ax)
        stats[lab.value] = (int(idx[0].size), float(x.mean()), float(off.mean()))
    rows = []
    for lab in labels.labels:
        if lab.side is None:
            continue
        n, cx, off = stats[lab.value]
        other = "left" if lab.side == "right" else "right"
        twin = by_pair.get((lab.muscle, other))
        twin_off = stats[twin][2] if twin is not None else np.nan
        sign = 1.0 if lab.side == "right" else -1.0
        note = ""
        if n == 0:
            note = "absent"
        elif sign * off <= 0:
            note = "wrong side of midline"
        elif np.isfinite(twin_off) and sign * (off - twin_off) <= 0:
            note = "swapped with twin"
        rows.append({"value": lab.value, "muscle": lab.muscle, "side": lab.side, "n_voxels": n,
                     "centroid_x_mm": cx, "offset_x_mm": off, "twin_offset_x_mm": twin_off,
                     "ok": note in ("", "absent"), "note": note})
    return pd.DataFrame(rows, columns=["value", "muscle", "side", "n_voxels", "centroid_x_mm",
                                       "offset_x_mm", "twin_offset_x_mm", "ok", "note"])


# ---------------------------------------------------------- sides against anatomy (issue 16)
def side_contradictions(
    mask: NDArray, affine: NDArray, labels: LabelTable
) -> list[tuple[str, int, int, float]]:
    """Muscles whose right label lies to the patient's left of its left twin (world x, RAS+).

    The same rule as ``esma segment``'s side check (:func:`helpers.segment.side_check`): the
    centroid of the right label must lie at larger world x than that of the left one.  A
    label file whose sides are swapped would otherwise be measured silently with every
    asymmetry's sign flipped.  Muscles with one side absent are not checked.

    Returns
    -------
    list of (muscle, right value, left value, separation_mm)
        ``separation_mm`` = x(right) - x(left), <= 0 for each listed muscle.

    Examples
    --------
    >>> t = parse_labels({"labels": [{"value": 1, "muscle": "a", "side": "right"},
    ...                              {"value": 2, "muscle": "a", "side": "left"}]})
    >>> m = np.zeros((4, 1, 1), int); m[3] = 1; m[0] = 2    # value 1 at high x: correct
    >>> side_contradictions(m, np.eye(4), t)
    []
    >>> side_contradictions(m[::-1], np.eye(4), t)
    [('a', 1, 2, -3.0)]
    """
    mask = np.asarray(mask)
    out: list[tuple[str, int, int, float]] = []
    for muscle in labels.muscles:
        by_side = {lab.side: lab.value for lab in labels.labels if lab.muscle == muscle and lab.side}
        if set(by_side) != {"left", "right"}:
            continue
        xs = {}
        for side, value in by_side.items():
            idx = np.nonzero(mask == value)
            if not idx[0].size:
                break
            xs[side] = float(_world_xy(idx, affine)[0].mean())
        if len(xs) == 2 and xs["right"] - xs["left"] <= 0:
            sep = round(xs["right"] - xs["left"], 3)
            out.append((muscle, by_side["right"], by_side["left"], sep))
    return out
