"""Bias-field correction and fat classification of T2 muscle voxels.

Pure functions over arrays: nothing here reads or writes files.

Three steps, each usable on its own:

1. :func:`n4_correct` removes coil shading (a smooth multiplicative bias field) with SimpleITK's
   N4 filter, fitted on a shrunk copy of the image and applied at full resolution.  Coil shading
   changes intensities from left to right, and a threshold shared by both sides would turn it
   into a fake fat asymmetry; :func:`bias_correction_effect` records how much it changed.
2. :func:`tissue_intensities` finds the two reference intensities of the subject: pure fat
   (``I_fat``, the mode of the subcutaneous fat found in a band 2-12 mm under the skin of the
   back and flanks, see :func:`subcutaneous_band`) and lean muscle (``I_muscle``, the low mode
   of the pooled muscle intensities).  A fat-suppressed image is refused (see
   :func:`tissue_intensities`): fat around the muscles darker than the muscles, or
   subcutaneous fat well below the brightest tissues of the body (on T2 without fat suppression
   fat is among the brightest tissues; suppressed, it falls far below fluid and even below
   skin, which keeps its signal and is why the bright class of the band cannot be trusted).

   Lean muscle on T2 is dark, close to the noise floor of a magnitude image, where noise is
   Rician: the mean intensity of lean muscle exceeds its true amplitude, and by more where the
   coil is weaker.  :func:`estimate_noise_sd` measures the noise in the air behind the back;
   the modes are converted to true amplitudes (:func:`amplitude_from_mode`) and ``unmix``
   compares each voxel with the *expected* magnitude of lean muscle and of fat at that voxel's
   noise level (:func:`rice_mean`; after bias correction the noise in corrected units is
   ``sd / bias``).  Without this, a left/right shading leaves a left/right fat difference even
   after N4.
3. :func:`fit_reference` fits one classification reference (a threshold, or the two tissue
   intensities) to the muscle voxels of *both sides pooled*, once per subject (or once per
   subject and level), never per side: per-side fits give the two sides different thresholds,
   which shows up as a fake left/right difference.  :meth:`FatReference.fraction` then turns
   intensities into per-voxel fat fractions in [0, 1].

Methods (:data:`FAT_METHODS`)
-----------------------------
``unmix``
    Partial-volume two-tissue model: ``f = (I - I_muscle) / (I_fat - I_muscle)`` clipped to
    [0, 1] (with the expected noisy magnitudes in place of ``I_muscle`` and ``I_fat``, see
    above).  Continuous; a voxel that is 30 % fat counts as 0.3.  Area-weighted means use the
    unclipped fractions, whose mean is unbiased (clipping every noisy lean voxel at 0 would
    add about 0.4 noise sd / (I_fat - I_muscle) to a lean muscle's fat).
``gmm3``
    Three-component Gaussian mixture (lean, intermediate, fat) on the pooled intensities; a voxel
    is fat when its posterior-expected fat content (fat component 1, intermediate 1/2) exceeds
    1/2, which is one intensity threshold.
``gmm2``
    Two-component Gaussian mixture; threshold where the two posteriors are equal.
``kmeans2``
    Two-cluster k-means; threshold half-way between the cluster centres.
``otsu``
    Otsu's threshold of the pooled intensities (scikit-image).

The four threshold methods give binary fractions (0 or 1).  Mixture and clustering fits on
nearly lean muscle have no fat cluster to find and split the lean peak instead ("collapse"),
calling a large share of healthy muscle fat.  Every threshold is therefore checked against the two
tissue intensities: a threshold below ``I_muscle + 0.2 x (I_fat - I_muscle)`` (or above
``I_muscle + 0.8 x (I_fat - I_muscle)``) with more than 1 % of the voxels in between (or a
mixture whose fat component is not fat-like) is replaced by the half-way point
``(I_muscle + I_fat) / 2`` and the reference says ``collapsed: true``.

The default method (:data:`DEFAULT_FAT_METHOD`, ``unmix``) was chosen from the accuracy measured
on phantoms with planted truth (``benchmarks/bench_fat_methods.py``, table in
``benchmarks/results/fat_methods.json``: six phantoms, LPS/RAS/LAS storage, left-right shading
up to +-30 %, lean to fatty muscles, N4 on, psoas out of the pooled fit).  Mean absolute fat
error over every level and muscle: ``unmix`` 0.19 percentage points, ``kmeans2`` 0.31, ``otsu``
0.33, ``gmm3`` 1.2, ``gmm2`` 1.9; largest CDI error 0.011 (``unmix``) vs 0.017-0.10; no side
swapped.  The threshold methods count a voxel that is partly fat as all or nothing and the
mixtures put their threshold where the components cross rather than where a voxel is half fat;
the two-tissue model needs neither.  Pooling psoas into the fit made every method slightly worse
(``unmix`` 0.23 pp), hence :attr:`helpers.metrics.MetricsSettings.pool_psoas` is off by default.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi

from helpers.errors import InputFileError

__all__ = [
    "DEFAULT_FAT_METHOD",
    "FAT_METHODS",
    "FatReference",
    "TissueIntensities",
    "amplitude_from_mode",
    "bias_correction_effect",
    "body_mask",
    "c_order",
    "estimate_noise_sd",
    "fit_reference",
    "n4_correct",
    "rice_mean",
    "shared_intermediates",
    "subcutaneous_band",
    "tissue_intensities",
]

log = logging.getLogger(__name__)

#: Fat classification methods, see the module docstring.
FAT_METHODS = ("unmix", "gmm3", "gmm2", "kmeans2", "otsu")
#: Default method, chosen from the phantom benchmark (``benchmarks/results/fat_methods.json``).
DEFAULT_FAT_METHOD = "unmix"

#: Accepted position of a threshold between lean muscle (0) and fat (1); outside it the fit
#: counts as collapsed.
_THRESHOLD_RANGE = (0.2, 0.8)
#: Largest share of voxels a threshold outside that range may move before the fit counts as
#: collapsed.
_MAX_MISPLACED = 0.01
#: Fat-suppression check: the subcutaneous fat (skin rim left out) must reach this share of the
#: body's bright tissue level (its ``_FS_BRIGHT_PERCENTILE`` percentile).  Calibrated on
#: phantoms and the real example (``tests/test_fat.py``): without suppression 0.70-0.95
#: (lowest at SNR 6 with +-30 % shading and no N4; the real example 0.77, 0.85 after N4), with
#: fat scaled by 0.3 at most 0.51, by 0.1 at most 0.28.
_FS_MIN_FAT_TO_BRIGHT = 0.6
#: The same check on the tissue just behind the muscles, which does not depend on the body
#: outline (fat suppression can break it: suppressed fat looks like air).  That shell also holds
#: bone and fascia (real example 0.61), hence the lower bar; suppressed fat (x 0.1) gives < 0.15.
_FS_MIN_SHELL_TO_BRIGHT = 0.3
#: Percentile of the body intensities taken as its bright tissue level (fluid, or fat when it
#: is not suppressed).
_FS_BRIGHT_PERCENTILE = 99.0
#: Skin rim left out of the subcutaneous fat for the check (mm; at least 1.5 in-plane voxels):
#: skin keeps its signal under fat suppression.
_SKIN_RIM_MM = 2.0
#: Pooled intensities are summarised by this many quantiles before mixture/cluster fits
#: (deterministic, independent of voxel order, fast).
_MAX_FIT_SAMPLES = 20_000


# --------------------------------------------------------------------------------------------
# Connected components and array layout, fast
# --------------------------------------------------------------------------------------------
#
# The reference fit runs once per scan on arrays of up to a million voxels, where ``ndi.label``
# and whole-slice distance maps dominate the cost of a measurement without bias correction.
# The helpers below return *exactly* what those calls return (tests/test_fat.py compares them),
# only faster.



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


# --------------------------------------------------------------------------------------------
# Bias-field correction
# --------------------------------------------------------------------------------------------


def _sitk_image(data: NDArray, affine: NDArray[np.float64]) -> Any:
    """SimpleITK image whose index (i, j, k) is ``data[i, j, k]``, with geometry from ``affine``.

    nibabel's affine maps to RAS+; ITK works in LPS, so the first two world rows flip sign.
    """
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(data)))
    lin = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :3]
    spacing = np.linalg.norm(lin, axis=0)
    direction = lin / spacing
    # Nearest orthonormal matrix (ITK wants a rotation; sheared grids are rare and only the
    # spline spacing matters to N4).
    u, _, vt = np.linalg.svd(direction)
    direction = u @ vt
    img.SetSpacing([float(s) for s in spacing])
    img.SetDirection([float(d) for d in direction.ravel()])
    img.SetOrigin([float(o) for o in np.diag([-1.0, -1.0, 1.0]) @ affine[:3, 3]])
    return img


#: Fewest slices on which N4 fits a 3-D field; thinner stacks get one 2-D field per slice.
_MIN_N4_SLICES = 4


def _stack_axis(affine: NDArray[np.float64]) -> int:
    from helpers.nifti import slice_axis

    return slice_axis(affine)


def _n4_by_slice(
    arr: NDArray[np.float32],
    zooms: Sequence[float],
    fit_mask: NDArray[np.bool_],
    axis: int,
    *,
    shrink_factor: int,
    iterations: Sequence[int],
    convergence_threshold: float,
    control_points: int,
    threads: int,
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """N4 with a 2-D field per slice, for stacks too thin for a 3-D B-spline fit (1-3 slices).

    A slice with fewer than 100 foreground voxels keeps a flat field (no correction).  The
    field is scaled to median 1 inside the mask, as in :func:`n4_correct`.
    """
    import SimpleITK as sitk

    plane_zooms = [float(z) for a, z in enumerate(zooms) if a != axis]
    log_bias = np.zeros(arr.shape, dtype=np.float64)
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(threads))
    try:
        for k in range(arr.shape[axis]):
            plane = np.take(arr, k, axis=axis)
            plane_mask = np.take(fit_mask, k, axis=axis)
            if plane_mask.sum() < 100:
                continue
            img = sitk.GetImageFromArray(np.ascontiguousarray(plane.T))
            img.SetSpacing(plane_zooms)
            mask_img = sitk.GetImageFromArray(np.ascontiguousarray(plane_mask.T.astype(np.uint8)))
            mask_img.SetSpacing(plane_zooms)
            factors = [
                max(1, min(f, n // max(int(control_points), 1)))
                for f, n in zip(_shrink_factors(plane_zooms, shrink_factor), plane.shape, strict=True)
            ]
            small = sitk.Shrink(img, factors) if any(f > 1 for f in factors) else img
            small_mask = sitk.Shrink(mask_img, factors) if any(f > 1 for f in factors) else mask_img
            n4 = sitk.N4BiasFieldCorrectionImageFilter()
            n4.SetNumberOfThreads(int(threads))
            n4.SetMaximumNumberOfIterations([int(i) for i in iterations])
            n4.SetConvergenceThreshold(float(convergence_threshold))
            n4.SetNumberOfControlPoints([int(control_points)] * 2)
            n4.Execute(small, small_mask)
            field = np.transpose(sitk.GetArrayFromImage(n4.GetLogBiasFieldAsImage(img)))
            index: list[Any] = [slice(None)] * 3
            index[axis] = k
            log_bias[tuple(index)] = field
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)
    log_bias -= float(np.median(log_bias[fit_mask]))
    bias = np.exp(log_bias).astype(np.float32)
    return (arr / bias).astype(np.float32), bias


def _shrink_factors(zooms: Sequence[float], shrink_factor: int) -> list[int]:
    """Per-axis shrink factors giving roughly ``shrink_factor x`` the finest spacing."""
    target = shrink_factor * min(zooms)
    return [max(1, round(target / z)) for z in zooms]


def n4_correct(
    image: NDArray,
    affine: NDArray[np.float64],
    body_mask: NDArray[np.bool_] | None = None,
    *,
    shrink_factor: int = 4,
    iterations: Sequence[int] = (50, 50, 50),
    convergence_threshold: float = 1e-3,
    control_points: int = 4,
    full_resolution: bool = False,
    threads: int = 1,
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Remove a smooth multiplicative bias field with N4 (SimpleITK).

    The field is fitted on a copy shrunk to about ``shrink_factor`` times the finest voxel
    spacing (thick slices are not shrunk further), then evaluated at full resolution from the
    fitted B-spline (``GetLogBiasFieldAsImage``), so the cost of the fit does not grow with the
    in-plane matrix.

    Parameters
    ----------
    image : ndarray, shape (X, Y, Z)
        Intensities (any positive scale).
    affine : ndarray, shape (4, 4)
        Voxel to RAS+ world (mm); gives N4 the voxel spacing.
    body_mask : ndarray of bool, optional
        Voxels to fit on.  Default: :func:`body_mask` of the image.  Voxels <= 0 are always left
        out (N4 works on log intensities).
    shrink_factor : int
        Shrink of the finest axis for the fit (1 = no shrink).
    iterations : sequence of int
        Maximum iterations per fitting level (one entry per level; the B-spline mesh doubles at
        each level).
    convergence_threshold : float
        N4 convergence threshold.
    control_points : int
        B-spline control points per axis at the first level (>= 4 for cubic splines).
    full_resolution : bool
        Fit on the full-resolution image instead (slow; the "naive" reference of the benchmark).
    threads : int
        ITK threads for the fit and the field (default 1).  N4's result depends slightly on
        the thread count (the order of its parallel sums), so a fixed count makes a subject's
        numbers identical on every machine and executor; subjects run in parallel instead.

    Returns
    -------
    corrected : ndarray of float32
        ``image / bias_field``.
    bias_field : ndarray of float32
        Multiplicative field, scaled to median 1 inside the mask (so corrected intensities stay
        in the image's units).

    Examples
    --------
    >>> x = np.linspace(-1, 1, 32)
    >>> truth = np.where(np.hypot(*np.meshgrid(x, x, indexing="ij")) < 0.5, 100.0, 300.0)
    >>> img = np.repeat((truth * np.exp(0.2 * x)[:, None])[..., None], 4, axis=2)
    >>> corrected, field = n4_correct(img, np.diag([2.0, 2.0, 4.0, 1.0]), shrink_factor=1)
    >>> corrected.shape == img.shape and field.dtype == np.float32
    True
    """
    import SimpleITK as sitk

    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim != 3:
        msg = f"n4_correct needs a 3-D image, got shape {arr.shape}"
        raise ValueError(msg)
    if body_mask is None:
        body_mask = _body_mask_of(arr, affine)
    fit_mask = np.asarray(body_mask, dtype=bool) & (arr > 0)
    if fit_mask.sum() < 100:
        msg = "too few foreground voxels for bias-field correction"
        raise ValueError(msg)
    zooms = [float(z) for z in np.linalg.norm(affine[:3, :3], axis=0)]
    ax = _stack_axis(affine)
    if arr.shape[ax] < max(int(control_points), _MIN_N4_SLICES):  # issue 16: 1-3 slices
        return _n4_by_slice(
            arr, zooms, fit_mask, ax,
            shrink_factor=1 if full_resolution else shrink_factor, iterations=iterations,
            convergence_threshold=convergence_threshold, control_points=control_points,
            threads=threads,
        )  # fmt: skip
    img = _sitk_image(arr, affine)
    mask_img = _sitk_image(fit_mask.astype(np.uint8), affine)
    factors = [1, 1, 1] if full_resolution else _shrink_factors(zooms, shrink_factor)
    # Never shrink an axis below the control-point count (ITK fails on a 1-voxel axis).
    factors = [
        max(1, min(f, n // max(int(control_points), 1))) for f, n in zip(factors, arr.shape, strict=True)
    ]
    # Every ITK filter of the call (shrink, fit, field evaluation) on the same thread count.
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(threads))
    try:
        small = sitk.Shrink(img, factors) if any(f > 1 for f in factors) else img
        small_mask = sitk.Shrink(mask_img, factors) if any(f > 1 for f in factors) else mask_img
        n4 = sitk.N4BiasFieldCorrectionImageFilter()
        n4.SetNumberOfThreads(int(threads))
        n4.SetMaximumNumberOfIterations([int(i) for i in iterations])
        n4.SetConvergenceThreshold(float(convergence_threshold))
        n4.SetNumberOfControlPoints([int(control_points)] * 3)
        n4.Execute(small, small_mask)
        log_field = n4.GetLogBiasFieldAsImage(img)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)
    log_bias = np.transpose(sitk.GetArrayFromImage(log_field)).astype(np.float64)
    log_bias -= float(np.median(log_bias[fit_mask]))
    bias = np.exp(log_bias).astype(np.float32)
    corrected = (arr / bias).astype(np.float32)
    return corrected, bias


def bias_correction_effect(
    image: NDArray,
    corrected: NDArray,
    bias_field: NDArray,
    body: NDArray[np.bool_],
    left: NDArray[np.bool_],
    right: NDArray[np.bool_],
) -> dict[str, float]:
    """Summarise what bias correction changed.

    Parameters
    ----------
    image, corrected, bias_field : ndarray
        Before, after and the multiplicative field (same shape).
    body : ndarray of bool
        Body voxels (where the field's variation is measured).
    left, right : ndarray of bool
        Voxels of one reference tissue on the patient's left and right (the subcutaneous fat
        band split at the midline: pure fat, bright, so its median is not blurred by noise).

    Returns
    -------
    dict
        ``bias_cv_pct``: coefficient of variation of the field inside the body (%);
        ``bias_left_right_ratio``: mean field left / right;
        ``lr_ratio_before`` / ``lr_ratio_after``: median reference intensity left / right
        before and after correction (1 = no left/right shading left).

    Examples
    --------
    >>> field = np.array([1.0, 1.0, 2.0, 2.0]).reshape(4, 1, 1)
    >>> left = np.array([True, True, False, False]).reshape(4, 1, 1)
    >>> eff = bias_correction_effect(10 * field, np.full(field.shape, 10.0), field,
    ...                              np.ones(field.shape, bool), left, ~left)
    >>> eff["lr_ratio_before"], eff["lr_ratio_after"], eff["bias_left_right_ratio"]
    (0.5, 1.0, 0.5)
    """
    out: dict[str, float] = {}
    b = bias_field[body]
    out["bias_cv_pct"] = float(100.0 * b.std() / b.mean()) if b.size else math.nan
    if left.any() and right.any():
        out["bias_left_right_ratio"] = float(bias_field[left].mean() / bias_field[right].mean())
        for tag, arr in (("before", image), ("after", corrected)):
            lo_l, lo_r = float(np.median(arr[left])), float(np.median(arr[right]))
            out[f"lr_ratio_{tag}"] = lo_l / lo_r if lo_r > 0 else math.nan
    else:
        out["bias_left_right_ratio"] = math.nan
        out["lr_ratio_before"] = out["lr_ratio_after"] = math.nan
    return out


# --------------------------------------------------------------------------------------------
# Body outline, subcutaneous fat, tissue intensities
# --------------------------------------------------------------------------------------------


#: Distances to the muscles are computed at least this far (mm; see :func:`_distance_to`).
_NEAR_REACH_MM = 12.0
#: Memo of one measurement's intermediate masks and distance maps (:func:`shared_intermediates`).
_MEMO: ContextVar[dict[tuple[Any, ...], Any] | None] = ContextVar("esma_fat_memo", default=None)


@contextmanager
def shared_intermediates() -> Iterator[None]:
    """Compute each distance map and posterior mask once within this block.

    :func:`subcutaneous_band`, :func:`tissue_intensities` (perimuscular shell, fat-suppression
    check) and :func:`estimate_noise_sd` derive the same in-plane distance maps and posterior
    masks from the same body and muscle masks; :func:`helpers.metrics.measure` runs them inside
    this block so each is computed once per scan.  Results are identical with or without it
    (entries are keyed on the exact input bytes).  The memo lives only inside the block and
    only in the current thread or task context, so nothing is kept between subjects.
    """
    token = _MEMO.set({})
    try:
        yield
    finally:
        _MEMO.reset(token)


def _memo(key: tuple[Any, ...], compute: Callable[[], Any]) -> Any:
    """``compute()``, or its stored result for ``key`` inside :func:`shared_intermediates`.

    Stored arrays are made read-only, so a caller that would modify one fails loudly.
    """
    memo = _MEMO.get()
    if memo is None:
        return compute()
    if key not in memo:
        value = compute()
        if isinstance(value, np.ndarray):
            value.flags.writeable = False
        memo[key] = value
    return memo[key]


def _slice_key(mask2d: NDArray[np.bool_], sampling: tuple[float, ...]) -> tuple[Any, ...]:
    m = np.asarray(mask2d, dtype=bool)
    return (m.shape, sampling, m.tobytes())


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
    distance.  Memoised inside :func:`shared_intermediates`, reused for any roi within
    an earlier one.
    """
    key = (kind, *_slice_key(inside, sampling))
    roi = np.ones(inside.shape, dtype=bool) if roi is None else np.asarray(roi, dtype=bool)
    memo = _MEMO.get()
    if memo is not None:
        for done, reach, out in memo.get(key, ()):
            if reach >= reach_mm and not np.any(roi > done):  # roi within an earlier roi
                return out
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
    if memo is not None:
        out.flags.writeable = False
        memo.setdefault(key, []).append((roi, reach_mm, out))
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


def _slice_axis(affine: NDArray[np.float64]) -> int:
    from helpers.nifti import slice_axis

    return slice_axis(affine)


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
    labels, n = _label(dark)
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
    lab_in, n_in = _label(inside)
    if n_in > 1:
        sizes = np.bincount(lab_in.ravel())
        sizes[0] = 0
        inside = lab_in == int(np.argmax(sizes))
    # Fill holes slice by slice (ndi.binary_fill_holes of each slice, 4-connected): the
    # background connected in-plane to its slice's border stays out, the rest is filled.
    return ~_border_connected_inplane(~inside, ax)


_body_mask_of = body_mask  # n4_correct's parameter shadows the name


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
    if _MEMO.get() is None:
        return _posterior_of_muscle_uncached(muscle, affine, ax)
    key = ("posterior", muscle.shape, ax, np.asarray(affine, dtype=np.float64).tobytes(),
           muscle.tobytes())
    return _memo(key, lambda: _posterior_of_muscle_uncached(muscle, affine, ax))


def _posterior_of_muscle_uncached(
    muscle: NDArray[np.bool_], affine: NDArray[np.float64], ax: int
) -> NDArray[np.bool_]:
    mus_s = _to_stack(muscle, ax)
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
    return _from_stack(out, ax)


def subcutaneous_band(
    body: NDArray[np.bool_],
    muscle: NDArray[np.bool_],
    affine: NDArray[np.float64],
    *,
    depth_mm: tuple[float, float] = (2.0, 12.0),
    clearance_mm: float = 5.0,
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
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    inplane = tuple(float(z) for i, z in enumerate(zooms) if i != ax)
    body = np.asarray(body, dtype=bool)
    muscle = np.asarray(muscle, dtype=bool)
    body_s = _to_stack(body, ax)
    muscle_s = _to_stack(muscle, ax)
    posterior = _posterior_of_muscle(muscle, affine, ax) if posterior_only and muscle.any() else None
    post_s = _to_stack(posterior, ax) if posterior is not None else None
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
        depth = _depth_mm(b, inplane, depth_mm[1], roi)
        sel = b & (depth >= depth_mm[0]) & (depth <= depth_mm[1])
        if muscle_s[k].any():
            clear = _distance_to(muscle_s[k], inplane, clearance_mm, post)
            sel &= clear > clearance_mm
        if post is not None:
            sel &= post
        band[k] = sel
    return _from_stack(band, ax)


def _perimuscular_shell(
    muscle: NDArray[np.bool_], affine: NDArray[np.float64], inner_mm: float = 2.0,
    outer_mm: float = 10.0,
) -> NDArray[np.bool_]:
    """Voxels ``inner_mm``-``outer_mm`` (in-plane) outside the muscles, posterior half only."""
    ax = _slice_axis(affine)
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    inplane = tuple(float(z) for i, z in enumerate(zooms) if i != ax)
    muscle = np.asarray(muscle, dtype=bool)
    posterior = _posterior_of_muscle(muscle, affine, ax)
    mus_s = _to_stack(muscle, ax)
    post_s = _to_stack(posterior, ax)
    shell = np.zeros(mus_s.shape, dtype=bool)
    for k in range(mus_s.shape[0]):
        if mus_s[k].any():
            d = _distance_to(mus_s[k], inplane, outer_mm, post_s[k])
            shell[k] = (d >= inner_mm) & (d <= outer_mm) & post_s[k]
    return _from_stack(shell, ax)


def _without_skin_rim(
    band: NDArray[np.bool_], body: NDArray[np.bool_], affine: NDArray[np.float64],
    rim_mm: float = _SKIN_RIM_MM,
) -> NDArray[np.bool_]:
    """Band voxels deeper than the skin rim (in-plane distance to air > ``rim_mm`` mm, and more
    than 1.5 in-plane voxels, so a coarse voxel that mixes skin with fat is left out too)."""
    ax = _slice_axis(affine)
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    inplane = tuple(float(z) for i, z in enumerate(zooms) if i != ax)
    rim = max(float(rim_mm), 1.5 * max(inplane))
    band_s = _to_stack(np.asarray(band, dtype=bool), ax)
    body_s = _to_stack(np.asarray(body, dtype=bool), ax)
    core = np.zeros(band_s.shape, dtype=bool)
    for k in range(band_s.shape[0]):
        if band_s[k].any():
            depth = _depth_mm(body_s[k], inplane, rim, band_s[k])
            core[k] = band_s[k] & (depth > rim)
    return _from_stack(core, ax)


def _histogram_mode(values: NDArray, lo: float, hi: float, bins: int = 256) -> float:
    """Location of the highest peak of a lightly smoothed histogram in [lo, hi]."""
    values = np.asarray(values).ravel()
    v = values[(values >= lo) & (values <= hi)]
    if v.size == 0 or hi <= lo:
        return float(np.median(values)) if values.size else math.nan
    counts, edges = np.histogram(v, bins=bins, range=(lo, hi))
    smooth = ndi.gaussian_filter1d(counts.astype(np.float64), sigma=2.0, mode="nearest")
    i = int(np.argmax(smooth))
    width = edges[1] - edges[0]
    centre = edges[i] + width / 2
    # Refine to the median of the values within two bins of the peak (exact for a spike of
    # identical values, unbiased for a locally symmetric peak).
    near = v[np.abs(v - centre) <= 2 * width]
    return float(np.median(near)) if near.size else float(centre)


def _bright_class(values: NDArray) -> NDArray:
    """Values above Otsu's threshold (all of them when they hardly vary), as a 1-D array.

    Flattened first: scikit-image takes an array whose last axis has length 3 or 4 for an RGB
    image (and warns).
    """
    from skimage.filters import threshold_otsu

    values = np.asarray(values).ravel()
    if values.size < 20 or float(values.max() - values.min()) <= 1e-6 * max(
        1.0, abs(float(values.max()))
    ):
        return values
    upper = values[values > float(threshold_otsu(values, nbins=256))]
    return upper if upper.size >= 10 else values


def _lean_mode(values: NDArray, fat: float | None = None) -> float:
    """Low (lean-muscle) mode of muscle intensities.

    The highest histogram peak below half-way between the 2nd percentile and ``fat`` (default:
    the 99th percentile), so a heavily infiltrated muscle's fat peak is never taken for muscle.
    Values <= 0 are left out: a magnitude image is positive, and scanners that clip or mask
    dark voxels to exactly 0 would otherwise put a false peak there.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    positive = v[v > 0]
    if positive.size >= max(10, v.size // 2):
        v = positive
    if v.size == 0:
        return math.nan
    lo = float(np.percentile(v, 2))
    top = float(np.percentile(v, 99)) if fat is None else float(fat)
    hi = lo + (top - lo) / 2
    if hi <= lo:
        return float(np.median(v))
    return _histogram_mode(v, lo, hi)


# --------------------------------------------------------------------------------------------
# Noise: magnitude images are Rician
# --------------------------------------------------------------------------------------------


def rice_mean(nu: NDArray | float, sd: NDArray | float) -> NDArray[np.float64]:
    """Mean of a magnitude (Rician) signal of true amplitude ``nu`` and noise sd ``sd``.

    ``sd * sqrt(pi/2) * L_1/2(-nu^2 / (2 sd^2))``, written with exponentially scaled Bessel
    functions so it is stable at any signal-to-noise ratio; ``sd = 0`` gives ``nu``.

    Examples
    --------
    >>> float(rice_mean(0.0, 1.0)) == float(np.sqrt(np.pi / 2))  # Rayleigh
    True
    >>> round(float(rice_mean(100.0, 1.0)), 3)  # high SNR: nu + sd^2 / (2 nu)
    100.005
    """
    from scipy.special import i0e, i1e

    nu = np.abs(np.asarray(nu, dtype=np.float64))
    sd = np.asarray(sd, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = nu**2 / (4 * sd**2)
        out = sd * np.sqrt(np.pi / 2) * ((1 + 2 * t) * i0e(t) + 2 * t * i1e(t))
        # Far above the noise the series loses precision; the asymptote is exact there.
        out = np.where(t > 1e4, nu + sd**2 / (2 * np.maximum(nu, 1e-300)), out)
    return np.where(sd > 0, out, nu)


def _rice_mode(nu: float, sd: float) -> float:
    """Most likely value of a Rician signal (numerical: the log-density's maximum on a grid of
    4001 points up to ``nu + 6 sd``, refined by a parabola through it and its neighbours)."""
    from scipy.special import i0e

    if sd <= 0:
        return float(nu)
    n = 4001
    start, stop = 1e-6, float(nu + 6 * sd)
    step = (stop - start) / (n - 1)
    if step == 0:  # pragma: no cover - needs sd ~ 1e-7
        full = np.linspace(start, stop, n)

        def grid(lo: int, hi: int) -> NDArray[np.float64]:
            return full[lo:hi]
    else:

        def grid(lo: int, hi: int) -> NDArray[np.float64]:
            # np.linspace(start, stop, n)[lo:hi], computed as linspace computes it (index *
            # step + start, the last point exactly stop) without the other ~4000 points.
            xs = np.arange(lo, hi, dtype=np.float64) * step + start
            if hi == n:
                xs[-1] = stop
            return xs

    def logpdf(lo: int, hi: int) -> NDArray[np.float64]:
        xs = grid(lo, hi)
        return np.log(xs) - (xs - nu) ** 2 / (2 * sd**2) + np.log(i0e(xs * nu / sd**2))

    # The density is unimodal, so the grid maximum is the one point of a window that is higher
    # than both its neighbours: evaluate a window around sqrt(nu^2 + sd^2) (the mode for nu = 0
    # and for nu >> sd) and widen it uphill until its maximum lies inside.  The same grid point
    # as evaluating the whole grid (amplitude_from_mode calls this ~50 times per tissue).
    x0, x1 = (float(v) for v in grid(0, 2))
    guess = math.sqrt(nu * nu + sd * sd)
    i = min(n - 1, max(0, round(float((guess - x0) / (x1 - x0)))))
    lo, hi = max(0, i - 8), min(n, i + 9)
    y = logpdf(lo, hi)
    while True:
        j = int(np.argmax(y))
        if j == 0 and lo > 0:
            lo, y = max(0, lo - 32), np.concatenate([logpdf(max(0, lo - 32), lo), y])
        elif j == y.size - 1 and hi < n:
            hi, y = min(n, hi + 32), np.concatenate([y, logpdf(hi, min(n, hi + 32))])
        else:
            break
    i = lo + j
    if 0 < i < n - 1:
        y0, y1, y2 = y[j - 1], y[j], y[j + 1]
        denom = y0 - 2 * y1 + y2
        xi = grid(i, i + 1)[0]
        if denom < 0:
            return float(xi + (x1 - x0) * 0.5 * (y0 - y2) / denom)
        return float(xi)
    return float(grid(i, i + 1)[0])


def amplitude_from_mode(mode: float, sd: float) -> float:
    """True amplitude whose Rician distribution (noise sd ``sd``) peaks at ``mode``.

    Examples
    --------
    >>> round(amplitude_from_mode(_rice_mode(50.0, 24.0), 24.0), 2)
    50.0
    """
    if sd <= 0 or not np.isfinite(mode):
        return float(mode)
    if mode <= _rice_mode(0.0, sd):
        return 0.0
    lo, hi = 0.0, float(mode) + 2 * sd
    for _ in range(50):
        mid = (lo + hi) / 2
        if _rice_mode(mid, sd) < mode:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


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


def estimate_noise_sd(
    image: NDArray,
    body: NDArray[np.bool_],
    *,
    muscle: NDArray[np.bool_] | None = None,
    affine: NDArray[np.float64] | None = None,
    muscle_values: NDArray | None = None,
    margin_voxels: int = 5,
    max_zero_share: float = 0.1,
) -> tuple[float, str]:
    """Noise sd of a magnitude image (image units).

    From the air around the body (``margin_voxels`` away from it; behind the back when
    ``muscle`` and ``affine`` are given), where the signal is pure Rayleigh noise: ``sd = median / sqrt(2 ln 2)`` (the median resists ghosting).  Scanners that
    zero the background (more than ``max_zero_share`` exact zeros) leave no noise to measure;
    then the left flank of the lean-muscle peak is used (root-mean-square distance below its
    mode, an upper bound that includes tissue texture), or 0 when there is nothing to use.

    Returns
    -------
    sd : float
    source : str
        ``"background"``, ``"muscle_peak"`` or ``"none"``.
    """
    arr = np.asarray(image, dtype=np.float32)
    body = np.asarray(body, dtype=bool)
    bg = None
    if muscle is not None and affine is not None and np.any(muscle):
        # Air behind the back: what looks like air in front of the belly can be dark bowel.
        posterior = _posterior_of_muscle(np.asarray(muscle, dtype=bool), affine,
                                         _slice_axis(affine))
        if posterior.any():
            box = [np.flatnonzero(posterior.any(axis=tuple(a for a in range(3) if a != axis)))
                   for axis in range(3)]
            inner = tuple(slice(int(b[0]), int(b[-1]) + 1) for b in box)
            behind = _away_from(body, margin_voxels, inner) & posterior[inner]
            if behind.sum() >= 1000:
                bg = arr[inner][behind]  # = arr[outside & posterior], same (C) order
    if bg is None:
        bg = arr[_away_from(body, margin_voxels)]
    if bg.size >= 1000 and np.mean(bg == 0) <= max_zero_share:
        return float(np.median(bg) / np.sqrt(2 * np.log(2))), "background"
    if muscle_values is not None and np.asarray(muscle_values).size >= 100:
        v = np.asarray(muscle_values, dtype=np.float64)
        mode = _lean_mode(v)
        below = v[(v < mode) & (v > 0)]
        if below.size >= 50:
            return float(np.sqrt(np.mean((below - mode) ** 2))), "muscle_peak"
    return 0.0, "none"


# --------------------------------------------------------------------------------------------
# Tissue intensities
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TissueIntensities:
    """Reference intensities of one subject (same units as the image).

    Attributes
    ----------
    muscle : float
        Lean muscle, noise-free amplitude (from the low mode of the pooled muscle intensities,
        corrected for the Rician noise floor).
    fat : float
        Pure fat, noise-free amplitude (from the mode of the subcutaneous fat).
    band_median : float
        Median of the subcutaneous band (the fat-suppression check).
    n_fat_voxels : int
        Voxels the fat intensity came from.
    fat_source : str
        ``"subcutaneous_band"``, or ``"body_histogram"`` when no band was found (field of view
        inside the body) and the upper mode of the body histogram was used.
    noise_sd : float
        Typical noise sd in the muscles (image units) the modes were corrected with.
    muscle_mode : float
        The lean-muscle histogram mode before noise correction.
    fat_to_bright : float
        Fat-suppression check: median of the subcutaneous fat (skin rim left out; the tissue
        behind the muscles when there is no band) over the body's bright tissue level (its 99th
        percentile).  NaN when not measured.
    """

    muscle: float
    fat: float
    band_median: float
    n_fat_voxels: int
    fat_source: str
    noise_sd: float = 0.0
    muscle_mode: float = math.nan
    fat_to_bright: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record."""
        return {
            "muscle_intensity": self.muscle,
            "fat_intensity": self.fat,
            "muscle_mode": self.muscle_mode,
            "noise_sd": self.noise_sd,
            "subcutaneous_band_median": self.band_median,
            "n_fat_voxels": self.n_fat_voxels,
            "fat_source": self.fat_source,
            "fat_to_bright": (
                float(self.fat_to_bright) if np.isfinite(self.fat_to_bright) else None
            ),
        }


def tissue_intensities(
    image: NDArray,
    muscle: NDArray[np.bool_],
    affine: NDArray[np.float64],
    *,
    body: NDArray[np.bool_] | None = None,
    band: NDArray[np.bool_] | None = None,
    muscle_values: NDArray | None = None,
    noise_sd: float = 0.0,
    path: str | Path | None = None,
    min_band_voxels: int = 200,
    min_fat_to_bright: float = _FS_MIN_FAT_TO_BRIGHT,
    min_shell_to_bright: float = _FS_MIN_SHELL_TO_BRIGHT,
    min_fat_to_muscle: float = 1.5,
) -> TissueIntensities:
    """Find the fat and lean-muscle reference intensities of one subject.

    Parameters
    ----------
    image : ndarray
        Intensities (bias-corrected when correction is on).
    muscle : ndarray of bool
        Muscle voxels (all labels, both sides).
    affine : ndarray
        Voxel to world (mm).
    body : ndarray of bool, optional
        Body outline; default :func:`body_mask`.
    band : ndarray of bool, optional
        Subcutaneous band; default :func:`subcutaneous_band` of ``body``.
    muscle_values : ndarray, optional
        Intensities to take the lean mode from (default: ``image[muscle]``); lets the caller
        leave some muscles out of the pooled reference.
    noise_sd : float
        Typical noise sd in the muscles (image units); the modes of a Rician signal sit above
        its true amplitude and are corrected for it (0: no correction).
    path : path, optional
        Image file, named in errors.
    min_band_voxels : int
        Fewer subcutaneous voxels than this: fall back to the body histogram.
    min_fat_to_bright, min_shell_to_bright : float
        Fat-suppression bars (see Notes): the subcutaneous fat's and the perimuscular shell's
        median as a share of the body's bright tissue level.  Measurement uses the defaults;
        the check after segmentation (:meth:`helpers.segment.Segmenter.predict`) a lower bar,
        since a Dixon water + fat image is segmented too.
    min_fat_to_muscle : float
        Fat's mode over lean muscle's below which fat cannot be classified (measurement: 1.5;
        the check after segmentation only asks fat to be brighter, 1.0).

    Raises
    ------
    InputFileError
        A fat-suppressed image, or no fat/muscle contrast at all.

    Notes
    -----
    Fat suppression is recognised by two signs, each in the image's own units:

    - fat around the muscles (the subcutaneous band, or the tissue 2-10 mm behind the muscles)
      no brighter than the median muscle voxel ("fat darker than muscle");
    - fat not among the brightest tissues: the median of the subcutaneous band, its skin rim
      left out, below 60 % of the body's 99th percentile (fluid, or fat itself, on T2), or the
      tissue behind the muscles below 30 % of it.

    A comparison with lean muscle alone cannot tell partial suppression (fat x 0.3, still about
    5 x brighter than lean muscle) from a normal T2 with a shorter echo time, and the bright
    class of the band is skin, not fat, once fat is suppressed; fluid and skin keep their
    signal, so fat's place below them is the robust sign.
    """
    arr = np.asarray(image, dtype=np.float32)
    muscle = np.asarray(muscle, dtype=bool)
    where = Path(path) if path is not None else Path("<image>")
    if not muscle.any():
        raise InputFileError(where, "mask holds no muscle voxels: nothing to measure")
    if body is None:
        body = body_mask(arr, affine, muscle)
    if band is None:
        band = subcutaneous_band(body, muscle, affine)
    mvals = arr[muscle] if muscle_values is None else np.asarray(muscle_values).ravel()

    if int(band.sum()) >= min_band_voxels:
        bvals = arr[band].astype(np.float64)
        band_median = float(np.median(bvals))
        # The band also holds skin, fascia and (anteriorly) abdominal wall: take the mode of its
        # bright class.
        upper = _bright_class(bvals)
        fat_mode = _histogram_mode(upper, float(upper.min()), float(np.percentile(upper, 99.5)))
        source, n_fat = "subcutaneous_band", int(upper.size)
    else:
        # Upper mode of the body outside the muscles.
        bvals = arr[body & ~muscle].astype(np.float64)
        if bvals.size < min_band_voxels:
            raise InputFileError(where, "cannot locate fat: too few body voxels outside muscle")
        upper = _bright_class(bvals)
        band_median = float(np.median(upper))
        fat_mode = _histogram_mode(upper, float(upper.min()), float(np.percentile(upper, 99.5)))
        source, n_fat = "body_histogram", int(upper.size)
    lean_mode = _lean_mode(mvals, fat=max(fat_mode, float(np.percentile(mvals, 99))))
    muscle_median = float(np.median(mvals))
    # Fat suppression probe: the tissue just behind the muscles (2-10 mm out, posterior half),
    # mostly fat on any lumbar T2.  It does not rely on the body outline, which fat
    # suppression breaks (suppressed fat looks like air).
    shell = _perimuscular_shell(muscle, affine)
    has_shell = int(shell.sum()) >= 50
    shell_median = float(np.median(arr[shell])) if has_shell else band_median
    probe = min(band_median, shell_median)
    if probe <= muscle_median or fat_mode <= lean_mode:
        refuse_mask_off_muscle(arr, muscle, affine, body, where, band_median)  # the real cause
        msg = (
            f"fat darker than muscle: fat-suppressed image? (fat around the muscles {probe:.4g} "
            f"vs muscle {muscle_median:.4g}); fat infiltration needs a T2 image without fat "
            "suppression"
        )
        raise InputFileError(where, msg)
    try:
        fat_to_bright = _check_fat_is_bright(
            arr, body, band if source == "subcutaneous_band" else None, affine,
            shell_median if has_shell else None, where,
            min_fat=min_fat_to_bright, min_shell=min_shell_to_bright,
        )
    except InputFileError:
        refuse_mask_off_muscle(arr, muscle, affine, body, where, band_median)
        raise
    if fat_mode < min_fat_to_muscle * lean_mode:
        msg = (
            f"too little fat/muscle contrast to classify fat (subcutaneous fat {fat_mode:.4g} vs "
            f"lean muscle {lean_mode:.4g}; expected fat at least {min_fat_to_muscle:g} x "
            "brighter on T2)"
        )
        raise InputFileError(where, msg)
    sd = float(noise_sd) if noise_sd and np.isfinite(noise_sd) else 0.0
    lean = amplitude_from_mode(lean_mode, sd)
    fat_amp = amplitude_from_mode(fat_mode, sd)
    return TissueIntensities(
        float(lean), float(fat_amp), band_median, n_fat, source, sd, float(lean_mode),
        fat_to_bright,
    )


#: A mask with more than this share of its voxels outside the body lies in the air.
_MASK_MAX_OUTSIDE = 0.5
#: A mask whose median is at most this many noise sd lies in the air (Rayleigh noise alone has
#: a median of 1.18 sd).
_MASK_MAX_NOISE_SD = 1.4
#: A mask whose median is at least this share of the body's bright level lies in fat.
_MASK_MAX_BRIGHT = 0.6


def refuse_mask_off_muscle(
    image: NDArray,
    muscle: NDArray[np.bool_],
    affine: NDArray[np.float64],
    body: NDArray[np.bool_] | None,
    where: str | Path,
    fat_level: float | None = None,
) -> None:
    """Refuse, naming the cause, a mask that does not lie on muscle (issue 18).

    Called where the image would otherwise be refused as fat-suppressed, because a misplaced
    mask (in the air, or on subcutaneous fat) fails the same checks:

    - more than half of the mask's voxels lie outside the body outline (the mask's voxels
      count as body, but only the largest connected object is kept, so a mask out in the air
      is an island that is dropped), or the mask's median is at the noise level of the air
      around the body (at most 1.4 noise sd; pure noise has a median of 1.18 sd): the mask lies
      in the air;
    - the mask's median is at least 60 % of the body's bright tissue level (its 99th
      percentile), and so is the subcutaneous fat (``fat_level``, when given: the image is
      fat-bright, not fat-suppressed): the mask lies on fat (or on a muscle too fatty, over
      about 60 %, to measure on one image).

    Returns silently when neither holds (the caller's message stands).

    Raises
    ------
    InputFileError
        Naming the image and saying that the mask does not lie on muscle.
    """
    arr = np.asarray(image, dtype=np.float32)
    muscle = np.asarray(muscle, dtype=bool)
    n = int(np.count_nonzero(muscle))
    if not n:
        return
    # The body outline with the mask forced in keeps only the largest connected object: mask
    # voxels out in the air, away from the body, fall outside it.
    body = body_mask(arr, affine, muscle) if body is None else np.asarray(body, dtype=bool)
    outside = 1.0 - float(np.count_nonzero(body & muscle)) / n
    if outside > _MASK_MAX_OUTSIDE:
        msg = (
            f"the mask does not lie on muscle: {100 * outside:.0f} % of its voxels lie in the air "
            "outside the body (wrong mask for this image, or a flipped or shifted grid?)"
        )
        raise InputFileError(where, msg)
    median = float(np.median(arr[muscle]))
    sd, source = estimate_noise_sd(arr, body)
    if source == "background" and median <= _MASK_MAX_NOISE_SD * sd:
        msg = (
            f"the mask does not lie on muscle: its voxels are at the noise level of the air "
            f"around the body (median {median:.4g}, noise sd {sd:.4g}); wrong mask for this "
            "image, or a flipped or shifted grid?"
        )
        raise InputFileError(where, msg)
    if np.count_nonzero(body) < 100:
        return
    bright = float(np.percentile(arr[body], _FS_BRIGHT_PERCENTILE))
    fat_bright = fat_level is None or fat_level >= _MASK_MAX_BRIGHT * bright
    if bright > 0 and fat_bright and median >= _MASK_MAX_BRIGHT * bright:
        msg = (
            f"the mask does not lie on muscle: its voxels are as bright as fat (median "
            f"{median:.4g}, {100 * median / bright:.0f} % of the body's bright tissue level "
            f"{bright:.4g}); wrong mask for this image, or a muscle too fatty (over about 60 %) "
            "to measure on a single image?"
        )
        raise InputFileError(where, msg)


def _check_fat_is_bright(
    image: NDArray[np.float32],
    body: NDArray[np.bool_],
    band: NDArray[np.bool_] | None,
    affine: NDArray[np.float64],
    shell_median: float | None,
    where: Path,
    min_fat: float = _FS_MIN_FAT_TO_BRIGHT,
    min_shell: float = _FS_MIN_SHELL_TO_BRIGHT,
) -> float:
    """Refuse a fat-suppressed image whose fat is not among the brightest tissues.

    Returns the subcutaneous fat's (or, without a band, the perimuscular shell's) median over
    the body's bright tissue level, NaN when nothing could be measured.  See the Notes of
    :func:`tissue_intensities`.
    """
    body = np.asarray(body, dtype=bool)
    if np.count_nonzero(body) < 100:
        return math.nan
    bright = float(np.percentile(image[body], _FS_BRIGHT_PERCENTILE))
    if not (np.isfinite(bright) and bright > 0):
        return math.nan

    def refuse(what: str, level: float, share: float, limit: float) -> None:
        msg = (
            f"fat not among the brightest tissues: fat-suppressed image? ({what} {level:.4g} is "
            f"{100 * share:.0f} % of the body's bright tissue level {bright:.4g}, its "
            f"{_FS_BRIGHT_PERCENTILE:g}th percentile; on T2 without fat suppression at least "
            f"{100 * limit:.0f} %); fat infiltration needs a T2 image without fat suppression"
        )
        raise InputFileError(where, msg)

    ratio = math.nan
    if band is not None:
        core = _without_skin_rim(band, body, affine)
        if int(core.sum()) < 50:
            core = np.asarray(band, dtype=bool)
        fat_level = float(np.median(image[core]))
        ratio = fat_level / bright
        if ratio < min_fat:
            refuse("subcutaneous fat, skin rim left out,", fat_level, ratio, min_fat)
    if shell_median is not None:
        shell_ratio = shell_median / bright
        if shell_ratio < min_shell:
            refuse("fat behind the muscles", shell_median, shell_ratio, min_shell)
        if not np.isfinite(ratio):
            ratio = shell_ratio
    return float(ratio)


# --------------------------------------------------------------------------------------------
# Fat classification
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FatReference:
    """One fitted classification reference, shared by both sides.

    Attributes
    ----------
    method : str
        One of :data:`FAT_METHODS`.
    muscle_intensity, fat_intensity : float
        Lean-muscle and fat intensities (image units) the fit was anchored on.
    threshold : float or None
        Intensity above which a voxel is fat (threshold methods); None for ``unmix``.
    n_voxels : int
        Muscle voxels pooled in the fit.
    collapsed : bool
        The fit found no fat cluster and fell back to the half-way threshold.
    components : tuple of dict
        Mixture components or cluster centres (``mean``, ``sd``, ``weight``), lean first.
    scope : str
        ``"subject"`` or the level name the fit belongs to.
    """

    method: str
    muscle_intensity: float
    fat_intensity: float
    threshold: float | None
    n_voxels: int
    collapsed: bool = False
    components: tuple[dict[str, float], ...] = field(default_factory=tuple)
    scope: str = "subject"

    def fraction(
        self,
        values: NDArray,
        *,
        clip: bool = True,
        noise_sd: NDArray | float | None = None,
    ) -> NDArray[np.float32]:
        """Per-voxel fat fraction (0-1) of intensities ``values``.

        Threshold methods give 0 or 1.  ``unmix`` gives the linear two-tissue fraction, clipped
        to [0, 1] unless ``clip=False`` (the unclipped value is what an area-weighted mean over
        many voxels should use: clipping each noisy lean voxel at 0 biases a mean upward by
        about 0.4 x noise sd / (I_fat - I_muscle)).

        With ``noise_sd`` (per voxel or one value, image units), ``unmix`` compares each voxel
        with the *expected* magnitude of lean muscle and of fat at that noise level
        (:func:`rice_mean`): dark muscle sits on the noise floor of a magnitude image, where the
        mean intensity exceeds the true amplitude, by more where the signal is weaker.

        Examples
        --------
        >>> ref = FatReference("unmix", 100.0, 500.0, None, 10)
        >>> ref.fraction(np.array([50.0, 100.0, 300.0, 600.0])).tolist()
        [0.0, 0.0, 0.5, 1.0]
        >>> FatReference("otsu", 100.0, 500.0, 250.0, 10).fraction(np.array([249.0, 251.0])).tolist()
        [0.0, 1.0]
        """
        v = np.asarray(values, dtype=np.float64)
        if self.method == "unmix":
            lean, fat_i = self.muscle_intensity, self.fat_intensity
            if noise_sd is not None and np.any(np.asarray(noise_sd) > 0):
                lean = rice_mean(lean, noise_sd)
                fat_i = rice_mean(fat_i, noise_sd)
            f = (v - lean) / (fat_i - lean)
            if clip:
                f = np.clip(f, 0.0, 1.0)
            return f.astype(np.float32)
        return (v > float(self.threshold)).astype(np.float32)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record."""
        return {
            "method": self.method,
            "scope": self.scope,
            "threshold": self.threshold,
            "muscle_intensity": self.muscle_intensity,
            "fat_intensity": self.fat_intensity,
            "n_voxels": self.n_voxels,
            "collapsed": self.collapsed,
            "components": [dict(c) for c in self.components],
        }


def _quantile_sample(values: NDArray, n: int) -> NDArray[np.float64]:
    """At most ``n`` values at evenly spaced quantiles (order-independent, deterministic).

    Always 1-D (any input shape is flattened first).
    """
    v = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if v.size <= n:
        return v
    idx = np.round(np.linspace(0, v.size - 1, n)).astype(np.int64)
    return v[idx]


def _posterior_crossing(score: Any, lo: float, hi: float) -> float:
    """Lower edge of the fat region: below ``hi``, the largest x where ``score`` drops under 1/2.

    Scanning down from the fat component's mean (rather than up from the lean one) keeps a
    mixture component that sits on the lean peak from pulling the threshold into it.
    """
    grid = np.linspace(lo, hi, 2001)
    s = score(grid)
    below = np.nonzero(s < 0.5)[0]
    if below.size == 0:
        return lo
    i = int(below[-1])
    if i == grid.size - 1:
        return hi
    x0, x1, s0, s1 = grid[i], grid[i + 1], s[i], s[i + 1]
    return float(x0 + (0.5 - s0) * (x1 - x0) / (s1 - s0)) if s1 != s0 else float(x1)


def fit_reference(
    values: NDArray,
    tissues: TissueIntensities,
    method: str,
    *,
    scope: str = "subject",
    max_samples: int = _MAX_FIT_SAMPLES,
) -> FatReference:
    """Fit one fat classification reference to pooled muscle intensities.

    Parameters
    ----------
    values : ndarray
        Intensities of the muscle voxels of both sides, pooled (never one side alone); any
        shape (flattened: a volume is never read as an image with colour channels).
    tissues : TissueIntensities
        The subject's lean-muscle and fat intensities (anchors and initial values).
    method : str
        One of :data:`FAT_METHODS`.
    scope : str
        Recorded in the reference (``"subject"`` or a level name).
    max_samples : int
        Mixture and cluster fits use at most this many evenly spaced quantiles of ``values``.

    Returns
    -------
    FatReference

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> v = np.concatenate([rng.normal(50, 5, 9000), rng.normal(600, 20, 1000)])
    >>> tis = TissueIntensities(50.0, 600.0, 600.0, 100, "subcutaneous_band")
    >>> ref = fit_reference(v, tis, "gmm2")
    >>> 150 < ref.threshold < 500, round(float(ref.fraction(v).mean()), 2)
    (True, 0.1)
    """
    if method not in FAT_METHODS:
        msg = f"unknown fat method {method!r}; choose one of {', '.join(FAT_METHODS)}"
        raise ValueError(msg)
    v = np.asarray(values, dtype=np.float64).ravel()
    im, fa = float(tissues.muscle), float(tissues.fat)
    if v.size == 0:
        msg = "no muscle voxels to fit the fat reference on"
        raise ValueError(msg)
    if method == "unmix":
        return FatReference(method, im, fa, None, int(v.size), scope=scope)
    # Work in units of the fat intensity: fits are then exactly scale-invariant.
    scale = fa
    x = _quantile_sample(v, max_samples) / scale
    m0, m1 = im / scale, fa / scale
    span = m1 - m0
    comps: tuple[dict[str, float], ...] = ()
    suspicious = False
    if method == "otsu":
        from skimage.filters import threshold_otsu

        t = float(threshold_otsu(x, nbins=256))
        # Any threshold in the empty gap around t classifies alike: take the gap's middle
        # (Otsu's criterion is flat there and the first bin of the gap is arbitrary).
        below, above = x[x <= t], x[x > t]
        if below.size and above.size:
            t = float((below.max() + above.min()) / 2)
    elif method == "kmeans2":
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=2, init=np.array([[m0], [m1]]), n_init=1, random_state=0)
        km.fit(x[:, None])
        c = np.sort(km.cluster_centers_.ravel())
        t = float(c.mean())
        sizes = np.bincount(km.labels_, minlength=2) / x.size
        order = np.argsort(km.cluster_centers_.ravel())
        comps = tuple(
            {"mean": float(c[i] * scale), "sd": math.nan, "weight": float(sizes[order[i]])}
            for i in range(2)
        )
        suspicious = c[1] < m0 + 0.5 * span
    else:
        from sklearn.mixture import GaussianMixture

        k = 2 if method == "gmm2" else 3
        init = np.array([[m0], [m1]]) if k == 2 else np.array([[m0], [(m0 + m1) / 2], [m1]])
        gm = GaussianMixture(
            n_components=k, means_init=init, random_state=0, reg_covar=1e-6, max_iter=200
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm.fit(x[:, None])
        order = np.argsort(gm.means_.ravel())
        means = gm.means_.ravel()[order]
        sds = np.sqrt(gm.covariances_.ravel()[order])
        weights = gm.weights_[order]
        comps = tuple(
            {"mean": float(means[i] * scale), "sd": float(sds[i] * scale),
             "weight": float(weights[i])}
            for i in range(k)
        )
        # Roles: the lowest and highest components that hold any voxels are lean and fat;
        # one in between is the intermediate (partial-volume) class and counts half.
        used = np.nonzero(weights >= 1e-3)[0]
        content = np.zeros(k)
        content[used[-1]] = 1.0
        content[used[1:-1]] = 0.5

        def score(g: NDArray) -> NDArray:
            post = gm.predict_proba(g[:, None])[:, order]
            return post @ content

        t = _posterior_crossing(score, means[used[0]], means[used[-1]])
        suspicious = means[-1] < m0 + 0.5 * span or weights[-1] < 0.002
    lo_ok, hi_ok = m0 + _THRESHOLD_RANGE[0] * span, m0 + _THRESHOLD_RANGE[1] * span
    # A threshold outside the plausible range matters only if it moves voxels: more than 1 %
    # of them lying between it and the range would be lean muscle called fat (or fat called
    # lean).
    if t < lo_ok:
        misplaced = float(np.mean((x > t) & (x <= lo_ok)))
    elif t > hi_ok:
        misplaced = float(np.mean((x >= hi_ok) & (x < t)))
    else:
        misplaced = 0.0
    collapsed = bool(suspicious or misplaced > _MAX_MISPLACED)
    if collapsed:
        log.warning(
            "%s fit found no fat cluster (threshold %.4g; %.1f %% of voxels between it and the "
            "plausible range %.4g-%.4g): using the half-way threshold between lean muscle and fat",
            method, t * scale, 100 * misplaced, lo_ok * scale, hi_ok * scale,
        )
        t = (m0 + m1) / 2
    return FatReference(
        method, im, fa, float(t * scale), int(v.size), collapsed=collapsed, components=comps,
        scope=scope,
    )


