"""QC checks against planted truth: lateralization, truncation, fragmentation, empty labels,
cohort outliers, Dice, the decisions file and the overlay mosaic."""

from __future__ import annotations

import io
import math

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread
from nibabel.orientations import (
    apply_orientation,
    axcodes2ornt,
    inv_ornt_aff,
    io_orientation,
    ornt_transform,
)
from scipy.stats import norm

from helpers import overlap, qc, synthetic
from helpers.errors import ConfigError, GeometryMismatchError, InputFileError
from helpers.labels import Label, LabelTable
from helpers.nifti import Volume

LABELS = LabelTable(
    (
        Label(1, "multifidus", "right"),
        Label(2, "multifidus", "left"),
        Label(3, "psoas_major", "right"),
        Label(4, "psoas_major", "left"),
    )
)
SHAPE = (40, 30, 6)
ZOOM = (2.0, 2.0, 5.0)


# --------------------------------------------------------------------------------------------
# Tiny anatomy built here: stored L-P-S (like the example), re-stored in any orientation
# --------------------------------------------------------------------------------------------


def _lps_affine() -> np.ndarray:
    """Array axis 0 runs to the patient's left, 1 posterior, 2 superior; centre at world 0."""
    aff = np.diag([-ZOOM[0], -ZOOM[1], ZOOM[2], 1.0])
    aff[:3, 3] = [(SHAPE[0] - 1) / 2 * ZOOM[0], (SHAPE[1] - 1) / 2 * ZOOM[1], 0.0]
    return aff


def _anatomy() -> np.ndarray:
    """Right labels at small i (patient's right in L-P-S storage), left twins mirrored.

    World x of voxel i is 39 - 2 i: right multifidus i 10-14 (centroid x = +15 mm), left
    multifidus i 25-29 (x = -15 mm); psoas right i 4-8 (x = +27), left i 31-35 (x = -27).
    """
    m = np.zeros(SHAPE, dtype=np.int16)
    m[10:15, 18:24, 1:5] = 1
    m[25:30, 18:24, 1:5] = 2
    m[4:9, 6:12, 1:5] = 3
    m[31:36, 6:12, 1:5] = 4
    return m


def _store(data: np.ndarray, affine: np.ndarray, codes: str) -> tuple[np.ndarray, np.ndarray]:
    """The same anatomy re-stored with array axes ``codes`` (e.g. "RAS"); affine adjusted."""
    t = ornt_transform(io_orientation(affine), axcodes2ornt(tuple(codes)))
    return apply_orientation(data, t), affine @ inv_ornt_aff(t, data.shape)


def _volume(data: np.ndarray, affine: np.ndarray) -> Volume:
    return Volume(np.ascontiguousarray(data), affine)


def _swap_sides(data: np.ndarray) -> np.ndarray:
    lut = np.array([0, 2, 1, 4, 3], dtype=np.int16)
    return lut[data]


def _image_for(mask: np.ndarray) -> np.ndarray:
    """A T2-like image for the tiny anatomy: air (about 5) around a body of bright fat (600)
    holding dark muscles (100), so the anatomical checks see a plausible scan."""
    rng = np.random.default_rng(0)
    image = np.abs(rng.normal(5, 2, mask.shape))
    body = np.zeros(mask.shape, dtype=bool)
    body[1:-1, 2:-2, :] = True
    image[body] = rng.normal(600, 20, int(body.sum()))
    image[mask > 0] = rng.normal(100, 10, int((mask > 0).sum()))
    return image.astype(np.float32)


def _rows(table: pd.DataFrame, check: str, **where: str) -> pd.DataFrame:
    sel = table[table["check"] == check]
    for key, value in where.items():
        sel = sel[sel[key] == value]
    return sel


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


def test_settings_from_mapping_sets_values_and_names_bad_keys():
    s = qc.QCSettings.from_mapping(
        {"min_dice": 0.7, "robust_z_threshold": 3, "z_edge_status": "pass"}
    )
    assert (s.min_dice, s.robust_z_threshold, s.z_edge_status) == (0.7, 3.0, "pass")
    assert qc.QCSettings.from_mapping(None) == qc.QCSettings()
    with pytest.raises(ConfigError, match=r"qc\.min_dise: unknown key"):
        qc.QCSettings.from_mapping({"min_dise": 0.7})
    with pytest.raises(ConfigError, match=r"qc\.min_dice: 1\.5 is outside"):
        qc.QCSettings.from_mapping({"min_dice": 1.5})
    with pytest.raises(ConfigError, match=r"study\.qc\.connectivity: expected a number"):
        qc.QCSettings.from_mapping({"connectivity": "eight"}, where="study.qc")
    with pytest.raises(ConfigError, match=r"qc\.fragmentation_min_voxels: expected a whole"):
        qc.QCSettings.from_mapping({"fragmentation_min_voxels": 2.5})
    with pytest.raises(ConfigError, match=r"qc\.empty_label_status: 'maybe' is not one of"):
        qc.QCSettings.from_mapping({"empty_label_status": "maybe"})
    with pytest.raises(ConfigError, match=r"qc\.min_dice: expected a number, got True"):
        qc.QCSettings.from_mapping({"min_dice": True})
    with pytest.raises(ConfigError, match="expected a mapping"):
        qc.QCSettings.from_mapping(["min_dice"])  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Lateralization (world coordinates)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("codes", ["LPS", "RAS", "PLS", "RPI"])
def test_lateralization_passes_correct_and_fails_swapped_in_any_storage(codes):
    data, affine = _store(_anatomy(), _lps_affine(), codes)
    assert "".join(nib.aff2axcodes(affine)) == codes
    good = qc.lateralization_checks("s1", data, affine, LABELS)
    assert set(good["status"]) == {"pass"}
    # planted centroids: multifidus x = +15 / -15 mm, psoas +27 / -27 mm
    sep = good.set_index("muscle")["value"]
    assert sep["multifidus"] == pytest.approx(30.0)
    assert sep["psoas_major"] == pytest.approx(54.0)

    bad = qc.lateralization_checks("s1", _swap_sides(data), affine, LABELS)
    assert set(bad["status"]) == {"fail"}
    assert bad.set_index("muscle")["value"]["multifidus"] == pytest.approx(-30.0)
    assert "labels swapped" in bad["reason"].iloc[0]


def test_lateralization_per_level_and_absent_twin():
    data = _anatomy()
    # the swap only on slices 3-4 (level "L4"): whole stack still right on average? no: per level
    data[..., 3:5] = _swap_sides(data[..., 3:5])
    levels = pd.DataFrame({"slice": [0, 1, 2, 3, 4, 5], "level": ["L5"] * 3 + ["L4"] * 3})
    out = qc.lateralization_checks("s1", data, _lps_affine(), LABELS, levels=levels)
    status = out.set_index(["level", "muscle"])["status"]
    assert status[("L5", "multifidus")] == "pass"
    assert status[("L4", "multifidus")] == "fail"
    assert set(out["level"]) == {"all", "L5", "L4"}

    data = _anatomy()
    data[data == 2] = 0
    out = qc.lateralization_checks("s1", data, _lps_affine(), LABELS)
    row = out[out["muscle"] == "multifidus"].iloc[0]
    assert row["status"] == "pass"
    assert math.isnan(row["value"])
    assert "not checked: left multifidus absent" in row["reason"]


@pytest.mark.parametrize("codes", ["LPS", "RAS"])
def test_midline_check_catches_a_label_on_the_wrong_side_without_its_twin(codes):
    data = _anatomy()
    data[data == 2] = 0
    data[data == 1] = 0
    data[25:30, 18:24, 1:5] = 1  # right multifidus drawn on the patient's left, twin absent
    data, affine = _store(data, _lps_affine(), codes)
    out = qc.check_subject("s1", _volume(data, affine), LABELS)
    mid = _rows(out, "midline_side").set_index(["muscle", "side"])
    # midline from the psoas pair: world x = 0
    assert mid.loc[("multifidus", "right"), "status"] == "fail"
    assert mid.loc[("multifidus", "right"), "value"] == pytest.approx(-15.0)
    assert "wrong side of midline" in mid.loc[("multifidus", "right"), "reason"]
    assert mid.loc[("psoas_major", "right"), "status"] == "pass"
    assert mid.loc[("psoas_major", "right"), "value"] == pytest.approx(27.0)
    assert ("multifidus", "left") not in mid.index  # absent: reported by empty_label instead
    # the twin comparison cannot see it (no twin)
    assert _rows(out, "lateralization", muscle="multifidus")["status"].iloc[0] == "pass"


def test_world_centroids_follow_the_affine_not_array_order():
    for codes in ("LPS", "RAS"):
        data, affine = _store(_anatomy(), _lps_affine(), codes)
        c = qc.world_centroids(data, affine, LABELS).set_index("value")
        assert c.loc[1, "x_mm"] == pytest.approx(15.0)
        assert c.loc[2, "x_mm"] == pytest.approx(-15.0)
        assert c.loc[1, "n_voxels"] == 5 * 6 * 4


def test_lateralization_on_synthetic_phantoms_lps_and_ras():
    for orientation in ("LPS", "RAS"):
        ph = synthetic.make_phantom("syn-lat", template="small", seed=3, orientation=orientation)
        mask = np.asarray(ph.mask.dataobj).astype(np.int16)
        ok = qc.lateralization_checks("syn-lat", mask, ph.mask.affine, ph.labels, levels=ph.levels)
        assert set(ok["status"]) == {"pass"}, ok
        twin = {
            lab.value: next(
                t.value for t in ph.labels.labels if t.muscle == lab.muscle and t.side != lab.side
            )
            for lab in ph.labels.labels
        }
        lut = np.arange(256, dtype=np.int16)
        for a, b in twin.items():
            lut[a] = b
        swapped = qc.lateralization_checks("syn-lat", lut[mask], ph.mask.affine, ph.labels)
        assert set(swapped["status"]) == {"fail"}, swapped
        assert len(swapped) == len(ph.labels.muscles)
        mid_ok = qc.midline_checks("syn-lat", mask, ph.mask.affine, ph.labels)
        assert set(mid_ok["status"]) == {"pass"}
        mid_bad = qc.midline_checks("syn-lat", lut[mask], ph.mask.affine, ph.labels)
        assert set(mid_bad["status"]) == {"fail"}
        assert len(mid_bad) == len(ph.labels.labels)


# --------------------------------------------------------------------------------------------
# Coverage, truncation, fragmentation, empty labels
# --------------------------------------------------------------------------------------------


def test_coverage_table_planted_spans():
    data = _anatomy()
    data[0:3, 18:24, 2] = 1  # right multifidus reaches the in-plane border on slice 2
    t = qc.coverage_table(data, LABELS, axis=2).set_index("value")
    assert t.loc[2, "slices"] == [1, 2, 3, 4]
    assert (t.loc[2, "first_slice"], t.loc[2, "last_slice"]) == (1, 4)
    assert not t.loc[2, "touches_z_edge"]
    assert t.loc[1, "border_voxels"] == 6  # i = 0 row, j 18-23
    assert t.loc[1, "border_slices"] == {2: 6}
    assert t.loc[2, "border_voxels"] == 0


def test_truncation_at_field_of_view_edges_is_flagged():
    data = _anatomy()
    data[35:40, 6:12, 1:5] = 4  # left psoas runs into the in-plane edge (i = 39) on slices 1-4
    data[10:15, 18:24, 5] = 1  # right multifidus reaches the last slice
    out = qc.check_subject("s1", _volume(data, _lps_affine()), LABELS)
    inplane = _rows(out, "truncation_inplane", muscle="psoas_major", side="left").iloc[0]
    assert inplane["status"] == "flag"
    assert inplane["value"] == 6 * 4  # j 6-11 on the border row i = 39, four slices
    assert "slices 1-4" in inplane["reason"]
    assert set(_rows(out, "truncation_inplane", side="right")["status"]) == {"pass"}

    z = _rows(out, "truncation_z").set_index(["muscle", "side"])
    assert z.loc[("multifidus", "right"), "status"] == "flag"
    assert "last slice" in z.loc[("multifidus", "right"), "reason"]
    assert z.loc[("multifidus", "left"), "status"] == "pass"

    relaxed = qc.check_subject(
        "s1",
        _volume(data, _lps_affine()),
        LABELS,
        settings=qc.QCSettings(z_edge_status="pass", max_border_voxels=24),
    )
    assert set(_rows(relaxed, "truncation_z")["status"]) == {"pass"}
    assert set(_rows(relaxed, "truncation_inplane")["status"]) == {"pass"}


def test_fragmented_label_is_flagged_with_planted_fraction():
    data = _anatomy()
    data[10:15, 18:24, 2] = 0
    data[10:15, 18:21, 2] = 1  # 15 voxels
    data[10:15, 23:24, 2] = 1  # 5 voxels, separated by an empty row: largest = 15 / 20
    comps = qc.component_table(data, LABELS, axis=2)
    row = comps[(comps["value"] == 1) & (comps["slice"] == 2)].iloc[0]
    assert (row["n_components"], row["largest_fraction"]) == (2, 0.75)

    out = qc.check_subject(
        "s1",
        _volume(data, _lps_affine()),
        LABELS,
        settings=qc.QCSettings(fragmentation_min_voxels=10, tip_slices=0),
    )
    frag = _rows(out, "fragmentation").set_index(["muscle", "side"])
    assert frag.loc[("multifidus", "right"), "status"] == "flag"
    assert frag.loc[("multifidus", "right"), "value"] == pytest.approx(0.75)
    assert "slice 2" in frag.loc[("multifidus", "right"), "reason"]
    assert frag.loc[("multifidus", "left"), "status"] == "pass"
    assert frag.loc[("multifidus", "left"), "value"] == 1.0

    # the same split judged 'not fragmented' when the threshold is lowered below 0.75
    lenient = qc.check_subject(
        "s1",
        _volume(data, _lps_affine()),
        LABELS,
        settings=qc.QCSettings(
            min_largest_component_fraction=0.7, fragmentation_min_voxels=10, tip_slices=0
        ),
    )
    assert set(_rows(lenient, "fragmentation")["status"]) == {"pass"}

    # by default the 2 end slices of a label's span (its tips) are not judged: the label spans
    # slices 1-4, so slice 2 is a tip slice and the split is recorded but not flagged
    tips = qc.check_subject(
        "s1", _volume(data, _lps_affine()), LABELS, settings=qc.QCSettings(fragmentation_min_voxels=10)
    )
    tip_rows = _rows(tips, "fragmentation", muscle="multifidus", side="right")
    assert tip_rows["status"].tolist() == ["pass"]
    assert "tips" in tip_rows["reason"].iloc[0]


def test_fragmentation_connectivity_and_small_slices():
    m = np.zeros((4, 4, 1), dtype=np.int16)
    m[0, 0, 0] = m[1, 1, 0] = 1  # diagonal neighbours
    lab = LabelTable((Label(1, "mf", "right"),))
    assert qc.component_table(m, lab, 2, connectivity=2)["n_components"].iloc[0] == 1
    assert qc.component_table(m, lab, 2, connectivity=1)["n_components"].iloc[0] == 2
    # a label with only 2 voxels per slice is below fragmentation_min_voxels: not judged
    out = qc.check_subject("s", _volume(m, np.eye(4)), lab, settings=qc.QCSettings(connectivity=1))
    frag = _rows(out, "fragmentation").iloc[0]
    assert frag["status"] == "pass"
    assert math.isnan(frag["value"])
    assert "not judged" in frag["reason"]


def test_empty_declared_label_fails_and_a_level_gap_is_flagged():
    data = _anatomy()  # labels on slices 1-4
    data[data == 4] = 0  # left psoas declared but absent
    data[..., 2][data[..., 2] == 2] = 0  # left multifidus skips slice 2 = level L4 (a gap)
    data[..., 1][data[..., 1] == 1] = 0  # right multifidus starts only at L4 (end of span)
    # levels listed out of slice order on purpose; slice 4 belongs to no level
    levels = pd.DataFrame({"slice": [3, 0, 1, 2], "level": ["L3", "L5", "L5", "L4"]})
    out = qc.check_subject("s1", _volume(data, _lps_affine()), LABELS, levels=levels)
    empty = _rows(out, "empty_label").set_index(["muscle", "side"])
    assert empty.loc[("psoas_major", "left"), "status"] == "fail"
    assert empty.loc[("psoas_major", "left"), "value"] == 0
    assert "declared but absent" in empty.loc[("psoas_major", "left"), "reason"]
    assert empty.loc[("psoas_major", "right"), "status"] == "pass"
    assert empty.loc[("psoas_major", "right"), "value"] == 5 * 6 * 4

    left = _rows(out, "level_coverage", muscle="multifidus", side="left").set_index("level")
    assert left.loc["L4", "status"] == "flag"
    assert "present above and below" in left.loc["L4", "reason"]
    assert left.loc["L5", "status"] == left.loc["L3", "status"] == "pass"
    assert left.loc["L5", "value"] == 1  # slice 1 of slices 0-1
    right = _rows(out, "level_coverage", muscle="multifidus", side="right").set_index("level")
    assert right.loc["L5", "status"] == "pass"
    assert right.loc["L5", "value"] == 0
    assert "end of its span" in right.loc["L5", "reason"]
    # slice 4 has labels but no level: reported under "unassigned"
    assert "unassigned" in set(_rows(out, "fragmentation")["level"])
    cov = _rows(out, "coverage", muscle="multifidus", side="left").iloc[0]
    assert cov["value"] == 3
    assert cov["reason"] == "slices 1, 3-4 of 0-5 (levels L5, L3)"

    soft = qc.check_subject(
        "s1",
        _volume(data, _lps_affine()),
        LABELS,
        settings=qc.QCSettings(empty_label_status="flag"),
    )
    assert _rows(soft, "empty_label", muscle="psoas_major", side="left")["status"].iloc[0] == "flag"


def test_undeclared_values_and_bad_level_tables():
    data = _anatomy()
    data[20, 20, 2] = 9
    out = qc.check_subject("s1", _volume(data, _lps_affine()), LABELS)
    row = _rows(out, "undeclared_label").iloc[0]
    assert (row["status"], row["value"]) == ("fail", 1)
    assert "[9]" in row["reason"]
    with pytest.raises(InputFileError, match=r"<levels of s1>: slice indices \[6\] lie outside"):
        qc.check_subject(
            "s1",
            _volume(_anatomy(), _lps_affine()),
            LABELS,
            levels=pd.DataFrame({"slice": [6], "level": ["L4"]}),
        )
    with pytest.raises(InputFileError, match="columns 'slice' and 'level'"):
        qc.check_subject(
            "s1", _volume(_anatomy(), _lps_affine()), LABELS, levels=pd.DataFrame({"z": [1]})
        )


def test_qc_rows_have_the_documented_columns_and_known_checks():
    out = qc.check_subject(
        "s1", _volume(_anatomy(), _lps_affine()), LABELS, manual=_volume(_anatomy(), _lps_affine())
    )
    assert tuple(out.columns) == qc.QC_COLUMNS
    assert set(out["check"]) <= set(qc.CHECKS)
    assert set(out["status"]) <= set(qc.STATUSES)
    # the clean tiny anatomy passes everything but the physiological area range: its
    # multifidus is 5 x 6 voxels of 2 x 2 mm = 120 mm2 per slice, below 150 mm2 (a flag, not a
    # fail: within the factor 2 of csa_fail_factor); its psoas (120 mm2) is within 80-3500
    area = out[out["check"] == "csa_range"].set_index(["muscle", "side"])
    assert area["value"].to_dict() == pytest.approx(
        {(m, s): 120.0 for m in ("multifidus", "psoas_major") for s in ("right", "left")}
    )
    assert set(area.loc["multifidus", "status"]) == {"flag"}
    assert set(area.loc["psoas_major", "status"]) == {"pass"}
    assert set(out.loc[out["check"] != "csa_range", "status"]) == {"pass"}


# --------------------------------------------------------------------------------------------
# Dice
# --------------------------------------------------------------------------------------------


def test_dice_on_tiny_arrays_equals_hand_computation():
    a = np.array([[1, 1, 0], [0, 1, 0]], dtype=bool)  # |A| = 3
    b = np.array([[0, 1, 1], [0, 1, 1]], dtype=bool)  # |B| = 4, |A n B| = 2
    assert overlap.dice(a, b) == pytest.approx(2 * 2 / 7)
    assert overlap.dice(a, a) == 1.0
    assert overlap.dice(a, ~a) == 0.0
    assert math.isnan(overlap.dice(np.zeros(4, bool), np.zeros(4, bool)))
    with pytest.raises(ValueError, match="shapes differ"):
        overlap.dice(a, b.ravel())

    auto = np.array([[1, 1, 2, 0]])
    manual = np.array([[1, 0, 2, 2]])
    t = qc.dice_table(
        auto,
        manual,
        LabelTable((Label(1, "a", "right"), Label(2, "a", "left"), Label(3, "b", None))),
    )
    d = t.set_index("value")
    assert d.loc[1, "dice"] == pytest.approx(2 * 1 / 3)  # |A|=2, |B|=1, overlap 1
    assert d.loc[2, "dice"] == pytest.approx(2 * 1 / 3)  # |A|=1, |B|=2, overlap 1
    assert math.isnan(d.loc[3, "dice"])
    assert d.loc[3, "note"] == "label absent in both masks"


def test_dice_rows_in_subject_qc_flag_poor_overlap():
    auto = _anatomy()
    manual = auto.copy()
    manual[10:15, 18:21, :] = 0  # manual right multifidus is half the automatic one
    out = qc.check_subject(
        "s1", _volume(auto, _lps_affine()), LABELS, manual=_volume(manual, _lps_affine())
    )
    d = _rows(out, "dice", level="all").set_index(["muscle", "side"])
    # |A| = 120, |B| = 60, overlap 60 -> 2 * 60 / 180
    assert d.loc[("multifidus", "right"), "value"] == pytest.approx(2 / 3)
    assert d.loc[("multifidus", "right"), "status"] == "flag"
    assert d.loc[("multifidus", "left"), "value"] == 1.0
    assert d.loc[("multifidus", "left"), "status"] == "pass"
    with pytest.raises(GeometryMismatchError):
        qc.check_subject(
            "s1",
            _volume(auto, _lps_affine()),
            LABELS,
            manual=_volume(auto[:, :, :5], _lps_affine()),
        )


# --------------------------------------------------------------------------------------------
# Cohort outliers (robust z)
# --------------------------------------------------------------------------------------------


def test_robust_z_hand_values():
    x = [1.0, 2.0, 3.0, 4.0, 100.0]  # median 3, MAD 1
    np.testing.assert_allclose(qc.robust_z(x), (np.array(x) - 3) / 1.4826)
    # MAD = 0 (most values equal): mean absolute deviation fallback
    y = [5.0, 5.0, 5.0, 5.0, 10.0]
    np.testing.assert_allclose(qc.robust_z(y), (np.array(y) - 5) / (1.253314 * 1.0))
    np.testing.assert_array_equal(qc.robust_z([2.0, 2.0, 2.0]), [0.0, 0.0, 0.0])
    z = qc.robust_z([1.0, np.nan, 3.0])
    assert math.isnan(z[1])
    np.testing.assert_allclose(z[[0, 2]], [-1 / 1.4826, 1 / 1.4826])


def _cohort(n: int = 20, seed: int = 7) -> pd.DataFrame:
    """A clean cohort: each group's values are the n normal quantiles (no true outlier) in a
    random subject order, plus per-slice rows with wild values that must be ignored."""
    rng = np.random.default_rng(seed)
    quantiles = norm.ppf((np.arange(n) + 0.5) / n)
    draws = {}
    rows = []
    for s in range(n):
        for level in ("L4", "L5", "all"):
            for muscle, csa in (("multifidus", 800.0), ("psoas_major", 1500.0)):
                for side in ("left", "right"):
                    key = (level, muscle, side)
                    if key not in draws:
                        draws[key] = (rng.permutation(quantiles), rng.permutation(quantiles))
                    zc, zf = draws[key][0][s], draws[key][1][s]
                    agg = {
                        "subject": f"sub-{s:02d}",
                        "level": level,
                        "slice": np.nan,
                        "muscle": muscle,
                        "side": side,
                        "n_slices": 3,
                        "csa_mm2": csa + 60 * zc,
                        "fat_pct": 12 + 2 * zf,
                        "method": "gmm3",
                    }
                    agg["fcsa_mm2"] = agg["csa_mm2"] * (1 - agg["fat_pct"] / 100)
                    rows.append(agg)
                    # a per-slice row with a wild value: must be ignored (aggregates only)
                    rows.append({**agg, "slice": 3.0, "csa_mm2": 1e6, "fat_pct": 99.0})
    return pd.DataFrame(rows)


def test_planted_outliers_are_found_and_clean_cohort_has_none():
    clean = _cohort()
    found = qc.outlier_checks(clean)
    assert set(found["status"]) == {"pass"}
    assert set(found["check"]) == {"outlier_csa_mm2", "outlier_fat_pct"}
    assert len(found) == 20 * 3 * 4 * 2  # subjects x levels x labels x measures

    planted = clean.copy()
    hit_csa = (
        (planted["subject"] == "sub-05")
        & (planted["level"] == "L4")
        & (planted["muscle"] == "multifidus")
        & (planted["side"] == "right")
        & planted["slice"].isna()
    )
    planted.loc[hit_csa, "csa_mm2"] = 300.0  # ~8 SD below the cohort
    hit_fat = (
        (planted["subject"] == "sub-11")
        & (planted["level"] == "all")
        & (planted["muscle"] == "psoas_major")
        & (planted["side"] == "left")
        & planted["slice"].isna()
    )
    planted.loc[hit_fat, "fat_pct"] = 40.0
    flagged = qc.outlier_checks(planted, qc.QCSettings(outlier_flag_levels="each"))
    flagged = flagged[flagged["status"] == "flag"]
    got = set(
        flagged[["subject", "level", "muscle", "side", "check"]].itertuples(index=False, name=None)
    )
    assert got == {
        ("sub-05", "L4", "multifidus", "right", "outlier_csa_mm2"),
        ("sub-11", "all", "psoas_major", "left", "outlier_fat_pct"),
    }
    z = flagged.set_index("check")["value"]
    assert z["outlier_csa_mm2"] < -3.5 < 3.5 < z["outlier_fat_pct"]
    # by default only whole-stack outliers are flagged; the per-level one is recorded
    default = qc.outlier_checks(planted)
    assert set(default.loc[default["status"] == "flag", "subject"]) == {"sub-11"}
    l4 = default.query("subject == 'sub-05' and level == 'L4' and check == 'outlier_csa_mm2'")
    l4 = l4.query("muscle == 'multifidus' and side == 'right'")
    assert l4["status"].tolist() == ["pass"]
    assert "recorded, not flagged" in l4["reason"].iloc[0]
    assert l4["value"].iloc[0] == pytest.approx(z["outlier_csa_mm2"])

    table = qc.cohort_outliers(planted).query(
        "subject == 'sub-05' and level == 'L4' and "
        "muscle == 'multifidus' and side == 'right' and "
        "measure == 'csa_mm2'"
    )
    grp = planted[
        planted["slice"].isna()
        & (planted["level"] == "L4")
        & (planted["muscle"] == "multifidus")
        & (planted["side"] == "right")
    ]
    expected = qc.robust_z(grp["csa_mm2"].to_numpy())[grp["subject"].tolist().index("sub-05")]
    assert table["z"].iloc[0] == pytest.approx(expected)
    assert table["n_cohort"].iloc[0] == 20


def test_outliers_need_a_minimum_cohort_and_threshold_is_configurable():
    small = _cohort(n=4)
    out = qc.outlier_checks(small)
    assert set(out["status"]) == {"pass"}
    assert out["value"].isna().all()
    assert "min_cohort_size 5" in out["reason"].iloc[0]
    strict = qc.outlier_checks(_cohort(), qc.QCSettings(robust_z_threshold=0.5))
    assert (strict["status"] == "flag").sum() > 0
    with pytest.raises(InputFileError, match="missing columns"):
        qc.outlier_checks(pd.DataFrame({"subject": ["a"]}))


# --------------------------------------------------------------------------------------------
# Summary and decisions
# --------------------------------------------------------------------------------------------


def _summary() -> pd.DataFrame:
    rows = [
        qc._row("sub-01", "all", "coverage", "pass", 4, "ok"),
        qc._row("sub-02", "all", "truncation_z", "flag", 1, "reaches the last slice"),
        qc._row("sub-03", "all", "lateralization", "fail", -30, "swapped", muscle="multifidus"),
        qc._row("sub-03", "L4", "fragmentation", "flag", 0.5, "pieces"),
    ]
    return qc.summarize_qc(qc._frame(rows))


def test_summary_worst_status_and_reasons():
    s = _summary().set_index("subject")
    assert tuple(_summary().columns) == qc.SUMMARY_COLUMNS
    assert s.loc["sub-01", "status"] == "pass"
    assert s.loc["sub-02", "status"] == "flag"
    assert (s.loc["sub-03", "status"], s.loc["sub-03", "n_fail"], s.loc["sub-03", "n_flag"]) == (
        "fail",
        1,
        1,
    )
    assert s.loc["sub-03", "reasons"].startswith("fail lateralization multifidus: swapped")
    assert "[L4]" in s.loc["sub-03", "reasons"]
    assert s.loc["sub-01", "reasons"] == ""


def test_init_decisions_defaults_and_never_overwrites(tmp_path):
    path = tmp_path / "qc_decisions.csv"
    first = qc.init_decisions(_summary(), path)
    assert tuple(first.columns) == qc.DECISION_COLUMNS
    d = first.set_index("subject")
    assert d.loc["sub-03", "decision"] == "exclude"
    assert d.loc["sub-01", "decision"] == d.loc["sub-02", "decision"] == "include"
    assert d.loc["sub-03", "reviewer"] == "auto-qc"
    assert "swapped" in d.loc["sub-03", "reason"]

    # a reviewer edits a row in a spreadsheet (and adds a notes column)
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df.loc[df["subject"] == "sub-03", ["decision", "reviewer", "reason", "timestamp"]] = [
        "include",
        "Dr. A",
        "checked: labels fine",
        "2024-05-01",
    ]
    df["notes"] = ["", "", "second look"]
    df.to_csv(path, index=False)
    edited = path.read_bytes()

    again = qc.init_decisions(_summary(), path)  # re-run: nothing new
    assert path.read_bytes() == edited  # not even rewritten
    assert again.set_index("subject").loc["sub-03", "decision"] == "include"

    more = pd.concat(
        [
            _summary(),
            pd.DataFrame(
                [
                    {
                        "subject": "sub-04",
                        "status": "fail",
                        "n_fail": 1,
                        "n_flag": 0,
                        "reasons": "input: unreadable",
                    }
                ]
            ),
        ]
    )
    grown = qc.init_decisions(more, path).set_index("subject")
    assert grown.loc["sub-03", "decision"] == "include"
    assert grown.loc["sub-03", "reviewer"] == "Dr. A"
    assert grown.loc["sub-03", "timestamp"] == "2024-05-01"
    assert grown.loc["sub-03", "notes"] == "second look"
    assert grown.loc["sub-04", "decision"] == "exclude"
    assert list(grown.index) == ["sub-01", "sub-02", "sub-03", "sub-04"]


def test_set_decision_and_excluded_subjects(tmp_path):
    path = tmp_path / "qc_decisions.csv"
    qc.init_decisions(_summary(), path)
    before = qc.read_decisions(path).set_index("subject")
    qc.set_decision(path, "sub-02", "Exclude", "Dr. B", "psoas cut off")
    after = qc.read_decisions(path).set_index("subject")
    assert after.loc["sub-02", "decision"] == "exclude"
    assert after.loc["sub-02", "reviewer"] == "Dr. B"
    pd.testing.assert_series_equal(after.loc["sub-01"], before.loc["sub-01"])
    pd.testing.assert_series_equal(after.loc["sub-03"], before.loc["sub-03"])
    ex = qc.excluded_subjects(path)
    assert list(ex.columns) == ["subject", "reason"]
    assert list(ex["subject"]) == ["sub-02", "sub-03"]
    assert ex.set_index("subject").loc["sub-02", "reason"] == "Dr. B: psoas cut off"
    qc.set_decision(path, "sub-09", "include", "Dr. B")  # new subject appended
    assert qc.read_decisions(path)["subject"].iloc[-1] == "sub-09"
    with pytest.raises(qc.EsmaError, match="reviewer name is required"):
        qc.set_decision(path, "sub-01", "exclude", " ")
    with pytest.raises(qc.EsmaError, match="'maybe' is not one of include, exclude"):
        qc.set_decision(path, "sub-01", "maybe", "Dr. B")
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave nothing behind


def test_read_decisions_errors_name_file_row_and_column(tmp_path):
    path = tmp_path / "qc_decisions.csv"
    header = "subject,decision,reviewer,reason,timestamp\n"
    path.write_text(header + "sub-01,include,a,,t\nsub-02,maybe,a,,t\n")
    with pytest.raises(
        InputFileError,
        match=r"qc_decisions\.csv: row 3, column 'decision': "
        r"'maybe' is not one of include, exclude",
    ):
        qc.read_decisions(path)
    path.write_text(header + "sub-01,include,a,,t\nsub-01,exclude,a,,t\n")
    with pytest.raises(
        InputFileError,
        match=r"row 3, column 'subject': subject 'sub-01' "
        r"already listed on row 2",
    ):
        qc.read_decisions(path)
    path.write_text("subject,reviewer,reason,timestamp\nsub-01,a,,t\n")
    with pytest.raises(InputFileError, match=r"missing column\(s\) 'decision'"):
        qc.read_decisions(path)
    path.write_text(header + ",include,a,,t\n")
    with pytest.raises(InputFileError, match="row 2, column 'subject': empty subject ID"):
        qc.read_decisions(path)
    with pytest.raises(InputFileError, match="decisions file not found"):
        qc.read_decisions(tmp_path / "none.csv")
    assert qc.excluded_subjects(tmp_path / "none.csv", missing_ok=True).empty
    # a spreadsheet export with a BOM and semicolons is read
    path.write_bytes(
        "\ufeffsubject;decision;reviewer;reason;timestamp\nsub-01; EXCLUDE ;a;x;t\n".encode()
    )
    assert qc.excluded_subjects(path)["subject"].tolist() == ["sub-01"]


# --------------------------------------------------------------------------------------------
# Display orientation and mosaic
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("codes", ["LPS", "RAS", "LAS", "PLS", "RPI"])
def test_patient_right_is_on_screen_left_for_any_storage(codes):
    data, affine = _store(_anatomy(), _lps_affine(), codes)
    view = qc.axial_view(affine)
    assert qc.patient_right_screen_side(affine, view) == "left"
    k = next(
        i
        for i in range(data.shape[view.slice_axis])
        if (np.take(data, i, axis=view.slice_axis) > 0).any()
    )
    screen = qc.orient_slice(data, view, k)
    cols_right = np.nonzero(screen == 1)[1]  # right multifidus
    cols_left = np.nonzero(screen == 2)[1]
    assert cols_right.mean() < screen.shape[1] / 2 < cols_left.mean()
    rows_psoas = np.nonzero(screen == 3)[0]  # psoas is anterior: upper half
    rows_mf = np.nonzero(screen == 1)[0]
    assert rows_psoas.mean() < rows_mf.mean()

    neuro = qc.axial_view(affine, "neurological")
    assert qc.patient_right_screen_side(affine, neuro) == "right"
    screen = qc.orient_slice(data, neuro, k)
    assert np.nonzero(screen == 1)[1].mean() > screen.shape[1] / 2


def test_screen_side_function_reads_the_affine_not_the_flip_choice():
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    ras = np.eye(4)
    unflipped = qc.AxialView(2, 1, 0, False, False, "radiological")
    assert qc.patient_right_screen_side(lps, unflipped) == "left"  # axis 0 runs to the left
    assert qc.patient_right_screen_side(ras, unflipped) == "right"  # axis 0 runs to the right
    flipped = qc.AxialView(2, 1, 0, False, True, "radiological")
    assert qc.patient_right_screen_side(ras, flipped) == "left"


@pytest.mark.parametrize("codes", ["LPS", "RAS"])
def test_mosaic_letters_follow_the_affine(codes):
    data, affine = _store(_anatomy(), _lps_affine(), codes)
    fig = qc.render_mosaic(
        _volume(_image_for(data), affine), _volume(data, affine), LABELS, subject="sub-01"
    )
    for ax in fig.axes:
        pos = {t.get_text(): t.get_position() for t in ax.texts}
        assert pos["R"][0] < 0.5 < pos["L"][0]
        assert pos["A"][1] > 0.5 > pos["P"][1]
    assert any(
        "sub-01" in t.get_text() and "patient's right on screen left" in t.get_text()
        for t in fig.texts
    )


def test_save_mosaic_writes_png_of_documented_size(tmp_path):
    data = _anatomy()
    levels = pd.DataFrame({"slice": [1, 2, 3, 4], "level": ["L5", "L5", "L4", "L4"]})
    out = qc.save_mosaic(
        _volume(_image_for(data), _lps_affine()),
        _volume(data, _lps_affine()),
        LABELS,
        tmp_path / "m" / "sub-01.png",
        subject="sub-01",
        levels=levels,
        max_slices=3,
    )
    raw = out.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(raw) > 5000
    height, width = imread(io.BytesIO(raw)).shape[:2]
    assert (width, height) == qc.mosaic_size_px(3, len(LABELS.labels))
    assert (width, height) == (3 * qc.TILE_PX, qc.TILE_PX + qc.HEADER_PX + qc.LEGEND_ROW_PX)
    assert not [p for p in (tmp_path / "m").iterdir() if p.name != "sub-01.png"]
    # the same figure as bytes for embedding
    png = qc.mosaic_png_bytes(
        _volume(_image_for(data), _lps_affine()), _volume(data, _lps_affine()), LABELS, max_slices=3
    )
    assert imread(io.BytesIO(png)).shape[:2] == (height, width)
    with pytest.raises(GeometryMismatchError):
        qc.save_mosaic(
            _volume(_image_for(data)[:, :, :5], _lps_affine()),
            _volume(data, _lps_affine()),
            LABELS,
            tmp_path / "x.png",
        )


def test_select_slices_spreads_over_labelled_slices():
    data = _anatomy()  # labels on slices 1-4
    assert qc.select_slices(data, 2, 12) == [1, 2, 3, 4]
    assert qc.select_slices(data, 2, 2) == [1, 4]
    assert qc.select_slices(np.zeros((2, 2, 3), np.int16), 2, 5) == [0, 1, 2]


# --------------------------------------------------------------------------------------------
# Friendly layer on files
# --------------------------------------------------------------------------------------------


def test_qc_stage_on_files_writes_tables_mosaics_and_seeds_decisions(tmp_path, study_folder):
    """The one QC driver (the stage a run executes) on two readable subjects and an unreadable
    mask: known statuses, the file named but not its folder, decisions seeded from QC."""
    import json

    from helpers import runs
    from helpers.stages import s1_segment, s3_qc
    from helpers.training import labels_document

    data = tmp_path / "data"
    data.mkdir()
    affine = _lps_affine()
    for subject, mask in (("sub-01", _anatomy()), ("sub-02", _swap_sides(_anatomy()))):
        nib.save(nib.Nifti1Image(_image_for(mask), affine), data / f"{subject}_T2w.nii.gz")
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), data / f"{subject}_dseg.nii.gz")
    nib.save(nib.Nifti1Image(_image_for(_anatomy()), affine), data / "sub-03_T2w.nii.gz")
    (data / "sub-03_dseg.nii.gz").write_bytes(b"not a nifti")
    (data / "labels.json").write_text(json.dumps(labels_document(LABELS)))
    study, paths = runs.open_study(study_folder(data), tmp_path / "run")
    out = s3_qc.qc_stage(study, paths, s1_segment.segment_stage(study, paths, progress=False),
                         progress=False)
    table = pd.read_csv(paths.file("qc.csv"), keep_default_na=False, na_values=[""])
    assert tuple(table.columns) == qc.QC_COLUMNS
    own = table[~table["check"].str.startswith("outlier")]  # the per-subject checks
    summary = qc.summarize_qc(own, subjects=["sub-01", "sub-02", "sub-03"]).set_index("subject")
    # the clean tiny anatomy: only its 120 mm2 multifidus is flagged (below 150 mm2)
    assert summary.loc["sub-01", "status"] == "flag"
    assert summary.loc["sub-01", "reasons"].startswith("flag csa_range right multifidus, left")
    assert summary.loc["sub-01", "n_flag"] == 2
    assert summary.loc["sub-02", "status"] == "fail"
    assert "lateralization" in summary.loc["sub-02", "reasons"]
    assert summary.loc["sub-03", "status"] == "fail"
    reason = table[table["subject"] == "sub-03"]["reason"].iloc[0]
    assert reason.startswith("sub-03_dseg.nii.gz: ")
    assert str(tmp_path) not in reason  # file named, folder (possibly identifying) not
    assert set(out.mosaics) == {"sub-01", "sub-02"}
    decisions = out.decisions.set_index("subject")
    assert decisions["decision"].to_dict() == {
        "sub-01": "include",
        "sub-02": "exclude",
        "sub-03": "exclude",
    }


def test_qc_stage_on_a_synthetic_phantom_with_its_levels(tmp_path, phantom_files, study_folder):
    """A clean phantom through the QC stage: sides and labels pass, every planted level gets
    rows, and the cohort outlier checks run on the measure stage's output."""
    from helpers import runs
    from helpers.stages import s1_segment, s3_qc

    files = phantom_files("syn-007", seed=2, orientation="RAS")
    study_file = study_folder(files["image"].parent, extra="levels: '{subject}_levels.csv'\n")
    study, paths = runs.open_study(study_file, tmp_path / "run")
    out = s3_qc.qc_stage(study, paths, s1_segment.segment_stage(study, paths, progress=False),
                         progress=False)
    rows = out.qc[out.qc["subject"] == "syn-007"]
    assert set(_rows(rows, "lateralization")["status"]) == {"pass"}
    assert set(_rows(rows, "empty_label")["status"]) == {"pass"}
    planted = set(pd.read_csv(files["levels"], dtype=str)["level"].dropna())
    assert set(rows["level"].astype(str)) >= planted | {"all"}
    assert "outlier_csa_mm2" in set(out.qc["check"])
    assert out.summary["subject"].tolist() == ["syn-007"]
    assert out.measured["status"].tolist() == ["computed"]
    assert set(out.mosaics) == {"syn-007"}


# --------------------------------------------------------------------------------------------
# Directly composed mosaic (issue 19): the matplotlib figure's picture from the arrays
# --------------------------------------------------------------------------------------------


def _flat_image(mask: np.ndarray) -> np.ndarray:
    """Air 0, body 600, muscles 100: the window is 0-600, so every grey level is known."""
    image = np.zeros(mask.shape, dtype=np.float32)
    image[1:-1, 2:-2, :] = 600.0
    image[mask > 0] = 100.0
    return image


def _expected_colour(value: int, opacity: float) -> np.ndarray:
    grey = 100.0 / 600.0 * 255.0
    colour = np.asarray(qc.label_colours(LABELS)[value]) * 255.0
    return np.rint((1.0 - opacity) * grey + opacity * colour)


def _pixels_of(picture: np.ndarray, colour: np.ndarray, tolerance: float = 0.0) -> np.ndarray:
    """(row, col) of the pixels within ``tolerance`` of ``colour`` on every channel."""
    close = np.abs(picture[..., :3].astype(float) - colour).max(axis=-1) <= tolerance
    return np.argwhere(close)


def _tile(pixels: np.ndarray, tile: int, cols: int) -> np.ndarray:
    top = qc.HEADER_PX + (tile // cols) * qc.TILE_PX
    left = (tile % cols) * qc.TILE_PX
    return pixels[top : top + qc.TILE_PX, left : left + qc.TILE_PX]


@pytest.mark.parametrize("codes", ["LPS", "RAS", "PLS"])
@pytest.mark.parametrize("convention", ["radiological", "neurological"])
def test_composed_mosaic_colours_label_voxels_on_the_conventions_side(codes, convention):
    data, affine = _store(_anatomy(), _lps_affine(), codes)
    image, mask = _volume(_flat_image(data), affine), _volume(data, affine)
    opacity = 0.45
    picture = qc.compose_mosaic(
        image, mask, LABELS, subject="sub-01", max_slices=4, opacity=opacity,
        convention=convention,
    )
    assert picture.dtype == np.uint8
    assert picture.shape == (*qc.mosaic_size_px(4, len(LABELS.labels))[::-1], 3)
    for tile in range(4):  # every labelled slice: 1-4
        pixels = _tile(picture, tile, 4)
        found = {v: _pixels_of(pixels, _expected_colour(v, opacity)) for v in (1, 2, 3, 4)}
        # every label drawn in its own colour blended over the muscle's grey, 30 voxels
        # (5 x 6 in plane) scaled up to at least that many pixels
        assert all(len(found[v]) >= 30 for v in found), {v: len(p) for v, p in found.items()}
        # unlabelled voxels keep their windowed grey: body 600 -> 255, air 0 -> 0
        assert len(_pixels_of(pixels, np.array([255.0, 255.0, 255.0]))) > 100
        # patient's right (labels 1, 3) on the convention's side, anterior (psoas) up
        right_col, left_col = found[1][:, 1].mean(), found[2][:, 1].mean()
        if convention == "radiological":
            assert right_col < qc.TILE_PX / 2 < left_col
        else:
            assert left_col < qc.TILE_PX / 2 < right_col
        assert found[3][:, 0].mean() < found[1][:, 0].mean()
        # orientation letters in yellow near the tile's edges and centre lines
        yellow = _pixels_of(pixels, np.array([255.0, 255.0, 0.0]), tolerance=60)
        assert (yellow[:, 1] < qc.TILE_PX * 0.2).any()
        assert (yellow[:, 1] > qc.TILE_PX * 0.8).any()
    # the legend shows each label's pure colour
    legend = picture[-qc.LEGEND_ROW_PX :]
    for value, rgb in qc.label_colours(LABELS).items():
        assert len(_pixels_of(legend, np.rint(np.asarray(rgb) * 255.0))) > 50, value


def test_composed_mosaic_matches_the_matplotlib_figure_it_replaces():
    data, affine = _store(_anatomy(), _lps_affine(), "RAS")
    image, mask = _volume(_flat_image(data), affine), _volume(data, affine)
    direct = imread(io.BytesIO(qc.mosaic_png_bytes(image, mask, LABELS, max_slices=4)))
    figure = imread(io.BytesIO(
        qc.mosaic_png_bytes(image, mask, LABELS, max_slices=4, renderer="matplotlib")
    ))
    assert direct.shape[:2] == figure.shape[:2] == qc.mosaic_size_px(4, 4)[::-1]
    direct, figure = np.rint(direct[..., :3] * 255), np.rint(figure[..., :3] * 255)
    for tile in range(4):
        for value in (1, 2, 3, 4):
            colour = _expected_colour(value, 0.45)
            a = _pixels_of(_tile(direct, tile, 4), colour)
            b = _pixels_of(_tile(figure, tile, 4), colour, tolerance=2)
            assert len(a), (tile, value)
            assert len(b), (tile, value)
        # same screen side of the patient's right in both pictures
        sides = [
            np.sign(
                _pixels_of(_tile(p, tile, 4), _expected_colour(2, 0.45), 2)[:, 1].mean()
                - _pixels_of(_tile(p, tile, 4), _expected_colour(1, 0.45), 2)[:, 1].mean()
            )
            for p in (direct, figure)
        ]
        assert sides == [1.0, 1.0]


def test_composed_mosaic_without_overlay_and_renderer_choice():
    data = _anatomy()
    image, mask = _volume(_flat_image(data), _lps_affine()), _volume(data, _lps_affine())
    bare = qc.compose_mosaic(image, mask, LABELS, max_slices=2, opacity=0.0)
    tiles = bare[qc.HEADER_PX : qc.HEADER_PX + qc.TILE_PX]
    for value in (1, 2, 3, 4):
        assert not len(_pixels_of(tiles, _expected_colour(value, 0.45), tolerance=2))
    assert len(_pixels_of(tiles, np.rint(np.full(3, 100.0 / 600.0 * 255.0)))) > 100
    with pytest.raises(ValueError, match="renderer must be"):
        qc.mosaic_png_bytes(image, mask, LABELS, renderer="svg")
    with pytest.raises(ConfigError, match=r"qc\.mosaic_renderer: 'svg' is not one of"):
        qc.QCSettings.from_mapping({"mosaic_renderer": "svg"})
    assert qc.QCSettings().mosaic_renderer == "direct"
    with pytest.raises(GeometryMismatchError):
        qc.compose_mosaic(_volume(_flat_image(data)[:, :, :5], _lps_affine()), mask, LABELS)


def test_qc_stage_draws_full_mosaics_for_flagged_subjects_and_thumbnails_for_passes(
    tmp_path, study_folder
):
    import json

    from helpers import runs
    from helpers.stages import s1_segment, s3_qc

    affine = _lps_affine()
    data = tmp_path / "data"
    data.mkdir()
    for subject, mask in (("sub-01", _anatomy()), ("sub-02", _swap_sides(_anatomy()))):
        nib.save(nib.Nifti1Image(_image_for(mask), affine), data / f"{subject}_T2w.nii.gz")
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), data / f"{subject}_dseg.nii.gz")
    (data / "labels.json").write_text(json.dumps({"labels": [
        {"value": lab.value, "muscle": lab.muscle, "side": lab.side} for lab in LABELS.labels
    ]}))
    # the tiny anatomy passes once its small areas pass; its side-swapped twin fails
    study_file = study_folder(
        data, extra="qc: {csa_range_status: pass, mosaic_pass_max_slices: 2}\n"
    )
    study, paths = runs.open_study(study_file, tmp_path / "run")
    settings = study.qc_settings()
    res = s3_qc.qc_stage(study, paths, s1_segment.segment_stage(study, paths, progress=False),
                         progress=False)
    assert res.summary.set_index("subject")["status"].to_dict() == {
        "sub-01": "pass", "sub-02": "fail"
    }
    sizes = {s: imread(p).shape[1::-1] for s, p in res.mosaics.items()}
    assert sizes == {"sub-01": qc.mosaic_size_px(2, 4), "sub-02": qc.mosaic_size_px(4, 4)}
    assert qc.mosaic_slices_for([], settings) == 2
    assert qc.mosaic_slices_for(["pass", "fail"], settings) == 12
