"""Intensities of a magnitude image: Rician noise, histogram modes, noise level.

Lean muscle on T2 is dark, close to the noise floor of a magnitude image, where noise is Rician:
the mean intensity of lean muscle exceeds its true amplitude, and by more where the coil is
weaker.  :func:`estimate_noise_sd` measures the noise in the air behind the back; modes are
converted to true amplitudes (:func:`amplitude_from_mode`) and :func:`rice_mean` gives the
expected magnitude of a tissue at a voxel's noise level.  Pure functions over arrays.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi

from helpers import arrays, tissue_geometry

__all__ = ["amplitude_from_mode", "estimate_noise_sd", "rice_mean"]


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


def estimate_noise_sd(
    image: NDArray,
    body: NDArray[np.bool_],
    *,
    muscle: NDArray[np.bool_] | None = None,
    affine: NDArray[np.float64] | None = None,
    muscle_values: NDArray | None = None,
    posterior: NDArray[np.bool_] | None = None,
    margin_voxels: int = 5,
    max_zero_share: float = 0.1,
) -> tuple[float, str]:
    """Noise sd of a magnitude image (image units).

    From the air around the body (``margin_voxels`` away from it; behind the back when
    ``muscle`` and ``affine`` are given), where the signal is pure Rayleigh noise: ``sd = median / sqrt(2 ln 2)`` (the median resists ghosting).  Scanners that
    zero the background (more than ``max_zero_share`` exact zeros) leave no noise to measure;
    then the left flank of the lean-muscle peak is used (root-mean-square distance below its
    mode, an upper bound that includes tissue texture), or 0 when there is nothing to use.

    ``posterior`` (optional): the muscles' posterior voxels when already known
    (:attr:`helpers.tissue_geometry.TissueGeometry.posterior`).

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
        if posterior is None:
            posterior = tissue_geometry._posterior_of_muscle(
                np.asarray(muscle, dtype=bool), affine, tissue_geometry._slice_axis(affine))
        if posterior.any():
            box = [np.flatnonzero(posterior.any(axis=tuple(a for a in range(3) if a != axis)))
                   for axis in range(3)]
            inner = tuple(slice(int(b[0]), int(b[-1]) + 1) for b in box)
            behind = arrays._away_from(body, margin_voxels, inner) & posterior[inner]
            if behind.sum() >= 1000:
                bg = arr[inner][behind]  # = arr[outside & posterior], same (C) order
    if bg is None:
        bg = arr[arrays._away_from(body, margin_voxels)]
    if bg.size >= 1000 and np.mean(bg == 0) <= max_zero_share:
        return float(np.median(bg) / np.sqrt(2 * np.log(2))), "background"
    if muscle_values is not None and np.asarray(muscle_values).size >= 100:
        v = np.asarray(muscle_values, dtype=np.float64)
        mode = _lean_mode(v)
        below = v[(v < mode) & (v > 0)]
        if below.size >= 50:
            return float(np.sqrt(np.mean((below - mode) ** 2))), "muscle_peak"
    return 0.0, "none"


