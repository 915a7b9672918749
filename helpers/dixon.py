"""Fat fraction from a Dixon water/fat pair.

Dixon imaging separates each voxel's signal into water ``W`` and fat ``F``; the voxel fat
fraction ``F / (W + F)`` is the accepted reference for fat infiltration.  :func:`measure_dixon`
measures it per muscle and side with the same tables as :func:`helpers.metrics.measure`:

- ``csa_mm2``: the mask's area, exactly as for the single-image methods;
- ``fat_pct``: ``100 x`` the mean voxel fat fraction ``F / (W + F)`` over the muscle's voxels as
  given (per slice; pooled over all voxels for a level or the stack), optionally leaving out the
  voxels within ``erode_mm`` of the muscle's border (:class:`DixonSettings`, off by default);
- ``fcsa_mm2``, ``cdi``, ``lfiar``: from these, as for the other methods;
- ``method`` = ``"dixon"``; ``reference.json`` records the method, the settings and the checks.

No bias correction is needed: a coil shading common to both images cancels in the ratio.  The
voxel fractions are not clipped (noise makes some fall below 0 or above 1; clipping them would
bias a lean muscle's mean upwards); only the muscle means are kept within 0-100 %.

What goes wrong with real Dixon, and what happens
-------------------------------------------------
- **Noise floor** (``W + F`` near zero, where the ratio is noise): voxels whose ``W + F`` is at
  most ``min_signal_fraction`` (default 0.1) of the median ``W + F`` of all muscle voxels are
  left out of ``fat_pct`` (they still count towards CSA).  The tissue signal level is the 99th
  percentile of ``W + F`` over the scan (not the mask's own median, which a misplaced mask
  would drag down to the noise).  A muscle with more than
  ``max_low_signal_share`` (default 5 %) of its voxels there is flagged ``dixon_low_signal``;
  a mask with more than half of its voxels there is refused (it does not lie on the body).
- **Negative values** (signed, phase-corrected reconstructions): kept as they are; an image
  whose muscle voxels go below ``-max_negative_fraction`` (default 0.2) x the tissue signal
  level (1st percentile) is refused (an offset or a wrongly scaled image, not noise).
- **Water/fat swaps**: the subcutaneous fat behind the muscles must read more than 50 % fat;
  if it reads less, the pair is refused as swapped (message names both files).  A muscle row
  reading more than 50 % fat is flagged ``possible_water_fat_swap`` (a regional swap, or a
  really fatty muscle: look at it).
- **Different grids**: water, fat and mask must share shape and affine
  (:class:`~helpers.errors.GeometryMismatchError`, naming the file).

The psoas caveat flag of T2 (``psoas_t2_unreliable``) does not apply to Dixon and is not set.

Segmentation of a Dixon subject runs on :func:`segmentation_image` (``segment_on``: the sum
``W + F`` by default, which looks like a fat-bright scan; or ``water``, ``fat``, or the
subject's own single-contrast ``image``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray
from scipy import ndimage as ndi

from helpers import fat, metrics
from helpers.errors import ConfigError, InputFileError, LabelError
from helpers.labels import LabelTable, load_labels
from helpers.metrics import MeasureResult, MetricsSettings
from helpers.nifti import (
    Volume,
    check_same_grid,
    load_image,
    load_mask,
    save_like,
    slice_axis,
    subject_from_filename,
    voxel_area_mm2,
)
from helpers.tissue_geometry import posterior_of_muscle
from helpers.validate import SettingError, check_choice, check_settings_mapping

__all__ = [
    "DIXON_FLAGS",
    "DIXON_METHOD",
    "NOISE_CORRECTIONS",
    "SEGMENT_ON",
    "DixonSettings",
    "measure_dixon",
    "measure_dixon_files",
    "segmentation_image",
    "write_segmentation_image",
]

#: The ``method`` written in the tables and ``reference.json``.
DIXON_METHOD = "dixon"
#: What a Dixon subject is segmented on.
SEGMENT_ON = ("sum", "water", "fat", "image")
#: Noise-floor corrections of :class:`DixonSettings`.
NOISE_CORRECTIONS = ("none", "rician")
#: Flags only Dixon rows can carry (added to :data:`helpers.metrics.FLAGS`'s).
DIXON_FLAGS = ("dixon_low_signal", "possible_water_fat_swap")
#: Subcutaneous fat must read above this fat fraction, else the pair is refused as swapped.
SWAP_SUBCUTANEOUS_MAX = 0.5
#: A muscle row above this fat fraction (%) is flagged ``possible_water_fat_swap``.
SWAP_MUSCLE_PCT = 50.0
_MIN_BAND_VOXELS = 50
#: Percentile of ``W + F`` over the scan taken as its tissue signal level.
_TISSUE_PERCENTILE = 99.0


@dataclass(frozen=True)
class DixonSettings:
    """How a Dixon pair is measured and segmented.  Validated on creation.

    Attributes
    ----------
    erode_mm : float
        Leave voxels whose centre lies within this in-plane distance (mm) of a voxel outside the
        muscle (another label or background) out of ``fat_pct``; CSA is unaffected.  0 (default)
        measures the muscle's voxels as given.  A slice whose muscle would vanish keeps all its
        voxels.
    min_signal_fraction : float
        Noise floor: voxels with ``W + F`` at most this share of the scan's tissue signal level
        (99th percentile of ``W + F``) are left out of ``fat_pct`` (default 0.1).
    max_low_signal_share : float
        A muscle with more than this share of its voxels at the noise floor is flagged
        ``dixon_low_signal`` (default 0.05).
    max_negative_fraction : float
        Refuse an image whose muscle voxels' 1st percentile lies below
        ``-max_negative_fraction`` x the tissue signal level (default 0.2).
    noise_correction : str
        ``"none"`` (default: ``fat_pct`` is the plain voxel mean of ``F / (W + F)``, the
        reference definition) or ``"rician"``: take the noise floor of magnitude images off
        first (``sqrt(max(M**2 - 2 sd**2, 0))`` per voxel, sd from the air behind the back),
        which removes most of the upward bias of lean muscle's fat fraction at low SNR.
    segment_on : str
        One of :data:`SEGMENT_ON` (default ``"sum"``).
    """

    erode_mm: float = 0.0
    min_signal_fraction: float = 0.1
    max_low_signal_share: float = 0.05
    max_negative_fraction: float = 0.2
    noise_correction: str = "none"
    segment_on: str = "sum"

    def __post_init__(self) -> None:
        limits = {
            "erode_mm": (0.0, 20.0, True),
            "min_signal_fraction": (0.0, 1.0, False),
            "max_low_signal_share": (0.0, 1.0, True),
            "max_negative_fraction": (0.0, 10.0, False),
        }
        for key, (lo, hi, lo_ok) in limits.items():
            value = getattr(self, key)
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            ok = ok and (lo <= float(value) if lo_ok else lo < float(value)) and float(value) <= hi
            if not ok:
                bracket = "[" if lo_ok else "("
                msg = f"must be a number in {bracket}{lo:g}, {hi:g}], got {value!r}"
                setting = f"dixon.{key}"
                raise SettingError(setting, msg)
            object.__setattr__(self, key, float(value))
        check_choice("dixon.noise_correction", self.noise_correction, NOISE_CORRECTIONS)
        check_choice("dixon.segment_on", self.segment_on, SEGMENT_ON)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None) -> DixonSettings:
        """Build from a mapping (the study YAML's ``dixon:`` section).

        Raises
        ------
        SettingError
            Unknown key (with the closest known one) or invalid value, naming the key
            (``dixon.<key>``).

        Examples
        --------
        >>> DixonSettings.from_mapping({"segment_on": "watr"})
        Traceback (most recent call last):
        ...
        helpers.validate.SettingError: dixon.segment_on: 'watr' is not one of sum, water, fat, image (did you mean 'water'?)
        """
        if mapping is None:
            return cls()
        check_settings_mapping(mapping, [f.name for f in fields(cls)], section="dixon",
                               prefix="dixon")
        return cls(**dict(mapping))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record."""
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------


def _eroded_core(
    mask_arr: NDArray, values: list[int], zooms: tuple[float, float, float], ax: int,
    erode_mm: float,
) -> NDArray[np.bool_]:
    """Voxels of the given labels farther than ``erode_mm`` (in-plane) from any voxel outside
    their own label."""
    sampling = list(zooms)
    sampling[ax] = 1e6  # in-plane distances only
    core = np.zeros(mask_arr.shape, dtype=bool)
    for value in values:
        lab = mask_arr == value
        if not lab.any():
            continue
        box = ndi.find_objects(lab.astype(np.uint8))[0]
        # One voxel of margin so the outside is always in the box (the image border is outside).
        grown = tuple(
            slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(box, lab.shape, strict=True)
        )
        sub = lab[grown]
        padded = np.pad(sub, 1, constant_values=False)
        dist = ndi.distance_transform_edt(padded, sampling=sampling)[1:-1, 1:-1, 1:-1]
        core[grown] |= sub & (dist > erode_mm)
    return core


def _rician_corrected(
    w: NDArray[np.float64], f: NDArray[np.float64], muscle: NDArray[np.bool_],
    affine: NDArray[np.float64],
) -> tuple[NDArray[np.float64], NDArray[np.float64], dict[str, Any]]:
    """Magnitude images with the Rician noise floor taken off: ``sqrt(max(M**2 - 2 sd**2, 0))``
    per voxel (``M**2 - 2 sd**2`` is unbiased for the squared signal), with each image's noise
    sd from the air behind the back.  Unchanged, with the reason, when no air is found."""
    body = fat.body_mask((w + f).astype(np.float32), affine, muscle)
    posterior = posterior_of_muscle(muscle, affine) if np.any(muscle) else None
    out: dict[str, Any] = {"correction": "rician"}
    sds = []
    for arr, what in ((w, "water"), (f, "fat")):
        sd, source = fat.estimate_noise_sd(arr.astype(np.float32), body, muscle=muscle,
                                           affine=affine, posterior=posterior)
        out[f"{what}_sd"], out[f"{what}_sd_source"] = sd, source
        sds.append(sd if source == "background" else 0.0)
    if not all(sds):
        out["applied"] = False
        out["reason"] = "no air background to measure the noise in (zeroed or cropped)"
        return w, f, out
    out["applied"] = True
    corrected = [np.sqrt(np.maximum(arr * arr - 2.0 * sd * sd, 0.0)) for arr, sd in
                 ((w, sds[0]), (f, sds[1]))]
    return corrected[0], corrected[1], out


def _volume_checks(vol: Volume, what: str) -> Path:
    where = vol.path or Path(f"<{what}>")
    if np.ndim(vol.data) != 3:
        msg = f"expected a 3-D volume, got {np.ndim(vol.data)}-D data of shape {np.shape(vol.data)}"
        raise InputFileError(where, msg)
    if what != "mask":
        n_bad = int(np.count_nonzero(~np.isfinite(vol.data)))
        if n_bad:
            raise InputFileError(where, f"{n_bad} voxels are NaN or infinite")
    return where


def measure_dixon(
    water: Volume,
    fat_image: Volume,
    mask: Volume,
    labels: LabelTable,
    *,
    subject: str,
    settings: MetricsSettings | None = None,
    dixon: DixonSettings | None = None,
    levels: pd.DataFrame | None = None,
    levels_clean: bool = False,
) -> MeasureResult:
    """Measure CSA, Dixon fat fraction, FCSA and asymmetry of one scan.

    Parameters
    ----------
    water, fat_image : Volume
        Water and fat images of one Dixon acquisition, on the same grid.
    mask : Volume
        Integer label mask on their grid.
    labels : LabelTable
        Label file of the mask (unsided labels are split by anatomy; ``vertebra_<LEVEL>`` labels
        give levels), as for :func:`helpers.metrics.measure`.
    subject : str
        Subject ID written in every row.
    settings : MetricsSettings, optional
        Formulas (``cdi_formula``, ``lfiar_formula``, ``lfiar_floor_pct``) and ``edge_rule``;
        ``fat_method`` and ``bias_correction`` do not apply.
    dixon : DixonSettings, optional
        Erosion, noise floor and swap settings.
    levels : DataFrame, optional
        Slice->level table.
    levels_clean : bool
        ``levels`` is already :func:`helpers.metrics.read_levels`'s output for this subject.

    Returns
    -------
    MeasureResult
        ``metrics`` and ``asymmetry`` with ``method = "dixon"``, ``reference`` (JSON-ready), and
        ``fat_fraction``: the per-voxel ``F / (W + F)`` (0-1, clipped) on the grid, NaN outside
        the muscles and at the noise floor.

    Raises
    ------
    GeometryMismatchError
        Water, fat and mask not on one grid.
    LabelError
        Mask values the label file does not declare, or no muscle declared.
    InputFileError
        NaN values, strongly negative values, a mask mostly at the noise floor, or a swapped
        pair (subcutaneous fat reading under 50 % fat).
    """
    settings = settings or MetricsSettings()
    dixon = dixon or DixonSettings()
    t_start = time.perf_counter()
    where_w = _volume_checks(water, "water image")
    where_f = _volume_checks(fat_image, "fat image")
    where_m = _volume_checks(mask, "mask")
    check_same_grid(water, fat_image)
    check_same_grid(water, mask)
    mask_arr = fat.c_order(mask.data)
    labelled = metrics._labelled(mask_arr)
    labels.check_values(metrics._present_values(mask_arr, labelled), mask.path)
    affine = water.affine

    vertebra = {
        lab.value: lab.muscle[len(metrics._VERTEBRA_PREFIX):]
        for lab in labels.labels
        if lab.muscle.lower().startswith(metrics._VERTEBRA_PREFIX)
    }
    muscle_labels = tuple(lab for lab in labels.labels if lab.value not in vertebra)
    if not muscle_labels:
        raise LabelError(labels.path or Path("<labels>"), "label file declares no muscles")
    vertebra_arr = mask_arr
    if vertebra:
        mask_arr = np.where(np.isin(mask_arr, list(vertebra)), 0, mask_arr).astype(mask_arr.dtype)
    table = LabelTable(muscle_labels, labels.path)
    if not table.is_sided():
        mask_arr, table = metrics._split_unsided(mask_arr, affine, table)
        mask_arr = np.ascontiguousarray(mask_arr)
    if mask_arr is not vertebra_arr:
        labelled = metrics._labelled(mask_arr)
    idx, values = labelled
    if not idx.size:
        msg = "mask holds none of the muscles its label file declares: nothing to measure"
        raise InputFileError(where_m, msg)
    ax = slice_axis(affine)
    area = voxel_area_mm2(affine, ax)
    n_z = mask_arr.shape[ax]
    slice_level, levels_source = metrics._slice_levels(
        levels, subject, n_z, vertebra, np.moveaxis(vertebra_arr, ax, -1), clean=not levels_clean
    )

    w = fat.c_order(water.data, np.float64)
    f = fat.c_order(fat_image.data, np.float64)
    noise: dict[str, Any] = {"correction": dixon.noise_correction}
    if dixon.noise_correction == "rician":
        w, f, noise = _rician_corrected(w, f, mask_arr > 0, affine)
    w_m, f_m = w.ravel()[idx], f.ravel()[idx]
    total_m = w_m + f_m
    # The tissue signal level: bright tissue of the whole scan (not the mask's own voxels,
    # which a misplaced mask would drag down to the noise).
    typical = float(np.percentile(w + f, _TISSUE_PERCENTILE))
    if not typical > 0:
        msg = (f"water + fat is nowhere positive (its {_TISSUE_PERCENTILE:g}th percentile is "
               f"{typical:.4g}): not a Dixon water/fat pair")
        raise InputFileError(where_w, msg)
    for arr_m, where, what in ((w_m, where_w, "water"), (f_m, where_f, "fat")):
        low = float(np.percentile(arr_m, 1))
        if low < -dixon.max_negative_fraction * typical:
            msg = (
                f"{what} image: 1 % of the muscle voxels lie below {low:.4g}, under "
                f"-{dixon.max_negative_fraction:g} x the tissue signal ({typical:.4g}): "
                "an offset or wrongly scaled image, not noise"
            )
            raise InputFileError(where, msg)
    floor = dixon.min_signal_fraction * typical
    valid_m = total_m > floor
    low_share = 1.0 - float(np.count_nonzero(valid_m)) / valid_m.size
    if low_share > 0.5:
        msg = (
            f"{100 * low_share:.0f} % of the mask's muscle voxels lie at the noise floor of the "
            f"Dixon images (water + fat <= {floor:.4g}): the mask does not lie on muscle"
        )
        raise InputFileError(where_m, msg)
    n_neg = int(np.count_nonzero((w_m < 0) | (f_m < 0)))

    # Per (label, slice) keys, as in helpers.metrics._tabulate.
    labs = list(table.labels)
    lut = np.full(int(max(lab.value for lab in labs)) + 1, -1, dtype=np.int64)
    for i, lab in enumerate(labs):
        lut[lab.value] = i
    li = lut[values]
    keep = li >= 0
    idx, li, w_m, f_m, total_m, valid_m = (a[keep] for a in (idx, li, w_m, f_m, total_m, valid_m))
    kk = np.unravel_index(idx, mask_arr.shape)[ax]
    n_lab = len(labs)
    key = li * n_z + kk
    n_keys = n_lab * n_z
    with np.errstate(divide="ignore", invalid="ignore"):
        ff_m = np.where(valid_m, f_m / np.where(valid_m, total_m, 1.0), np.nan)
    used = valid_m.copy()
    erosion: dict[str, Any] = {"erode_mm": dixon.erode_mm}
    if dixon.erode_mm > 0:
        core = _eroded_core(mask_arr, [lab.value for lab in labs], water.zooms_mm, ax,
                            dixon.erode_mm).ravel()[idx]
        has_core = np.bincount(key[core & valid_m], minlength=n_keys) > 0
        used = valid_m & (core | ~has_core[key])
        erosion["voxels_left_out"] = int(np.count_nonzero(valid_m & ~used))
        erosion["slices_kept_whole"] = int(np.count_nonzero(
            ~has_core & (np.bincount(key[valid_m], minlength=n_keys) > 0)
        ))
    # Voxels left out of the mean (noise floor, erosion) take their (label, slice)'s mean of
    # the voxels used, so each slice's fat_pct is the mean over its used voxels, and CSA still
    # counts every voxel; with no used voxel on the slice, the label's mean over the stack.
    n_used = np.bincount(key[used], minlength=n_keys).astype(np.float64)
    s_used = np.bincount(key[used], weights=ff_m[used], minlength=n_keys)
    lab_n = n_used.reshape(n_lab, n_z).sum(axis=1)
    lab_s = s_used.reshape(n_lab, n_z).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        lab_mean = lab_s / lab_n
        key_mean = np.where(n_used > 0, s_used / np.maximum(n_used, 1), np.repeat(lab_mean, n_z))
    filled = np.where(used, ff_m, key_mean[key])
    unclipped = np.full(mask_arr.shape, np.nan, dtype=np.float64)
    unclipped.ravel()[idx] = filled
    fraction_map = np.full(mask_arr.shape, np.nan, dtype=np.float32)
    fraction_map.ravel()[idx[used]] = np.clip(ff_m[used], 0.0, 1.0)

    # Whole-scan swap check: subcutaneous fat behind the muscles must read mostly fat.
    total = w + f
    muscle = mask_arr > 0
    body = fat.body_mask(total.astype(np.float32), affine, muscle)
    band = fat.subcutaneous_band(body, muscle, affine) & (total > floor)
    swap_check: dict[str, Any] = {"subcutaneous_voxels": int(np.count_nonzero(band))}
    if swap_check["subcutaneous_voxels"] >= _MIN_BAND_VOXELS:
        sc_ff = float(np.median(f[band] / total[band]))
        swap_check["subcutaneous_fat_fraction"] = round(sc_ff, 4)
        if sc_ff < SWAP_SUBCUTANEOUS_MAX:
            name_w = water.path.name if water.path else "the water image"
            msg = (
                f"subcutaneous fat reads {100 * sc_ff:.0f} % fat fraction (expected over "
                f"{100 * SWAP_SUBCUTANEOUS_MAX:.0f} %): water and fat images swapped? (water: "
                f"{name_w})"
            )
            raise InputFileError(where_f, msg)
    else:
        swap_check["subcutaneous_fat_fraction"] = None
        swap_check["note"] = "too few subcutaneous fat voxels found: swap not checked"

    dixon_settings = MetricsSettings(
        fat_method=fat.DEFAULT_FAT_METHOD, bias_correction=False,
        reference_scope=settings.reference_scope, pool_psoas=settings.pool_psoas,
        lfiar_floor_pct=settings.lfiar_floor_pct, cdi_formula=settings.cdi_formula,
        lfiar_formula=settings.lfiar_formula, edge_rule=settings.edge_rule,
    )
    table_metrics, asym = metrics._tabulate(
        mask_arr, unclipped, table, ax, area, slice_level, subject, dixon_settings, False,
        labelled=labelled,
    )
    low_by_label = {}
    n_all = np.bincount(li, minlength=n_lab)
    n_low = np.bincount(li[~valid_m], minlength=n_lab)
    for i, lab in enumerate(labs):
        share = float(n_low[i] / n_all[i]) if n_all[i] else 0.0
        low_by_label[(lab.muscle, lab.side)] = share
    # (A label with no usable voxel has NaN fat from _tabulate: its fill value is NaN.)
    table_metrics, asym = _dixon_flags(table_metrics, asym, low_by_label, dixon)

    reference: dict[str, Any] = {
        "subject": subject,
        "method": DIXON_METHOD,
        "contrast": "dixon",
        "fat_fraction": "F / (W + F), mean over the muscle's voxels",
        "water_image": str(water.path) if water.path else None,
        "fat_image": str(fat_image.path) if fat_image.path else None,
        "scope": "voxel",
        "bias_correction": {
            "applied": False,
            "reason": "a coil shading shared by water and fat cancels in F / (W + F)",
        },
        "noise_floor": {
            "water_plus_fat_at_most": floor,
            "tissue_signal_water_plus_fat": typical,
            "min_signal_fraction": dixon.min_signal_fraction,
            "voxels_left_out": int(np.count_nonzero(~valid_m)),
            "share_by_muscle": {f"{m}:{s}": round(v, 5) for (m, s), v in low_by_label.items()},
        },
        "negative_voxels_in_muscle": n_neg,
        "noise": noise,
        "erosion": erosion,
        "swap_check": swap_check,
        "dixon_settings": dixon.to_dict(),
        "levels_source": levels_source,
        "settings": {k: v for k, v in settings.to_dict().items()
                     if k in ("lfiar_floor_pct", "cdi_formula", "lfiar_formula", "edge_rule")},
        "voxel_area_mm2": area,
        "slice_axis": ax,
        "orientation": "".join(water.axcodes),
    }
    reference["seconds"] = round(time.perf_counter() - t_start, 3)
    return MeasureResult(table_metrics, asym, reference, fraction_map)


def _add_flag(flags: pd.Series, where: NDArray[np.bool_] | pd.Series, flag: str) -> pd.Series:
    where = np.asarray(where, dtype=bool)
    out = flags.astype(object).copy()
    for i in np.flatnonzero(where):
        current = out.iat[i]
        out.iat[i] = flag if not current else f"{current};{flag}"
    return out


def _drop_flag(flags: pd.Series, flag: str) -> pd.Series:
    return flags.map(lambda s: ";".join(p for p in str(s).split(";") if p and p != flag))


def _dixon_flags(
    table_metrics: pd.DataFrame,
    asym: pd.DataFrame,
    low_by_label: dict[tuple[str, str], float],
    dixon: DixonSettings,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Set ``method`` to dixon, drop the T2 psoas caveat, add the Dixon flags."""
    tm, am = table_metrics.copy(), asym.copy()
    tm["method"] = DIXON_METHOD
    am["method"] = DIXON_METHOD
    tm["flags"] = _drop_flag(tm["flags"], "psoas_t2_unreliable")
    am["flags"] = _drop_flag(am["flags"], "psoas_t2_unreliable")
    low = np.array([low_by_label.get((m, s), 0.0) > dixon.max_low_signal_share
                    for m, s in zip(tm["muscle"], tm["side"], strict=True)], dtype=bool)
    tm["flags"] = _add_flag(tm["flags"], low, DIXON_FLAGS[0])
    tm["flags"] = _add_flag(tm["flags"], tm["fat_pct"].to_numpy(float) > SWAP_MUSCLE_PCT,
                            DIXON_FLAGS[1])
    low_muscles = {m for (m, _), v in low_by_label.items() if v > dixon.max_low_signal_share}
    am["flags"] = _add_flag(am["flags"], am["muscle"].isin(low_muscles), DIXON_FLAGS[0])
    over = (am["fat_pct_left"].to_numpy(float) > SWAP_MUSCLE_PCT) | (
        am["fat_pct_right"].to_numpy(float) > SWAP_MUSCLE_PCT
    )
    am["flags"] = _add_flag(am["flags"], over, DIXON_FLAGS[1])
    return tm, am


def measure_dixon_files(
    water_path: str | Path,
    fat_path: str | Path,
    mask_path: str | Path,
    labels_path: str | Path,
    *,
    subject: str | None = None,
    settings: MetricsSettings | None = None,
    dixon: DixonSettings | None = None,
    levels_path: str | Path | None = None,
) -> MeasureResult:
    """Read a Dixon pair, its mask, label file and (optional) levels CSV, then
    :func:`measure_dixon`.  ``subject`` defaults to the water file's name without ``_water``
    and ``.nii(.gz)``.

    Raises
    ------
    InputFileError (and its subclasses)
        Any unusable input, naming the file.
    """
    water = load_image(water_path)
    fat_vol = load_image(fat_path)
    mask = load_mask(mask_path)
    labels = load_labels(labels_path)
    subject = subject or subject_from_filename(water_path)
    levels = metrics.read_levels(levels_path, subject) if levels_path is not None else None
    return measure_dixon(water, fat_vol, mask, labels, subject=subject, settings=settings,
                         dixon=dixon, levels=levels, levels_clean=levels is not None)


# --------------------------------------------------------------------------------------------
# Segmentation input
# --------------------------------------------------------------------------------------------


def segmentation_image(
    water: Volume, fat_image: Volume, segment_on: str = "sum", image: Volume | None = None
) -> NDArray[np.float32]:
    """The image a Dixon subject is segmented on.

    Parameters
    ----------
    water, fat_image : Volume
        The Dixon pair (same grid).
    segment_on : str
        ``"sum"`` (``W + F``, default: fat and muscle both bright, like a fat-bright scan
        without fat suppression), ``"water"``, ``"fat"`` or ``"image"`` (``image``, the
        subject's single-contrast scan on the same grid).
    image : Volume, optional
        Needed for ``segment_on="image"``.

    Raises
    ------
    ConfigError
        Unknown ``segment_on``, or ``"image"`` without an image.
    GeometryMismatchError
        The volumes are not on one grid.
    """
    if segment_on not in SEGMENT_ON:
        msg = f"dixon.segment_on: {segment_on!r} is not one of {', '.join(SEGMENT_ON)}"
        raise ConfigError(msg)
    check_same_grid(water, fat_image)
    if segment_on == "image":
        if image is None:
            msg = "dixon.segment_on: 'image' needs the subject's single-contrast image"
            raise ConfigError(msg)
        check_same_grid(water, image)
        return np.asarray(image.data, dtype=np.float32)
    w = np.asarray(water.data, dtype=np.float32)
    f = np.asarray(fat_image.data, dtype=np.float32)
    return {"sum": w + f, "water": w, "fat": f}[segment_on]


def write_segmentation_image(
    water_path: str | Path, fat_path: str | Path, target: str | Path, segment_on: str = "sum",
    image_path: str | Path | None = None,
) -> Path:
    """Write :func:`segmentation_image` of a Dixon pair atomically (float32 NIfTI) to
    ``target``, on the water image's grid.

    Raises
    ------
    InputFileError, GeometryMismatchError, ConfigError
        As :func:`segmentation_image`, naming the file.
    """
    water = load_image(water_path)
    fat_vol = load_image(fat_path)
    image = load_image(image_path) if image_path is not None else None
    data = segmentation_image(water, fat_vol, segment_on, image)
    return save_like(data, water, target)
