"""Array layout, connected components and near distance maps of voxel masks, fast.

The fat step (:mod:`helpers.fat`) runs once per scan on arrays of up to a million voxels, where
``ndi.label`` and whole-slice distance maps dominate the cost of a measurement without bias
correction.  The helpers here return *exactly* what those calls return (``tests/test_fat.py``
and ``tests/test_metrics.py`` compare them), only faster.  Pure functions over arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi

__all__ = ["c_order"]

def c_order(data: NDArray, dtype: Any = None) -> NDArray:
    """``np.ascontiguousarray(data, dtype)``, copying a Fortran-ordered 3-D volume (what
    nibabel returns) slice by slice along its last axis, about twice as fast.

    Boolean indexing, ``ravel`` and labelling all work in C order: converting a scan once saves
    a transposing copy in each of them.
    """
    arr = np.asarray(data, dtype=dtype)
    if arr.ndim != 3 or arr.flags.c_contiguous or not arr.flags.f_contiguous:
        return np.ascontiguousarray(arr)
    out = np.empty(arr.shape, dtype=arr.dtype)
    for k in range(arr.shape[2]):
        out[:, :, k] = arr[:, :, k]
    return out


def _to_stack(data: NDArray, ax: int) -> NDArray:
    """The slices across axis ``ax`` as one C-ordered ``(n_slices, P, Q)`` array (the other two
    axes in their order): each slice contiguous, so per-slice work does not stride."""
    moved = np.moveaxis(np.asarray(data), ax, -1)
    out = np.empty((moved.shape[-1], *moved.shape[:-1]), dtype=moved.dtype)
    for k in range(moved.shape[-1]):
        out[k] = moved[..., k]
    return out


def _from_stack(stack: NDArray, ax: int) -> NDArray:
    """Inverse of :func:`_to_stack` (C-ordered when ``ax`` is the last axis)."""
    out = np.empty((*stack.shape[1:], stack.shape[0]), dtype=stack.dtype)
    for k in range(stack.shape[0]):
        out[..., k] = stack[k]
    return np.moveaxis(out, -1, ax)


def _label(mask: NDArray[np.bool_]) -> tuple[NDArray, int]:
    """``ndi.label(mask)`` (6-connected), same labels and numbering.

    Uses connected-components-3d (``cc3d``, installed with nnU-Net) when available: about 4 x
    faster.  On a C-ordered array it numbers components in the same raster order as
    ``ndi.label`` (tests/test_fat.py checks this); without it, ``ndi.label``.
    """
    mask = np.ascontiguousarray(mask, dtype=bool)
    if mask.ndim == 3 and mask.size:
        try:
            import cc3d
        except ImportError:  # pragma: no cover - cc3d comes with nnunetv2
            pass
        else:
            labels, n = cc3d.connected_components(mask, connectivity=6, return_N=True)
            return labels, int(n)
    labels, n = ndi.label(mask)
    return labels, int(n)


def _border_connected_inplane(mask: NDArray[np.bool_], ax: int) -> NDArray[np.bool_]:
    """Voxels of ``mask`` connected, within their own slice across axis ``ax`` (4-connected),
    to that slice's border: what ``ndi.label`` with an in-plane cross structure followed by a
    border look-up gives."""
    stack = _to_stack(np.asarray(mask, dtype=bool), ax)
    out = np.zeros(stack.shape, dtype=bool)
    try:
        import cc3d
    except ImportError:  # pragma: no cover - cc3d comes with nnunetv2
        cc3d = None
    for k in range(stack.shape[0]):
        sl = stack[k]
        if not sl.any():
            continue
        if cc3d is not None:
            lab = cc3d.connected_components(sl, connectivity=4)
        else:  # pragma: no cover
            lab, _ = ndi.label(sl)
        touch = np.zeros(int(lab.max()) + 1, dtype=bool)
        touch[lab[0]] = touch[lab[-1]] = touch[lab[:, 0]] = touch[lab[:, -1]] = True
        touch[0] = False
        out[k] = touch[lab]
    return _from_stack(out, ax)


#: Distances to the muscles are computed at least this far (mm; see :func:`_distance_to`).
_NEAR_REACH_MM = 12.0


Box = tuple[tuple[int, int], ...]


def _bbox(mask2d: NDArray[np.bool_] | None, shape: tuple[int, ...]) -> Box | None:
    """Bounding box ``((row0, row1), (col0, col1))`` (ends exclusive) of a 2-D mask's pixels;
    the whole slice for None, None for an empty mask."""
    if mask2d is None:
        return tuple((0, int(s)) for s in shape)
    rows = np.flatnonzero(mask2d.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask2d.any(axis=0))
    return ((int(rows[0]), int(rows[-1]) + 1), (int(cols[0]), int(cols[-1]) + 1))


def _grown(box: Box, sampling: tuple[float, ...], reach_mm: float, shape: tuple[int, ...]) -> Box:
    """``box`` grown by ``reach_mm`` (every pixel within ``reach_mm`` of it), clipped."""
    out = []
    for (lo, hi), spacing, size in zip(box, sampling, shape, strict=True):
        grow = int(reach_mm / spacing) + 1  # pixels beyond it are farther than reach_mm
        out.append((max(0, lo - grow), min(int(size), hi + grow)))
    return tuple(out)


def _intersect(a: Box, b: Box) -> Box:
    return tuple((max(a0, b0), min(a1, b1)) for (a0, a1), (b0, b1) in zip(a, b, strict=True))


def _edt_near(
    inside: NDArray[np.bool_],
    sampling: tuple[float, ...],
    reach_mm: float,
    roi: NDArray[np.bool_] | None,
    kind: str,
    limit: Box | None = None,
) -> NDArray[np.float64]:
    """``ndi.distance_transform_edt(inside, sampling=sampling)`` where it matters, for less.

    Equal to the whole slice's transform on every pixel of ``roi`` (default: all) whose
    value is at most ``reach_mm`` (or 12 mm, whichever is larger); every other pixel reads its
    true value, more, or ``inf``.  The transform runs on the bounding box of ``roi`` grown by
    the reach, intersected with ``limit`` (a box known to hold every pixel outside ``inside``
    within reach of ``roi``) and with the box around the outside pixels found there: the
    nearest outside pixel of a roi pixel within reach lies in it, so the box alone gives its
    distance.  ``kind`` names the map (``"depth"`` or ``"near"``; kept for callers that
    swap in the whole-slice transform).
    """
    roi = np.ones(inside.shape, dtype=bool) if roi is None else np.asarray(roi, dtype=bool)
    # One reach for the band (12 mm), its clearance (5 mm) and the perimuscular shell (10 mm).
    reach_mm = max(float(reach_mm), _NEAR_REACH_MM)
    out = np.full(inside.shape, np.inf)
    box = _bbox(roi, inside.shape)
    if box is not None:
        crop = _grown(box, sampling, reach_mm, inside.shape)
        if limit is not None:
            crop = _intersect(crop, limit)
        # The outside pixels within reach of roi lie in the grown box; only the part of it
        # within reach of one of them matters.
        targets = ~inside[tuple(slice(lo, hi) for lo, hi in crop)]
        tbox = _bbox(targets, targets.shape)
        # No outside pixel there: none within reach of roi (and the transform of an array
        # without a zero is meaningless).
        if tbox is not None:
            tbox = tuple((lo + c0, hi + c0) for (lo, hi), (c0, _) in zip(tbox, crop, strict=True))
            crop = _intersect(crop, _grown(tbox, sampling, reach_mm, inside.shape))
            region = tuple(slice(lo, hi) for lo, hi in crop)
            out[region] = ndi.distance_transform_edt(inside[region], sampling=sampling)
    return out


def _depth_mm(
    inside: NDArray[np.bool_],
    sampling: tuple[float, ...],
    reach_mm: float = _NEAR_REACH_MM,
    roi: NDArray[np.bool_] | None = None,
) -> NDArray[np.float64]:
    """In-plane distance (mm) of each pixel of a 2-D mask to the nearest pixel outside it.

    Exact on the pixels of ``roi`` (default: all) up to ``reach_mm`` (at least 12 mm); see
    :func:`_edt_near`.
    """
    return _edt_near(np.asarray(inside, dtype=bool), sampling, reach_mm, roi, "depth")


def _distance_to(
    features: NDArray[np.bool_],
    sampling: tuple[float, ...],
    reach_mm: float,
    roi: NDArray[np.bool_] | None = None,
) -> NDArray[np.float64]:
    """In-plane distance (mm) of each pixel of a 2-D slice to the nearest ``features`` pixel.

    The values of ``ndi.distance_transform_edt(~features, sampling=sampling)`` for every pixel
    of ``roi`` (default: all) within ``reach_mm`` (at least 12 mm) of a feature; pixels farther
    away, or outside ``roi``, may read more (``inf``) instead.  The transform runs on the
    features' bounding box grown by the reach (every feature lies in it), intersected with
    ``roi``'s grown box.  ``features`` must hold at least one pixel.
    """
    features = np.asarray(features, dtype=bool)
    reach = max(float(reach_mm), _NEAR_REACH_MM)
    fbox = _bbox(features, features.shape)
    limit = _grown(fbox, sampling, reach, features.shape) if fbox is not None else None
    return _edt_near(~features, sampling, reach_mm, roi, "near", limit)


def _away_from(
    mask: NDArray[np.bool_], margin_voxels: int, region: tuple[slice, ...] | None = None
) -> NDArray[np.bool_]:
    """``~ndi.binary_dilation(mask, iterations=margin_voxels)``, on ``region`` (a box) only.

    The dilation decides a voxel from the mask voxels within ``margin_voxels`` 6-connected
    steps, so the box grown by the margin gives the box's values exactly.
    """
    mask = np.asarray(mask, dtype=bool)
    if region is None:
        return ~ndi.binary_dilation(mask, iterations=margin_voxels)
    grown = tuple(
        slice(max(0, s.start - margin_voxels), min(n, s.stop + margin_voxels))
        for s, n in zip(region, mask.shape, strict=True)
    )
    near = ndi.binary_dilation(mask[grown], iterations=margin_voxels)
    within = tuple(
        slice(s.start - g.start, s.stop - g.start) for s, g in zip(region, grown, strict=True)
    )
    return ~near[within]

