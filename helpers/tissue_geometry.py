"""Tissue geometry of one scan: body outline, subcutaneous fat band, perimuscular shell.

Where the fat step (:mod:`helpers.fat`) looks for its reference tissues, computed once per scan
by :func:`tissue_geometry` and passed to every step that needs it (no memo, no hidden state):

- the **body** outline (:func:`body_mask`): everything that is not the air around it;
- the voxels **posterior** to the muscles' mean position on each slice (the back, next to the
  spine coil, where the air is air and not dark bowel);
- the **subcutaneous band** (:func:`subcutaneous_band`): body voxels 2-12 mm under the skin of
  the back and flanks, more than 5 mm from any muscle;
- its **core**, the band without the skin rim (skin keeps its signal under fat suppression);
- the **perimuscular shell**: voxels 2-10 mm behind the muscles (posterior half).

All of them are built slice by slice (in-plane distances in mm from the affine), so the
geometry of a subset of slices is the whole scan's geometry restricted to them
(:meth:`TissueGeometry.restricted`).  Each in-plane distance map is computed once per slice:
the depth under the skin serves the band and its core, the distance to the muscles the band's
clearance and the shell.  Pure functions over arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi

from helpers import arrays
from helpers.arrays import _from_stack as from_stack
from helpers.arrays import _to_stack as to_stack

__all__ = [
    "BAND_CLEARANCE_MM",
    "BAND_DEPTH_MM",
    "SHELL_MM",
    "SKIN_RIM_MM",
    "TissueGeometry",
    "body_mask",
    "perimuscular_shell",
    "posterior_of_muscle",
    "subcutaneous_band",
    "tissue_geometry",
    "without_skin_rim",
]

#: Depth under the skin (mm) of the subcutaneous band: the first 2 mm (skin, partial volume
#: with air) are skipped.
BAND_DEPTH_MM = (2.0, 12.0)
#: The band keeps this far (mm) from any muscle voxel.
BAND_CLEARANCE_MM = 5.0
#: In-plane distance (mm) behind the muscles of the perimuscular shell.
SHELL_MM = (2.0, 10.0)
#: Skin rim left out of the band's core (mm; at least 1.5 in-plane voxels): skin keeps its
#: signal under fat suppression.
SKIN_RIM_MM = 2.0


def _slice_axis(affine: NDArray[np.float64]) -> int:
    from helpers.nifti import slice_axis

    return slice_axis(affine)


def _inplane(affine: NDArray[np.float64], ax: int) -> tuple[float, ...]:
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    return tuple(float(z) for i, z in enumerate(zooms) if i != ax)


def _rim_mm(inplane: tuple[float, ...], rim_mm: float = SKIN_RIM_MM) -> float:
    return max(float(rim_mm), 1.5 * max(inplane))


def body_mask(
    image: NDArray,
    affine: NDArray[np.float64],
    muscle: NDArray[np.bool_] | None = None,
) -> NDArray[np.bool_]:
    """Voxels inside the body outline: everything that is not the air around it.

    The image is smoothed in-plane (1 mm) so that noise does not break up the air, then
    split into dark and bright by Otsu's threshold of the log intensities (relative to the
    median, so the result does not depend on the intensity scale).  Air is the largest dark
    region touching the in-plane image border, plus other border-touching dark regions that are
    as dark as it; everything else is body.  Dark tissue inside the body (lean muscle, bowel,
    bone) is therefore kept, and a field of view that cuts through the body does not open it.
    The muscle mask, when given, is always body.  Holes are filled slice by slice and only the
    largest connected object is kept.

    Parameters
    ----------
    image : ndarray, shape (X, Y, Z)
        Intensities.
    affine : ndarray
        Voxel to world; gives the axial slice axis and the voxel size.
    muscle : ndarray of bool, optional
        Muscle voxels, always inside the body.

    Returns
    -------
    ndarray of bool
    """
    from skimage.filters import threshold_multiotsu

    src = np.asarray(image, dtype=np.float32)
    # C order throughout: the labels are numbered, and the per-label sums accumulated, in the
    # same (C) order whatever the input's memory layout.
    arr = np.clip(src, 0, None, out=np.empty(src.shape, dtype=np.float32))
    ax = _slice_axis(affine)
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    sigma = [0.0 if i == ax else 1.0 / float(zooms[i]) for i in range(3)]
    smooth = ndi.gaussian_filter(arr, sigma=sigma)
    positive = smooth[smooth > 0]
    median = np.median(positive) if positive.size else None
    del positive
    if median is None:
        return np.zeros(arr.shape, dtype=bool)
    logv = np.divide(smooth, float(median), out=smooth)
    np.log1p(logv, out=logv)
    # Three classes (air, dark tissue, bright tissue): air is below the lower threshold.
    sample = logv[:: max(1, arr.shape[0] // 128)].ravel()
    dark = logv <= threshold_multiotsu(sample, classes=3)[0]
    del logv, sample
    if muscle is not None:
        dark &= ~np.asarray(muscle, dtype=bool)
    labels, n = arrays._label(dark)
    air = np.zeros(arr.shape, dtype=bool)
    if n:
        moved = np.moveaxis(labels, ax, -1)
        edge = np.unique(np.concatenate(
            [moved[0].ravel(), moved[-1].ravel(), moved[:, 0].ravel(), moved[:, -1].ravel()]
        ))
        edge = edge[edge > 0]
        if edge.size:
            flat = labels.ravel().astype(np.intp)  # once, not inside each bincount
            counts = np.bincount(flat, minlength=n + 1)
            sizes = counts[edge]
            # = ndi.mean(arr, labels, edge): the same per-label sums (np.bincount, same order)
            means = np.bincount(flat, weights=arr.ravel())[edge] / counts[edge].astype(np.float64)
            biggest = int(np.argmax(sizes))
            keep = edge[means <= 1.2 * float(means[biggest]) + 1e-6]
            is_air = np.zeros(n + 1, dtype=bool)
            is_air[keep] = True
            air = is_air[labels]
    inside = ~air
    lab_in, n_in = arrays._label(inside)
    if n_in > 1:
        sizes = np.bincount(lab_in.ravel())
        sizes[0] = 0
        inside = lab_in == int(np.argmax(sizes))
    # Fill holes slice by slice (ndi.binary_fill_holes of each slice, 4-connected): the
    # background connected in-plane to its slice's border stays out, the rest is filled.
    return ~arrays._border_connected_inplane(~inside, ax)


def _world_coordinate(shape: tuple[int, ...], affine: NDArray[np.float64], row: int) -> NDArray:
    """World coordinate ``row`` (0 x, 1 y, 2 z; RAS+ mm) of every voxel."""
    i, j, k = np.ogrid[: shape[0], : shape[1], : shape[2]]
    a = affine[row]
    return (a[0] * i + a[1] * j + a[2] * k + a[3]).astype(np.float32)


def _posterior_of_muscle(
    muscle: NDArray[np.bool_], affine: NDArray[np.float64], ax: int
) -> NDArray[np.bool_]:
    """Voxels posterior (world y below) the muscles' mean y on their slice."""
    muscle = np.asarray(muscle, dtype=bool)
    mus_s = to_stack(muscle, ax)
    out = np.zeros(mus_s.shape, dtype=bool)
    # World y of one slice at a time: the same float expression (and float32 rounding) as
    # _world_coordinate evaluates for the whole volume, without building it.
    grids = list(np.ogrid[: muscle.shape[0], : muscle.shape[1], : muscle.shape[2]])
    a = affine[1]
    for k in range(mus_s.shape[0]):
        m = mus_s[k]
        if m.any():
            grids[ax] = np.array(k).reshape((1, 1, 1))
            y = (a[0] * grids[0] + a[1] * grids[1] + a[2] * grids[2] + a[3]).astype(np.float32)
            y = np.moveaxis(y, ax, -1)[..., 0]
            out[k] = y < float(y[m].mean())
    return from_stack(out, ax)


def posterior_of_muscle(muscle: NDArray[np.bool_], affine: NDArray[np.float64]) -> NDArray[np.bool_]:
    """Voxels posterior to the muscles' mean world y on their slice (none on slices without
    muscle): the back, where the air behind it is air."""
    return _posterior_of_muscle(np.asarray(muscle, dtype=bool), affine, _slice_axis(affine))


def subcutaneous_band(
    body: NDArray[np.bool_],
    muscle: NDArray[np.bool_],
    affine: NDArray[np.float64],
    *,
    depth_mm: tuple[float, float] = BAND_DEPTH_MM,
    clearance_mm: float = BAND_CLEARANCE_MM,
    posterior_only: bool = True,
) -> NDArray[np.bool_]:
    """Band under the skin where subcutaneous fat lies.

    Body voxels whose in-plane distance to the air outside the body is within ``depth_mm``
    (the first ``depth_mm[0]`` mm, skin and partial volume with air, are skipped), farther than
    ``clearance_mm`` from any muscle voxel, and (``posterior_only``) posterior to the muscles'
    mean position on that slice: the fat of the back and flanks, next to the muscles measured
    and always in a lumbar field of view, rather than the abdomen, where a field of view that
    cuts the belly can leave dark bowel looking like air.  Distances are in mm (voxel spacing
    from ``affine``); the image border does not count as air.

    Returns
    -------
    ndarray of bool
    """
    ax = _slice_axis(affine)
    inplane = _inplane(affine, ax)
    body = np.asarray(body, dtype=bool)
    muscle = np.asarray(muscle, dtype=bool)
    body_s = to_stack(body, ax)
    muscle_s = to_stack(muscle, ax)
    posterior = _posterior_of_muscle(muscle, affine, ax) if posterior_only and muscle.any() else None
    post_s = to_stack(posterior, ax) if posterior is not None else None
    band = np.zeros(body_s.shape, dtype=bool)
    for k in range(body_s.shape[0]):
        b = body_s[k]
        if not b.any() or b.all():
            continue
        # Only the posterior part is kept: distances are needed (exactly) there only.
        post = post_s[k] if post_s is not None else None
        roi = b & post if post is not None else None
        if roi is not None and not roi.any():
            continue
        depth = arrays._depth_mm(b, inplane, depth_mm[1], roi)
        sel = b & (depth >= depth_mm[0]) & (depth <= depth_mm[1])
        if muscle_s[k].any():
            clear = arrays._distance_to(muscle_s[k], inplane, clearance_mm, post)
            sel &= clear > clearance_mm
        if post is not None:
            sel &= post
        band[k] = sel
    return from_stack(band, ax)


def perimuscular_shell(
    muscle: NDArray[np.bool_], affine: NDArray[np.float64], inner_mm: float = SHELL_MM[0],
    outer_mm: float = SHELL_MM[1],
) -> NDArray[np.bool_]:
    """Voxels ``inner_mm``-``outer_mm`` (in-plane) outside the muscles, posterior half only."""
    ax = _slice_axis(affine)
    inplane = _inplane(affine, ax)
    muscle = np.asarray(muscle, dtype=bool)
    posterior = _posterior_of_muscle(muscle, affine, ax)
    mus_s = to_stack(muscle, ax)
    post_s = to_stack(posterior, ax)
    shell = np.zeros(mus_s.shape, dtype=bool)
    for k in range(mus_s.shape[0]):
        if mus_s[k].any():
            d = arrays._distance_to(mus_s[k], inplane, outer_mm, post_s[k])
            shell[k] = (d >= inner_mm) & (d <= outer_mm) & post_s[k]
    return from_stack(shell, ax)


def without_skin_rim(
    band: NDArray[np.bool_], body: NDArray[np.bool_], affine: NDArray[np.float64],
    rim_mm: float = SKIN_RIM_MM,
) -> NDArray[np.bool_]:
    """Band voxels deeper than the skin rim (in-plane distance to air > ``rim_mm`` mm, and more
    than 1.5 in-plane voxels, so a coarse voxel that mixes skin with fat is left out too)."""
    ax = _slice_axis(affine)
    inplane = _inplane(affine, ax)
    rim = _rim_mm(inplane, rim_mm)
    band_s = to_stack(np.asarray(band, dtype=bool), ax)
    body_s = to_stack(np.asarray(body, dtype=bool), ax)
    core = np.zeros(band_s.shape, dtype=bool)
    for k in range(band_s.shape[0]):
        if band_s[k].any():
            depth = arrays._depth_mm(body_s[k], inplane, rim, band_s[k])
            core[k] = band_s[k] & (depth > rim)
    return from_stack(core, ax)


@dataclass(frozen=True)
class TissueGeometry:
    """Where the reference tissues of one scan lie (boolean masks on the image grid).

    Attributes
    ----------
    muscle : ndarray of bool
        Muscle voxels (all labels, both sides).
    body : ndarray of bool
        Body outline (:func:`body_mask`).
    posterior : ndarray of bool
        Voxels posterior to the muscles' mean world y on their slice (none on slices without
        muscle).
    band : ndarray of bool
        Subcutaneous fat band (:func:`subcutaneous_band`, posterior only).
    band_core : ndarray of bool
        The band deeper than the skin rim (:func:`without_skin_rim`).
    shell : ndarray of bool
        Perimuscular shell (:func:`perimuscular_shell`).
    """

    muscle: NDArray[np.bool_]
    body: NDArray[np.bool_]
    posterior: NDArray[np.bool_]
    band: NDArray[np.bool_]
    band_core: NDArray[np.bool_]
    shell: NDArray[np.bool_]

    def restricted(self, sel: NDArray[np.bool_]) -> TissueGeometry:
        """The geometry of the slices selected by ``sel`` (a voxel mask made of whole
        slices), empty elsewhere: every mask is built slice by slice, so this equals the
        geometry computed from those slices alone."""
        return TissueGeometry(*(getattr(self, f) & sel for f in (
            "muscle", "body", "posterior", "band", "band_core", "shell")))


def tissue_geometry(
    image: NDArray,
    muscle: NDArray[np.bool_],
    affine: NDArray[np.float64],
    *,
    body: NDArray[np.bool_] | None = None,
) -> TissueGeometry:
    """Compute the tissue geometry of one scan, each distance map once per slice.

    Parameters
    ----------
    image : ndarray, shape (X, Y, Z)
        Intensities (for the body outline; the raw image, before bias correction).
    muscle : ndarray of bool
        Muscle voxels.
    affine : ndarray, shape (4, 4)
        Voxel to RAS+ world (mm).
    body : ndarray of bool, optional
        Body outline; default :func:`body_mask` of the image with the muscles forced in.

    Returns
    -------
    TissueGeometry
        Equal, mask for mask, to :func:`body_mask`, :func:`subcutaneous_band`,
        :func:`without_skin_rim` and :func:`perimuscular_shell` called one by one
        (``tests/test_fat.py``).
    """
    muscle = np.asarray(muscle, dtype=bool)
    if body is None:
        body = body_mask(image, affine, muscle)
    body = np.asarray(body, dtype=bool)
    if not muscle.any():  # no muscle to be posterior to: the band is the whole body's
        band = subcutaneous_band(body, muscle, affine)
        return TissueGeometry(muscle, body, np.zeros_like(muscle), band,
                              without_skin_rim(band, body, affine), np.zeros_like(muscle))
    ax = _slice_axis(affine)
    inplane = _inplane(affine, ax)
    posterior = _posterior_of_muscle(muscle, affine, ax)
    body_s, mus_s, post_s = (to_stack(a, ax) for a in (body, muscle, posterior))
    band, core, shell = (np.zeros(body_s.shape, dtype=bool) for _ in range(3))
    rim = _rim_mm(inplane)
    lo, hi = BAND_DEPTH_MM
    for k in range(body_s.shape[0]):
        m, post = mus_s[k], post_s[k]
        if not m.any():  # no muscle: nothing posterior to it, no band, no shell
            continue
        # Distance to the muscles, exact on the posterior half up to 12 mm: the band's
        # clearance (5 mm) and the shell (10 mm) both read it there.
        near = arrays._distance_to(m, inplane, max(BAND_CLEARANCE_MM, SHELL_MM[1]), post)
        shell[k] = (near >= SHELL_MM[0]) & (near <= SHELL_MM[1]) & post
        b = body_s[k]
        if not b.any() or b.all():
            continue
        roi = b & post
        if not roi.any():
            continue
        # Depth under the skin, exact on the posterior body up to 12 mm: the band and its core.
        depth = arrays._depth_mm(b, inplane, max(hi, rim), roi)
        sel = b & (depth >= lo) & (depth <= hi) & (near > BAND_CLEARANCE_MM) & post
        band[k] = sel
        core[k] = sel & (depth > rim)
    return TissueGeometry(
        muscle, body, posterior, from_stack(band, ax), from_stack(core, ax), from_stack(shell, ax)
    )
