"""Synthetic Dixon (water and fat) phantoms with planted fat fractions.

A Dixon phantom is a :func:`helpers.synthetic.make_phantom` phantom (same anatomy, masks,
levels and truth tables) imaged as a water/fat pair instead of one T2-weighted image:

- fat image ``F = f * S * bias`` and water image ``W = (1 - f) * S * w * bias``, with ``f`` the
  phantom's planted per-voxel fat fraction (sub-voxel partial volume at muscle borders and in
  the fat streaks), ``S`` the signal of pure tissue, ``w`` = 1 in muscle and fat tissue and
  ``water_other`` (default 0.8) in the body's other tissue, and a smooth multiplicative coil
  shading ``bias`` shared by both images (left-right gradient ``bias_lr``);
- optional noise: ``"rician"`` (magnitude images, as most scanners store them; the noise
  floor biases low fat fractions upwards) or ``"gaussian"`` (signed, phase-corrected
  reconstructions: values may be negative), with ``sigma = S / snr`` in each image.

Because fat and muscle water have the same signal ``S`` (a proton-density-weighted Dixon), the
voxel fat fraction ``F / (W + F)`` of the noise-free images equals the planted ``f``, and the
phantom's ``truth`` table (``fat_pct`` = pooled mean of ``f`` x 100) is the Dixon truth.

Example
-------
>>> dp = make_dixon_phantom("dx-001", template="small", seed=1)
>>> dp.water.shape == dp.fat.shape == dp.phantom.mask.shape
True
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from numpy.typing import NDArray
from scipy import ndimage as ndi

from helpers.errors import ConfigError
from helpers.nifti import save_like, slice_axis
from helpers.synthetic import Phantom, make_phantom, write_phantom

__all__ = ["NOISE_KINDS", "DixonPhantom", "make_dixon_phantom", "write_dixon_phantom"]

#: Noise models of :func:`make_dixon_phantom`.
NOISE_KINDS = ("none", "rician", "gaussian")


@dataclass
class DixonPhantom:
    """A phantom imaged as a Dixon pair.

    Attributes
    ----------
    phantom : Phantom
        Anatomy, mask, labels, levels and planted truth (``truth.fat_pct`` is the Dixon truth).
    water, fat : nibabel.Nifti1Image
        Water and fat images (float32) on the mask's grid.
    params : dict
        Dixon settings (signal, noise, snr, shading, swap).
    """

    phantom: Phantom
    water: nib.Nifti1Image
    fat: nib.Nifti1Image
    params: dict[str, Any]


def _body(ph: Phantom) -> NDArray[np.bool_]:
    """Body outline of a phantom: its T2-like image above the air's noise, holes filled per
    slice, plus every voxel holding fat or muscle."""
    img = np.asarray(ph.image.dataobj, dtype=np.float32)
    ax = slice_axis(ph.image.affine)
    sigma = [1.0, 1.0, 1.0]
    sigma[ax] = 0.0
    tissue = ndi.gaussian_filter(img, sigma) > 4.0 * float(ph.params["noise_sigma"])
    tissue |= (ph.fat_fraction > 0) | (np.asarray(ph.mask.dataobj) > 0)
    moved = np.moveaxis(tissue, ax, -1)
    filled = np.stack([ndi.binary_fill_holes(moved[..., k]) for k in range(moved.shape[-1])], -1)
    return np.moveaxis(filled, -1, ax)


def make_dixon_phantom(
    subject: str = "dx-001",
    *,
    signal: float = 1000.0,
    noise: str = "none",
    dixon_snr: float = 50.0,
    dixon_bias_lr: float = 0.25,
    water_other: float = 0.8,
    swap: bool = False,
    dixon_seed: int | None = None,
    **phantom_kwargs: Any,
) -> DixonPhantom:
    """Make a Dixon phantom (water and fat images) with planted per-voxel fat fractions.

    Parameters
    ----------
    subject : str
        Subject ID.
    signal : float
        Signal ``S`` of pure fat and of lean muscle water (image units).
    noise : {"none", "rician", "gaussian"}
        Noise model of both images (see the module docstring).
    dixon_snr : float
        ``S / sigma`` of the Dixon noise (ignored for ``"none"``); the T2-like image's own
        noise is ``snr`` of :func:`~helpers.synthetic.make_phantom`.
    dixon_bias_lr : float
        Left-right coil shading shared by both images: ``1 + dixon_bias_lr`` at the patient's
        right edge of a 240 mm field, ``1 - dixon_bias_lr`` at the left (fractions cancel it).
    water_other : float
        Water signal of the body's non-muscle, non-fat tissue, relative to ``S``.
    swap : bool
        Exchange the two images (a water/fat swap of the whole scan), for error tests.
    dixon_seed : int, optional
        Seed of the Dixon noise (default: the phantom's ``seed``).
    **phantom_kwargs
        Passed to :func:`helpers.synthetic.make_phantom` (``seed``, ``template``, ``fat_pct``,
        ``orientation``, ``cdi``, ...).

    Returns
    -------
    DixonPhantom
    """
    if noise not in NOISE_KINDS:
        msg = f"noise must be one of {', '.join(NOISE_KINDS)}, got {noise!r}"
        raise ConfigError(msg)
    if not (signal > 0 and dixon_snr > 0):
        msg = f"signal and dixon_snr must be positive, got {signal!r} and {dixon_snr!r}"
        raise ConfigError(msg)
    ph = make_phantom(subject, **phantom_kwargs)
    f = np.asarray(ph.fat_fraction, dtype=np.float64)
    body = _body(ph)
    muscle = np.asarray(ph.mask.dataobj) > 0
    water_level = np.where(muscle | (f > 0), 1.0, water_other) * body
    affine = ph.image.affine
    i, j, k = np.indices(f.shape)
    x = affine[0, 0] * i + affine[0, 1] * j + affine[0, 2] * k + affine[0, 3]
    bias = 1.0 + dixon_bias_lr * np.clip(x / 120.0, -1.0, 1.0)
    fat_img = f * signal * bias * body
    water_img = (1.0 - f) * signal * water_level * bias
    seed = int(phantom_kwargs.get("seed", 0)) if dixon_seed is None else int(dixon_seed)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 18]))
    sigma = signal / dixon_snr
    if noise == "rician":
        water_img = np.hypot(water_img + rng.normal(0, sigma, f.shape), rng.normal(0, sigma, f.shape))
        fat_img = np.hypot(fat_img + rng.normal(0, sigma, f.shape), rng.normal(0, sigma, f.shape))
    elif noise == "gaussian":
        water_img = water_img + rng.normal(0, sigma, f.shape)
        fat_img = fat_img + rng.normal(0, sigma, f.shape)
    if swap:
        water_img, fat_img = fat_img, water_img
    params = {"signal": signal, "noise": noise, "snr": dixon_snr if noise != "none" else None,
              "noise_sigma": sigma if noise != "none" else 0.0, "dixon_bias_lr": dixon_bias_lr,
              "water_other": water_other, "swap": swap, "dixon_seed": seed}

    def nifti(arr: NDArray) -> nib.Nifti1Image:
        out = nib.Nifti1Image(arr.astype(np.float32), affine)
        out.set_qform(affine, code=1)
        out.set_sform(affine, code=1)
        return out

    return DixonPhantom(ph, nifti(water_img), nifti(fat_img), params)


def write_dixon_phantom(dp: DixonPhantom, folder: str | Path, **kwargs: Any) -> dict[str, Path]:
    """Write a Dixon phantom: :func:`helpers.synthetic.write_phantom`'s files (the T2-like
    image included) plus ``<subject>_water.nii.gz`` and ``<subject>_fat.nii.gz`` (float32).

    Returns
    -------
    dict
        :func:`~helpers.synthetic.write_phantom`'s keys plus ``water`` and ``fat``.
    """
    folder = Path(folder)
    paths = write_phantom(dp.phantom, folder, **kwargs)
    paths["water"] = save_like(np.asarray(dp.water.dataobj, dtype=np.float32), dp.water,
                               folder / f"{dp.phantom.subject}_water.nii.gz")
    paths["fat"] = save_like(np.asarray(dp.fat.dataobj, dtype=np.float32), dp.fat,
                             folder / f"{dp.phantom.subject}_fat.nii.gz")
    return paths
