"""Bias-field (coil shading) correction with SimpleITK's N4 filter.

Coil shading changes intensities from left to right, and a threshold or tissue reference shared
by both sides would turn it into a fake fat asymmetry.  :func:`n4_correct` removes the smooth
multiplicative field; :func:`bias_correction_effect` records how much it changed.  Pure
functions over arrays.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["bias_correction_effect", "n4_correct"]


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
            factors = _capped(_shrink_factors(plane_zooms, shrink_factor), plane.shape,
                              control_points)
            log_field = _fit_log_field(img, mask_img, factors, iterations=iterations,
                                       convergence_threshold=convergence_threshold,
                                       control_points=control_points, threads=threads)
            field = np.transpose(sitk.GetArrayFromImage(log_field))
            index: list[Any] = [slice(None)] * 3
            index[axis] = k
            log_bias[tuple(index)] = field
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)
    log_bias -= float(np.median(log_bias[fit_mask]))
    bias = np.exp(log_bias).astype(np.float32)
    return (arr / bias).astype(np.float32), bias


def _capped(factors: Sequence[int], shape: Sequence[int], control_points: int) -> list[int]:
    """Shrink factors that never shrink an axis below the control-point count (ITK fails on a
    1-voxel axis)."""
    return [max(1, min(int(f), int(n) // max(int(control_points), 1)))
            for f, n in zip(factors, shape, strict=True)]


def _fit_log_field(
    img: Any,
    mask_img: Any,
    factors: Sequence[int],
    *,
    iterations: Sequence[int],
    convergence_threshold: float,
    control_points: int,
    threads: int,
) -> Any:
    """Fit N4 on ``img`` shrunk by ``factors`` (inside ``mask_img``) and return its log bias
    field evaluated on ``img``'s full grid (SimpleITK images, 2-D or 3-D)."""
    import SimpleITK as sitk

    shrink = any(f > 1 for f in factors)
    small = sitk.Shrink(img, list(factors)) if shrink else img
    small_mask = sitk.Shrink(mask_img, list(factors)) if shrink else mask_img
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetNumberOfThreads(int(threads))
    n4.SetMaximumNumberOfIterations([int(i) for i in iterations])
    n4.SetConvergenceThreshold(float(convergence_threshold))
    n4.SetNumberOfControlPoints([int(control_points)] * img.GetDimension())
    n4.Execute(small, small_mask)
    return n4.GetLogBiasFieldAsImage(img)


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
        from helpers.tissue_geometry import body_mask as outline

        body_mask = outline(arr, affine)
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
    factors = _capped([1, 1, 1] if full_resolution else _shrink_factors(zooms, shrink_factor),
                      arr.shape, control_points)
    # Every ITK filter of the call (shrink, fit, field evaluation) on the same thread count.
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(threads))
    try:
        log_field = _fit_log_field(img, mask_img, factors, iterations=iterations,
                                   convergence_threshold=convergence_threshold,
                                   control_points=control_points, threads=threads)
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

