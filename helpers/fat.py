"""The fat step: bias correction, reference tissues and per-voxel fat fractions of one scan.

:func:`fat_step` takes an image, its muscle mask, the affine and :class:`FatSettings` and returns
the per-voxel fat fraction map and the record of how it was obtained (``reference.json``'s
``bias_correction``, ``noise`` and ``fits``).  It runs, in order:

1. tissue geometry (:func:`helpers.tissue_geometry.tissue_geometry`), computed once from the
   raw image and passed to every step below: body outline, subcutaneous fat band, its core
   without the skin rim, perimuscular shell, the muscles' posterior half;
2. N4 bias-field correction (:mod:`helpers.bias`): coil shading changes intensities from left to
   right, and a reference shared by both sides would turn it into a fake fat asymmetry;
3. the noise level of the magnitude image (:func:`helpers.intensity.estimate_noise_sd`);
4. the reference tissue intensities (:func:`tissue_intensities`) and the reference fit
   (:func:`helpers.fat_methods.fit_reference`, method from the :data:`METHODS` registry),
   once per subject (or per level), both sides pooled;
5. per-voxel fractions (:meth:`FatReference.fraction`).

The names of those modules are re-exported here (``fat.n4_correct``, ``fat.body_mask``, ...).

Reference tissues
-----------------
:func:`tissue_intensities` finds the two reference intensities of the subject: pure fat
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

Reference fit
-------------
:func:`fit_reference` (:mod:`helpers.fat_methods`) fits one classification reference (a
threshold, or the two tissue
intensities) to the muscle voxels of *both sides pooled*, once per subject (or once per
subject and level), never per side: per-side fits give the two sides different thresholds,
which shows up as a fake left/right difference.  :meth:`FatReference.fraction` then turns
intensities into per-voxel fat fractions in [0, 1].

Methods (:data:`METHODS`)
-------------------------
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

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from helpers.arrays import c_order
from helpers.bias import bias_correction_effect, n4_correct
from helpers.errors import ConfigError, InputFileError
from helpers.fat_methods import (
    DEFAULT_FAT_METHOD,
    FAT_METHODS,
    METHODS,
    FatMethod,
    FatReference,
    fit_reference,
)
from helpers.intensity import (
    _bright_class,
    _histogram_mode,
    _lean_mode,
    amplitude_from_mode,
    estimate_noise_sd,
    rice_mean,
)
from helpers.tissue_geometry import (
    TissueGeometry,
    _world_coordinate,
    body_mask,
    subcutaneous_band,
    tissue_geometry,
)
from helpers.tissue_geometry import perimuscular_shell as _perimuscular_shell
from helpers.tissue_geometry import without_skin_rim as _without_skin_rim

__all__ = [
    "DEFAULT_FAT_METHOD",
    "FAT_METHODS",
    "METHODS",
    "FatMethod",
    "FatReference",
    "FatSettings",
    "FatStep",
    "TissueGeometry",
    "TissueIntensities",
    "amplitude_from_mode",
    "bias_correction_effect",
    "body_mask",
    "c_order",
    "estimate_noise_sd",
    "fat_step",
    "fit_reference",
    "n4_correct",
    "refuse_mask_off_muscle",
    "rice_mean",
    "subcutaneous_band",
    "tissue_geometry",
    "tissue_intensities",
]

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
    geometry: TissueGeometry | None = None,
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
    geometry : TissueGeometry, optional
        The scan's tissue geometry (:func:`helpers.tissue_geometry.tissue_geometry`, of
        ``muscle``): body, band, its core and the perimuscular shell are read from it instead
        of being computed here (``body`` and ``band`` are then ignored).
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
    if geometry is not None:
        body, band = geometry.body, geometry.band
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
    shell = geometry.shell if geometry is not None else _perimuscular_shell(muscle, affine)
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
            core=geometry.band_core if geometry is not None else None,
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
    core: NDArray[np.bool_] | None = None,
) -> float:
    """Refuse a fat-suppressed image whose fat is not among the brightest tissues.

    Returns the subcutaneous fat's (or, without a band, the perimuscular shell's) median over
    the body's bright tissue level, NaN when nothing could be measured.  See the Notes of
    :func:`tissue_intensities`.  ``core``: the band without its skin rim, when already known.
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
        if core is None:
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
# The fat step
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FatSettings:
    """How the fat step runs (the fat part of :class:`helpers.metrics.MetricsSettings`).

    Attributes
    ----------
    method : str
        Fat classification method, a key of :data:`FAT_METHODS`.
    bias_correction : bool
        Run N4 bias-field correction first.
    n4_fit_spacing_mm : float
        N4 fits on a copy shrunk to about this voxel spacing (mm); the field is evaluated at
        full resolution.
    n4_iterations : tuple of int
        N4 iterations per fitting level.

    Raises
    ------
    ConfigError
        An unknown method.
    """

    method: str = DEFAULT_FAT_METHOD
    bias_correction: bool = True
    n4_fit_spacing_mm: float = 7.5
    n4_iterations: tuple[int, ...] = (50, 50, 50)

    def __post_init__(self) -> None:
        if self.method not in FAT_METHODS:
            msg = f"fat_method: {self.method!r} is not one of {', '.join(FAT_METHODS)}"
            raise ConfigError(msg)


@dataclass(frozen=True)
class FatStep:
    """What :func:`fat_step` returns.

    Attributes
    ----------
    fraction : ndarray of float32
        Per-voxel fat fraction (0-1, clipped) on the image grid, NaN outside the muscles.
    unclipped : ndarray of float32
        The same before clipping (what area-weighted means use; see :class:`FatReference`).
    record : dict
        JSON-ready: ``bias_correction`` (applied, settings, effect), ``noise`` (sd, source)
        and ``fits`` (one per reference: the subject's first, then each level's), each with its
        ``tissues``.
    collapsed : bool
        Some fit found no fat cluster (see :mod:`helpers.fat_methods`).
    geometry : TissueGeometry
        The tissue geometry the step used.
    """

    fraction: NDArray[np.float32]
    unclipped: NDArray[np.float32]
    record: dict[str, Any]
    collapsed: bool
    geometry: TissueGeometry


def _slice_selector(shape: tuple[int, ...], ax: int, sel: NDArray[np.bool_]) -> NDArray[np.bool_]:
    view = [1, 1, 1]
    view[ax] = shape[ax]
    return np.broadcast_to(np.asarray(sel, dtype=bool).reshape(view), shape)


def _bias_correct(
    img: NDArray[np.float32],
    affine: NDArray[np.float64],
    geometry: TissueGeometry,
    settings: FatSettings,
    where: Path,
) -> tuple[NDArray[np.float32], NDArray[np.float32] | None, dict[str, Any]]:
    """N4 of the image on the body outline, and the record of what it changed."""
    if not settings.bias_correction:
        return img, None, {"applied": False}
    t0 = time.perf_counter()
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    shrink = max(1, round(settings.n4_fit_spacing_mm / float(min(zooms))))
    try:
        work, bias = n4_correct(
            img, affine, geometry.body, shrink_factor=shrink, iterations=settings.n4_iterations,
        )
    except RuntimeError as exc:  # ITK's own errors: one line, naming the file (issue 16)
        first = " ".join(str(exc).split())[:200]
        msg = (f"bias-field correction (N4) failed ({first}); "
               "measure without it (--no-bias-correction / metrics.bias_correction: false)")
        raise InputFileError(where, msg) from exc
    # Shading probe: the subcutaneous fat band, split at the muscles' midline (world x).
    x = np.broadcast_to(_world_coordinate(img.shape, affine, 0), img.shape)
    x_mid = float(x[geometry.muscle].mean())
    band = geometry.band
    effect = bias_correction_effect(
        img, work, bias, geometry.body, band & (x < x_mid), band & (x >= x_mid)
    )
    record = {
        "applied": True,
        "method": "N4 (SimpleITK)",
        "shrink_factor": shrink,
        "iterations": list(settings.n4_iterations),
        "seconds": round(time.perf_counter() - t0, 3),
        **effect,
    }
    return work, bias, record


def fat_step(
    image: NDArray,
    muscle: NDArray[np.bool_],
    affine: NDArray[np.float64],
    settings: FatSettings | None = None,
    *,
    pool: NDArray[np.bool_] | None = None,
    levels: Sequence[tuple[str, NDArray[np.bool_]]] = (),
    path: str | Path | None = None,
) -> FatStep:
    """Per-voxel fat fractions of one scan, and the record of how they were obtained.

    Parameters
    ----------
    image : ndarray, shape (X, Y, Z)
        T2 intensities without fat suppression (float32, C order is fastest).
    muscle : ndarray of bool
        Muscle voxels (all labels, both sides).
    affine : ndarray, shape (4, 4)
        Voxel to RAS+ world (mm).
    settings : FatSettings, optional
        Default :class:`FatSettings`.
    pool : ndarray of bool, optional
        Voxels pooled in the reference fits (both sides; default: ``muscle``).  Each fit falls
        back to all its muscle voxels when none of its pooled ones is left.
    levels : sequence of (str, ndarray of bool)
        Per-level fits: level name and the slices (boolean, one per slice along the slice axis)
        it covers.  The subject-wide fit covers the slices no level does.  Empty: one fit for
        the subject.
    path : path, optional
        The image file, named in errors.

    Returns
    -------
    FatStep

    Raises
    ------
    InputFileError
        A fat-suppressed image, no fat/muscle contrast, a mask off muscle, N4 failing.
    """
    settings = settings or FatSettings()
    where = Path(path) if path is not None else Path("<image>")
    img = c_order(image, np.float32)
    muscle = c_order(muscle, bool)
    muscle_idx = np.flatnonzero(muscle.ravel())
    if not muscle_idx.size:
        raise InputFileError(where, "mask holds no muscle voxels: nothing to measure")
    pool_idx = muscle_idx if pool is None else np.flatnonzero(c_order(pool, bool).ravel())
    if not pool_idx.size:
        pool_idx = muscle_idx
    from helpers.nifti import slice_axis

    ax = slice_axis(affine)
    n_z = img.shape[ax]
    geometry = tissue_geometry(img, muscle, affine)
    work, bias, bias_record = _bias_correct(img, affine, geometry, settings, where)
    # Noise of the magnitude image (raw units), then per voxel in the working units.
    raw_sd, sd_source = estimate_noise_sd(
        img, geometry.body, muscle=muscle, affine=affine, muscle_values=img.ravel()[muscle_idx],
        posterior=geometry.posterior,
    )
    record: dict[str, Any] = {"bias_correction": bias_record,
                              "noise": {"sd": raw_sd, "source": sd_source}}

    groups: list[tuple[str, NDArray[np.bool_]]] = [("subject", np.ones(n_z, dtype=bool))]
    groups += [(name, np.asarray(sel, dtype=bool)) for name, sel in levels]
    fraction_map = np.full(img.shape, np.nan, dtype=np.float32)
    unclipped_map = np.full(img.shape, np.nan, dtype=np.float32)
    work_flat = np.ravel(work)
    bias_flat = np.ravel(bias) if bias is not None else None
    fits = []
    collapsed_any = False
    covered = np.zeros(n_z, dtype=bool)
    for name, sel_slices in reversed(groups):  # levels first, the subject fit fills the rest
        if name == "subject":
            sel_slices = ~covered
        if sel_slices.all():  # the whole stack: no copies
            g_geometry, g_muscle_idx, g_pool_idx = geometry, muscle_idx, pool_idx
        else:
            sel = _slice_selector(img.shape, ax, sel_slices)
            g_geometry = geometry.restricted(sel)
            flat_sel = sel.ravel()
            g_muscle_idx = muscle_idx[flat_sel[muscle_idx]]
            g_pool_idx = pool_idx[flat_sel[pool_idx]]
        if not g_muscle_idx.size:
            continue
        if not g_pool_idx.size:
            g_pool_idx = g_muscle_idx
        # Flat C-order gathers through the index arrays (= boolean selections).
        noise_pool = raw_sd / bias_flat[g_pool_idx] if bias_flat is not None else np.full(1, raw_sd)
        pool_values = work_flat[g_pool_idx]
        tissues = tissue_intensities(
            work, g_geometry.muscle, affine, geometry=g_geometry, muscle_values=pool_values,
            noise_sd=float(np.median(noise_pool)), path=where,
        )
        ref = fit_reference(pool_values, tissues, settings.method, scope=name)
        collapsed_any |= ref.collapsed
        fits.append({**ref.to_dict(), "tissues": tissues.to_dict()})
        vals = work_flat[g_muscle_idx]
        noise = raw_sd / bias_flat[g_muscle_idx] if bias_flat is not None else raw_sd
        unclipped = ref.fraction(vals, clip=False, noise_sd=noise)
        unclipped_map.ravel()[g_muscle_idx] = unclipped
        # = ref.fraction(vals, clip=True, ...): rounding to float32 is monotonic and keeps 0 and
        # 1, so clipping after it gives the same values (and skips a second evaluation).
        fraction_map.ravel()[g_muscle_idx] = np.clip(unclipped, 0.0, 1.0)
        covered |= sel_slices
    record["fits"] = list(reversed(fits))
    return FatStep(fraction_map, unclipped_map, record, collapsed_any, geometry)
