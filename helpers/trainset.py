"""Synthetic training cases for the demo segmentation model.

Two kinds of labelled scans, both derived from the one real example shipped with the repo
(``data/example``: a sample lumbar T2w scan from the MuscleMap toolbox, MIT) so that they look
like real lumbar axial T2:

``example`` cases (:func:`deformed_example`)
    The real image and its mask, moved together through one random backward map: per-muscle
    growth or atrophy about each muscle's own per-slice centroid (area factor 0.6-1.35), a
    smooth elastic field (a few mm), an axial rotation, anisotropic scaling and a shift.  Then
    streaky intramuscular fat (0-35 % of a muscle's voxels brightened toward fat), a smooth
    multiplicative bias field, Rician noise and a gamma change; a random run of slices; a
    random storage orientation (:func:`helpers.synthetic.reorient`).
``phantom`` cases (:func:`phantom`)
    :func:`helpers.synthetic.make_phantom` with random muscle sizes, fat, bias, noise,
    rotation, off-centre shift, warp, orientation and grid: the phantoms of the demo cohort.

The real example's mask is model-made, not a manual tracing; a model trained on these cases is
a demonstration, not a validated research model (say so wherever its Dice is shown).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from numpy.typing import NDArray
from scipy import ndimage as ndi

from helpers.errors import ConfigError
from helpers.files import atomic_write_text
from helpers.labels import LabelTable, load_labels, parse_labels
from helpers.nifti import load_image, load_mask, save_like
from helpers.training import TrainingCase, labels_document

__all__ = [
    "EXAMPLE_DIR",
    "ORIENTATIONS",
    "deformed_example",
    "make_heldout_set",
    "make_training_set",
    "phantom",
    "unsided",
]

log = logging.getLogger(__name__)

EXAMPLE_DIR = Path(__file__).resolve().parents[1] / "data" / "example"
#: Storage orientations drawn for the cases: the in-plane flips of axial storage (slice axis
#: third, left-right first), as scanners and converters write axial T2.
ORIENTATIONS = ("LPS", "RAS", "LAS", "RPS")
_FAT_INTENSITY = 600.0  # posterior subcutaneous fat of the example (scanner units)


@dataclass(frozen=True)
class _Source:
    image: NDArray[np.float32]
    mask: NDArray[np.int16]
    affine: NDArray[np.float64]
    labels: LabelTable


def _example() -> _Source:
    img = load_image(EXAMPLE_DIR / "sub-0001_T1w.nii.gz")
    msk = load_mask(EXAMPLE_DIR / "sub-0001_T1w_dseg.nii.gz")
    return _Source(img.data, msk.data, img.affine, load_labels(EXAMPLE_DIR / "labels.json"))


def unsided(mask: NDArray, labels: LabelTable) -> tuple[NDArray[np.uint8], LabelTable]:
    """Merge left and right of each muscle into one unsided label (values 1..n in muscle order).

    Examples
    --------
    >>> t = parse_labels({"labels": [{"value": 1, "muscle": "a", "side": "right"},
    ...                              {"value": 2, "muscle": "a", "side": "left"},
    ...                              {"value": 3, "muscle": "b", "side": "right"}]})
    >>> m, u = unsided(np.array([0, 1, 2, 3]), t)
    >>> m.tolist(), [(x.value, x.muscle, x.side) for x in u.labels]
    ([0, 1, 1, 2], [(1, 'a', None), (2, 'b', None)])
    """
    muscles = labels.muscles
    lut = np.zeros(max(labels.values) + 1, dtype=np.uint8)
    for lab in labels.labels:
        lut[lab.value] = muscles.index(lab.muscle) + 1
    table = parse_labels({"labels": [{"value": i + 1, "muscle": m, "side": None}
                                     for i, m in enumerate(muscles)]})
    return lut[np.asarray(mask)], table


# ------------------------------------------------------------------------------- deformation
def _smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], coarse: tuple[int, int, int],
                  amplitude: float) -> NDArray[np.float64]:
    """Smooth random field (cubic upsampling of coarse Gaussian noise), SD about ``amplitude``."""
    noise = rng.normal(0.0, 1.0, coarse)
    field = ndi.zoom(noise, [s / c for s, c in zip(shape, coarse, strict=True)], order=3,
                     mode="nearest", grid_mode=True)
    field = field[: shape[0], : shape[1], : shape[2]]
    return amplitude * field / max(float(field.std()), 1e-6)


def _backward_map(src: _Source, rng: np.random.Generator, params: dict[str, Any]
                  ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Source voxel coordinates (i, j) for every output voxel (same grid, per slice)."""
    nx, ny, nz = src.mask.shape
    zooms = np.sqrt((src.affine[:3, :3] ** 2).sum(axis=0))
    sx, sy = float(zooms[0]), float(zooms[1])
    ii, jj = np.meshgrid(np.arange(nx, dtype=float), np.arange(ny, dtype=float), indexing="ij")
    X = np.repeat((ii * sx)[..., None], nz, axis=2)
    Y = np.repeat((jj * sy)[..., None], nz, axis=2)
    # Global similarity about the spine (centroid of the multifidus labels).
    spine = np.argwhere(np.isin(src.mask, [lab.value for lab in src.labels.labels
                                           if lab.muscle == "multifidus"]))
    cx, cy = (spine[:, :2].mean(axis=0) * (sx, sy)) if spine.size else (nx * sx / 2, ny * sy / 2)
    th = np.deg2rad(params["rotation_deg"])
    scx, scy = params["scale_xy"]
    tx, ty = params["shift_mm"]
    # output -> intermediate: inverse of (scale, rotate, shift) about the centre
    dx, dy = X - cx - tx, Y - cy - ty
    rx = np.cos(th) * dx + np.sin(th) * dy
    ry = -np.sin(th) * dx + np.cos(th) * dy
    px, py = cx + rx / scx, cy + ry / scy
    # elastic field
    amp = params["elastic_mm"]
    coarse = (7, 6, 3)
    px = px + _smooth_field(rng, (nx, ny, nz), coarse, amp)
    py = py + _smooth_field(rng, (nx, ny, nz), coarse, amp)
    # per-muscle growth / atrophy about each muscle's per-slice centroid (backward: divide by k)
    ux = np.zeros_like(px)
    uy = np.zeros_like(py)
    area_mm2 = sx * sy
    for lab in src.labels.labels:
        k = float(np.sqrt(params["area_factor"][f"{lab.muscle}:{lab.side}"]))
        for z in range(nz):
            idx = np.argwhere(src.mask[:, :, z] == lab.value)
            if idx.shape[0] < 5:
                continue
            ccx, ccy = idx.mean(axis=0) * (sx, sy)
            radius = np.sqrt(idx.shape[0] * area_mm2 / np.pi)
            d2 = (px[:, :, z] - ccx) ** 2 + (py[:, :, z] - ccy) ** 2
            w = np.exp(-d2 / (2 * (1.3 * radius) ** 2))
            ux[:, :, z] += (1.0 / k - 1.0) * (px[:, :, z] - ccx) * w
            uy[:, :, z] += (1.0 / k - 1.0) * (py[:, :, z] - ccy) * w
    return (px + ux) / sx, (py + uy) / sy


def _warp(volume: NDArray, ci: NDArray, cj: NDArray, order: int) -> NDArray:
    out = np.empty(ci.shape, dtype=np.float32 if order else volume.dtype)
    for z in range(volume.shape[2]):
        out[:, :, z] = ndi.map_coordinates(volume[:, :, z], [ci[:, :, z], cj[:, :, z]],
                                           order=order, mode="constant", cval=0.0)
    return out


def _bias(rng: np.random.Generator, shape: tuple[int, int, int], strength: float) -> NDArray:
    """exp of a random low-order polynomial in normalised coordinates."""
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    x, y, z = grids
    terms = [x, y, z, x * x, y * y, x * y]
    coef = rng.normal(0.0, strength, len(terms))
    return np.exp(sum(c * t for c, t in zip(coef, terms, strict=True)))


def deformed_example(case_id: str, seed: int, source: _Source | None = None
                     ) -> tuple[nib.Nifti1Image, nib.Nifti1Image, dict[str, Any]]:
    """One deformed copy of the real example (image, sided mask, parameters).

    The mask keeps the example's label values (``data/example/labels.json``).
    """
    from helpers.synthetic import reorient

    src = source or _example()
    rng = np.random.default_rng(seed)
    params: dict[str, Any] = {
        "kind": "example",
        "case_id": case_id,
        "seed": seed,
        "rotation_deg": float(rng.uniform(-15, 15)),
        "scale_xy": [float(rng.uniform(0.88, 1.12)), float(rng.uniform(0.88, 1.12))],
        "shift_mm": [float(rng.uniform(-12, 12)), float(rng.uniform(-12, 12))],
        "elastic_mm": float(rng.uniform(1.5, 4.0)),
        "area_factor": {f"{lab.muscle}:{lab.side}": float(rng.uniform(0.6, 1.35))
                        for lab in src.labels.labels},
        "fat_share": {m: float(rng.uniform(0.0, 0.35)) for m in src.labels.muscles},
        "bias_strength": float(rng.uniform(0.05, 0.3)),
        "snr": float(rng.uniform(12, 40)),
        "gamma": float(rng.uniform(0.8, 1.25)),
        "orientation": str(rng.choice(ORIENTATIONS)),
    }
    ci, cj = _backward_map(src, rng, params)
    image = _warp(src.image, ci, cj, order=1)
    mask = _warp(src.mask, ci, cj, order=0).astype(np.uint8)
    # streaky intramuscular fat
    streaks = _smooth_field(rng, image.shape, (40, 12, 6), 1.0)
    for muscle, share in params["fat_share"].items():
        values = [lab.value for lab in src.labels.labels if lab.muscle == muscle]
        inside = np.isin(mask, values)
        if share <= 0 or not inside.any():
            continue
        cut = np.quantile(streaks[inside], 1.0 - share)
        alpha = np.clip((streaks - cut) / 0.5, 0.0, 1.0) * inside
        image = (1 - alpha) * image + alpha * _FAT_INTENSITY * rng.uniform(0.6, 1.0)
    image = image * _bias(rng, image.shape, params["bias_strength"])
    top = float(np.percentile(image, 99.5))
    image = top * (np.clip(image, 0, None) / top) ** params["gamma"]
    sigma = _FAT_INTENSITY / params["snr"]
    image = np.hypot(image + rng.normal(0, sigma, image.shape), rng.normal(0, sigma, image.shape))
    # random run of slices
    nz = image.shape[2]
    n_keep = int(rng.integers(max(8, nz - 8), nz + 1))
    z0 = int(rng.integers(0, nz - n_keep + 1))
    params["slices"] = [z0, z0 + n_keep]
    affine = src.affine.copy()
    affine[:3, 3] = src.affine[:3, :3] @ np.array([0, 0, z0]) + src.affine[:3, 3]
    img = nib.Nifti1Image(np.rint(image[:, :, z0:z0 + n_keep]).astype(np.float32), affine)
    msk = nib.Nifti1Image(mask[:, :, z0:z0 + n_keep], affine)
    img, msk = reorient(img, params["orientation"]), reorient(msk, params["orientation"])
    return img, msk, params


def phantom(case_id: str, seed: int) -> tuple[nib.Nifti1Image, nib.Nifti1Image, dict[str, Any]]:
    """One :func:`helpers.synthetic.make_phantom` subject with random parameters."""
    from helpers.synthetic import LABELS, make_phantom

    rng = np.random.default_rng(seed)
    template = "small" if rng.random() < 0.15 else "example"
    kw: dict[str, Any] = {
        "orientation": str(rng.choice(ORIENTATIONS)),
        "fat_pct": {f"{lab.muscle}:{lab.side}": float(rng.uniform(2, 35)) for lab in LABELS.labels},
        "csa_scale": {f"{lab.muscle}:{lab.side}": float(rng.uniform(0.6, 1.3))
                      for lab in LABELS.labels},
        "bias_lr": float(rng.uniform(0.0, 0.35)),
        "bias_ap": float(rng.uniform(-0.1, 0.35)),
        "snr": float(rng.uniform(12, 40)),
        "rotation_deg": float(rng.uniform(-20, 20)),
        "shift_mm": (float(rng.uniform(-15, 15)), float(rng.uniform(-15, 15))),
        "warp_mm": float(rng.uniform(1, 6)),
        "template": template,
    }
    ph = make_phantom(case_id, seed=int(rng.integers(0, 2**31)), **kw)
    params = {"kind": "phantom", "case_id": case_id, "seed": seed, **kw}
    return ph.image, ph.mask, params


def write_pair(img: nib.Nifti1Image, data: NDArray, out: Path, case_id: str,
               suffix: str) -> None:
    """Write one training pair: ``<case>_<suffix>.nii.gz`` (float32) and ``<case>_dseg.nii.gz``."""
    save_like(np.asarray(img.dataobj).astype(np.float32), img, out / f"{case_id}_{suffix}.nii.gz")
    save_like(np.asarray(data).astype(np.uint8), img, out / f"{case_id}_dseg.nii.gz")


def write_example_case(case_id: str, seed: int, out: Path, suffix: str,
                       merge_sides: bool = True) -> tuple[tuple[int, ...], dict[str, Any]]:
    """Write one deformed copy of the real example; return its shape and parameters."""
    img, msk, params = deformed_example(case_id, seed, _cached_example())
    _write_case(img, msk, out, case_id, suffix, merge_sides)
    return img.shape, params


def _write_case(img: nib.Nifti1Image, msk: nib.Nifti1Image, out: Path, case_id: str,
                suffix: str, merge_sides: bool) -> None:
    data = np.asarray(msk.dataobj)
    if merge_sides:
        data, _ = unsided(data, _cached_example().labels)
    write_pair(img, data, out, case_id, suffix)


def _make_case(job: tuple[str, int, str, str, bool]) -> dict[str, Any]:
    """Make and write one case (module level: runs in worker processes too)."""
    case_id, case_seed, kind, out_dir, merge_sides = job
    if kind == "ex":
        img, msk, params = deformed_example(case_id, case_seed, _cached_example())
    else:
        img, msk, params = phantom(case_id, case_seed)
    _write_case(img, msk, Path(out_dir), case_id, "T2w", merge_sides)
    log.debug("made %s", case_id)
    return {"case": case_id, "kind": params["kind"], "seed": case_seed,
            "orientation": params["orientation"], "shape": list(img.shape),
            "params": json.dumps(params, default=float)}


_EXAMPLE_CACHE: list[_Source] = []


def _cached_example() -> _Source:
    if not _EXAMPLE_CACHE:
        _EXAMPLE_CACHE.append(_example())
    return _EXAMPLE_CACHE[0]


def make_training_set(
    out_dir: str | Path,
    n_example: int,
    n_phantom: int,
    seed: int = 0,
    prefix: str = "syn",
    merge_sides: bool = True,
    workers: int = 1,
) -> tuple[list[TrainingCase], LabelTable, pd.DataFrame]:
    """Write ``n_example`` deformed-example and ``n_phantom`` phantom cases to ``out_dir``.

    Parameters
    ----------
    out_dir : path
        Receives ``<id>_T2w.nii.gz``, ``<id>_dseg.nii.gz``, ``labels.json`` and ``cases.csv``.
    n_example, n_phantom : int
        How many of each kind.
    seed : int
        Base seed; case ``k`` uses ``seed * 10000 + k`` (different base seeds never share a case).
    prefix : str
        Case ID prefix (IDs are ``<prefix>-ex<k>`` and ``<prefix>-ph<k>``).
    merge_sides : bool
        Write unsided masks (one label per muscle, see :func:`unsided`) for a model whose sides
        come from anatomy; else the sided example labels.
    workers : int
        Processes making cases in parallel (``spawn``; the cases do not depend on it).

    Returns
    -------
    cases, labels, table
        The training cases, their label table and one row of parameters per case.
    """
    if n_example < 0 or n_phantom < 0 or n_example + n_phantom == 0:
        msg = f"need a positive number of cases, got n_example={n_example}, n_phantom={n_phantom}"
        raise ConfigError(msg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = load_labels(EXAMPLE_DIR / "labels.json")
    jobs = [(f"{prefix}-{kind}{k:03d}", int(seed) * 10000 + k + (5000 if kind == "ph" else 0),
             kind, str(out), merge_sides)
            for kind, n in (("ex", n_example), ("ph", n_phantom)) for k in range(n)]
    if workers > 1 and len(jobs) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=int(workers), mp_context=ctx) as pool:
            rows = list(pool.map(_make_case, jobs))
    else:
        rows = [_make_case(job) for job in jobs]
    cases = [TrainingCase(r["case"], out / f"{r['case']}_T2w.nii.gz",
                          out / f"{r['case']}_dseg.nii.gz") for r in rows]
    out_labels = unsided(np.zeros(1, dtype=np.int16), labels)[1] if merge_sides else labels
    atomic_write_text(out / "labels.json", json.dumps(labels_document(out_labels), indent=2) + "\n")
    table = pd.DataFrame(rows)
    atomic_write_text(out / "cases.csv", table.to_csv(index=False))
    return cases, out_labels, table


#: Base seed of a held-out set: the training set's seed plus this (never the same cases).
HELDOUT_SEED_OFFSET = 1000


def make_heldout_set(
    out_dir: str | Path, n_each: int, training_seed: int = 1, workers: int = 1
) -> tuple[list[TrainingCase], LabelTable, pd.DataFrame]:
    """Held-out test cases for a model trained on ``make_training_set(..., seed=training_seed)``.

    ``n_each`` deformed-example and ``n_each`` phantom cases (IDs ``tst-ex<k>`` / ``tst-ph<k>``)
    with the sided example labels, from base seed ``training_seed + HELDOUT_SEED_OFFSET``: the
    same cases for the same arguments (the demo model's card and its slow test), and the first
    cases of a larger set are those of a smaller one.
    """
    return make_training_set(out_dir, n_each, n_each, seed=training_seed + HELDOUT_SEED_OFFSET,
                             prefix="tst", merge_sides=False, workers=workers)
