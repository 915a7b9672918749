"""Tests of helpers.metrics: hand-computed references, phantom accuracy, invariants, flags, errors."""

from __future__ import annotations

import gzip
import json
import math
import time

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from plain_reference import plain_border_connected

from helpers.errors import ConfigError, GeometryMismatchError, InputFileError, LabelError
from helpers.labels import Label, LabelTable, parse_labels
from helpers.metrics import (
    ASYMMETRY_COLUMNS,
    METRICS_COLUMNS,
    MetricsSettings,
    measure,
    measure_files,
    read_levels,
    to_convex_concave,
    write_result,
)
from helpers.nifti import Volume
from helpers.synthetic import make_phantom, mirror_left_right, reorient
from helpers.validate import SettingError

NO_N4 = MetricsSettings(bias_correction=False)


# ============================================================================ a hand-made scan
# 40 x 40 x 2 voxels of 1 x 1 x 2 mm stored L-P-S: array i runs to the patient's left
# (world x = -i), j runs posterior (world y = -j).  A square body of fat (600) in air (0);
# muscle (50) with whole fat voxels (600) and one half-fat voxel (325).
LPS_1MM = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])
TINY_LABELS = {
    "labels": [
        {"value": 1, "muscle": "multifidus", "side": "right"},
        {"value": 2, "muscle": "multifidus", "side": "left"},
        {"value": 3, "muscle": "erector_spinae", "side": "right"},
        {"value": 4, "muscle": "erector_spinae", "side": "left"},
        {"value": 5, "muscle": "psoas_major", "side": "right"},
        {"value": 6, "muscle": "psoas_major", "side": "left"},
    ]
}


def tiny_scan(partial: bool = True) -> tuple[Volume, Volume, LabelTable]:
    img = np.zeros((40, 40, 2), np.float32)
    img[4:36, 4:36, :] = 600.0
    mask = np.zeros(img.shape, np.int16)
    # right multifidus (small i = patient's right): 4 x 4 on both slices
    mask[8:12, 10:14, 0] = 1
    mask[8:12, 10:14, 1] = 1
    # left multifidus: 4 x 4 on slice 0, 2 x 2 on slice 1
    mask[26:30, 10:14, 0] = 2
    mask[26:28, 10:12, 1] = 2
    # psoas, both sides, one slice
    mask[14:16, 6:8, 0] = 5
    mask[22:24, 6:8, 0] = 6
    img[mask > 0] = 50.0
    img[8:12, 10, 0] = 600.0  # right, slice 0: 4 of 16 voxels fat
    img[26:30, 10:12, 0] = 600.0  # left, slice 0: 8 of 16 voxels fat
    if partial:
        img[8, 13, 1] = 325.0  # right, slice 1: one voxel half fat
    labels = parse_labels(TINY_LABELS)
    return Volume(img, LPS_1MM), Volume(mask, LPS_1MM), labels


def _agg(res, level="all"):
    m = res.metrics
    return m[m["slice"].isna() & (m["level"] == level)].set_index(["muscle", "side"])


def test_hand_computed_areas_fat_and_asymmetry():
    img, mask, labels = tiny_scan()
    res = measure(img, mask, labels, subject="tiny", settings=NO_N4)
    agg = _agg(res)
    right, left = agg.loc[("multifidus", "right")], agg.loc[("multifidus", "left")]
    # CSA: mean per-slice area over the slices where present (1 mm2 voxels)
    assert right["csa_mm2"] == pytest.approx(16.0)
    assert left["csa_mm2"] == pytest.approx((16 + 4) / 2)
    assert (right["n_slices"], left["n_slices"]) == (2, 2)
    # fat pooled over all voxels, not the mean of the per-slice percentages
    assert right["fat_pct"] == pytest.approx(100 * 4.5 / 32)
    assert left["fat_pct"] == pytest.approx(100 * 8 / 20)  # per-slice mean would be 25 %
    assert left["fcsa_mm2"] == pytest.approx(10 * 0.6)
    assert right["fcsa_mm2"] == pytest.approx(16 * (1 - 4.5 / 32))
    # per-slice rows
    per = res.metrics[res.metrics["slice"].notna() & (res.metrics["muscle"] == "multifidus")]
    per = per.set_index(["side", "slice"])
    assert per.loc[("left", 0), "fat_pct"] == pytest.approx(50.0)
    assert per.loc[("left", 1), "csa_mm2"] == pytest.approx(4.0)
    assert per.loc[("right", 1), "fat_pct"] == pytest.approx(100 * 0.5 / 16)
    assert per.loc[("right", 0), "fcsa_mm2"] == pytest.approx(12.0)
    # asymmetry from the aggregates
    a = res.asymmetry.set_index(["level", "muscle"]).loc[("all", "multifidus")]
    fl, fr = 6.0, 16 * (1 - 4.5 / 32)
    assert a["cdi"] == pytest.approx((fl - fr) / ((fl + fr) / 2))
    assert a["cdi_abs"] == pytest.approx(abs(a["cdi"]))
    assert a["lfiar"] == pytest.approx(40 / (100 * 4.5 / 32))
    assert a["lfiar_log"] == pytest.approx(math.log(40 / (100 * 4.5 / 32)))
    assert a["lfiar_floor_pct"] == 0.5
    # the reference is written out: one subject-wide unmix fit on the two tissue intensities
    fit = res.reference["fits"][0]
    assert fit["method"] == "unmix"
    assert fit["scope"] == "subject"
    assert fit["muscle_intensity"] == pytest.approx(50.0)
    assert fit["fat_intensity"] == pytest.approx(600.0)


def test_threshold_method_counts_whole_voxels():
    img, mask, labels = tiny_scan(partial=False)
    res = measure(img, mask, labels, subject="tiny",
                  settings=MetricsSettings(fat_method="otsu", bias_correction=False))
    agg = _agg(res)
    assert agg.loc[("multifidus", "right"), "fat_pct"] == pytest.approx(100 * 4 / 32)
    assert agg.loc[("multifidus", "left"), "fat_pct"] == pytest.approx(40.0)
    fit = res.reference["fits"][0]
    assert 50 < fit["threshold"] < 600
    assert set(res.metrics["method"]) == {"otsu"}


def test_columns_types_and_order():
    img, mask, labels = tiny_scan()
    res = measure(img, mask, labels, subject="tiny", settings=NO_N4)
    assert tuple(res.metrics.columns) == METRICS_COLUMNS
    assert tuple(res.asymmetry.columns) == ASYMMETRY_COLUMNS
    assert str(res.metrics["slice"].dtype) == "Int64"
    agg = res.metrics[res.metrics["slice"].isna()]
    assert set(agg["level"]) == {"all"}  # no levels given
    assert res.fat_fraction.shape == img.data.shape
    assert np.isnan(res.fat_fraction[mask.data == 0]).all()


def test_absent_muscle_gives_nan_rows_with_flag_and_others_are_measured():
    img, mask, labels = tiny_scan()
    res = measure(img, mask, labels, subject="tiny", settings=NO_N4)
    agg = _agg(res)
    es = agg.loc[("erector_spinae", "right")]
    assert es["flags"].split(";").count("absent") == 1
    assert math.isnan(es["csa_mm2"])
    assert math.isnan(es["fat_pct"])
    assert math.isnan(es["fcsa_mm2"])
    assert es["n_slices"] == 0
    assert agg.loc[("multifidus", "left"), "csa_mm2"] > 0
    asym = res.asymmetry.set_index("muscle")
    assert math.isnan(asym.loc["erector_spinae", "cdi"])
    assert "absent" in asym.loc["erector_spinae", "flags"]
    # never a per-slice row for a muscle that is not there
    per = res.metrics[res.metrics["slice"].notna()]
    assert not (per["muscle"] == "erector_spinae").any()


def test_psoas_rows_carry_the_t2_caveat():
    img, mask, labels = tiny_scan()
    res = measure(img, mask, labels, subject="tiny", settings=NO_N4)
    m = res.metrics
    psoas = m["muscle"] == "psoas_major"
    assert psoas.any()
    assert m.loc[psoas, "flags"].str.contains("psoas_t2_unreliable").all()
    assert not m.loc[~psoas, "flags"].str.contains("psoas_t2_unreliable").any()
    assert res.asymmetry.set_index("muscle").loc["psoas_major", "flags"].count("psoas_t2") == 1
    assert "Wesselink" in res.reference["psoas_caveat"]
    # the caveat does not stop psoas from being measured
    assert _agg(res).loc[("psoas_major", "left"), "csa_mm2"] == pytest.approx(4.0)


def test_field_of_view_edges():
    img, mask, labels = tiny_scan()
    data = mask.data.copy()
    # left erector spinae: cut by the image border on slice 0, whole on slice 1
    data[0:3, 20:24, 0] = 4
    data[30:33, 20:24, 1] = 4
    # right erector spinae: cut by the border on its only slice
    data[37:40, 20:22, 1] = 3
    img_data = img.data.copy()
    img_data[data > 0] = np.where(img_data[data > 0] > 300, img_data[data > 0], 50.0)
    # the erector boxes sit on the "wrong" sides (they test the edges): side check off
    res = measure(Volume(img_data, LPS_1MM), Volume(data, LPS_1MM), labels, subject="t",
                  settings=MetricsSettings(bias_correction=False, side_check=False))
    agg = _agg(res)
    left, right = agg.loc[("erector_spinae", "left")], agg.loc[("erector_spinae", "right")]
    assert "some_slices_truncated" in left["flags"]
    assert left["csa_mm2"] == pytest.approx(12.0)  # the whole slice only
    assert left["n_slices"] == 1
    assert right["flags"].split(";")[0] == "truncated"
    assert math.isnan(right["csa_mm2"])
    per = res.metrics[(res.metrics["muscle"] == "erector_spinae") & res.metrics["slice"].notna()]
    cut = per[(per["side"] == "left") & (per["slice"] == 0)].iloc[0]
    assert "truncated" in cut["flags"]
    assert math.isnan(cut["csa_mm2"])
    # every muscle here reaches the first or last slice of the 2-slice stack
    assert agg["flags"].str.contains("z_edge").all()
    # "none" keeps the cut slices; "any" also drops stacks that reach the first/last slice
    keep = measure(Volume(img_data, LPS_1MM), Volume(data, LPS_1MM), labels, subject="t",
                   settings=MetricsSettings(bias_correction=False, side_check=False, edge_rule="none"))
    assert _agg(keep).loc[("erector_spinae", "right"), "csa_mm2"] == pytest.approx(6.0)
    strict = measure(Volume(img_data, LPS_1MM), Volume(data, LPS_1MM), labels, subject="t",
                     settings=MetricsSettings(bias_correction=False, side_check=False, edge_rule="any"))
    assert _agg(strict)["csa_mm2"].isna().all()


def test_vertebra_labels_give_levels():
    img, mask, _labels = tiny_scan()
    data = mask.data.copy()
    data[18:22, 26:30, 0] = 9
    data[18:22, 26:30, 1] = 10
    doc = {"labels": [*TINY_LABELS["labels"],
                      {"value": 9, "muscle": "vertebra_L5", "side": None},
                      {"value": 10, "muscle": "vertebra_L4", "side": None}]}
    res = measure(img, Volume(data, LPS_1MM), parse_labels(doc), subject="t", settings=NO_N4)
    assert res.reference["levels_source"] == "vertebra_labels"
    agg = res.metrics[res.metrics["slice"].isna()]
    assert list(dict.fromkeys(agg["level"])) == ["all", "L4", "L5"]
    assert not agg["muscle"].str.startswith("vertebra").any()
    l5 = _agg(res, "L5").loc[("multifidus", "left")]
    assert l5["csa_mm2"] == pytest.approx(16.0)
    assert l5["fat_pct"] == pytest.approx(50.0)
    per = res.metrics[res.metrics["slice"].notna()]
    assert set(per.loc[per["slice"] == 1, "level"]) == {"L4"}


def test_levels_table_and_its_errors(tmp_path):
    img, mask, labels = tiny_scan()
    levels = pd.DataFrame({"slice": [0, 1], "level": ["L5", "L4"]})
    res = measure(img, mask, labels, subject="t", settings=NO_N4, levels=levels)
    assert _agg(res, "L4").loc[("multifidus", "left"), "csa_mm2"] == pytest.approx(4.0)
    csv = tmp_path / "levels.csv"
    csv.write_text("subject,slice,level\nt,0,L5\nt,1,L4\nother,0,L1\n")
    table = read_levels(csv, subject="t")
    assert table["level"].tolist() == ["L5", "L4"]
    with pytest.raises(InputFileError, match=r"levels\.csv: levels table has no rows for subject"):
        read_levels(csv, subject="nobody")
    bad = tmp_path / "bad_levels.csv"
    bad.write_text("slice,vertebra\n0,L5\n")
    with pytest.raises(InputFileError, match=r"bad_levels\.csv: .*lacks column"):
        read_levels(bad)
    bad.write_text("slice,level\n0,L5\n0,L4\n")
    with pytest.raises(InputFileError, match=r"bad_levels\.csv: .*slice 0 is listed twice"):
        read_levels(bad)
    bad.write_text("slice,level\n1.5,L5\n")
    with pytest.raises(InputFileError, match="non-negative integer"):
        read_levels(bad)
    bad.write_text("slice,level\n0,L5\n7,L4\n")
    with pytest.raises(InputFileError, match=r"bad_levels\.csv: .*slice 7 is outside"):
        measure(img, mask, labels, subject="t", settings=NO_N4, levels=read_levels(bad))


def test_unsided_labels_are_split_by_anatomy():
    img, mask, labels = tiny_scan()
    merged = np.where(mask.data == 2, 1, np.where(mask.data == 6, 5, mask.data))
    unsided = LabelTable((Label(1, "multifidus", None), Label(5, "psoas_major", None)))
    res = measure(img, Volume(merged.astype(np.int16), LPS_1MM), unsided, subject="t",
                  settings=NO_N4)
    sided = measure(img, mask, labels, subject="t", settings=NO_N4)
    a, b = _agg(res), _agg(sided)
    for side in ("left", "right"):
        for col in ("csa_mm2", "fat_pct"):
            assert a.loc[("multifidus", side), col] == pytest.approx(b.loc[("multifidus", side), col])


# ============================================================================ settings
def test_settings_from_mapping_validates_and_names_the_key():
    s = MetricsSettings.from_mapping({"fat_method": "gmm3", "lfiar_floor_pct": 1,
                                      "n4_iterations": [20, 20]})
    assert s.lfiar_floor_pct == 1.0
    assert s.n4_iterations == (20, 20)
    assert MetricsSettings.from_mapping(None) == MetricsSettings()
    cases = [
        ({"fat_metod": "gmm3"}, r"^fat_metod: unknown key \(did you mean 'fat_method'\?\)"),
        ({"fat_method": "gmm4"}, r"^fat_method: 'gmm4' is not one of"),
        ({"bias_correction": "yes"}, r"^bias_correction: must be true or false"),
        ({"lfiar_floor_pct": 0}, r"^lfiar_floor_pct: must be a number"),
        ({"reference_scope": "side"}, r"^reference_scope: 'side' is not one of subject, level"),
        ({"edge_rule": "drop"}, r"^edge_rule: "),
        ({"cdi_formula": "kim"}, r"^cdi_formula: "),
        ({"n4_iterations": [0]}, r"^n4_iterations: "),
        ({"n4_fit_spacing_mm": 0}, r"^n4_fit_spacing_mm: "),
    ]
    for mapping, pattern in cases:
        with pytest.raises(SettingError, match=pattern) as err:
            MetricsSettings.from_mapping(mapping)
        assert err.value.key == next(iter(mapping))  # the key travels with the error
    with pytest.raises(ConfigError, match="expected a mapping"):
        MetricsSettings.from_mapping(["unmix"])  # type: ignore[arg-type]
    assert json.loads(json.dumps(s.to_dict()))["n4_iterations"] == [20, 20]


def test_formula_choices():
    img, mask, labels = tiny_scan()
    s = MetricsSettings(bias_correction=False, cdi_formula="log_ratio",
                        lfiar_formula="normalized_difference", lfiar_floor_pct=2.0)
    a = measure(img, mask, labels, subject="t", settings=s).asymmetry.set_index("muscle")
    row = a.loc["multifidus"]
    fl, fr = 6.0, 16 * (1 - 4.5 / 32)
    il, ir = 40.0, 100 * 4.5 / 32
    assert row["cdi"] == pytest.approx(math.log(fl / fr))
    assert row["lfiar"] == pytest.approx((il - ir) / ((il + ir) / 2))
    assert row["lfiar_floor_pct"] == 2.0


def test_lfiar_floor_keeps_lean_muscle_finite():
    img, mask, labels = tiny_scan(partial=False)
    data = img.data.copy()
    data[8:12, 10, 0] = 50.0  # right multifidus now lean: FI_R = 0
    res = measure(Volume(data, LPS_1MM), mask, labels, subject="t", settings=NO_N4)
    row = res.asymmetry.set_index("muscle").loc["multifidus"]
    assert row["fat_pct_right"] == pytest.approx(0.0)
    assert row["lfiar"] == pytest.approx(40 / 0.5)
    assert row["lfiar_log"] == pytest.approx(math.log(40 / 0.5))


def test_convex_concave_indices():
    a = pd.DataFrame({
        "subject": ["s1", "s2", "s3"], "level": ["all"] * 3, "muscle": ["multifidus"] * 3,
        "fcsa_left_mm2": [90.0, 90.0, 90.0], "fcsa_right_mm2": [110.0, 110.0, 110.0],
        "fat_pct_left": [20.0, 20.0, 20.0], "fat_pct_right": [10.0, 10.0, 0.1],
        "lfiar_floor_pct": [0.5] * 3,
    })
    cc = to_convex_concave(a, {"s1": "right", "s2": "Left"})
    assert cc.loc[0, "cdi_cc"] == pytest.approx((110 - 90) / 100)
    assert cc.loc[0, "lfiar_cc"] == pytest.approx(10 / 20)
    assert cc.loc[1, "cdi_cc"] == pytest.approx((90 - 110) / 100)
    assert cc.loc[1, "lfiar_cc"] == pytest.approx(2.0)
    assert cc.loc[1, "lfiar_cc_log"] == pytest.approx(math.log(2.0))
    assert cc.loc[0, "cdi_cc_abs"] == pytest.approx(0.2)
    assert math.isnan(cc.loc[2, "cdi_cc"])
    assert pd.isna(cc.loc[2, "convex_side"])
    with pytest.raises(ConfigError, match="subject 's1' has 'up'"):
        to_convex_concave(a, {"s1": "up"})


# ============================================================================ outputs
def test_write_result_is_complete_and_atomic(tmp_path):
    img, mask, labels = tiny_scan()
    res = measure(img, mask, labels, subject="tiny", settings=NO_N4)
    paths = write_result(res, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "asymmetry.csv", "metrics.csv", "reference.json"]
    m = pd.read_csv(paths["metrics"], keep_default_na=False)
    assert tuple(m.columns) == METRICS_COLUMNS
    assert (m.loc[m["level"] == "all", "slice"] == "").all()  # slice empty on aggregates
    assert (m.loc[m["flags"].str.contains("absent"), "csa_mm2"] == "").all()  # NaN, not 0
    a = pd.read_csv(paths["asymmetry"])
    assert tuple(a.columns) == ASYMMETRY_COLUMNS
    ref = json.loads(paths["reference"].read_text())
    assert ref["method"] == "unmix"
    assert ref["fits"][0]["fat_intensity"] == pytest.approx(600)
    assert ref["bias_correction"] == {"applied": False}


# ============================================================================ phantoms
PHANTOM_KW = {
    "fat_pct": {("multifidus", "left"): 18, ("multifidus", "right"): 9,
                ("erector_spinae", "left"): 9, ("erector_spinae", "right"): 14,
                ("quadratus_lumborum", "left"): 6, ("quadratus_lumborum", "right"): 10},
}


def _volumes(ph):
    img = Volume(np.asarray(ph.image.dataobj, dtype=np.float32), ph.image.affine)
    msk = Volume(np.asarray(ph.mask.dataobj).astype(np.int16), ph.mask.affine)
    return img, msk


@pytest.fixture(scope="module")
def biased_phantoms():
    """Two full-size phantoms with +-30 % left-right shading, stored LPS and RAS, measured with
    the default settings (N4 on, default method)."""
    out = []
    for subject, seed, orientation, bias, cdi in [
        ("syn-lps", 31, "LPS", 0.3, {"multifidus": -0.15}),
        ("syn-ras", 32, "RAS", -0.3, {"erector_spinae": 0.12}),
    ]:
        ph = make_phantom(subject, seed=seed, orientation=orientation, bias_lr=bias, cdi=cdi,
                          **PHANTOM_KW)
        img, msk = _volumes(ph)
        res = measure(img, msk, ph.labels, subject=subject, levels=ph.levels)
        out.append((ph, res))
    return out


def _merged(res, ph):
    keys = ["level", "slice", "muscle", "side"]
    got = res.metrics.copy()
    truth = ph.truth.copy()
    for df in (got, truth):
        df["slice"] = df["slice"].astype("Int64")
        df["level"] = df["level"].astype("string")
    return got.merge(truth, on=keys, suffixes=("", "_t"), how="outer", indicator=True)


def test_phantom_areas_are_exact(biased_phantoms):
    for ph, res in biased_phantoms:
        m = _merged(res, ph)
        assert (m["_merge"] == "both").all(), "rows differ from the truth table"
        finite = m["csa_mm2_t"].notna()
        np.testing.assert_allclose(m.loc[finite, "csa_mm2"], m.loc[finite, "csa_mm2_t"],
                                   rtol=1e-9)
        assert (m["n_slices"] == m["n_slices_t"]).all()
        assert m.loc[~finite, "csa_mm2"].isna().all()


def test_phantom_fat_cdi_lfiar_accuracy_and_sides(biased_phantoms):
    for ph, res in biased_phantoms:
        m = _merged(res, ph)
        agg = m[m["slice"].isna() & m["fat_pct_t"].notna()]
        mae = (agg["fat_pct"] - agg["fat_pct_t"]).abs().mean()
        assert mae <= 1.0, f"{ph.subject}: fat_pct MAE {mae:.2f} pp"
        a = res.asymmetry.merge(ph.asymmetry, on=["level", "muscle"], suffixes=("", "_t"))
        a = a[a["cdi_t"].notna()]
        cdi_err = (a["cdi"] - a["cdi_t"]).abs().max()
        assert cdi_err <= 0.01, f"{ph.subject}: cdi error {cdi_err:.4f}"
        rel = (a["lfiar"] / a["lfiar_t"] - 1).abs().median()
        assert rel <= 0.03, f"{ph.subject}: lfiar median relative error {rel:.3f}"
        # sides never swapped: every clear left/right difference keeps its sign
        clear = a["cdi_t"].abs() > 0.02
        assert (np.sign(a.loc[clear, "cdi"]) == np.sign(a.loc[clear, "cdi_t"])).all()
        fi_t = a["fat_pct_left"] - a["fat_pct_right"]
        truth_fi = ph.truth[ph.truth["slice"].isna()].pivot_table(
            index=["level", "muscle"], columns="side", values="fat_pct")
        d_t = (truth_fi["left"] - truth_fi["right"]).rename("d_t").reset_index()
        a = a.assign(d=fi_t).merge(d_t, on=["level", "muscle"])
        clear = a["d_t"].abs() > 1.0
        assert clear.sum() >= 5
        assert (np.sign(a.loc[clear, "d"]) == np.sign(a.loc[clear, "d_t"])).all()


def test_bias_correction_is_recorded_and_needed(biased_phantoms):
    ph, res = biased_phantoms[0]
    bc = res.reference["bias_correction"]
    assert bc["applied"]
    assert bc["method"] == "N4 (SimpleITK)"
    assert bc["bias_cv_pct"] > 5
    # the field N4 found is darker on the left, as planted (bias_lr > 0: right brighter)
    assert bc["bias_left_right_ratio"] < 0.95
    assert bc["lr_ratio_before"] < 0.95  # fat behind the left back muscles is darker
    assert abs(bc["lr_ratio_after"] - 1) < 0.02
    img, msk = _volumes(ph)
    raw = measure(img, msk, ph.labels, subject=ph.subject, settings=NO_N4, levels=ph.levels)

    def lfiar_err(r):
        a = r.asymmetry.merge(ph.asymmetry, on=["level", "muscle"], suffixes=("", "_t"))
        return float((a["lfiar"] / a["lfiar_t"] - 1).abs().median())

    assert lfiar_err(raw) > 2 * lfiar_err(res)


@pytest.fixture(scope="module")
def small_phantom():
    return make_phantom("syn-small", template="small", seed=41, bias_lr=0.25, **PHANTOM_KW)


def _measure_ph(ph, settings=NO_N4, levels=None):
    img, msk = _volumes(ph)
    return measure(img, msk, ph.labels, subject=ph.subject, settings=settings,
                   levels=ph.levels if levels is None else levels)


def _aggregates(res):
    m = res.metrics[res.metrics["slice"].isna()]
    return m.set_index(["level", "muscle", "side"]).sort_index()


@pytest.mark.parametrize("settings", [NO_N4, MetricsSettings()], ids=["no_n4", "n4"])
def test_mirroring_negates_cdi_and_inverts_lfiar(small_phantom, settings):
    a = _measure_ph(small_phantom, settings).asymmetry.set_index(["level", "muscle"])
    b = _measure_ph(mirror_left_right(small_phantom), settings).asymmetry
    b = b.set_index(["level", "muscle"]).loc[a.index]
    tol = 1e-9 if settings is NO_N4 else 0.01
    ok = a["cdi"].notna()
    np.testing.assert_allclose(b.loc[ok, "cdi"], -a.loc[ok, "cdi"], atol=tol)
    np.testing.assert_allclose(b.loc[ok, "lfiar_log"], -a.loc[ok, "lfiar_log"],
                               atol=tol if settings is NO_N4 else 0.05)
    both = ok & (a["fat_pct_left"] > 0.5) & (a["fat_pct_right"] > 0.5)
    np.testing.assert_allclose(b.loc[both, "lfiar"] * a.loc[both, "lfiar"], 1.0,
                               atol=tol if settings is NO_N4 else 0.05)


@pytest.mark.parametrize("settings", [NO_N4], ids=["no_n4"])
def test_scaling_intensities_leaves_fat_unchanged(small_phantom, settings):
    img, msk = _volumes(small_phantom)
    a = measure(img, msk, small_phantom.labels, subject="s", settings=settings)
    scaled = Volume(img.data * 3.7, img.affine)
    b = measure(scaled, msk, small_phantom.labels, subject="s", settings=settings)
    tol = 1e-3 if settings is NO_N4 else 0.05
    np.testing.assert_allclose(_aggregates(b)["fat_pct"], _aggregates(a)["fat_pct"], atol=tol)


def _reoriented(ph, codes):
    img = reorient(ph.image, codes)
    msk = reorient(ph.mask, codes)
    # the level table follows the slices: map them through world z
    from helpers.nifti import slice_axis

    ax_old, ax_new = slice_axis(ph.image.affine), slice_axis(img.affine)
    z_old = ph.image.affine[2, ax_old] * ph.levels["slice"] + ph.image.affine[2, 3]
    new_slice = np.rint((z_old - img.affine[2, 3]) / img.affine[2, ax_new]).astype(int)
    levels = pd.DataFrame({"slice": new_slice, "level": ph.levels["level"]})
    return (Volume(np.asarray(img.dataobj, dtype=np.float32), img.affine),
            Volume(np.asarray(msk.dataobj).astype(np.int16), msk.affine), levels)


@pytest.mark.parametrize("codes", ["LPI", "RAS", "LAS", "PLS"])
def test_storage_order_and_slice_order_do_not_change_aggregates(small_phantom, codes):
    ref = _measure_ph(small_phantom)
    img, msk, levels = _reoriented(small_phantom, codes)
    res = measure(img, msk, small_phantom.labels, subject=small_phantom.subject,
                  settings=NO_N4, levels=levels)
    a, b = _aggregates(ref), _aggregates(res)
    for col in ("csa_mm2", "fat_pct", "fcsa_mm2", "n_slices"):
        np.testing.assert_allclose(b[col].astype(float), a[col].astype(float), rtol=1e-9,
                                   atol=1e-9, err_msg=col)
    np.testing.assert_allclose(res.asymmetry["cdi"], ref.asymmetry["cdi"], atol=1e-9)


def test_storage_order_with_n4(small_phantom):
    ref = _measure_ph(small_phantom, MetricsSettings())
    img, msk, levels = _reoriented(small_phantom, "RAS")
    res = measure(img, msk, small_phantom.labels, subject="s", settings=MetricsSettings(),
                  levels=levels)
    np.testing.assert_allclose(_aggregates(res)["fat_pct"], _aggregates(ref)["fat_pct"],
                               atol=0.1)
    np.testing.assert_allclose(res.asymmetry["cdi"], ref.asymmetry["cdi"], atol=0.003)


def test_reference_per_level(small_phantom):
    res = _measure_ph(small_phantom, MetricsSettings(bias_correction=False,
                                                     reference_scope="level"))
    scopes = [f["scope"] for f in res.reference["fits"]]
    assert set(scopes) == set(small_phantom.levels["level"])
    m = _merged(res, small_phantom)
    agg = m[m["slice"].isna() & m["fat_pct_t"].notna()]
    assert (agg["fat_pct"] - agg["fat_pct_t"]).abs().mean() <= 1.5


def test_pool_psoas_setting_is_recorded(small_phantom):
    a = _measure_ph(small_phantom)
    b = _measure_ph(small_phantom, MetricsSettings(bias_correction=False, pool_psoas=True))
    assert "psoas_major" not in a.reference["pooled_muscles"]
    assert "psoas_major" in b.reference["pooled_muscles"]


# ============================================================================ bad input
@pytest.fixture(scope="module")
def scan_files(tmp_path_factory, small_phantom):
    from helpers.synthetic import write_phantom

    folder = tmp_path_factory.mktemp("scan")
    return write_phantom(small_phantom, folder)


def _save(data, affine, path):
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def test_measure_files_defaults_subject_from_the_name(scan_files):
    res = measure_files(scan_files["image"], scan_files["mask"], scan_files["labels"],
                        settings=NO_N4, levels_path=scan_files["levels"])
    assert set(res.metrics["subject"]) == {"syn-small"}
    assert res.reference["subject"] == "syn-small"
    assert set(res.metrics["level"].dropna()) >= {"all"}


def test_truncated_and_unreadable_nifti(scan_files, tmp_path):
    raw = scan_files["image"].read_bytes()
    cut = tmp_path / "cut_T2w.nii.gz"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputFileError, match=r"cut_T2w\.nii\.gz: unreadable or truncated"):
        measure_files(cut, scan_files["mask"], scan_files["labels"], settings=NO_N4)
    junk = tmp_path / "junk_T2w.nii.gz"
    junk.write_bytes(gzip.compress(b"not a nifti at all"))
    with pytest.raises(InputFileError, match=r"junk_T2w\.nii\.gz: "):
        measure_files(junk, scan_files["mask"], scan_files["labels"], settings=NO_N4)


def test_grid_mismatch_shape_and_affine(scan_files, tmp_path):
    img = nib.load(scan_files["image"])
    mask = np.asarray(nib.load(scan_files["mask"]).dataobj)
    small = _save(mask[:, :, :-1], img.affine, tmp_path / "short_dseg.nii.gz")
    with pytest.raises(GeometryMismatchError, match=r"short_dseg\.nii\.gz: grid mismatch: shape"):
        measure_files(scan_files["image"], small, scan_files["labels"], settings=NO_N4)
    moved = img.affine.copy()
    moved[0, 3] += 0.5
    shifted = _save(mask, moved, tmp_path / "shifted_dseg.nii.gz")
    with pytest.raises(GeometryMismatchError, match=r"shifted_dseg\.nii\.gz: grid mismatch: affine"):
        measure_files(scan_files["image"], shifted, scan_files["labels"], settings=NO_N4)
    # within tolerance is the same grid
    nudged = img.affine.copy()
    nudged[0, 3] += 1e-5
    ok = _save(mask, nudged, tmp_path / "nudged_dseg.nii.gz")
    measure_files(scan_files["image"], ok, scan_files["labels"], settings=NO_N4)


def test_2d_and_4d_inputs(scan_files, tmp_path):
    img = nib.load(scan_files["image"])
    data = np.asarray(img.dataobj)
    flat = _save(data[:, :, 0], img.affine, tmp_path / "flat_T2w.nii.gz")
    with pytest.raises(InputFileError, match=r"flat_T2w\.nii\.gz: expected a 3-D volume, got 2-D"):
        measure_files(flat, scan_files["mask"], scan_files["labels"], settings=NO_N4)
    four = _save(np.stack([data, data], axis=3), img.affine, tmp_path / "four_T2w.nii.gz")
    with pytest.raises(InputFileError, match=r"four_T2w\.nii\.gz: expected a 3-D volume, got 4-D"):
        measure_files(four, scan_files["mask"], scan_files["labels"], settings=NO_N4)


def test_undeclared_label_values(scan_files, tmp_path):
    m = nib.load(scan_files["mask"])
    data = np.asarray(m.dataobj).copy()
    data[0, 0, 0] = 12
    bad = _save(data, m.affine, tmp_path / "extra_dseg.nii.gz")
    with pytest.raises(LabelError, match=r"extra_dseg\.nii\.gz: mask holds label values \[12\]"):
        measure_files(scan_files["image"], bad, scan_files["labels"], settings=NO_N4)


def test_nan_intensities(scan_files, tmp_path):
    img = nib.load(scan_files["image"])
    data = np.asarray(img.dataobj).astype(np.float32)
    data[10, 10, 2] = np.nan
    bad = _save(data, img.affine, tmp_path / "nan_T2w.nii.gz")
    with pytest.raises(InputFileError, match=r"nan_T2w\.nii\.gz: 1 voxels are NaN"):
        measure_files(bad, scan_files["mask"], scan_files["labels"], settings=NO_N4)


def test_in_memory_volumes_are_checked_too():
    img, mask, labels = tiny_scan()
    bad = img.data.copy()
    bad[0, 0, 0] = np.inf
    with pytest.raises(InputFileError, match="1 voxels are NaN or infinite"):
        measure(Volume(bad, LPS_1MM), mask, labels, subject="t", settings=NO_N4)
    with pytest.raises(InputFileError, match="expected a 3-D volume, got 2-D"):
        measure(Volume(img.data[..., 0], LPS_1MM), mask, labels, subject="t", settings=NO_N4)
    empty = Volume(np.zeros_like(mask.data), LPS_1MM)
    with pytest.raises(InputFileError, match="mask holds none of the muscles"):
        measure(img, empty, labels, subject="t", settings=NO_N4)


def test_fat_suppressed_image(small_phantom, tmp_path):
    img = np.asarray(small_phantom.image.dataobj, dtype=np.float32)
    fs = img * (1 - 0.95 * small_phantom.fat_fraction)  # fat nearly nulled
    path = _save(fs, small_phantom.image.affine, tmp_path / "stir_T2w.nii.gz")
    mask = _save(np.asarray(small_phantom.mask.dataobj), small_phantom.mask.affine,
                 tmp_path / "stir_dseg.nii.gz")
    (tmp_path / "labels.json").write_text(json.dumps(
        {"labels": [{"value": v.value, "muscle": v.muscle, "side": v.side}
                    for v in small_phantom.labels.labels]}))
    for settings in (NO_N4, MetricsSettings()):
        with pytest.raises(InputFileError, match=r"stir_T2w\.nii\.gz: fat darker than muscle"):
            measure_files(path, mask, tmp_path / "labels.json", settings=settings)


# ============================================================================ speed
def test_speed_without_bias_correction_is_loose_but_bounded():
    ph = make_phantom("speed", seed=5, shape=(256, 256, 20))
    img, msk = _volumes(ph)
    measure(img, msk, ph.labels, subject="speed", settings=NO_N4)  # warm caches
    t0 = time.perf_counter()
    measure(img, msk, ph.labels, subject="speed", settings=NO_N4)
    assert time.perf_counter() - t0 < 2.0  # target 0.5 s on one quiet core (benchmark)


# ============================================================================ speed-ups, same numbers
# The fast paths of the metrics stage must give exactly the numbers of the plain computations
# they replace (benchmarks/bench_metrics.py measures the speed).
def _rice_mode_full_grid(nu: float, sd: float) -> float:
    """The plain computation: the log-density on the whole 4001-point grid."""
    from scipy.special import i0e

    x = np.linspace(1e-6, nu + 6 * sd, 4001)
    logpdf = np.log(x) - (x - nu) ** 2 / (2 * sd**2) + np.log(i0e(x * nu / sd**2))
    i = int(np.argmax(logpdf))
    if 0 < i < x.size - 1:
        y0, y1, y2 = logpdf[i - 1], logpdf[i], logpdf[i + 1]
        denom = y0 - 2 * y1 + y2
        if denom < 0:
            return float(x[i] + (x[1] - x[0]) * 0.5 * (y0 - y2) / denom)
    return float(x[i])


def test_windowed_rice_mode_is_the_full_grid_maximum():
    from helpers import intensity

    rng = np.random.default_rng(4)
    sds = [1e-3, 0.5, 1.0, 7.0, 24.0, 300.0, *rng.uniform(0.05, 100, 12)]
    for sd in sds:
        nus = [0.0, 1e-9, 0.5 * sd, sd, 1.3 * sd, 3 * sd, 40 * sd, 2000 * sd,
               *rng.uniform(0, 5 * sd, 8), *rng.uniform(0, 60 * sd, 8)]
        for nu in nus:
            assert intensity._rice_mode(float(nu), float(sd)) == _rice_mode_full_grid(float(nu), float(sd))


def test_distance_maps_on_a_crop_equal_the_whole_slice_transform():
    from scipy import ndimage as ndi

    from helpers import arrays

    rng = np.random.default_rng(5)
    for _ in range(60):
        shape = (int(rng.integers(8, 90)), int(rng.integers(8, 90)))
        feats = ndi.binary_dilation(rng.random(shape) > 0.992, iterations=int(rng.integers(0, 4)))
        if not feats.any():
            continue
        sampling = (float(rng.uniform(0.4, 3.0)), float(rng.uniform(0.4, 3.0)))
        reach = float(rng.uniform(0.5, 15.0))
        full = ndi.distance_transform_edt(~feats, sampling=sampling)
        fast = arrays._distance_to(feats, sampling, reach)
        near = full <= reach
        assert np.array_equal(fast[near], full[near])
        assert np.all(fast[~near] > reach)


def test_body_mask_fills_every_in_plane_hole():
    from scipy import ndimage as ndi

    from helpers import fat

    # a bright body in dark air, with a dark cavity inside on every slice
    img = np.full((60, 50, 4), 2.0, np.float32)
    img[10:50, 8:42] = 400.0
    img[20:30, 15:25] = 3.0
    body = fat.body_mask(img, np.diag([1.0, 1.0, 4.0, 1.0]))
    assert body[20:30, 15:25].all()
    assert not body[:5].any()
    assert not body[:, :4].any()
    for k in range(body.shape[2]):
        assert np.array_equal(body[..., k], ndi.binary_fill_holes(body[..., k]))


def test_tissue_geometry_computed_once_equals_each_mask_computed_alone(small_phantom):
    """The fat step computes the tissue geometry once (each distance map once per slice) and
    passes it on; every mask equals the function that computes it alone, whole stack and
    restricted to a few slices, and the tissue intensities come out the same either way."""
    from helpers import fat
    from helpers import tissue_geometry as tg
    from helpers.nifti import slice_axis

    img, msk = _volumes(small_phantom)
    arr = np.ascontiguousarray(img.data, dtype=np.float32)
    muscle = np.asarray(msk.data) > 0
    affine = img.affine
    geo = tg.tissue_geometry(arr, muscle, affine)
    body = tg.body_mask(arr, affine, muscle)
    band = tg.subcutaneous_band(body, muscle, affine)
    assert np.array_equal(geo.body, body)
    assert np.array_equal(geo.band, band)
    assert np.array_equal(geo.posterior, tg.posterior_of_muscle(muscle, affine))
    assert np.array_equal(geo.shell, tg.perimuscular_shell(muscle, affine))
    assert np.array_equal(geo.band_core, tg.without_skin_rim(band, body, affine))
    assert geo.band.any()
    assert geo.shell.any()
    assert geo.band_core.any()
    ax = slice_axis(affine)
    view = [1, 1, 1]
    view[ax] = arr.shape[ax]
    sel = np.broadcast_to((np.arange(arr.shape[ax]) % 3 == 0).reshape(view), arr.shape)
    part = geo.restricted(sel)
    alone_band = tg.subcutaneous_band(body & sel, muscle & sel, affine)
    assert np.array_equal(part.band, alone_band)
    assert np.array_equal(part.shell, tg.perimuscular_shell(muscle & sel, affine))
    assert np.array_equal(part.band_core, tg.without_skin_rim(alone_band, body & sel, affine))
    for g, m in ((geo, muscle), (part, muscle & sel)):
        passed = fat.tissue_intensities(arr, m, affine, geometry=g)
        alone = fat.tissue_intensities(arr, m, affine, body=g.body, band=g.band)
        assert passed == alone


# ============================================================================ fast paths (issue 7)
def _plain_posterior(muscle, affine, ax):
    """Voxels posterior to the muscles' mean world y on their slice, from the whole volume's
    world y (the straightforward form of ``tissue_geometry._posterior_of_muscle``)."""
    from helpers import tissue_geometry

    y = np.broadcast_to(tissue_geometry._world_coordinate(muscle.shape, affine, 1), muscle.shape)
    y_m, mus_m = np.moveaxis(y, ax, -1), np.moveaxis(muscle, ax, -1)
    out = np.zeros(mus_m.shape, dtype=bool)
    for k in range(mus_m.shape[-1]):
        if mus_m[..., k].any():
            out[..., k] = y_m[..., k] < float(y_m[..., k][mus_m[..., k]].mean())
    return np.moveaxis(out, -1, ax)


def _use_straightforward(monkeypatch):
    """Swap every fast path of the measurement for the plain computation it stands for:
    ``ndi.label``, whole-slice distance transforms, the
    dilation of the whole volume, the world y of the whole volume, no C-order conversion."""
    from scipy import ndimage as ndi

    from helpers import arrays, fat, tissue_geometry

    def whole_slice(inside, sampling, reach_mm, roi, kind, limit=None):
        return ndi.distance_transform_edt(inside, sampling=sampling)

    def whole_volume(mask, margin, region=None):
        out = ~ndi.binary_dilation(mask, iterations=margin)
        return out if region is None else out[region]

    monkeypatch.setattr(arrays, "_label", ndi.label)
    monkeypatch.setattr(arrays, "_border_connected_inplane", plain_border_connected)
    monkeypatch.setattr(arrays, "_edt_near", whole_slice)
    monkeypatch.setattr(arrays, "_away_from", whole_volume)
    monkeypatch.setattr(tissue_geometry, "_posterior_of_muscle", _plain_posterior)
    monkeypatch.setattr(fat, "c_order", lambda data, dtype=None: np.asarray(data, dtype=dtype))


def _same_result(fast, plain):
    pd.testing.assert_frame_equal(fast.metrics, plain.metrics, check_exact=True)
    pd.testing.assert_frame_equal(fast.asymmetry, plain.asymmetry, check_exact=True)
    assert np.array_equal(fast.fat_fraction, plain.fat_fraction, equal_nan=True)
    a, b = dict(fast.reference), dict(plain.reference)
    for ref in (a, b):
        ref.pop("seconds")
        ref["bias_correction"] = {k: v for k, v in ref["bias_correction"].items()
                                  if k != "seconds"}
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_fast_paths_give_the_numbers_of_the_straightforward_computation(
    small_phantom, example_dir, monkeypatch
):
    """The optimised measurement (order statistics by selection, cc3d labels, cropped distance
    maps, C-order gathers) against the plain one, to the last bit: small and full phantom grids
    (LPS; RAS rotated), the real example, N4 on and off, per-level fits."""
    full = make_phantom("syn-full", seed=51, orientation="RAS", rotation_deg=6.0, bias_lr=-0.25,
                        **PHANTOM_KW)
    cases = [
        (small_phantom, NO_N4),
        (small_phantom, MetricsSettings()),
        (small_phantom, MetricsSettings(bias_correction=False, fat_method="otsu",
                                        reference_scope="level", pool_psoas=True)),
        (full, NO_N4),
    ]
    files = (example_dir / "sub-0001_T1w.nii.gz", example_dir / "sub-0001_T1w_dseg.nii.gz",
             example_dir / "labels.json")
    fast = [_measure_ph(ph, settings) for ph, settings in cases]
    fast.append(measure_files(*files, settings=NO_N4))
    _use_straightforward(monkeypatch)
    plain = [_measure_ph(ph, settings) for ph, settings in cases]
    plain.append(measure_files(*files, settings=NO_N4))
    for f, p in zip(fast, plain, strict=True):
        _same_result(f, p)
