"""Fat classification methods: a registry of reference fits on pooled muscle intensities.

:func:`fit_reference` fits one classification reference (a threshold, or the two tissue
intensities) to the muscle voxels of *both sides pooled*, once per subject (or once per subject
and level), never per side: per-side fits give the two sides different thresholds, which shows
up as a fake left/right difference.  :meth:`FatReference.fraction` then turns intensities into
per-voxel fat fractions in [0, 1].

Each method is a :class:`FatMethod` in :data:`METHODS` (name -> method), with a one-line
description that the reports quote.  The threshold methods register a fit function
``fit(x, m0, m1) -> (threshold, components, suspicious)`` working in units of the fat
intensity (``x`` the pooled quantiles, ``m0``/``m1`` lean muscle and fat); a new method is one
function and one registry entry.  Every threshold is checked against the two tissue
intensities: a threshold below ``I_muscle + 0.2 x (I_fat - I_muscle)`` (or above
``I_muscle + 0.8 x (I_fat - I_muscle)``) with more than 1 % of the voxels in between (or a
mixture whose fat component is not fat-like: ``suspicious``) is replaced by the half-way point
``(I_muscle + I_fat) / 2`` and the reference says ``collapsed: true``.  See :mod:`helpers.fat`
for the methods and how the default was chosen.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
from numpy.typing import NDArray

from helpers.intensity import rice_mean

__all__ = [
    "DEFAULT_FAT_METHOD", "FAT_METHODS", "METHODS", "FatMethod", "FatReference", "fit_reference",
]

log = logging.getLogger(__name__)

#: Accepted position of a threshold between lean muscle (0) and fat (1); outside it the fit
#: counts as collapsed.
_THRESHOLD_RANGE = (0.2, 0.8)
#: Largest share of voxels a threshold outside that range may move before the fit counts as
#: collapsed.
_MAX_MISPLACED = 0.01
#: Pooled intensities are summarised by this many quantiles before mixture/cluster fits
#: (deterministic, independent of voxel order, fast).
_MAX_FIT_SAMPLES = 20_000

#: A threshold fit: ``(x, m0, m1) -> (threshold, components, suspicious)``, all in units of the
#: fat intensity; components as ``{"mean", "sd", "weight"}`` (means in those units), lean first.
ThresholdFit = Callable[[NDArray[np.float64], float, float],
                        tuple[float, tuple[dict[str, float], ...], bool]]


@dataclass(frozen=True)
class FatMethod:
    """One fat classification method of the registry.

    Attributes
    ----------
    name : str
        The ``fat_method`` setting that selects it.
    description : str
        One line for the reports (what a voxel's fat fraction is).
    fit : callable or None
        The threshold fit (see :data:`ThresholdFit`); None for the two-tissue model, whose
        reference is the tissue intensities themselves.
    """

    name: str
    description: str
    fit: ThresholdFit | None = None

    @property
    def threshold(self) -> bool:
        """Whether the method classifies by one intensity threshold (binary fractions)."""
        return self.fit is not None


def _fit_otsu(x: NDArray[np.float64], m0: float, m1: float
              ) -> tuple[float, tuple[dict[str, float], ...], bool]:
    """Otsu's threshold of the pooled intensities (scikit-image)."""
    from skimage.filters import threshold_otsu

    t = float(threshold_otsu(x, nbins=256))
    # Any threshold in the empty gap around t classifies alike: take the gap's middle
    # (Otsu's criterion is flat there and the first bin of the gap is arbitrary).
    below, above = x[x <= t], x[x > t]
    if below.size and above.size:
        t = float((below.max() + above.min()) / 2)
    return t, (), False


def _fit_kmeans2(x: NDArray[np.float64], m0: float, m1: float
                 ) -> tuple[float, tuple[dict[str, float], ...], bool]:
    """Two-cluster k-means (scikit-learn); threshold half-way between the cluster centres."""
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=2, init=np.array([[m0], [m1]]), n_init=1, random_state=0)
    km.fit(x[:, None])
    c = np.sort(km.cluster_centers_.ravel())
    sizes = np.bincount(km.labels_, minlength=2) / x.size
    order = np.argsort(km.cluster_centers_.ravel())
    comps = tuple(
        {"mean": float(c[i]), "sd": math.nan, "weight": float(sizes[order[i]])} for i in range(2)
    )
    return float(c.mean()), comps, bool(c[1] < m0 + 0.5 * (m1 - m0))


def _fit_gmm(k: int) -> ThresholdFit:
    """A ``k``-component Gaussian mixture fit (scikit-learn)."""

    def fit(x: NDArray[np.float64], m0: float, m1: float
            ) -> tuple[float, tuple[dict[str, float], ...], bool]:
        from sklearn.mixture import GaussianMixture

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
            {"mean": float(means[i]), "sd": float(sds[i]), "weight": float(weights[i])}
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
        return t, comps, bool(means[-1] < m0 + 0.5 * (m1 - m0) or weights[-1] < 0.002)

    return fit


#: The registry of fat classification methods (name -> :class:`FatMethod`), in the order the
#: benchmark lists them.  See the :mod:`helpers.fat` docstring for each.
METHODS: Mapping[str, FatMethod] = MappingProxyType({
    "unmix": FatMethod(
        "unmix",
        "partial-volume two-tissue model: f = (I - I_muscle) / (I_fat - I_muscle) per voxel, "
        "with the Rician-expected magnitudes of lean muscle and fat at the voxel's noise level"),
    "gmm3": FatMethod(
        "gmm3",
        "three-component Gaussian mixture (lean, intermediate, fat); a voxel is fat when its "
        "posterior-expected fat content exceeds 1/2 (binary)", _fit_gmm(3)),
    "gmm2": FatMethod(
        "gmm2", "two-component Gaussian mixture; fat above the equal-posterior threshold "
        "(binary)", _fit_gmm(2)),
    "kmeans2": FatMethod(
        "kmeans2", "two-cluster k-means; fat above the mid-point of the cluster centres "
        "(binary)", _fit_kmeans2),
    "otsu": FatMethod(
        "otsu", "Otsu's threshold of the pooled muscle intensities (binary)", _fit_otsu),
})
#: The method names (the values ``fat_method`` accepts).
FAT_METHODS: tuple[str, ...] = tuple(METHODS)
#: Default method, chosen from the phantom benchmark (``benchmarks/results/fat_methods.json``).
DEFAULT_FAT_METHOD = "unmix"


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

        Threshold methods give 0 or 1 (``values > threshold``).  ``unmix`` gives the linear two-tissue fraction, clipped
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
        if not METHODS[self.method].threshold:
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
    tissues: Any,
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
        The subject's lean-muscle and fat intensities (anchors and initial values;
        :class:`helpers.fat.TissueIntensities`, or anything with ``muscle`` and ``fat``).
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
    >>> from helpers.fat import TissueIntensities
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
    fit = METHODS[method].fit
    if fit is None:  # the two-tissue model: the tissue intensities are the reference
        return FatReference(method, im, fa, None, int(v.size), scope=scope)
    # Work in units of the fat intensity: fits are then exactly scale-invariant.
    scale = fa
    x = _quantile_sample(v, max_samples) / scale
    m0, m1 = im / scale, fa / scale
    span = m1 - m0
    t, unit_comps, suspicious = fit(x, m0, m1)
    comps = tuple({**c, "mean": float(c["mean"] * scale),
                   "sd": float(c["sd"] * scale) if np.isfinite(c["sd"]) else c["sd"]}
                  for c in unit_comps)
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


