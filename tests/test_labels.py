"""Label files, and left/right by anatomy in world coordinates (split_sides, lateralization).

The split is checked on the real example mask (data/example) with its sides stripped: the sides
must come back for >= 99 % of voxels, also with the anatomy off-centre, one side atrophic, the
spine rotated, and the volume stored LPS, RAS or LAS.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from nibabel import orientations as nio
from scipy import ndimage as ndi

from helpers.errors import LabelError
from helpers.labels import (
    Label,
    LabelTable,
    estimate_midlines,
    lateralization_table,
    load_labels,
    parse_labels,
    split_sides,
)

# --------------------------------------------------------------------------------------------
# Label files
# --------------------------------------------------------------------------------------------


def test_example_label_file_loads(example_dir):
    table = load_labels(example_dir / "labels.json")
    assert table.values == (1, 2, 3, 4, 5, 6, 7, 8)
    assert table.muscles == ("multifidus", "erector_spinae", "psoas_major", "quadratus_lumborum")
    assert table.is_sided()
    assert table.by_value(6) == Label(6, "psoas_major", "left")


@pytest.mark.parametrize(
    ("doc", "fragment"),
    [
        ([], '"labels" list'),
        ({"labels": [{"value": 0, "muscle": "x", "side": None}]}, "positive integer"),
        ({"labels": [{"value": True, "muscle": "x", "side": None}]}, "positive integer"),
        ({"labels": [{"value": 1, "muscle": " ", "side": None}]}, "non-empty"),
        ({"labels": [{"value": 1, "muscle": "x", "side": "up"}]}, "'left', 'right' or null"),
        ({"labels": []}, "no labels"),
        ({"labels": [{"value": 1, "muscle": "a", "side": None},
                     {"value": 1, "muscle": "b", "side": None}]}, "declared twice"),
        ({"labels": [{"value": 1, "muscle": "a", "side": "left"},
                     {"value": 2, "muscle": "a", "side": "left"}]}, "muscle/side declared twice"),
    ],
)
def test_bad_label_documents_name_the_problem(doc, fragment):
    with pytest.raises(LabelError, match=fragment):
        parse_labels(doc, "bad.json")


def test_label_file_missing_or_not_json(tmp_path):
    with pytest.raises(LabelError, match="not found") as err:
        load_labels(tmp_path / "nope.json")
    assert "nope.json" in str(err.value)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(LabelError, match="not valid JSON"):
        load_labels(bad)


def test_check_values_names_the_mask_and_unknown_values(example_dir):
    table = load_labels(example_dir / "labels.json")
    table.check_values([0, 1, 8])
    with pytest.raises(LabelError, match=r"\[9\]") as err:
        table.check_values([0, 1, 9], "m.nii.gz")
    assert "m.nii.gz" in str(err.value)


# --------------------------------------------------------------------------------------------
# Fixtures: the example with its sides stripped
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def example(example_dir):
    img = nib.load(example_dir / "sub-0001_T1w_dseg.nii.gz")
    mask = np.asarray(img.dataobj).astype(np.int16)
    return mask, img.affine.copy(), load_labels(example_dir / "labels.json")


def _strip(mask: np.ndarray, labels: LabelTable) -> tuple[np.ndarray, LabelTable]:
    """Merge each right/left pair into one unsided label (values 1.. in muscle order)."""
    muscles = labels.muscles
    lut = np.zeros(int(mask.max()) + 1, np.int16)
    for lab in labels.labels:
        lut[lab.value] = muscles.index(lab.muscle) + 1
    table = LabelTable(tuple(Label(k + 1, m, None) for k, m in enumerate(muscles)))
    return lut[mask], table


def _agreement(out, table, truth, truth_labels) -> float:
    """Share of muscle voxels whose recovered (muscle, side) equals the original."""
    ref = {(lab.muscle, lab.side): lab.value for lab in truth_labels.labels}
    lut = np.zeros(max(table.values) + 1, np.int16)
    for lab in table.labels:
        lut[lab.value] = ref[(lab.muscle, lab.side)]
    sel = truth > 0
    return float(np.mean(lut[np.asarray(out)][sel] == truth[sel]))


def _inplane(axis_of_slices: int = 2) -> np.ndarray:
    st = np.zeros((3, 3, 3), bool)
    idx = [slice(None)] * 3
    idx[axis_of_slices] = 1
    st[tuple(idx)] = True
    return st


# --------------------------------------------------------------------------------------------
# split_sides
# --------------------------------------------------------------------------------------------


def test_split_recovers_example_sides(example):
    mask, affine, labels = example
    stripped, unsided = _strip(mask, labels)
    out, table = split_sides(stripped, affine, unsided)
    assert table.is_sided()
    # all-unsided input gets the MuscleMap numbering of data/example/labels.json
    assert table.labels == labels.labels
    assert _agreement(out, table, mask, labels) >= 0.99
    assert out.shape == mask.shape


def test_split_recovers_sides_off_centre(example):
    """Anatomy 40 voxels (37.5 mm) off the image centre: pad one side, keep world positions."""
    mask, affine, labels = example
    pad = 80
    shifted = np.pad(mask, ((pad, 0), (0, 0), (0, 0)))
    aff = affine.copy()
    aff[:3, 3] -= aff[:3, 0] * pad  # same world position for every original voxel
    # and move the anatomy in the world too (the image centre is now 40 voxels away)
    aff[:3, 3] += np.array([25.0, -10.0, 0.0])
    stripped, unsided = _strip(shifted, labels)
    out, table = split_sides(stripped, aff, unsided)
    assert _agreement(out, table, shifted, labels) >= 0.99
    # and the image centre would have been wrong for many voxels
    centre_x = (aff @ np.array([(shifted.shape[0] - 1) / 2, 0, 0, 1]))[0]
    ii = np.nonzero(shifted)
    x = (aff[:3, :3] @ np.vstack(ii))[0] + aff[0, 3]
    naive_right = x > centre_x
    is_right = np.isin(shifted[ii], [1, 3, 5, 7])
    assert np.mean(naive_right == is_right) < 0.9


def test_split_recovers_sides_with_one_side_atrophic(example):
    """Right muscles eroded by 5 voxels in-plane (about 60 % of their area gone)."""
    mask, affine, labels = example
    atrophic = mask.copy()
    for value in (1, 3, 5, 7):
        keep = ndi.binary_erosion(mask == value, structure=_inplane(), iterations=5)
        atrophic[(mask == value) & ~keep] = 0
    right = np.isin(atrophic, [1, 3, 5, 7]).sum() / np.isin(mask, [1, 3, 5, 7]).sum()
    assert right < 0.5  # heavily atrophic indeed
    stripped, unsided = _strip(atrophic, labels)
    out, table = split_sides(stripped, affine, unsided)
    assert _agreement(out, table, atrophic, labels) >= 0.99


def test_split_recovers_sides_atrophic_and_off_centre(example):
    mask, affine, labels = example
    atrophic = mask.copy()
    for value in (2, 4, 6, 8):  # left side this time
        keep = ndi.binary_erosion(mask == value, structure=_inplane(), iterations=4)
        atrophic[(mask == value) & ~keep] = 0
    shifted = np.pad(atrophic, ((0, 90), (0, 0), (0, 0)))
    stripped, unsided = _strip(shifted, labels)
    out, table = split_sides(stripped, affine, unsided)
    assert _agreement(out, table, shifted, labels) >= 0.99


def test_split_recovers_sides_with_rotated_spine(example):
    """Axial rotation of 12 degrees (as in scoliosis): the midline is tilted."""
    mask, affine, labels = example
    rotated = ndi.rotate(mask, 12.0, axes=(0, 1), order=0, reshape=False)
    stripped, unsided = _strip(rotated, labels)
    out, table = split_sides(stripped, affine, unsided)
    assert _agreement(out, table, rotated, labels) >= 0.99


@pytest.mark.parametrize("codes", [("R", "A", "S"), ("L", "P", "S"), ("L", "A", "S"),
                                   ("P", "L", "I")])
def test_split_recovers_sides_in_any_storage_order(example, codes):
    mask, affine, labels = example
    transform = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt(codes))
    stored = nio.apply_orientation(mask, transform)
    aff = affine @ nio.inv_ornt_aff(transform, mask.shape)
    assert nib.aff2axcodes(aff) == codes
    stripped, unsided = _strip(stored, labels)
    out, table = split_sides(stripped, aff, unsided)
    assert _agreement(out, table, stored, labels) >= 0.99


def test_split_slice_with_only_one_side(example):
    """Slices where one side is missing take their midline from the other slices."""
    mask, affine, labels = example
    one_side = mask.copy()
    for k in (5, 6, 7):
        sl = one_side[:, :, k]
        sl[np.isin(sl, [2, 4, 6, 8])] = 0  # left side absent in three slices
    stripped, unsided = _strip(one_side, labels)
    out, table = split_sides(stripped, affine, unsided)
    assert _agreement(out, table, one_side, labels) >= 0.99
    rec = out[:, :, 5]
    right_values = [lab.value for lab in table.labels if lab.side == "right"]
    assert np.isin(rec[rec > 0], right_values).all()


def test_split_mixed_table_keeps_sided_labels_and_numbers_new_ones(example):
    mask, affine, labels = example
    mixed = mask.copy()
    mixed[mixed == 2] = 1  # multifidus unsided, the others stay sided
    table = LabelTable(
        (Label(1, "multifidus", None), *[lab for lab in labels.labels if lab.value > 2])
    )
    out, new = split_sides(mixed, affine, table)
    assert new.by_value(1) == Label(1, "multifidus", "right")
    assert new.by_value(9) == Label(9, "multifidus", "left")
    for lab in labels.labels[2:]:
        assert new.by_value(lab.value) == lab
        assert np.array_equal(out == lab.value, mask == lab.value)
    left = (mask == 2).sum()
    assert np.mean((out == 9)[mask == 2]) >= 0.99
    assert (out == 9).sum() == pytest.approx(left, rel=0.01)


def test_split_sided_input_is_unchanged(example):
    mask, affine, labels = example
    out, table = split_sides(mask, affine, labels)
    assert table == labels
    assert np.array_equal(out, mask)


def test_split_rejects_undeclared_values_and_clashes(example):
    mask, affine, labels = example
    stripped, unsided = _strip(mask, labels)
    short = LabelTable(unsided.labels[:3])
    with pytest.raises(LabelError, match=r"\[4\]"):
        split_sides(stripped, affine, short)
    clash = LabelTable((Label(1, "multifidus", None), Label(2, "multifidus", "left")))
    with pytest.raises(LabelError, match="both sided and unsided"):
        split_sides(np.zeros((4, 4, 2), np.int16), np.eye(4), clash)


def test_split_two_blobs_synthetic_with_known_answer():
    """Tiny hand-made case: two blobs, the right one (larger world x) small; LPS and RAS."""
    data = np.zeros((40, 20, 3), np.int16)
    data[5:15, 5:15, :] = 1  # array-low i
    data[27:30, 8:11, :] = 1  # array-high i, atrophic
    table = LabelTable((Label(1, "multifidus", None),))
    lps = np.diag([-1.0, -1.0, 3.0, 1.0])  # i increases to the patient's left
    out, _new = split_sides(data, lps, table)
    assert set(np.unique(out[5:15, 5:15])) == {1}  # low i = patient's right = value 1
    assert set(np.unique(out[27:30, 8:11])) == {2}
    ras = np.diag([1.0, 1.0, 3.0, 1.0])  # now low i is the patient's left
    out, _ = split_sides(data, ras, table)
    assert set(np.unique(out[5:15, 5:15])) == {2}
    assert set(np.unique(out[27:30, 8:11])) == {1}


# --------------------------------------------------------------------------------------------
# Midline and lateralization
# --------------------------------------------------------------------------------------------


def test_midline_follows_a_world_shift(example):
    mask, affine, labels = example
    base = estimate_midlines(mask, affine, labels)
    moved = affine.copy()
    moved[0, 3] += 30.0
    shifted = estimate_midlines(mask, moved, labels)
    assert np.allclose(shifted["x0_mm"] - base["x0_mm"], 30.0, atol=1e-6)
    assert (base["source"] == "pairs").all()


def test_lateralization_table_ok_and_detects_swap(example):
    mask, affine, labels = example
    table = lateralization_table(mask, affine, labels)
    assert table["ok"].all()
    right = table[table["side"] == "right"]
    assert (right["offset_x_mm"] > 0).all()
    assert (right["offset_x_mm"] > right["twin_offset_x_mm"]).all()
    # the README's check: multifidus right centroid at larger world x than left
    mf = table[table["muscle"] == "multifidus"].set_index("side")
    assert mf.loc["right", "centroid_x_mm"] > mf.loc["left", "centroid_x_mm"]
    swapped = mask.copy()
    swapped[mask == 3], swapped[mask == 4] = 4, 3
    bad = lateralization_table(swapped, affine, labels).set_index("value")
    assert not bad.loc[3, "ok"]
    assert not bad.loc[4, "ok"]
    assert bad.loc[[1, 2, 5, 6, 7, 8], "ok"].all()
    # independent check of the centroid column with plain nibabel
    ii = np.nonzero(mask == 1)
    x = nib.affines.apply_affine(affine, np.column_stack(ii))[:, 0]
    assert table.set_index("value").loc[1, "centroid_x_mm"] == pytest.approx(x.mean())


@pytest.mark.parametrize("codes", [("R", "A", "S"), ("L", "A", "S")])
def test_lateralization_same_in_other_storage(example, codes):
    mask, affine, labels = example
    transform = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt(codes))
    stored = nio.apply_orientation(mask, transform)
    aff = affine @ nio.inv_ornt_aff(transform, mask.shape)
    a = lateralization_table(mask, affine, labels)
    b = lateralization_table(stored, aff, labels)
    assert np.allclose(a["offset_x_mm"], b["offset_x_mm"], atol=1e-6)
    assert b["ok"].all()


def test_lateralization_absent_label_is_reported(example):
    mask, affine, labels = example
    gone = mask.copy()
    gone[gone == 7] = 0
    table = lateralization_table(gone, affine, labels).set_index("value")
    assert table.loc[7, "note"] == "absent"
    assert table.loc[7, "n_voxels"] == 0
    assert table["ok"].all()

