"""Synthetic lumbar axial T2 phantoms with planted truth.

Every number the toolkit reports is validated against these phantoms.  A phantom is built in a
fixed internal frame (array order L-P-S, like the bundled example) and then re-stored in the
requested orientation, so the anatomy, and therefore the truth, never depend on array order.

How a phantom is made
---------------------
1. **Muscles.**  The eight paraspinal muscle masks of the real example
   (``data/example/sub-0001_T1w_dseg.nii.gz``, a sample lumbar T2w scan from the MuscleMap toolbox,
   MIT) are the template.  They are resampled onto the target grid through a random smooth warp
   (a few mm), an optional axial rotation and an off-centre shift, and each muscle can be scaled
   about its own per-slice centroid (``csa_scale``, an *area* factor).  Overlaps are resolved
   deterministically: each voxel goes to the muscle whose smoothed template indicator is largest.
2. **Body.**  A super-elliptical body outline with a subcutaneous fat ring, an abdominal wall,
   bowel-like texture, vertebral body, spinal canal (CSF) and posterior elements, placed from the
   muscles of each slice.  Fat outside the muscles is pure fat (fraction 1).
3. **Fat in muscle.**  A fat structure (streaks along the antero-posterior direction, more at the
   muscle border, more in caudal slices) is drawn on a 4 x 4 sub-voxel in-plane grid and
   thresholded per muscle and side so that exactly the target share of sub-voxels is fat; the
   per-voxel fat fraction ``f`` is the mean over the 16 sub-voxels (partial volume).
4. **Intensity.**  ``I = f * I_fat + (1 - f) * I_muscle * texture``, then a smooth multiplicative
   bias field defined in world coordinates (left-right gradient ``bias_lr``, antero-posterior
   gradient, low-order random terms), then Rician noise with ``sigma = I_fat / snr``, rounded to
   integers like scanner data.  ``I_fat`` and ``I_muscle`` are calibrated on the example
   (posterior subcutaneous fat about 600-650; the darker half of its paraspinal muscle voxels
   has a median of about 22, on a scan whose low end is clipped at 0, so lean muscle is set to
   35, a muscle/fat ratio of about 0.06 like the example's 0.05 after noise).

Truth tables
------------
``truth`` has the columns of ``metrics.csv``: ``subject, level, slice, muscle, side, n_slices,
csa_mm2, fat_pct, fcsa_mm2``.  Per-slice rows carry the slice index (file array order) and its
level; aggregate rows have ``slice`` = NA and ``level`` = a vertebral level or ``"all"``.

- ``csa_mm2``: mean per-slice area over the slices where the muscle is present (voxel count x
  in-plane voxel area, exact for the discrete mask);
- ``fat_pct``: pooled mean of the per-voxel true fat fraction x 100 over all its voxels;
- ``fcsa_mm2 = csa_mm2 * (1 - fat_pct / 100)``; ``n_slices``: slices where present.

A muscle absent from a whole level has an aggregate row with ``n_slices = 0`` and NaN values.

``asymmetry`` has ``subject, level, muscle, cdi, cdi_abs, lfiar, lfiar_log`` with
``cdi = (FCSA_L - FCSA_R) / ((FCSA_L + FCSA_R) / 2)`` and
``lfiar = FI_L / max(FI_R, 0.5)`` (FI = ``fat_pct`` in %, floor 0.5 %), ``lfiar_log = ln(lfiar)``.

Slice-to-level tables
---------------------
A level table (also the CSV format of ``esma metrics --levels``) has the columns ``slice`` and
``level``: ``slice`` is the 0-based index along the axial slice axis
(:func:`helpers.nifti.slice_axis`) in the file's *own* array order, i.e. what a viewer shows;
``level`` is a vertebral level name such as ``"L4"``.  A cohort-wide file adds a ``subject``
column.  Slices absent from the table have no level (they count only towards ``"all"``).

Example
-------
>>> ph = make_phantom("syn-001", template="small", seed=1)
>>> ph.image.shape, ph.mask.shape
((96, 96, 8), (96, 96, 8))
>>> sorted(ph.truth.columns)[:3]
['csa_mm2', 'fat_pct', 'fcsa_mm2']
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from nibabel import orientations as nio
from numpy.typing import NDArray
from scipy import ndimage as ndi

from helpers.errors import ConfigError, InputFileError
from helpers.files import atomic_write_text
from helpers.labels import LabelTable, parse_labels
from helpers.nifti import save_like, slice_axis, voxel_area_mm2

__all__ = [
    "ASYMMETRY_COLUMNS",
    "DEFAULT_FAT_PCT",
    "I_FAT",
    "I_MUSCLE",
    "LABELS",
    "LABELS_DOC",
    "LFIAR_FLOOR_PCT",
    "MUSCLES",
    "TEMPLATES",
    "TRUTH_COLUMNS",
    "Phantom",
    "Template",
    "asymmetry_from_truth",
    "default_levels",
    "draw_subject_params",
    "levels_for_file",
    "make_cohort",
    "make_phantom",
    "mirror_left_right",
    "reorient",
    "truth_from_arrays",
    "write_phantom",
]

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_DIR = REPO / "data" / "example"
EXAMPLE_MASK = EXAMPLE_DIR / "sub-0001_T1w_dseg.nii.gz"

#: The label file of the phantoms (same values and names as ``data/example/labels.json``).
LABELS_DOC: dict[str, Any] = {
    "labels": [
        {"value": 1, "muscle": "multifidus", "side": "right"},
        {"value": 2, "muscle": "multifidus", "side": "left"},
        {"value": 3, "muscle": "erector_spinae", "side": "right"},
        {"value": 4, "muscle": "erector_spinae", "side": "left"},
        {"value": 5, "muscle": "psoas_major", "side": "right"},
        {"value": 6, "muscle": "psoas_major", "side": "left"},
        {"value": 7, "muscle": "quadratus_lumborum", "side": "right"},
        {"value": 8, "muscle": "quadratus_lumborum", "side": "left"},
    ]
}
LABELS: LabelTable = parse_labels(LABELS_DOC)
MUSCLES = ("multifidus", "erector_spinae", "psoas_major", "quadratus_lumborum")

#: Pure-fat intensity (arbitrary scanner units), from the example's posterior subcutaneous fat
#: (median 615-650 behind the muscles).
I_FAT = 600.0
#: Lean-muscle intensity: the example's darker paraspinal muscle voxels have a median of 22
#: (its low end is clipped at 0); 35 keeps the linear fat/muscle model away from that floor.
I_MUSCLE = 35.0
# Other tissues, as fractions of I_FAT (only for looks; never measured).
_I_CSF = 1.05
_I_MARROW = 0.38
_I_CORTEX = 0.04
_I_SKIN = 0.45
_I_WALL = I_MUSCLE / I_FAT

#: Default target fat (%) per muscle when ``fat_pct`` does not say otherwise.
DEFAULT_FAT_PCT = {
    "multifidus": 12.0,
    "erector_spinae": 10.0,
    "psoas_major": 4.0,
    "quadratus_lumborum": 8.0,
}

# Source template: the example mask grid (L-P-S array order).
_SRC_SPACING = (0.9375, 0.9375, 4.4)
_SRC_SHAPE = (256, 208, 20)
#: Levels of the example's slices, inferior (index 0) to superior.  Planted, approximate.
_SRC_LEVELS = ("S1",) * 4 + ("L5",) * 7 + ("L4",) * 7 + ("L3",) * 2


@dataclass(frozen=True)
class Template:
    """A target grid over the source anatomy: canonical (L-P-S) shape and field of view (mm)."""

    name: str
    shape: tuple[int, int, int]
    fov_mm: tuple[float, float, float]


#: Built-in templates.  ``example``: the example's own grid (256 x 208 x 20, 0.94 x 0.94 x 4.4
#: mm); ``small``: 96 x 96 x 8 at 2.5 x 2.5 x 11 mm, the cheap path for large cohorts.
TEMPLATES: dict[str, Template] = {
    "example": Template("example", (256, 208, 20), (240.0, 195.0, 88.0)),
    "small": Template("small", (96, 96, 8), (240.0, 240.0, 88.0)),
}

_SUB = 4  # sub-voxels per in-plane axis for the fat fraction
_SUB_OFFSETS = (np.arange(_SUB) + 0.5) / _SUB - 0.5


@dataclass
class Phantom:
    """One synthetic subject with its planted truth.

    Attributes
    ----------
    subject : str
        Subject ID.
    image : nibabel.Nifti1Image
        T2-like intensities (float32 holding integers), stored in the requested orientation.
    mask : nibabel.Nifti1Image
        uint8 muscle labels on the same grid (values of :data:`LABELS_DOC`).
    labels : LabelTable
        Sided label table (same names as ``data/example/labels.json``).
    levels : DataFrame
        Slice-to-level table (``slice`` in this file's array order, ``level``).
    truth : DataFrame
        Per-slice and aggregate truth (see the module docstring).
    asymmetry : DataFrame
        Asymmetry truth per level and muscle.
    fat_fraction : ndarray
        True per-voxel fat fraction (0-1) on the same grid: muscles partial, fat tissue 1,
        every other tissue 0.
    params : dict
        Everything used to make it (JSON-serialisable).
    """

    subject: str
    image: nib.Nifti1Image
    mask: nib.Nifti1Image
    labels: LabelTable
    levels: pd.DataFrame
    truth: pd.DataFrame
    asymmetry: pd.DataFrame
    fat_fraction: NDArray[np.float32]
    params: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Orientation helpers
# --------------------------------------------------------------------------------------------


def _ornt_transform(affine: NDArray, axcodes: tuple[str, str, str]) -> NDArray:
    try:
        target = nio.axcodes2ornt(tuple(axcodes))
    except Exception as exc:
        msg = f"orientation {axcodes!r} is not three distinct axis codes like ('L','P','S')"
        raise ConfigError(msg) from exc
    if np.isnan(target).any():
        msg = f"orientation {axcodes!r} is not three distinct axis codes like ('L','P','S')"
        raise ConfigError(msg)
    return nio.ornt_transform(nio.io_orientation(affine), target)


def _apply(arr: NDArray, transform: NDArray) -> NDArray:
    return np.ascontiguousarray(nio.apply_orientation(arr, transform))


def reorient(img: nib.Nifti1Image, axcodes: tuple[str, str, str] | str) -> nib.Nifti1Image:
    """Re-store an image in another array order without changing the anatomy.

    Parameters
    ----------
    img : Nifti1Image
        Any 3-D image.
    axcodes : tuple of str or str
        Target orientation, e.g. ``("R", "A", "S")`` or ``"LPS"``.

    Returns
    -------
    Nifti1Image
        Same voxels re-ordered, affine adjusted so every voxel keeps its world position;
        qform and sform both set (code 1), data type kept.
    """
    transform = _ornt_transform(img.affine, tuple(axcodes))
    data = _apply(np.asanyarray(img.dataobj), transform)
    affine = img.affine @ nio.inv_ornt_aff(transform, img.shape[:3])
    out = nib.Nifti1Image(data, affine)
    out.set_data_dtype(img.get_data_dtype())
    out.set_qform(affine, code=1)
    out.set_sform(affine, code=1)
    return out


# --------------------------------------------------------------------------------------------
# Template anatomy (cached)
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _source() -> dict[str, Any]:
    """Smoothed per-label indicators and per-slice centroids of the example mask (cached)."""
    if not EXAMPLE_MASK.is_file():
        raise InputFileError(EXAMPLE_MASK, "template mask for the phantoms not found")
    img = nib.load(EXAMPLE_MASK)
    mask = np.asarray(img.dataobj).astype(np.int16)
    if mask.shape != _SRC_SHAPE or nib.aff2axcodes(img.affine) != ("L", "P", "S"):
        raise InputFileError(EXAMPLE_MASK, "unexpected template grid")
    soft = {}
    bbox = {}
    centroids = {}
    for lab in LABELS.labels:
        ind = (mask == lab.value).astype(np.float32)
        soft[lab.value] = ndi.gaussian_filter(ind, sigma=(0.7, 0.7, 0), truncate=3.0)
        cents = np.full((_SRC_SHAPE[2], 2), np.nan)
        boxes = []
        for k in range(_SRC_SHAPE[2]):
            ii, jj = np.nonzero(mask[:, :, k] == lab.value)
            if ii.size:
                cents[k] = ((ii.mean() + 0.5) * _SRC_SPACING[0], (jj.mean() + 0.5) * _SRC_SPACING[1])
                boxes.append(
                    (ii.min() * _SRC_SPACING[0], (ii.max() + 1) * _SRC_SPACING[0],
                     jj.min() * _SRC_SPACING[1], (jj.max() + 1) * _SRC_SPACING[1])
                )
            else:
                boxes.append(None)
        centroids[lab.value] = cents
        bbox[lab.value] = boxes
    return {"mask": mask, "soft": soft, "centroids": centroids, "bbox": bbox}


def default_levels(template: str | Template = "example", n_slices: int | None = None) -> list[str]:
    """Planted vertebral level of each canonical slice (index 0 = most inferior)."""
    tpl = _template(template)
    nz = n_slices or tpl.shape[2]
    src = _src_slice_index(nz, tpl.fov_mm[2])
    return [_SRC_LEVELS[s] for s in src]


def _template(template: str | Template) -> Template:
    if isinstance(template, Template):
        return template
    try:
        return TEMPLATES[template]
    except KeyError:
        msg = f"template must be one of {sorted(TEMPLATES)}, got {template!r}"
        raise ConfigError(msg) from None


def _src_slice_index(nz: int, fov_z: float) -> NDArray[np.int64]:
    src_fov = _SRC_SHAPE[2] * _SRC_SPACING[2]
    w = (np.arange(nz) + 0.5) * fov_z / nz + (src_fov - fov_z) / 2
    return np.clip(np.floor(w / _SRC_SPACING[2]), 0, _SRC_SHAPE[2] - 1).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


def _grid(tpl: Template) -> dict[str, Any]:
    nx, ny, nz = tpl.shape
    sx, sy, sz = (tpl.fov_mm[0] / nx, tpl.fov_mm[1] / ny, tpl.fov_mm[2] / nz)
    src_fov = [n * s for n, s in zip(_SRC_SHAPE, _SRC_SPACING, strict=True)]
    off = [(src_fov[a] - tpl.fov_mm[a]) / 2 for a in range(3)]
    u = (np.arange(nx) + 0.5) * sx + off[0]  # template-frame mm, + toward patient's left
    v = (np.arange(ny) + 0.5) * sy + off[1]  # + toward posterior
    w = (np.arange(nz) + 0.5) * sz + off[2]  # + toward superior
    cu, cv = src_fov[0] / 2, src_fov[1] / 2
    # World (RAS+): x = -(u - cu), y = -(v - cv), z = w - 60.
    affine = np.array(
        [
            [-sx, 0, 0, -(u[0] - cu)],
            [0, -sy, 0, -(v[0] - cv)],
            [0, 0, sz, w[0] - 60.0],
            [0, 0, 0, 1.0],
        ]
    )
    return {"u": u, "v": v, "w": w, "spacing": (sx, sy, sz), "affine": affine, "cu": cu, "cv": cv}


def _warp_terms(rng: np.random.Generator, amp_mm: float) -> list[tuple[float, ...]]:
    """Random low-frequency sinusoids: (axis, amplitude, ku, kv, kw, phase)."""
    terms = []
    for axis in (0, 1):
        for _ in range(3):
            wavelength = rng.uniform(90.0, 220.0)
            theta = rng.uniform(0, 2 * np.pi)
            k = 2 * np.pi / wavelength
            kw = 2 * np.pi / rng.uniform(150.0, 400.0)
            terms.append(
                (axis, amp_mm * rng.uniform(0.4, 1.0) / math.sqrt(3), k * math.cos(theta),
                 k * math.sin(theta), kw, rng.uniform(0, 2 * np.pi))
            )
    return terms


def _warp(u: NDArray, v: NDArray, w: float, terms: list[tuple[float, ...]]) -> tuple[NDArray, NDArray]:
    du = np.zeros_like(u)
    dv = np.zeros_like(v)
    for axis, amp, ku, kv, kw, ph in terms:
        d = amp * np.sin(ku * u + kv * v + kw * w + ph)
        if axis == 0:
            du += d
        else:
            dv += d
    return u + du, v + dv


def _target_to_source(
    tpl: Template,
    grid: dict[str, Any],
    rotation_deg: float,
    shift_mm: tuple[float, float],
    warp_terms: list[tuple[float, ...]],
) -> list[tuple[NDArray, NDArray]]:
    """Template-frame source position (mm) of every target pixel, per target slice.

    Inverse of: rotate about the spine by ``rotation_deg``, shift by ``shift_mm`` (world mm, x
    toward the patient's right, y anterior), then the smooth warp.
    """
    src = _source()
    uu, vv = np.meshgrid(grid["u"], grid["v"], indexing="ij")
    c_mid = np.nanmean(np.vstack([src["centroids"][1], src["centroids"][2]]), axis=0)
    th = math.radians(rotation_deg)
    cos, sin = math.cos(th), math.sin(th)
    su, sv = -shift_mm[0], -shift_mm[1]  # template frame: u = -x, v = -y
    pu, pv = uu - su - c_mid[0], vv - sv - c_mid[1]
    ru0 = cos * pu + sin * pv + c_mid[0]
    rv0 = -sin * pu + cos * pv + c_mid[1]
    return [_warp(ru0, rv0, float(w), warp_terms) for w in grid["w"]]


def _build_labels(
    tpl: Template,
    coords: list[tuple[NDArray, NDArray]],
    scales: Mapping[int, float],
) -> NDArray[np.uint8]:
    """Resample the template muscles onto the target grid (label map, L-P-S order).

    ``coords`` from :func:`_target_to_source`; ``scales`` maps label value to an area factor
    applied about the muscle's per-slice centroid.
    """
    src = _source()
    nx, ny, nz = tpl.shape
    out = np.zeros((nx, ny, nz), np.uint8)
    src_k = _src_slice_index(nz, tpl.fov_mm[2])
    for k in range(nz):
        ks = int(src_k[k])
        qu, qv = coords[k]
        best = np.full(nx * ny, 0.5, np.float32)
        lab2d = np.zeros(nx * ny, np.uint8)
        for lab in LABELS.labels:
            box = src["bbox"][lab.value][ks]
            if box is None:
                continue
            s = math.sqrt(max(float(scales.get(lab.value, 1.0)), 1e-6))
            cu_, cv_ = src["centroids"][lab.value][ks]
            ru = (cu_ + (qu - cu_) / s).ravel()
            rv = (cv_ + (qv - cv_) / s).ravel()
            sel = np.flatnonzero(
                (ru >= box[0] - 2) & (ru <= box[1] + 2) & (rv >= box[2] - 2) & (rv <= box[3] + 2)
            )
            if not sel.size:
                continue
            pos = [ru[sel] / _SRC_SPACING[0] - 0.5, rv[sel] / _SRC_SPACING[1] - 0.5]
            vals = ndi.map_coordinates(
                src["soft"][lab.value][:, :, ks], pos, order=1, mode="constant", cval=0.0
            )
            win = vals > best[sel]
            best[sel[win]] = vals[win]
            lab2d[sel[win]] = lab.value
        out[:, :, k] = lab2d.reshape(nx, ny)
    return out


@functools.lru_cache(maxsize=8)
def _base_csa(tpl: Template) -> dict[int, float]:
    """Per-label mean per-slice area (mm2) of the template on its grid, no warp or scaling."""
    grid = _grid(tpl)
    labels = _build_labels(tpl, _target_to_source(tpl, grid, 0.0, (0.0, 0.0), []), {})
    return _csa_per_label(labels, voxel_area_mm2(grid["affine"], 2))[0]


def _side_twin() -> dict[int, int]:
    by_pair = {(lab.muscle, lab.side): lab.value for lab in LABELS.labels}
    other = {"left": "right", "right": "left"}
    return {lab.value: by_pair[(lab.muscle, other[lab.side])] for lab in LABELS.labels}


def _value_of(muscle: str, side: str) -> int:
    for lab in LABELS.labels:
        if lab.muscle == muscle and lab.side == side:
            return lab.value
    msg = f"unknown muscle/side {muscle!r}/{side!r}; muscles are {MUSCLES}, sides left/right"
    raise ConfigError(msg)


def _csa_per_label(labels: NDArray, area_mm2: float) -> tuple[dict[int, float], dict[int, int]]:
    """Mean per-slice area (mm2) over slices where present, and that slice count, per label
    (canonical grid: slices along axis 2)."""
    csa, n_present = {}, {}
    counts = np.stack([np.bincount(labels[:, :, k].ravel(), minlength=256)
                       for k in range(labels.shape[2])], axis=1)
    for lab in LABELS.labels:
        per_slice = counts[lab.value]
        present = per_slice > 0
        n_present[lab.value] = int(present.sum())
        csa[lab.value] = float(per_slice[present].mean() * area_mm2) if present.any() else 0.0
    return csa, n_present


# --------------------------------------------------------------------------------------------
# Body, fat and intensities
# --------------------------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: tuple[float, ...]):
    f = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, truncate=3.0)
    sd = float(f.std())
    return f / sd if sd > 0 else f


def _landmarks(labels: NDArray, grid: dict[str, Any]) -> dict[str, NDArray]:
    """Per-slice spine position and muscle extents (template-frame mm), smoothed along z."""
    nz = labels.shape[2]
    u, v = grid["u"], grid["v"]
    keys = ("uc", "v_mf_ant", "v_post", "u_min", "u_max")
    out = {key: np.full(nz, np.nan) for key in keys}
    for k in range(nz):
        sl = labels[:, :, k]
        cents = []
        for val in (1, 2):
            ii, _ = np.nonzero(sl == val)
            if ii.size:
                cents.append(u[ii].mean())
        ii, jj = np.nonzero(sl > 0)
        if not ii.size:
            continue
        out["uc"][k] = float(np.mean(cents)) if len(cents) == 2 else float(np.median(u[ii]))
        _mi, mj = np.nonzero((sl == 1) | (sl == 2))
        out["v_mf_ant"][k] = float(np.percentile(v[mj], 3)) if mj.size else np.nan
        pj = np.nonzero(np.isin(sl, (1, 2, 3, 4)))[1]
        out["v_post"][k] = float(v[pj].max()) if pj.size else float(v[jj].max())
        out["u_min"][k] = float(u[ii].min())
        out["u_max"][k] = float(u[ii].max())
    for key in keys:
        arr = out[key]
        ok = np.isfinite(arr)
        if not ok.any():
            fallback = {"uc": grid["cu"], "v_mf_ant": grid["cv"], "v_post": grid["cv"] + 60,
                        "u_min": grid["cu"] - 60, "u_max": grid["cu"] + 60}[key]
            arr[:] = fallback
        else:
            arr[~ok] = np.interp(np.flatnonzero(~ok), np.flatnonzero(ok), arr[ok])
        if nz > 2:
            out[key] = ndi.gaussian_filter1d(arr, 1.0, mode="nearest")
    return out


def _superellipse(du: NDArray, dv: NDArray, a: float, b: float, n: float = 2.6) -> NDArray:
    return np.abs(du / a) ** n + np.abs(dv / b) ** n


#: Tissue classes of :func:`_build_body` (``classes`` argument), numbered after the 8 sided
#: muscle labels; 0 is air.  :mod:`helpers.synthseg` renders them with random intensities.
BODY_CLASSES: dict[str, int] = {
    "subcutaneous_fat": 9, "other_fat": 10, "skin": 11, "other_muscle": 12, "bowel": 13,
    "cortical_bone": 14, "marrow": 15, "csf": 16, "nerve_root": 17,
}


def _build_body(
    labels: NDArray, grid: dict[str, Any], rng: np.random.Generator, body: dict[str, float],
    classes: NDArray[np.uint8] | None = None,
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Non-muscle anatomy: (fat fraction, non-fat intensity as a fraction of I_fat) per voxel.

    When ``classes`` (uint8, the shape of ``labels``) is given, it receives each non-muscle
    voxel's tissue class (:data:`BODY_CLASSES`; 0 outside the body); muscle voxels are left as
    they are.  The returned arrays do not depend on it.
    """
    c = BODY_CLASSES
    nx, ny, nz = labels.shape
    sx, sy, _ = grid["spacing"]
    uu, vv = np.meshgrid(grid["u"], grid["v"], indexing="ij")
    lm = _landmarks(labels, grid)
    fat = np.zeros(labels.shape, np.float32)
    base = np.zeros(labels.shape, np.float32)
    sig_px = (6.0 / sx, 6.0 / sy, 0.6)
    bowel1 = _smooth_noise(rng, labels.shape, sig_px)
    bowel2 = _smooth_noise(rng, labels.shape, (2.0 / sx, 2.0 / sy, 0.6))
    # Regions do not overlap, so fields are shared: septa (fat) reuse bowel1, marrow bowel2.
    marrow, septa = bowel2, bowel1
    # Distance (mm) to the nearest muscle, in-plane: retroperitoneal fat keeps a margin.
    dist_muscle = ndi.distance_transform_edt(labels == 0, sampling=(sx, sy, 1e6))
    for k in range(nz):
        uc = lm["uc"][k]
        v_canal = lm["v_mf_ant"][k] - body["canal_gap_mm"]
        v_vb = v_canal - body["vb_offset_mm"]
        v_skin_post = lm["v_post"][k] + body["fat_post_mm"]
        v_skin_ant = v_vb - body["ant_depth_mm"]
        vb_c = (v_skin_post + v_skin_ant) / 2
        b = (v_skin_post - v_skin_ant) / 2
        half_lat = max(uc - lm["u_min"][k], lm["u_max"][k] - uc)
        a = max(body["half_width_mm"], half_lat + body["fat_lat_mm"] + 30.0)
        du, dv = uu - uc, vv - vb_c
        in_body = _superellipse(du, dv, a, b) <= 1.0
        skin_in = _superellipse(du, dv, a - 2.0, b - 2.0) <= 1.0
        # inner boundary of the subcutaneous fat ring
        in_post = lm["v_post"][k] + 2.0
        in_ant = v_skin_ant + body["fat_lat_mm"]
        inner = _superellipse(du, vv - (in_post + in_ant) / 2, a - body["fat_lat_mm"],
                              (in_post - in_ant) / 2) <= 1.0
        wall_t = body["wall_mm"]
        inner2 = _superellipse(du, vv - (in_post + in_ant) / 2, a - body["fat_lat_mm"] - wall_t,
                               (in_post - in_ant) / 2 - wall_t) <= 1.0
        f2 = np.zeros((nx, ny), np.float32)
        b2 = np.zeros((nx, ny), np.float32)
        c2 = np.zeros((nx, ny), np.uint8)
        # skin and subcutaneous / retroperitoneal / paraspinal fat
        b2[in_body] = _I_SKIN
        c2[in_body] = c["skin"]
        fatty = skin_in.copy()
        f2[fatty] = 1.0
        c2[fatty] = np.where(inner[fatty], c["other_fat"], c["subcutaneous_fat"])
        sep = fatty & (np.abs(septa[:, :, k]) < 0.025)
        f2[sep] = 0.75
        b2[sep] = 0.25
        c2[sep] = c["other_fat"]
        # abdominal wall (muscle), anterior and lateral only
        wall = inner & ~inner2 & (vv < lm["v_post"][k] - 15.0)
        f2[wall] = 0.0
        b2[wall] = _I_WALL
        c2[wall] = c["other_muscle"]
        # peritoneal cavity (bowel-like texture): anterior to the spine, reaching further back
        # in the flanks, with a margin of retroperitoneal fat around muscles and vertebra
        v_lim = v_vb - 12.0 + 0.004 * du * du
        g_irr = bowel2[:, :, k]
        near_vb = _superellipse(du, vv - v_vb, body["vb_rx_mm"] + 6, body["vb_ry_mm"] + 6, 2.0)
        cav = (inner2 & (vv < v_lim) & (near_vb > 1.0)
               & (dist_muscle[:, :, k] > body["retro_fat_mm"] * np.clip(1 + 0.9 * g_irr, 0.3, 3)))
        g1, g2 = bowel1[:, :, k], bowel2[:, :, k]
        bow = 0.36 + 0.07 * g2
        bow = np.where(g1 > 0.5, 0.08 + 0.04 * g2, bow)  # collapsed loops / gas, dark
        bow = np.where((g1 > 0.25) & (g1 <= 0.5), 0.2, bow)
        bow = np.where(g2 > 2.0, 0.8, bow)  # fluid, bright
        mesent = cav & (g1 < -1.5)
        f2[cav] = 0.0
        b2[cav] = bow[cav]
        c2[cav] = c["bowel"]
        f2[mesent] = 1.0
        c2[mesent] = c["other_fat"]
        # vertebral body with cortex, spinal canal, posterior elements
        r_vb = _superellipse(du, vv - v_vb, body["vb_rx_mm"], body["vb_ry_mm"], 2.0)
        vb = r_vb <= 1.0
        f2[vb] = 0.0
        b2[vb] = _I_CORTEX
        c2[vb] = c["cortical_bone"]
        core = _superellipse(du, vv - v_vb, body["vb_rx_mm"] - 2.0, body["vb_ry_mm"] - 2.0, 2.0) <= 1
        b2[core] = _I_MARROW * (1 + 0.12 * marrow[:, :, k][core])
        c2[core] = c["marrow"]
        rc_u, rc_v = body["canal_rx_mm"], body["canal_ry_mm"]
        r_c = _superellipse(du, vv - v_canal, rc_u, rc_v, 2.0)
        lam = (_superellipse(du, vv - v_canal, rc_u + 4.5, rc_v + 4.5, 2.0) <= 1.0) & (
            vv > v_canal - 0.3 * rc_v)
        f2[lam] = 0.0
        b2[lam] = _I_CORTEX
        c2[lam] = c["cortical_bone"]
        spin = (np.abs(du) < 3.5) & (vv > v_canal) & (vv < lm["v_post"][k] - 8.0)
        f2[spin] = 0.0
        b2[spin] = _I_CORTEX * 2
        c2[spin] = c["cortical_bone"]
        canal = r_c <= 1.0
        f2[canal] = 0.0
        b2[canal] = _I_CSF
        c2[canal] = c["csf"]
        roots = canal & (np.abs(marrow[:, :, k]) > 1.6)
        b2[roots] = 0.25
        c2[roots] = c["nerve_root"]
        fat[:, :, k] = f2
        base[:, :, k] = b2
        if classes is not None:
            muscle = labels[:, :, k] > 0
            classes[:, :, k] = np.where(muscle, classes[:, :, k], c2)
    return fat, base


def _muscle_fat(
    labels: NDArray,
    grid: dict[str, Any],
    targets: Mapping[int, float],
    rng: np.random.Generator,
    z_gradient: float,
) -> NDArray[np.float32]:
    """Per-voxel fat fraction inside the muscles from 4 x 4 sub-voxel sampling."""
    _nx, _ny, nz = labels.shape
    sx, sy, _sz = grid["spacing"]
    ff = np.zeros(labels.shape, np.float32)
    idx = np.nonzero(labels)
    if not idx[0].size:
        return ff
    lo = [max(int(a.min()) - 2, 0) for a in idx]
    hi = [min(int(a.max()) + 3, n) for a, n in zip(idx, labels.shape, strict=True)]
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    lab = labels[box]
    shape = lab.shape
    # Septa: thin curvilinear lines near the zero set of a smooth field (fat between fascicles),
    # elongated antero-posteriorly, plus larger patches of fatty replacement.
    g = _smooth_noise(rng, shape, (max(1.8 / sx, 0.4), max(3.2 / sy, 0.4), 0.4))
    score = -np.abs(g) * 2.0
    score += 0.45 * _smooth_noise(rng, shape, (max(5.0 / sx, 0.5), max(5.0 / sy, 0.5), 0.6))
    # More fat at the muscle border (epimysial fat): distance to the border of the own label.
    border = np.zeros(shape, bool)
    for axis in (0, 1):
        for shift in (1, -1):
            border |= lab != np.roll(lab, shift, axis=axis)
    dist = ndi.distance_transform_edt(~border, sampling=(sx, sy, 1e6)).astype(np.float32)
    score += 0.6 * np.exp(-dist / 2.0)
    # Fattier caudally (z index 0 = inferior).
    zn = np.linspace(-1.0, 1.0, nz)[box[2]] if nz > 1 else np.zeros(1)
    score += z_gradient * zn[None, None, :].astype(np.float32)
    li, lj, lk = np.nonzero(lab)
    values = lab[li, lj, lk]
    sub = _subvoxel_linear(score, li, lj, lk)
    frac = np.zeros(values.size, np.float32)
    for val in np.unique(values):
        rows = values == val
        target = float(np.clip(targets.get(int(val), 0.0) / 100.0, 0.0, 1.0))
        s = sub[rows]
        if target <= 0:
            continue
        if target >= 1:
            frac[rows] = 1.0
            continue
        n_fat = round(target * s.size)
        flat = s.ravel()
        thr_idx = flat.size - n_fat
        order = np.argpartition(flat, thr_idx) if 0 < thr_idx < flat.size else None
        is_fat = np.zeros(flat.size, bool)
        if order is not None:
            is_fat[order[thr_idx:]] = True
        elif thr_idx <= 0:
            is_fat[:] = True
        frac[rows] = is_fat.reshape(s.shape).mean(axis=1)
    ff[box][li, lj, lk] = frac
    return ff


def _subvoxel_linear(score: NDArray, li: NDArray, lj: NDArray, lk: NDArray) -> NDArray:
    """Linear interpolation of ``score`` at the 4 x 4 in-plane sub-voxel centres of the voxels
    ``(li, lj, lk)``: returns shape (n_voxels, 16).  Equals ``map_coordinates(order=1,
    mode="nearest")`` at those points, but gathers only 9 neighbours per voxel."""
    nx, ny, _ = score.shape
    nb = {}
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            nb[di, dj] = score[np.clip(li + di, 0, nx - 1), np.clip(lj + dj, 0, ny - 1), lk]
    out = np.empty((li.size, _SUB * _SUB), np.float32)
    col = 0
    for oi in _SUB_OFFSETS:
        di, wi = (1 if oi > 0 else -1), abs(float(oi))
        for oj in _SUB_OFFSETS:
            dj, wj = (1 if oj > 0 else -1), abs(float(oj))
            out[:, col] = ((1 - wi) * (1 - wj) * nb[0, 0] + wi * (1 - wj) * nb[di, 0]
                           + (1 - wi) * wj * nb[0, dj] + wi * wj * nb[di, dj])
            col += 1
    return out


def _bias_field(grid: dict[str, Any], shape: tuple[int, int, int], affine: NDArray,
                bias_lr: float, bias_ap: float, coeffs: NDArray) -> NDArray[np.float32]:
    """Smooth multiplicative field defined in world coordinates (so orientation-free)."""
    nx, ny, nz = shape
    ii, jj, kk = np.meshgrid(np.arange(nx), np.arange(ny), np.arange(nz), indexing="ij",
                             sparse=True)
    x = affine[0, 0] * ii + affine[0, 3]
    y = affine[1, 1] * jj + affine[1, 3]
    z = affine[2, 2] * kk + affine[2, 3]
    half = 120.0  # mm: half the 240 mm field of view
    xn, yn = x / half, y / half
    zc = affine[2, 3] + affine[2, 2] * (nz - 1) / 2
    zn = (z - zc) / 60.0
    smooth = (coeffs[0] * xn * xn + coeffs[1] * yn * yn + coeffs[2] * xn * yn + coeffs[3] * zn
              + coeffs[4] * xn * zn)
    field_ = (1.0 + bias_lr * xn - bias_ap * yn) * np.exp(smooth)
    return np.clip(field_, 0.2, None).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Truth
# --------------------------------------------------------------------------------------------

TRUTH_COLUMNS = ["subject", "level", "slice", "muscle", "side", "n_slices", "csa_mm2", "fat_pct",
                 "fcsa_mm2"]
ASYMMETRY_COLUMNS = ["subject", "level", "muscle", "cdi", "cdi_abs", "lfiar", "lfiar_log"]
#: Denominator floor (%) of LFIAR.
LFIAR_FLOOR_PCT = 0.5


def truth_from_arrays(
    mask: NDArray,
    fat_fraction: NDArray,
    affine: NDArray,
    labels: LabelTable,
    levels: pd.DataFrame | None,
    subject: str,
) -> pd.DataFrame:
    """Exact truth table from a label mask and the per-voxel true fat fraction.

    Parameters
    ----------
    mask : ndarray of int
        Label mask in the file's array order.
    fat_fraction : ndarray of float
        True fat fraction (0-1) per voxel, same grid.
    affine : ndarray (4, 4)
        Voxel-to-RAS+ affine (mm) of the grid; gives the slice axis and voxel area (mm2).
    labels : LabelTable
        Sided labels.
    levels : DataFrame or None
        ``slice``, ``level`` in the file's array order.
    subject : str
        Subject ID for the ``subject`` column.

    Returns
    -------
    DataFrame
        Columns :data:`TRUTH_COLUMNS`; per-slice rows first, then aggregates per level and
        ``"all"`` (``slice`` = NA).
    """
    ax = slice_axis(affine)
    area = voxel_area_mm2(affine, ax)
    m = np.moveaxis(np.asarray(mask), ax, -1)
    f = np.moveaxis(np.asarray(fat_fraction, dtype=np.float64), ax, -1)
    nz = m.shape[-1]
    level_of = {}
    level_names: list[str] = []
    if levels is not None and len(levels):
        for s, lev in zip(levels["slice"].astype(int), levels["level"].astype(str), strict=True):
            level_of[int(s)] = lev
        level_names = list(dict.fromkeys(str(x) for x in levels.sort_values("slice")["level"]))
    m2 = m.reshape(-1, nz)
    f2 = f.reshape(-1, nz)
    rows: list[dict[str, Any]] = []
    agg: list[dict[str, Any]] = []
    for lab in labels.labels:
        sel = m2 == lab.value
        counts = sel.sum(axis=0)
        fsum = np.where(sel, f2, 0.0).sum(axis=0)
        for s in np.flatnonzero(counts):
            csa = counts[s] * area
            fat = 100.0 * fsum[s] / counts[s]
            rows.append({"subject": subject, "level": level_of.get(int(s), pd.NA),
                         "slice": int(s), "muscle": lab.muscle, "side": lab.side,
                         "n_slices": 1, "csa_mm2": csa, "fat_pct": fat,
                         "fcsa_mm2": csa * (1 - fat / 100.0)})
        for name in [*level_names, "all"]:
            in_level = np.array([name == "all" or level_of.get(s) == name for s in range(nz)])
            c = counts[in_level]
            present = c > 0
            if present.any():
                csa = float(c[present].mean() * area)
                fat = float(100.0 * fsum[in_level].sum() / c.sum())
                fcsa = csa * (1 - fat / 100.0)
            else:
                csa = fat = fcsa = float("nan")
            agg.append({"subject": subject, "level": name, "slice": pd.NA, "muscle": lab.muscle,
                        "side": lab.side, "n_slices": int(present.sum()), "csa_mm2": csa,
                        "fat_pct": fat, "fcsa_mm2": fcsa})
    per_slice = pd.DataFrame(rows, columns=TRUTH_COLUMNS)
    out = pd.concat([per_slice, pd.DataFrame(agg, columns=TRUTH_COLUMNS)], ignore_index=True)
    out["slice"] = out["slice"].astype("Int64")
    out["n_slices"] = out["n_slices"].astype(int)
    out["level"] = out["level"].astype(object)
    return _sort_truth(out, labels)


def asymmetry_from_truth(truth: pd.DataFrame, lfiar_floor_pct: float = LFIAR_FLOOR_PCT
                         ) -> pd.DataFrame:
    """Asymmetry truth (CDI, LFIAR) per subject, level and muscle from aggregate truth rows.

    ``cdi = (FCSA_L - FCSA_R) / ((FCSA_L + FCSA_R) / 2)``; ``lfiar = FI_L / max(FI_R, floor)``
    with FI the fat percentage; ``lfiar_log = ln(lfiar)`` (NaN when ``lfiar`` is not positive).
    """
    agg = truth[truth["slice"].isna()]
    rows = []
    for (subject, level, muscle), grp in agg.groupby(["subject", "level", "muscle"], sort=False):
        sides = grp.set_index("side")
        if not {"left", "right"} <= set(sides.index):
            continue
        fl, fr = sides.loc["left", "fcsa_mm2"], sides.loc["right", "fcsa_mm2"]
        il, ir = sides.loc["left", "fat_pct"], sides.loc["right", "fat_pct"]
        cdi = (fl - fr) / ((fl + fr) / 2) if (fl + fr) > 0 else float("nan")
        lfiar = il / max(ir, lfiar_floor_pct) if np.isfinite(ir) else float("nan")
        lfiar_log = math.log(lfiar) if np.isfinite(lfiar) and lfiar > 0 else float("nan")
        rows.append({"subject": subject, "level": level, "muscle": muscle, "cdi": cdi,
                     "cdi_abs": abs(cdi), "lfiar": lfiar, "lfiar_log": lfiar_log})
    return pd.DataFrame(rows, columns=ASYMMETRY_COLUMNS)


def levels_for_file(canonical_levels: list[str | None], transform: NDArray,
                    nz: int) -> pd.DataFrame:
    """Slice-to-level table in a file's own array order from canonical (inferior-first) levels.

    ``transform`` is the nibabel orientation transform from the canonical L-P-S array to the
    file's array (canonical axis 2 is the slice axis).
    """
    flip = transform[2, 1] < 0
    rows = []
    for k, lev in enumerate(canonical_levels):
        if lev is None:
            continue
        rows.append({"slice": nz - 1 - k if flip else k, "level": str(lev)})
    return pd.DataFrame(rows, columns=["slice", "level"]).sort_values("slice", ignore_index=True)


# --------------------------------------------------------------------------------------------
# The phantom
# --------------------------------------------------------------------------------------------


def _parse_pairs(mapping: Mapping | None, what: str) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, val in (mapping or {}).items():
        if isinstance(key, str):
            muscle, _, side = key.partition(":")
        else:
            muscle, side = key
        out[_value_of(muscle, side)] = float(val)
        if not np.isfinite(out[_value_of(muscle, side)]) or float(val) < 0:
            msg = f"{what}[{key!r}] must be a finite non-negative number, got {val!r}"
            raise ConfigError(msg)
    return out


def _orientation_codes(orientation: str | tuple[str, str, str]) -> tuple[str, str, str]:
    codes = tuple(orientation.upper()) if isinstance(orientation, str) else tuple(orientation)
    if len(codes) != 3:
        msg = f"orientation must be three axis codes like 'LPS', got {orientation!r}"
        raise ConfigError(msg)
    return codes  # type: ignore[return-value]


def make_phantom(
    subject: str = "syn-001",
    *,
    seed: int = 0,
    orientation: str | tuple[str, str, str] = "LPS",
    fat_pct: Mapping | None = None,
    csa_scale: Mapping | None = None,
    cdi: Mapping[str, float] | None = None,
    bias_lr: float = 0.2,
    bias_ap: float = 0.15,
    bias_smooth: float = 0.05,
    snr: float = 25.0,
    template: str = "example",
    shape: tuple[int, int, int] | None = None,
    rotation_deg: float = 0.0,
    shift_mm: tuple[float, float] = (0.0, 0.0),
    warp_mm: float = 3.0,
    fat_z_gradient: float = -0.4,
    texture: float = 0.03,
    levels: list[str | None] | None = None,
    i_fat: float = I_FAT,
    i_muscle: float = I_MUSCLE,
) -> Phantom:
    """Make one lumbar axial T2 phantom with planted truth.

    Parameters
    ----------
    subject : str
        Subject ID.
    seed : int
        Seeds the warp, body, fat structure, texture and noise (same seed, same phantom).
    orientation : str or tuple
        Array order of the stored volume, e.g. ``"LPS"`` (like the example), ``"RAS"``,
        ``"LAS"``; the anatomy and truth do not change.
    fat_pct : mapping, optional
        Target fat (%) per ``(muscle, side)`` (or ``"muscle:side"``), overriding
        :data:`DEFAULT_FAT_PCT`.  Planted exactly over the whole stack (to a sub-voxel).
    csa_scale : mapping, optional
        Area factor per ``(muscle, side)`` relative to the template, applied about the muscle's
        per-slice centroid.
    cdi : mapping, optional
        Target functional-area asymmetry per muscle, ``(FCSA_L - FCSA_R) / mean`` over the whole
        stack (``level="all"``).  The two sides' areas are scaled (on top of ``csa_scale``) to
        within about 0.01, then the two sides' fat targets are nudged (usually by well under
        one percentage point) so that the realised CDI equals the target to about 1e-4.
    bias_lr : float
        Left-right bias gradient: the field is ``1 + bias_lr`` at the patient's right edge of the
        240 mm field of view and ``1 - bias_lr`` at the left edge.
    bias_ap : float
        Antero-posterior gradient (posterior brighter for positive values, like a spine coil).
    bias_smooth : float
        Size of random low-order (quadratic, z) bias terms.
    snr : float
        ``I_fat / sigma`` of the Rician noise.
    template : {"example", "small"}
        Target grid: ``example`` 256 x 208 x 20 (0.94 x 0.94 x 4.4 mm), ``small`` 96 x 96 x 8
        (2.5 x 2.5 x 11 mm, for large cohorts).
    shape : tuple of int, optional
        Override the template's canonical (L-P-S) shape; the field of view stays.
    rotation_deg, shift_mm : float, (float, float)
        Axial rotation about the spine (degrees) and in-plane shift (world mm, x to the
        patient's right, y anterior): an off-centre, rotated spine.
    warp_mm : float
        Amplitude of the random smooth deformation (mm).
    fat_z_gradient : float
        Caudal fat excess (negative: fattier inferior slices).
    texture : float
        Relative SD of smooth lean-muscle texture.
    levels : list, optional
        Level name per canonical slice (index 0 most inferior); default :func:`default_levels`.
    i_fat, i_muscle : float
        Pure fat and lean muscle intensities.

    Returns
    -------
    Phantom
    """
    tpl = _template(template)
    if shape is not None:
        if len(shape) != 3 or min(shape) < 1:
            msg = f"shape must be three positive integers, got {shape!r}"
            raise ConfigError(msg)
        tpl = Template(tpl.name, tuple(int(n) for n in shape), tpl.fov_mm)  # type: ignore[arg-type]
    if not snr > 0:
        msg = f"snr must be positive, got {snr!r}"
        raise ConfigError(msg)
    codes = _orientation_codes(orientation)
    grid = _grid(tpl)
    canon_affine = grid["affine"]
    transform = _ornt_transform(canon_affine, codes)
    nz = tpl.shape[2]
    if levels is None:
        levels = default_levels(tpl)
    if len(levels) != nz:
        msg = f"levels has {len(levels)} entries; the phantom has {nz} slices"
        raise ConfigError(msg)

    ss = np.random.SeedSequence(seed)
    r_warp, r_body, r_fat, r_tex, r_noise, r_bias = (np.random.default_rng(s) for s in ss.spawn(6))

    targets = {lab.value: DEFAULT_FAT_PCT.get(lab.muscle, 8.0) for lab in LABELS.labels}
    targets.update(_parse_pairs(fat_pct, "fat_pct"))
    scales = {lab.value: 1.0 for lab in LABELS.labels}
    scales.update(_parse_pairs(csa_scale, "csa_scale"))
    warp_terms = _warp_terms(r_warp, warp_mm)
    area = voxel_area_mm2(canon_affine, 2)

    for muscle, target in (cdi or {}).items():
        if not -1.9 < float(target) < 1.9:
            msg = f"cdi[{muscle!r}] must lie in (-1.9, 1.9), got {target!r}"
            raise ConfigError(msg)
    coords = _target_to_source(tpl, grid, rotation_deg, tuple(shift_mm), warp_terms)
    if cdi:
        # First guess from the unwarped template's areas (cached), so one build usually suffices.
        base = _base_csa(tpl)
        for muscle, target in cdi.items():
            vl, vr = _value_of(muscle, "left"), _value_of(muscle, "right")
            fl = base[vl] * scales[vl] * (1 - targets[vl] / 100)
            fr = base[vr] * scales[vr] * (1 - targets[vr] / 100)
            if fl > 0 and fr > 0:
                r = ((2 + float(target)) / (2 - float(target))) / (fl / fr)
                scales[vl] *= math.sqrt(r)
                scales[vr] /= math.sqrt(r)
    labels = _build_labels(tpl, coords, scales)
    # Functional-area asymmetry: scale the two sides (coarse, at most two rebuilds), then hit
    # the target exactly by nudging the two sides' fat targets (fat is planted to a sub-voxel).
    for attempt in range(3):
        csa, _ = _csa_per_label(labels, area)
        off = False
        for muscle, target in (cdi or {}).items():
            vl, vr = _value_of(muscle, "left"), _value_of(muscle, "right")
            fl = csa[vl] * (1 - targets[vl] / 100)
            fr = csa[vr] * (1 - targets[vr] / 100)
            if fl <= 0 or fr <= 0:
                continue
            miss = abs((fl - fr) / ((fl + fr) / 2) - float(target))
            log.debug("%s: cdi %s attempt %d misses by %.4f", subject, muscle, attempt, miss)
            if miss > 0.015:
                off = True
                r = ((2 + float(target)) / (2 - float(target))) / (fl / fr)
                scales[vl] *= math.sqrt(r)
                scales[vr] /= math.sqrt(r)
        if not off or attempt == 2:
            break
        labels = _build_labels(tpl, coords, scales)
    for muscle, target in (cdi or {}).items():
        vl, vr = _value_of(muscle, "left"), _value_of(muscle, "right")
        if csa[vl] <= 0 or csa[vr] <= 0:
            log.warning("%s: cdi for %s not planted: a side is absent", subject, muscle)
            continue
        lean_l, lean_r = 1 - targets[vl] / 100, 1 - targets[vr] / 100
        want = ((2 + float(target)) / (2 - float(target))) * csa[vr] / csa[vl]  # lean_l / lean_r
        adj = math.sqrt(want / (lean_l / lean_r))
        new_l, new_r = lean_l * adj, lean_r / adj
        if not (0.05 <= new_l <= 1 and 0.05 <= new_r <= 1):
            msg = f"cdi[{muscle!r}] = {target} cannot be planted on this anatomy"
            raise ConfigError(msg)
        if max(abs(new_l - lean_l), abs(new_r - lean_r)) > 0.02:
            log.warning("%s: fat of %s moved by > 2 points to plant cdi", subject, muscle)
        targets[vl], targets[vr] = 100 * (1 - new_l), 100 * (1 - new_r)

    body = {
        "fat_post_mm": float(r_body.uniform(18, 38)),
        "fat_lat_mm": float(r_body.uniform(12, 28)),
        "half_width_mm": float(r_body.uniform(125, 165)),
        "retro_fat_mm": float(r_body.uniform(2, 6)),
        "ant_depth_mm": float(r_body.uniform(115, 150)),
        "canal_gap_mm": 9.0,
        "vb_offset_mm": float(r_body.uniform(26, 30)),
        "vb_rx_mm": float(r_body.uniform(20, 24)),
        "vb_ry_mm": float(r_body.uniform(15, 18)),
        "canal_rx_mm": 11.0,
        "canal_ry_mm": 7.5,
        "wall_mm": float(r_body.uniform(7, 12)),
    }
    fat_all, base = _build_body(labels, grid, r_body, body)
    ff_muscle = _muscle_fat(labels, grid, targets, r_fat, fat_z_gradient)
    in_muscle = labels > 0
    fat_all[in_muscle] = ff_muscle[in_muscle]
    tex = _smooth_noise(r_tex, labels.shape, (1.0, 1.0, 0.5))
    base[in_muscle] = (i_muscle / i_fat) * (1.0 + texture * tex[in_muscle])
    clean = i_fat * (fat_all + (1.0 - fat_all) * base)
    coeffs = r_bias.normal(0.0, 1.0, 5) * bias_smooth
    bias = _bias_field(grid, labels.shape, canon_affine, bias_lr, bias_ap, coeffs)
    sigma = i_fat / snr
    signal = clean * bias
    noisy = np.hypot(signal + r_noise.normal(0.0, sigma, signal.shape),
                     r_noise.normal(0.0, sigma, signal.shape))
    image = np.clip(np.rint(noisy), 0, 32767).astype(np.float32)

    # Truth on the canonical grid (independent of storage order), then re-store.
    canon_levels = levels_for_file(list(levels), np.array([[0, 1], [1, 1], [2, 1]]), nz)
    truth = truth_from_arrays(labels, fat_all, canon_affine, LABELS, canon_levels, subject)
    affine = canon_affine @ nio.inv_ornt_aff(transform, labels.shape)
    file_levels = levels_for_file(list(levels), transform, nz)
    if transform[2, 1] < 0:  # slice index in the file's own order
        flip = {k: nz - 1 - k for k in range(nz)}
        truth["slice"] = truth["slice"].map(lambda s: flip[int(s)] if pd.notna(s) else s)
        truth["slice"] = truth["slice"].astype("Int64")
    asym = asymmetry_from_truth(truth)

    img = _nifti(_apply(image, transform), affine, np.float32)
    msk = _nifti(_apply(labels, transform), affine, np.uint8)
    params = {
        "subject": subject, "seed": seed, "orientation": "".join(codes), "template": tpl.name,
        "shape": list(tpl.shape), "spacing_mm": list(grid["spacing"]),
        "fat_pct_target": {_key(v): t for v, t in targets.items()},
        "csa_scale": {_key(v): s for v, s in scales.items()},
        "cdi_target": dict(cdi or {}),
        "bias_lr": bias_lr, "bias_ap": bias_ap, "bias_smooth": bias_smooth,
        "bias_coeffs": coeffs.tolist(), "snr": snr, "noise_sigma": sigma, "i_fat": i_fat,
        "i_muscle": i_muscle, "rotation_deg": rotation_deg, "shift_mm": list(shift_mm),
        "warp_mm": warp_mm, "fat_z_gradient": fat_z_gradient, "texture": texture,
        "levels_canonical": list(levels), "body": body,
    }
    return Phantom(subject=subject, image=img, mask=msk, labels=LABELS, levels=file_levels,
                   truth=truth, asymmetry=asym,
                   fat_fraction=_apply(fat_all, transform).astype(np.float32), params=params)


def _key(value: int) -> str:
    lab = LABELS.by_value(value)
    return f"{lab.muscle}:{lab.side}"


def _nifti(data: NDArray, affine: NDArray, dtype: type) -> nib.Nifti1Image:
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    img.set_data_dtype(dtype)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


def mirror_left_right(ph: Phantom) -> Phantom:
    """Mirror the anatomy in world x and swap the side labels.

    The array axis that runs along world x is flipped (affine unchanged), so what lay on the
    patient's right now lies on the left; mask values are swapped to their other-side twin so
    labels stay anatomically true.  Truth sides are swapped: CDI negates, LFIAR inverts (up to
    its denominator floor).
    """
    affine = ph.image.affine
    ax = int(np.argmax(np.abs(affine[0, :3])))
    twin = _side_twin()
    lut = np.arange(256, dtype=np.uint8)
    for a, b in twin.items():
        lut[a] = b
    img = np.flip(np.asarray(ph.image.dataobj), axis=ax)
    msk = lut[np.flip(np.asarray(ph.mask.dataobj), axis=ax)]
    ff = np.flip(ph.fat_fraction, axis=ax)
    truth = ph.truth.copy()
    truth["side"] = truth["side"].map({"left": "right", "right": "left"})
    truth = _sort_truth(truth)
    params = dict(ph.params, mirrored=not ph.params.get("mirrored", False))
    return replace(
        ph,
        image=_nifti(np.ascontiguousarray(img), affine, np.float32),
        mask=_nifti(np.ascontiguousarray(msk), ph.mask.affine, np.uint8),
        fat_fraction=np.ascontiguousarray(ff),
        truth=truth,
        asymmetry=asymmetry_from_truth(truth),
        params=params,
    )


def _sort_truth(truth: pd.DataFrame, labels: LabelTable = LABELS) -> pd.DataFrame:
    """Rows in :func:`truth_from_arrays` order: per-slice rows by slice then label, then the
    aggregates by label then level (levels in their first-seen order)."""
    label_pos = {(lab.muscle, lab.side): i for i, lab in enumerate(labels.labels)}
    agg_mask = truth["slice"].isna().to_numpy()
    level_pos = {name: i for i, name in enumerate(dict.fromkeys(truth.loc[agg_mask, "level"]))}
    lab_key = np.array([label_pos[(m, s)] for m, s in zip(truth["muscle"], truth["side"],
                                                           strict=True)])
    slice_key = truth["slice"].fillna(-1).to_numpy(dtype=np.int64)
    level_key = np.array([level_pos.get(lev, -1) if a else -1
                          for lev, a in zip(truth["level"], agg_mask, strict=True)])
    order = np.lexsort((level_key, lab_key, slice_key, agg_mask))
    return truth.iloc[order].reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# Writing and cohorts
# --------------------------------------------------------------------------------------------


def write_phantom(ph: Phantom, folder: str | Path, *, prefix_tables: bool = False,
                  fat_fraction: bool = False) -> dict[str, Path]:
    """Write a phantom atomically.

    Files: ``<subject>_T2w.nii.gz`` (int16), ``<subject>_dseg.nii.gz`` (uint8), ``labels.json``,
    ``levels.csv``, ``truth.csv``, ``asymmetry_truth.csv``, ``params.json`` and, with
    ``fat_fraction=True``, ``<subject>_fatfrac.nii.gz``.  With ``prefix_tables=True`` the tables
    are named ``<subject>_levels.csv`` etc. (several subjects in one folder).

    Returns
    -------
    dict
        Keys ``image, mask, labels, levels, truth, asymmetry, params`` (+ ``fat_fraction``).
    """
    folder = Path(folder)
    pre = f"{ph.subject}_" if prefix_tables else ""
    paths = {
        "image": folder / f"{ph.subject}_T2w.nii.gz",
        "mask": folder / f"{ph.subject}_dseg.nii.gz",
        "labels": folder / "labels.json",
        "levels": folder / f"{pre}levels.csv",
        "truth": folder / f"{pre}truth.csv",
        "asymmetry": folder / f"{pre}asymmetry_truth.csv",
        "params": folder / f"{pre}params.json",
    }
    data = np.asarray(ph.image.dataobj)
    save_like(np.clip(np.rint(data), 0, 32767).astype(np.int16), ph.image, paths["image"])
    save_like(np.asarray(ph.mask.dataobj).astype(np.uint8), ph.mask, paths["mask"])
    atomic_write_text(paths["labels"], json.dumps(LABELS_DOC, indent=2) + "\n")
    atomic_write_text(paths["levels"], ph.levels.to_csv(index=False))
    atomic_write_text(paths["truth"], ph.truth.to_csv(index=False))
    atomic_write_text(paths["asymmetry"], ph.asymmetry.to_csv(index=False))
    atomic_write_text(paths["params"], json.dumps(ph.params, indent=2, default=float) + "\n")
    if fat_fraction:
        paths["fat_fraction"] = folder / f"{ph.subject}_fatfrac.nii.gz"
        save_like(ph.fat_fraction.astype(np.float32), ph.image, paths["fat_fraction"])
    return paths


#: Relative fat level of each muscle in drawn cohorts (multifidus fattiest, psoas leanest).
_COHORT_FAT_FACTOR = {"multifidus": 1.25, "erector_spinae": 1.0, "psoas_major": 0.45,
                      "quadratus_lumborum": 0.8}
_SCALAR_KWARGS = ("seed", "orientation", "bias_lr", "bias_ap", "bias_smooth", "snr",
                  "rotation_deg", "warp_mm", "fat_z_gradient", "texture", "template")


def draw_subject_params(rng: np.random.Generator,
                        orientations: tuple[str, ...] = ("LPS", "RAS", "LAS")) -> dict[str, Any]:
    """Draw realistic phantom parameters for one cohort subject.

    Fat 3-25 % per muscle and side (multifidus fattiest, psoas leanest; left/right fat ratio
    log-normal, SD 0.2), functional-area asymmetry ``cdi`` per muscle normal (SD 0.1) clipped to
    +-0.3, left-right bias gradient uniform in +-0.3, antero-posterior 0-0.25, SNR 18-40, axial
    rotation SD 3 degrees, off-centre shift SD 6 mm, orientation drawn from ``orientations``.
    """
    base = rng.uniform(4.0, 20.0)
    fat: dict[tuple[str, str], float] = {}
    cdi: dict[str, float] = {}
    for muscle in MUSCLES:
        level = base * _COHORT_FAT_FACTOR[muscle] * math.exp(rng.normal(0.0, 0.15))
        ratio = math.exp(rng.normal(0.0, 0.2))
        # drawn within 4-24 % so that planting the CDI (fat nudged by < 1 point) stays in 3-25 %
        fat[(muscle, "left")] = float(np.clip(level * math.sqrt(ratio), 4.0, 24.0))
        fat[(muscle, "right")] = float(np.clip(level / math.sqrt(ratio), 4.0, 24.0))
        cdi[muscle] = float(np.clip(rng.normal(0.0, 0.1), -0.3, 0.3))
    return {
        "seed": int(rng.integers(0, 2**31 - 1)),
        "orientation": str(rng.choice(list(orientations))),
        "fat_pct": fat,
        "cdi": cdi,
        "bias_lr": float(rng.uniform(-0.3, 0.3)),
        "bias_ap": float(rng.uniform(0.0, 0.25)),
        "snr": float(rng.uniform(18.0, 40.0)),
        "rotation_deg": float(rng.normal(0.0, 3.0)),
        "shift_mm": (float(rng.normal(0.0, 6.0)), float(rng.normal(0.0, 3.0))),
    }


def _apply_plan_row(kw: dict[str, Any], row: Mapping[str, Any]) -> None:
    """Override drawn parameters with a plan row (see :func:`make_cohort`).

    A muscle whose fat the plan sets keeps that fat exactly: its drawn CDI is dropped (planting a
    CDI nudges fat) unless the plan sets its CDI too.
    """
    fat_set: set[str] = set()
    cdi_set: set[str] = set()
    for col, val in row.items():
        if val is None or (isinstance(val, float) and math.isnan(val)):
            continue
        for muscle in MUSCLES:
            if col.startswith((f"fat_{muscle}", f"lfiar_{muscle}")):
                fat_set.add(muscle)
            if col == f"cdi_{muscle}" or (col == "es_cdi" and muscle == "erector_spinae"):
                cdi_set.add(muscle)
    for muscle in fat_set - cdi_set:
        kw["cdi"].pop(muscle, None)
    for col, val in row.items():
        if col == "subject" or val is None or (isinstance(val, float) and math.isnan(val)):
            continue
        if col in _SCALAR_KWARGS:
            kw[col] = type(kw.get(col, val))(val) if col != "template" else str(val)
        elif col == "es_cdi":
            kw["cdi"]["erector_spinae"] = float(val)
        elif col.startswith("cdi_") and col[4:] in MUSCLES:
            kw["cdi"][col[4:]] = float(val)
        elif col.startswith("fat_"):
            rest = col[4:]
            for muscle in MUSCLES:
                if rest == muscle:
                    kw["fat_pct"][(muscle, "left")] = float(val)
                    kw["fat_pct"][(muscle, "right")] = float(val)
                elif rest in (f"{muscle}_left", f"{muscle}_right"):
                    kw["fat_pct"][(muscle, rest.rsplit("_", 1)[1])] = float(val)
        elif col.startswith("lfiar_") and col[6:] in MUSCLES:
            muscle = col[6:]
            mean = (kw["fat_pct"][(muscle, "left")] + kw["fat_pct"][(muscle, "right")]) / 2
            ratio = float(val)
            kw["fat_pct"][(muscle, "right")] = 2 * mean / (1 + ratio)
            kw["fat_pct"][(muscle, "left")] = ratio * kw["fat_pct"][(muscle, "right")]
        elif col == "shift_x_mm":
            kw["shift_mm"] = (float(val), kw["shift_mm"][1])


def make_cohort(
    n: int,
    out_dir: str | Path,
    *,
    seed: int = 0,
    template: str = "small",
    plan: pd.DataFrame | None = None,
    layout: str = "nested",
    orientations: tuple[str, ...] = ("LPS", "RAS", "LAS"),
    fat_fraction: bool = False,
    progress: bool = False,
    **phantom_kwargs: Any,
) -> pd.DataFrame:
    """Write ``n`` phantoms (``syn-001`` ...) with parameters drawn per subject.

    Parameters
    ----------
    n : int
        Number of subjects (ignored when ``plan`` is given: one subject per plan row).
    out_dir : path
        Output folder.  ``layout="nested"``: ``out_dir/<subject>/`` per subject (files of
        :func:`write_phantom`); ``layout="flat"``: all files in ``out_dir`` with subject-prefixed
        tables.  Cohort-wide ``manifest.csv``, ``truth.csv``, ``asymmetry_truth.csv``,
        ``levels.csv`` (with a ``subject`` column) and ``labels.json`` go to ``out_dir``.
    seed : int
        Cohort seed; subject ``i`` draws from ``SeedSequence([seed, i])``.
    template : {"small", "example"}
        Phantom grid.
    plan : DataFrame, optional
        One row per subject with a ``subject`` column and any planted targets overriding the
        drawn ones: ``es_cdi`` (erector spinae functional-area CDI over the whole stack),
        ``cdi_<muscle>``, ``fat_<muscle>`` (both sides, %), ``fat_<muscle>_<side>``,
        ``lfiar_<muscle>`` (left/right fat ratio, keeping the mean), ``shift_x_mm`` and the
        scalar :func:`make_phantom` arguments ``seed, orientation, bias_lr, bias_ap, snr,
        rotation_deg, warp_mm, fat_z_gradient, texture, template``.
    orientations : tuple of str
        Orientations to draw from.
    fat_fraction : bool
        Also write each true fat-fraction map.
    progress : bool
        Show a tqdm progress bar.
    **phantom_kwargs
        Fixed :func:`make_phantom` arguments for every subject (override the draws).

    Returns
    -------
    DataFrame
        Manifest: ``subject, image, mask, labels, levels, truth, asymmetry, params`` (paths),
        ``orientation, seed, bias_lr, snr``, planted ``es_cdi`` and realised ``es_cdi_true``,
        ``es_lfiar_true``, ``es_fat_left, es_fat_right`` (truth over the whole stack).
    """
    if layout not in ("nested", "flat"):
        msg = f"layout must be 'nested' or 'flat', got {layout!r}"
        raise ConfigError(msg)
    out_dir = Path(out_dir)
    if plan is not None:
        if "subject" not in plan.columns:
            msg = "plan must have a 'subject' column"
            raise ConfigError(msg)
        subjects = [str(s) for s in plan["subject"]]
        rows = plan.to_dict("records")
    else:
        width = max(3, len(str(n)))
        subjects = [f"syn-{i + 1:0{width}d}" for i in range(n)]
        rows = [{} for _ in subjects]
    iterator = range(len(subjects))
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="phantoms", unit="subject")
    manifest, truths, asyms, levels = [], [], [], []
    for i in iterator:
        subject = subjects[i]
        rng = np.random.default_rng(np.random.SeedSequence([seed, i]))
        kw = draw_subject_params(rng, orientations)
        kw["template"] = template
        _apply_plan_row(kw, rows[i])
        kw.update(phantom_kwargs)
        ph = make_phantom(subject, **kw)
        folder = out_dir / subject if layout == "nested" else out_dir
        paths = write_phantom(ph, folder, prefix_tables=layout == "flat", fat_fraction=fat_fraction)
        tr = ph.truth[(ph.truth["level"] == "all") & ph.truth["slice"].isna()]
        es = tr[tr["muscle"] == "erector_spinae"].set_index("side")
        asym = ph.asymmetry[(ph.asymmetry["level"] == "all")].set_index("muscle")
        manifest.append({
            "subject": subject,
            **{key: str(p) for key, p in paths.items()},
            "orientation": ph.params["orientation"], "seed": ph.params["seed"],
            "bias_lr": ph.params["bias_lr"], "snr": ph.params["snr"],
            "es_cdi": ph.params["cdi_target"].get("erector_spinae", float("nan")),
            "es_cdi_true": float(asym.loc["erector_spinae", "cdi"]),
            "es_lfiar_true": float(asym.loc["erector_spinae", "lfiar"]),
            "es_fat_left": float(es.loc["left", "fat_pct"]),
            "es_fat_right": float(es.loc["right", "fat_pct"]),
        })
        truths.append(ph.truth)
        asyms.append(ph.asymmetry)
        levels.append(ph.levels.assign(subject=subject)[["subject", "slice", "level"]])
    man = pd.DataFrame(manifest)
    atomic_write_text(out_dir / "manifest.csv", man.to_csv(index=False))
    atomic_write_text(out_dir / "truth.csv", pd.concat(truths).to_csv(index=False))
    atomic_write_text(out_dir / "asymmetry_truth.csv", pd.concat(asyms).to_csv(index=False))
    atomic_write_text(out_dir / "levels.csv", pd.concat(levels).to_csv(index=False))
    atomic_write_text(out_dir / "labels.json", json.dumps(LABELS_DOC, indent=2) + "\n")
    return man


def main(argv: list[str] | None = None) -> int:
    """``python -m helpers.synthetic OUT_DIR [--n N] [--template T] [--seed S]``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m helpers.synthetic",
        description="Write a small cohort of synthetic lumbar T2 phantoms with planted truth.",
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--n", type=int, default=3, help="number of subjects (default 3)")
    parser.add_argument("--template", choices=sorted(TEMPLATES), default="example")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", choices=("nested", "flat"), default="nested")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    man = make_cohort(args.n, args.out_dir, seed=args.seed, template=args.template,
                      layout=args.layout)
    log.info("wrote %d phantoms to %s (manifest.csv, truth.csv)", len(man), args.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
