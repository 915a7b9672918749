"""Domain-randomised training cases (helpers.synthseg): label maps and rendering."""

from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np
import pytest

from helpers.errors import ConfigError
from helpers.nifti import load_image, load_mask
from helpers.synthetic import reorient
from helpers.synthseg import (
    HELDOUT_SPEC,
    LABELMAP_DIR,
    TISSUES,
    TRAIN_SPEC,
    CaseJob,
    LabelMap,
    RenderSpec,
    derive_example_labelmap,
    example_labelmap,
    phantom_labelmap,
    render,
    template_labelmap,
    unsided_mask,
    write_case,
)
from helpers.trainset import EXAMPLE_DIR

SMALL = RenderSpec(spacing_mm=(1.4, 1.6), fov_mm=(250.0, 300.0), n_slices=(3, 4), max_matrix=200)


def _world_x(img: nib.Nifti1Image, mask: np.ndarray, value: int) -> float:
    ijk = np.argwhere(mask == value)
    return float((img.affine[:3, :3] @ ijk.mean(axis=0) + img.affine[:3, 3])[0])


@pytest.fixture(scope="module")
def phantom_map() -> LabelMap:
    return phantom_labelmap(3, fov_mm=420.0, spacing_mm=2.0, n_slices=8)


def test_phantom_labelmap_is_a_whole_cross_section(phantom_map: LabelMap) -> None:
    c = phantom_map.classes
    present = set(np.unique(c).tolist())
    # all eight muscles, air around the body, subcutaneous fat, bone, CSF
    assert set(range(1, 9)) <= present
    for name in ("air", "subcutaneous_fat", "cortical_bone", "csf", "bowel"):
        assert TISSUES[name] in present, name
    # air at every corner of every slice: the field of view holds the whole body
    assert (c[0, 0] == 0).all()
    assert (c[-1, -1] == 0).all()
    # right muscles (odd values) at larger world x than their left twins
    img = nib.Nifti1Image(c, phantom_map.affine())
    for right in (1, 3, 5, 7):
        assert _world_x(img, c, right) > _world_x(img, c, right + 1)


def test_template_labelmap_sides_and_body() -> None:
    lm = template_labelmap(5)
    img = nib.Nifti1Image(lm.classes, lm.affine())
    for right in (1, 3, 5, 7):
        assert _world_x(img, lm.classes, right) > _world_x(img, lm.classes, right + 1)
    assert TISSUES["subcutaneous_fat"] in lm.classes
    # the slab is 50-110 mm of the template's 3 mm slices
    assert 50 / 3 - 1 <= lm.classes.shape[2] <= 110 / 3 + 1


def test_shipped_example_labelmap_matches_its_derivation() -> None:
    """data/labelmaps/musclemap_sample_tissues.nii.gz is what the code derives from the example."""
    image = reorient(nib.load(EXAMPLE_DIR / "sub-0001_T1w.nii.gz"), "LPS")
    mask = reorient(nib.Nifti1Image(load_mask(EXAMPLE_DIR / "sub-0001_T1w_dseg.nii.gz").data,
                                    image.affine), "LPS")
    spacing = tuple(float(z) for z in image.header.get_zooms()[:3])
    derived = derive_example_labelmap(np.asarray(image.dataobj), np.asarray(mask.dataobj), spacing)
    shipped = example_labelmap()
    np.testing.assert_array_equal(derived, shipped.classes)
    # muscles are the example's mask voxel for voxel
    np.testing.assert_array_equal(np.where(derived <= 8, derived, 0), np.asarray(mask.dataobj))
    assert (LABELMAP_DIR / "README.md").is_file()


def test_render_is_deterministic_and_within_the_spec(phantom_map: LabelMap) -> None:
    a_img, a_msk, a_par = render(phantom_map, 11, SMALL)
    b_img, b_msk, _ = render(phantom_map, 11, SMALL)
    np.testing.assert_array_equal(np.asarray(a_img.dataobj), np.asarray(b_img.dataobj))
    np.testing.assert_array_equal(np.asarray(a_msk.dataobj), np.asarray(b_msk.dataobj))
    c_img, _, _ = render(phantom_map, 12, SMALL)
    assert not np.array_equal(np.asarray(a_img.dataobj), np.asarray(c_img.dataobj))
    zooms = np.sqrt((a_img.affine[:3, :3] ** 2).sum(axis=0))
    assert 1.4 <= a_par["spacing_mm"] <= 1.6
    assert sorted(zooms.round(6).tolist())[:2] == [round(a_par["spacing_mm"], 6)] * 2
    assert a_par["n_slices"] == min(a_img.shape)
    assert 250 <= a_par["matrix"] * a_par["spacing_mm"] <= 300.001


def test_render_anatomy_follows_the_affine_in_every_storage_order(phantom_map: LabelMap) -> None:
    seen = set()
    for seed in range(20, 26):
        img, msk, par = render(phantom_map, seed, SMALL)
        seen.add(par["orientation"])
        m = np.asarray(msk.dataobj)
        for right in (1, 3, 5, 7):
            if (m == right).sum() > 20 and (m == right + 1).sum() > 20:
                assert _world_x(img, m, right) > _world_x(img, m, right + 1), par["orientation"]
    assert len(seen) >= 3


def test_rendered_cases_are_fat_bright(phantom_map: LabelMap) -> None:
    """The contrast prior: muscle well below the brightest tissue (fat) of every case."""
    for seed in (31, 32, 33):
        img, msk, par = render(phantom_map, seed, dataclasses.replace(SMALL, ghost_probability=0))
        data, m = np.asarray(img.dataobj), np.asarray(msk.dataobj)
        assert np.median(data[m > 0]) < 0.6 * np.percentile(data, 99), par


def test_heldout_spec_lies_outside_every_training_range() -> None:
    for name in ("muscle_ratio", "spacing_mm", "thickness_mm", "fov_mm"):
        lo, hi = getattr(HELDOUT_SPEC, name)
        tlo, thi = getattr(TRAIN_SPEC, name)
        assert hi < tlo or lo > thi, name
    assert HELDOUT_SPEC.contrast != TRAIN_SPEC.contrast


def test_unsided_mask_and_spec_validation() -> None:
    assert unsided_mask(np.arange(10)).tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4, 0]
    with pytest.raises(ConfigError, match="contrast"):
        RenderSpec(contrast="stir")
    with pytest.raises(ConfigError, match="fov_mm"):
        RenderSpec(fov_mm=(300.0, 200.0))


def test_write_case_writes_once(tmp_path) -> None:
    job = CaseJob("c-01", "example", 4, str(tmp_path), SMALL)
    row = write_case(job)
    img = load_image(tmp_path / "c-01_T1w.nii.gz")
    msk = load_mask(tmp_path / "c-01_dseg.nii.gz")
    assert img.data.shape == msk.data.shape
    assert set(np.unique(msk.data).tolist()) <= {0, 1, 2, 3, 4}
    mtime = (tmp_path / "c-01_T1w.nii.gz").stat().st_mtime_ns
    assert write_case(job) == row
    assert (tmp_path / "c-01_T1w.nii.gz").stat().st_mtime_ns == mtime


def test_organs_lie_beside_psoas_and_never_replace_muscle() -> None:
    plain = phantom_labelmap(7, fov_mm=420.0, spacing_mm=2.0, n_slices=8)
    lm = phantom_labelmap(7, fov_mm=420.0, spacing_mm=2.0, n_slices=8, organs=True)
    c = lm.classes
    # muscles untouched
    np.testing.assert_array_equal(np.where(c <= 8, c, 0), np.where(plain.classes <= 8,
                                                                   plain.classes, 0))
    kidney = c == TISSUES["kidney"]
    assert kidney.any()
    img = nib.Nifti1Image(c, lm.affine())
    x_kid_right = _world_x(img, np.where(kidney & (np.arange(c.shape[0])[:, None, None]
                                                   < c.shape[0] / 2), 1, 0), 1)
    x_kid_left = _world_x(img, np.where(kidney & (np.arange(c.shape[0])[:, None, None]
                                                  >= c.shape[0] / 2), 1, 0), 1)
    # each kidney lateral to its psoas (right: larger world x; left: smaller)
    assert x_kid_right > _world_x(img, c, 5)
    assert x_kid_left < _world_x(img, c, 6)
    # without organs nothing is drawn, and the same seed gives the same anatomy otherwise
    assert not np.isin(plain.classes, [TISSUES[k] for k in ("kidney", "liver", "spleen")]).any()
