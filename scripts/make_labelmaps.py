#!/usr/bin/env python
"""Derive the shipped label maps of helpers.synthseg into data/labelmaps/.

    .venv/bin/python scripts/make_labelmaps.py [--shared ../shared]

- ``musclemap_template_muscles.nii.gz``: the eight muscles of MuscleMap's population template
  (``<shared>/data/musclemap_abdomen_template``), re-stored L-P-S and block-resampled from
  0.5 x 0.5 x 1.5 mm to 1.0 x 1.0 x 3.0 mm (label of the 2 x 2 x 2 block's majority), cropped
  to the muscles with a 20 mm margin.
- ``musclemap_sample_tissues.nii.gz``: the real example (``data/example``) as tissue classes
  (``helpers.synthseg.derive_example_labelmap``), on its own grid, L-P-S.
- ``totalseg_mr_tissues.nii.gz``: TotalSegmentator's MR example
  (``<shared>/data/totalseg_mr_example``, image and ``total_mr`` labels) as tissue classes
  (``helpers.synthseg.derive_totalseg_labelmap``: autochthon unsplit, unknown muscle around the
  back muscles, psoas and spine), derived on its 3 mm grid and upsampled in-plane to 1 mm with
  smooth borders (``helpers.synthseg.upsample_classes``), then the autochthon split by position
  into multifidus, erector spinae and an unknown band (``helpers.synthseg.split_autochthon``),
  L-P-S.

Deterministic: the same inputs give byte-identical label arrays.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np

from helpers.nifti import load_image, load_mask
from helpers.synthetic import reorient
from helpers.synthseg import (
    EXAMPLE_DIR,
    LABELMAP_DIR,
    derive_example_labelmap,
    derive_totalseg_tissues,
)

REPO = Path(__file__).resolve().parents[1]


def _save(data: np.ndarray, spacing: tuple[float, float, float], path: Path) -> None:
    aff = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    img = nib.Nifti1Image(data.astype(np.uint8), aff)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    tmp = path.with_name(path.name + ".part.nii.gz")
    nib.save(img, tmp)
    tmp.replace(path)
    print(f"wrote {path} {data.shape} {spacing} ({path.stat().st_size // 1024} KB)")


def template_muscles(shared: Path) -> None:
    src = shared / "data" / "musclemap_abdomen_template" / "abdomen_template_dseg.nii.gz"
    img = reorient(nib.load(src), "LPS")
    lab = np.rint(np.asarray(img.dataobj)).astype(np.uint8)
    nx, ny, nz = (s // 2 * 2 for s in lab.shape)
    lab = lab[:nx, :ny, :nz]
    blocks = lab.reshape(nx // 2, 2, ny // 2, 2, nz // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    blocks = blocks.reshape(nx // 2, ny // 2, nz // 2, 8)
    counts = np.stack([(blocks == v).sum(axis=-1) for v in range(9)], axis=-1)
    out = np.argmax(counts, axis=-1).astype(np.uint8)
    ii, jj, kk = np.nonzero(out)
    m = 20
    out = out[max(ii.min() - m, 0):ii.max() + m + 1, max(jj.min() - m, 0):jj.max() + m + 1,
              kk.min():kk.max() + 1]
    zooms = [float(z) * 2 for z in img.header.get_zooms()[:3]]
    _save(out, (zooms[0], zooms[1], zooms[2]), LABELMAP_DIR / "musclemap_template_muscles.nii.gz")


def sample_tissues() -> None:
    im = load_image(EXAMPLE_DIR / "sub-0001_T1w.nii.gz")
    mk = load_mask(EXAMPLE_DIR / "sub-0001_T1w_dseg.nii.gz")
    image = reorient(nib.Nifti1Image(im.data, im.affine), "LPS")
    mask = reorient(nib.Nifti1Image(mk.data, im.affine), "LPS")
    spacing = tuple(float(z) for z in image.header.get_zooms()[:3])
    classes = derive_example_labelmap(np.asarray(image.dataobj), np.asarray(mask.dataobj),
                                      spacing)
    _save(classes, spacing, LABELMAP_DIR / "musclemap_sample_tissues.nii.gz")


def totalseg_tissues(shared: Path) -> None:
    src = shared / "data" / "totalseg_mr_example"
    fine, spacing = derive_totalseg_tissues(src / "mr.nii.gz", src / "mr_seg_total_mr.nii.gz")
    _save(fine, spacing, LABELMAP_DIR / "totalseg_mr_tissues.nii.gz")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    args = p.parse_args()
    LABELMAP_DIR.mkdir(parents=True, exist_ok=True)
    template_muscles(args.shared)
    sample_tissues()
    totalseg_tissues(args.shared)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
