"""Domain-randomised training scans from whole cross-section label maps (SynthSeg-style).

A segmentation model that has seen only one scanner's images fails on the next site's: it
learns that scan's intensities, field of view and resolution instead of the anatomy.  Following
SynthSeg (Billot et al., Medical Image Analysis 86, 102789, 2023), this module makes training
images from *label maps* of the whole axial cross-section (the eight muscles plus air, skin,
subcutaneous and deep fat, other muscle, bowel and organs, bone, marrow, CSF), drawing for every
case a new intensity per tissue, a new field of view, resolution, slice thickness, bias field,
noise level and artefacts, and a new deformation of the anatomy.  The model then has to find the
muscles by their shape and arrangement.  Unlike SynthSeg's fully random contrasts, the
intensities follow a *fat-bright* prior (fat brighter than muscle: T1- and T2-weighted TSE
without fat suppression, Dixon in-phase or water + fat sum), the contrasts esma measures fat on;
every other tissue's intensity is free.

Label maps (:class:`LabelMap`, arrays in L-P-S order, values in :data:`TISSUES`)
------------------------------------------------------------------------------
``phantom``
    :func:`helpers.synthetic.make_phantom`'s muscles (the real example's mask, warped, with
    random per-muscle sizes, rotation, off-centre spine) inside a procedurally built body
    (:func:`helpers.synthetic._build_body`) on a wide field of view with air around the body.
``template``
    The MuscleMap population template's eight muscles, L1 to the sacrum (shipped, resampled, in
    ``data/labelmaps/``), inside a procedurally built body.
``example``
    The real example scan's (``data/example``) muscles and its other tissues, found from its
    intensities (body outline, four intensity classes inside the body): real anatomy around the
    muscles, a tight field of view.
``totalseg``
    TotalSegmentator's real upper-abdominal MR example with its ``total_mr`` labels (shipped,
    derived, in ``data/labelmaps/``): real organs, spine and body outline of a whole
    cross-section with air around it.  Its back muscles are one autochthon per side, split here
    by position (:func:`split_autochthon`: medial multifidus, lateral erector spinae, an
    unknown band between), and it has no quadratus lumborum: the band and unlabelled muscle
    beside the back muscles render as muscle but train as unknown (:data:`IGNORE`, nnU-Net's
    ``ignore`` label).

Rendering (:func:`render`, ranges in :class:`RenderSpec`)
-----------------------------------------------------------
in-plane similarity and elastic deformation, a random field of view (a tight crop of the back to
the whole cross-section with air), in-plane spacing and slice thickness (partial volume through a
Gaussian slice profile), per-tissue intensities and texture, streaky intramuscular fat (lean to
fatty), a multiplicative bias field, Rician noise, gamma, an optional phase-encode ghost and a
random storage orientation.  :data:`TRAIN_SPEC` gives the training ranges and
:data:`HELDOUT_SPEC` settings *outside* them (another contrast family, field of view and
resolution) for an honest test of generalisation.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi

from helpers.errors import ConfigError, InputFileError

__all__ = [
    "HELDOUT_SPEC",
    "IGNORE",
    "LABELMAP_DIR",
    "TISSUES",
    "TOTALSEG_MR_TISSUE",
    "TRAIN_SPEC",
    "LabelMap",
    "RenderSpec",
    "body_mask",
    "derive_totalseg_labelmap",
    "derive_totalseg_tissues",
    "example_labelmap",
    "make_case",
    "phantom_labelmap",
    "render",
    "split_autochthon",
    "template_labelmap",
    "totalseg_labelmap",
    "unsided_mask",
    "upsample_classes",
]

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
LABELMAP_DIR = REPO / "data" / "labelmaps"
EXAMPLE_DIR = REPO / "data" / "example"
TEMPLATE_MUSCLES = LABELMAP_DIR / "musclemap_template_muscles.nii.gz"

#: Tissue classes of a label map: 0 air, 1-8 the sided muscles (values of
#: ``data/example/labels.json``), then the other tissues.  ``organ_*`` are intensity classes of
#: the real example's non-muscle tissue (dark to bright).
TISSUES: dict[str, int] = {
    "air": 0,
    "multifidus_right": 1, "multifidus_left": 2, "erector_spinae_right": 3,
    "erector_spinae_left": 4, "psoas_major_right": 5, "psoas_major_left": 6,
    "quadratus_lumborum_right": 7, "quadratus_lumborum_left": 8,
    "subcutaneous_fat": 9, "other_fat": 10, "skin": 11, "other_muscle": 12, "bowel": 13,
    "cortical_bone": 14, "marrow": 15, "csf": 16, "nerve_root": 17,
    "organ_dark": 18, "organ_mid": 19, "organ_bright": 20,
    "kidney": 21, "liver": 22, "spleen": 23,
    # muscle whose split into the eight labels is unknown (rendered as muscle; its training
    # label is "ignore"): erector spinae + multifidus as one (TotalSegmentator's autochthon),
    # and unlabelled soft tissue beside the back muscles, psoas and spine (it may hold
    # quadratus lumborum)
    "autochthon_right": 24, "autochthon_left": 25, "unlabelled_muscle": 26,
}
_N_CLASSES = max(TISSUES.values()) + 1
_MUSCLES = tuple(range(1, 9))
#: Sided target value of voxels whose muscle label is unknown (nnU-Net's ``ignore`` label).
IGNORE = 9
#: Sided training target of each tissue class: the muscles 1-8, unknown muscle :data:`IGNORE`,
#: everything else background.
_TARGET = np.zeros(_N_CLASSES, np.uint8)
_TARGET[list(_MUSCLES)] = _MUSCLES
_TARGET[[TISSUES["autochthon_right"], TISSUES["autochthon_left"],
         TISSUES["unlabelled_muscle"]]] = IGNORE
#: Unsided training label of each sided target value (multifidus 1, erector spinae 2, psoas 3,
#: quadratus lumborum 4, the order of ``data/example/labels.json``; unknown 5, the ignore label).
_UNSIDED = np.array([0, 1, 1, 2, 2, 3, 3, 4, 4, 5], dtype=np.uint8)
#: Axial storage orders drawn for the cases: in-plane flips *and* transposes.
ORIENTATIONS = ("LPS", "RAS", "LAS", "RPS", "PLS", "ARS", "PRS", "ALS")


@dataclass(frozen=True)
class LabelMap:
    """Tissue classes of a whole (or cropped) axial cross-section.

    Attributes
    ----------
    name : str
        Source kind (``phantom``, ``template``, ``example``).
    classes : ndarray of uint8
        Tissue class per voxel (:data:`TISSUES`), array order L-P-S (axis 0 toward the
        patient's left, axis 1 toward posterior, axis 2 toward superior).
    spacing : tuple of float
        Voxel size (mm) along the three array axes.
    """

    name: str
    classes: NDArray[np.uint8]
    spacing: tuple[float, float, float]

    def affine(self) -> NDArray[np.float64]:
        """RAS+ affine of the L-P-S array (origin at the array centre)."""
        sx, sy, sz = self.spacing
        nx, ny, nz = self.classes.shape
        aff = np.diag([-sx, -sy, sz, 1.0])
        aff[:3, 3] = [sx * (nx - 1) / 2, sy * (ny - 1) / 2, -sz * (nz - 1) / 2]
        return aff


@dataclass(frozen=True)
class RenderSpec:
    """Ranges that :func:`render` draws from (uniform unless said otherwise).

    Attributes
    ----------
    contrast : {"fat_bright", "dixon_sum"}
        ``fat_bright``: lean muscle at ``muscle_ratio`` x fat (T1/T2 TSE); ``dixon_sum``: a
        water + fat sum image (muscle about 0.5-0.7 x fat, CSF and organs from their water).
    muscle_ratio : (float, float)
        Lean muscle intensity as a fraction of fat's.
    spacing_mm : (float, float)
        In-plane voxel size (mm).
    thickness_mm : (float, float)
        Slice thickness (mm); slices are contiguous.
    fov_mm : (float, float)
        Square field of view (mm), centred near the spine; larger than the body gives air around.
    n_slices : (int, int)
        Slices per case.
    max_matrix : int
        Cap on the in-plane matrix (voxels); the spacing grows to respect it.
    rotation_deg, scale, elastic_mm : float, (float, float), float
        In-plane rotation (+-), anisotropic scaling and elastic displacement (SD, mm).
    fat_share : (float, float)
        Share of a muscle's voxels holding streaky fat (lean to fatty).
    bias : float
        Largest log-amplitude of the smooth multiplicative bias field.
    snr : (float, float)
        Fat intensity over the noise SD.
    gamma : (float, float)
        Gamma of the intensity curve.
    ghost_probability : float
        Chance of a phase-encode ghost (2-8 % of the image shifted by half the field of view).
    """

    contrast: str = "fat_bright"
    muscle_ratio: tuple[float, float] = (0.04, 0.45)
    spacing_mm: tuple[float, float] = (0.6, 1.6)
    thickness_mm: tuple[float, float] = (3.0, 7.0)
    fov_mm: tuple[float, float] = (170.0, 440.0)
    n_slices: tuple[int, int] = (6, 16)
    max_matrix: int = 400
    rotation_deg: float = 25.0
    scale: tuple[float, float] = (0.85, 1.18)
    elastic_mm: float = 3.0
    fat_share: tuple[float, float] = (0.0, 0.5)
    bias: float = 0.35
    snr: tuple[float, float] = (8.0, 60.0)
    gamma: tuple[float, float] = (0.7, 1.5)
    ghost_probability: float = 0.15

    def __post_init__(self) -> None:
        if self.contrast not in ("fat_bright", "dixon_sum"):
            msg = f"contrast must be 'fat_bright' or 'dixon_sum', got {self.contrast!r}"
            raise ConfigError(msg)
        for name in ("muscle_ratio", "spacing_mm", "thickness_mm", "fov_mm", "n_slices", "scale",
                     "fat_share", "snr", "gamma"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                msg = f"RenderSpec.{name} must be a range 0 <= low <= high, got {(lo, hi)}"
                raise ConfigError(msg)


#: Training ranges.
TRAIN_SPEC = RenderSpec()
#: Held-out settings outside every training range: a water + fat (Dixon sum) contrast, a field
#: of view wider than any training case, finer in-plane and thicker slices.
HELDOUT_SPEC = RenderSpec(contrast="dixon_sum", muscle_ratio=(0.5, 0.7), spacing_mm=(0.4, 0.5),
                          thickness_mm=(7.5, 9.0), fov_mm=(450.0, 480.0), n_slices=(5, 8),
                          max_matrix=1200)


# ------------------------------------------------------------------------------ label maps
def _body_params(rng: np.random.Generator) -> dict[str, float]:
    """Random body shape for :func:`helpers.synthetic._build_body`: lean to obese."""
    return {
        "fat_post_mm": float(rng.uniform(8, 60)),
        "fat_lat_mm": float(rng.uniform(6, 45)),
        "half_width_mm": float(rng.uniform(110, 185)),
        "retro_fat_mm": float(rng.uniform(1, 10)),
        "ant_depth_mm": float(rng.uniform(100, 170)),
        "canal_gap_mm": float(rng.uniform(7, 11)),
        "vb_offset_mm": float(rng.uniform(24, 32)),
        "vb_rx_mm": float(rng.uniform(18, 26)),
        "vb_ry_mm": float(rng.uniform(13, 19)),
        "canal_rx_mm": float(rng.uniform(9, 13)),
        "canal_ry_mm": float(rng.uniform(6, 9)),
        "wall_mm": float(rng.uniform(5, 14)),
    }


def _with_body(muscles: NDArray, spacing: tuple[float, float, float],
               rng: np.random.Generator, organs: bool = False) -> NDArray[np.uint8]:
    """Muscle labels (L-P-S, values 1-8) inside a procedurally built body (:data:`TISSUES`).

    With ``organs``, solid organs of the upper lumbar levels are added (:func:`_add_organs`).
    """
    from helpers.synthetic import _build_body

    nx, ny, _ = muscles.shape
    sx, sy, _sz = spacing
    grid = {"u": (np.arange(nx) + 0.5) * sx, "v": (np.arange(ny) + 0.5) * sy,
            "spacing": spacing, "cu": nx * sx / 2, "cv": ny * sy / 2}
    classes = muscles.astype(np.uint8).copy()
    _build_body(muscles, grid, rng, _body_params(rng), classes=classes)
    if organs:
        _add_organs(classes, spacing, rng)
    return classes


def _ellipse(shape: tuple[int, int], spacing: tuple[float, ...], centre: tuple[float, float],
             axes: tuple[float, float], angle: float) -> NDArray[np.bool_]:
    """In-plane ellipse (centre and semi-axes in mm from the array origin, angle in radians)."""
    u = (np.arange(shape[0]) + 0.5)[:, None] * spacing[0] - centre[0]
    v = (np.arange(shape[1]) + 0.5)[None, :] * spacing[1] - centre[1]
    c, s = np.cos(angle), np.sin(angle)
    return ((c * u + s * v) / axes[0]) ** 2 + ((-s * u + c * v) / axes[1]) ** 2 <= 1.0


def _add_organs(classes: NDArray[np.uint8], spacing: tuple[float, float, float],
                rng: np.random.Generator) -> None:
    """Kidneys (with perirenal fat), liver and spleen on the upper slices, in place.

    Each kidney lies lateral to its psoas and anterior to its quadratus lumborum (Gray's
    Anatomy: the kidneys span about T12-L3 beside the psoas, on the quadratus lumborum);
    the liver (patient's right) and the spleen (left) lie anterolateral on the highest slices.
    They are painted over bowel and deep fat only, never over muscle, bone or skin.
    """
    nx, ny, nz = classes.shape
    t = TISSUES
    paintable = (t["bowel"], t["other_fat"])
    # slab fraction (from the top) that reaches kidney level: lumbar slabs end at various levels
    top = float(rng.uniform(0.0, 0.7))
    first = int(nz * (1 - top))
    for k in range(first, nz):
        sl = classes[:, :, k]
        for psoas, ql, lateral in ((5, 7, -1.0), (6, 8, 1.0)):  # right: toward -u, left: +u
            pi, pj = np.nonzero(sl == psoas)
            if pi.size < 10:
                continue
            qi, qj = np.nonzero(sl == ql)
            pu, pv = (pi.mean() + 0.5) * spacing[0], (pj.mean() + 0.5) * spacing[1]
            qv = (qj.mean() + 0.5) * spacing[1] if qi.size else pv + 10.0
            cu = pu + lateral * rng.uniform(35, 60)
            cv = min(pv, qv) - rng.uniform(5, 25)  # anterior (smaller v)
            axes = (rng.uniform(22, 32), rng.uniform(18, 28))
            kid = _ellipse((nx, ny), spacing, (cu, cv), axes, rng.uniform(-0.6, 0.6))
            fat = _ellipse((nx, ny), spacing, (cu, cv), (axes[0] + 6, axes[1] + 6), 0.0)
            free = np.isin(sl, paintable)
            sl[fat & free & ~kid] = t["other_fat"]
            sl[kid & free] = t["kidney"]
        if k >= nz - max(1, int(nz * top * 0.6)):
            body = np.nonzero(sl > 0)
            if body[0].size == 0:
                continue
            u0, u1 = body[0].min() * spacing[0], body[0].max() * spacing[0]
            v0 = body[1].min() * spacing[1]
            width = u1 - u0
            liver = _ellipse((nx, ny), spacing, (u0 + 0.27 * width, v0 + rng.uniform(60, 100)),
                             (rng.uniform(55, 85), rng.uniform(45, 70)), rng.uniform(-0.4, 0.4))
            spleen = _ellipse((nx, ny), spacing, (u1 - 0.18 * width, v0 + rng.uniform(110, 150)),
                              (rng.uniform(20, 35), rng.uniform(30, 45)), rng.uniform(-0.5, 0.5))
            free = np.isin(sl, paintable)
            sl[liver & free] = t["liver"]
            sl[spleen & free] = t["spleen"]


def phantom_labelmap(seed: int, fov_mm: float = 460.0, spacing_mm: float = 1.5,
                     n_slices: int = 16, organs: bool = False) -> LabelMap:
    """A :func:`helpers.synthetic.make_phantom` anatomy in a random body, air around it.

    Parameters
    ----------
    seed : int
        Seeds the muscles' sizes, warp, rotation and shift and the body.
    fov_mm : float
        Square in-plane field of view (mm) of the label map.
    spacing_mm : float
        In-plane voxel size (mm).
    n_slices : int
        Slices over the example's 88 mm (thickness 88 / n_slices mm).
    organs : bool
        Add kidneys, liver and spleen on the upper slices (:func:`_add_organs`).
    """
    from helpers.synthetic import LABELS, Template, make_phantom

    rng = np.random.default_rng(seed)
    n = round(fov_mm / spacing_mm)
    tpl = Template("wide", (n, n, int(n_slices)), (fov_mm, fov_mm, 88.0))
    kw: dict[str, Any] = {
        "csa_scale": {f"{lab.muscle}:{lab.side}": float(rng.uniform(0.5, 1.4))
                      for lab in LABELS.labels},
        "rotation_deg": float(rng.uniform(-25, 25)),
        "shift_mm": (float(rng.uniform(-20, 20)), float(rng.uniform(-20, 20))),
        "warp_mm": float(rng.uniform(1, 8)),
        "snr": 1e6, "bias_lr": 0.0, "bias_ap": 0.0, "bias_smooth": 0.0,
    }
    ph = make_phantom("lm", seed=int(rng.integers(0, 2**31)), template=tpl, orientation="LPS",
                      **kw)
    muscles = np.asarray(ph.mask.dataobj).astype(np.uint8)
    spacing = (fov_mm / n, fov_mm / n, 88.0 / n_slices)
    return LabelMap("phantom", _with_body(muscles, spacing, rng, organs), spacing)


@functools.lru_cache(maxsize=1)
def _template_muscles() -> tuple[NDArray[np.uint8], tuple[float, float, float]]:
    if not TEMPLATE_MUSCLES.is_file():
        raise InputFileError(TEMPLATE_MUSCLES, "template label map not found (see its README)")
    img = nib.load(TEMPLATE_MUSCLES)
    if nib.aff2axcodes(img.affine) != ("L", "P", "S"):
        raise InputFileError(TEMPLATE_MUSCLES, "expected L-P-S array order")
    spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
    return np.asarray(img.dataobj).astype(np.uint8), spacing  # type: ignore[return-value]


def template_labelmap(seed: int, fov_mm: float = 460.0, spacing_mm: float = 1.5,
                      organs: bool = False) -> LabelMap:
    """The MuscleMap template's muscles (a random 50-110 mm run of slices) in a random body.

    Parameters
    ----------
    seed : int
        Seeds the slab and the body.
    fov_mm : float
        Square in-plane field of view (mm), centred on the muscles.
    spacing_mm : float
        In-plane voxel size (mm) of the label map (nearest-neighbour from the shipped 1 mm).
    organs : bool
        Add kidneys, liver and spleen on the upper slices (:func:`_add_organs`).
    """
    rng = np.random.default_rng(seed)
    muscles, spacing = _template_muscles()
    f = spacing[0] / spacing_mm
    if abs(f - 1) > 1e-3:
        muscles = ndi.zoom(muscles, (f, spacing[1] / spacing_mm, 1.0), order=0, grid_mode=True,
                           mode="nearest")
        spacing = (spacing_mm, spacing_mm, spacing[2])
    sx, sy, sz = spacing
    present = np.flatnonzero(muscles.any(axis=(0, 1)))
    run = int(min(len(present), max(4, round(rng.uniform(50, 110) / sz))))
    z0 = int(rng.integers(present[0], present[-1] - run + 2))
    slab = muscles[:, :, z0:z0 + run]
    nx, ny = round(fov_mm / sx), round(fov_mm / sy)
    canvas = np.zeros((nx, ny, slab.shape[2]), np.uint8)
    ii, jj = np.nonzero(slab.any(axis=2))
    ci, cj = int(ii.mean()), int(jj.mean())
    oi, oj = nx // 2 - ci, ny // 2 - cj
    canvas[max(oi, 0):oi + slab.shape[0], max(oj, 0):oj + slab.shape[1]] = slab[
        max(-oi, 0):nx - oi, max(-oj, 0):ny - oj]
    return LabelMap("template", _with_body(canvas, spacing, rng, organs), spacing)


def derive_example_labelmap(image: NDArray, mask: NDArray, spacing: tuple[float, float, float]
                            ) -> NDArray[np.uint8]:
    """Tissue classes of a real fat-bright scan from its intensities and muscle mask (L-P-S).

    The body is the largest bright component (above 8 % of the subcutaneous-fat level, the
    99th intensity percentile), holes filled per slice; outside it is air.  Non-muscle body
    voxels are split at intensity quantiles into organ_dark / organ_mid / organ_bright / fat,
    and fat within 30 mm of the body outline is subcutaneous.
    """
    img = np.asarray(image, dtype=np.float32)
    body = body_mask(img)
    classes = np.zeros(img.shape, np.uint8)
    muscle = mask > 0
    other = body & ~muscle
    vals = img[other]
    q = np.quantile(vals, [0.25, 0.5, 0.72])
    classes[other & (img < q[0])] = TISSUES["organ_dark"]
    classes[other & (img >= q[0]) & (img < q[1])] = TISSUES["organ_mid"]
    classes[other & (img >= q[1]) & (img < q[2])] = TISSUES["organ_bright"]
    fat = other & (img >= q[2])
    _paint_fat(classes, fat, body, spacing)
    classes[muscle] = mask[muscle]
    return classes


def body_mask(image: NDArray) -> NDArray[np.bool_]:
    """The body of a fat-bright scan: the largest component above 8 % of the 99th intensity
    percentile (the subcutaneous-fat level), opened once, holes filled per slice.

    Raises
    ------
    ConfigError
        Nothing above the threshold.
    """
    img = np.asarray(image, dtype=np.float32)
    body = ndi.binary_opening(img > 0.08 * float(np.percentile(img, 99)), iterations=1)
    lab, n = ndi.label(body)
    if n == 0:
        msg = "no body found in the image"
        raise ConfigError(msg)
    sizes = ndi.sum_labels(body, lab, index=np.arange(1, n + 1))
    body = lab == (int(np.argmax(sizes)) + 1)
    for k in range(body.shape[2]):
        body[:, :, k] = ndi.binary_fill_holes(body[:, :, k])
    return body


def _paint_fat(classes: NDArray[np.uint8], fat: NDArray[np.bool_], body: NDArray[np.bool_],
               spacing: tuple[float, float, float], subcutaneous_mm: float = 30.0) -> None:
    """Fat voxels within ``subcutaneous_mm`` of the body outline (in-plane) as subcutaneous
    fat, deeper ones as other fat, in place."""
    depth = ndi.distance_transform_edt(body, sampling=(spacing[0], spacing[1], 1e6))
    classes[fat & (depth <= subcutaneous_mm)] = TISSUES["subcutaneous_fat"]
    classes[fat & (depth > subcutaneous_mm)] = TISSUES["other_fat"]


#: TotalSegmentator ``total_mr`` class values (``totalsegmentator/map_to_binary.py``) and the
#: tissue class each becomes.  Classes not listed are treated as unlabelled tissue.
TOTALSEG_MR_TISSUE: dict[int, str] = {
    1: "spleen", 2: "kidney", 3: "kidney", 4: "organ_dark",  # gallbladder
    5: "liver", 6: "bowel", 7: "organ_mid", 8: "organ_mid", 9: "organ_mid",  # pancreas, adrenals
    10: "organ_dark", 11: "organ_dark",  # lungs
    12: "bowel", 13: "bowel", 14: "bowel", 15: "bowel", 16: "organ_dark",  # ... urinary bladder
    17: "organ_mid", 18: "marrow", 19: "marrow", 20: "organ_mid",  # prostate, sacrum, vertebrae, discs
    21: "nerve_root", 22: "organ_mid", 23: "organ_dark", 24: "organ_dark",  # cord, heart, vessels
    25: "organ_dark",
    46: "autochthon_left", 47: "autochthon_right",
    48: "psoas_major_left", 49: "psoas_major_right",  # iliopsoas: psoas above the pelvis
}


def derive_totalseg_labelmap(image: NDArray, seg: NDArray, spacing: tuple[float, float, float],
                             margin_mm: float = 30.0) -> NDArray[np.uint8]:
    """Tissue classes of a real fat-bright scan with TotalSegmentator ``total_mr`` labels (L-P-S).

    Labelled structures map through :data:`TOTALSEG_MR_TISSUE` (vertebrae and sacrum get a
    one-voxel cortical rim).  TotalSegmentator does not split the autochthonous back muscles
    into erector spinae and multifidus and has no quadratus lumborum, so the autochthon stays
    one unsplit muscle per side (training label: unknown), and unlabelled non-fat tissue within
    ``margin_mm`` of the autochthon, the iliopsoas or the vertebrae is ``unlabelled_muscle``
    (unknown too: it may be quadratus lumborum, psoas or crus).  Farther unlabelled non-fat
    tissue (abdominal wall, diaphragm) is ``other_muscle``; unlabelled voxels brighter than
    halfway from the autochthon's median to the body's 95th percentile are fat, subcutaneous
    within 30 mm of the body outline.  Outside the body (:func:`body_mask`) is air.

    Parameters
    ----------
    image : ndarray
        The scan, fat bright.
    seg : ndarray of int
        TotalSegmentator ``total_mr`` labels on the same grid.
    spacing : tuple of float
        Voxel size (mm).
    margin_mm : float
        Reach (mm) of the unknown region around the back muscles, psoas and spine.

    Raises
    ------
    ConfigError
        No body, or no autochthon in ``seg``.
    """
    img = np.asarray(image, dtype=np.float32)
    seg = np.asarray(seg)
    t = TISSUES
    body = body_mask(img)
    back = np.isin(seg, (46, 47))
    if not back.any():
        msg = "no autochthon (TotalSegmentator classes 46/47) in the label map"
        raise ConfigError(msg)
    classes = np.zeros(img.shape, np.uint8)
    labelled = np.zeros(img.shape, bool)
    for value, name in TOTALSEG_MR_TISSUE.items():
        here = seg == value
        classes[here] = t[name]
        labelled |= here
    bone = np.isin(seg, (18, 19))
    rim = bone & ~ndi.binary_erosion(bone, structure=np.ones((3, 3, 1), bool))
    classes[rim] = t["cortical_bone"]
    other = body & ~labelled
    fat_cut = 0.5 * (float(np.median(img[back])) + float(np.percentile(img[body], 95)))
    fat = other & (img >= fat_cut)
    _paint_fat(classes, fat, body, spacing)
    near = ndi.distance_transform_edt(~(back | np.isin(seg, (19, 48, 49))),
                                      sampling=(spacing[0], spacing[1], 1e6)) <= margin_mm
    soft = other & ~fat
    classes[soft & near] = t["unlabelled_muscle"]
    classes[soft & ~near] = t["other_muscle"]
    return classes


#: Share of the autochthon (erector spinae + multifidus) that is multifidus at L1 in the MuscleMap
#: template (11-15 % over its top 11 slices; ``data/labelmaps/musclemap_template_muscles``).
MULTIFIDUS_SHARE_L1 = 0.13


def split_autochthon(classes: NDArray, spacing: tuple[float, float, float],
                     multifidus_share: float = MULTIFIDUS_SHARE_L1, band_mm: float = 5.0
                     ) -> NDArray[np.uint8]:
    """Split an unsplit autochthon into multifidus (medial), erector spinae (lateral) and an
    unknown band between them, per slice and side.

    Multifidus lies on the laminae beside the spinous processes, erector spinae lateral to it.
    The border is placed at the distance from the midline (half-way between the two sides'
    centroids, per slice) below which ``multifidus_share`` of the side's autochthon lies; a
    band of ``band_mm`` around it stays unknown (``autochthon_*``, trained as ``ignore``), so
    only the cores teach the two labels.  L-P-S array order (axis 0 toward the left).

    Parameters
    ----------
    classes : ndarray of uint8
        Tissue classes (:data:`TISSUES`) with ``autochthon_right`` / ``autochthon_left``.
    spacing : tuple of float
        Voxel size (mm).
    multifidus_share : float
        Share (0-1) of each side's autochthon area taken as multifidus before the band.
    band_mm : float
        Width (mm) of the unknown band around the border.
    """
    t = TISSUES
    out = np.array(classes, dtype=np.uint8, copy=True)
    sides = ((t["autochthon_right"], t["multifidus_right"], t["erector_spinae_right"]),
             (t["autochthon_left"], t["multifidus_left"], t["erector_spinae_left"]))
    x = (np.arange(out.shape[0]) + 0.5) * spacing[0]
    for k in range(out.shape[2]):
        sl = out[:, :, k]
        ri, li = (np.nonzero(sl == a)[0] for a, _, _ in sides)
        if ri.size == 0 or li.size == 0:
            continue
        mid = 0.5 * (x[ri].mean() + x[li].mean())
        dist = np.abs(x - mid)[:, None] * np.ones((1, sl.shape[1]))
        for auto, mf, es in sides:
            inside = sl == auto
            cut = float(np.quantile(dist[inside], multifidus_share))
            sl[inside & (dist <= cut - band_mm / 2)] = mf
            sl[inside & (dist > cut + band_mm / 2)] = es
    return out


def upsample_classes(classes: NDArray, factor: tuple[float, float, float]) -> NDArray[np.uint8]:
    """A class map on a finer grid with smooth borders: each class's indicator is interpolated
    linearly and lightly smoothed, and every new voxel takes the class of highest value."""
    def indicator(value: int) -> NDArray[np.float32]:
        ind = ndi.zoom((classes == value).astype(np.float32), factor, order=1, grid_mode=True,
                       mode="nearest")
        return ndi.gaussian_filter(ind, [0.4 * max(f - 1.0, 0.0) for f in factor])

    first, *rest = (int(v) for v in np.unique(classes))
    best = indicator(first)
    out = np.full(best.shape, first, np.uint8)
    for value in rest:
        ind = indicator(value)
        win = ind > best
        best[win] = ind[win]
        out[win] = value
    return out


def derive_totalseg_tissues(image_path: str | Path, seg_path: str | Path
                            ) -> tuple[NDArray[np.uint8], tuple[float, float, float]]:
    """The shipped TotalSegmentator tissue map from its files: L-P-S,
    :func:`derive_totalseg_labelmap` on the scan's grid, :func:`upsample_classes` to 1 mm
    in-plane, then :func:`split_autochthon`.  Returns the classes and their spacing (mm)."""
    from helpers.synthetic import reorient

    image = reorient(nib.load(image_path), "LPS")
    seg = reorient(nib.load(seg_path), "LPS")
    sx, sy, sz = (float(z) for z in image.header.get_zooms()[:3])
    classes = derive_totalseg_labelmap(np.asarray(image.dataobj, dtype=np.float32),
                                       np.rint(np.asarray(seg.dataobj)).astype(np.int16),
                                       (sx, sy, sz))
    fine_spacing = (1.0, 1.0, sz)
    return split_autochthon(upsample_classes(classes, (sx, sy, 1.0)), fine_spacing), fine_spacing


def totalseg_labelmap() -> LabelMap:
    """The shipped label map derived from TotalSegmentator's MR example (``data/labelmaps``)."""
    return _shipped_labelmap("totalseg", "totalseg_mr_tissues.nii.gz")


def example_labelmap() -> LabelMap:
    """The shipped label map derived from the real example (``data/labelmaps``)."""
    return _shipped_labelmap("example", "musclemap_sample_tissues.nii.gz")


def _shipped_labelmap(name: str, filename: str) -> LabelMap:
    path = LABELMAP_DIR / filename
    if not path.is_file():
        raise InputFileError(path, "label map not found (scripts/make_labelmaps.py makes it)")
    img = nib.load(path)
    if nib.aff2axcodes(img.affine) != ("L", "P", "S"):
        raise InputFileError(path, "expected L-P-S array order")
    return LabelMap(name, np.asarray(img.dataobj).astype(np.uint8),
                    tuple(float(z) for z in img.header.get_zooms()[:3]))  # type: ignore[arg-type]


# -------------------------------------------------------------------------------- rendering
def _smooth(rng: np.random.Generator, shape: tuple[int, ...], coarse: tuple[int, ...]) -> NDArray:
    """Smooth random field with SD about 1 (cubic upsampling of coarse noise)."""
    noise = rng.normal(0.0, 1.0, coarse)
    f = ndi.zoom(noise, [s / c for s, c in zip(shape, coarse, strict=True)], order=3,
                 mode="nearest", grid_mode=True)[tuple(slice(0, s) for s in shape)]
    return f / max(float(f.std()), 1e-6)


def _intensities(rng: np.random.Generator, spec: RenderSpec) -> NDArray[np.float64]:
    """Mean intensity per tissue class, fat = 1 (fat-bright prior, other tissues free)."""
    mu = np.zeros(_N_CLASSES)
    u = rng.uniform
    m = u(*spec.muscle_ratio)
    mu[list(_MUSCLES)] = m * u(0.85, 1.15, 8)
    t = TISSUES
    mu[t["subcutaneous_fat"]] = u(0.9, 1.0)
    mu[t["other_fat"]] = u(0.8, 1.0)
    if spec.contrast == "dixon_sum":  # water + fat: every tissue near its proton density
        for name in ("skin", "bowel", "marrow", "csf", "nerve_root", "organ_dark", "organ_mid",
                     "organ_bright", "kidney", "liver", "spleen"):
            mu[t[name]] = u(0.45, 0.95)
        mu[t["other_muscle"]] = m * u(0.9, 1.1)
        mu[t["cortical_bone"]] = u(0.0, 0.1)
        return _unsplit_muscle(mu)
    mu[t["skin"]] = u(0.15, 0.8)
    mu[t["other_muscle"]] = m * u(0.8, 1.2)
    mu[t["bowel"]] = u(0.03, 0.9)
    mu[t["cortical_bone"]] = u(0.0, 0.15)
    mu[t["marrow"]] = u(0.15, 0.95)
    mu[t["csf"]] = u(0.02, 1.1)  # dark on T1, bright on T2
    mu[t["nerve_root"]] = u(0.05, 0.5)
    dark = u(0.02, 0.5)
    mu[t["organ_dark"]] = dark
    mu[t["organ_mid"]] = u(dark, 0.8)
    mu[t["organ_bright"]] = u(mu[t["organ_mid"]], 0.95)
    # solid organs: anywhere from muscle-dark to bright, often close to muscle on T1
    mu[t["kidney"]] = u(0.03, 0.9)
    mu[t["liver"]] = u(0.05, 0.8)
    mu[t["spleen"]] = u(0.03, 0.8)
    return _unsplit_muscle(mu)


def _unsplit_muscle(mu: NDArray[np.float64]) -> NDArray[np.float64]:
    """Autochthon as its side's erector spinae, unlabelled muscle as other muscle (no new draw:
    label maps without these classes render exactly as before they existed)."""
    t = TISSUES
    mu[t["autochthon_right"]] = mu[t["erector_spinae_right"]]
    mu[t["autochthon_left"]] = mu[t["erector_spinae_left"]]
    mu[t["unlabelled_muscle"]] = mu[t["other_muscle"]]
    return mu


def _target_grid(lm: LabelMap, rng: np.random.Generator, spec: RenderSpec, params: dict
                 ) -> tuple[NDArray, NDArray, NDArray, tuple[float, float, float]]:
    """Backward map: label-map voxel coordinates (i, j per target pixel; k per target slice)."""
    sx, sy, sz = lm.spacing
    nx, ny, nz = lm.classes.shape
    spacing = float(rng.uniform(*spec.spacing_mm))
    fov = float(rng.uniform(*spec.fov_mm))
    if lm.name == "example":  # a cropped scan: never show the crop's straight edges as anatomy
        fov = min(fov, 0.95 * min(nx * sx, ny * sy))
    n = round(fov / spacing)
    if n > spec.max_matrix:
        n = spec.max_matrix
        spacing = fov / n
    thick = float(rng.uniform(*spec.thickness_mm))
    n_sl = int(rng.integers(spec.n_slices[0], spec.n_slices[1] + 1))
    n_sl = max(1, min(n_sl, int(nz * sz // thick)))
    # spine centre: the multifidus centroid (world mm from the array origin)
    spine = np.argwhere(np.isin(lm.classes, (1, 2, TISSUES["autochthon_right"],
                                              TISSUES["autochthon_left"])))
    cx, cy = (spine[:, :2].mean(axis=0) * (sx, sy)) if spine.size else (nx * sx / 2, ny * sy / 2)
    # the crop centre: near the spine for tight crops, near the body centre for wide ones
    body = np.argwhere(lm.classes[:, :, nz // 2] > 0)
    bx, by = (body.mean(axis=0) * (sx, sy)) if body.size else (cx, cy)
    w = float(np.clip((fov - 170.0) / 250.0, 0, 1))
    ox = (1 - w) * cx + w * bx + rng.uniform(-0.1, 0.1) * fov
    oy = (1 - w) * (cy - 0.1 * fov) + w * by + rng.uniform(-0.1, 0.1) * fov
    th = np.deg2rad(rng.uniform(-spec.rotation_deg, spec.rotation_deg))
    scx, scy = rng.uniform(*spec.scale, 2)
    a = (np.arange(n) - (n - 1) / 2) * spacing
    X, Y = np.meshgrid(a, a, indexing="ij")
    rx = (np.cos(th) * X + np.sin(th) * Y) / scx
    ry = (-np.sin(th) * X + np.cos(th) * Y) / scy
    coarse = (max(2, n // 48), max(2, n // 48))
    px = ox + rx + spec.elastic_mm * _smooth(rng, (n, n), coarse)
    py = oy + ry + spec.elastic_mm * _smooth(rng, (n, n), coarse)
    # slices: a contiguous run of slab centres (label-map voxel units along z)
    span = n_sl * thick / sz
    z0 = rng.uniform(0, max(nz - span, 0))
    kz = z0 + (np.arange(n_sl) + 0.5) * thick / sz - 0.5
    params.update({"spacing_mm": spacing, "fov_mm": fov, "matrix": n, "thickness_mm": thick,
                   "n_slices": n_sl, "rotation_deg": float(np.rad2deg(th)),
                   "scale": [float(scx), float(scy)]})
    return px / sx, py / sy, kz, (spacing, spacing, thick)


def render(lm: LabelMap, seed: int, spec: RenderSpec = TRAIN_SPEC
           ) -> tuple[nib.Nifti1Image, nib.Nifti1Image, dict[str, Any]]:
    """One training scan from a label map: (image, unsided 4-label mask, parameters).

    Parameters
    ----------
    lm : LabelMap
        Source anatomy.
    seed : int
        Seeds every random choice (same seed and label map, same case).
    spec : RenderSpec
        Ranges to draw from.

    Returns
    -------
    image, mask : Nifti1Image
        float32 intensities and uint8 sided muscle labels (values of
        ``data/example/labels.json``, :data:`IGNORE` where the muscle is unknown;
        :func:`unsided_mask` merges the sides for training) on one axial grid, stored in a
        random axial orientation.
    params : dict
        What was drawn (JSON-serialisable).
    """
    from helpers.synthetic import reorient

    rng = np.random.default_rng(seed)
    params: dict[str, Any] = {"source": lm.name, "seed": int(seed), "contrast": spec.contrast}
    ci, cj, kz, out_spacing = _target_grid(lm, rng, spec, params)
    sx, sy, sz = lm.spacing
    nx, ny, nz = lm.classes.shape
    # intensities on the label map's own grid: tissue means, texture, streaky muscle fat
    mu = _intensities(rng, spec)
    share = rng.uniform(*spec.fat_share, 8)
    params["muscle_ratio"] = float(np.mean(mu[list(_MUSCLES)]))
    params["fat_share"] = [float(s) for s in share]
    # Only the slab the target slices cover is rendered.
    k_lo = max(0, int(np.floor(kz.min() - 2 * out_spacing[2] / sz)))
    k_hi = min(nz, int(np.ceil(kz.max() + 2 * out_spacing[2] / sz)) + 1)
    cls = lm.classes[:, :, k_lo:k_hi]
    shape = cls.shape
    img = mu[cls].astype(np.float32)
    coarse = (max(2, nx // 25), max(2, ny // 25), max(2, shape[2] // 3))
    tex = _smooth(rng, shape, coarse).astype(np.float32)
    img *= 1.0 + float(rng.uniform(0.0, 0.12)) * tex
    streaks = _smooth(rng, shape, (max(2, nx // 10), max(2, ny // 30), max(2, shape[2] // 2)))
    # streaky fat of unsplit autochthon follows its side's erector spinae
    streaky = [*zip(_MUSCLES, share, strict=True), (TISSUES["autochthon_right"], share[2]),
               (TISSUES["autochthon_left"], share[3])]
    for value, s in streaky:
        inside = cls == value
        if s <= 0 or not inside.any():
            continue
        cut = np.quantile(streaks[inside], 1.0 - s)
        alpha = np.clip((streaks - cut) / 0.5, 0.0, 1.0) * inside
        img = (1 - alpha) * img + alpha * mu[TISSUES["subcutaneous_fat"]] * rng.uniform(0.7, 1.0)
    # acquisition: in-plane blur to the target spacing, Gaussian slice profile through-plane
    sig = [max(0.0, 0.42 * (out_spacing[0] / sx - 1.0)), max(0.0, 0.42 * (out_spacing[1] / sy - 1.0)),
           max(0.0, 0.42 * out_spacing[2] / sz - 0.3)]
    if any(s > 0 for s in sig):
        img = ndi.gaussian_filter(img, sig, truncate=3.0)
    n = ci.shape[0]
    out = np.empty((n, n, len(kz)), np.float32)
    lab = np.empty((n, n, len(kz)), np.uint8)
    for t, k in enumerate(kz):
        kk = np.full(ci.shape, k - k_lo)
        out[:, :, t] = ndi.map_coordinates(img, [ci, cj, kk], order=1, mode="constant", cval=0.0)
        lab[:, :, t] = ndi.map_coordinates(cls, [ci, cj, np.rint(kk)], order=0, mode="constant",
                                           cval=0)
    # bias, ghost, noise, gamma, scanner scale
    bias_amp = float(rng.uniform(0, spec.bias))
    bias = np.exp(bias_amp * _smooth(rng, out.shape, (3, 3, 2)))
    out *= bias.astype(np.float32)
    if rng.random() < spec.ghost_probability:
        g = float(rng.uniform(0.02, 0.08))
        axis = int(rng.integers(0, 2))
        out = out + g * np.roll(out, n // 2, axis=axis)
        params["ghost"] = [g, axis]
    snr = float(rng.uniform(*spec.snr))
    sigma = 1.0 / snr
    out = np.hypot(out + rng.normal(0, sigma, out.shape), rng.normal(0, sigma, out.shape))
    gamma = float(rng.uniform(*spec.gamma))
    top = float(np.percentile(out, 99.5)) or 1.0
    scale = float(rng.uniform(200, 3000))
    out = scale * top * (out / top) ** gamma
    params.update({"bias": bias_amp, "snr": snr, "gamma": gamma})
    # geometry: L-P-S target grid, then a random axial storage order
    aff = np.diag([-out_spacing[0], -out_spacing[1], out_spacing[2], 1.0])
    aff[:3, 3] = [out_spacing[0] * (n - 1) / 2, out_spacing[1] * (n - 1) / 2, 0.0]
    orient = str(rng.choice(ORIENTATIONS))
    params["orientation"] = orient
    image = reorient(nib.Nifti1Image(np.rint(out).astype(np.float32), aff), orient)
    mask = reorient(nib.Nifti1Image(_TARGET[lab], aff), orient)
    return image, mask, params


def unsided_mask(mask: NDArray) -> NDArray[np.uint8]:
    """Sided muscle labels (1-8, :data:`IGNORE`) to the unsided training labels (1-4, muscle
    order; 5 unknown)."""
    return _UNSIDED[np.asarray(mask)]


def make_case(kind: str, seed: int, spec: RenderSpec = TRAIN_SPEC, organs: bool = False
              ) -> tuple[nib.Nifti1Image, nib.Nifti1Image, dict[str, Any]]:
    """One rendered case from a fresh label map of ``kind`` (phantom / template / example /
    totalseg);
    ``organs`` adds kidneys, liver and spleen to the procedural bodies."""
    rng = np.random.default_rng(seed)
    lm_seed = int(rng.integers(0, 2**31))
    if kind == "phantom":
        lm = phantom_labelmap(lm_seed, n_slices=int(rng.integers(12, 22)), organs=organs)
    elif kind == "template":
        lm = template_labelmap(lm_seed, organs=organs)
    elif kind == "example":
        lm = example_labelmap()
    elif kind == "totalseg":
        lm = totalseg_labelmap()
    else:
        msg = f"label map kind must be phantom, template, example or totalseg, got {kind!r}"
        raise ConfigError(msg)
    img, msk, params = render(lm, int(rng.integers(0, 2**31)), spec)
    params["labelmap_seed"] = lm_seed
    params["organs"] = bool(organs)
    return img, msk, params


@dataclass(frozen=True)
class CaseJob:
    """One case to make and write (picklable for worker processes)."""

    case_id: str
    kind: str
    seed: int
    out_dir: str
    spec: RenderSpec = field(default_factory=RenderSpec)
    organs: bool = False


def write_case(job: CaseJob) -> dict[str, Any]:
    """Make and write ``<case>_T1w.nii.gz`` / ``<case>_dseg.nii.gz``; return its table row.

    The image suffix is ``T1w`` for the fat-bright family (the label maps' contrast prior), but
    the cases stand for any fat-bright contrast.  A case already written is not made again.
    """
    from helpers.files import atomic_write_text
    from helpers.nifti import save_like

    out = Path(job.out_dir)
    img_path, msk_path = out / f"{job.case_id}_T1w.nii.gz", out / f"{job.case_id}_dseg.nii.gz"
    meta = out / f"{job.case_id}.json"
    if not meta.is_file():
        img, msk, params = make_case(job.kind, job.seed, job.spec, job.organs)
        save_like(np.asarray(img.dataobj, dtype=np.float32), img, img_path)
        save_like(unsided_mask(np.asarray(msk.dataobj)), img, msk_path)
        params.update({"case": job.case_id, "kind": job.kind, "spec": asdict(job.spec)})
        atomic_write_text(meta, json.dumps(params, default=float) + "\n")
    return json.loads(meta.read_text(encoding="utf-8"))
