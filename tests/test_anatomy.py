"""Anatomical plausibility checks (helpers.anatomy) against planted truth.

Pure functions on tiny hand-built arrays (numbers known exactly), phantoms stored in several
orientations (the same anatomy must give the same numbers) and the real example scan with
grossly wrong variants of its mask built here: moved 60 mm anterior (into the abdomen), moved
into the air behind the patient, sides swapped, erector spinae/multifidus swapped,
psoas/quadratus lumborum swapped.  Each must fail with the right named reason; the unmodified
masks must not fail.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from helpers import anatomy, qc, synthetic
from helpers.errors import ConfigError
from helpers.labels import Label, LabelTable, load_labels
from helpers.nifti import Volume, load_image, load_mask

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "data" / "example"
TOTALSEG = Path("/work/shared/data/totalseg_mr_example")
PLAUSIBILITY = {"inside_body", "posterior_cover", "intensity", "arrangement", "mirror", "csa_range"}

TWO = LabelTable((Label(1, "multifidus", "right"), Label(2, "erector_spinae", "right")))


# --------------------------------------------------------------------------------------------
# Pure measurements on tiny arrays
# --------------------------------------------------------------------------------------------


def _lps(zoom: tuple[float, float, float] = (2.0, 2.0, 5.0)) -> np.ndarray:
    return np.diag([-zoom[0], -zoom[1], zoom[2], 1.0])


def test_slice_centroids_are_in_world_mm():
    m = np.zeros((10, 8, 3), dtype=np.int16)
    m[2:4, 1:3, 1] = 1  # i 2-3 -> x = -2 i: -4, -6 -> -5 ; j 1-2 -> y = -3
    c = anatomy.slice_centroids(m, _lps(), TWO)
    assert len(c) == 1
    assert c.loc[0, ["slice", "n_voxels"]].tolist() == [1, 4]
    assert c.loc[0, "x_mm"] == pytest.approx(-5.0)
    assert c.loc[0, "y_mm"] == pytest.approx(-3.0)


def _cents(rows: list[tuple[str, str, float, float]]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"value": i, "muscle": mu, "side": s, "slice": 0, "n_voxels": 1, "x_mm": x, "y_mm": y}
            for i, (mu, s, x, y) in enumerate(rows)
        ]
    )


def test_arrangement_margins_measured_from_the_midline():
    # midline at x = +10 (an off-centre spine): multifidus 15 mm, erector spinae 45 mm out
    cents = _cents(
        [
            ("multifidus", "right", 25.0, -80.0),
            ("multifidus", "left", -5.0, -80.0),
            ("erector_spinae", "right", 55.0, -75.0),
            ("erector_spinae", "left", -35.0, -75.0),
            ("psoas_major", "right", 45.0, -30.0),
            ("psoas_major", "left", -25.0, -30.0),
        ]
    )
    t = anatomy.arrangement_table(cents).set_index(["relation", "first", "second", "side"])
    assert t.loc[("medial", "multifidus", "erector_spinae", "right"), "margin_mm"] == 30.0
    assert t.loc[("medial", "multifidus", "erector_spinae", "left"), "margin_mm"] == 30.0
    assert t.loc[("anterior", "psoas_major", "erector_spinae", "left"), "margin_mm"] == 45.0
    assert t.loc[("anterior", "psoas_major", "multifidus", "right"), "margin_mm"] == 50.0
    # sides swapped: midline unchanged, so the medial order still holds (no false muscle swap)
    swapped = cents.assign(side=cents["side"].map({"right": "left", "left": "right"}))
    t2 = anatomy.arrangement_table(swapped)
    assert (t2.loc[t2["relation"] == "medial", "margin_mm"] == 30.0).all()
    # muscles swapped on the right only: that side's margin turns negative
    one = cents.copy()
    one.loc[0, "x_mm"], one.loc[2, "x_mm"] = 55.0, 25.0
    t3 = anatomy.arrangement_table(one).set_index(["relation", "first", "side"])
    assert t3.loc[("medial", "multifidus", "right"), "margin_mm"] < 0
    assert t3.loc[("medial", "multifidus", "left"), "margin_mm"] > 0


def test_mirror_offsets_are_exact_and_survive_axial_rotation():
    cents = _cents(
        [
            ("multifidus", "right", 20.0, -80.0),
            ("multifidus", "left", -20.0, -80.0),
            ("psoas_major", "right", 40.0, -30.0),
            ("psoas_major", "left", -40.0, -30.0),
            ("erector_spinae", "right", 50.0, -70.0),
            ("erector_spinae", "left", -50.0, -82.0),  # 12 mm more posterior than its twin
        ]
    )
    t = anatomy.mirror_table(cents).set_index("muscle")
    assert t.loc["multifidus", "offset_mm"] == 0.0
    assert t.loc["psoas_major", "offset_mm"] == 0.0
    assert t.loc["erector_spinae", "ap_offset_mm"] == 12.0
    assert t.loc["erector_spinae", "offset_mm"] == 12.0
    assert t.loc["multifidus", "rotation_deg"] == 0.0
    # the whole trunk turned 25 degrees about a point off the origin (scoliosis): a symmetric
    # anatomy still mirrors exactly (without derotation the quadratus lumborum twins, 140 mm
    # apart, would sit 59 mm apart antero-posteriorly)
    sym = _cents(
        [
            ("multifidus", "right", 20.0, -80.0),
            ("multifidus", "left", -20.0, -80.0),
            ("erector_spinae", "right", 50.0, -75.0),
            ("erector_spinae", "left", -50.0, -75.0),
            ("quadratus_lumborum", "right", 70.0, -60.0),
            ("quadratus_lumborum", "left", -70.0, -60.0),
        ]
    )
    a = np.radians(25.0)
    x, y = sym["x_mm"] - 5.0, sym["y_mm"] + 40.0
    turned = sym.assign(x_mm=x * np.cos(a) - y * np.sin(a), y_mm=x * np.sin(a) + y * np.cos(a))
    t = anatomy.mirror_table(turned).set_index("muscle")
    assert t["offset_mm"].max() == pytest.approx(0.0, abs=1e-9)
    assert t["rotation_deg"].iloc[0] == pytest.approx(25.0)


def _toy_scan() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """L-P-S, 1 x 1 x 5 mm: air 0, body rows j 5-54 of fat (600), muscle (100) in j 30-44.

    The body's posterior skin is j = 54 (L-P-S: larger j is posterior).  Label 1 (multifidus)
    occupies j 30-39, and j 40-44 below it is unlabelled muscle: 5 mm of non-fat tissue between
    the label and the posterior fat.  Label 2 (erector spinae) j 30-44: nothing between.
    """
    shape = (60, 60, 4)
    image = np.zeros(shape, dtype=np.float32)
    image[5:55, 5:55, :] = 600.0
    image[20:40, 30:45, :] = 100.0
    mask = np.zeros(shape, dtype=np.int16)
    mask[20:30, 30:40, :] = 1
    mask[30:40, 30:45, :] = 2
    return image, mask, _lps((1.0, 1.0, 5.0))


def test_body_outline_cover_intensity_and_area_on_a_toy_scan():
    image, mask, aff = _toy_scan()
    outline = anatomy.body_outline(image, aff)
    assert outline.fat_bright
    assert outline.fat_median == 600.0
    # inside the body up to a voxel at its corners (opening against noise); air outside
    assert outline.inside[6:54, 6:54].all()
    assert not outline.inside[:4].any()
    assert not outline.inside[:, 56:].any()
    cover = anatomy.posterior_cover_table(mask, image, aff, TWO, outline).set_index("value")
    assert cover.loc[1, "cover_mm"] == 5.0
    assert cover.loc[2, "cover_mm"] == 0.0
    inten = anatomy.intensity_table(mask, image, TWO, outline).set_index("value")
    assert inten.loc[1, "fat_ratio"] == pytest.approx(100 / 600)
    area = anatomy.csa_table(mask, aff, TWO, [("all", np.arange(4))]).set_index("value")
    assert area.loc[1, "csa_mm2"] == 100.0
    assert area.loc[2, "csa_mm2"] == 150.0
    # half of label 1 moved into the air behind the body
    moved = mask.copy()
    moved[20:30, 30:40, :] = 0
    moved[20:30, 50:60, :] = 1  # j 55-59 outside the body: 5 of 10 rows
    out = anatomy.outside_body_table(moved, outline, TWO).set_index("value")
    assert out.loc[1, "outside_fraction"] == 0.5
    assert out.loc[2, "outside_fraction"] == 0.0


def test_the_same_toy_scan_stored_rotated_gives_the_same_numbers():
    image, mask, aff = _toy_scan()
    ref = anatomy.plausibility_checks("t", mask, aff, TWO, image=image)
    for codes in ("RAS", "PIR", "SLA"):
        img = qc_reorient(image, aff, codes)
        msk = qc_reorient(mask, aff, codes)
        got = anatomy.plausibility_checks("t", msk[0], msk[1], TWO, image=img[0])
        pd.testing.assert_frame_equal(got, ref, check_exact=False, atol=1e-6)


def qc_reorient(data: np.ndarray, aff: np.ndarray, codes: str) -> tuple[np.ndarray, np.ndarray]:
    from helpers.synthetic import reorient

    img = reorient(nib.Nifti1Image(data, aff), codes)
    return np.asarray(img.dataobj), img.affine


def test_fat_suppressed_image_skips_the_cover_check():
    image, mask, aff = _toy_scan()
    image[image == 600.0] = 80.0  # suppressed fat: the body is now darker than muscle
    rows = anatomy.plausibility_checks("t", mask, aff, TWO, image=image)
    cover = rows[rows["check"] == "posterior_cover"]
    assert cover["status"].tolist() == ["pass"]
    assert "not bright" in cover["reason"].iloc[0]
    # muscle (100) is now the image's bright class (ratio 1, >= 0.85): recorded, not judged
    inten = rows[rows["check"] == "intensity"]
    assert (inten["value"] == 1.0).all()
    assert set(inten["status"]) == {"pass"}
    assert inten["reason"].str.contains("not bright").all()


def test_new_settings_are_validated():
    s = qc.QCSettings.from_mapping({"max_posterior_cover_mm": 30, "csa_range_status": "pass"})
    assert s.max_posterior_cover_mm == 30.0
    assert s.csa_range_status == "pass"
    with pytest.raises(ConfigError, match=r"qc\.csa_fail_factor"):
        qc.QCSettings.from_mapping({"csa_fail_factor": 0.5})
    with pytest.raises(ConfigError, match=r"qc\.max_outside_body_fraction"):
        qc.QCSettings.from_mapping({"max_outside_body_fraction": 2})
    with pytest.raises(ConfigError, match=r"qc\.csa_range_status"):
        qc.QCSettings.from_mapping({"csa_range_status": "fail"})


def test_every_new_check_is_documented():
    assert PLAUSIBILITY <= set(qc.CHECKS)


# --------------------------------------------------------------------------------------------
# Gross-error variants, built in the patient's frame (L-P-S: +j posterior) then re-stored
# --------------------------------------------------------------------------------------------


def _shift_ap(mask: np.ndarray, rows: int) -> np.ndarray:
    """Move an L-P-S mask along j by ``rows`` (+ = posterior); voxels leaving the grid drop."""
    out = np.zeros_like(mask)
    if rows < 0:
        out[:, :rows] = mask[:, -rows:]
    else:
        out[:, rows:] = mask[:, :-rows]
    return out


def _swap(mask: np.ndarray, pairs: list[tuple[int, int]]) -> np.ndarray:
    out = mask.copy()
    for a, b in pairs:
        out[mask == a] = b
        out[mask == b] = a
    return out


SIDES = [(1, 2), (3, 4), (5, 6), (7, 8)]
ES_MF = [(1, 3), (2, 4)]
PS_QL = [(5, 7), (6, 8)]


def _variants(image: np.ndarray, mask: np.ndarray, zoom_ap: float, pad: int) -> dict:
    """Gross variants of an L-P-S (image, mask): name -> (image, mask, check, reason part)."""
    shift = round(60.0 / zoom_ap)
    # the air behind the patient: pad the stack posteriorly with air, move the mask into it
    air = np.random.default_rng(0).normal(0.0, 5.0, (image.shape[0], pad, image.shape[2]))
    padded_image = np.concatenate([image, np.abs(air)], axis=1)
    padded_mask = np.concatenate([mask, np.zeros_like(mask[:, :pad])], axis=1)
    behind = round(90.0 / zoom_ap)
    return {
        "anterior_60mm": (image, _shift_ap(mask, -shift), "posterior_cover", "into the abdomen"),
        "posterior_air": (
            padded_image,
            _shift_ap(padded_mask, behind),
            "inside_body",
            "in the air",
        ),
        "sides_swapped": (
            image,
            _swap(mask, SIDES),
            "lateralization",
            "right and left labels swapped",
        ),
        "es_mf_swapped": (
            image,
            _swap(mask, ES_MF),
            "arrangement",
            "multifidus and erector spinae swapped",
        ),
        "psoas_ql_swapped": (
            image,
            _swap(mask, PS_QL),
            "arrangement",
            "psoas major and quadratus lumborum swapped",
        ),
    }


def _check(image: np.ndarray, mask: np.ndarray, aff: np.ndarray, labels: LabelTable, codes: str):
    img = nib.Nifti1Image(np.asarray(image, dtype=np.float32), aff)
    msk = nib.Nifti1Image(np.asarray(mask, dtype=np.int16), aff)
    if codes != "LPS":
        from helpers.synthetic import reorient

        img, msk = reorient(img, codes), reorient(msk, codes)
    return qc.check_subject(
        "s",
        Volume(np.asarray(msk.dataobj), msk.affine),
        labels,
        image=Volume(np.asarray(img.dataobj), img.affine),
    )


def _assert_gross_fail(rows: pd.DataFrame, check: str, words: str, name: str) -> None:
    failed = rows[rows["status"] == "fail"]
    assert check in set(failed["check"]), f"{name}: {check} did not fail"
    reasons = " | ".join(failed.loc[failed["check"] == check, "reason"])
    assert words in reasons, f"{name}: {reasons}"
    summary = qc.summarize_qc(rows)
    assert summary["status"].iloc[0] == "fail"


@pytest.fixture(scope="module")
def example() -> tuple[np.ndarray, np.ndarray, np.ndarray, LabelTable]:
    image = load_image(EXAMPLE / "sub-0001_T1w.nii.gz")
    mask = load_mask(EXAMPLE / "sub-0001_T1w_dseg.nii.gz")
    assert image.axcodes == ("L", "P", "S")
    return (
        np.asarray(image.data),
        np.asarray(mask.data),
        image.affine,
        load_labels(EXAMPLE / "labels.json"),
    )


@pytest.mark.parametrize("codes", ["LPS", "RAS"])
def test_example_mask_passes_and_every_gross_variant_fails_with_its_reason(example, codes):
    image, mask, aff, labels = example
    clean = _check(image, mask, aff, labels, codes)
    assert "fail" not in set(clean["status"]), clean[clean["status"] == "fail"]
    plaus = clean[clean["check"].isin(PLAUSIBILITY)]
    assert set(plaus["status"]) == {"pass"}
    # every plausibility check ran with a number on the real scan
    assert PLAUSIBILITY <= set(plaus["check"])
    for name, (img, msk, check, words) in _variants(image, mask, abs(aff[1, 1]), 120).items():
        rows = _check(img, msk, aff, labels, codes)
        _assert_gross_fail(rows, check, words, name)


def test_example_variant_values_match_the_planted_errors(example):
    image, mask, aff, labels = example
    v = _variants(image, mask, abs(aff[1, 1]), 120)
    rows = _check(*v["anterior_60mm"][:2], aff, labels, "LPS")
    cover = rows[rows["check"] == "posterior_cover"]["value"]
    # the real back muscles, left unlabelled, lie behind the moved mask: about the 60 mm moved
    assert cover.between(45.0, 65.0).all(), cover.tolist()
    rows = _check(*v["es_mf_swapped"][:2], aff, labels, "LPS")
    clean = _check(image, mask, aff, labels, "LPS")
    margin = rows[rows["muscle"] == "multifidus/erector_spinae"].set_index("side")["value"]
    before = clean[clean["muscle"] == "multifidus/erector_spinae"].set_index("side")["value"]
    # swapping the two muscles negates their medial/lateral margin exactly
    pd.testing.assert_series_equal(margin, -before)


@pytest.mark.parametrize("orientation", ["LPS", "RAS", "LAS", "PIR"])
def test_phantoms_pass_in_any_orientation_and_gross_variants_fail(orientation):
    ph = synthetic.make_phantom("syn-1", seed=3, orientation="LPS")
    image = np.asarray(ph.image.dataobj, dtype=np.float32)
    mask = np.asarray(ph.mask.dataobj)
    aff = ph.image.affine
    clean = _check(image, mask, aff, ph.labels, orientation)
    plaus = clean[clean["check"].isin(PLAUSIBILITY)]
    assert set(plaus["status"]) == {"pass"}, plaus[plaus["status"] != "pass"]
    for name, (img, msk, check, words) in _variants(image, mask, abs(aff[1, 1]), 120).items():
        _assert_gross_fail(_check(img, msk, aff, ph.labels, orientation), check, words, name)


def test_phantom_numbers_do_not_depend_on_storage_orientation():
    tables = []
    for codes in ("LPS", "RAS", "PIR"):
        ph = synthetic.make_phantom("syn-1", seed=4, orientation=codes)
        rows = qc.check_subject(
            "s",
            Volume(np.asarray(ph.mask.dataobj), ph.mask.affine),
            ph.labels,
            image=Volume(np.asarray(ph.image.dataobj), ph.image.affine),
        )
        tables.append(rows[rows["check"].isin(PLAUSIBILITY)].reset_index(drop=True))
    for t in tables[1:]:
        pd.testing.assert_series_equal(t["value"], tables[0]["value"], atol=1e-6)
        assert t["status"].tolist() == tables[0]["status"].tolist()


@pytest.mark.parametrize(
    ("pairs", "words"),
    [
        ([(3, 7), (4, 8)], "quadratus lumborum and erector spinae swapped"),
        ([(3, 5), (4, 6)], "psoas major and erector spinae swapped"),
        ([(1, 5), (2, 6)], "psoas major and multifidus swapped"),
    ],
)
def test_other_muscle_swaps_fail_with_the_two_muscles_named(example, pairs, words):
    image, mask, aff, labels = example
    rows = _check(image, _swap(mask, pairs), aff, labels, "LPS")
    _assert_gross_fail(rows, "arrangement", words, words)


def test_mask_only_checks_run_without_an_image(example):
    _, mask, aff, labels = example
    rows = qc.check_subject("s", Volume(_swap(mask, ES_MF), aff), labels)
    assert {"inside_body", "posterior_cover", "intensity"}.isdisjoint(set(rows["check"]))
    assert "fail" in set(rows.loc[rows["check"] == "arrangement", "status"])


def test_failing_subject_is_excluded_by_default_with_its_reason(example, tmp_path):
    image, mask, aff, labels = example
    rows = pd.concat(
        [
            _check(image, mask, aff, labels, "LPS").assign(subject="ok"),
            _check(image, _swap(mask, PS_QL), aff, labels, "LPS").assign(subject="bad"),
        ]
    )
    summary = qc.summarize_qc(rows)
    decisions = qc.init_decisions(summary, tmp_path / "qc_decisions.csv").set_index("subject")
    assert decisions.loc["bad", "decision"] == "exclude"
    assert "psoas major and quadratus lumborum swapped" in decisions.loc["bad", "reason"]
    assert decisions.loc["ok", "decision"] == "include"
    assert qc.excluded_subjects(tmp_path / "qc_decisions.csv")["subject"].tolist() == ["bad"]


# --------------------------------------------------------------------------------------------
# A second real scan from another scanner (skipped without /work/shared)
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(not TOTALSEG.is_dir(), reason="shared TotalSegmentator MR example not present")
def test_totalsegmentator_mr_labels_pass_and_their_shifted_copy_fails():
    img = nib.load(TOTALSEG / "mr.nii.gz")
    seg = np.asarray(nib.load(TOTALSEG / "mr_seg_total_mr.nii.gz").dataobj).astype(int)
    mask = np.zeros(seg.shape, dtype=np.int16)
    # autochthon (erector spinae and multifidus together) as erector spinae, iliopsoas as psoas
    for src, dst in ((47, 3), (46, 4), (49, 5), (48, 6)):
        mask[seg == src] = dst
    labels = LabelTable(
        (
            Label(3, "erector_spinae", "right"),
            Label(4, "erector_spinae", "left"),
            Label(5, "psoas_major", "right"),
            Label(6, "psoas_major", "left"),
        )
    )
    image = img.get_fdata()
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    clean = _check(image, mask, img.affine, labels, "LPS")
    plaus = clean[clean["check"].isin(PLAUSIBILITY)]
    assert set(plaus["status"]) == {"pass"}, plaus[plaus["status"] != "pass"]
    moved = _shift_ap(mask, -round(60.0 / abs(img.affine[1, 1])))
    _assert_gross_fail(
        _check(image, moved, img.affine, labels, "LPS"), "posterior_cover", "abdomen", "ts"
    )


def test_area_lower_bound_is_not_applied_at_a_muscles_tip_levels():
    mask = np.zeros((40, 40, 6), dtype=np.int16)
    mask[10:20, 10:20, :] = 1  # 100 voxels of 1 x 1 mm = 100 mm2 on every slice
    aff = _lps((1.0, 1.0, 5.0))
    groups = [("S1", np.array([0, 1])), ("L5", np.array([2, 3])), ("L4", np.array([4, 5]))]
    tips = qc.tip_levels(
        mask,
        TWO,
        pd.DataFrame({"slice": range(6), "level": ["S1", "S1", "L5", "L5", "L4", "L4"]}),
        axis=2,
    )
    assert tips[1] == {"S1", "L4"}
    rows = anatomy.plausibility_checks("t", mask, aff, TWO, groups=groups, tips=tips)
    area = rows[rows["check"] == "csa_range"].set_index("level")
    assert (area["value"] == 100.0).all()
    # multifidus range 150-1800 mm2: 100 mm2 is a flag in the middle, recorded at the tips
    assert area["status"].to_dict() == {"S1": "pass", "L5": "flag", "L4": "pass"}
    assert "tip level" in area.loc["S1", "reason"]
    # 60 mm2 is below 150 / 2: a fail in the middle level
    small = mask.copy()
    small[:, :, 2:4] = 0
    small[10:16, 10:20, 2:4] = 1
    rows = anatomy.plausibility_checks("t", small, aff, TWO, groups=groups, tips=tips)
    area = rows[rows["check"] == "csa_range"].set_index("level")
    assert area.loc["L5", "value"] == 60.0
    assert area.loc["L5", "status"] == "fail"
