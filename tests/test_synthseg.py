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
    IGNORE,
    LABELMAP_DIR,
    TISSUES,
    TRAIN_SPEC,
    CaseJob,
    LabelMap,
    RenderSpec,
    derive_example_labelmap,
    derive_totalseg_labelmap,
    derive_totalseg_tissues,
    example_labelmap,
    phantom_labelmap,
    render,
    split_autochthon,
    template_labelmap,
    totalseg_labelmap,
    unsided_mask,
    upsample_classes,
    write_case,
)
from helpers.trainset import EXAMPLE_DIR

TOTALSEG = EXAMPLE_DIR.parents[2] / "shared" / "data" / "totalseg_mr_example"

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
    assert unsided_mask(np.arange(10)).tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5]
    assert IGNORE == 9
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


def _planted_totalseg_scan() -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """A 2 mm L-P-S scan with TotalSegmentator-style labels and planted unlabelled tissue.

    Body: an ellipse of fat (1000) in air; a vertebra (19) at the centre-back; autochthon right
    (47, toward -x in L-P-S axis 0) and left (46) behind it; an unlabelled muscle-dark blob
    (200) 10 mm lateral to the left autochthon; a kidney (2) far anterior; an unlabelled dark
    abdominal wall band (200) far from the spine.
    """
    sp = (2.0, 2.0, 4.0)
    n, m, k = 160, 120, 3
    u = (np.arange(n)[:, None] - n / 2) * sp[0]
    v = (np.arange(m)[None, :] - m / 2) * sp[1]
    img = np.zeros((n, m, k), np.float32)
    seg = np.zeros((n, m, k), np.int16)
    body = (u / 150) ** 2 + (v / 110) ** 2 <= 1
    img[body] = 1000.0
    wall = body & ((u / 130) ** 2 + (v / 90) ** 2 > 1) & ((u / 136) ** 2 + (v / 96) ** 2 <= 1)
    wall &= v < -40  # anterior only: far from the spine
    img[wall] = 200.0
    vert = (u / 20) ** 2 + ((v - 30) / 16) ** 2 <= 1
    seg[vert] = 19
    img[vert] = 500.0
    for lab, cx in ((47, -30.0), (46, 30.0)):  # right muscles toward -u (patient's right)
        auto = ((u - cx) / 18) ** 2 + ((v - 70) / 16) ** 2 <= 1
        seg[auto] = lab
        img[auto] = 250.0
    blob = ((u - 66) / 8) ** 2 + ((v - 66) / 8) ** 2 <= 1
    img[blob] = 200.0
    kid = ((u + 80) / 20) ** 2 + ((v + 10) / 14) ** 2 <= 1
    seg[kid] = 2
    img[kid] = 300.0
    for a in (img, seg):
        a[:, :, 1:] = a[:, :, :1]
    return img, seg, sp


def test_derive_totalseg_labelmap_keeps_unknown_muscle_unknown() -> None:
    img, seg, sp = _planted_totalseg_scan()
    c = derive_totalseg_labelmap(img, seg, sp, margin_mm=30.0)
    t = TISSUES
    assert c[0, 0, 0] == t["air"]
    assert (c[seg == 47] == t["autochthon_right"]).all()
    assert (c[seg == 46] == t["autochthon_left"]).all()
    assert (c[seg == 2] == t["kidney"]).all()
    vert = seg == 19
    assert set(np.unique(c[vert]).tolist()) == {t["marrow"], t["cortical_bone"]}
    # the planted blob beside the back muscles: unknown (could be quadratus lumborum)
    blob_centre = (round(66 / 2 + 80), round(66 / 2 + 60), 1)
    assert c[blob_centre] == t["unlabelled_muscle"]
    # the far abdominal wall: other muscle (background for training)
    wall = (img == 200.0) & (np.arange(120)[None, :, None] < 40)
    assert (c[wall] == t["other_muscle"]).mean() > 0.95
    # bright unlabelled tissue at the outline is subcutaneous fat, deeper fat is other fat
    assert c[80, 60 + 54, 1] == t["subcutaneous_fat"]
    assert c[80 + 30, 60 - 10, 1] == t["other_fat"]
    # training targets: autochthon and the blob unknown, the rest background
    render_target = unsided_mask(np.where(np.isin(c, (24, 25, 26)), IGNORE, 0))
    assert set(np.unique(render_target).tolist()) == {0, 5}
    with pytest.raises(ConfigError, match="autochthon"):
        derive_totalseg_labelmap(img, np.where(np.isin(seg, (46, 47)), 0, seg), sp)


def test_upsample_classes_keeps_classes_and_their_borders() -> None:
    c = np.zeros((10, 10, 2), np.uint8)
    c[2:6, 3:7] = 4
    c[6:8, 3:7] = 7
    up = upsample_classes(c, (3.0, 3.0, 1.0))
    assert up.shape == (30, 30, 2)
    assert set(np.unique(up).tolist()) == {0, 4, 7}
    # each class keeps its area (9 fine voxels per coarse voxel) within its border's rounding
    for value in (4, 7):
        coarse = int((c == value).sum()) * 9
        assert abs(int((up == value).sum()) - coarse) <= 0.15 * coarse, value
    # a fine voxel well inside a coarse one keeps its class
    assert up[3 * 3 + 1, 4 * 3 + 1, 0] == 4
    assert up[6 * 3 + 1, 4 * 3 + 1, 1] == 7


def test_split_autochthon_puts_multifidus_medial_with_an_unknown_band() -> None:
    t = TISSUES
    c = np.zeros((100, 20, 2), np.uint8)
    c[10:45, 5:15] = t["autochthon_right"]  # axis 0 toward the left: right side first
    c[55:90, 5:15] = t["autochthon_left"]
    out = split_autochthon(c, (1.0, 1.0, 3.0), multifidus_share=0.2, band_mm=4.0)
    for auto, mf, es, medial, lateral in ((t["autochthon_right"], 1, 3, 44, 10),
                                          (t["autochthon_left"], 2, 4, 55, 89)):
        side = c == auto
        assert set(np.unique(out[side]).tolist()) == {mf, es, auto}
        assert (out[medial, 5:15] == mf).all()
        assert (out[lateral, 5:15] == es).all()
        share = (out[side] == mf).mean()
        assert 0.2 - 2 / 35 - 0.01 <= share <= 0.2  # the band takes half its width from it
        assert 0.0 < (out[side] == auto).mean() <= 5 / 35 + 0.01  # the band: 4-5 of 35 columns
    # everything else untouched
    np.testing.assert_array_equal(out[c == 0], 0)


def test_totalseg_renderings_carry_back_muscles_psoas_and_unknown() -> None:
    lm = totalseg_labelmap()
    present = set(np.unique(lm.classes).tolist())
    assert {1, 2, 3, 4, 5, 6} <= present
    assert {TISSUES["autochthon_right"], TISSUES["autochthon_left"],
            TISSUES["unlabelled_muscle"]} <= present
    assert not {7, 8} & present  # TotalSegmentator labels no quadratus lumborum
    img, msk, par = render(lm, 5, SMALL)
    m = np.asarray(msk.dataobj)
    assert set(np.unique(m).tolist()) <= {0, 1, 2, 3, 4, 5, 6, IGNORE}
    assert (m == IGNORE).sum() > 100, par
    assert (np.isin(m, (3, 4))).sum() > 100, par
    # sides by the affine: right erector spinae at larger world x than the left
    assert _world_x(img, m, 3) > _world_x(img, m, 4), par
    # the unknown region is muscle-dark: well below the fat of the same case
    data = np.asarray(img.dataobj)
    assert np.median(data[m == IGNORE]) < 0.7 * np.percentile(data, 99), par
    # label maps without unknown muscle never produce the ignore value
    _, pm, _ = render(phantom_labelmap(3, fov_mm=420.0, spacing_mm=2.0, n_slices=8), 5, SMALL)
    assert IGNORE not in np.unique(np.asarray(pm.dataobj))


@pytest.mark.skipif(not TOTALSEG.is_dir(), reason="needs ../shared/data/totalseg_mr_example")
def test_shipped_totalseg_labelmap_matches_its_derivation() -> None:
    """data/labelmaps/totalseg_mr_tissues.nii.gz is what scripts/make_labelmaps.py derives."""
    fine, spacing = derive_totalseg_tissues(TOTALSEG / "mr.nii.gz",
                                            TOTALSEG / "mr_seg_total_mr.nii.gz")
    shipped = totalseg_labelmap()
    np.testing.assert_array_equal(fine, shipped.classes)
    assert shipped.spacing == spacing == (1.0, 1.0, 3.0)
    # sides: the right back muscles lie at larger world x (RAS+) than the left ones
    aff = nib.Nifti1Image(shipped.classes, shipped.affine())
    for right in (1, 3, 5, TISSUES["autochthon_right"]):
        left = right + 1
        assert _world_x(aff, shipped.classes, right) > _world_x(aff, shipped.classes, left)
    # erector spinae + multifidus + band is TotalSegmentator's autochthon (upsampled, unsplit)
    image = reorient(nib.load(TOTALSEG / "mr.nii.gz"), "LPS")
    seg = reorient(nib.load(TOTALSEG / "mr_seg_total_mr.nii.gz"), "LPS")
    unsplit = upsample_classes(
        derive_totalseg_labelmap(np.asarray(image.dataobj, dtype=np.float32),
                                 np.rint(np.asarray(seg.dataobj)).astype(np.int16),
                                 (3.0, 3.0, 3.0)), (3.0, 3.0, 1.0))
    assert not np.isin(unsplit, (1, 2, 3, 4)).any()
    back = np.isin(shipped.classes, (1, 2, 3, 4, TISSUES["autochthon_right"],
                                     TISSUES["autochthon_left"]))
    np.testing.assert_array_equal(back, np.isin(unsplit, (TISSUES["autochthon_right"],
                                                          TISSUES["autochthon_left"])))
